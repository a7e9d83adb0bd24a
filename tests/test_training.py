"""End-to-end training: outputs, checkpoints, resume after a kill, presets, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from nirdml.errors import NonFiniteLossError
from nirdml.training.checkpoint import load_checkpoint
from nirdml.training.config import list_presets, load_config
from nirdml.training.trainer import train

FAST = ["epochs=4", "eval.every=2", "log.progress=false"]


@pytest.mark.parametrize("preset", ["digits", "digits-nir"])
def test_digits_run_learns_and_writes_every_output(tmp_path, preset):
    cfg = load_config(preset, FAST)
    state = torch.random.get_rng_state()
    result = train(cfg, tmp_path / "run")
    assert torch.equal(state, torch.random.get_rng_state()), "training touched the global RNG"

    out = result.out_dir
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"], "the loss did not fall"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_selected_on"] == "val"  # data.val_classes=auto: 2 of the 5 digits
    assert summary["skipped_steps"] == 0
    if cfg.loss.nir.enabled:
        assert "train/nll" in rows[0] and rows[-1]["train/nll"] < rows[0]["train/nll"]
    # Retrieval of the unseen digits works (chance is ~0.2). Digits cannot show learning
    # beyond raw pixels (R@1 0.989) or an untrained CNN (0.967): 5 training classes are too
    # few; the Omniglot end-to-end test shows learning (docs/guide/results.md).
    assert summary["best"]["value"] > 0.85
    assert summary["best"]["metrics"]["test/recall@1"] > 0.85

    for ckpt in ("last.pt", "best.pt"):
        state = torch.load(out / "checkpoints" / ckpt, weights_only=True)
        assert {"model", "loss", "optimizer", "scheduler", "config", "version"} <= set(state)
    reloaded = load_config(load_checkpoint(out)["config"])
    assert reloaded == cfg


def test_validation_split_selects_the_best_checkpoint(tmp_path):
    cfg = load_config("digits", [*FAST, "data.val_classes=2"])
    result = train(cfg, tmp_path / "run")
    summary = result.summary
    assert summary["best_selected_on"] == "val"
    assert any(k.startswith("val/") for k in summary["best"]["metrics"])
    rows = result.history
    val_key = "val/recall@1"
    evaluated = [r for r in rows if val_key in r]
    assert summary["best"]["epoch"] == max(evaluated, key=lambda r: r[val_key])["epoch"]


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = load_config("digits", ["epochs=1", "log.progress=false"])
    train(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nirdml", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_resume_after_kill_ends_like_an_uninterrupted_run(tmp_path):
    """SIGKILL a CLI run after its first checkpoint, resume it, compare with a clean run."""
    args = ["digits-nir", "--quiet", "--set", "epochs=3", "--set", "eval.every=1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *args, "--out", str(killed)), env=_env())
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run died before its first checkpoint"
    epochs_done = load_checkpoint(ckpt)["epoch"] + 1
    assert epochs_done < 3, "the run finished before it could be killed"

    subprocess.run(_cli("train", "--resume", str(killed), "--quiet"), env=_env(), check=True)
    clean = tmp_path / "clean"
    subprocess.run(_cli("train", *args, "--out", str(clean)), env=_env(), check=True)

    a = json.loads((killed / "summary.json").read_text())
    b = json.loads((clean / "summary.json").read_text())
    assert a["best"] == b["best"]
    assert a["final"]["test/recall@1"] == b["final"]["test/recall@1"]
    rows_a = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(rows_a) == 3, "the resumed run's history holds each epoch once"
    sa = load_checkpoint(killed / "checkpoints" / "last.pt")
    sb = load_checkpoint(clean / "checkpoints" / "last.pt")
    for key in sb["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for key in sb["loss"]:
        assert torch.equal(sa["loss"][key], sb["loss"][key]), key


def _poison(monkeypatch) -> None:
    """Every training loss is NaN (every step is skipped)."""
    from nirdml.training import trainer

    real_criterion_forward = trainer.Criterion.forward

    def poisoned(self, images, labels, backbone_grad=True):
        return real_criterion_forward(self, images, labels, backbone_grad) * float("nan")

    monkeypatch.setattr(trainer.Criterion, "forward", poisoned)


def test_nonfinite_loss_aborts_with_a_clear_error(tmp_path, monkeypatch):
    from nirdml.training import trainer

    monkeypatch.setattr(trainer, "MAX_CONSECUTIVE_SKIPS", 10)
    _poison(monkeypatch)
    cfg = load_config("digits", ["epochs=2", "log.progress=false"])
    with pytest.raises(NonFiniteLossError, match="consecutive steps") as info:
        train(cfg, tmp_path / "run")
    failed = int(re.search(r"\(epoch (\d+)\)", str(info.value)).group(1))
    # The last checkpoint is the last epoch before the failure, with the weights it started
    # from: every non-finite step was skipped, nothing NaN was applied.
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] + 1 == failed - 1 == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way(
    tmp_path, monkeypatch
):
    from nirdml.training import trainer

    monkeypatch.setattr(trainer, "MAX_CONSECUTIVE_SKIPS", 2)
    cfg = load_config("digits", ["epochs=1", "log.progress=false"])
    with monkeypatch.context() as m:
        _poison(m)
        with pytest.raises(NonFiniteLossError):
            train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert trainer.default_out_dir(cfg, tmp_path) == tmp_path / cfg.name  # not name-1
    result = train(cfg, tmp_path / "run")  # the same folder, no --resume needed
    assert (result.out_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize(
    "preset", ["cub200-r128-avg-proxyanchor-nir", "sop-r512-avgmax-softtriple-nir"]
)
def test_missing_dataset_root_is_a_clear_error(tmp_path, preset):
    cfg = load_config(preset, [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_preset_builds_model_loss_and_optimizer():
    """All shipped presets resolve and build (random weights, no data)."""
    from nirdml.training.build import build_loss, build_model_from_config
    from nirdml.training.optim import build_optimizer, build_scheduler, param_groups

    models = {}
    names = list_presets()
    assert len(names) >= 72 + 2
    for name in names:
        cfg = load_config(name)
        cfg.model.pretrained = False
        key = (cfg.model.arch, cfg.model.embed_dim, cfg.model.pooling, cfg.model.in_channels)
        if key not in models:
            models[key] = build_model_from_config(cfg)
        model = models[key]
        num_classes = {"sop": 11318, "cub200": 100, "cars196": 98}.get(cfg.data.name, 5)
        loss = build_loss(cfg.loss, num_classes, cfg.model.embed_dim)
        opt = build_optimizer(param_groups(model, loss, cfg.optim), cfg.optim)
        build_scheduler(opt, cfg.optim)
        names_in_opt = [g["name"] for g in opt.param_groups]
        assert names_in_opt[:2] == ["backbone", "head"], name
        assert ("flow" in names_in_opt) == cfg.loss.nir.enabled, name
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["proxies"] == pytest.approx(cfg.optim.lr * cfg.optim.proxy_lr_mult)
        for g in opt.param_groups:
            if g["name"] in ("proxies", "flow"):
                assert g["weight_decay"] == 0.0
            else:
                assert g["weight_decay"] == pytest.approx(cfg.optim.weight_decay)
        del loss, opt


def test_cli_presets_and_evaluate_and_embed(tmp_path):
    out = subprocess.run(_cli("presets"), env=_env(), capture_output=True, text=True, check=True)
    assert "cub200-r128-avg-proxyanchor-nir" in out.stdout.split()

    run = tmp_path / "run"
    subprocess.run(
        _cli("train", "digits", "--quiet", "--out", str(run), "--set", "epochs=2"),
        env=_env(),
        check=True,
    )
    res = subprocess.run(
        _cli(
            "evaluate",
            str(run),
            "--metrics",
            "recall@1",
            "map@r",
            "mrr",
            "precision@3",
            "--no-relevant",
            "zero",  # digits has no singleton class: the same numbers as "skip"
            "--average",
            "queries",
            "-o",
            str(tmp_path / "m.json"),
        ),
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # A run folder means its best.pt: the epoch model selection kept.
    assert res.stdout.startswith(f"using {run / 'checkpoints' / 'best.pt'} (epoch ")
    kept = summary["best"]["metrics"]["test/recall@1"]
    assert metrics["recall@1"] == pytest.approx(kept, abs=1e-12)
    assert "recall@1" in res.stdout and list(metrics) == ["recall@1", "map@r", "mrr", "precision@3"]
    assert metrics["recall@1"] <= metrics["mrr"] <= 1.0

    # A folder of class sub-folders, exported with paths and labels.
    from PIL import Image

    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i + (100 if cls == "b" else 0)).save(
                folder / cls / f"{i}.png"
            )
    subprocess.run(
        _cli("embed", str(run), str(folder), "-o", str(tmp_path / "emb.npz")),
        env=_env(),
        check=True,
    )
    import numpy as np

    data = np.load(tmp_path / "emb.npz")
    assert data["embeddings"].shape == (6, 64)
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
    assert list(data["labels"]) == [0, 0, 0, 1, 1, 1]
    assert [Path(p).name for p in data["paths"]] == ["0.png", "1.png", "2.png"] * 2

    bad = subprocess.run(
        _cli("train", "digits", "--set", "optim.lrr=1"), env=_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Did you mean 'lr'" in bad.stderr


def test_tensorboard_and_wandb_offline_loggers(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(
        "digits", ["epochs=1", "log.progress=false", "log.tensorboard=true", "log.wandb=true"]
    )
    result = train(cfg, tmp_path / "run")
    events = EventAccumulator(str(result.out_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "test/recall@1", "lr/proxies"} <= tags
    value = events.Scalars("test/recall@1")[-1].value
    assert value == pytest.approx(result.summary["final"]["test/recall@1"], rel=1e-6)
    runs = list((result.out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert wandb.run is None  # finished


def test_wandb_online_without_credentials_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = load_config(
        "digits", ["epochs=1", "log.progress=false", "log.wandb=true", "log.wandb_mode=online"]
    )
    with pytest.raises(RuntimeError, match="WANDB_API_KEY in the environment"):
        train(cfg, tmp_path / "run")
