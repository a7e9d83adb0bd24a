"""Seeded, reproducible k-means (Lloyd) for the clustering metrics.

Two backends:

- ``faiss``: ``faiss.Clustering`` set up as in the NIR / "Revisiting DML" authors' code
  (``niter`` Lloyd iterations, default 20; no subsampling: ``max_points_per_centroid``
  effectively infinite, ``min_points_per_centroid = 1``; init = ``k`` distinct random points
  drawn with ``seed``), then every point is assigned to its nearest final centroid. It is
  driven one iteration at a time so that it can stop once the centroids no longer change
  (the result is identical to running all ``niter`` iterations, usually in far fewer;
  faiss >= 1.15 also stops at an unchanged objective by itself, older versions always ran
  all ``niter``, as in the authors' runs). With
  the same seed and ``niter`` this is the clustering pytorch-metric-learning's
  ``FaissKMeans`` computes whenever it does not subsample (``n <= 256 k``, always true for
  DML test sets clustered into the number of classes).
- ``torch``: Lloyd on CPU or CUDA, float32 distances, float64 centroid sums. Init: ``k``
  distinct points from ``torch.randperm(n)`` with a local generator seeded by ``seed``.
  An empty cluster is re-seeded at the point farthest from its centroid. It stops early
  once an iteration changes no assignment (the remaining iterations would be no-ops, so
  the result equals running all ``niter``). After the first iteration only centroids whose
  member set changed are recomputed, and a point whose centroid did not move is compared
  only against the centroids that did (its old centroid still beats every unmoved one),
  which is exact and makes later iterations much cheaper than a full ``n x k`` pass.

Both return the cluster id of every point; the two backends use different random inits,
so their clusterings (and NMI) differ slightly.
"""

from __future__ import annotations

import numpy as np
import torch

from nirdml.errors import InputError
from nirdml.evaluation._inputs import ArrayLike, as_embeddings, rows_for_budget
from nirdml.evaluation.knn import DEFAULT_MEMORY_BUDGET_MB, faiss_available
from nirdml.runtime import require_extra, resolve_device

KMEANS_BACKENDS = ("auto", "torch", "faiss")
DEFAULT_NITER = 20
# Distance tile shape of the assignment step (cache-friendly matrix products).
_TILE_COLS = 4096
_TILE_ROWS = 2048


def resolve_kmeans_backend(backend: str) -> str:
    """``auto`` is faiss when installed (as the authors and pytorch-metric-learning), else
    torch."""
    if backend not in KMEANS_BACKENDS:
        raise InputError(f"unknown k-means backend {backend!r}; use one of {KMEANS_BACKENDS}.")
    if backend == "faiss":
        require_extra("faiss", ("faiss",), "backend='faiss'", alternative="backend='torch'")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    return backend


def kmeans(
    x: ArrayLike,
    num_clusters: int,
    *,
    niter: int = DEFAULT_NITER,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> np.ndarray:
    """Cluster the rows of ``x`` into ``num_clusters`` groups; returns int64 cluster ids.

    ``device`` and ``memory_budget_mb`` apply to the torch backend (faiss runs on CPU)."""
    t = as_embeddings(x, "x")
    n = t.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)):
        raise InputError(f"num_clusters must be an integer, got {num_clusters!r}.")
    if not 1 <= num_clusters <= n:
        raise InputError(
            f"num_clusters={num_clusters} must be between 1 and the number of points ({n})."
        )
    if niter < 1:
        raise InputError(f"niter must be >= 1, got {niter}.")
    backend = resolve_kmeans_backend(backend)
    if backend == "faiss":
        return _kmeans_faiss(t, int(num_clusters), niter, seed)
    return _kmeans_torch(
        t, int(num_clusters), niter, seed, resolve_device(device), memory_budget_mb
    )


def _faiss_clustering(d: int, k: int, seed: int):
    import faiss

    clus = faiss.Clustering(d, k)
    clus.niter = 1
    clus.seed = int(seed)
    clus.min_points_per_centroid = 1
    clus.max_points_per_centroid = 2**31 - 1
    clus.verbose = False
    return clus


def _kmeans_faiss(x: torch.Tensor, k: int, niter: int, seed: int) -> np.ndarray:
    """``faiss.Clustering`` with ``niter`` iterations, run one iteration per call.

    Each call continues from the previous centroids (faiss skips its random init when
    centroids are given, and its empty-cluster split re-seeds its generator every
    iteration), so the chain is the same computation as one ``niter``-iteration run; it
    stops early once an iteration leaves the centroids bit-identical, because every later
    iteration would repeat it."""
    import faiss

    data = np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy())
    d = data.shape[1]
    index = faiss.IndexFlatL2(d)
    clus = _faiss_clustering(d, k, seed)
    clus.train(data, index)
    prev = faiss.vector_to_array(clus.centroids).copy()
    for _ in range(niter - 1):
        clus = _faiss_clustering(d, k, seed)
        if hasattr(clus, "check_input_data_for_NaNs"):
            clus.check_input_data_for_NaNs = False  # checked once already
        faiss.copy_array_to_vector(prev, clus.centroids)
        index.reset()
        clus.train(data, index)
        cur = faiss.vector_to_array(clus.centroids).copy()
        if np.array_equal(cur, prev):
            break
        prev = cur
    # The index holds the final centroids: assign every point to its nearest one.
    _, assign = index.search(data, 1)
    return assign[:, 0].astype(np.int64)


