"""Retrieval metrics from ranked neighbour lists, one value per query.

Every function takes ``hits``, a ``(num_queries, K)`` boolean tensor (``hits[i, j]``: the
j-th nearest gallery item of query i has the query's class; neighbours ranked by
(distance, gallery index), the query itself already excluded in self-retrieval) and
``num_relevant``, the number of same-class gallery items of each query (``R``; in
self-retrieval the class size minus one). They return float64 per-query values; queries
with ``R = 0`` get NaN where the metric is undefined, and the caller averages the others.

Definitions (``P@j``: fraction of hits among the first j neighbours):

- ``recall@k``: 1 if a hit is among the first k neighbours, else 0 (the DML "Recall@k",
  a hit rate; equal to pytorch-metric-learning's ``precision_at_1`` for k = 1).
- ``r_precision``: hits among the first R neighbours, divided by R (Musgrave et al. 2020).
- ``map@r``: sum of ``P@j`` over hits j <= R, divided by R (Musgrave et al. 2020,
  pytorch-metric-learning's ``mean_average_precision_at_r``).
- ``map@m``: average precision truncated at m: sum of ``P@j`` over hits j <= m, divided by
  ``min(m, R)`` (reaches 1 for a perfect ranking).
- ``map@m_authors``: the same sum divided by ``R + 1``, the class size *including* the
  query, as in the NIR / "Revisiting DML" authors' ``mAP_1000``; it cannot reach 1, and
  queries with ``R = 0`` count as 0 instead of being left out.
- ``map@m_hits``: the same sum divided by the number of hits among the first m (0 without
  a hit): open-metric-learning's ``map@k``.
- ``precision@k``: hits among the first k divided by ``min(k, R)`` (reaches 1):
  open-metric-learning's ``precision@k``; the textbook hits / k where k <= R.
- ``mrr`` / ``mrr@k``: 1 / rank of the first hit (within the first k; 0 without one):
  pytorch-metric-learning's ``mean_reciprocal_rank`` (its ``k=None`` / ``k=k``).
- ``r_precision@k`` / ``map@r@k``: r_precision and MAP@R computed over the first k
  neighbours only, as pytorch-metric-learning's AccuracyCalculator with ``k=k``: hits among
  the first ``min(R, k)`` over ``min(R, k)``; sum of ``P@j`` over hits ``j <= min(R, k)``
  over R. Equal to r_precision / map@r where k >= R.

A hit list may end in padding (``hits`` False) where a query has fewer gallery items to
rank than others (query/gallery sets that overlap); the caller never asks for more
neighbours than a query has, except through such padding.
"""

from __future__ import annotations

import torch

from nirdml.errors import InputError


def _check(hits: torch.Tensor, num_relevant: torch.Tensor, needed: int, name: str) -> None:
    if hits.ndim != 2 or hits.dtype != torch.bool:
        raise InputError(f"hits must be a 2-D bool tensor, got {hits.dtype} {tuple(hits.shape)}.")
    if num_relevant.shape != (hits.shape[0],):
        raise InputError(
            f"num_relevant must have one entry per query ({hits.shape[0]}), "
            f"got shape {tuple(num_relevant.shape)}."
        )
    if hits.shape[1] < needed:
        raise InputError(
            f"{name} needs at least {needed} ranked neighbours per query but hits has "
            f"{hits.shape[1]}; search more neighbours."
        )


