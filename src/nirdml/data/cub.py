"""CUB200-2011: classes 1-100 train, 101-200 test (method.md section 6).

Layouts: the official archive (``CUB_200_2011/images.txt``, ``classes.txt``,
``image_class_labels.txt``, ``images/NNN.Name/*.jpg``) -- read from the annotation files,
no image is decoded -- or plain class folders ``images/NNN.Name/`` (or ``NNN.Name/``).
"""

from __future__ import annotations

from pathlib import Path

from nirdml.data.base import DatasetSplits, split_by_class_id
from nirdml.data.layout import (
    id_prefixed,
    layout_error,
    list_images,
    read_table,
    require_root,
    subdirs,
)

NAME = "cub200"
TRAIN_CLASS_IDS = range(1, 101)  # official ids 1..100 train, 101..200 test
HOW_TO_GET = (
    "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and "
    "extract it there, or pass download=True."
)
EXPECTED = (
    "CUB_200_2011/images.txt + classes.txt + images/ (the official archive), or "
    "images/NNN.Name/ class folders"
)


def _official_base(root: Path) -> Path | None:
    for base in (root / "CUB_200_2011", root):
        if (base / "images.txt").is_file() and (base / "classes.txt").is_file():
            return base
    return None


def _folder_base(root: Path) -> Path | None:
    for base in (root / "CUB_200_2011" / "images", root / "images", root):
        if base.is_dir() and any(id_prefixed(d.name) for d in subdirs(base)):
            return base
    return None


def _read_official(base: Path) -> tuple[list[str], list[int], dict[int, str]]:
    classes = {int(i): name for i, name in read_table(base / "classes.txt", 2)}
    images = read_table(base / "images.txt", 2)
    labels_file = base / "image_class_labels.txt"
    if labels_file.is_file():
        by_image = {int(i): int(c) for i, c in read_table(labels_file, 2)}
    else:  # class from the folder of each image path
        by_name = {name: i for i, name in classes.items()}
        by_image = {}
        for i, rel in images:
            folder = rel.split("/", 1)[0]
            if folder not in by_name:
                raise layout_error(
                    NAME,
                    base,
                    f"image folders named as in classes.txt (got {folder!r})",
                    "Re-extract the official archive.",
                )
            by_image[int(i)] = by_name[folder]
    paths, ids = [], []
    for i, rel in images:
        if int(i) not in by_image:
            raise layout_error(
                NAME,
                base,
                f"a class for image id {i} in image_class_labels.txt",
                "Re-extract the official archive.",
            )
        cid = by_image[int(i)]
        if cid not in classes:
            raise layout_error(
                NAME,
                base,
                f"class id {cid} (image {rel}) listed in classes.txt",
                "Re-extract the official archive.",
            )
        paths.append(str(base / "images" / rel))
        ids.append(cid)
    return paths, ids, classes


def _read_folders(base: Path) -> tuple[list[str], list[int], dict[int, str]]:
    paths, ids, classes = [], [], {}
    for d in subdirs(base):
        parsed = id_prefixed(d.name)
        if parsed is None:
            continue
        cid = parsed[0]
        if cid in classes:
            raise layout_error(
                NAME,
                base,
                f"one folder per class id (id {cid} appears twice: {d.name})",
                "Remove the duplicate folder.",
            )
        classes[cid] = d.name
        for p in list_images(d):
            paths.append(str(p))
            ids.append(cid)
    return paths, ids, classes


def load_cub200(root: str | Path | None, *, skip_corrupt: bool = False) -> DatasetSplits:
    """CUB200-2011 train (class ids 1-100) and test (101-200) splits, untransformed."""
    root = require_root(root, NAME, HOW_TO_GET)
    base = _official_base(root)
    if base is not None:
        paths, ids, classes = _read_official(base)
        source = str(base / "images.txt")
    else:
        base = _folder_base(root)
        if base is None:
            raise layout_error(NAME, root, EXPECTED, HOW_TO_GET)
        paths, ids, classes = _read_folders(base)
        source = f"class folders in {base}"
    return split_by_class_id(
        NAME, paths, ids, classes, TRAIN_CLASS_IDS, source=source, skip_corrupt=skip_corrupt
    )
