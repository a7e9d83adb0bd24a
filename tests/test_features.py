"""Frozen-backbone feature cache, heads on cached features, composition with the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cached_config, colour_photos
from nirdml.training.config import ConfigError, load_config

pytest.importorskip("efficientnet_lite_pytorch")

from nirdml.training.features import (  # noqa: E402
    PARTIAL,
    FeatureCacheMismatch,
    build_feature_cache,
    load_feature_splits,
)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return colour_photos(tmp_path_factory.mktemp("imgs") / "photos", (40, 48), seed=0)


def _cfg(root: Path, features: Path, **over):
    return cached_config(root, features, 32, {}, **over)


def _arrays(cache) -> dict[str, np.ndarray]:
    return {k: np.array(getattr(cache, k)) for k in ("test", "train_plain", "train_views")}


@pytest.fixture(scope="module")
def cache_dir(image_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("feats")
    build_feature_cache(_cfg(image_root, out), batch_size=5, progress=False)
    return out


def test_cache_layout_views_and_reuse(image_root, cache_dir):
    cfg = _cfg(image_root, cache_dir)
    cache = build_feature_cache(cfg, batch_size=5, progress=False)  # reused, not rebuilt
    assert cache.train_views.shape == (2, 12, 1280)
    assert cache.train_plain.shape == (12, 1280) and cache.test.shape == (12, 1280)
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["backbone"]["weights_identity"]["sha256"]
    assert (
        meta["transform"]["image_size"] == 32 and "RandomResizedCrop" in meta["transform"]["train"]
    )
    assert meta["dataset"]["train"]["items"] == 12 and meta["views"] == 2
    assert not (cache_dir / PARTIAL).exists()
    views = np.array(cache.train_views)
    # Two augmented views of an image differ from each other and from the test-transform view.
    assert not np.allclose(views[0], views[1])
    assert not np.allclose(views[0], cache.train_plain)


def test_killed_extraction_resumes_to_the_same_bytes(image_root, cache_dir, tmp_path):
    """Interrupted after 3 batches (a hook raises), resumed: identical to an uninterrupted run."""
    out = tmp_path / "feats"
    cfg = _cfg(image_root, out)

    def kill(done: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    state = torch.random.get_rng_state()
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(cfg, batch_size=5, progress=False, on_batch=kill)
    assert not (out / "meta.json").exists()
    assert json.loads((out / PARTIAL / "progress.json").read_text()) == {"batches": 3}
    resumed = build_feature_cache(cfg, batch_size=5, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    reference = build_feature_cache(cfg, cache_dir, batch_size=5, progress=False)
    for name, array in _arrays(reference).items():
        assert np.array_equal(_arrays(resumed)[name], array), name


def test_mismatched_cache_is_refused_naming_what_differs(image_root, cache_dir, tmp_path):
    with pytest.raises(FeatureCacheMismatch, match=r"transform.image_size: cache 32, config 48"):
        build_feature_cache(_cfg(image_root, cache_dir, **{"data.image_size": 48}), progress=False)
    with pytest.raises(FeatureCacheMismatch, match=r"views: cache 2, config 3"):
        build_feature_cache(_cfg(image_root, cache_dir, **{"data.feature_views": 3}))
    with pytest.raises(FeatureCacheMismatch, match=r"dtype: cache 'float32', config 'float16'"):
        build_feature_cache(_cfg(image_root, cache_dir, **{"data.feature_dtype": "float16"}))
    with pytest.raises(FeatureCacheMismatch, match=r"backbone.pooling"):
        build_feature_cache(_cfg(image_root, cache_dir, **{"model.pooling": "max"}))
    # The same file list with one file changed (size) is another dataset.
    changed = tmp_path / "imgs"
    import shutil

    shutil.copytree(image_root, changed)
    img = Image.open(changed / "c0" / "0.jpg")
    img.save(changed / "c0" / "0.jpg", quality=30)
    with pytest.raises(FeatureCacheMismatch, match=r"dataset.train.sha256"):
        build_feature_cache(_cfg(changed, cache_dir), progress=False)
    # The dataset root itself may move (paths are recorded relative to it).
    build_feature_cache(_cfg(image_root, cache_dir), progress=False)


def test_view_draw_is_seeded_by_seed_and_epoch(image_root, cache_dir):
    cfg = _cfg(image_root, cache_dir, seed=3)
    splits = load_feature_splits(cfg)
    train = splits.train
    assert train.num_views == 2 and len(train) == 12
    state = torch.random.get_rng_state()
    draws = []
    for epoch in range(4):
        train.set_epoch(epoch)
        expected = np.random.default_rng([3, epoch]).integers(0, 2, size=12)
        assert np.array_equal(train.views_of_epoch(epoch), expected)
        for i in range(len(train)):
            x, y = train[i]
            row = train.rows[i]
            assert torch.equal(x, torch.from_numpy(np.array(train.array[expected[row], row])))
            assert y == train.labels[i]
        draws.append(expected)
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_validation_is_carved_from_cached_training_classes(image_root, cache_dir):
    cfg = _cfg(image_root, cache_dir, **{"data.val_classes": 1})
    splits = load_feature_splits(cfg)
    from nirdml.data import load_dataset

    images = load_dataset("folder", image_root, val_classes=1, seed=cfg.seed, image_size=32)
    assert splits.val is not None and len(splits.val) == len(images.val) == 4
    assert splits.train.num_classes == 2 and splits.val.num_classes == 1
    pool = load_dataset("folder", image_root).train
    paths = pool.paths
    for feats, imgs in ((splits.train, images.train), (splits.val, images.val)):
        assert [paths[r] for r in feats.rows] == imgs.paths
        assert np.array_equal(feats.labels, imgs.labels)


def test_training_is_bit_reproducible_and_composes_with_the_backbone(
    image_root, cache_dir, tmp_path
):
    from nirdml.evaluation import compute_embeddings
    from nirdml.models import FrozenBackboneModel
    from nirdml.training.artifacts import embed_folder, evaluate_checkpoint, load_trained
    from nirdml.training.checkpoint import load_checkpoint
    from nirdml.training.trainer import train

    cfg = _cfg(image_root, cache_dir)
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    sa, sb = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in "ab")
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    assert a.history == b.history or all(
        {k: v for k, v in ra.items() if "time" not in k and "per_s" not in k}
        == {k: v for k, v in rb.items() if "time" not in k and "per_s" not in k}
        for ra, rb in zip(a.history, b.history, strict=True)
    )
    assert set(sa["model"]) == {"head.layers.0.weight", "head.layers.0.bias"}

    run = load_trained(tmp_path / "a" / "checkpoints" / "last.pt")
    assert isinstance(run.model, FrozenBackboneModel)
    splits = load_feature_splits(cfg)
    cached, _ = compute_embeddings(
        load_trained_head(sa, splits.train.num_features, cfg), splits.test
    )
    from nirdml.training.artifacts import checkpoint_data

    _, raw_test, _ = checkpoint_data(run, "test")
    composed, _ = compute_embeddings(run.model, raw_test, batch_size=7)
    assert (composed - cached).abs().max() < 1e-5
    # `nirdml embed` on raw images of a test class folder reproduces the same vectors.
    out = embed_folder(tmp_path / "a", image_root / "c3", tmp_path / "e.npz", device="cpu")
    emb = np.load(out)["embeddings"]
    assert np.abs(emb - cached[:4].numpy()).max() < 1e-5
    metrics = evaluate_checkpoint(tmp_path / "a", device="cpu")
    final = a.history[-1]
    assert metrics["recall@1"] == pytest.approx(final["test/recall@1"], abs=1e-9)


def load_trained_head(state, num_features, cfg):
    from nirdml.training.build import build_head_model

    model = build_head_model(cfg, num_features, state["model_spec"]["backbone"])
    model.load_state_dict(state["model"])
    return model.eval()


def test_mlp_head_with_nir_trains_and_resumes(image_root, cache_dir, tmp_path):
    from nirdml.training.checkpoint import load_checkpoint
    from nirdml.training.trainer import train

    over = {
        "model.head": "mlp",
        "model.head_hidden": [32],
        "model.head_norm": "layer",
        "model.head_dropout": 0.1,
        "loss.nir.enabled": True,
        "loss.nir.flow.num_blocks": 2,
        "loss.nir.flow.hidden_layers": 2,
        "loss.nir.flow.hidden_width": 16,
        "epochs": 3,
    }
    cfg = _cfg(image_root, cache_dir, **over)
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part", stop_after_epoch=1)
    resumed = train(out_dir=tmp_path / "part", resume=True, progress=False)
    assert "train/nll" in full.history[-1]
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    for key, value in a["model"].items():
        if key.endswith("_extra_state"):  # the seeded dropout's call counter
            assert value == b["model"][key] and value["calls"] == 3 * 2
        else:
            assert torch.equal(value, b["model"][key]), key
    assert resumed.summary["best"]["epoch"] == full.summary["best"]["epoch"]


def test_config_validation_explains_frozen_options(image_root, tmp_path):
    with pytest.raises(ConfigError, match="warmup.*backbone is frozen for every epoch"):
        _cfg(image_root, tmp_path, **{"optim.warmup_epochs": 1, "epochs": 3})
    # Without data.features the cache folder is named after the data, backbone, size, cut.
    derived = _cfg(image_root, tmp_path, **{"data.features": None}).data.features
    assert derived == f"features/{image_root.name}-efficientnet_lite0-32px-pooled"
    with pytest.raises(ConfigError, match="model.head='mlp' needs model.frozen=true"):
        _cfg(image_root, tmp_path, **{"model.frozen": False, "model.head": "mlp"})
    with pytest.raises(ConfigError, match="model.head must be linear or mlp"):
        _cfg(image_root, tmp_path, **{"model.head": "deep"})
    with pytest.raises(ConfigError, match="data.feature_dtype"):
        _cfg(image_root, tmp_path, **{"data.feature_dtype": "int8"})
    with pytest.raises(ConfigError, match="no feature cache folder"):
        build_feature_cache(load_config("digits"))


def test_cli_features_then_train(image_root, tmp_path, capsys):
    import yaml

    from nirdml.cli import main

    cfg = _cfg(image_root, tmp_path / "unused", epochs=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["features", str(path), "--out", str(tmp_path / "f"), "--quiet"]) == 0
    assert "Train on it: nirdml train" in capsys.readouterr().out
    code = main(
        ["train", str(path), "--set", f"data.features={tmp_path / 'f'}", "--out",
         str(tmp_path / "run"), "--quiet"]
    )  # fmt: skip
    assert code == 0 and (tmp_path / "run" / "summary.json").is_file()
    code = main(
        ["features", str(path), "--set", "data.image_size=40", "--out", str(tmp_path / "f")]
    )
    assert code == 2 and "transform.image_size: cache 32, config 40" in capsys.readouterr().err


def test_real_cars98_splits(shared_data):
    root = shared_data / "cars98"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"cars98 not found in {shared_data}")
    from nirdml.data import load_dataset

    splits = load_dataset("cars98", root, val_classes=9, seed=0, image_size=128)
    assert (splits.train.num_classes, splits.val.num_classes, splits.test.num_classes) == (
        40,
        9,
        49,
    )
    assert len(splits.train) + len(splits.val) == 1995 and len(splits.test) == 2057
    x, _ = splits.test[0]
    assert x.shape == (3, 128, 128)
    assert splits.test.class_names[0] == "Buick Enclave SUV 2012"  # official id 50


def test_orl_reader_on_a_synthetic_file(tmp_path):
    from nirdml.data import load_dataset
    from nirdml.data.errors import DatasetLayoutError

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 10, 28, 24), dtype=np.uint8)
    labels = np.repeat(np.arange(6)[:, None], 10, axis=1)
    np.savez(tmp_path / "orl_faces.npz", images=images, labels=labels)
    splits = load_dataset("orl", tmp_path, train_classes=[1, 4], val_classes=2, seed=0)
    assert (splits.train.num_classes, splits.val.num_classes, splits.test.num_classes) == (2, 2, 2)
    assert splits.test.class_names == ["s5", "s6"] and len(splits.test) == 20
    raw = load_dataset("orl", tmp_path, transform_preset="none", train_classes=[1, 4])
    img, label = raw.test[0]
    assert img.mode == "RGB" and img.size == (24, 28) and label == 0
    assert np.array_equal(np.asarray(img)[..., 0], images[4, 0])
    with pytest.raises(DatasetLayoutError, match="orl_faces.npz"):
        load_dataset("orl", tmp_path / "nowhere")


def test_real_orl_splits(shared_data):
    root = shared_data / "orl_faces"
    if not (root / "orl_faces.npz").is_file():
        pytest.skip(f"orl_faces not found in {shared_data}")
    from nirdml.data import load_dataset

    cfg = load_config("orl-frozen-proxyanchor-baseline")
    splits = load_dataset("orl", root, val_classes=cfg.data.val_classes, seed=0, image_size=128)
    assert (splits.train.num_classes, splits.val.num_classes, splits.test.num_classes) == (
        16,
        4,
        20,
    )
    assert len(splits.train) == 160 and len(splits.test) == 200
    assert splits.test[0][0].shape == (3, 128, 128) and splits.test.class_names[0] == "s21"


def test_analyze_and_search_run_on_a_frozen_nir_run(image_root, cache_dir, tmp_path):
    from nirdml.analysis import analyze, search
    from nirdml.training.artifacts import load_trained
    from nirdml.training.trainer import train

    over = {
        "loss.nir.enabled": True,
        "loss.nir.flow.num_blocks": 2,
        "loss.nir.flow.hidden_layers": 2,
        "loss.nir.flow.hidden_width": 16,
        "epochs": 1,
    }
    train(_cfg(image_root, cache_dir, **over), tmp_path / "run")
    report = analyze(
        tmp_path / "run", tmp_path / "report", k=3, num_queries=2, map_method="pca",
        flow_classes=[0], device="cpu",
    )  # fmt: skip
    assert report.html.is_file() and "recall@1" in report.numbers["metrics"]
    query = image_root / "c4" / "0.jpg"
    result = search(
        tmp_path / "run", image_root, query, k=3, cache_dir=tmp_path / "s", device="cpu"
    )
    assert len(result.hits[0]) == 3
    # The hit similarities are those of the composed model's embeddings.
    run = load_trained(tmp_path / "run" / "checkpoints" / "last.pt")
    from nirdml.analysis.search import _preprocess

    _, transform = _preprocess(run)
    with torch.inference_mode():
        q = run.model(transform(Image.open(query).convert("RGB"))[None])
        g = run.model(transform(Image.open(result.hits[0][0].path).convert("RGB"))[None])
    assert float((q * g).sum()) == pytest.approx(result.hits[0][0].similarity, abs=1e-5)
