"""The Omniglot evidence study's machinery (benchmarks/study): statistics, runner, report.

The study itself runs for hours; here the same code runs a miniature study on sklearn
digits (2-epoch runs), so the resumable runner, the config-hash sharing of runs, the three
metric readings, the report and the flow-sample figure are checked end to end.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from study import grid, runner  # noqa: E402
from study.collect import load_run  # noqa: E402
from study.stats import holm, mean_std, paired_test  # noqa: E402

# ----------------------------------------------------------------------------- statistics


def test_paired_test_hand_checked():
    # d = 1..5: mean 3, sd sqrt(2.5); t = 3 / (sd / sqrt 5) = 4.2426 with 4 dof.
    r = paired_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r.n == 5 and r.mean == 3.0
    assert r.std == pytest.approx(math.sqrt(2.5))
    assert r.cohen_dz == pytest.approx(3 / math.sqrt(2.5))
    # t_{0.975, 4} = 2.776445: CI = 3 -+ 2.776445 * sqrt(2.5 / 5)
    half = 2.7764451051977987 * math.sqrt(0.5)
    assert (r.ci_low, r.ci_high) == pytest.approx((3 - half, 3 + half))
    assert r.t_p == pytest.approx(0.013236, abs=1e-6)
    # All 5 differences positive: exact two-sided Wilcoxon p = 2 / 2^5.
    assert r.wilcoxon_p == pytest.approx(2 / 32)
    assert (r.wins, r.losses) == (5, 0)


def test_paired_test_is_signed_and_handles_degenerate_cases():
    r = paired_test([0.50, 0.52, 0.49], [0.51, 0.55, 0.50])
    assert r.mean < 0 and r.losses == 3 and r.cohen_dz < 0
    same = paired_test([0.5, 0.6], [0.5, 0.6])
    assert same.mean == 0 and same.t_p == 1.0 and same.wilcoxon_p == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_test([1, 2, 3], [1, 2])


def test_holm_and_mean_std():
    # Sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04) in the original order.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2)))
    assert mean_std([2.0]) == (2.0, 0.0)


# ----------------------------------------------------------------------------- diagnostics


@pytest.mark.parametrize(
    "loss_name,objective", [("anchor", "exp_nll"), ("anchor", "nll"), ("softtriple", "exp_nll")]
)
def test_term_gradients_split_the_training_gradient(loss_name, objective):
    """The two terms' gradients add up to the gradient of the loss used in training."""
    import torch
    import torch.nn.functional as F

    from nirdml.losses import NIRLoss, ProxyAnchorLoss, SoftTripleLoss
    from study.diagnose import _tangent, term_gradients

    torch.manual_seed(0)
    base = ProxyAnchorLoss(6, 8) if loss_name == "anchor" else SoftTripleLoss(6, 8)
    nir = NIRLoss(base, objective=objective, proxy_weight=0.3, nir_weight=0.2).double()
    x = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    labels = torch.arange(6).repeat_interleave(2)
    g_nir, g_proxy, nll = term_gradients(nir, x, labels)
    xr = x.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(nir(xr, labels), xr)
    torch.testing.assert_close(g_nir + g_proxy, full, rtol=1e-9, atol=1e-12)
    assert nll.shape == (12,)
    tangent, radial = _tangent(g_nir, x)
    torch.testing.assert_close((tangent * x).sum(-1), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(tangent + radial, g_nir)


# ----------------------------------------------------------------------------- mini study


def _mini_presets(tmp: Path) -> dict[str, tuple[str, str]]:
    """Digits versions of the study presets: 2 epochs, a 2-class validation split."""
    out = []
    for name in ("digits", "digits-nir"):
        raw = yaml.safe_load((REPO / "src/nirdml/configs/presets" / f"{name}.yaml").read_text())
        raw["epochs"] = 2
        raw["data"]["val_classes"] = 2
        raw["eval"] = {
            "every": 1,
            "reference": False,  # the study reads no epoch-0 reference
            "metrics": [
                "recall@1",
                "recall@2",
                "recall@4",
                "recall@8",
                "map@r",
                "nmi",
                "rho_spectrum",
                "pi_ratio",
                "uniformity_g2",
            ],
        }
        raw["optim"]["warmup_epochs"] = 0
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        out.append(str(path))
    return {"proxy_anchor": (out[0], out[1])}


@pytest.fixture
def mini_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "LOSSES", _mini_presets(tmp_path))
    monkeypatch.setattr(grid, "LOSS_LABELS", {"proxy_anchor": "ProxyAnchor"})
    monkeypatch.setattr(grid, "BASE_LR_GRID", {"proxy_anchor": ((3e-4, 10.0),)})
    monkeypatch.setattr(grid, "TUNED_BASE", {"proxy_anchor": (3e-4, 10.0)})
    monkeypatch.setattr(grid, "NIR_GRID", {"exp_nll": (0.01,)})
    monkeypatch.setattr(grid, "MAIN_SEEDS", (0, 1))
    monkeypatch.setattr(grid, "TUNE_SEED", 7)
    monkeypatch.setattr(grid, "SWEEP_SEEDS", (7, 0))
    monkeypatch.setattr(grid, "PROBE_RUNS", (("warmup1", "proxy_anchor", (0, 1)),))
    return tmp_path


