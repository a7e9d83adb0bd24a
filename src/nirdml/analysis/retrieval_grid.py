"""Retrieval grids: queries with their top-k neighbours, correct ones framed green, wrong red.

``query_scores`` ranks every query by its own retrieval quality (per-query MAP@R, from the
same exact kNN and metric code as :func:`nirdml.evaluation.evaluate`), so the worst
queries can be shown next to random ones. ``retrieval_rows`` finds the neighbours of chosen
queries and ``render_retrieval_grid`` draws them with Pillow at fixed pixel positions
(returned as a :class:`GridLayout`, so the frames can be checked pixel by pixel).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from nirdml.analysis.images import ImageSource
from nirdml.errors import InputError

CORRECT_RGB = (0, 170, 0)
"""Frame of a neighbour of the query's class."""
WRONG_RGB = (220, 30, 30)
"""Frame of a neighbour of another class."""
QUERY_RGB = (40, 90, 220)
"""Frame of the query."""
UNKNOWN_RGB = (150, 150, 150)
"""Frame of a neighbour when the query's class is unknown (search with an outside image)."""
FRAME = 4
"""Frame width in pixels."""


def as_matrix(x: Any) -> torch.Tensor:
    """Embeddings as a 2-D float32 CPU tensor."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach().to("cpu", torch.float32)
    if t.dim() != 2 or t.shape[0] < 2:
        raise InputError(
            f"embeddings must be a (N, D) matrix with N >= 2, got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise InputError("embeddings contain NaN/inf; check the model or the exported file")
    return t


@dataclass
class QueryScores:
    """Per-query retrieval quality in self-retrieval (every item queries all others).

    ``ap``: per-query MAP@R (``metric`` says which: ``"map@r"``, or ``"map@K"`` truncated
    at ``window`` when a class is larger than ``window + 1``); NaN for queries without any
    same-class item. ``first_hit``: 1-based rank of the first same-class neighbour, 0 when
    there is none among the first ``window``. ``num_relevant``: R per query.
    ``nearest_positive``: cosine similarity of the most similar same-class item (NaN if
    none): among queries with equal AP, the lower it is, the further the class is away.
    """

    ap: np.ndarray
    first_hit: np.ndarray
    num_relevant: np.ndarray
    nearest_positive: np.ndarray
    window: int
    metric: str

    def worst(self, n: int) -> list[int]:
        """The ``n`` worst queries: lowest AP, then least similar nearest same-class item,
        then lowest index."""
        valid = np.flatnonzero(self.num_relevant > 0)
        order = np.lexsort((valid, self.nearest_positive[valid], self.ap[valid]))
        return [int(i) for i in valid[order[:n]]]


def nearest_positive_similarity(x: torch.Tensor, ids: np.ndarray, block: int = 2048) -> np.ndarray:
    """Per item, the cosine similarity of its most similar other item of the same class
    (NaN for one-item classes). Works class by class, ``block`` rows at a time."""
    unit = F.normalize(x.double(), dim=1)
    out = np.full(len(ids), np.nan)
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        m = torch.as_tensor(members)
        u = unit[m]
        for s in range(0, len(members), block):
            sims = u[s : s + block] @ u.T
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + s] = -math.inf
            out[members[s : s + block]] = sims.max(dim=1).values.numpy()
    return out


def query_scores(
    embeddings: Any,
    labels: Any,
    *,
    max_rank: int = 1000,
    device: str | torch.device | None = None,
) -> QueryScores:
    """Per-query MAP@R and first-hit rank of every item (streamed, bounded memory)."""
    from nirdml.evaluation import retrieval
    from nirdml.evaluation.knn import iter_knn

    x = as_matrix(embeddings)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) != x.shape[0]:
        raise InputError(f"{x.shape[0]} embeddings but {len(y)} labels")
    _, ids = np.unique(y, return_inverse=True)
    rel = np.bincount(ids)[ids] - 1
    window = int(min(max(int(rel.max()), 1), max_rank, x.shape[0] - 1))
    metric = "map@r" if int(rel.max()) <= window else f"map@{window}"
    ids_t = torch.as_tensor(ids)
    rel_t = torch.as_tensor(rel)
    ap = np.empty(len(y), dtype=np.float64)
    first = np.zeros(len(y), dtype=np.int64)
    for s, e, _, idx in iter_knn(x, None, window, device=device):
        idx = idx.cpu()
        hits = ids_t[idx] == ids_t[s:e].unsqueeze(1)
        r = rel_t[s:e]
        if metric == "map@r":
            ap[s:e] = retrieval.map_at_r(hits, r).numpy()
        else:
            ap[s:e] = retrieval.map_at(hits, r, window).numpy()
        any_hit = hits.any(dim=1)
        first[s:e] = torch.where(any_hit, hits.to(torch.int8).argmax(dim=1) + 1, 0).numpy()
    nearest = nearest_positive_similarity(x, ids)
    return QueryScores(ap, first, rel, nearest, window, metric)


def pick_queries(labels: Any, n: int, seed: int = 0) -> list[int]:
    """``n`` random queries from ``n`` different classes (classes with >= 2 items only),
    drawn with a local RNG from ``seed``."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    classes, counts = np.unique(y, return_counts=True)
    usable = classes[counts >= 2]
    if len(usable) == 0:
        raise InputError("no class has 2 or more items: there is nothing to retrieve")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(usable, size=min(n, len(usable)), replace=False)
    return [int(rng.choice(np.flatnonzero(y == c))) for c in chosen]


