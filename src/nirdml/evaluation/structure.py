"""Embedding-structure metrics of the NIR paper's analysis (method.md section 7).

- ``rho_spectrum``: spectral decay rho (Roth et al., ICML 2020, "Revisiting Training
  Strategies ...", ``metrics/rho_spectrum.py`` with mode 1, the value they report).
  With ``s_1 >= ... >= s_m`` the singular values of the *uncentred* embedding matrix
  (``m = min(n, dim)``) and ``p_i = s_i / sum(s)``: ``rho = KL(U || p) = sum_i (1/m)
  log((1/m) / p_i)``. Lower = flatter spectrum (more directions used). ``exclude_largest=j``
  drops the j largest singular values first (their ``rho_spectrum@(j+1)``). Singular values
  come from the eigenvalues of ``X^T X`` accumulated in float64, so any n works.
- ``pi_ratio``: the authors' ``dists@intra_over_inter`` with cosine distance ``1 - cos``:
  mean over classes (with >= 2 items) of the mean distance between distinct items of the
  class, divided by the mean distance between distinct pairs of class centres (centre =
  L2-normalised mean embedding of the class). Classes of one item have no intra-class
  distance and are left out of the intra term (the authors' code fills them with a
  maximum); all classes enter the inter term. Both means use closed forms
  (``sum_{i != j} cos = ||sum_i u_i||^2 - n`` for unit vectors), so it is O(n dim).
- ``uniformity_g2``: mean of ``exp(-2 ||a - b||^2)`` over all unordered pairs of distinct
  items (Wang & Isola's uniformity potential with t = 2, before the log), on the
  embeddings as given (the paper's are L2-normalised). Exact when ``n <= max_points``;
  otherwise exact over all pairs of a seeded uniform random subset of ``max_points``
  items (an unbiased estimate of the full mean).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from nirdml.errors import InputError
from nirdml.evaluation._inputs import (
    ArrayLike,
    as_embeddings,
    as_labels,
    rows_for_budget,
)
from nirdml.evaluation.knn import DEFAULT_MEMORY_BUDGET_MB
from nirdml.runtime import resolve_device

DEFAULT_G2_MAX_POINTS = 10_000


def singular_values(x: ArrayLike, *, device: str | torch.device | None = None) -> torch.Tensor:
    """The ``min(n, dim)`` singular values of ``x`` (uncentred), descending, float64."""
    t = as_embeddings(x, "embeddings").to(resolve_device(device))
    gram = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64, device=t.device)
    for s in range(0, t.shape[0], 16384):
        block = t[s : s + 16384].to(torch.float64)
        gram += block.T @ block
    eig = torch.linalg.eigvalsh(gram).clamp(min=0).flip(0)
    return eig[: min(t.shape)].sqrt().cpu()


def rho_spectrum(
    x: ArrayLike, *, exclude_largest: int = 0, device: str | torch.device | None = None
) -> float:
    """KL(uniform || normalised singular value spectrum); inf if a singular value is 0."""
    s = singular_values(x, device=device)
    if exclude_largest < 0 or exclude_largest >= len(s):
        raise InputError(
            f"exclude_largest={exclude_largest} must be in [0, {len(s) - 1}] for "
            f"{len(s)} singular values."
        )
    s = s[exclude_largest:]
    p = s / s.sum()
    if bool((p <= 0).any()):
        return math.inf
    m = len(p)
    return float((torch.log(torch.tensor(1.0 / m, dtype=torch.float64)) - torch.log(p)).sum() / m)


def pi_ratio(x: ArrayLike, labels: ArrayLike, *, device: str | torch.device | None = None) -> float:
    """Mean intra-class cosine distance over mean cosine distance between class centres."""
    t = as_embeddings(x, "embeddings").to(resolve_device(device), torch.float64)
    y = as_labels(labels, t.shape[0])
    norms = t.norm(dim=1)
    if bool((norms == 0).any()):
        raise InputError(
            "pi_ratio uses cosine distance, but some embeddings are all-zero vectors; "
            "remove them or check the model output."
        )
    _, inv = np.unique(y, return_inverse=True)
    inv_t = torch.as_tensor(inv, device=t.device)
    n_cls = int(inv.max()) + 1
    if n_cls < 2:
        raise InputError(
            "pi_ratio needs at least 2 classes (it divides by the inter-class distance)."
        )
    counts = torch.bincount(inv_t, minlength=n_cls).to(torch.float64)
    unit_sum = torch.zeros(n_cls, t.shape[1], dtype=torch.float64, device=t.device)
    unit_sum.index_add_(0, inv_t, t / norms.unsqueeze(1))
    multi = counts >= 2
    if not bool(multi.any()):
        raise InputError("pi_ratio needs at least one class with 2 or more items.")
    c = counts[multi]
    intra = 1.0 - ((unit_sum[multi] ** 2).sum(1) - c) / (c * (c - 1))
    raw_sum = torch.zeros_like(unit_sum).index_add_(0, inv_t, t)
    centres = F.normalize(raw_sum / counts.unsqueeze(1), dim=1)
    total = centres.sum(0)
    inter = 1.0 - ((total**2).sum() - n_cls) / (n_cls * (n_cls - 1))
    return float(intra.mean() / inter.clamp(min=1e-8))


def uniformity_g2(
    x: ArrayLike,
    *,
    max_points: int = DEFAULT_G2_MAX_POINTS,
    seed: int = 0,
    device: str | torch.device | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> float:
    """Mean ``exp(-2 ||a - b||^2)`` over pairs of distinct items (see module docstring)."""
    t = as_embeddings(x, "embeddings")
    n = t.shape[0]
    if n < 2:
        raise InputError("uniformity_g2 needs at least 2 embeddings.")
    if max_points < 2:
        raise InputError(f"max_points must be >= 2, got {max_points}.")
    if n > max_points:
        gen = torch.Generator().manual_seed(int(seed))
        subset = torch.randperm(n, generator=gen)[:max_points].sort().values
        t = t[subset]
        n = max_points
    t = t.to(resolve_device(device))
    sqn = (t * t).sum(1)
    rows = rows_for_budget(12 * n, memory_budget_mb)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        d = torch.addmm(sqn.unsqueeze(0), t[s:e], t.T, beta=1.0, alpha=-2.0)
        d.add_(sqn[s:e].unsqueeze(1)).clamp_(min=0)
        g = torch.exp(-2.0 * d)
        r = torch.arange(e - s, device=t.device)
        g[r, r + s] = 0.0
        total += g.sum(dtype=torch.float64)
    return float(total / (n * (n - 1)))


# The metric table's calls (nirdml.evaluation.registry): every structure metric is called as
# ``fn(embeddings, labels, seed=, device=, memory_budget_mb=)`` and takes what it needs.


def rho_spectrum_metric(x: ArrayLike, labels: ArrayLike, **options: object) -> float:
    """:func:`rho_spectrum` as the metric ``rho_spectrum`` (labels unused)."""
    return rho_spectrum(x, device=options.get("device"))  # type: ignore[arg-type]


def pi_ratio_metric(x: ArrayLike, labels: ArrayLike, **options: object) -> float:
    """:func:`pi_ratio` as the metric ``pi_ratio``."""
    return pi_ratio(x, labels, device=options.get("device"))  # type: ignore[arg-type]


def uniformity_g2_metric(x: ArrayLike, labels: ArrayLike, **options: object) -> float:
    """:func:`uniformity_g2` as the metric ``uniformity_g2`` (labels unused)."""
    return uniformity_g2(x, **options)  # type: ignore[arg-type]
