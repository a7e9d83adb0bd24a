"""`nirdml export`: TorchScript / ONNX of the embedding model, parity with the eager model."""

from __future__ import annotations

import warnings

import pytest
import torch

from nirdml.cli import main
from nirdml.export import export_model
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
