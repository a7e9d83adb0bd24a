"""Model selection: the tie rule, what validation cannot tell, the untrained reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nirdml.training import selection


def _row(epoch: int, r1: float, mapr: float | None = None) -> dict:
    row = {"epoch": epoch, "val/recall@1": r1, "test/recall@1": 0.5}
    if mapr is not None:
        row["val/map@r"] = mapr
    return row


def test_ties_go_to_the_tie_break_metric_then_the_later_epoch():
    a, b, c = _row(1, 0.9, 0.40), _row(2, 0.9, 0.45), _row(3, 0.9, 0.45)
    ranks = [selection.rank(r, "val", "recall@1") for r in (a, b, c)]
    assert ranks[0] < ranks[1] == ranks[2]  # b beats a on map@r; c ties b entirely
    assert selection.rank(_row(4, float("nan")), "val", "recall@1")[0] == float("-inf")
    # Selecting on map@r itself has no tie-break metric: the later epoch wins ties.
    assert selection.rank(b, "val", "map@r") == (0.45, float("-inf"))
    assert selection.rule("val", "recall@1", a).endswith("val/map@r, then the later epoch")
    assert selection.rule("val", "recall@1", _row(1, 0.9)) == (
        "the highest val/recall@1; ties go to the later epoch"
    )


def test_diagnose_names_few_classes_saturation_and_ties():
    history = [_row(1, 1.0, 0.8), {"epoch": 2}, _row(3, 1.0, 0.9)]
    found = selection.diagnose(history, "val", "recall@1", num_classes=2)
    assert found["tied_epochs"] == [1, 3]
    text = " ".join(found["warnings"])
    assert "only 2 classes" in text and "saturated" in text and "epochs 1, 3 tie" in text
    clean = selection.diagnose([_row(1, 0.5), _row(2, 0.6)], "val", "recall@1", num_classes=9)
    assert clean == {"tied_epochs": [], "warnings": []}


def test_verdict_compares_the_kept_epoch_with_epoch_zero():
    best = {"epoch": 3, "selected_on": "val", "metrics": {"val/recall@1": 0.61}}
    found = selection.verdict(best, {"val/recall@1": 0.57}, "recall@1")
    assert found["beats"] and found["delta"] == pytest.approx(0.04)
    assert found["message"].startswith("training helped: epoch 3 val/recall@1 0.6100 vs 0.5700")
    worse = selection.verdict(best, {"val/recall@1": 0.61}, "recall@1")
    assert not worse["beats"] and worse["message"].startswith("training did NOT help")
    assert selection.verdict(best, {}, "recall@1") is None


def test_a_run_records_the_reference_and_says_when_validation_saturates(tmp_path):
    """digits: 2 validation digits saturate R@1; the rule and the untrained features are in
    the summary, and the summary's kept epoch follows the rule."""
    from nirdml.training.config import load_config
    from nirdml.training.trainer import train

    cfg = load_config("digits", ["epochs=4", "log.progress=false"])
    with pytest.warns(UserWarning):
        result = train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reference"]["metrics"]["val/recall@1"] > 0.5  # epoch 0 is evaluated
    assert set(summary["reference"]["metrics"]) == {
        k for k in result.history[-1] if k.startswith(("val/", "test/"))
    }
    assert summary["selection"]["rule"].startswith("the highest val/recall@1")
    assert any("only 2 classes" in w for w in summary["selection"]["warnings"])
    evaluated = [r for r in result.history if "val/recall@1" in r]
    keys = [selection.rank(r, "val", "recall@1") + (r["epoch"],) for r in evaluated]
    assert summary["best"]["epoch"] == max(keys)[2]
    assert (
        summary["reference"]["verdict"]["reference"]
        == summary["reference"]["metrics"]["val/recall@1"]
    )


def test_last_carve_holds_out_the_last_classes_for_every_seed():
    from nirdml.data import load_dataset

    pool = load_dataset("digits").train.class_names  # the training classes, in order
    for seed in (0, 1):
        splits = load_dataset("digits", val_classes=2, val_carve="last", seed=seed)
        assert splits.val.class_names == pool[-2:] and splits.train.class_names == pool[:-2]
        assert np.array_equal(np.unique(splits.val.labels), [0, 1])
    drawn = {tuple(load_dataset("digits", val_classes=2, seed=s).val.class_names) for s in range(6)}
    assert len(drawn) > 1  # the random carve depends on the seed
    with pytest.raises(ValueError, match="val carve must be one of random, last"):
        load_dataset("digits", val_classes=2, val_carve="first")