def test_run_hash_ignores_volatile_fields_only():
    spec = grid.RunSpec("a", 0, "digits")
    same = grid.RunSpec("b", 0, "digits", ("log.tensorboard=true",))
    other_seed = grid.RunSpec("a", 1, "digits")
    other_lr = grid.RunSpec("a", 0, "digits", ("optim.lr=1e-3",))
    h = grid.config_hash
    assert h(spec.config("/x")) == h(same.config("/y"))  # group, root and logging: no
    assert h(spec.config("/x")) != h(other_seed.config("/x"))
    assert h(spec.config("/x")) != h(other_lr.config("/x"))
    assert "--set seed=0" in spec.command("/data", "out")


@pytest.mark.slow
def test_mini_study_runs_resumes_and_reports(mini_grid, monkeypatch):
    from study.controls import control_specs

    # Three control arms (the first shares its configuration with the main baseline) and
    # 2-epoch tuning runs: 13 runs instead of 33, every part of the study still present.
    arms = ("base", "recipe-nir-x0", "nir-tangent_spread")
    parts = dict(grid.PARTS)
    parts["controls"] = lambda: control_specs(*grid.LOSSES["proxy_anchor"], grid.MAIN_SEEDS, arms)
    monkeypatch.setattr(grid, "PARTS", parts)
    monkeypatch.setattr(grid, "TUNE_EPOCHS", 2)
    runs_root = mini_grid / "study"
    specs = grid.specs_of("all")
    unique = {grid.config_hash(s.config("")) for s in specs}
    assert len(unique) < len(specs)  # the sweep shares runs with the tuning and main parts
    logs: list[str] = []
    folders = runner.run_specs(specs, runs_root, "", log=logs.append)
    assert len({f.name for f in folders}) == len(unique)
    assert sum(line.startswith("[") for line in logs) == len(unique)

    # Readings: val-selected epoch, best test epoch, last epoch; straight from the files.
    rec = load_run(folders[0])
    rows = [json.loads(x) for x in (folders[0] / "metrics.jsonl").read_text().splitlines()]
    best_val = max(range(len(rows)), key=lambda i: rows[i]["val/recall@1"])
    best_test = max(range(len(rows)), key=lambda i: rows[i]["test/recall@1"])
    assert rec.epoch("selected") == best_val + 1
    assert rec.metrics("selected")["recall@1"] == rows[best_val]["test/recall@1"]
    assert rec.metrics("best_test")["recall@1"] == rows[best_test]["test/recall@1"]
    assert rec.metrics("final")["map@r"] == rows[-1]["test/map@r"]
    assert rec.metrics("selected", "val")["recall@1"] == rows[best_val]["val/recall@1"]

    # A second pass trains nothing; a killed run (no summary) is resumed, not restarted.
    victim = folders[-1]
    (victim / "summary.json").unlink()
    logs.clear()
    runner.run_specs(specs, runs_root, "", log=logs.append)
    started = [line.split("] ", 1)[1] for line in logs if line.startswith("[")]
    assert started == [f"resume {victim.name}"]
    assert (victim / "summary.json").is_file()

    from study.flow_viz import flow_study
    from study.report import write_report

    out = mini_grid / "results"
    base = runner.run_dir(runs_root, grid.RunSpec("x", 0, grid.LOSSES["proxy_anchor"][0]), "")
    nir = runner.run_dir(runs_root, grid.RunSpec("x", 0, grid.LOSSES["proxy_anchor"][1]), "")
    flow = flow_study(nir, base, "", out, classes_to_plot=2, samples_per_class=5, plot_samples=10)
    assert flow["num_classes"] == 3  # digits 0-4 minus the 2 validation classes
    for key in ("baseline_real", "nir_real", "nir_flow_samples"):
        assert 0 <= flow["nearest_proxy_acc"][key] <= 1
    assert (out / "omniglot_flow_samples.png").stat().st_size > 10_000

    from study.diagnose import gradient_diagnostics, write_diagnostics

    diag = gradient_diagnostics(nir, "", batches=2)
    assert 0 <= diag["radial_share"] <= 1 and diag["tangent_ratio"] > 0
    assert 0.05 <= diag["top5_share_nir"] <= 1 and -1 <= diag["cosine"] <= 1
    write_diagnostics([diag], out)

    path = write_report(runs_root, "", out)
    text = path.read_text()
    for png in ("omniglot_curves.png", "omniglot_sweep.png"):
        assert (out / png).stat().st_size > 10_000 and f"({png})" in text
    assert "| ProxyAnchor + NIR | 2 |" in text
    assert "Wilcoxon" in text and "Holm-adjusted" in text
    assert "not finished" not in text
    assert "| " + nir.name + " | exp_nll |" in text  # the gradient diagnostics table


