"""Stanford Online Products: Ebay_train.txt (11,318 classes) / Ebay_test.txt (11,316).

The official layout: ``Stanford_Online_Products/Ebay_{train,test}.txt`` with rows
``image_id class_id super_class_id path`` (one header line) and images in
``<super>_final/`` folders. Class ids are re-indexed 0..C-1 per split in id order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirdml.data.base import DatasetSplits, FileStorage, check_files_exist, make_split
from nirdml.data.errors import DatasetLayoutError
from nirdml.data.layout import layout_error, read_table, require_root

NAME = "sop"
HOW_TO_GET = (
    "Download Stanford_Online_Products.zip (ftp://cs.stanford.edu/cs/cvgl/, also mirrored "
    "over http) and extract it there, or pass download=True (sop_url=... for a mirror)."
)
EXPECTED = "Stanford_Online_Products/Ebay_train.txt + Ebay_test.txt + <super>_final/ folders"


def _base(root: Path) -> Path | None:
    for base in (root / "Stanford_Online_Products", root):
        if (base / "Ebay_train.txt").is_file() and (base / "Ebay_test.txt").is_file():
            return base
    return None


def _read_split(base: Path, split: str, skip_corrupt: bool):
    table = base / f"Ebay_{split}.txt"
    rows = read_table(table, 4, header=True)
    if not rows:
        raise DatasetLayoutError(f"{table} lists no image; re-extract the dataset archive")
    try:
        ids = np.array([int(r[1]) for r in rows], dtype=np.int64)
    except ValueError as e:
        raise DatasetLayoutError(
            f"{table}: class_id column is not an integer ({e}); expected rows "
            "'image_id class_id super_class_id path' after one header line"
        ) from e
    paths = [str(base / r[3]) for r in rows]
    supers = {int(r[1]): r[3].split("/", 1)[0].removesuffix("_final") for r in rows}
    classes = {cid: f"{supers[cid]}/{cid}" for cid in supers}
    exists = check_files_exist(paths, str(table), skip_missing=skip_corrupt)
    arr = np.asarray(paths)
    return make_split(
        NAME,
        split,
        FileStorage(arr[exists].tolist()),
        ids[exists],
        classes,
        skip_corrupt=skip_corrupt,
        missing=arr[~exists].tolist(),
    )


def load_sop(root: str | Path | None, *, skip_corrupt: bool = False) -> DatasetSplits:
    """SOP train (Ebay_train.txt) and test (Ebay_test.txt) splits, untransformed."""
    root = require_root(root, NAME, HOW_TO_GET)
    base = _base(root)
    if base is None:
        raise layout_error(NAME, root, EXPECTED, HOW_TO_GET)
    train = _read_split(base, "train", skip_corrupt)
    test = _read_split(base, "test", skip_corrupt)
    overlap = set(train.class_names) & set(test.class_names)
    if overlap:
        raise DatasetLayoutError(
            f"{NAME}: {len(overlap)} class ids appear in both Ebay_train.txt and Ebay_test.txt "
            f"(e.g. {sorted(overlap)[:3]}); the official split is class-disjoint: re-extract it"
        )
    return DatasetSplits(train, test)
