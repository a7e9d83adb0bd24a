"""Image search with a trained model: embed a gallery folder once (cached), then query it.

The gallery cache is one ``.npz`` per (checkpoint, gallery) pair, named by a SHA-256 key of
the checkpoint file (resolved path, size, mtime) and of every gallery file (path, size,
mtime): retraining into the same file, or adding, removing or touching an image, gives a
new key, so a stale cache is never used. Files are written atomically. The default cache
folder is ``$NIRDML_CACHE/search``, else ``$XDG_CACHE_HOME/nirdml/search``, else
``~/.cache/nirdml/search``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.analysis.images import path_images
from nirdml.errors import InputError, MissingFileError
from nirdml.runtime import atomic_write, resolve_device
from nirdml.training.checkpoint import resolve_checkpoint

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Where gallery embeddings are cached unless ``cache_dir`` is given."""
    if os.environ.get("NIRDML_CACHE"):
        return Path(os.environ["NIRDML_CACHE"]) / "search"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nirdml" / "search"


def _stat(path: str | Path) -> list[Any]:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def gallery_key(checkpoint: str | Path, paths: list[str]) -> str:
    """SHA-256 of the checkpoint file's and every gallery file's (path, size, mtime)."""
    payload = {
        "format": CACHE_FORMAT,
        "checkpoint": _stat(resolve_checkpoint(checkpoint).resolve()),
        "files": [_stat(p) for p in paths],
    }
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def _preprocess(run: Any):
    """(file reader, test transform) the run's model was evaluated with."""
    from nirdml.data import file_reader
    from nirdml.training.artifacts import test_transform

    return file_reader(run.config.data.name), test_transform(run.config)


@dataclass
class GalleryIndex:
    """Embeddings of every image of a gallery folder, with paths and class labels."""

    embeddings: torch.Tensor
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    key: str
    cache_file: Path | None = None
    from_cache: bool = False


def _gallery_dataset(folder: str | Path, reader, transform):
    from nirdml.data import load_image_folder

    return load_image_folder(folder, transform=transform, convert=reader)


def embed_gallery(
    checkpoint: str | Path,
    gallery: str | Path,
    *,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    run: Any = None,
) -> GalleryIndex:
    """Embeddings of the gallery folder (class sub-folders, or images directly), from the
    cache when the checkpoint and the files are unchanged, else computed and cached.

    ``run``: an already loaded :class:`~nirdml.training.artifacts.TrainedRun` of this
    checkpoint, to avoid loading it twice.
    """
    from nirdml.evaluation import compute_embeddings
    from nirdml.training.artifacts import load_trained

    files = _gallery_dataset(gallery, None, None)
    # absolute, not resolved: a symlinked gallery file keeps its folder (its class) in the
    # results; queries are matched to gallery files by their resolved paths (search)
    paths = [os.path.abspath(p) for p in files.paths]
    key = gallery_key(checkpoint, paths)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = folder / f"gallery-{key[:32]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == key and len(z["paths"]) == len(paths):
                    return GalleryIndex(
                        embeddings=torch.from_numpy(z["embeddings"]),
                        paths=[str(p) for p in z["paths"]],
                        labels=z["labels"].astype(np.int64),
                        class_names=[str(c) for c in z["class_names"]],
                        key=key,
                        cache_file=cache,
                        from_cache=True,
                    )
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign file: recompute and replace it
    dev = resolve_device(device)
    run = run if run is not None else load_trained(checkpoint, dev, with_loss=False)
    reader, transform = _preprocess(run)
    data = _gallery_dataset(gallery, reader, transform)
    emb, labels = compute_embeddings(
        run.model, data, batch_size=batch_size, device=dev, num_workers=num_workers
    )
    emb = emb.float().contiguous()
    labels_np = labels.numpy().astype(np.int64)
    payload = {
        "embeddings": emb.numpy(),
        "labels": labels_np,
        "paths": np.asarray(paths),
        "class_names": np.asarray(list(data.class_names)),
        "key": np.asarray(key),
    }
    atomic_write(cache, lambda f: np.savez(f, **payload))
    return GalleryIndex(emb, paths, labels_np, list(data.class_names), key, cache, False)


@dataclass
class SearchHit:
    """One result: 1-based rank, gallery path, cosine similarity, gallery class name."""

    rank: int
    path: str
    similarity: float
    class_name: str
    index: int


@dataclass
class SearchResult:
    """Per query: its path, its gallery position when it is a gallery image (then it is
    excluded from its own results), and its hits."""

    queries: list[str]
    query_in_gallery: list[int | None]
    hits: list[list[SearchHit]]
    gallery: GalleryIndex
    grid: Path | None = None
    notes: list[str] = field(default_factory=list)


def embed_images(run: Any, paths: list[str | Path], device: str = "auto") -> torch.Tensor:
    """Embeddings of single image files, preprocessed as the run's test split."""
    from nirdml.data.base import open_image

    dev = resolve_device(device)
    reader, transform = _preprocess(run)
    xs = []
    for p in paths:
        if not Path(p).is_file():
            raise MissingFileError(f"query image {p} does not exist")
        xs.append(transform(open_image(str(p), reader)))
    model = run.model.to(dev).eval()
    with torch.inference_mode():
        return model(torch.stack(xs).to(dev)).float().cpu()


