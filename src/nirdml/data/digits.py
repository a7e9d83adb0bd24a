"""sklearn digits, the embedded default: digits 0-4 train, 5-9 test, all in memory.

1,797 8x8 images with values 0..16 (scikit-learn ships them, so no download). Images are
kept as one uint8 array and converted per item to a 1x8x8 float tensor in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from nirdml.data.base import ArrayStorage, DatasetSplits, RetrievalDataset
from nirdml.errors import InputError

NAME = "digits"


class DigitsToImage:
    """uint8 8x8 (0..16) -> 1x8x8 float32 tensor in [0, 1]."""

    def __call__(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 16.0)[None]


def load_digits_splits(root: object = None, *, skip_corrupt: bool = False) -> DatasetSplits:
    """Digits 0-4 train (labels 0-4), 5-9 test (labels 0-4 = digits 5-9), untransformed.

    The data ships with scikit-learn: ``root`` must be None (``skip_corrupt`` has nothing
    to skip and is accepted for a uniform reader signature).
    """
    if root is not None:
        raise InputError(
            f"digits ships with scikit-learn and takes no root (got {root!r}); pass root=None"
        )
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)
    target = d.target.astype(np.int64)
    storage = ArrayStorage(images, DigitsToImage())
    out = []
    for split, digits in (("train", range(0, 5)), ("test", range(5, 10))):
        idx = np.flatnonzero((target >= digits.start) & (target < digits.stop))
        out.append(
            RetrievalDataset(
                storage,
                target[idx] - digits.start,
                [str(k) for k in digits],
                index=idx,
                name=NAME,
                split=split,
            )
        )
    return DatasetSplits(out[0], out[1])
