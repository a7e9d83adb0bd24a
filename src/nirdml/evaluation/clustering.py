"""Agreement between class labels and a clustering: NMI, AMI and pairwise F1.

All three are computed from the sparse contingency table, so they cost O(n log n) even
at SOP scale (11,316 classes x 11,316 clusters).

- ``nmi``: mutual information over the arithmetic mean of the two entropies
  (scikit-learn's ``normalized_mutual_info_score`` default, used by the authors and by
  pytorch-metric-learning), with scikit-learn's conventions for degenerate cases.
- ``ami``: ``(MI - E[MI]) / (mean(H) - E[MI])`` under the hypergeometric model
  (scikit-learn's ``adjusted_mutual_info_score``). ``E[MI]`` is summed over pairs of
  *distinct* (class size, cluster size) values weighted by their multiplicities, which is
  exact and much faster than a loop over all class x cluster pairs.
- ``pairwise_f1``: the authors' ``f1`` metric. Over all unordered pairs of items, a pair
  is a true positive if both items share class and cluster; precision = TP / pairs in a
  common cluster, recall = TP / pairs in a common class, F1 their harmonic mean, i.e.
  ``2 TP / (same-cluster pairs + same-class pairs)``. (The authors first relabel each
  cluster by its medoid, which does not change the partition.) 0 when TP = 0; NaN when
  there are no same-class and no same-cluster pairs at all.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

from nirdml.errors import InputError
from nirdml.evaluation._inputs import ArrayLike, as_labels


def _entropy(counts: np.ndarray, n: int) -> float:
    if len(counts) <= 1:
        return 0.0
    p = counts / n
    return float(-(p * (np.log(counts) - np.log(n))).sum())


def _mutual_info(
    cells: np.ndarray, a: np.ndarray, b: np.ndarray, y_cells: tuple[np.ndarray, np.ndarray], n: int
) -> float:
    if len(a) == 1 or len(b) == 1:
        return 0.0
    ai, bj = y_cells
    p = cells / n
    mi = p * (np.log(cells) - np.log(n)) + p * (np.log(n) + np.log(n) - np.log(a[ai] * b[bj]))
    mi = np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def _cells_with_margins(labels: ArrayLike, clusters: ArrayLike):
    y = as_labels(labels, len(np.asarray(labels)), "labels")
    c = as_labels(clusters, len(y), "clusters")
    if len(y) == 0:
        raise InputError("labels is empty; pass at least one item.")
    _, yi = np.unique(y, return_inverse=True)
    _, ci = np.unique(c, return_inverse=True)
    n_c = int(ci.max()) + 1
    key, cells = np.unique(yi.astype(np.int64) * n_c + ci, return_counts=True)
    a = np.bincount(yi).astype(np.int64)
    b = np.bincount(ci).astype(np.int64)
    return cells.astype(np.int64), a, b, (key // n_c, key % n_c), len(y)


def nmi(labels: ArrayLike, clusters: ArrayLike) -> float:
    """Normalised mutual information (arithmetic mean normalisation)."""
    cells, a, b, idx, n = _cells_with_margins(labels, clusters)
    if len(a) == len(b) == 1:
        return 1.0
    mi = _mutual_info(cells, a, b, idx, n)
    if mi == 0:
        return 0.0
    return float(mi / np.mean([_entropy(a, n), _entropy(b, n)]))


def _expected_mutual_info(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """E[MI] of two random labelings with margins ``a`` and ``b`` (hypergeometric)."""
    if len(a) == 1 or len(b) == 1:
        return 0.0
    ua, ma = np.unique(a, return_counts=True)
    ub, mb = np.unique(b, return_counts=True)
    A = ua[:, None].astype(np.float64)
    B = ub[None, :].astype(np.float64)
    weight = ma[:, None].astype(np.float64) * mb[None, :]
    lo = np.maximum(1, ua[:, None] + ub[None, :] - n)
    hi = np.minimum(ua[:, None], ub[None, :])
    emi = 0.0
    base = (
        gammaln(A + 1) + gammaln(B + 1) + gammaln(n - A + 1) + gammaln(n - B + 1) - gammaln(n + 1)
    )
    log_ab = np.log(A) + np.log(B)
    for nij in range(int(lo.min()), int(hi.max()) + 1):
        ok = (lo <= nij) & (nij <= hi)
        if not ok.any():
            continue
        with np.errstate(invalid="ignore"):
            log_p = (
                base
                - gammaln(nij + 1)
                - gammaln(np.where(ok, A - nij, 0) + 1)
                - gammaln(np.where(ok, B - nij, 0) + 1)
                - gammaln(np.where(ok, n - A - B + nij, 0) + 1)
            )
        log_p = np.where(ok, log_p, -np.inf)
        term = (nij / n) * (np.log(n) + np.log(nij) - log_ab) * np.exp(log_p)
        emi += float((weight * np.where(ok, term, 0.0)).sum())
    return emi


def ami(labels: ArrayLike, clusters: ArrayLike) -> float:
    """Adjusted mutual information (arithmetic mean normalisation)."""
    cells, a, b, idx, n = _cells_with_margins(labels, clusters)
    if len(a) == len(b) == 1:
        return 1.0
    if len(a) == 1 or len(b) == 1:
        return 0.0
    mi = _mutual_info(cells, a, b, idx, n)
    emi = _expected_mutual_info(a, b, n)
    normalizer = float(np.mean([_entropy(a, n), _entropy(b, n)]))
    eps = np.finfo(np.float64).eps
    den = normalizer - emi
    den = min(den, -eps) if den < 0 else max(den, eps)
    num = mi - emi
    num = min(num, -eps) if num < 0 else max(num, eps)
    return float(num / den)


def pairwise_f1(labels: ArrayLike, clusters: ArrayLike) -> float:
    """The authors' clustering F1 over item pairs (see module docstring)."""
    cells, a, b, _, _ = _cells_with_margins(labels, clusters)

    def pairs(v: np.ndarray) -> float:
        v = v.astype(np.float64)
        return float((v * (v - 1) / 2).sum())

    tp, same_class, same_cluster = pairs(cells), pairs(a), pairs(b)
    if same_class + same_cluster == 0:
        return float("nan")
    return 2.0 * tp / (same_class + same_cluster)
