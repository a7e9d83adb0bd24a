"""Input checking and conversion shared by the evaluation modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nirdml.errors import InputError

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences


def as_embeddings(x: ArrayLike, name: str = "embeddings") -> torch.Tensor:
    """A 2-D floating CPU tensor (float32, or float64 if given float64), finite, not copied
    when already suitable. Torch tensors are detached."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise InputError(
            f"{name} must be a 2-D array of shape (num_items, dim), got shape "
            f"{tuple(t.shape)}; reshape it (e.g. x.reshape(len(x), -1))."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one vector.")
    if t.dtype != torch.float64:
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"{name} must be real-valued, got dtype {t.dtype}.")
        t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InputError(
            f"{name} contains NaN or Inf values; fix the model output (e.g. check for "
            "diverged training) before evaluating."
        )
    return t


def as_labels(y: ArrayLike, n: int, name: str = "labels") -> np.ndarray:
    """A 1-D int64 numpy array of length ``n``. Any integer labels are allowed."""
    if isinstance(y, torch.Tensor):
        a = y.detach().cpu().numpy()
    else:
        a = np.asarray(y)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise InputError(
            f"{name} must be 1-D (one class id per item), got shape {a.shape}; "
            "multi-label evaluation is not supported."
        )
    if len(a) != n:
        raise InputError(
            f"{name} has {len(a)} entries but {n} are expected (one per embedding / item); "
            "pass one label per row."
        )
    if not np.issubdtype(a.dtype, np.integer):
        if (
            np.issubdtype(a.dtype, np.floating)
            and np.all(np.isfinite(a))
            and np.all(a == np.round(a))
        ):
            a = a.astype(np.int64)
        else:
            raise InputError(
                f"{name} must be integer class ids, got dtype {a.dtype}; map class names "
                "to integers first (e.g. np.unique(names, return_inverse=True)[1])."
            )
    return a.astype(np.int64, copy=False)


def rows_for_budget(bytes_per_row: int, memory_budget_mb: float, minimum: int = 1) -> int:
    """How many rows of ``bytes_per_row`` bytes fit in the memory budget (at least
    ``minimum``)."""
    if memory_budget_mb <= 0:
        raise InputError(f"memory_budget_mb must be positive, got {memory_budget_mb}; e.g. 512.")
    budget = int(memory_budget_mb * 2**20)
    return max(minimum, budget // max(1, bytes_per_row))