@dataclass
class RetrievalRow:
    """One query and its ``k`` nearest other items (ranked by distance, then index)."""

    query: int
    label: int
    neighbours: list[int]
    neighbour_labels: list[int]
    similarities: list[float]
    correct: list[bool | None]
    note: str = ""


def retrieval_rows(
    embeddings: Any,
    labels: Any,
    queries: list[int],
    k: int,
    *,
    notes: dict[int, str] | None = None,
    device: str | torch.device | None = None,
) -> list[RetrievalRow]:
    """The ``k`` nearest neighbours of each query among all other items (self excluded by
    index, as in evaluation). Similarities are cosine similarities."""
    from nirdml.evaluation import knn_search

    x = as_matrix(embeddings)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise InputError(f"k={k} must lie in 1..{n - 1} (the other items of {n})")
    if not queries:
        return []
    q = torch.as_tensor(queries, dtype=torch.long)
    if int(q.min()) < 0 or int(q.max()) >= n:
        raise InputError(f"query indices must lie in 0..{n - 1}")
    _, idx = knn_search(x[q], x, k + 1, device=device)
    unit = F.normalize(x, dim=1)
    rows = []
    for qi, cand in zip(queries, idx.tolist(), strict=True):
        nb = [j for j in cand if j != qi][:k]
        sims = (unit[nb] @ unit[qi]).tolist()
        rows.append(
            RetrievalRow(
                query=int(qi),
                label=int(y[qi]),
                neighbours=nb,
                neighbour_labels=[int(y[j]) for j in nb],
                similarities=[float(s) for s in sims],
                correct=[bool(y[j] == y[qi]) for j in nb],
                note=(notes or {}).get(int(qi), ""),
            )
        )
    return rows


