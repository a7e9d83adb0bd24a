"""In-Shop Clothes Retrieval (DeepFashion): train / query / gallery, as published.

The official layout: ``list_eval_partition.txt`` (at the root or in ``Eval/``) -- first line
the number of rows, second the header ``image_name item_id evaluation_status``, then rows
``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train|query|gallery`` -- and the
images under ``img/`` (beside the list, or in ``Img/``). Published counts: 25,882 train
images of 3,997 items; 14,218 query and 12,612 gallery images of 3,985 other items.

Splits: ``train`` (its items, labels 0..C-1 in id order) and ``test``: the query and
gallery images together, labels over their union, with ``test.is_query`` /
``test.is_gallery`` saying which is which (each image is one of the two). Evaluation on
``test`` is queries against the gallery (``nirdml.evaluation.evaluate(..., is_query=,
is_gallery=)``), as the benchmark's R@1/10/20/30/40. A validation split is carved from the
training items when asked (``val_classes``), as for every dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirdml.data.base import DatasetSplits, FileStorage, check_files_exist, make_split
from nirdml.data.download import INSHOP_HELP
from nirdml.data.errors import DatasetLayoutError
from nirdml.data.layout import layout_error, require_root

NAME = "inshop"
PARTITION = "list_eval_partition.txt"
STATUSES = ("train", "query", "gallery")
PUBLISHED = {"train": (25_882, 3_997), "query": (14_218, 3_985), "gallery": (12_612, 3_985)}
"""Images and items per evaluation status in the official list."""
HOW_TO_GET = INSHOP_HELP
EXPECTED = f"{PARTITION} (or Eval/{PARTITION}) and the img/ folder (or Img/img/)"


def _find(root: Path) -> tuple[Path, Path] | None:
    """(the partition list, the folder its image paths are relative to), or None."""
    bases = [root, root / "In-shop Clothes Retrieval Benchmark", root / "Inshop_Clothes"]
    for base in bases:
        for table in (base / PARTITION, base / "Eval" / PARTITION):
            if table.is_file():
                for images in (base, base / "Img"):
                    if (images / "img").is_dir():
                        return table, images
                return table, base
    return None


def read_partition(table: Path) -> list[tuple[str, str, str]]:
    """``(image_name, item_id, evaluation_status)`` rows of ``list_eval_partition.txt``."""
    with open(table, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    where = f"{table}: expected a row count, the header 'image_name item_id evaluation_status'"
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise DatasetLayoutError(f"{where} and then the rows; re-extract the file")
    rows = []
    for lineno, line in enumerate(lines[2:], start=3):
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3 or fields[2] not in STATUSES:
            raise DatasetLayoutError(
                f"{table}:{lineno}: expected 'img/... id_XXXXXXXX train|query|gallery', found "
                f"{line!r}; the file is damaged: re-extract it"
            )
        rows.append((fields[0], fields[1], fields[2]))
    try:
        count = int(lines[0])
    except ValueError:
        raise DatasetLayoutError(f"{where} (first line {lines[0]!r} is not a count)") from None
    if count != len(rows):
        raise DatasetLayoutError(
            f"{table} announces {count} rows but holds {len(rows)}; the file is truncated: "
            "re-extract it"
        )
    return rows


def load_inshop(root: str | Path | None, *, skip_corrupt: bool = False) -> DatasetSplits:
    """In-Shop train and test (query + gallery, flagged) splits, untransformed."""
    root = require_root(root, NAME, HOW_TO_GET)
    found = _find(root)
    if found is None:
        raise layout_error(NAME, root, EXPECTED, HOW_TO_GET)
    table, images = found
    rows = read_partition(table)
    names = np.array([r[0] for r in rows])
    items = np.array([r[1] for r in rows])
    status = np.array([r[2] for r in rows])
    paths = np.array([str(images / n) for n in names])
    # Class names: category path + item id ("WOMEN/Dresses/id_00000002"), from the image path.
    category = {
        item: "/".join(Path(n).parts[1:-2])
        for n, item in zip(names[::-1], items[::-1], strict=True)
    }
    class_names = {item: f"{cat}/{item}" if cat else item for item, cat in category.items()}
    exists = check_files_exist(paths.tolist(), str(table), skip_missing=skip_corrupt)
    train_mask = status == "train"
    if not (train_mask & exists).any() or not (~train_mask & exists).any():
        raise DatasetLayoutError(
            f"{NAME}: {table} lists no {'train' if not train_mask.any() else 'query/gallery'} "
            "image that exists; the dataset is incomplete: re-extract img/"
        )
    overlap = set(items[train_mask]) & set(items[~train_mask])
    if overlap:
        raise DatasetLayoutError(
            f"{NAME}: {len(overlap)} item ids are both train and query/gallery (e.g. "
            f"{sorted(overlap)[:3]}); the official split is item-disjoint: re-extract {PARTITION}"
        )

    def split(mask: np.ndarray, name: str, roles: bool):
        keep = mask & exists
        return make_split(
            NAME,
            name,
            FileStorage(paths[keep].tolist()),
            items[keep],
            class_names,
            skip_corrupt=skip_corrupt,
            missing=paths[mask & ~exists].tolist(),
            is_query=status[keep] == "query" if roles else None,
            is_gallery=status[keep] == "gallery" if roles else None,
        )

    train = split(train_mask, "train", roles=False)
    test = split(~train_mask, "test", roles=True)
    if not test.is_query.any() or not test.is_gallery.any():
        raise DatasetLayoutError(
            f"{NAME}: {table} needs both query and gallery rows (found "
            f"{int(test.is_query.sum())} and {int(test.is_gallery.sum())}); re-extract it"
        )
    return DatasetSplits(train, test)
