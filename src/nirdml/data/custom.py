"""Custom data: a folder of class sub-folders, or a CSV ``path,label[,split]``.

Which classes train and which test (zero-shot, class-disjoint): given by the data
(``train/`` + ``test/`` folders, or the CSV's split column), or by a rule -- the first half
of the sorted class names train (integer names sorted numerically), or explicit
``train_classes`` / ``test_classes`` lists. A CSV with a header may add ``is_query`` and
``is_gallery`` columns (1/0, true/false, yes/no): the test split is then evaluated as queries
against a gallery (In-Shop's protocol; an item may be both, it never retrieves itself).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nirdml.data.base import (
    DatasetSplits,
    FileStorage,
    RetrievalDataset,
    check_files_exist,
)
from nirdml.data.errors import DatasetLayoutError, list_some
from nirdml.data.layout import list_images, require_root, subdirs
from nirdml.data.splits import class_sort_key, split_class_names
from nirdml.errors import InputError

SPLIT_NAMES = ("train", "test", "val")
ROLE_COLUMNS = ("is_query", "is_gallery")
_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f")


def _build(
    name: str,
    split: str,
    paths: list[str],
    labels: list[str],
    classes: list[str],
    source: str,
    skip_corrupt: bool,
    check: bool,
    roles: tuple[np.ndarray, np.ndarray] | None = None,
) -> RetrievalDataset:
    """One split from per-item class names; labels 0..C-1 in the order of ``classes``
    (``roles``: per-item is_query / is_gallery flags of all rows, for a test split)."""
    position = {c: i for i, c in enumerate(classes)}
    keep = np.array([lab in position for lab in labels], dtype=bool)
    arr = np.asarray(paths)[keep] if len(paths) else np.asarray([], dtype=str)
    y = np.array([position[lab] for lab in np.asarray(labels)[keep]], dtype=np.int64)
    exists = (
        check_files_exist(arr.tolist(), source, skip_missing=skip_corrupt)
        if check
        else np.ones(len(arr), dtype=bool)
    )
    present = sorted(set(y[exists].tolist()))
    if len(present) < len(classes):
        # A class whose images are all missing disappears; keep labels contiguous.
        classes = [classes[i] for i in present]
        remap = np.full(len(position), -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        y = remap[y]
    is_query = is_gallery = None
    if roles is not None:
        is_query, is_gallery = (r[keep][exists] for r in roles)
        _check_roles(is_query, is_gallery, source, split)
    return RetrievalDataset(
        FileStorage(arr[exists].tolist()),
        y[exists],
        classes,
        name=name,
        split=split,
        skip_corrupt=skip_corrupt,
        missing=arr[~exists].tolist(),
        is_query=is_query,
        is_gallery=is_gallery,
    )


def _check_roles(is_query: np.ndarray, is_gallery: np.ndarray, source: str, split: str) -> None:
    neither = int((~(is_query | is_gallery)).sum())
    if neither:
        raise DatasetLayoutError(
            f"{source}: {neither} {split} row(s) have is_query=0 and is_gallery=0; mark each "
            "test item as a query, a gallery item or both"
        )
    if not is_query.any() or not is_gallery.any():
        raise DatasetLayoutError(
            f"{source}: the {split} split has {int(is_query.sum())} queries and "
            f"{int(is_gallery.sum())} gallery items; it needs both (or drop the is_query / "
            "is_gallery columns to let every item query all others)"
        )


def _scan(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(paths, class name per path, class names) of ``folder/<class>/*`` images."""
    paths: list[str] = []
    labels: list[str] = []
    classes: list[str] = []
    for d in subdirs(folder):
        files = list_images(d)
        if files:  # empty folders are not classes
            classes.append(d.name)
            paths += [str(f) for f in files]
            labels += [d.name] * len(files)
    return paths, labels, classes


