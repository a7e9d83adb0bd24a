"""timm backbones by name: feature layouts (NCHW, NHWC, tokens), input re-map, frozen BN."""

from __future__ import annotations

import copy

import pytest
import torch

from nirdml.models import FrozenBatchNormAct2d, build_model
from nirdml.models.backbones import IMAGENET_MEAN, IMAGENET_STD

timm = pytest.importorskip("timm")


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_vit_tokens_are_avg_pooled_without_class_token_after_input_remap() -> None:
    model = build_model("timm:test_vit", 32, pretrained=False).eval()
    net = model.backbone.net
    assert tuple(net.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    x = _x(160)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x_timm = (x * std + mean - 0.5) / 0.5  # what this model was trained on
    with torch.no_grad():
        tokens = net.forward_features(x_timm)
        expected = tokens[:, net.num_prefix_tokens :].mean(dim=1)
        torch.testing.assert_close(model.features(x), expected, atol=1e-5, rtol=1e-5)
    assert model(x).shape == (2, 32)


def test_nhwc_feature_maps_are_permuted() -> None:
    model = build_model("timm:test_mambaout", 8, pooling="max", pretrained=False).eval()
    assert model.backbone.nhwc_output
    x = _x(64)
    with torch.no_grad():
        fmap = model.backbone.net.forward_features(x)  # (B, H, W, C)
        torch.testing.assert_close(model.features(x), fmap.amax(dim=(1, 2)), atol=0, rtol=0)


def test_timm_batchnorm_act_layers_are_frozen() -> None:
    model = build_model("timm:test_efficientnet", 8, pretrained=False, freeze_bn=True)
    assert sum(isinstance(m, FrozenBatchNormAct2d) for m in model.modules()) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    reference = build_model("timm:test_efficientnet", 8, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial "pretrained" statistics
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    model.load_state_dict(reference.state_dict())
    frozen_train = copy.deepcopy(model).train()
    x = _x(64)
    with torch.no_grad():
        torch.testing.assert_close(frozen_train(x), reference(x), atol=1e-5, rtol=1e-5)
