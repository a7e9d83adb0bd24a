"""Seed statistics: mean +- std, and the paired test of +NIR against its baseline.

Runs with the same seed share the model init, the proxies, the batches, the augmentation
and the validation split, so "+NIR minus baseline" per seed is a paired difference; its
tests (Student's paired t and the exact Wilcoxon signed-rank) use that pairing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


@dataclass(frozen=True)
class PairedResult:
    """``treated - control`` over paired seeds."""

    n: int
    mean: float
    std: float
    ci_low: float
    """95% confidence interval of the mean difference (Student t, n - 1 dof)."""
    ci_high: float
    t_p: float
    """Two-sided paired t-test p-value."""
    wilcoxon_p: float
    """Two-sided exact Wilcoxon signed-rank p-value (zero differences dropped)."""
    cohen_dz: float
    """Effect size: mean difference over its standard deviation."""
    wins: int
    losses: int


def paired_test(treated: Sequence[float], control: Sequence[float]) -> PairedResult:
    """Paired comparison of two equally long, seed-aligned sequences."""
    a = np.asarray(treated, dtype=np.float64)
    b = np.asarray(control, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired_test needs two equal-length 1-D sequences, got {a.shape}, {b.shape}"
        )
    d = a - b
    n = d.size
    if n < 2:
        raise ValueError("paired_test needs at least 2 pairs")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    if sd > 0:
        t_p = float(stats.ttest_rel(a, b).pvalue)
        dz = mean / sd
    else:  # every pair differs by the same amount
        t_p = 1.0 if mean == 0 else 0.0
        dz = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        w_p = 1.0
    else:
        w_p = float(stats.wilcoxon(nonzero, alternative="two-sided", method="exact").pvalue)
    return PairedResult(
        n=n,
        mean=mean,
        std=sd,
        ci_low=mean - half,
        ci_high=mean + half,
        t_p=t_p,
        wilcoxon_p=w_p,
        cohen_dz=dz,
        wins=int((d > 0).sum()),
        losses=int((d < 0).sum()),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over the given tests)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    m = p.size
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
