"""Transform presets: shapes, exact normalisation on hand-checked inputs, mode handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from nirdml.data import build_transforms
from nirdml.data.transforms import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD


def palette_image() -> Image.Image:
    img = Image.new("P", (260, 300), 1)
    img.putpalette([0, 0, 0, 1, 2, 3] + [0] * 762)
    return img


def expected_constant(rgb: tuple[int, int, int]) -> torch.Tensor:
    v = [(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    return torch.tensor(v).view(3, 1, 1).expand(3, 224, 224)


@pytest.mark.parametrize(
    ("img", "rgb"),
    [
        (Image.new("RGB", (500, 375), (200, 100, 50)), (200, 100, 50)),
        (Image.new("L", (375, 500), 90), (90, 90, 90)),
        (Image.new("1", (300, 300), 1), (255, 255, 255)),
        (Image.new("RGBA", (400, 300), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (400, 300), (10, 20, 30, 0)), (255, 255, 255)),  # on white
        (palette_image(), (1, 2, 3)),
        (Image.new("CMYK", (300, 260), (0, 0, 0, 0)), (255, 255, 255)),
    ],
)
def test_resnet_test_preset_normalises_any_mode(img: Image.Image, rgb) -> None:
    x = build_transforms("resnet", train=False)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, expected_constant(rgb), atol=1e-5)


def test_resnet_test_geometry_matches_torchvision_reference() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    ref = T.Compose(
        [
            T.Resize(256, antialias=True),
            T.CenterCrop(224),
            T.ConvertImageDtype(torch.float32),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(pil_to_tensor(img))
    ours = build_transforms("resnet", train=False)(img)
    # Same geometry; uint8 resampling may round a pixel by one grey level at most.
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-6
    diff = (ours - ref).abs()
    assert diff.max() <= one_level and diff.mean() < 0.25 * one_level
    # A grey tensor of one channel gives the same as the RGB copy.
    g = torch.from_numpy(rng.integers(0, 256, (1, 300, 280), dtype=np.uint8))
    tf = build_transforms("resnet", train=False)
    assert torch.equal(tf(g), tf(g.expand(3, -1, -1).clone()))


def test_resnet_train_preset_is_random_crop_and_flip() -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    tf = build_transforms("resnet", train=True)
    names = [type(t).__name__ for t in tf.transforms]
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" in names
    crop = tf.transforms[names.index("RandomResizedCrop")]
    assert list(crop.size) == [224, 224] and crop.scale == (0.08, 1.0)
    a, b = tf(img), tf(img)
    assert a.shape == b.shape == (3, 224, 224) and not torch.equal(a, b)


def test_omniglot_preset() -> None:
    img = Image.new("L", (105, 105), 0)
    img.paste(255, (40, 20, 65, 85))  # a white (ink) bar
    test = build_transforms("omniglot", train=False)
    x = test(img)
    assert x.shape == (1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert x[0, 14, 14] == pytest.approx(1.0) and x[0, 2, 2] == 0  # ink stays high
    assert torch.equal(test(img), x)
    # uint8 tensors (npz storage) give the same result as PIL images.
    assert torch.allclose(test(pil_to_tensor(img)), x, atol=1e-6)
    train = build_transforms("omniglot", train=True)
    outs = [train(img) for _ in range(5)]
    assert all(o.shape == (1, 28, 28) for o in outs)
    assert any(not torch.equal(o, x) for o in outs)


def test_digits_preset() -> None:
    raw = torch.arange(64, dtype=torch.float32).view(1, 8, 8) % 17 / 16
    x = build_transforms("digits", train=False)(raw)
    assert x.shape == (1, 8, 8)
    assert torch.allclose(x, (raw - DIGITS_MEAN[0]) / DIGITS_STD[0], atol=1e-6)
    assert torch.equal(build_transforms("digits", train=True)(raw), x)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown transform preset 'vit'.*resnet"):
        build_transforms("vit", train=True)


def test_image_size_sets_the_train_crop_and_the_test_resize_and_crop():
    from PIL import Image

    from nirdml.data.transforms import resize_size

    img = Image.new("RGB", (300, 200), (10, 200, 30))
    for size in (None, 128, 160):
        expected = 224 if size is None else size
        assert build_transforms("resnet", True, size)(img).shape == (3, expected, expected)
        test = build_transforms("resnet", False, size)
        assert test(img).shape == (3, expected, expected)
        assert f"size=[{resize_size(expected)}]" in repr(test)
    assert resize_size(224) == 256 and resize_size(128) == 146
    with pytest.raises(ValueError, match="applies to the RGB 'resnet' transform only"):
        build_transforms("omniglot", False, 64)
    with pytest.raises(ValueError, match="integer >= 16"):
        build_transforms("resnet", False, 4)