def load_folder(
    root: str | Path | None,
    *,
    train_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
    skip_corrupt: bool = False,
) -> DatasetSplits:
    """A folder of class sub-folders (``root/<class>/*.jpg``), or ``root/train/<class>/`` +
    ``root/test/<class>/`` (the split is then given by the folders)."""
    how = "Pass the folder that holds one sub-folder of images per class."
    root = require_root(root, "folder", how)
    halves = [root / s for s in ("train", "test")]
    if all(h.is_dir() for h in halves) and all(_scan(h)[2] for h in halves):
        if train_classes is not None or test_classes is not None:
            raise InputError(
                f"{root} has train/ and test/ folders, which fix the split; drop "
                "train_classes/test_classes or use a flat folder of classes"
            )
        (tp, tl, tc), (sp, sl, sc) = _scan(halves[0]), _scan(halves[1])
        both = sorted(set(tc) & set(sc))
        if both:
            raise DatasetLayoutError(
                f"classes {list_some(both)} are in both {halves[0]} and {halves[1]}; the splits "
                "must be class-disjoint (zero-shot retrieval): move or rename them"
            )
        tc, sc = sorted(tc, key=class_sort_key), sorted(sc, key=class_sort_key)
        train = _build("folder", "train", tp, tl, tc, str(halves[0]), skip_corrupt, False)
        test = _build("folder", "test", sp, sl, sc, str(halves[1]), skip_corrupt, False)
        return DatasetSplits(train, test)
    paths, labels, classes = _scan(root)
    if len(classes) < 2:
        entries = sorted(p.name for p in root.iterdir())
        raise DatasetLayoutError(
            f"folder: {root} should hold one sub-folder of images per class (at least 2 "
            f"classes), found {len(classes)} class folder(s) with images among "
            f"{list_some(entries)}. {how}"
        )
    train_c, test_c = split_class_names(classes, train_classes, test_classes)
    train = _build("folder", "train", paths, labels, train_c, str(root), skip_corrupt, False)
    test = _build("folder", "test", paths, labels, test_c, str(root), skip_corrupt, False)
    return DatasetSplits(train, test)