@dataclass
class GridLayout:
    """Where ``render_retrieval_grid`` drew each tile: frame boxes ``(x0, y0, x1, y1)``
    (inclusive) of the query and of each neighbour, per row, and their frame colours."""

    size: tuple[int, int]
    query_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    result_boxes: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    result_colors: list[list[tuple[int, int, int]]] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(img: np.ndarray, box: int, background: tuple[int, int, int]) -> Image.Image:
    """An RGB array scaled to fit a ``box`` x ``box`` square (aspect kept, centred).

    Small images are enlarged by an integer factor with nearest-neighbour (crisp pixels)."""
    pil = Image.fromarray(img)
    w, h = pil.size
    scale = box / max(w, h)
    if scale >= 2:
        f = int(math.floor(scale))
        pil = pil.resize((w * f, h * f), Image.Resampling.NEAREST)
    else:
        pil = pil.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
        )
    out = Image.new("RGB", (box, box), background)
    out.paste(pil, ((box - pil.size[0]) // 2, (box - pil.size[1]) // 2))
    return out


def _clip(text: str, font: ImageFont.ImageFont, width: int, draw: ImageDraw.ImageDraw) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


_RGB = tuple[int, int, int]
_Box = tuple[int, ...]
_MARGIN, _GAP, _SEP = 10, 6, 22  # outer margin, gap between neighbours, gap after the query
_HEADER_H, _CAPTION_H, _ROW_GAP = 18, 30, 14  # header line, captions under tiles, row spacing


def _grid_size(rows: list[RetrievalRow], tile: int, title: str) -> tuple[int, int, int]:
    """(width, height, top of the first row) of the canvas, so every row and tile fits."""
    k = max(len(r.neighbours) for r in rows)
    head = 44 if title else 26
    # At least wide enough for the title and the legend when k is small.
    width = max(2 * _MARGIN + tile + _SEP + k * tile + (k - 1) * _GAP, 560)
    height = head + len(rows) * _row_height(tile) + _MARGIN
    return width, height, head


def _row_height(tile: int) -> int:
    """Pixels one query row takes: header, tiles, captions and the gap below."""
    return _HEADER_H + tile + _CAPTION_H + _ROW_GAP


def _legend(rows: list[RetrievalRow]) -> list[tuple[_RGB, str]]:
    """Legend entries (frame colour, text); grey only when some query's class is unknown."""
    legend = [(QUERY_RGB, "query"), (CORRECT_RGB, "same class"), (WRONG_RGB, "other class")]
    if any(ok is None for r in rows for ok in r.correct):
        legend.append((UNKNOWN_RGB, "query class unknown"))
    return legend


def _frame_color(ok: bool | None) -> _RGB:
    """A neighbour's frame colour: green same class, red other class, grey unknown."""
    return UNKNOWN_RGB if ok is None else CORRECT_RGB if ok else WRONG_RGB


class _GridPainter:
    """Draws onto one grid canvas: title and legend, row headers, framed tiles, captions."""

    def __init__(
        self, canvas: Image.Image, images: ImageSource | None, names: list[str], tile: int
    ) -> None:
        self.canvas, self.images, self.names, self.tile = canvas, images, names, tile
        self.draw = ImageDraw.Draw(canvas)
        self.f_title, self.f_text, self.f_small = _font(15), _font(12), _font(11)

    def name_of(self, label: int) -> str:
        """A class's display name (its number when unnamed; negative: unknown)."""
        if label < 0:
            return "class unknown"
        return self.names[label] if 0 <= label < len(self.names) else str(label)

    def draw_title_and_legend(self, title: str, legend: list[tuple[_RGB, str]]) -> None:
        """The title (if any) and below it the legend of frame colours."""
        draw, y = self.draw, _MARGIN
        if title:
            draw.text((_MARGIN, y), title, fill=(0, 0, 0), font=self.f_title)
            y += 20
        x = _MARGIN
        for color, label in legend:
            draw.rectangle((x, y + 2, x + 11, y + 13), outline=color, width=3)
            draw.text((x + 16, y), label, fill=(40, 40, 40), font=self.f_text)
            x += 26 + int(draw.textlength(label, font=self.f_text)) + 10

    def draw_tile(self, i: int, x0: int, y0: int, color: _RGB) -> _Box:
        """Item i's picture (grey without one) in a frame of ``color``; the frame box."""
        tile, draw = self.tile, self.draw
        pic = self.images(i) if self.images is not None else None
        if pic is not None:
            self.canvas.paste(
                _fit(pic, tile - 2 * FRAME, (235, 235, 235)), (x0 + FRAME, y0 + FRAME)
            )
        else:
            draw.rectangle(
                (x0 + FRAME, y0 + FRAME, x0 + tile - FRAME - 1, y0 + tile - FRAME - 1),
                fill=(225, 225, 225),
            )
        box = (x0, y0, x0 + tile - 1, y0 + tile - 1)
        draw.rectangle(box, outline=color, width=FRAME)
        return box

    def draw_captions(self, x0: int, y0: int, first: str, color: _RGB, label: int) -> None:
        """Two lines under a tile at (x0, y0): ``first`` in ``color``, then the class name."""
        self.draw.text((x0, y0 + self.tile + 2), first, fill=color, font=self.f_small)
        name = _clip(self.name_of(label), self.f_small, self.tile, self.draw)
        self.draw.text((x0, y0 + self.tile + 15), name, fill=(60, 60, 60), font=self.f_small)

    def draw_row(
        self, row: RetrievalRow, y0: int, width: int
    ) -> tuple[_Box, list[_Box], list[_RGB]]:
        """Row ``row`` at height y0; returns (query box, neighbour boxes, their colours)."""
        header = f"query #{row.query}"
        if row.label >= 0:
            header += f", class {self.name_of(row.label)}"
        if row.note:
            header += f"  ({row.note})"
        header = _clip(header, self.f_text, width - 2 * _MARGIN, self.draw)
        self.draw.text((_MARGIN, y0), header, fill=(0, 0, 0), font=self.f_text)
        ty = y0 + _HEADER_H
        qbox = self.draw_tile(row.query, _MARGIN, ty, QUERY_RGB)
        self.draw_captions(_MARGIN, ty, "query", QUERY_RGB, row.label)
        boxes, colors = [], []
        for r, (j, sim, ok) in enumerate(
            zip(row.neighbours, row.similarities, row.correct, strict=True)
        ):
            x0 = _MARGIN + self.tile + _SEP + r * (self.tile + _GAP)
            color = _frame_color(ok)
            boxes.append(self.draw_tile(j, x0, ty, color))
            colors.append(color)
            self.draw_captions(x0, ty, f"{r + 1}  sim {sim:.3f}", color, row.neighbour_labels[r])
        return qbox, boxes, colors


def render_retrieval_grid(
    rows: list[RetrievalRow],
    images: ImageSource | None,
    class_names: list[str] | None = None,
    *,
    title: str = "",
    tile: int = 96,
) -> tuple[bytes, GridLayout]:
    """Draw the rows as a PNG: query tile (blue frame), then its neighbours framed green
    (same class as the query), red (another class) or grey (``correct`` None: the query's
    class is unknown), each with rank, cosine similarity and class name. Returns the PNG
    bytes and the tile positions.

    ``images(i)`` gives item i's picture (HxWx3 uint8); without it (or when it returns None)
    the tile is left grey (the caption under it still names the class).
    """
    if not rows:
        raise InputError("no rows to draw")
    if tile < 32:
        raise InputError(f"tile must be >= 32 pixels, got {tile}")
    width, height, head = _grid_size(rows, tile, title)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    painter = _GridPainter(canvas, images, class_names or [], tile)
    painter.draw_title_and_legend(title, _legend(rows))
    layout = GridLayout(size=(width, height))
    for n, row in enumerate(rows):
        qbox, boxes, colors = painter.draw_row(row, head + n * _row_height(tile), width)
        layout.query_boxes.append(qbox)
        layout.result_boxes.append(boxes)
        layout.result_colors.append(colors)
    return _png_bytes(canvas), layout


def _png_bytes(canvas: Image.Image) -> bytes:
    """The canvas as optimised PNG bytes."""
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
