"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display):
every function returns PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _palette(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def spectrum_plot(singular_values: np.ndarray, rho: float) -> bytes:
    """Normalised singular value spectrum (log scale) against the uniform spectrum, with
    its cumulative share."""
    s = np.asarray(singular_values, dtype=np.float64)
    p = s / s.sum()
    idx = np.arange(1, len(p) + 1)
    fig = _figure(9.0, 3.4)
    ax, ax2 = fig.subplots(1, 2)
    ax.semilogy(idx, p, "C0-", lw=1.6, label="embeddings")
    ax.axhline(1.0 / len(p), color="0.4", ls="--", lw=1, label="uniform (rho = 0)")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("s_i / sum(s)")
    ax.set_title(f"singular value spectrum, rho = {rho:.4f}")
    ax.legend(fontsize=8)
    ax2.plot(idx, np.cumsum(p), "C0-", lw=1.6)
    ax2.plot(idx, idx / len(p), color="0.4", ls="--", lw=1)
    ax2.set_xlabel("number of leading directions")
    ax2.set_ylabel("cumulative share of sum(s)")
    ax2.set_ylim(0, 1.01)
    ax2.set_title("cumulative spectrum")
    fig.tight_layout()
    return _png(fig)


def spread_plot(intra: np.ndarray, inter: float, pi_ratio: float) -> bytes:
    """Histogram of per-class spread with the mean distance between class centres."""
    v = np.asarray(intra, dtype=np.float64)
    v = v[~np.isnan(v)]
    fig = _figure(6.4, 3.4)
    ax = fig.subplots()
    ax.hist(v, bins=min(40, max(5, len(v) // 3)), color="C0", alpha=0.8)
    ax.axvline(float(np.mean(v)), color="C0", ls="-", lw=1.5, label=f"mean spread {np.mean(v):.3f}")
    ax.axvline(inter, color="C3", ls="--", lw=1.5, label=f"mean centre distance {inter:.3f}")
    ax.set_xlabel("mean intra-class cosine distance (per class)")
    ax.set_ylabel("classes")
    ax.set_title(f"per-class spread ({len(v)} classes), pi ratio = {pi_ratio:.4f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def map_plot(
    xy: np.ndarray,
    labels: np.ndarray,
    highlight: Sequence[int],
    class_names: Sequence[str],
    method: str,
    title: str,
) -> bytes:
    """2-D map: highlighted classes in colour (legend), every other point light grey."""
    labels = np.asarray(labels)
    fig = _figure(8.4, 6.6)
    ax = fig.subplots()
    rest = ~np.isin(labels, np.asarray(list(highlight)))
    if rest.any():
        ax.scatter(xy[rest, 0], xy[rest, 1], s=4, c="0.8", lw=0, label="other classes")
    for color, c in zip(_palette(len(highlight)), highlight, strict=True):
        m = labels == c
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=12, color=color, lw=0, label=_short(name, 28))
    ax.set_title(f"{title} ({method.upper() if method != 'tsne' else 't-SNE'})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(
        fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5, frameon=False
    )
    fig.tight_layout()
    return _png(fig)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


@dataclass
class Curve:
    """One group's metric per epoch: the runs' values (rows = runs, NaN where missing)."""

    label: str
    epochs: np.ndarray
    values: np.ndarray


def curves_plot(curves: Sequence[Curve], ylabel: str, title: str) -> bytes:
    """Mean per epoch with a +- std band over runs (where every run has a value), each run
    as a thin line underneath."""
    fig = _figure(7.6, 4.4)
    ax = fig.subplots()
    for color, curve in zip(_palette(len(curves)), curves, strict=True):
        vals = np.asarray(curve.values, dtype=np.float64)
        n = vals.shape[0]
        for row in vals:
            ok = ~np.isnan(row)
            if n > 1:
                ax.plot(curve.epochs[ok], row[ok], color=color, lw=0.7, alpha=0.35)
        complete = ~np.isnan(vals).any(axis=0)
        if not complete.any():
            continue
        mean = vals[:, complete].mean(0)
        label = curve.label + (f" (mean of {n})" if n > 1 else "")
        ax.plot(curve.epochs[complete], mean, color=color, lw=2, marker="o", ms=3, label=label)
        if n > 1:
            std = vals[:, complete].std(0, ddof=1)
            ax.fill_between(
                curve.epochs[complete], mean - std, mean + std, color=color, alpha=0.18, lw=0
            )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


_OVERVIEW_MARKS = (
    {"marker": "x", "s": 14, "alpha": 0.45, "lw": 0.8},
    {"marker": "o", "s": 16, "edgecolor": "k", "lw": 0.3},
    {"marker": "*", "s": 220, "edgecolor": "k", "lw": 0.8},
)
"""flow_plot's overview marks: flow samples, real embeddings, proxy (real ones get the
class name as label)."""
_CLASS_MARKS = (
    {"marker": "x", "s": 16, "alpha": 0.55, "lw": 0.8, "label": "flow samples"},
    {"marker": "o", "s": 20, "edgecolor": "k", "lw": 0.4, "label": "real"},
    {"marker": "*", "s": 200, "edgecolor": "k", "lw": 0.8, "label": "proxy"},
)
"""flow_plot's per-class marks: flow samples, real embeddings, proxy."""


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows L2-normalised in float64 (the embedding space is the sphere)."""
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True).clip(min=1e-12)


def _principal_plane(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean row, D x 2 projection onto the two leading principal directions) of points;
    a zero column where the SVD gives fewer than two (a single point)."""
    centre = points.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    axes = np.zeros((points.shape[1], 2), dtype=vt.dtype)
    axes[:, : min(2, vt.shape[0])] = vt[:2].T
    return centre, axes


def _scatter_marks(ax: Any, sets: Sequence[np.ndarray], color: Any, marks: Sequence[dict]) -> None:
    """Scatter the 2-D point sets (samples, real, proxy) in one colour, each its own mark."""
    for points, mark in zip(sets, marks, strict=True):
        ax.scatter(points[:, 0], points[:, 1], color=color, **mark)


def _flow_overview(
    ax: Any, classes: list[tuple[np.ndarray, ...]], names: Sequence[str], colors: list
) -> None:
    """All classes' (samples, real, proxy) in the PCA plane of all their real embeddings."""
    centre, axes = _principal_plane(np.concatenate([real for _, real, _ in classes]))
    for i, sets in enumerate(classes):
        real_mark = {**_OVERVIEW_MARKS[1], "label": _short(names[i], 24)}
        marks = (_OVERVIEW_MARKS[0], real_mark, _OVERVIEW_MARKS[2])
        _scatter_marks(ax, [(a - centre) @ axes for a in sets], colors[i], marks)
    ax.set_title(
        "all shown classes (PCA of their real embeddings): dots = real, "
        "x = flow samples, star = proxy",
        fontsize=10,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _flow_class_panel(
    ax: Any, sets: tuple[np.ndarray, ...], name: str, color: Any, legend: bool
) -> None:
    """One class's (samples, real, proxy) in its real embeddings' own PCA plane (or axes 0-1)."""
    samples, real, _ = sets
    dim = np.concatenate([real, samples]).shape[1]
    if len(real) >= 2 and dim >= 2:
        centre, axes = _principal_plane(real)
    else:
        centre, axes = real.mean(0, keepdims=True), np.eye(dim)[:, :2]
    _scatter_marks(ax, [(a - centre) @ axes for a in sets], color, _CLASS_MARKS)
    ax.set_title(_short(name, 34) + " (own PCA plane)", fontsize=9)
    ax.tick_params(labelsize=7)
    if legend:
        ax.legend(fontsize=7)


def flow_plot(
    real: Sequence[np.ndarray],
    samples: Sequence[np.ndarray],
    proxies: np.ndarray,
    names: Sequence[str],
) -> bytes:
    """Flow samples next to real embeddings, per class: one overview panel (PCA of all the
    classes shown) and one panel per class in that class's own principal plane.

    Everything is L2-normalised before projecting (the embedding space is the sphere);
    the proxy is a star, real embeddings dots, flow samples crosses.
    """
    real_u = [_unit_rows(r) for r in real]
    samp_u = [_unit_rows(s) for s in samples]
    prox_u = _unit_rows(proxies)
    k = len(real_u)
    classes = [(samp_u[i], real_u[i], prox_u[i : i + 1]) for i in range(k)]
    cols = min(3, k)
    rows = 1 + math.ceil(k / cols)
    fig = _figure(4.0 * cols + 1.0, 3.6 * rows)
    colors = _palette(k)
    _flow_overview(fig.add_subplot(rows, 1, 1), classes, names, colors)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, cols + i + 1)
        _flow_class_panel(ax, classes[i], names[i], colors[i], legend=i == 0)
    fig.tight_layout()
    return _png(fig)
