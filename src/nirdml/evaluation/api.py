"""``evaluate``: every metric of the paper (and of PML / OML) from embeddings and labels, in
one call; ``evaluate_per_class``: the same retrieval metrics as a per-class table.

Retrieval metrics stream over query blocks of the exact kNN search (``knn.iter_knn``), so
only per-query numbers are kept (never an N x N matrix); clustering metrics run k-means
once; structure metrics work on the embeddings directly.

Which items are queries and which are the gallery: every item queries all others
(self-retrieval, the DML protocol), or a query set (``query_embeddings`` + ``query_labels``)
against a gallery set (``embeddings`` / ``labels``). The two sets may overlap (In-Shop's
protocol, PML's "queries are part of the reference set", OML's ``is_query`` / ``is_gallery``
columns): a query never retrieves *itself*, identified by id (``query_ids`` /
``gallery_ids``: one id per item, unique in the gallery; a query leaves out the gallery item
with its id, however the sets overlap; PML's "queries are the first items of the reference
set" is ``query_ids=range(len(q))``, ``gallery_ids=range(len(g))``) or by position
(``is_query`` / ``is_gallery`` boolean masks over one set of items, OML's columns; an item may
be both, then it is left out of its own results), while duplicates of it still count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
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


_Entries = list[tuple[str, Metric, int | None]]
"""Requested metrics: each name with its table entry and ``k``."""


@dataclass
class _Plan:
    """The requested metrics: each name with its table entry and ``k``, in the order asked."""

    names: list[str]
    metrics: dict[str, tuple[Metric, int | None]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> _Entries:
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


_Pair = tuple[ArrayLike | None, ArrayLike | None]
"""Two optional arguments that go together (e.g. ``query_ids`` and ``gallery_ids``)."""


def _given(pair: _Pair) -> bool:
    """Whether either argument of the pair was passed."""
    return any(a is not None for a in pair)


def _check_modes(query_set: _Pair, ids: _Pair, masks: _Pair) -> None:
    """Reject combinations of the query/gallery arguments that name no single protocol."""
    separate, with_ids = _given(query_set), _given(ids)
    if separate and any(a is None for a in query_set):
        raise InputError(
            "pass both query_embeddings and query_labels (query/gallery mode) or neither "
            "(self-retrieval)."
        )
    if _given(masks) and (separate or with_ids):
        raise InputError(
            "is_query/is_gallery select queries and gallery among ONE set of embeddings; "
            "do not combine them with query_embeddings or query_ids/gallery_ids (pass "
            "either masks over one set, or two sets with ids)."
        )
    if with_ids and (any(a is None for a in ids) or not separate):
        raise InputError(
            "query_ids and gallery_ids go together, with query_embeddings and "
            "query_labels: the ids say which query is which gallery item (the query then "
            "never retrieves it)."
        )


def _masked_sets(
    items: torch.Tensor,
    item_labels: np.ndarray,
    is_query: ArrayLike | None,
    is_gallery: ArrayLike | None,
) -> _Sets:
    """Queries and gallery picked from one set of items by masks (None: every item)."""
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


def _id_exclusions(
    query_ids: ArrayLike, gallery_ids: ArrayLike, q_labels: np.ndarray, g_labels: np.ndarray
) -> np.ndarray | None:
    """Per query the gallery position of the item with its id, or -1 (None: no query is a
    gallery item); the same id must carry the same label in both sets."""
    q_ids = _ids(query_ids, len(q_labels), "query_ids")
    g_ids = _ids(gallery_ids, len(g_labels), "gallery_ids")
    exclude = _exclusions(q_ids, g_ids)
    shared = exclude >= 0
    clash = shared & (q_labels != g_labels[np.maximum(exclude, 0)])
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        raise InputError(
            f"query id {q_ids[i]!r} has label {q_labels[i]} but the gallery item with that "
            f"id has label {g_labels[exclude[i]]}; the same id must name the same item."
        )
    return exclude if shared.any() else None


def _query_gallery_sets(
    items: torch.Tensor, item_labels: np.ndarray, query_set: _Pair, ids: _Pair
) -> _Sets:
    """A separate query set against ``items`` as the gallery, matched by ids if given."""
    queries = as_embeddings(query_set[0], "query_embeddings")
    q_labels = as_labels(query_set[1], queries.shape[0], "query_labels")
    if queries.shape[1] != items.shape[1]:
        raise InputError(
            f"query_embeddings have dim {queries.shape[1]} but embeddings have dim "
            f"{items.shape[1]}; embed both with the same model."
        )
    exclude = _id_exclusions(*ids, q_labels, item_labels) if _given(ids) else None
    return _Sets(queries, q_labels, items, item_labels, exclude)


def _sets(
    embeddings: ArrayLike, labels: ArrayLike, query_set: _Pair, ids: _Pair, masks: _Pair
) -> _Sets:
    """Check the inputs and work out queries, gallery and who excludes what.

    ``query_set``: (query_embeddings, query_labels); ``ids``: (query_ids, gallery_ids);
    ``masks``: (is_query, is_gallery)."""
    items = as_embeddings(embeddings, "embeddings")
    item_labels = as_labels(labels, items.shape[0], "labels")
    _check_modes(query_set, ids, masks)
    if _given(masks):
        return _masked_sets(items, item_labels, *masks)
    if not _given(query_set):
        return _Sets(items, item_labels, None, item_labels, None)
    return _query_gallery_sets(items, item_labels, query_set, ids)


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

    Queries and gallery (see the module docstring): self-retrieval by default, else the query
    set ``query_embeddings`` + ``query_labels`` (with ``query_ids`` / ``gallery_ids``) or masks
    ``is_query`` / ``is_gallery``. Clustering and structure metrics use the query set, as PML does.

    - ``metrics``: names (see ``METRIC_NAMES_HELP``); None = ``DEFAULT_METRICS["cub200"]``
      (without the ``_authors`` variants unless every query is in the gallery).
    - ``no_relevant``: queries with no same-class gallery item are left out of the retrieval
      metrics (``"skip"``, PML; a warning says how many) or count 0 (``"zero"``, OML);
      map@K_authors counts them 0 either way (its definition).
    - ``average``: retrieval metrics over queries (``"queries"``) or per query class first,
      then over classes (``"classes"``, PML's ``avg_of_avgs``; :func:`evaluate_per_class`).
    - ``backend``: ``"auto"`` = exact torch kNN and faiss k-means when installed (else
      torch); ``"torch"`` or ``"faiss"`` force both. ``device``: torch compute device (None:
      CUDA if available; faiss runs on CPU). ``memory_budget_mb``: bound on the temporaries
      of the kNN / k-means / G2 blocks. ``seed``: k-means init and the G2 subsample.
    - ``num_clusters``: k of k-means; None = number of classes in the clustered set (the
      standard; the authors' code used the number of *training* classes). ``distance``:
      ``"euclidean"`` (the authors' and PML's faiss ``IndexFlatL2``) or ``"cosine"``
      (L2-normalise first); identical rankings for L2-normalised embeddings.
    """
    _check_choice(average, AVERAGES, "average")
    _check_choice(no_relevant, NO_RELEVANT_POLICIES, "no_relevant")
    sets = _sets(
        embeddings,
        labels,
        (query_embeddings, query_labels),
        (query_ids, gallery_ids),
        (is_query, is_gallery),
    )
    plan = _plan(_default_metrics(sets) if metrics is None else metrics)
    knn_backend, km_backend = resolve_knn_backend(backend), resolve_kmeans_backend(backend)
    dev = resolve_device(device)
    per_query = _retrieval(plan, sets, no_relevant, knn_backend, dev, memory_budget_mb, distance)
    groups = sets.q_labels if average == "classes" else None
    results = {name: _average(values, groups) for name, values in per_query.items()}
    results.update(_clustering(plan, sets, num_clusters, seed, km_backend, dev, memory_budget_mb))
    results.update(_structure(plan, sets, seed, dev, memory_budget_mb))
    return {name: results[name] for name in plan.names}


