"""2-D maps of embeddings: UMAP when installed, else t-SNE (scikit-learn), or PCA."""

from __future__ import annotations

import importlib.util

import numpy as np

from nirdml.errors import InputError
from nirdml.runtime import require_extra

METHODS = ("auto", "umap", "tsne", "pca")


def resolve_method(method: str) -> str:
    """``auto`` -> ``umap`` if the umap-learn package is installed, else ``tsne``."""
    if method not in METHODS:
        raise InputError(f"unknown 2-D map method {method!r}; choose one of {', '.join(METHODS)}")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "auto":
        return "umap" if has_umap else "tsne"
    if method == "umap":
        require_extra(
            "umap",
            ("umap",),
            "the umap map",
            alternative="draw a tsne or pca map instead (--map tsne or --map pca)",
        )
    return method


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Coordinates on the two leading principal axes (centred; sign fixed so the largest
    loading of each axis is positive, making the map reproducible)."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], x.shape[1]))])
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(1)])
    signs[signs == 0] = 1.0
    return centred @ (axes * signs[:, None]).T


def project_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``(N, 2)`` coordinates and the method used. Seeded: the same input gives the same map.

    t-SNE: scikit-learn's Barnes-Hut t-SNE, PCA initialisation, perplexity
    ``min(30, (N - 1) / 3)``; UMAP: ``umap.UMAP(n_neighbors=min(15, N - 1))``.
    """
    method = resolve_method(method)
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if n < 4 or method == "pca":
        return pca_2d(x), "pca"
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), "umap"
    from sklearn.manifold import TSNE

    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (n - 1) / 3.0),
        init="pca",
        random_state=seed,
    )
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "tsne"
