"""build_model: shapes, unit norm, spec round trip, RNG hygiene, channels_last, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nirdml.models import (
    EmbeddingModel,
    FrozenBatchNorm2d,
    build_model,
    model_from_spec,
)

# (arch, in_channels, input size): small inputs keep the suite fast on 2 CPU cores.
# Each pooling is checked by hand in test_models_bn_pooling.py; here every arch runs once.
ARCH_CASES = [
    ("resnet18", 3, 32, "avg"),
    ("resnet50", 3, 32, "avg+max"),
    ("efficientnet_lite0", 3, 64, "max"),
    ("small_cnn", 1, 28, "avg+max"),
    ("small_cnn", 1, 8, "avg"),
    ("timm:resnet18", 3, 32, "max"),
]
FEATURES = {"resnet18": 512, "resnet50": 2048, "efficientnet_lite0": 1280, "small_cnn": 256}


def _input(in_channels: int, size: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, size, size, generator=g)


@pytest.mark.parametrize("arch,in_channels,size,pooling", ARCH_CASES)
def test_shapes_and_unit_norm(arch: str, in_channels: int, size: int, pooling: str) -> None:
    model = build_model(arch, 48, pooling=pooling, pretrained=False, in_channels=in_channels)
    assert isinstance(model, EmbeddingModel)
    x = _input(in_channels, size)
    model.eval()
    with torch.no_grad():
        f = model.features(x)
        z = model(x)
    expected_f = FEATURES.get(arch, 512)
    assert f.shape == (3, expected_f) == (3, model.num_features)
    assert z.shape == (3, 48) and model.embed_dim == 48
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(z, model.embed(f), atol=0, rtol=0)
    assert model.spec["arch"] == arch and model.spec["pooling"] == pooling


def test_small_cnn_maps_for_omniglot_and_digits() -> None:
    model = build_model("small_cnn", 16, in_channels=1)
    assert model.backbone(_input(1, 28)).shape == (3, 256, 2, 2)
    assert model.backbone(_input(1, 8)).shape == (3, 256, 1, 1)
    assert model.backbone(_input(1, 5)).shape == (3, 256, 1, 1)


def test_defaults_follow_pretraining() -> None:
    cnn = build_model("small_cnn", 16, in_channels=1)
    assert cnn.spec["pretrained"] is False and cnn.spec["freeze_bn"] is False
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in cnn.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())
    r = build_model("resnet18", 16, pretrained=False)
    assert r.spec["freeze_bn"] is False  # random init: statistics must be learned
    eff = build_model("efficientnet_lite0", 16)  # pretrained (offline wheel) -> frozen
    assert eff.spec["pretrained"] is True and eff.spec["freeze_bn"] is True
    assert not any(isinstance(m, nn.BatchNorm2d) for m in eff.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in eff.modules()) == 49


def test_forward_is_embed_of_features_and_warmup_split() -> None:
    model = build_model("resnet18", 32, pretrained=False, freeze_bn=True)
    model.train()
    x = _input(3, 32)
    with torch.no_grad():  # the trainer's warmup: backbone without autograd
        f = model.features(x)
    z = model.embed(f)
    z.sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    torch.testing.assert_close(model(x), z, atol=1e-6, rtol=0)


def test_parameter_groups_partition_the_trainable_parameters() -> None:
    model = build_model("resnet18", 32, pretrained=False, freeze_bn=True, freeze_bn_affine=True)
    bb, head = model.backbone_parameters(), model.head_parameters()
    assert len(head) == 2
    ids = {id(p) for p in bb} | {id(p) for p in head}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    bn_affine = {id(m.weight) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert len(bn_affine) == 20 and not bn_affine & ids


def test_global_rng_untouched_and_seeded_init() -> None:
    before = torch.get_rng_state()
    a = build_model("small_cnn", 16, in_channels=1, seed=3)
    assert torch.equal(before, torch.get_rng_state())
    b = build_model("small_cnn", 16, in_channels=1, seed=3)
    c = build_model("small_cnn", 16, in_channels=1, seed=4)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize(
    "arch,in_channels,size",
    [("resnet18", 3, 32), ("efficientnet_lite0", 3, 40), ("small_cnn", 1, 28)],
)
def test_channels_last_matches_contiguous(arch: str, in_channels: int, size: int) -> None:
    model = build_model(arch, 32, pretrained=arch == "efficientnet_lite0", in_channels=in_channels)
    model.eval()
    x = _input(in_channels, size)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_spec_rebuilds_the_same_model() -> None:
    model = build_model("resnet18", 24, pooling="avg+max", pretrained=False, freeze_bn=True, seed=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    rebuilt = model_from_spec(model.spec, model.state_dict())
    assert rebuilt.spec == model.spec
    x = _input(3, 32)
    model.train()
    rebuilt.train()
    torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)
    # The spec is plain data (it goes into checkpoints and YAML/JSON logs).
    assert copy.deepcopy(model.spec) == model.spec
    assert all(isinstance(v, (str, int, bool, type(None))) for v in model.spec.values())


def test_resnet_versions_are_selectable() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        build_model("resnet50", 8, pretrained="IMAGENET1K_V3")
    with pytest.raises(ValueError, match="torchvision"):
        build_model("efficientnet_lite0", 8, pretrained="IMAGENET1K_V2")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(arch="resnet34", embed_dim=8), ValueError, "Unknown arch"),
        (dict(arch="timm:", embed_dim=8), ValueError, "Unknown arch"),
        (dict(arch="resnet18", embed_dim=0), ValueError, "embed_dim"),
        (dict(arch="resnet18", embed_dim=8, pooling="gem"), ValueError, "avg\\+max"),
        (dict(arch="small_cnn", embed_dim=8, pretrained=True), ValueError, "pretrained=False"),
        (
            dict(arch="resnet18", embed_dim=8, pretrained=False, freeze_bn_affine=True),
            ValueError,
            "freeze_bn=True",
        ),
        (dict(arch="resnet18", embed_dim=8, in_channels=1), ValueError, "RGB"),
        (
            dict(arch="efficientnet_lite0", embed_dim=8, pretrained=False, in_channels=1),
            ValueError,
            "RGB",
        ),
        (dict(arch="timm:no_such_net", embed_dim=8, pretrained=False), ValueError, "list_models"),
        (dict(arch="resnet18", embed_dim=8, weights="/no/w.pth"), FileNotFoundError, "exist"),
    ],
)
def test_bad_input_names_problem_and_fix(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        build_model(**kwargs)


def test_model_from_spec_rejects_non_spec() -> None:
    with pytest.raises(ValueError, match="model.spec"):
        model_from_spec({"arch": "resnet18", "lr": 1e-5, "embed_dim": 8})


def test_random_init_resnet_accepts_grey_input() -> None:
    model = build_model("resnet18", 8, pretrained=False, in_channels=1)
    assert model(_input(1, 32)).shape == (3, 8)


def test_mixed_precision_embeddings_are_float32_unit_vectors() -> None:
    model = build_model("small_cnn", 16, in_channels=1).eval()
    x = _input(1, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