def _default_metrics(sets: _Sets) -> tuple[str, ...]:
    """CUB's metrics; without the ``_authors`` variants (self-retrieval only) unless every
    query is also a gallery item."""
    metrics = DEFAULT_METRICS["cub200"]
    if sets.every_query_in_gallery:
        return metrics
    return tuple(m for m in metrics if not m.endswith("_authors"))


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


def _structure(
    plan: _Plan, sets: _Sets, seed: int, device: torch.device, memory_budget_mb: float
) -> dict[str, float]:
    """The structure metrics of the plan, each on the query embeddings themselves."""
    return {
        name: metric.load()(
            sets.queries, sets.q_labels, seed=seed, device=device, memory_budget_mb=memory_budget_mb
        )
        for name, metric, _ in plan.of_kind("structure")
    }


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
        (query_embeddings, query_labels),
        (query_ids, gallery_ids),
        (is_query, is_gallery),
    )
    plan = _plan(("recall@1", "r_precision", "map@r") if metrics is None else metrics)
    _check_retrieval_only(plan)
    groups = sets.q_labels if categories is None else _categories(categories, len(sets.q_labels))
    knn_backend, dev = resolve_knn_backend(backend), resolve_device(device)
    per_query = _retrieval(plan, sets, no_relevant, knn_backend, dev, memory_budget_mb, distance)
    return _group_table(per_query, groups, plan.names)


