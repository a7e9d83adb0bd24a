"""Global pooling checked by hand; frozen BatchNorm through training steps and serialisation."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from nirdml.models import (
    EmbeddingModel,
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    build_model,
    build_pooling,
    freeze_batchnorm,
    model_from_spec,
)

# A known 2-channel 2x2 feature map for one image.
FMAP = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [5.0, -2.0]]]])
BY_HAND = {
    "avg": [2.5, 0.5],  # (1+2+3+4)/4, (-1+0+5-2)/4
    "max": [4.0, 5.0],
    "avg+max": [6.5, 5.5],
}


@pytest.mark.parametrize("name", list(BY_HAND))
def test_pooling_values_by_hand(name: str) -> None:
    out = build_pooling(name)(FMAP)
    assert torch.equal(out, torch.tensor([BY_HAND[name]]))
    cl = build_pooling(name)(FMAP.contiguous(memory_format=torch.channels_last))
    assert torch.equal(cl, out)


@pytest.mark.parametrize("name", list(BY_HAND))
def test_embedding_model_pools_then_normalises(name: str) -> None:
    model = EmbeddingModel(nn.Identity(), build_pooling(name), num_features=2, embed_dim=2)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.zero_()
    f = torch.tensor([BY_HAND[name]])
    assert torch.equal(model.features(FMAP), f)
    torch.testing.assert_close(model(FMAP), f / f.norm(), atol=1e-7, rtol=0)


def _random_stats_(module: nn.Module, seed: int = 0) -> None:
    """Give every BN layer non-trivial 'pretrained' statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def _affine(model: nn.Module) -> list[torch.Tensor]:
    return [
        p.detach().clone()
        for m in model.modules()
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))
        for p in (m.weight, m.bias)
    ]


def _train_step(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=g)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.nn.functional.normalize(torch.randn(4, model.embed_dim, generator=g), dim=1)
    loss = (model(x) - target).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _frozen_resnet(freeze_affine: bool) -> EmbeddingModel:
    model = build_model(
        "resnet18", 16, pretrained=False, freeze_bn=True, freeze_bn_affine=freeze_affine
    )
    _random_stats_(model)
    return model


def test_frozen_bn_stats_fixed_affine_trains() -> None:
    model = _frozen_resnet(freeze_affine=False)
    stats, affine = _bn_state(model), _affine(model)
    conv = model.backbone.conv1.weight.detach().clone()
    _train_step(model)
    for k, v in _bn_state(model).items():
        assert torch.equal(v, stats[k]), f"{k} changed in a train-mode step"
    changed = [not torch.equal(a, b) for a, b in zip(_affine(model), affine, strict=True)]
    assert all(changed), "every BN weight/bias should be updated by the optimizer"
    assert not torch.equal(model.backbone.conv1.weight, conv)


def test_freeze_bn_affine_freezes_weight_and_bias_too() -> None:
    model = _frozen_resnet(freeze_affine=True)
    stats, affine = _bn_state(model), _affine(model)
    conv = model.backbone.conv1.weight.detach().clone()
    # Even if someone re-enables gradients, the frozen affine parameters get none.
    for p in model.parameters():
        p.requires_grad_(True)
    _train_step(model)
    for k, v in _bn_state(model).items():
        assert torch.equal(v, stats[k]), k
    for a, b in zip(_affine(model), affine, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(model.backbone.conv1.weight, conv)


def test_unfrozen_bn_control_updates_statistics() -> None:
    model = build_model("resnet18", 16, pretrained=False, freeze_bn=False)
    _random_stats_(model)
    stats = _bn_state(model)
    _train_step(model)
    assert all(not torch.equal(v, stats[k]) for k, v in _bn_state(model).items())


def test_frozen_bn_equals_eval_mode_batchnorm_in_train_mode() -> None:
    bn = nn.BatchNorm2d(5, eps=1e-3)
    _random_stats_(bn, seed=1)
    bn.eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn).train()
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-6, rtol=1e-6)
    assert frozen.eps == 1e-3 and isinstance(frozen.weight, nn.Parameter)


def test_frozen_timm_batchnorm_act_keeps_its_activation() -> None:
    from timm.layers import BatchNormAct2d

    bna = BatchNormAct2d(4, act_layer=nn.ReLU)
    _random_stats_(bna, seed=3)
    block = nn.Sequential(nn.Conv2d(2, 4, 1), bna)
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    block.eval()
    ref = block(x)
    freeze_batchnorm(block)
    assert isinstance(block[1], FrozenBatchNormAct2d)
    block.train()
    out = block(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert (out >= 0).all()


def test_unknown_batchnorm_subclass_is_refused() -> None:
    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match="freeze_bn=False"):
        freeze_batchnorm(nn.Sequential(MyBN(3)))


def test_sync_batchnorm_conversion_leaves_frozen_bn_alone() -> None:
    model = _frozen_resnet(freeze_affine=False)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())


def _roundtrips(model: EmbeddingModel):
    yield "deepcopy", copy.deepcopy(model)
    yield "pickle", pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    yield "state_dict", model_from_spec(model.spec, torch.load(buf, weights_only=True))


@pytest.mark.parametrize("freeze_affine", [False, True])
def test_frozen_bn_survives_serialisation_and_train(freeze_affine: bool) -> None:
    model = _frozen_resnet(freeze_affine)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        ref = model(x)
    for how, clone in _roundtrips(model):
        frozen = [m for m in clone.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert len(frozen) == 20, how
        assert all(m.freeze_affine is freeze_affine for m in frozen), how
        assert all(m.weight.requires_grad is not freeze_affine for m in frozen), how
        stats = _bn_state(clone)
        clone.train()
        with torch.no_grad():
            out = clone(x)  # train mode: same output as eval, statistics untouched
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0, msg=how)
        for k, v in _bn_state(clone).items():
            assert torch.equal(v, stats[k]), (how, k)
