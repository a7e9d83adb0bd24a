"""Omniglot: images_background train (964 classes), images_evaluation test (659 classes).

Sources: the original/torchvision PNG tree
``images_{background,evaluation}/<Alphabet>/characterNN/XXXX_YY.png`` (optionally under
``omniglot-py/``) or the npz arrays (``images`` bool [C, 20, 105, 105], True = background).
A class is one character (alphabet, character); labels follow the global character index
XXXX, which is also the npz row order, so both sources give identical labels. Images come
out with ink = 255 (white strokes on black), the convention of the "omniglot" preset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from nirdml.data.base import (
    ArrayStorage,
    DatasetSplits,
    FileStorage,
    RetrievalDataset,
)
from nirdml.data.errors import DatasetLayoutError
from nirdml.data.layout import layout_error, list_images, require_root, subdirs
from nirdml.errors import InputError

NAME = "omniglot"
SPLITS = {"train": "images_background", "test": "images_evaluation"}
HOW_TO_GET = (
    "Get images_background.zip and images_evaluation.zip from "
    "https://github.com/brendenlake/omniglot (python/) and extract them there, or pass "
    "download=True."
)
EXPECTED = (
    "images_background/ + images_evaluation/ PNG trees (<Alphabet>/characterNN/*.png, "
    "optionally under omniglot-py/), or images_background.npz + images_evaluation.npz"
)
_FILE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


def ink_high(img: Image.Image) -> Image.Image:
    """Omniglot PNGs are black ink on white: return mode "L" with ink = 255."""
    return ImageOps.invert(img.convert("L"))


class PackedBits:
    """Unpack one bit-packed Omniglot image row into a 1xHxW uint8 tensor (ink = 255)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def __call__(self, packed: np.ndarray) -> torch.Tensor:
        ink = np.unpackbits(packed, axis=-1, count=self.width)
        return torch.from_numpy(ink * np.uint8(255))[None]


def _png_base(root: Path) -> Path | None:
    for base in (root, root / "omniglot-py"):
        if all((base / d).is_dir() for d in SPLITS.values()):
            return base
    return None


def _npz_base(root: Path) -> Path | None:
    if all((root / f"{d}.npz").is_file() for d in SPLITS.values()):
        return root
    return None


def _read_png_split(folder: Path, split: str, skip_corrupt: bool) -> RetrievalDataset:
    chars: list[tuple[str, Path, list[Path]]] = []
    for alphabet in subdirs(folder):
        for char in subdirs(alphabet):
            files = list_images(char)
            if files:
                chars.append((f"{alphabet.name}/{char.name}", char, files))
    if not chars:
        raise layout_error(NAME, folder, "<Alphabet>/characterNN/*.png folders", HOW_TO_GET)

    def global_index(files: list[Path]) -> int | None:
        """The one XXXX shared by all XXXX_YY.png files of a character folder, else None."""
        matches = [_FILE.match(f.name) for f in files]
        found = {int(m.group(1)) for m in matches if m}
        return found.pop() if all(matches) and len(found) == 1 else None

    keys = [global_index(files) for _, _, files in chars]
    if all(k is not None for k in keys) and len(set(keys)) == len(keys):
        order = np.argsort(np.asarray(keys))  # official character index = npz row order
    else:
        order = np.arange(len(chars))  # (alphabet, character) folder order
    paths: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for label, c in enumerate(order):
        name, _, files = chars[c]
        names.append(name)
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    # Files were just listed, so they exist: no extra stat pass.
    return RetrievalDataset(
        FileStorage(paths, convert=ink_high),
        np.asarray(labels, dtype=np.int64),
        names,
        name=NAME,
        split=split,
        skip_corrupt=skip_corrupt,
    )


def _npz_class_names(root: Path, key: str, num_classes: int) -> list[str]:
    """Class names from alphabets.json beside the npz files when present (else row ids)."""
    names = [f"character_row{r:04d}" for r in range(num_classes)]
    meta = root / "alphabets.json"
    if meta.is_file():
        try:
            entries = json.loads(meta.read_text(encoding="utf-8")).get(key, [])
            for e in entries:
                a, b = e["npz_rows"]
                for r in range(a, min(b, num_classes)):
                    names[r] = f"{e['alphabet']}/character{r - a + 1:02d}"
        except (ValueError, KeyError, TypeError):
            pass  # names are cosmetic: keep the row ids
    return names


def _read_npz_split(root: Path, key: str, split: str) -> RetrievalDataset:
    path = root / f"{key}.npz"
    with np.load(path) as z:
        if "images" not in z.files:
            raise DatasetLayoutError(
                f"{path} has no 'images' array (found {z.files}); expected bool "
                "[classes, drawers, H, W] with True = background"
            )
        images = z["images"]
        labels = z["labels"] if "labels" in z.files else None
    if images.ndim != 4 or images.dtype != np.bool_:
        raise DatasetLayoutError(
            f"{path}: 'images' is {images.dtype} {images.shape}, expected bool "
            "[classes, drawers, H, W] (True = background)"
        )
    c, n, h, w = images.shape
    packed = np.packbits(~images, axis=-1).reshape(c * n, h, -1)  # ink bits, 8x smaller
    y = (
        np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels is not None
        else np.repeat(np.arange(c, dtype=np.int64), n)
    )
    uniq, y = np.unique(y, return_inverse=True)
    names = _npz_class_names(root, key, c)
    names = [names[int(u)] if 0 <= int(u) < c else str(int(u)) for u in uniq]
    return RetrievalDataset(
        ArrayStorage(packed, PackedBits(w)), y.astype(np.int64), names, name=NAME, split=split
    )


def load_omniglot(
    root: str | Path | None, *, skip_corrupt: bool = False, source: str = "auto"
) -> DatasetSplits:
    """Omniglot train (images_background) and test (images_evaluation), untransformed.

    ``source``: "png" (the PNG tree), "npz" (the arrays, fully in memory, bit-packed) or
    "auto" (npz when present, else the PNG tree).
    """
    if source not in ("auto", "png", "npz"):
        raise InputError(f"source must be 'auto', 'png' or 'npz', got {source!r}")
    root = require_root(root, NAME, HOW_TO_GET)
    npz = _npz_base(root) if source in ("auto", "npz") else None
    png = _png_base(root) if source in ("auto", "png") and npz is None else None
    if npz is not None:
        train, test = (_read_npz_split(npz, SPLITS[s], s) for s in ("train", "test"))
    elif png is not None:
        train, test = (_read_png_split(png / SPLITS[s], s, skip_corrupt) for s in ("train", "test"))
    else:
        wanted = {
            "auto": EXPECTED,
            "png": EXPECTED.split(", or")[0],
            "npz": EXPECTED.split("or ")[-1],
        }
        raise layout_error(NAME, root, wanted[source], HOW_TO_GET)
    return DatasetSplits(train, test)