def _check_retrieval_only(plan: _Plan) -> None:
    """Reject metrics without per-query values: they have no per-class value."""
    other = [n for n, (m, _) in plan.metrics.items() if m.kind != "retrieval"]
    if other:
        raise InputError(
            f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} not per-query retrieval "
            "metrics and have no per-class value; ask evaluate() for them, and "
            "evaluate_per_class() for retrieval metrics (recall@K, map@r, ...)."
        )


def _categories(categories: ArrayLike, n_queries: int) -> np.ndarray:
    """The per-query categories as a numpy array, checked to hold one per query."""
    given = categories.cpu() if isinstance(categories, torch.Tensor) else categories
    groups = np.asarray(given)
    if groups.shape != (n_queries,):
        raise InputError(
            f"categories must hold one category per query ({n_queries}), got shape {groups.shape}."
        )
    return groups


def _group_table(
    per_query: dict[str, torch.Tensor], groups: np.ndarray, names: list[str]
) -> dict[Hashable, dict[str, float]]:
    """``{group: {name: mean over the group's queries}}``, groups in sorted order."""
    keys, inverse = np.unique(groups, return_inverse=True)
    table: dict[Hashable, dict[str, float]] = {
        (key.item() if hasattr(key, "item") else key): {} for key in keys
    }
    for name in names:
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


@dataclass
class _Classes:
    """Class ids and per-query counts of the retrieval, as tensors on the compute device."""

    gallery: torch.Tensor
    """Class id of each gallery item."""
    queries: torch.Tensor
    """Class id of each query."""
    relevant: torch.Tensor
    """Per query: its same-class gallery items (itself left out)."""
    available: torch.Tensor
    """Per query: the gallery items it may retrieve (itself left out)."""


def _check_self_only(metrics: _Entries, sets: _Sets) -> None:
    """Reject the metrics defined for self-retrieval only, unless every query is also a
    gallery item."""
    if not sets.every_query_in_gallery and any(m.self_only for _, m, _ in metrics):
        raise InputError(
            "map@K_authors divides by the class size including the query, which only "
            "exists when every query is also a gallery item (self-retrieval); use map@K "
            "(or map@K_hits) for query/gallery evaluation."
        )