class _Lloyd:
    """State of the torch k-means: data, centroids, assignment, distances."""

    def __init__(self, x: torch.Tensor, k: int, memory_budget_mb: float) -> None:
        self.x = x
        self.x_sqn = (x * x).sum(1)
        self.k = k
        self.budget = memory_budget_mb
        self.buf = torch.empty(0, dtype=x.dtype, device=x.device)

    def nearest(
        self, pts: torch.Tensor, cent_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the points ``pts`` (indices), the nearest centroid among ``cent_ids`` (all
        when None; ids ascending) and ``||c||^2 - 2 x.c`` to it. Ties: lowest id.

        Works in (point block x centroid tile) pieces written into one reused buffer
        (fresh large allocations are page-faulted in on every chunk); tiles are visited in
        ascending centroid order and only a strictly smaller value replaces the running
        best, so ties keep the lowest id."""
        c = self.c if cent_ids is None else self.c[cent_ids]
        c_sqn = self.c_sqn if cent_ids is None else self.c_sqn[cent_ids]
        n_c = c.shape[0]
        best_val = torch.empty(pts.shape[0], dtype=self.x.dtype, device=self.x.device)
        best_id = torch.empty(pts.shape[0], dtype=torch.long, device=self.x.device)
        cols = min(n_c, _TILE_COLS)
        rows = min(pts.shape[0], _TILE_ROWS, rows_for_budget(8 * cols, self.budget))
        if self.buf.numel() < rows * cols:
            self.buf = torch.empty(rows * cols, dtype=self.x.dtype, device=self.x.device)
        for s in range(0, pts.shape[0], rows):
            xp = self.x[pts[s : s + rows]]
            bv = bi = None
            for c0 in range(0, n_c, cols):
                w = min(cols, n_c - c0)
                d = self.buf[: xp.shape[0] * w].view(xp.shape[0], w)
                torch.addmm(
                    c_sqn[c0 : c0 + w].unsqueeze(0),
                    xp,
                    c[c0 : c0 + w].T,
                    beta=1.0,
                    alpha=-2.0,
                    out=d,
                )
                v, i = d.min(dim=1)
                if bv is None:
                    bv, bi = v, i
                else:
                    better = v < bv
                    bv = torch.where(better, v, bv)
                    bi = torch.where(better, i + c0, bi)
            assert bv is not None and bi is not None
            best_val[s : s + rows] = bv
            best_id[s : s + rows] = bi if cent_ids is None else cent_ids[bi]
        return best_val, best_id

    def set_centroids(self, c: torch.Tensor) -> None:
        self.c = c
        self.c_sqn = (c * c).sum(1)


def _kmeans_torch(
    x: torch.Tensor,
    k: int,
    niter: int,
    seed: int,
    device: torch.device,
    memory_budget_mb: float,
) -> np.ndarray:
    x = x.to(device=device, dtype=torch.float32)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    init = torch.randperm(n, generator=gen)[:k].to(device)
    st = _Lloyd(x, k, memory_budget_mb)
    st.set_centroids(x[init].clone())
    all_pts = torch.arange(n, device=device)
    val, assign = st.nearest(all_pts, None)
    changed: torch.Tensor | None = None  # None: every cluster (first update)
    for _ in range(niter):
        prev = assign
        moved = _update_centroids(st, assign, val, changed)
        if moved.numel() == 0:
            break
        val, assign = _reassign(st, prev, val, moved, all_pts)
        diff = assign != prev
        if not bool(diff.any()):
            break  # converged: further iterations would repeat this assignment
        changed = torch.unique(torch.cat([prev[diff], assign[diff]]))
    return assign.cpu().numpy().astype(np.int64)


def _update_centroids(
    st: _Lloyd, assign: torch.Tensor, val: torch.Tensor, changed: torch.Tensor | None
) -> torch.Tensor:
    """Recompute the centroids of the clusters in ``changed`` (all when None) as member
    means; re-seed empty ones at the farthest points. Returns the ids that moved."""
    k, x = st.k, st.x
    counts = torch.bincount(assign, minlength=k)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, assign, x.to(torch.float64))
    ids = torch.arange(k, device=x.device) if changed is None else changed
    c = st.c.clone()
    nonempty = ids[counts[ids] > 0]
    c[nonempty] = (sums[nonempty] / counts[nonempty].unsqueeze(1)).to(c.dtype)
    empty = ids[counts[ids] == 0]
    if empty.numel():
        # Farthest points from their centroids (full squared distance), distinct, in
        # decreasing distance; ties broken by point index.
        dist = val + st.x_sqn
        order = torch.argsort(-dist.double().cpu(), stable=True)[: empty.numel()].to(x.device)
        c[empty] = x[order]
    moved = ids
    if changed is not None:
        moved = ids[(c[ids] != st.c[ids]).any(dim=1)]
    st.set_centroids(c)
    return moved


def _reassign(
    st: _Lloyd,
    prev: torch.Tensor,
    prev_val: torch.Tensor,
    moved: torch.Tensor,
    all_pts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Lloyd assignment when only the centroids ``moved`` changed since ``prev``."""
    if moved.numel() >= st.k // 2:
        return st.nearest(all_pts, None)
    is_moved = torch.zeros(st.k, dtype=torch.bool, device=prev.device)
    is_moved[moved] = True
    val = prev_val.clone()
    assign = prev.clone()
    # Points whose own centroid moved: full search.
    lost = all_pts[is_moved[prev]]
    if lost.numel():
        v, a = st.nearest(lost, None)
        val[lost], assign[lost] = v, a
    # Points whose centroid stayed: own centroid vs the moved ones.
    kept = all_pts[~is_moved[prev]]
    if kept.numel():
        own = prev[kept]
        own_val = prev_val[kept]  # the same, unmoved centroid as before
        v, a = st.nearest(kept, moved)
        better = (v < own_val) | ((v == own_val) & (a < own))
        val[kept] = torch.where(better, v, own_val)
        assign[kept] = torch.where(better, a, own)
    return val, assign