def test_shards_split_distinct_configurations(tmp_path):
    """The sweep shares its baseline and default point with the main study (same config,
    different group): shards must hold each configuration once, and together all of them."""
    specs = grid.specs_of("all")
    root = str(tmp_path)
    keys = {(s.seed, grid.config_hash(s.config(root))) for s in specs}
    assert len(keys) < len(specs)  # shared configurations exist
    shards = [grid.shard(specs, root, i, 2) for i in range(2)]
    got = [(s.seed, grid.config_hash(s.config(root))) for part in shards for s in part]
    assert len(got) == len(set(got)) == len(keys)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_shard_out_of_range_is_refused(text):
    """A shard outside 0 <= I < N would skip runs silently (e.g. 1/2 and 2/2 miss run 0)."""
    import argparse

    assert grid.shard_arg("1/2") == (1, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="0 <= I < N"):
        grid.shard_arg(text)


# ----------------------------------------------------------------------------- controls


def test_control_arms_change_exactly_their_knobs(mini_grid):
    from study import controls

    base, nir = grid.LOSSES["proxy_anchor"]
    extra = ("optim.lr=2e-4",)

    def cfg(arm: str):
        return controls.arm_spec(arm, 0, base, nir, extra).config("")

    b, recipe = cfg("base"), cfg("recipe-nir")
    assert b.optim.lr == 2e-4 and not b.loss.nir.enabled  # extra overrides reach every arm
    assert recipe.loss.nir.objective == "exp_nll" and recipe.loss.nir.proxy_weight == 0.01
    assert recipe.optim.weight_decay == controls.RECIPE_DECAY  # digits has no decay
    assert recipe.optim.proxy_lr_mult == 2 * b.optim.proxy_lr_mult
    assert recipe.optim.warmup_epochs == 1
    x0, det = cfg("recipe-nir-x0"), cfg("recipe-nir-detached")
    assert x0.loss.nir.nir_scale == 0 and det.loss.nir.detach_inputs
    for other in (x0, det):  # everything else is the recipe
        a, r = other.to_dict(), recipe.to_dict()
        a["loss"]["nir"].update(nir_scale=1.0, detach_inputs=False)
        a.pop("name"), r.pop("name")
        assert a == r
    scaled = cfg("base-scaled-decay")
    assert scaled.loss.nir.nir_scale == 0 and scaled.optim.weight_decay == controls.RECIPE_DECAY
    assert scaled.optim.proxy_lr_mult == b.optim.proxy_lr_mult
    assert scaled.optim.warmup_epochs == b.optim.warmup_epochs
    assert cfg("base-proxylr").optim.proxy_lr_mult == 2 * b.optim.proxy_lr_mult
    assert cfg("base-warmup").optim.warmup_epochs == 1
    assert cfg("nir-tangent_spread").loss.nir.objective == "tangent_spread"
    assert cfg("nir-nll").loss.nir.objective == "nll"
    absolute = controls.arm_spec("base-proxylr", 0, base, nir, (), recipe_proxy_lr_mult=4000)
    assert absolute.config("").optim.proxy_lr_mult == 4000
    with pytest.raises(ValueError, match="Did you mean 'recipe-nir-x0'"):
        controls.arm_spec("recipe-nir-x", 0, base, nir)
    assert len(grid.specs_of("controls")) == len(controls.ARMS) * len(grid.MAIN_SEEDS)


