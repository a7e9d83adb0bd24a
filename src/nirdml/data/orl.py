"""ORL / AT&T faces: 40 subjects x 10 grey 92x112 photos (``orl_faces.npz``), in memory.

The file holds ``images`` uint8 [40, 10, 112, 92] and ``labels`` [40, 10] (subject 0..39).
The zero-shot split of the shipped presets: subjects 1-20 train, 21-40 test (change it with
``train_classes=[first, last]``, 1-based subject numbers); a validation split is carved from
the training subjects with ``val_classes``. Images are returned as RGB PIL images (the grey
channel repeated), so the ``resnet`` transform and ImageNet backbones apply unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nirdml.data.base import ArrayStorage, DatasetSplits, RetrievalDataset
from nirdml.data.errors import DatasetLayoutError
from nirdml.data.layout import require_root
from nirdml.errors import InputError

NAME = "orl"
FILE = "orl_faces.npz"
TRAIN_SUBJECTS = (1, 20)
HOW = f"Pass the folder that holds {FILE}, e.g. --set data.root=../shared/data/orl_faces"


def grey_to_rgb(a: np.ndarray):
    """uint8 HxW -> RGB PIL image (the grey channel repeated)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(a), mode="L").convert("RGB")


def load_orl(
    root: str | Path | None,
    *,
    train_classes: Sequence[int] = TRAIN_SUBJECTS,
    skip_corrupt: bool = False,
) -> DatasetSplits:
    """Train = subjects ``train_classes[0]..train_classes[1]`` (1-based, default 1-20), test
    = the others. ``skip_corrupt`` has nothing to skip (one array file)."""
    root = require_root(root, NAME, HOW)
    path = root / FILE
    if not path.is_file():
        found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
        raise DatasetLayoutError(f"{NAME}: {root} has no {FILE} (found {found}). {HOW}")
    with np.load(path) as d:
        images = np.asarray(d["images"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    if images.ndim != 4 or labels.shape != images.shape[:2]:
        raise DatasetLayoutError(
            f"{path}: expected images [subjects, 10, H, W] and labels [subjects, 10], found "
            f"{images.shape} and {labels.shape}"
        )
    try:
        first, last = (int(c) for c in train_classes)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"orl train_classes must be [first, last] subject numbers, got {train_classes!r}"
        ) from exc
    x = images.reshape(-1, *images.shape[2:])
    subject = labels.reshape(-1) + 1  # 1-based, as the database's s1..s40 folders
    storage = ArrayStorage(x, grey_to_rgb)
    train_ids = [s for s in sorted(set(subject.tolist())) if first <= s <= last]
    test_ids = [s for s in sorted(set(subject.tolist())) if not first <= s <= last]
    if len(train_ids) < 2 or len(test_ids) < 2:
        raise InputError(f"orl train_classes {train_classes!r} leaves fewer than 2 classes a side")
    out = []
    for split, ids in (("train", train_ids), ("test", test_ids)):
        position = {s: i for i, s in enumerate(ids)}
        idx = np.flatnonzero(np.isin(subject, ids))
        out.append(
            RetrievalDataset(
                storage,
                np.array([position[s] for s in subject[idx]], dtype=np.int64),
                [f"s{s}" for s in ids],
                index=idx,
                name=NAME,
                split=split,
            )
        )
    return DatasetSplits(out[0], out[1])