def search(
    checkpoint: str | Path,
    gallery: str | Path,
    queries: str | Path | list[str | Path],
    *,
    k: int = 10,
    cache_dir: str | Path | None = None,
    grid: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
) -> SearchResult:
    """The ``k`` gallery images most similar to each query image.

    Ranked by Euclidean distance between embeddings (= cosine ranking for the L2-normalised
    embeddings nirdml models produce), ties by gallery order; similarities are cosine. A
    query that is itself a gallery file is left out of its own results. ``grid`` writes a
    PNG of the queries and their results (frames green/red by class when the query's class
    is known, i.e. it lies in a gallery class folder; grey otherwise).
    """
    from nirdml.training.artifacts import load_trained

    qs = _query_paths(queries)
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    dev = resolve_device(device)
    run = load_trained(checkpoint, dev, with_loss=False)
    index = embed_gallery(
        checkpoint, gallery, cache_dir=cache_dir, device=device, batch_size=batch_size, run=run
    )
    q_pos = _gallery_positions(index.paths, qs)
    n = len(index.paths)
    if k > n - (1 if any(p is not None for p in q_pos) else 0):
        raise InputError(f"k={k} but the gallery has only {n} images; use k <= {n - 1}")
    hits = _rank_gallery(index, embed_images(run, qs, device), q_pos, k, dev)
    result = SearchResult([str(q) for q in qs], q_pos, hits, index)
    if grid is not None:
        result.grid = _write_grid(result, Path(grid))
    return result


def _query_paths(queries: str | Path | list[str | Path]) -> list[str | Path]:
    """The query images as a list, refusing none at all and any file that does not exist."""
    qs = [queries] if isinstance(queries, (str, Path)) else list(queries)
    if not qs:
        raise InputError("pass at least one query image")
    for q in qs:
        if not Path(q).is_file():
            raise MissingFileError(f"query image {q} does not exist")
    return qs


def _gallery_positions(paths: list[str], queries: list[str | Path]) -> list[int | None]:
    """Per query, its gallery position when it is a gallery file (by resolved path), else None."""
    position = {str(Path(p).resolve()): i for i, p in enumerate(paths)}
    return [position.get(str(Path(q).resolve())) for q in queries]


def _rank_gallery(
    index: GalleryIndex,
    q_emb: torch.Tensor,
    q_pos: list[int | None],
    k: int,
    device: torch.device,
) -> list[list[SearchHit]]:
    """Per query, its ``k`` nearest gallery images, the query itself left out."""
    from nirdml.evaluation import knn_search

    n = len(index.paths)
    _, idx = knn_search(q_emb, index.embeddings, min(k + 1, n), device=device)
    unit_g = torch.nn.functional.normalize(index.embeddings, dim=1)
    unit_q = torch.nn.functional.normalize(q_emb, dim=1)
    hits: list[list[SearchHit]] = []
    for qi, (cand, own) in enumerate(zip(idx.tolist(), q_pos, strict=True)):
        chosen = [j for j in cand if j != own][:k]
        sims = (unit_g[chosen] @ unit_q[qi]).tolist()
        hits.append(_hits(index, chosen, sims))
    return hits


def _hits(index: GalleryIndex, chosen: list[int], sims: list[float]) -> list[SearchHit]:
    """The ranked hits of one query: gallery items ``chosen`` with their similarities."""
    return [
        SearchHit(
            rank=r + 1,
            path=index.paths[j],
            similarity=float(s),
            class_name=index.class_names[int(index.labels[j])],
            index=j,
        )
        for r, (j, s) in enumerate(zip(chosen, sims, strict=True))
    ]


def _write_grid(result: SearchResult, path: Path) -> Path:
    png, _ = search_grid(result)
    return atomic_write(path, lambda f: f.write(png))


def search_grid(result: SearchResult):
    """PNG bytes and :class:`~nirdml.analysis.retrieval_grid.GridLayout` of a search's
    queries and results (frames by class when the query's class is known, else grey)."""
    from nirdml.analysis.retrieval_grid import RetrievalRow, render_retrieval_grid

    index = result.gallery
    nq = len(result.queries)
    all_paths = list(result.queries) + index.paths
    rows = []
    for qi, (hits, own) in enumerate(zip(result.hits, result.query_in_gallery, strict=True)):
        # A query's class is known when it is a gallery file in a class folder (images
        # directly in the gallery form the unlabelled class ".").
        label = int(index.labels[own]) if own is not None else -1
        if label >= 0 and index.class_names[label] == ".":
            label = -1
        rows.append(
            RetrievalRow(
                query=qi,
                label=label,
                neighbours=[nq + h.index for h in hits],
                neighbour_labels=[int(index.labels[h.index]) for h in hits],
                similarities=[h.similarity for h in hits],
                correct=[
                    (int(index.labels[h.index]) == label) if label >= 0 else None for h in hits
                ],
                note=Path(result.queries[qi]).name,
            )
        )
    return render_retrieval_grid(
        rows,
        path_images(all_paths),
        index.class_names,
        title=f"search: top {len(result.hits[0])} of {len(index.paths):,} gallery images",
    )
