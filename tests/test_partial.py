"""Partial fine-tuning: a backbone cut at a named stage, the stages before the cut run once
into the feature cache, the stages from the cut on trained with the head over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cached_config, colour_photos
from nirdml.errors import ConfigError, InsufficientDiskError

pytest.importorskip("efficientnet_lite_pytorch")

from nirdml.models import build_model, split_backbone  # noqa: E402
from nirdml.models.registry import BACKBONES  # noqa: E402
from nirdml.training.features import (  # noqa: E402
    FeatureCacheMismatch,
    build_feature_cache,
    load_feature_splits,
)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return colour_photos(tmp_path_factory.mktemp("imgs") / "photos", (72, 80), seed=1)


def _cfg(root: Path, features: Path, **over):
    return cached_config(root, features, 64, {"cut": "stage7"}, **over)


@pytest.fixture(scope="module")
def cache_dir(image_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("acts")
    build_feature_cache(_cfg(image_root, out), batch_size=5, progress=False)
    return out


CUTS = [
    ("efficientnet_lite0", "stage6", 3, 64),
    ("efficientnet_lite0", "head", 3, 64),
    ("resnet18", "layer4", 3, 64),
    ("small_cnn", "block3", 1, 28),
    ("timm:resnet18", "layer3", 3, 64),
    ("timm:efficientnet_b0", "blocks.5", 3, 64),
    ("timm:convnext_atto", "stages.3", 3, 64),
]


@pytest.mark.parametrize("arch,cut,channels,size", CUTS)
def test_the_two_parts_of_a_cut_backbone_are_the_backbone(arch, cut, channels, size):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    model = build_model(arch, 8, pretrained=False, in_channels=channels).eval()
    names = [name for name, _ in model.backbone.stages()]
    cuts = BACKBONES[arch].cuts if arch in BACKBONES else None
    if cuts is not None:  # the table lists exactly the stages after the first
        assert tuple(names[1:]) == cuts
    lower, upper = split_backbone(model.backbone, cut, arch)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(upper(lower(x)), model.backbone(x))
    with pytest.raises(ConfigError, match=f"has no stage 'nope' to cut at: use one of {names[1]}"):
        split_backbone(model.backbone, "nope", arch)


def test_partial_run_trains_the_upper_stages_resumes_and_composes(image_root, cache_dir, tmp_path):
    from nirdml.evaluation import compute_embeddings
    from nirdml.export import export_model
    from nirdml.models import FrozenBackboneModel
    from nirdml.training.artifacts import checkpoint_data, evaluate_checkpoint, load_trained
    from nirdml.training.build import build_head_model
    from nirdml.training.checkpoint import load_checkpoint
    from nirdml.training.features import backbone_spec
    from nirdml.training.trainer import train

    cfg = _cfg(image_root, cache_dir)
    cache = build_feature_cache(cfg, progress=False)  # reused
    assert cache.test.shape == (12, 192, 2, 2) and cache.train_views.shape == (2, 12, 192, 2, 2)
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["backbone"]["cut"] == "stage7" and "pooling" not in meta["backbone"]
    assert meta["item_shape"] == [192, 2, 2]

    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part", stop_after_epoch=1)
    train(out_dir=tmp_path / "part", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert {k.split(".")[0] for k in a["model"]} == {"upper", "head"}
    assert full.summary["reference"]["metrics"]  # the untrained reference (epoch 0)

    # The upper stages trained from the pretrained weights; their BatchNorm statistics stayed
    # the pretrained ones (frozen, the paper's recipe), while its affine parameters trained.
    start = build_head_model(cfg, 0, backbone_spec(cfg)).state_dict()
    conv = "upper.stage7.0._project_conv.weight"
    assert not torch.equal(a["model"][conv], start[conv])
    assert torch.equal(a["model"]["upper.stage7.0._bn2.running_mean"],
                       start["upper.stage7.0._bn2.running_mean"])  # fmt: skip
    assert not torch.equal(a["model"]["upper.stage7.0._bn2.weight"],
                           start["upper.stage7.0._bn2.weight"])  # fmt: skip

    # Cached path (upper stages + head on the cached activations) == composed path (the
    # whole network on raw images): float32 cache, so only summation order differs.
    run = load_trained(tmp_path / "full")
    assert isinstance(run.model, FrozenBackboneModel)
    splits = load_feature_splits(cfg)
    cached, _ = compute_embeddings(run.model.head_only(), splits.test, batch_size=5)
    _, raw_test, _ = checkpoint_data(run, "test")
    composed, _ = compute_embeddings(run.model, raw_test, batch_size=7)
    assert (composed - cached).abs().max() < 1e-5
    metrics = evaluate_checkpoint(tmp_path / "full", device="cpu")  # the kept epoch
    kept = full.summary["best"]["metrics"]["test/recall@1"]
    assert metrics["recall@1"] == pytest.approx(kept, abs=1e-9)
    exported = export_model(tmp_path / "full", tmp_path / "m.pt", format="torchscript")
    assert exported.max_abs_diff < 1e-4


def test_batchnorm_above_the_cut_can_train(image_root, cache_dir, tmp_path):
    from nirdml.training.checkpoint import load_checkpoint
    from nirdml.training.trainer import train

    cfg = _cfg(image_root, cache_dir, epochs=1, **{"model.freeze_bn": False})
    train(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run")["model"]
    assert int(state["upper.stage7.0._bn2.num_batches_tracked"]) > 0


def test_a_cache_cut_elsewhere_or_a_bad_cut_is_refused(image_root, cache_dir, tmp_path, capsys):
    from nirdml.cli import main

    with pytest.raises(FeatureCacheMismatch, match=r"backbone.cut: cache 'stage7', config 'head'"):
        build_feature_cache(_cfg(image_root, cache_dir, **{"model.cut": "head"}), progress=False)
    with pytest.raises(FeatureCacheMismatch, match=r"backbone.cut: cache 'stage7', config None"):
        build_feature_cache(_cfg(image_root, cache_dir, **{"model.cut": None}), progress=False)
    with pytest.raises(ConfigError, match=r"no stage 'stage8'.*stage1, stage2.*stage7, head"):
        _cfg(image_root, cache_dir, **{"model.cut": "stage8"})
    with pytest.raises(ConfigError, match="model.cut=stage7 .* needs model.frozen=true"):
        _cfg(image_root, cache_dir, **{"model.frozen": False})
    # Warmup means something with a cut (the upper stages wait), not without one.
    assert _cfg(image_root, cache_dir, epochs=3, **{"optim.warmup_epochs": 1}).optim
    with pytest.raises(ConfigError, match="warmup"):
        _cfg(image_root, cache_dir, epochs=3, **{"optim.warmup_epochs": 1, "model.cut": None})
    out = tmp_path / "never"
    argv = ["train", "digits", "--set", "model.frozen=true", "--set", f"data.features={out}"]
    assert main([*argv, "--set", "model.cut=block9", "--out", str(out)]) == 2
    assert "block2, block3, block4" in capsys.readouterr().err and not out.exists()


def test_too_little_disk_is_refused_before_anything_is_written(
    image_root, tmp_path, monkeypatch, capsys
):
    import shutil

    from nirdml.training import features

    real = shutil.disk_usage
    monkeypatch.setattr(features.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    out = tmp_path / "acts"
    with pytest.raises(InsufficientDiskError, match=r"needs .* more at .* only 10.5 MB is free"):
        build_feature_cache(_cfg(image_root, out), progress=True)
    assert "feature cache" in capsys.readouterr().out  # the size, printed first
    assert not out.exists()
