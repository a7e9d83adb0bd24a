"""``evaluate``: every metric of the paper from embeddings and labels, in one call.

Retrieval metrics stream over query blocks of the exact kNN search (``knn.iter_knn``), so
only per-query numbers are kept; clustering metrics run k-means once; structure metrics
work on the embeddings directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from nirdml.data.registry import DATASETS
from nirdml.evaluation._inputs import ArrayLike, as_embeddings, as_labels
from nirdml.evaluation.kmeans_backends import DEFAULT_NITER, kmeans, resolve_kmeans_backend
from nirdml.evaluation.knn import DEFAULT_MEMORY_BUDGET_MB, iter_knn, resolve_knn_backend
from nirdml.evaluation.registry import METRIC_NAMES_HELP, Metric, parse_metric
from nirdml.runtime import resolve_device

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    name: entry.metrics for name, entry in DATASETS.items()
}
"""Metrics reported per dataset (the paper's Recall@k ks; CUB/Cars-style for the rest),
from the dataset table (nirdml.data.registry)."""


@dataclass
class _Plan:
    """The requested metrics: each name with its table entry and ``k``, in the order asked."""

    names: list[str]
    metrics: dict[str, tuple[Metric, int | None]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[tuple[str, Metric, int | None]]:
        return [(n, m, k) for n, (m, k) in self.metrics.items() if m.kind == kind]


def _plan(metrics: tuple[str, ...] | list[str] | str) -> _Plan:
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(dict.fromkeys(str(m).strip().lower() for m in metrics))
    if not names:
        raise ValueError(f"metrics is empty; choose from: {METRIC_NAMES_HELP}.")
    return _Plan(names, {name: parse_metric(name) for name in names})


def evaluate(
    embeddings: ArrayLike,
    labels: ArrayLike,
    metrics: tuple[str, ...] | list[str] | str | None = None,
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    num_clusters: int | None = None,
    seed: int = 0,
    distance: str = "euclidean",
) -> dict[str, float]:
    """Compute the named metrics; returns ``{name: value}`` in the order asked.

    Self-retrieval (default): every item queries all *other* items (its own index is
    excluded; exact duplicates are not). Query/gallery mode: pass ``query_embeddings`` and
    ``query_labels``; ``embeddings``/``labels`` are then the gallery and nothing is
    excluded. Clustering and structure metrics use the query set (the embeddings
    themselves in self-retrieval), as pytorch-metric-learning does.

    - ``metrics``: names (see ``METRIC_NAMES_HELP``); None = ``DEFAULT_METRICS["cub200"]``
      (in query/gallery mode without the ``_authors`` variants, which are defined for
      self-retrieval only).
    - Queries with no same-class gallery item are left out of recall@K, r_precision, map@r
      and map@K (a warning says how many) and count 0 in map@K_authors.
    - ``backend``: ``"auto"`` = exact torch kNN and faiss k-means when installed (else
      torch); ``"torch"`` or ``"faiss"`` force both.
    - ``device``: torch compute device (None: CUDA if available); faiss runs on CPU.
    - ``memory_budget_mb``: bound on the temporaries of the kNN / k-means / G2 blocks.
    - ``num_clusters``: k of k-means; None = number of classes in the clustered set (the
      standard); the authors' code used the number of *training* classes.
    - ``seed``: k-means init and the G2 subsample.
    - ``distance``: ``"euclidean"`` (the authors' and PML's faiss ``IndexFlatL2``) or
      ``"cosine"`` (L2-normalise first); identical rankings for L2-normalised embeddings.
    """
    gallery = as_embeddings(embeddings, "embeddings")
    g_labels = as_labels(labels, gallery.shape[0], "labels")
    self_mode = query_embeddings is None
    if self_mode != (query_labels is None):
        raise ValueError(
            "pass both query_embeddings and query_labels (query/gallery mode) or neither "
            "(self-retrieval)."
        )
    if self_mode:
        queries, q_labels = gallery, g_labels
    else:
        queries = as_embeddings(query_embeddings, "query_embeddings")
        q_labels = as_labels(query_labels, queries.shape[0], "query_labels")
        if queries.shape[1] != gallery.shape[1]:
            raise ValueError(
                f"query_embeddings have dim {queries.shape[1]} but embeddings have dim "
                f"{gallery.shape[1]}; embed both with the same model."
            )
    if metrics is None:
        metrics = DEFAULT_METRICS["cub200"]
        if not self_mode:
            metrics = tuple(m for m in metrics if not m.endswith("_authors"))
    plan = _plan(metrics)
    retrieval_metrics = plan.of_kind("retrieval")
    if not self_mode and any(m.self_only for _, m, _ in retrieval_metrics):
        raise ValueError(
            "map@K_authors divides by the class size including the query, which only "
            "exists in self-retrieval; use map@K for query/gallery evaluation."
        )
    knn_backend = resolve_knn_backend(backend)
    km_backend = resolve_kmeans_backend(backend)
    dev = resolve_device(device)

    results: dict[str, float] = {}
    if retrieval_metrics:
        results.update(
            _retrieval(
                retrieval_metrics,
                queries,
                q_labels,
                None if self_mode else gallery,
                g_labels,
                knn_backend,
                dev,
                memory_budget_mb,
                distance,
            )
        )
    clustering_metrics = plan.of_kind("clustering")
    if clustering_metrics:
        k = int(np.unique(q_labels).size) if num_clusters is None else num_clusters
        assign = kmeans(
            queries,
            k,
            niter=DEFAULT_NITER,
            seed=seed,
            backend=km_backend,
            device=dev,
            memory_budget_mb=memory_budget_mb,
        )
        for name, metric, _ in clustering_metrics:
            results[name] = metric.fn(q_labels, assign)
    for name, metric, _ in plan.of_kind("structure"):
        results[name] = metric.fn(
            queries, q_labels, seed=seed, device=dev, memory_budget_mb=memory_budget_mb
        )
    return {name: results[name] for name in plan.names}


def _retrieval(
    metrics: list[tuple[str, Metric, int | None]],
    queries: torch.Tensor,
    q_labels: np.ndarray,
    gallery: torch.Tensor | None,
    g_labels: np.ndarray,
    backend: str,
    device: torch.device,
    memory_budget_mb: float,
    distance: str,
) -> dict[str, float]:
    self_mode = gallery is None
    classes, inv = np.unique(np.concatenate([g_labels, q_labels]), return_inverse=True)
    g_ids = inv[: len(g_labels)]
    q_ids = inv[len(g_labels) :]
    g_count = np.bincount(g_ids, minlength=len(classes))
    num_relevant_all = g_count[q_ids] - (1 if self_mode else 0)
    available = len(g_labels) - (1 if self_mode else 0)
    if available < 1:
        raise ValueError("retrieval metrics need at least 2 items (1 gallery item per query).")
    depths = [k for _, m, k in metrics if m.depth == "k"]
    if any(m.depth == "relevant" for _, m, _ in metrics):
        depths.append(int(num_relevant_all.max()))
    needed = max([*depths, 1])
    k = min(needed, available)
    lone = int((num_relevant_all == 0).sum())
    if lone and any(not m.self_only for _, m, _ in metrics):
        warnings.warn(
            f"{lone} of {len(q_labels)} queries have no same-class item in the gallery; "
            "they are left out of recall@K, r_precision, map@r and map@K (and count 0 in "
            "map@K_authors).",
            stacklevel=3,
        )

    g_ids_t = torch.as_tensor(g_ids, device=device)
    q_ids_t = torch.as_tensor(q_ids, device=device)
    rel_t = torch.as_tensor(num_relevant_all, device=device)
    n_q = len(q_labels)
    per_query: dict[str, torch.Tensor] = {}

    def slot(name: str) -> torch.Tensor:
        if name not in per_query:
            per_query[name] = torch.empty(n_q, dtype=torch.float64, device=device)
        return per_query[name]

    for s, e, _, idx in iter_knn(
        queries,
        gallery,
        k,
        distance=distance,
        backend=backend,
        device=device,
        memory_budget_mb=memory_budget_mb,
    ):
        idx = idx.to(device)
        hits = g_ids_t[idx] == q_ids_t[s:e].unsqueeze(1)
        rel = rel_t[s:e]
        for name, metric, kk in metrics:
            slot(name)[s:e] = metric.fn(hits, rel, kk)

    out = {}
    for name, values in per_query.items():
        defined = values[~torch.isnan(values)]
        out[name] = float(defined.mean()) if defined.numel() else float("nan")
    return out