def test_frozen_control_arms_drop_warmup():
    from study import controls

    base, nir = "cars98-frozen-proxyanchor-baseline", "cars98-frozen-proxyanchor-nir"
    base_mult = controls.arm_spec("base", 0, base, nir).config("").optim.proxy_lr_mult
    for arm in ("recipe-nir", "recipe-nir-x0", "recipe-nir-detached"):
        cfg = controls.arm_spec(arm, 0, base, nir).config("")
        assert cfg.model.frozen and cfg.optim.warmup_epochs == 0
        # the recipe's proxy lr is twice the base preset's (the authors' 2x proxy lr)
        assert cfg.loss.nir.objective == "exp_nll" and cfg.optim.proxy_lr_mult == 2 * base_mult
    with pytest.raises(ValueError, match="frozen"):
        controls.arm_spec("base-warmup", 0, base, nir)


def test_controls_cli_runs_and_reports(mini_grid, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import nir_controls

    base, nir = grid.LOSSES["proxy_anchor"]
    common = ["--base", base, "--nir", nir, "--data-root", "", "--seeds", "0", "1"]
    common += ["--runs", str(mini_grid / "ctl")]
    arms = ["--arms", "base", "recipe-nir", "recipe-nir-x0"]
    assert nir_controls.main(["run", *common, *arms]) == 0
    out = mini_grid / "controls.md"
    per_run = mini_grid / "controls.json"
    assert (
        nir_controls.main(["report", *common, *arms, "--out", str(out), "--json", str(per_run)])
        == 0
    )
    numbers = json.loads(per_run.read_text())
    assert numbers["metric"] == "recall@1" and set(numbers["runs"]["base"]) == {"0", "1"}
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| base | 2 (0) |")
    recipe = next(i for i, r in enumerate(rows) if r.startswith("| recipe-nir |"))
    assert "| base |" in rows[recipe] and "| recipe-nir-x0 |" in rows[recipe + 1]


def test_partial_vs_frozen_compare_reads_the_kept_run_records(tmp_path):
    """``cars98_partial.py compare`` on the committed run records (no training): it pairs
    the two presets' baseline runs by seed and ignores the other arms in the folders."""
    import shutil

    import cars98_partial

    records = REPO / "benchmarks" / "results" / "run_records"
    for study, kept in (("study_partial", "cars98_partial"), ("study_frozen", "cars98_frozen")):
        shutil.copytree(records / kept, tmp_path / study / "runs")
    result = cars98_partial.compare(tmp_path)
    partial, frozen = result["arms"]["partial"], result["arms"]["frozen"]
    assert partial["seeds"][:5] == frozen["seeds"][:5] == [0, 1, 2, 3, 4]
    seeds = result["paired_seeds"]
    for metric in ("recall@1", "map@r"):
        diffs = [
            partial[metric][partial["seeds"].index(s)] - frozen[metric][frozen["seeds"].index(s)]
            for s in seeds
        ]
        assert result["paired"][metric]["mean"] == pytest.approx(sum(diffs) / len(diffs))
        assert result["paired"][metric]["wins"] == sum(d > 0 for d in diffs)
    assert result["raw"]["recall@1"] == pytest.approx(0.4312105007292173)
    text = cars98_partial.compare_markdown(result)
    assert "| partial preset |" in text and "| frozen preset |" in text
    with pytest.raises(SystemExit, match="no finished runs"):
        cars98_partial.compare(tmp_path / "missing")
