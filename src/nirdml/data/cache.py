"""Pre-resized image cache: decode each image once, serve uint8 pixels from a memory map.

``build_cache(dataset, directory)`` decodes every image of a file-backed split, resizes it
so that its short side is ``short_side`` (256 by default, never upscaling; the same
torchvision resize as the "resnet" test transform, so test-time tensors are identical with
and without the cache) and stores all pixels in one flat uint8 file ``pixels.u8`` (HWC,
1 channel for grayscale sources, else RGB), with ``index.npz`` (offset, height, width,
channels per image) and ``meta.json``. The folder is built under a temporary name and
renamed into place, so a crash never leaves a half-written cache.

``cached(dataset, directory)`` returns the same split (labels, classes, transform) served
from the cache: JPEG decoding no longer bounds the input pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from nirdml.data.base import FileStorage, ImageStorage, RetrievalDataset
from nirdml.errors import InputError, MissingFileError
from nirdml.runtime import usable_workers

CACHE_VERSION = 1


def _fingerprint(paths: list[str]) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def resize_short_side(img: Image.Image, short_side: int) -> np.ndarray:
    """PIL image -> HWC uint8 array, short side resized to ``short_side`` (no upscaling).

    Grayscale sources keep one channel; every other mode becomes RGB.
    """
    from nirdml.data.transforms import ToRGB

    img = img if img.mode == "L" else (img.convert("L") if img.mode == "1" else ToRGB()(img))
    t = F.pil_to_tensor(img)  # uint8 CHW
    h, w = t.shape[-2:]
    if min(h, w) > short_side:
        t = F.resize(t, short_side, antialias=True)  # same op as Resize(256) in "resnet" test
    return t.permute(1, 2, 0).contiguous().numpy()


class _Resizer(Dataset):
    def __init__(self, ds: RetrievalDataset, short_side: int) -> None:
        self.ds, self.short_side = ds, short_side

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        return resize_short_side(self.ds._load(i), self.short_side)


def _as_list(batch: list) -> list:
    return batch


def build_cache(
    dataset: RetrievalDataset,
    directory: str | Path,
    *,
    short_side: int = 256,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Decode, resize and store every image of ``dataset`` in ``directory`` (atomically).

    Unreadable files raise (or, for ``skip_corrupt=True`` datasets, are replaced by another
    image of their class, as in training). An existing cache of the same images is kept
    unless ``overwrite``.
    """
    if not isinstance(dataset.storage, FileStorage):
        raise InputError(
            f"{dataset.name}/{dataset.split} is already held in memory; the cache is for "
            "datasets of image files (it would not make loading faster)"
        )
    directory = Path(directory)
    paths = dataset.paths or []
    if _keep_existing(directory, paths, overwrite):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.build-", dir=directory.parent))
    try:
        offsets, shapes, size = _write_pixels(
            dataset, tmp / "pixels.u8", short_side, num_workers, progress
        )
        np.savez(tmp / "index.npz", offsets=offsets, shapes=shapes)
        meta = {
            "version": CACHE_VERSION,
            "count": len(dataset),
            "short_side": short_side,
            "bytes": size,
            "fingerprint": _fingerprint(paths),
            "source": f"{dataset.name}/{dataset.split}",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _keep_existing(directory: Path, paths: list[str], overwrite: bool) -> bool:
    """Whether an existing cache in ``directory`` is kept (checked to hold these images; it
    raises if stale); with ``overwrite`` it is deleted instead."""
    if not directory.exists():
        return False
    if not overwrite:
        CachedStorage(directory, expect=_fingerprint(paths))  # validates, raises if stale
        return True
    shutil.rmtree(directory)
    return False


def _write_pixels(
    dataset: RetrievalDataset, path: Path, short_side: int, num_workers: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode and resize every image into one flat uint8 file at ``path``; returns each
    image's byte offset and HWC shape, and the bytes written."""
    n = len(dataset)
    offsets = np.zeros(n, dtype=np.int64)
    shapes = np.zeros((n, 3), dtype=np.int32)
    loader = DataLoader(
        _Resizer(dataset, short_side),
        batch_size=32,
        num_workers=usable_workers(num_workers),
        collate_fn=_as_list,
    )
    pos = 0
    i = 0
    with (
        open(path, "wb") as out,
        tqdm(
            total=n,
            desc=f"cache {dataset.name}/{dataset.split}",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        for batch in loader:
            for arr in batch:
                offsets[i] = pos
                shapes[i] = arr.shape
                out.write(arr.tobytes())
                pos += arr.size
                i += 1
            bar.update(len(batch))
    return offsets, shapes, pos


class CachedStorage(ImageStorage):
    """Images served from a cache folder as uint8 CHW tensors (memory-mapped, per process)."""

    def __init__(self, directory: str | Path, expect: str | None = None) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise MissingFileError(
                f"{self.directory} is not an image cache (no meta.json); build it with "
                "nirdml.data.build_cache(dataset, directory)"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("version") != CACHE_VERSION:
            raise InputError(
                f"{self.directory} was built by another cache version "
                f"({self.meta.get('version')}, this is {CACHE_VERSION}); rebuild it with "
                "build_cache(..., overwrite=True)"
            )
        if expect is not None and self.meta["fingerprint"] != expect:
            raise InputError(
                f"{self.directory} caches other images than {self.meta['source']} of this "
                "dataset (the file list differs); rebuild it with build_cache(..., "
                "overwrite=True) or use another folder"
            )
        with np.load(self.directory / "index.npz") as z:
            self.offsets = z["offsets"]
            self.shapes = z["shapes"]
        self._pixels: np.memmap | None = None
        self.source_paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pixels"] = None  # each worker maps the file itself
        return state

    def _map(self) -> np.memmap:
        if self._pixels is None:
            self._pixels = np.memmap(
                self.directory / "pixels.u8", dtype=np.uint8, mode="r", shape=(self.meta["bytes"],)
            )
        return self._pixels

    def load(self, pos: int) -> torch.Tensor:
        h, w, c = (int(v) for v in self.shapes[pos])
        start = int(self.offsets[pos])
        arr = np.array(self._map()[start : start + h * w * c]).reshape(h, w, c)
        return torch.from_numpy(arr).permute(2, 0, 1)

    def path(self, pos: int) -> str | None:
        return None if self.source_paths is None else self.source_paths[pos]

    def paths_for(self, index: np.ndarray) -> list[str] | None:
        return None if self.source_paths is None else [self.source_paths[int(i)] for i in index]


def cached(dataset: RetrievalDataset, directory: str | Path) -> RetrievalDataset:
    """``dataset`` served from the cache in ``directory`` (built by ``build_cache`` from the
    same split): same labels, class names and transform."""
    paths = dataset.paths or []
    storage = CachedStorage(directory, expect=_fingerprint(paths))
    storage.source_paths = paths
    view = dataset.with_transform(dataset.transform)
    view.storage = storage
    view.index = np.arange(len(dataset), dtype=np.int64)
    view._bad = None
    return view
