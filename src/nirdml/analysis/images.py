"""Images for display: dataset items un-normalised, or the original files when they exist.

The retrieval grids show what was retrieved. When a dataset's items live on disk the file
itself is shown (whole image, aspect kept). In-memory datasets (digits, Omniglot npz) have
no files: their items are taken through the dataset's own (test) transform, which is what
the model saw, and the transform's ``Normalize`` step is inverted so pixel values are back
in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nirdml.errors import InputError

ImageSource = Callable[[int], np.ndarray | None]
"""``index -> HxWx3 uint8 RGB image`` (None when the item has no image to show)."""


def find_normalize(transform: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` of the last Normalize step inside ``transform`` (Compose nested), or
    None when the transform does not normalise."""
    from torchvision.transforms import Normalize, v2

    found = None
    stack = [transform]
    while stack:
        t = stack.pop(0)
        if isinstance(t, (v2.Normalize, Normalize)):
            found = (np.asarray(t.mean, dtype=np.float32), np.asarray(t.std, dtype=np.float32))
        inner = getattr(t, "transforms", None)
        if isinstance(inner, (list, tuple)):
            stack = list(inner) + stack
    return found


def tensor_to_rgb(x: torch.Tensor, normalize: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """A CHW (or HW) image tensor -> HxWx3 uint8, undoing ``normalize`` first.

    Float tensors are read as [0, 1] after un-normalising (values outside are clipped);
    uint8 tensors as 0..255. One channel is repeated to grey RGB.
    """
    a = x.detach().cpu()
    if a.dim() == 2:
        a = a.unsqueeze(0)
    if a.dim() != 3:
        raise InputError(f"expected a CHW image tensor, got shape {tuple(a.shape)}")
    if a.dtype == torch.uint8:
        arr = a.numpy().astype(np.float32) / 255.0
    else:
        arr = a.float().numpy()
        if normalize is not None:
            mean, std = normalize
            c = arr.shape[0]
            if len(mean) not in (1, c):
                raise InputError(
                    f"the transform normalises {len(mean)} channels but the image has {c}"
                )
            arr = arr * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)
    arr = np.clip(arr, 0.0, 1.0)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif arr.shape[0] == 4:
        arr = arr[:3]
    elif arr.shape[0] != 3:
        raise InputError(f"cannot display a {arr.shape[0]}-channel image")
    return (arr.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def open_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (alpha composited on white)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        return np.asarray(img.convert("RGB"))


def dataset_images(dataset: Any) -> ImageSource:
    """Display images of a dataset's items: its files when it has paths, else its items
    through its transform, un-normalised."""
    paths = getattr(dataset, "paths", None)
    if paths:
        return path_images(paths)
    normalize = find_normalize(getattr(dataset, "transform", None))

    def get(i: int) -> np.ndarray:
        return tensor_to_rgb(torch.as_tensor(dataset[int(i)][0]), normalize)

    return get


def path_images(paths: Sequence[str]) -> ImageSource:
    """Display images read from files (None for a file that cannot be read)."""
    paths = list(paths)

    def get(i: int) -> np.ndarray | None:
        try:
            return open_rgb(paths[int(i)])
        except (OSError, ValueError):
            return None

    return get
