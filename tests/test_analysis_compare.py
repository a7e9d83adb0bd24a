"""compare_runs: grouping over seeds, selected epochs, mean +- std, curves and files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from nirdml.analysis import compare_runs
from nirdml.analysis.compare import group_runs, read_run
from nirdml.cli import main
from nirdml.training.config import load_config


def _run(folder, preset, seed, r1, overrides=(), val=None, map_r=None):
    """A run folder as `nirdml train` leaves it: config.yaml + metrics.jsonl (hand-made)."""
    cfg = load_config(preset, [f"seed={seed}", *overrides])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    rows = []
    for e, v in enumerate(r1, start=1):
        row = {"epoch": e, "train/loss": 1.0 / e}
        if v is not None:
            row["test/recall@1"] = v
            row["test/map@r"] = (map_r or {}).get(e, v / 2)
            if val is not None:
                row["val/recall@1"] = val[e - 1]
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_groups_over_seeds_and_reports_mean_and_sample_std(tmp_path):
    runs = [
        _run(tmp_path / "b0", "digits", 0, [0.50, 0.60, None, 0.55]),
        _run(tmp_path / "b1", "digits", 1, [0.52, 0.58, None, 0.64]),
        _run(tmp_path / "n0", "digits-nir", 0, [0.61, 0.70, None, 0.70]),  # tie: as training
        _run(tmp_path / "n1", "digits-nir", 1, [0.65, 0.66, None, 0.69]),
        _run(tmp_path / "n2", "digits-nir", 2, [0.63, 0.72, None, 0.71]),
    ]
    result = compare_runs(runs, tmp_path / "out")
    labels = [g.label for g in result.groups]
    assert labels == ["digits-proxyanchor", "digits-proxyanchor-nir"]
    base, nir = result.rows
    assert base["runs"] == 2 and base["seeds"] == [0, 1]
    # best epochs: b0 -> 2 (0.60), b1 -> 4 (0.64); n0 -> 4 (0.70 twice, map@r tied too: the
    # later epoch, as training keeps it), n1 -> 4, n2 -> 2
    assert base["recall@1"][0] == pytest.approx((0.60 + 0.64) / 2)
    assert base["recall@1"][1] == pytest.approx(np.std([0.60, 0.64], ddof=1))
    assert base["best_epoch"][0] == pytest.approx(3.0)
    assert nir["recall@1"][0] == pytest.approx((0.70 + 0.69 + 0.72) / 3)
    assert nir["recall@1"][1] == pytest.approx(np.std([0.70, 0.69, 0.72], ddof=1))
    assert nir["map@r"][0] == pytest.approx((0.35 + 0.345 + 0.36) / 3)  # at the selected epochs
    assert nir["best_epoch"][0] == pytest.approx((4 + 4 + 2) / 3)
    assert "| digits-proxyanchor-nir | 3 | 3.3 +- 1.2 | 0.7033 +- 0.0153 |" in result.table

    files = result.files
    assert set(files) == {"compare.png", "compare.md", "compare.json", "compare.html"}
    with Image.open(io.BytesIO(files["compare.png"].read_bytes())) as img:
        assert img.format == "PNG"
    data = json.loads(
        files["compare.json"].read_text(),
        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"),
    )
    curve = data["groups"][1]["curve"]
    assert curve["epochs"] == [1, 2, 4]  # epoch 3 was not evaluated
    assert curve["values"][0] == [0.61, 0.70, 0.70]
    assert 'data-file="compare.png"' in files["compare.html"].read_text()


def test_selection_uses_the_validation_split_when_present(tmp_path):
    run = _run(tmp_path / "v", "digits", 0, [0.5, 0.9, 0.6], val=[0.3, 0.2, 0.4])
    rec = read_run(run)
    assert rec.selected_on == "val" and rec.best_epoch == 3
    assert rec.best["recall@1"] == 0.6  # the test value at the val-selected epoch


def test_same_name_different_settings_are_separate_groups(tmp_path):
    a = read_run(_run(tmp_path / "a", "digits", 0, [0.5]))
    b = read_run(_run(tmp_path / "b", "digits", 0, [0.6], ["optim.lr=0.001"]))
    c = read_run(_run(tmp_path / "c", "digits", 3, [0.7], ["data.num_workers=2"]))  # same group
    groups = group_runs([a, b, c])
    assert len(groups) == 2
    assert [len(g.runs) for g in groups] == [2, 1]
    assert "optim.lr=0.0003" in groups[0].label and "optim.lr=0.001" in groups[1].label


def test_cli_prints_the_table_and_refuses_bad_folders(tmp_path, capsys):
    a = _run(tmp_path / "a", "digits", 0, [0.5, 0.6])
    b = _run(tmp_path / "b", "digits-nir", 0, [0.55, 0.65])
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| digits-proxyanchor | 1 | 2 | 0.6000 |" in out and "-o DIR" in out
    assert main(["compare", str(a), str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["compare", str(a), str(a)]) == 2


def test_runs_sharing_a_seed_are_not_called_seed_variance(tmp_path, capsys):
    runs = [
        _run(tmp_path / f"t{n}", "digits", 0, [0.5 + n / 100], [f"data.num_workers={n}"])
        for n in range(3)
    ]
    assert main(["compare", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "| digits-proxyanchor | 3 (1 seed) |" in out
    assert "3 runs, 1 seed: runs share a seed, so the spread is not seed variance" in out
