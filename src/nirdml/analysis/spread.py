"""Per-class spread: how wide each class is in the embedding space, next to how far apart
the classes are (the two halves of the pi ratio)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nirdml.errors import InputError


@dataclass
class ClassSpread:
    """Per class (label order of ``classes``): item count and mean pairwise cosine distance
    ``1 - cos`` between its distinct items (NaN for one-item classes); ``inter``: mean
    cosine distance between distinct pairs of class centres (L2-normalised class means).

    ``intra.nanmean() / inter`` is exactly :func:`nirdml.evaluation.pi_ratio`.
    """

    classes: np.ndarray
    counts: np.ndarray
    intra: np.ndarray
    inter: float

    @property
    def pi_ratio(self) -> float:
        return float(np.nanmean(self.intra) / max(self.inter, 1e-8))

    def extremes(self, n: int) -> tuple[list[int], list[int]]:
        """Positions (into ``classes``) of the ``n`` tightest and the ``n`` widest classes."""
        valid = np.flatnonzero(~np.isnan(self.intra))
        order = valid[np.lexsort((valid, self.intra[valid]))]
        return [int(i) for i in order[:n]], [int(i) for i in order[::-1][:n]]


def class_spread(embeddings: Any, labels: Any) -> ClassSpread:
    """Per-class spread and the mean distance between class centres, in float64.

    Uses ``sum_{i != j} cos(u_i, u_j) = ||sum_i u_i||^2 - n`` for unit vectors, so it is
    O(N D) and never forms pairwise distances.
    """
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if x.dim() != 2 or x.shape[0] != len(y):
        raise InputError(f"need (N, D) embeddings and N labels, got {tuple(x.shape)} and {len(y)}")
    norms = x.norm(dim=1)
    if bool((norms == 0).any()):
        raise InputError("some embeddings are all-zero vectors; cosine distance is undefined")
    classes, inv = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise InputError("the spread analysis needs at least 2 classes")
    inv_t = torch.as_tensor(inv)
    c = len(classes)
    counts = torch.bincount(inv_t, minlength=c).to(torch.float64)
    unit_sum = torch.zeros(c, x.shape[1], dtype=torch.float64).index_add_(
        0, inv_t, x / norms.unsqueeze(1)
    )
    pairs = counts * (counts - 1)
    intra = 1.0 - ((unit_sum**2).sum(1) - counts) / pairs.clamp(min=1)
    intra = torch.where(counts >= 2, intra, torch.full_like(intra, float("nan")))
    raw = torch.zeros_like(unit_sum).index_add_(0, inv_t, x)
    centres = F.normalize(raw / counts.unsqueeze(1), dim=1)
    total = centres.sum(0)
    inter = 1.0 - ((total**2).sum() - c) / (c * (c - 1))
    return ClassSpread(classes, counts.numpy().astype(np.int64), intra.numpy(), float(inter))
