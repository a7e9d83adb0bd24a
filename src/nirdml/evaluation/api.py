"""``evaluate``: every metric of the paper (and of PML / OML) from embeddings and labels, in
one call; ``evaluate_per_class``: the same retrieval metrics as a per-class table.

Retrieval metrics stream over query blocks of the exact kNN search (``knn.iter_knn``), so
only per-query numbers are kept (never an N x N matrix); clustering metrics run k-means
once; structure metrics work on the embeddings directly.

Which items are queries and which are the gallery: every item queries all others
(self-retrieval, the DML protocol), or a query set against a gallery set. The two sets may
overlap (In-Shop's protocol, PML's "queries are part of the reference set", OML's
``is_query`` / ``is_gallery`` columns): a query never retrieves *itself*, identified by id
(``query_ids`` / ``gallery_ids``) or by position (``is_query`` / ``is_gallery`` masks over
one set of items), while duplicates of it still count.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nirdml.data.registry import DATASETS
from nirdml.errors import InputError
from nirdml.evaluation._inputs import ArrayLike, as_embeddings, as_labels
from nirdml.evaluation.kmeans_backends import DEFAULT_NITER, kmeans, resolve_kmeans_backend
from nirdml.evaluation.knn import DEFAULT_MEMORY_BUDGET_MB, iter_knn, resolve_knn_backend
from nirdml.evaluation.registry import (
    AVERAGES,
    METRIC_NAMES_HELP,
    NO_RELEVANT_POLICIES,
    Metric,
    normalise_metric_name,
    parse_metric,
)
from nirdml.runtime import resolve_device

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    name: entry.metrics for name, entry in DATASETS.items()
}
"""Metrics reported per dataset (the paper's Recall@k ks; CUB/Cars-style for the rest),
from the dataset table (nirdml.data.registry)."""

Metrics = Sequence[str] | str


@dataclass
class _Plan:
    """The requested metrics: each name with its table entry and ``k``, in the order asked."""

    names: list[str]
    metrics: dict[str, tuple[Metric, int | None]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[tuple[str, Metric, int | None]]:
        return [(n, m, k) for n, (m, k) in self.metrics.items() if m.kind == kind]


def _plan(metrics: Metrics) -> _Plan:
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(dict.fromkeys(normalise_metric_name(m) for m in metrics))
    if not names:
        raise InputError(f"metrics is empty; choose from: {METRIC_NAMES_HELP}.")
    return _Plan(names, {name: parse_metric(name) for name in names})


@dataclass
class _Sets:
    """Queries and gallery as the kNN search sees them."""

    queries: torch.Tensor
    q_labels: np.ndarray
    gallery: torch.Tensor | None
    """None: self-retrieval (the queries are the gallery, each excludes its own index)."""
    g_labels: np.ndarray
    exclude: np.ndarray | None
    """With a gallery: per query the gallery index of the query itself, or -1."""

    @property
    def every_query_in_gallery(self) -> bool:
        if self.gallery is None:
            return True
        return self.exclude is not None and bool((self.exclude >= 0).all())


def _mask(mask: ArrayLike, n: int, name: str) -> np.ndarray:
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if m.shape != (n,) or m.dtype != bool:
        raise InputError(
            f"{name} must be a boolean array with one entry per item ({n}), got "
            f"{m.dtype} {m.shape}; e.g. {name}=(split == '{name[3:]}')."
        )
    return m


def _ids(ids: ArrayLike, n: int, name: str) -> np.ndarray:
    a = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    if a.ndim != 1 or len(a) != n:
        raise InputError(
            f"{name} must hold one id per item ({n}), got shape {a.shape}; an id names an "
            "item (e.g. its image path or row number), the same item has the same id in "
            "both sets."
        )
    return a


def _exclusions(q_ids: np.ndarray, g_ids: np.ndarray) -> np.ndarray:
    """Per query the gallery position of the item with the same id, or -1."""
    uniq, counts = np.unique(g_ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(
            f"gallery_ids must be unique (one id per gallery item), but {int((counts > 1).sum())}"
            f" id(s) repeat, e.g. {uniq[counts > 1][0]!r}; give every item its own id."
        )
    try:
        order = np.argsort(g_ids, kind="stable")
        sorted_ids = g_ids[order]
        pos = np.searchsorted(sorted_ids, q_ids)
    except TypeError as e:
        raise InputError(
            f"query_ids and gallery_ids must be ids of one kind (both integers or both "
            f"strings), got {q_ids.dtype} and {g_ids.dtype}."
        ) from e
    pos_c = np.minimum(pos, len(g_ids) - 1)
    found = (pos < len(g_ids)) & (sorted_ids[pos_c] == q_ids)
    return np.where(found, order[pos_c], -1).astype(np.int64)


def _sets(
    embeddings: ArrayLike,
    labels: ArrayLike,
    query_embeddings: ArrayLike | None,
    query_labels: ArrayLike | None,
    query_ids: ArrayLike | None,
    gallery_ids: ArrayLike | None,
    is_query: ArrayLike | None,
    is_gallery: ArrayLike | None,
) -> _Sets:
    """Check the inputs and work out queries, gallery and who excludes what."""
    items = as_embeddings(embeddings, "embeddings")
    item_labels = as_labels(labels, items.shape[0], "labels")
    separate = query_embeddings is not None or query_labels is not None
    masked = is_query is not None or is_gallery is not None
    with_ids = query_ids is not None or gallery_ids is not None
    if separate and (query_embeddings is None or query_labels is None):
        raise InputError(
            "pass both query_embeddings and query_labels (query/gallery mode) or neither "
            "(self-retrieval)."
        )
    if masked and (separate or with_ids):
        raise InputError(
            "is_query/is_gallery select queries and gallery among ONE set of embeddings; "
            "do not combine them with query_embeddings or query_ids/gallery_ids (pass "
            "either masks over one set, or two sets with ids)."
        )
    if with_ids and (query_ids is None or gallery_ids is None or not separate):
        raise InputError(
            "query_ids and gallery_ids go together, with query_embeddings and "
            "query_labels: the ids say which query is which gallery item (the query then "
            "never retrieves it)."
        )
    if masked:
        n = items.shape[0]
        q_mask = np.ones(n, bool) if is_query is None else _mask(is_query, n, "is_query")
        g_mask = np.ones(n, bool) if is_gallery is None else _mask(is_gallery, n, "is_gallery")
        if not q_mask.any() or not g_mask.any():
            raise InputError(
                f"is_query selects {int(q_mask.sum())} and is_gallery {int(g_mask.sum())} "
                "items; both sets need at least one item."
            )
        if q_mask.all() and g_mask.all():
            return _Sets(items, item_labels, None, item_labels, None)
        g_pos = np.cumsum(g_mask) - 1
        exclude = np.where(g_mask, g_pos, -1)[q_mask].astype(np.int64)
        q_idx, g_idx = np.flatnonzero(q_mask), np.flatnonzero(g_mask)
        return _Sets(
            items[torch.as_tensor(q_idx)],
            item_labels[q_idx],
            items[torch.as_tensor(g_idx)],
            item_labels[g_idx],
            exclude if (exclude >= 0).any() else None,
        )
    if not separate:
        return _Sets(items, item_labels, None, item_labels, None)
    queries = as_embeddings(query_embeddings, "query_embeddings")
    q_labels = as_labels(query_labels, queries.shape[0], "query_labels")
    if queries.shape[1] != items.shape[1]:
        raise InputError(
            f"query_embeddings have dim {queries.shape[1]} but embeddings have dim "
            f"{items.shape[1]}; embed both with the same model."
        )
    exclude = None
    if with_ids:
        q_ids = _ids(query_ids, queries.shape[0], "query_ids")
        g_ids = _ids(gallery_ids, items.shape[0], "gallery_ids")
        exclude = _exclusions(q_ids, g_ids)
        shared = exclude >= 0
        clash = shared & (q_labels != item_labels[np.maximum(exclude, 0)])
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            raise InputError(
                f"query id {q_ids[i]!r} has label {q_labels[i]} but the gallery item with that "
                f"id has label {item_labels[exclude[i]]}; the same id must name the same item."
            )
        if not shared.any():
            exclude = None
    return _Sets(queries, q_labels, items, item_labels, exclude)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def evaluate(
    embeddings: ArrayLike,
    labels: ArrayLike,
    metrics: Metrics | None = None,
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    is_query: ArrayLike | None = None,
    is_gallery: ArrayLike | None = None,
    no_relevant: str = "skip",
    average: str = "queries",
    device: str | torch.device | None = None,
    backend: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    num_clusters: int | None = None,
    seed: int = 0,
    distance: str = "euclidean",
) -> dict[str, float]:
    """Compute the named metrics; returns ``{name: value}`` in the order asked.

    Which items query which (a query never retrieves itself; its duplicates still count):

    - default, self-retrieval: every item queries all *other* items.
    - ``query_embeddings`` + ``query_labels``: ``embeddings``/``labels`` are the gallery;
      with ``query_ids`` and ``gallery_ids`` (one id per item, unique in the gallery) a
      query leaves out the gallery item with its id, however the sets overlap. PML's
      "queries are the first items of the reference set": ``query_ids=range(len(q))``,
      ``gallery_ids=range(len(g))``.
    - ``is_query`` / ``is_gallery``: boolean masks over ``embeddings`` (OML's columns;
      an item may be both, then it is left out of its own results).

    Clustering and structure metrics use the query set, as pytorch-metric-learning does.

    - ``metrics``: names (see ``METRIC_NAMES_HELP``); None = ``DEFAULT_METRICS["cub200"]``
      (without the ``_authors`` variants unless every query is in the gallery).
    - ``no_relevant``: queries with no same-class gallery item are left out of the
      retrieval metrics (``"skip"``, PML; a warning says how many) or count 0 (``"zero"``,
      OML). map@K_authors counts them 0 either way (its definition).
    - ``average``: retrieval metrics averaged over queries (``"queries"``) or per query
      class first, then over classes (``"classes"``, PML's ``avg_of_avgs``);
      :func:`evaluate_per_class` gives the per-class table.
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
    _check_choice(average, AVERAGES, "average")
    _check_choice(no_relevant, NO_RELEVANT_POLICIES, "no_relevant")
    sets = _sets(
        embeddings,
        labels,
        query_embeddings,
        query_labels,
        query_ids,
        gallery_ids,
        is_query,
        is_gallery,
    )
    if metrics is None:
        metrics = DEFAULT_METRICS["cub200"]
        if not sets.every_query_in_gallery:
            metrics = tuple(m for m in metrics if not m.endswith("_authors"))
    plan = _plan(metrics)
    knn_backend = resolve_knn_backend(backend)
    km_backend = resolve_kmeans_backend(backend)
    dev = resolve_device(device)
    results: dict[str, float] = {}
    retrieval_metrics = plan.of_kind("retrieval")
    if retrieval_metrics:
        per_query = _retrieval(
            retrieval_metrics, sets, no_relevant, knn_backend, dev, memory_budget_mb, distance
        )
        groups = sets.q_labels
        for name, values in per_query.items():
            results[name] = _average(values, groups if average == "classes" else None)
    results.update(_clustering(plan, sets, num_clusters, seed, km_backend, dev, memory_budget_mb))
    for name, metric, _ in plan.of_kind("structure"):
        results[name] = metric.load()(
            sets.queries, sets.q_labels, seed=seed, device=dev, memory_budget_mb=memory_budget_mb
        )
    return {name: results[name] for name in plan.names}


def _clustering(
    plan: _Plan,
    sets: _Sets,
    num_clusters: int | None,
    seed: int,
    backend: str,
    device: torch.device,
    memory_budget_mb: float,
) -> dict[str, float]:
    """The clustering metrics of the plan, from one k-means of the query set."""
    clustering_metrics = plan.of_kind("clustering")
    if not clustering_metrics:
        return {}
    k = int(np.unique(sets.q_labels).size) if num_clusters is None else num_clusters
    assign = kmeans(
        sets.queries,
        k,
        niter=DEFAULT_NITER,
        seed=seed,
        backend=backend,
        device=device,
        memory_budget_mb=memory_budget_mb,
    )
    return {name: metric.load()(sets.q_labels, assign) for name, metric, _ in clustering_metrics}


def evaluate_per_class(
    embeddings: ArrayLike,
    labels: ArrayLike,
    metrics: Metrics | None = None,
    *,
    categories: ArrayLike | None = None,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    is_query: ArrayLike | None = None,
    is_gallery: ArrayLike | None = None,
    no_relevant: str = "skip",
    device: str | torch.device | None = None,
    backend: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    distance: str = "euclidean",
) -> dict[Hashable, dict[str, float]]:
    """Retrieval metrics per query class: ``{class label: {name: value}}``, classes in
    sorted order (PML's ``return_per_class``).

    ``categories`` (one per query, any ids such as In-Shop's ``"MEN/Denim"``) groups the
    queries by category instead (OML's per-category metrics). A group's value is the mean
    over its queries; a class whose queries all lack a same-class gallery item is NaN with
    ``no_relevant="skip"``. The other arguments are :func:`evaluate`'s; only retrieval
    metrics have per-class values (None = recall@1, r_precision and map@r).
    """
    _check_choice(no_relevant, NO_RELEVANT_POLICIES, "no_relevant")
    sets = _sets(
        embeddings,
        labels,
        query_embeddings,
        query_labels,
        query_ids,
        gallery_ids,
        is_query,
        is_gallery,
    )
    plan = _plan(("recall@1", "r_precision", "map@r") if metrics is None else metrics)
    other = [n for n, (m, _) in plan.metrics.items() if m.kind != "retrieval"]
    if other:
        raise InputError(
            f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} not per-query retrieval "
            "metrics and have no per-class value; ask evaluate() for them, and "
            "evaluate_per_class() for retrieval metrics (recall@K, map@r, ...)."
        )
    groups = sets.q_labels
    if categories is not None:
        given = categories.cpu() if isinstance(categories, torch.Tensor) else categories
        groups = np.asarray(given)
        if groups.shape != (len(sets.q_labels),):
            raise InputError(
                f"categories must hold one category per query ({len(sets.q_labels)}), got "
                f"shape {groups.shape}."
            )
    per_query = _retrieval(
        plan.of_kind("retrieval"),
        sets,
        no_relevant,
        resolve_knn_backend(backend),
        resolve_device(device),
        memory_budget_mb,
        distance,
    )
    keys, inverse = np.unique(groups, return_inverse=True)
    table: dict[Hashable, dict[str, float]] = {
        (key.item() if hasattr(key, "item") else key): {} for key in keys
    }
    for name in plan.names:
        means = _group_means(per_query[name], inverse, len(keys))
        for key, value in zip(table, means, strict=True):
            table[key][name] = float(value)
    return table


def _group_means(values: torch.Tensor, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the defined (non-NaN) values of each group; NaN for a group without one."""
    v = values.cpu().numpy()
    defined = ~np.isnan(v)
    sums = np.bincount(inverse[defined], weights=v[defined], minlength=n_groups)
    counts = np.bincount(inverse[defined], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _average(values: torch.Tensor, groups: np.ndarray | None) -> float:
    """Mean over the defined queries, or over groups of the groups' means."""
    if groups is None:
        defined = values[~torch.isnan(values)]
        return float(defined.mean()) if defined.numel() else float("nan")
    _, inverse = np.unique(groups, return_inverse=True)
    means = _group_means(values, inverse, int(inverse.max()) + 1 if len(inverse) else 0)
    means = means[~np.isnan(means)]
    return float(means.mean()) if len(means) else float("nan")


def _depth(metric: Metric, k: int | None, r_max: int) -> int:
    """Neighbours a metric needs (before capping at what the gallery holds)."""
    if metric.depth == "relevant":
        return r_max
    if metric.depth == "k_relevant":
        return min(int(k), r_max)
    if metric.depth == "first_hit":
        return 1
    return int(k) if k is not None else 1


def _retrieval(
    metrics: list[tuple[str, Metric, int | None]],
    sets: _Sets,
    no_relevant: str,
    backend: str,
    device: torch.device,
    memory_budget_mb: float,
    distance: str,
) -> dict[str, torch.Tensor]:
    """Per-query values (float64, on ``device``) of each retrieval metric, the queries
    without a same-class gallery item NaN (``skip``) or 0 (``zero``)."""
    if not sets.every_query_in_gallery and any(m.self_only for _, m, _ in metrics):
        raise InputError(
            "map@K_authors divides by the class size including the query, which only "
            "exists when every query is also a gallery item (self-retrieval); use map@K "
            "(or map@K_hits) for query/gallery evaluation."
        )
    q_labels, g_labels = sets.q_labels, sets.g_labels
    classes, inv = np.unique(np.concatenate([g_labels, q_labels]), return_inverse=True)
    g_ids = inv[: len(g_labels)]
    q_ids = inv[len(g_labels) :]
    g_count = np.bincount(g_ids, minlength=len(classes))
    if sets.gallery is None:
        left_out = np.ones(len(q_labels), dtype=np.int64)
    elif sets.exclude is None:
        left_out = np.zeros(len(q_labels), dtype=np.int64)
    else:
        left_out = (sets.exclude >= 0).astype(np.int64)
    num_relevant_all = g_count[q_ids] - left_out
    n_gallery = len(g_labels)
    available = n_gallery - left_out  # per query
    max_available = int(available.max())
    if max_available < 1:
        raise InputError("retrieval metrics need at least 2 items (1 gallery item per query).")
    r_max = int(num_relevant_all.max())
    needed = max([_depth(m, k, r_max) for _, m, k in metrics] + [1])
    k = min(needed, max_available)
    lone = int((num_relevant_all == 0).sum())
    if lone and no_relevant == "skip" and any(not m.self_only for _, m, _ in metrics):
        warnings.warn(
            f"{lone} of {len(q_labels)} queries have no same-class item in the gallery; "
            "they are left out of the retrieval metrics (no_relevant='skip'; "
            "no_relevant='zero' counts them 0) and count 0 in map@K_authors.",
            stacklevel=3,
        )

    g_ids_t = torch.as_tensor(g_ids, device=device)
    q_ids_t = torch.as_tensor(q_ids, device=device)
    rel_t = torch.as_tensor(num_relevant_all, device=device)
    n_q = len(q_labels)
    calls = [(name, metric, kk, metric.load()) for name, metric, kk in metrics]
    per_query = {name: torch.empty(n_q, dtype=torch.float64, device=device) for name, *_ in calls}
    # Padding (index -1) only where a query that left itself out has fewer than k items.
    may_pad = k > int(available.min())
    for s, e, _, idx in iter_knn(
        sets.queries,
        sets.gallery,
        k,
        distance=distance,
        backend=backend,
        device=device,
        memory_budget_mb=memory_budget_mb,
        exclude=sets.exclude,
    ):
        idx = idx.to(device)
        if may_pad:
            hits = (g_ids_t[idx.clamp(min=0)] == q_ids_t[s:e].unsqueeze(1)) & (idx >= 0)
        else:
            hits = g_ids_t[idx] == q_ids_t[s:e].unsqueeze(1)
        rel = rel_t[s:e]
        for name, _, kk, fn in calls:
            per_query[name][s:e] = fn(hits, rel) if kk is None else fn(hits, rel, kk)

    for name, metric, _, _ in calls:
        if metric.depth == "first_hit" and k < max_available:
            _deepen_first_hits(
                per_query[name],
                sets,
                g_ids_t,
                q_ids_t,
                rel_t,
                torch.as_tensor(available, device=device),
                k,
                backend=backend,
                device=device,
                memory_budget_mb=memory_budget_mb,
                distance=distance,
            )
    if no_relevant == "zero":
        lone_t = rel_t == 0
        for values in per_query.values():
            values[lone_t] = 0.0
    return per_query


def _deepen_first_hits(
    values: torch.Tensor,
    sets: _Sets,
    g_ids_t: torch.Tensor,
    q_ids_t: torch.Tensor,
    rel_t: torch.Tensor,
    available_t: torch.Tensor,
    depth: int,
    **knn_options: Any,
) -> None:
    """Reciprocal ranks of the queries whose first hit lies beyond the first ``depth``
    neighbours: searched again, deeper (x4 each round), for those queries only."""
    gallery = sets.queries if sets.gallery is None else sets.gallery
    pending = torch.nonzero((values == 0) & (rel_t > 0) & (available_t > depth)).squeeze(1)
    while pending.numel():
        depth = min(max(4 * depth, 64), int(available_t[pending].max()))
        if sets.gallery is None:
            exclude = pending.cpu()
        else:
            exclude = None if sets.exclude is None else torch.as_tensor(sets.exclude)[pending.cpu()]
        found_all = torch.zeros(pending.numel(), dtype=torch.bool, device=values.device)
        for s, e, _, idx in iter_knn(
            sets.queries[pending.cpu()], gallery, depth, exclude=exclude, **knn_options
        ):
            idx = idx.to(values.device)
            rows = pending[s:e]
            hits = (g_ids_t[idx.clamp(min=0)] == q_ids_t[rows].unsqueeze(1)) & (idx >= 0)
            found = hits.any(dim=1)
            first = hits.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
            values[rows[found]] = 1.0 / first[found]
            found_all[s:e] = found
        pending = pending[~found_all & (available_t[pending] > depth)]