def _undefined_to_nan(values: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    return torch.where(num_relevant > 0, values, torch.full_like(values, float("nan")))


def recall_at_k(hits: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where a same-class item is among the first ``k`` neighbours (NaN if R = 0).

    ``k`` larger than the number of ranked neighbours is allowed only when the list holds
    every gallery item (then the answer is exact anyway)."""
    _check(hits, num_relevant, 0, f"recall@{k}")
    values = hits[:, :k].any(dim=1).to(torch.float64)
    return _undefined_to_nan(values, num_relevant)


def _relevance_window(num_relevant: torch.Tensor, width: int, limit: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(width, device=num_relevant.device)
    return cols.unsqueeze(0) < limit.unsqueeze(1)


def r_precision(hits: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """Hits among the first R neighbours over R (NaN if R = 0)."""
    r_max = int(num_relevant.max()) if num_relevant.numel() else 0
    _check(hits, num_relevant, r_max, "r_precision")
    h = hits[:, :r_max]
    window = _relevance_window(num_relevant, h.shape[1], num_relevant)
    found = (h & window).sum(dim=1).to(torch.float64)
    return _undefined_to_nan(found / num_relevant.clamp(min=1), num_relevant)


def _precision_sum(hits: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Per query, sum of P@j over hits at ranks j <= limit."""
    window = _relevance_window(limit, hits.shape[1], limit)
    h = hits & window
    cum = torch.cumsum(h, dim=1, dtype=torch.int64).to(torch.float64)
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    return (cum * h / ranks).sum(dim=1)


def map_at_r(hits: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """MAP@R: sum of P@j over hits j <= R, divided by R (NaN if R = 0)."""
    r_max = int(num_relevant.max()) if num_relevant.numel() else 0
    _check(hits, num_relevant, r_max, "map@r")
    s = _precision_sum(hits[:, :r_max], num_relevant)
    return _undefined_to_nan(s / num_relevant.clamp(min=1), num_relevant)


def map_at(hits: torch.Tensor, num_relevant: torch.Tensor, m: int) -> torch.Tensor:
    """AP truncated at m, divided by min(m, R) (NaN if R = 0).

    ``hits`` must hold at least ``min(m, gallery size)`` neighbours."""
    _check(hits, num_relevant, 0, f"map@{m}")
    h = hits[:, :m]
    s = _precision_sum(h, torch.full_like(num_relevant, h.shape[1]))
    return _undefined_to_nan(s / num_relevant.clamp(min=1, max=m), num_relevant)


def map_at_authors(hits: torch.Tensor, num_relevant: torch.Tensor, m: int) -> torch.Tensor:
    """The NIR authors' mAP@m: AP truncated at m divided by R + 1 (the class size including
    the query); queries with R = 0 score 0. Self-retrieval only."""
    _check(hits, num_relevant, 0, f"map@{m}_authors")
    h = hits[:, :m]
    s = _precision_sum(h, torch.full_like(num_relevant, h.shape[1]))
    return s / (num_relevant + 1).to(torch.float64)


def precision_at(hits: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """Hits among the first ``k`` neighbours over ``min(k, R)`` (NaN if R = 0).

    OML's precision@k: it does not penalise a perfect ranking when the query has fewer than
    k same-class items; equal to hits / k where k <= R."""
    _check(hits, num_relevant, 0, f"precision@{k}")
    found = hits[:, :k].sum(dim=1).to(torch.float64)
    return _undefined_to_nan(found / num_relevant.clamp(min=1, max=k), num_relevant)


def reciprocal_rank(
    hits: torch.Tensor, num_relevant: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """1 / rank of the first hit among the first ``k`` neighbours (all of ``hits`` for
    None), 0 without one (NaN if R = 0)."""
    _check(hits, num_relevant, 0, "mrr" if k is None else f"mrr@{k}")
    h = hits if k is None else hits[:, :k]
    found = h.any(dim=1)
    first = h.to(torch.int8).argmax(dim=1).to(torch.float64) + 1.0
    values = torch.where(found, 1.0 / first, torch.zeros_like(first))
    return _undefined_to_nan(values, num_relevant)


def r_precision_depth(hits: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """r_precision over the first ``k`` neighbours: hits among the first ``min(R, k)`` over
    ``min(R, k)`` (NaN if R = 0); pytorch-metric-learning's r_precision with ``k=k``."""
    limit = num_relevant.clamp(max=k)
    r_max = int(limit.max()) if limit.numel() else 0
    _check(hits, num_relevant, r_max, f"r_precision@{k}")
    h = hits[:, :r_max]
    found = (h & _relevance_window(limit, h.shape[1], limit)).sum(dim=1).to(torch.float64)
    return _undefined_to_nan(found / limit.clamp(min=1), num_relevant)


def map_at_r_depth(hits: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """MAP@R over the first ``k`` neighbours: sum of P@j over hits ``j <= min(R, k)``,
    divided by R (NaN if R = 0); pytorch-metric-learning's mean_average_precision_at_r with
    ``k=k`` (below 1 when k < R even for a perfect ranking, as there)."""
    limit = num_relevant.clamp(max=k)
    r_max = int(limit.max()) if limit.numel() else 0
    _check(hits, num_relevant, r_max, f"map@r@{k}")
    s = _precision_sum(hits[:, :r_max], limit)
    return _undefined_to_nan(s / num_relevant.clamp(min=1), num_relevant)


def map_at_hits(hits: torch.Tensor, num_relevant: torch.Tensor, m: int) -> torch.Tensor:
    """AP truncated at m divided by the number of hits among the first m, 0 without a hit
    (NaN if R = 0); open-metric-learning's map@k."""
    _check(hits, num_relevant, 0, f"map@{m}_hits")
    h = hits[:, :m]
    s = _precision_sum(h, torch.full_like(num_relevant, h.shape[1]))
    found = h.sum(dim=1).to(torch.float64)
    values = torch.where(found > 0, s / found.clamp(min=1), torch.zeros_like(s))
    return _undefined_to_nan(values, num_relevant)
