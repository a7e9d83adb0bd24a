"""Shared test fixtures: thread limits and the optional shared real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: the tests' tensors are small, and on a busy machine (CI shares its 2
# cores) threads spinning for a core another job holds made small CNN steps 3.6x slower and
# tiny per-image ops up to 25x slower than one thread.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The read-only real-data folder (``../shared/data`` beside the checkout), if present.

    ``NIRDML_SHARED_DATA`` overrides the location.
    """
    env = os.environ.get("NIRDML_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared real-data folder ../shared/data is absent (set NIRDML_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def omniglot_dir(shared_data: Path) -> Path:
    d = shared_data / "omniglot"
    if not (d / "images_background.npz").is_file():
        pytest.skip(f"Omniglot npz files not found in {d}")
    return d


@pytest.fixture(scope="session")
def omniglot_small(omniglot_dir: Path, tmp_path_factory) -> Path:
    """Omniglot with fewer characters (the first 300 of the 964 background and 100 of the
    659 evaluation ones, all 20 drawings each) in the npz layout: real data for end-to-end
    tests at a third of the cost of an epoch (50 batches of 120) and a sixth of an
    evaluation."""
    import numpy as np

    out = tmp_path_factory.mktemp("omniglot_small")
    for name, classes in (("images_background", 300), ("images_evaluation", 100)):
        with np.load(omniglot_dir / f"{name}.npz") as z:
            np.savez(
                out / f"{name}.npz", images=z["images"][:classes], labels=z["labels"][:classes]
            )
    return out


def colour_photos(root: Path, size: tuple[int, int], seed: int) -> Path:
    """6 classes x 4 small colour JPEGs of ``size`` (H, W) in class folders under ``root``
    (a folder dataset: 3 classes train, 3 test)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(6):
        (root / f"c{c}").mkdir(parents=True)
        base = rng.integers(0, 255, 3)
        for i in range(4):
            a = np.clip(base + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.jpg")
    return root


def cached_config(root: Path, features: Path, image_size: int, model: dict, **over):
    """A tiny cached-feature run on ``colour_photos``: EfficientNet-Lite0 (``model`` adds to
    the model section), 2 views, float32 cache; ``over`` sets dotted keys."""
    from nirdml.training.config import load_config

    raw = {
        "name": "tiny-cached",
        "epochs": 2,
        "data": {
            "name": "folder",
            "root": str(root),
            "image_size": image_size,
            "features": str(features),
            "feature_views": 2,
            "feature_dtype": "float32",
            "batch_size": 6,
            "samples_per_class": 2,
        },
        "model": {"arch": "efficientnet_lite0", "embed_dim": 16, "frozen": True, **model},
        "optim": {"lr": 1e-3, "proxy_lr_mult": 10.0},
        "log": {"progress": False},
    }
    for key, value in over.items():
        node = raw
        *parts, last = key.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[last] = value
    return load_config(raw)
