"""Cars196: classes 1-98 train, 99-196 test by official class id (method.md section 6).

Layouts: the official one (``cars_annos.mat`` + ``car_ims/``; the official train/test flag
in the .mat is ignored, as in the DML protocol) or class folders. Class folders need the
official class id: either an id prefix (``001.AM General Hummer SUV 2000``) or a
``names.csv`` listing the class names in id order (the Kaggle copy: folders named by class,
``/`` replaced by ``-``, optionally under ``train/`` and ``test/``, which are merged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirdml.data.base import DatasetSplits, split_by_class_id
from nirdml.data.download import CARS_HELP
from nirdml.data.errors import DatasetLayoutError, list_some
from nirdml.data.layout import id_prefixed, layout_error, list_images, require_root, subdirs

NAME = "cars196"
TRAIN_CLASS_IDS = range(1, 99)  # official ids 1..98 train, 99..196 test
EXPECTED = (
    "cars_annos.mat + car_ims/ (the official layout), or class folders named "
    "NNN.<class name>, or class folders + names.csv (class names in official id order)"
)


def _field(ann: np.ndarray, name: str, mat: Path) -> np.ndarray:
    if ann.dtype.names is None or name not in ann.dtype.names:
        raise DatasetLayoutError(
            f"{mat}: the 'annotations' struct has no field {name!r} (fields: "
            f"{ann.dtype.names}); expected the official cars_annos.mat -- get it again. "
            f"{CARS_HELP}"
        )
    return np.atleast_1d(ann[name])


def _read_mat(root: Path) -> tuple[list[str], list[int], dict[int, str], str]:
    import scipy.io  # only this layout needs it

    mat_path = root / "cars_annos.mat"
    try:
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True)
    except Exception as e:
        raise DatasetLayoutError(
            f"cannot read {mat_path} ({type(e).__name__}: {e}); the file is damaged. {CARS_HELP}"
        ) from e
    if "annotations" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetLayoutError(
            f"{mat_path} has no 'annotations' variable (found {keys}); expected the official "
            f"cars_annos.mat. {CARS_HELP}"
        )
    ann = np.atleast_1d(mat["annotations"])
    rel = _field(ann, "relative_im_path", mat_path)
    cls = _field(ann, "class", mat_path).astype(np.int64)
    names = np.atleast_1d(mat.get("class_names", np.array([], dtype=object)))
    classes = {i + 1: str(n) for i, n in enumerate(names)}
    for cid in np.unique(cls):
        classes.setdefault(int(cid), f"class_{int(cid):03d}")
    paths = [str(root / str(r)) for r in rel]
    return paths, cls.tolist(), classes, str(mat_path)


def _class_dirs(root: Path) -> list[Path]:
    for base in (root / "car_data" / "car_data", root / "car_data", root):
        if not base.is_dir():
            continue
        halves = [base / h for h in ("train", "test") if (base / h).is_dir()]
        dirs = [d for h in halves for d in subdirs(h)] if halves else subdirs(base)
        dirs = [d for d in dirs if d.name not in ("car_data",)]
        if dirs:
            return dirs
    return []


def _read_folders(root: Path) -> tuple[list[str], list[int], dict[int, str], str]:
    dirs = _class_dirs(root)
    names_csv = root / "names.csv"
    by_name: dict[str, int] = {}
    classes: dict[int, str] = {}
    if names_csv.is_file():
        lines = [ln.strip() for ln in names_csv.read_text(encoding="utf-8").splitlines()]
        for i, n in enumerate((ln for ln in lines if ln), start=1):
            by_name[n.replace("/", "-")] = i
            classes[i] = n
    paths, ids, unknown = [], [], []
    for d in dirs:
        cid = by_name.get(d.name)
        if cid is None:
            parsed = id_prefixed(d.name)
            if parsed is None:
                unknown.append(d.name)
                continue
            cid = parsed[0]
            classes.setdefault(cid, d.name)
        for p in list_images(d):
            paths.append(str(p))
            ids.append(cid)
    if unknown or not dirs:
        if not dirs:
            raise layout_error(NAME, root, EXPECTED, CARS_HELP)
        raise DatasetLayoutError(
            f"{NAME}: cannot tell the official class id of folders {list_some(unknown)} in "
            f"{root}: name them NNN.<class name> or put names.csv (one class name per line, "
            "in official id order) in the root. The official id decides the split "
            "(1-98 train, 99-196 test); for other data use load_dataset('folder', ...)."
        )
    return paths, ids, classes, f"class folders in {root}"


def load_cars196(root: str | Path | None, *, skip_corrupt: bool = False) -> DatasetSplits:
    """Cars196 train (class ids 1-98) and test (99-196) splits, untransformed."""
    root = require_root(root, NAME, CARS_HELP)
    if (root / "cars_annos.mat").is_file():
        paths, ids, classes, source = _read_mat(root)
    else:
        paths, ids, classes, source = _read_folders(root)
    return split_by_class_id(
        NAME, paths, ids, classes, TRAIN_CLASS_IDS, source=source, skip_corrupt=skip_corrupt
    )