def _flag(value: str, column: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise DatasetLayoutError(f"{where}: {column} {value!r} is not 1/0, true/false or yes/no")


def _read_csv(
    path: Path, image_root: Path
) -> tuple[list[str], list[str], list[str] | None, tuple[np.ndarray, np.ndarray] | None]:
    """(paths, labels, splits or None, (is_query, is_gallery) or None) of a CSV file."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    if rows and [x.strip().lower() for x in rows[0][:2]] == ["path", "label"]:
        header, rows = [x.strip().lower() for x in rows[0]], rows[1:]
    else:
        header = None
    if not rows:
        raise DatasetLayoutError(f"{path} has no data rows; expected lines 'path,label[,split]'")
    width = len(rows[0])
    if header is None:
        has_split = width >= 3
        columns = {"split": 2} if has_split else {}
    else:
        known = ("path", "label", "split", *ROLE_COLUMNS)
        unknown = [c for c in header if c not in known]
        if unknown or len(set(header)) != len(header):
            raise DatasetLayoutError(
                f"{path}: header columns {header} must be path, label and optionally split, "
                f"is_query, is_gallery (each once); unknown: {unknown or 'none'}"
            )
        columns = {c: header.index(c) for c in header}
        has_split = "split" in columns
        if (ROLE_COLUMNS[0] in columns) != (ROLE_COLUMNS[1] in columns):
            raise DatasetLayoutError(
                f"{path}: give both is_query and is_gallery columns (or neither)"
            )
        width = len(header)
    has_roles = ROLE_COLUMNS[0] in columns
    paths, labels, splits = [], [], []
    flags: list[tuple[bool, bool]] = []
    fields = "path,label[,split]" if header is None else ",".join(header)
    for lineno, r in enumerate(rows, start=2 if header else 1):
        if len(r) < 2 or len(r) != width:
            raise DatasetLayoutError(
                f"{path}:{lineno}: expected {width} fields ('{fields}'), found {r!r}"
            )
        p = Path(r[0].strip())
        paths.append(str(p if p.is_absolute() else image_root / p))
        labels.append(r[1].strip())
        if has_split:
            s = r[columns["split"]].strip().lower()
            if s not in SPLIT_NAMES:
                raise DatasetLayoutError(
                    f"{path}:{lineno}: split {s!r} is not one of {', '.join(SPLIT_NAMES)}"
                )
            splits.append(s)
        if has_roles:
            where = f"{path}:{lineno}"
            flags.append(tuple(_flag(r[columns[c]], c, where) for c in ROLE_COLUMNS))
    roles = None
    if has_roles:
        a = np.asarray(flags, dtype=bool).reshape(-1, 2)
        roles = (a[:, 0], a[:, 1])
    return paths, labels, splits if has_split else None, roles


def load_csv(
    root: str | Path | None,
    *,
    image_root: str | Path | None = None,
    train_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
    skip_corrupt: bool = False,
) -> DatasetSplits:
    """A CSV file ``path,label[,split]`` (optional header row ``path,label,split``).

    Relative paths are resolved against ``image_root`` (default: the CSV's folder). With a
    split column (train/test/val) the split is given; each class must lie in one split.
    With a header, ``is_query`` and ``is_gallery`` columns (1/0) make the test split a
    query/gallery split (``test.is_query`` / ``test.is_gallery``); other splits ignore them.
    """
    how = "Pass the path of a CSV file with rows 'path,label[,split]'."
    csv_path = require_root(root, "csv", how)
    if not csv_path.is_file():
        raise DatasetLayoutError(f"csv: {csv_path} is a folder, not a CSV file. {how}")
    base = Path(image_root) if image_root is not None else csv_path.parent
    paths, labels, splits, roles = _read_csv(csv_path, base)
    source = str(csv_path)
    if splits is None:
        train_c, test_c = split_class_names(labels, train_classes, test_classes)
        return DatasetSplits(
            _build("csv", "train", paths, labels, train_c, source, skip_corrupt, True),
            _build("csv", "test", paths, labels, test_c, source, skip_corrupt, True, roles),
        )
    if train_classes is not None or test_classes is not None:
        raise InputError(
            f"{csv_path} has a split column, which fixes the split; drop "
            "train_classes/test_classes or remove the column"
        )
    per = _classes_per_split(csv_path, labels, splits)
    out = {
        s: _build(
            "csv",
            s,
            paths,
            labels,
            per[s],
            source,
            skip_corrupt,
            True,
            roles if s == "test" else None,
        )
        for s in SPLIT_NAMES
        if per[s]
    }
    return DatasetSplits(out["train"], out["test"], out.get("val"))


def _classes_per_split(
    csv_path: Path, labels: list[str], splits: list[str]
) -> dict[str, list[str]]:
    """The classes of each split named by the CSV's split column (sorted), checked to be
    class-disjoint and to include train and test."""
    by_class: dict[str, set[str]] = {}
    for lab, s in zip(labels, splits, strict=True):
        by_class.setdefault(lab, set()).add(s)
    crossing = sorted(c for c, s in by_class.items() if len(s) > 1)
    if crossing:
        raise DatasetLayoutError(
            f"{csv_path}: classes {list_some(crossing)} appear in more than one split; "
            "retrieval splits must be class-disjoint (zero-shot): give each class one split"
        )
    per = {
        s: sorted((c for c, ss in by_class.items() if s in ss), key=class_sort_key)
        for s in SPLIT_NAMES
    }
    if not per["train"] or not per["test"]:
        raise DatasetLayoutError(
            f"{csv_path}: the split column must name both train and test rows (found "
            f"{sorted(set(splits))})"
        )
    return per


def _scan_tree(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(paths, class per path, classes) of every image in the sub-folders of ``root``, at any
    depth: each folder that holds images is one class, named by its path under ``root``
    (``Alphabet/character01`` for Omniglot's tree; ``cat`` for ``root/cat/*.jpg``)."""
    paths: list[str] = []
    labels: list[str] = []
    classes: list[str] = []
    pending = subdirs(root)
    while pending:
        d = pending.pop(0)
        files = list_images(d)
        if files:
            name = d.relative_to(root).as_posix()
            classes.append(name)
            paths += [str(f) for f in files]
            labels += [name] * len(files)
        pending = subdirs(d) + pending  # depth first, in sorted order
    return paths, labels, classes


def load_image_folder(folder: str | Path, *, transform=None, convert=None) -> RetrievalDataset:
    """Every image under ``folder`` as ONE dataset (no train/test split), for embedding.

    Each folder under ``folder`` that holds images is one class, at any depth (``cat/*.jpg``
    -> ``cat``; Omniglot's ``Alphabet/character01/*.png`` -> ``Alphabet/character01``), in
    sorted order; images directly in ``folder`` form the single class ``"."`` (unlabelled
    data). ``convert`` post-processes each decoded file (see ``nirdml.data.file_reader``).
    """
    how = "Pass a folder of images, or of class sub-folders of images."
    root = require_root(folder, "image folder", how)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder. {how}")
    paths, labels, classes = _scan_tree(root)
    flat = [str(p) for p in list_images(root)]
    if flat:
        paths, labels, classes = flat + paths, ["."] * len(flat) + labels, ["."] + classes
    if not paths:
        entries = sorted(p.name for p in root.iterdir())
        raise DatasetLayoutError(f"no images found in {root} among {list_some(entries)}. {how}")
    ds = _build("folder", "all", paths, labels, classes, str(root), False, False)
    ds.storage.convert = convert
    return ds.with_transform(transform)