def _relevance(sets: _Sets) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class ids of the gallery items and of the queries; per query its same-class gallery
    items and all gallery items it may retrieve (a query in the gallery leaves itself out)."""
    q_labels, g_labels = sets.q_labels, sets.g_labels
    classes, inv = np.unique(np.concatenate([g_labels, q_labels]), return_inverse=True)
    g_class = inv[: len(g_labels)]
    q_class = inv[len(g_labels) :]
    g_count = np.bincount(g_class, minlength=len(classes))
    if sets.gallery is None:
        left_out = np.ones(len(q_labels), dtype=np.int64)
    elif sets.exclude is None:
        left_out = np.zeros(len(q_labels), dtype=np.int64)
    else:
        left_out = (sets.exclude >= 0).astype(np.int64)
    return g_class, q_class, g_count[q_class] - left_out, len(g_labels) - left_out


def _first_depth(metrics: _Entries, relevant: np.ndarray, available: np.ndarray) -> int:
    """Neighbours of the first search: the most any metric needs, at most what the gallery
    holds for a query."""
    max_available = int(available.max())
    if max_available < 1:
        raise InputError("retrieval metrics need at least 2 items (1 gallery item per query).")
    r_max = int(relevant.max())
    needed = max([_depth(m, k, r_max) for _, m, k in metrics] + [1])
    return min(needed, max_available)


def _warn_no_relevant(metrics: _Entries, relevant: np.ndarray, no_relevant: str) -> None:
    """Warn (at the caller of evaluate / evaluate_per_class) how many queries the retrieval
    metrics leave out for lack of a same-class gallery item."""
    lone = int((relevant == 0).sum())
    if lone and no_relevant == "skip" and any(not m.self_only for _, m, _ in metrics):
        warnings.warn(
            f"{lone} of {len(relevant)} queries have no same-class item in the gallery; "
            "they are left out of the retrieval metrics (no_relevant='skip'; "
            "no_relevant='zero' counts them 0) and count 0 in map@K_authors.",
            stacklevel=4,
        )


def _retrieval(
    plan: _Plan,
    sets: _Sets,
    no_relevant: str,
    backend: str,
    device: torch.device,
    memory_budget_mb: float,
    distance: str,
) -> dict[str, torch.Tensor]:
    """Per-query values (float64, on ``device``) of each retrieval metric of the plan, the
    queries without a same-class gallery item NaN (``skip``) or 0 (``zero``)."""
    metrics = plan.of_kind("retrieval")
    if not metrics:
        return {}
    _check_self_only(metrics, sets)
    g_class, q_class, relevant, available = _relevance(sets)
    k = _first_depth(metrics, relevant, available)
    _warn_no_relevant(metrics, relevant, no_relevant)
    arrays = (g_class, q_class, relevant, available)
    classes = _Classes(*(torch.as_tensor(a, device=device) for a in arrays))
    knn_options: dict[str, Any] = {
        "backend": backend,
        "device": device,
        "memory_budget_mb": memory_budget_mb,
        "distance": distance,
    }
    calls = [(name, kk, metric.load()) for name, metric, kk in metrics]
    # Padding (index -1) only where a query that left itself out has fewer than k items.
    may_pad = k > int(available.min())
    per_query = _first_pass(calls, sets, classes, k, may_pad, **knn_options)
    for name, metric, _ in metrics:
        if metric.depth == "first_hit" and k < int(available.max()):
            _deepen_first_hits(per_query[name], sets, classes, k, **knn_options)
    if no_relevant == "zero":
        lone_t = classes.relevant == 0
        for values in per_query.values():
            values[lone_t] = 0.0
    return per_query


def _hits(
    idx: torch.Tensor, g_class: torch.Tensor, q_class: torch.Tensor, may_pad: bool
) -> torch.Tensor:
    """Whether each retrieved gallery item is of its query's class (``may_pad``: index -1
    pads a short row and is no hit)."""
    if may_pad:
        return (g_class[idx.clamp(min=0)] == q_class.unsqueeze(1)) & (idx >= 0)
    return g_class[idx] == q_class.unsqueeze(1)


def _first_pass(
    calls: list[tuple[str, int | None, Callable[..., torch.Tensor]]],
    sets: _Sets,
    classes: _Classes,
    k: int,
    may_pad: bool,
    **knn_options: Any,
) -> dict[str, torch.Tensor]:
    """Each metric's per-query values from the ``k`` nearest neighbours, one query block
    of the kNN search at a time (no N x N matrix)."""
    device = knn_options["device"]
    n_q = len(sets.q_labels)
    per_query = {name: torch.empty(n_q, dtype=torch.float64, device=device) for name, *_ in calls}
    for s, e, _, idx in iter_knn(
        sets.queries, sets.gallery, k, exclude=sets.exclude, **knn_options
    ):
        idx = idx.to(device)
        hits = _hits(idx, classes.gallery, classes.queries[s:e], may_pad)
        rel = classes.relevant[s:e]
        for name, kk, fn in calls:
            per_query[name][s:e] = fn(hits, rel) if kk is None else fn(hits, rel, kk)
    return per_query


def _deepen_first_hits(
    values: torch.Tensor, sets: _Sets, classes: _Classes, depth: int, **knn_options: Any
) -> None:
    """Reciprocal ranks of the queries whose first hit lies beyond the first ``depth``
    neighbours: searched again, deeper (x4 each round), for those queries only."""
    gallery = sets.queries if sets.gallery is None else sets.gallery
    available_t = classes.available
    missed = (values == 0) & (classes.relevant > 0) & (available_t > depth)
    pending = torch.nonzero(missed).squeeze(1)
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
            hits = _hits(idx, classes.gallery, classes.queries[rows], may_pad=True)
            found = hits.any(dim=1)
            first = hits.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
            values[rows[found]] = 1.0 / first[found]
            found_all[s:e] = found
        pending = pending[~found_all & (available_t[pending] > depth)]
