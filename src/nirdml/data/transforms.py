"""Transform presets: the paper's ResNet augmentation and small-image presets.

Every preset accepts a PIL image (files on disk) or a CHW tensor (in-memory arrays and the
pre-resized cache) and runs the same torchvision v2 pipeline on both, so cached and
uncached training see the same augmentation.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from nirdml.data.registry import DEFAULT_IMAGE_SIZE, TRANSFORMS, image_size_problem
from nirdml.errors import InputError, InputTypeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Mean/std of sklearn digits scaled to [0, 1] (all 1,797 images, pixel values / 16).
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)

PRESETS = tuple(TRANSFORMS)
"""The transform presets (the keys of :data:`nirdml.data.registry.TRANSFORMS`)."""


class ToRGB(torch.nn.Module):
    """Any PIL mode (L, 1, P, RGBA, CMYK, I;16...) or a 1/3/4-channel tensor -> 3 channels."""

    def forward(self, img: Any) -> Any:
        if isinstance(img, Image.Image):
            if img.mode == "RGB":
                return img
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                # Composite on white instead of dropping alpha into black backgrounds.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")
            return img.convert("RGB")
        if isinstance(img, torch.Tensor):
            c = img.shape[-3]
            if c == 3:
                return img
            if c == 1:
                return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
            if c == 4:
                return img[..., :3, :, :]
            raise InputError(
                f"cannot convert a {c}-channel image tensor to RGB (expected 1, 3 or 4)"
            )
        raise InputTypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")


class ToGray(torch.nn.Module):
    """Any PIL mode or a 1/3-channel tensor -> one channel (luma)."""

    def forward(self, img: Any) -> Any:
        if isinstance(img, Image.Image):
            return img if img.mode == "L" else ToRGB()(img).convert("L")
        if isinstance(img, torch.Tensor):
            c = img.shape[-3]
            if c == 1:
                return img
            if c in (3, 4):
                return v2.functional.rgb_to_grayscale(img[..., :3, :, :])
            raise InputError(f"cannot convert a {c}-channel image tensor to grayscale")
        raise InputTypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")


def check_image_size(preset: str, image_size: int | None) -> None:
    """Raise InputError unless ``image_size`` suits ``preset`` (only RGB presets take one)."""
    problem = image_size_problem(preset, image_size)
    if problem is not None:
        raise InputError(problem)


def resize_size(image_size: int) -> int:
    """Short side of the test-time resize for a crop of ``image_size`` (256 for 224)."""
    return int(round(image_size * 256 / 224))


def build_transforms(preset: str, train: bool, image_size: int | None = None) -> v2.Compose:
    """The transform of a preset for the train or the test/val split.

    - ``"resnet"``: train RandomResizedCrop(S) + RandomHorizontalFlip, test
      Resize(round(S * 256 / 224)) + CenterCrop(S) with S = ``image_size`` (default 224:
      Resize(256) + CenterCrop(224)); RGB, ImageNet mean/std (the paper's recipe,
      method.md section 5).
    - ``"omniglot"``: 1x28x28 float in [0, 1], ink = high values; train adds a small random
      affine (+-10 degrees, +-10% shift, 0.9-1.1 scale); test none.
    - ``"digits"``: 1x8x8 float, pixel/16 in [0, 1] then normalised by the digits mean/std;
      no augmentation.
    """
    check_image_size(preset, image_size)
    if preset == "resnet":
        size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        head = [ToRGB(), v2.ToImage()]
        if train:
            geo = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            geo = [v2.Resize(resize_size(size), antialias=True), v2.CenterCrop(size)]
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return v2.Compose(head + geo + tail)
    if preset == "omniglot":
        steps = [
            ToGray(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize((28, 28), antialias=True),
        ]
        if train:
            steps.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
        return v2.Compose(steps)
    if preset == "digits":
        return v2.Compose(
            [
                ToGray(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(DIGITS_MEAN, DIGITS_STD),
            ]
        )
    raise InputError(f"unknown transform preset {preset!r}; choose one of {', '.join(PRESETS)}")
