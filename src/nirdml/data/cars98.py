"""cars98: the project's Stanford Cars subset (classes 1-98, ``images/`` + ``labels.csv``).

``labels.csv`` has the header ``fname,class,class_name`` (class = the official Cars196 id).
The zero-shot split of the shipped presets: classes 1-49 train, 50-98 test (change it with
``train_classes=[first, last]``); a validation split is carved from the training classes
with ``val_classes``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from nirdml.data.base import DatasetSplits, split_by_class_id
from nirdml.data.errors import DatasetLayoutError
from nirdml.data.layout import require_root
from nirdml.errors import InputError

NAME = "cars98"
TRAIN_CLASS_IDS = (1, 49)
HEADER = ["fname", "class", "class_name"]
HOW = (
    "Pass the cars98 folder (it holds images/ and labels.csv with the header "
    "fname,class,class_name), e.g. --set data.root=../shared/data/cars98"
)


def load_cars98(
    root: str | Path | None,
    *,
    train_classes: Sequence[int] = TRAIN_CLASS_IDS,
    skip_corrupt: bool = False,
) -> DatasetSplits:
    """Train = official class ids ``train_classes[0]..train_classes[1]`` (default 1-49),
    test = the other classes in the file (50-98)."""
    root = require_root(root, NAME, HOW)
    table = root / "labels.csv"
    if not table.is_file() or not (root / "images").is_dir():
        found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else []
        raise DatasetLayoutError(
            f"{NAME}: {root} has no labels.csv + images/ (found {found}). {HOW}"
        )
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:3]] != HEADER:
        raise DatasetLayoutError(
            f"{table}: the first row must be {','.join(HEADER)}, found {rows[:1]}. {HOW}"
        )
    paths, ids, names = [], [], {}
    for lineno, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        try:
            fname, cid, cname = r[0].strip(), int(r[1]), r[2].strip()
        except (IndexError, ValueError) as exc:
            raise DatasetLayoutError(
                f"{table}:{lineno}: expected fname,class,class_name with an integer class, "
                f"found {r!r}"
            ) from exc
        paths.append(str(root / "images" / fname))
        ids.append(cid)
        names[cid] = cname
    try:
        first, last = (int(c) for c in train_classes)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"cars98 train_classes must be [first, last] official class ids, got {train_classes!r}"
        ) from exc
    return split_by_class_id(
        NAME,
        paths,
        ids,
        names,
        range(first, last + 1),
        source=str(table),
        skip_corrupt=skip_corrupt,
    )
