"""End-to-end training on real data: Omniglot zero-shot with the small CNN and ProxyAnchor.

Digits cannot show learning (raw pixels already give R@1 0.989); Omniglot can: the 659
evaluation characters are never trained on, and raw 28x28 pixels retrieve them poorly.
Skipped when the shared Omniglot npz files are absent. (+ NIR with the authors' defaults
learns more slowly here in a short budget: benchmarks/results/omniglot.md; the + NIR path is
exercised end to end on digits.)
"""

from __future__ import annotations

import json

import pytest
import torch

from nirdml.data import load_dataset
from nirdml.evaluation import evaluate
from nirdml.training.config import load_config
from nirdml.training.trainer import train


def _raw_pixel_recall_at_1(root) -> float:
    """R@1 of the test split's raw (test-transformed) pixels, L2-normalised."""
    test = load_dataset("omniglot", root).test
    pixels = torch.stack([test[i][0].flatten() for i in range(len(test))])
    labels = torch.as_tensor([test[i][1] for i in range(len(test))])
    normalized = torch.nn.functional.normalize(pixels, dim=1)
    return evaluate(normalized, labels, ["recall@1"])["recall@1"]


@pytest.mark.slow
def test_omniglot_run_beats_raw_pixels(omniglot_dir, tmp_path):
    overrides = [
        f"data.root={omniglot_dir}",
        "epochs=2",
        "eval.every=2",  # evaluate once, at the end
        "eval.metrics=[recall@1]",
        "data.val_classes=0",
        "log.progress=false",
    ]
    cfg = load_config("omniglot", overrides)
    result = train(cfg, tmp_path / "run")

    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train/loss"] < rows[0]["train/loss"], "the loss did not fall"
    for name in ("config.yaml", "metrics.csv", "summary.json", "curves.png"):
        assert (result.out_dir / name).is_file(), name
    assert (result.out_dir / "checkpoints" / "best.pt").is_file()

    raw = _raw_pixel_recall_at_1(omniglot_dir)
    trained = result.summary["best"]["metrics"]["test/recall@1"]
    assert 0.2 < raw < 0.45, f"raw-pixel R@1 {raw:.3f}: the test split is not the usual one"
    assert trained > raw + 0.05, f"trained R@1 {trained:.3f} vs raw pixels {raw:.3f}"
    # and above its own untrained network (random conv features: 0.357, above raw pixels)
    untrained = result.summary["reference"]["metrics"]["test/recall@1"]  # epoch 0
    assert trained > untrained + 0.015, f"trained {trained:.3f} vs untrained {untrained:.3f}"
