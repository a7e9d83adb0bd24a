"""Export a trained embedding model to TorchScript or ONNX: images in, L2-normalised
embeddings out.

The exported graph is the network of the checkpoint in eval mode (backbone, pooling, head,
L2 normalisation); the image preprocessing (resize, crop, mean/std) stays outside, as in
every serving stack: feed it what the run's test transform produces, float32
``(N, C, H, W)``. The batch dimension is dynamic. Every export is checked against the
eager model on a fresh input (TorchScript always; ONNX with onnxruntime when installed,
else by ``onnx.checker``) and written atomically.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nirdml.errors import InputError
from nirdml.runtime import require_extra

FORMATS = ("torchscript", "onnx")
ONNX_MODULES = ("onnx", "onnxscript")
"""What ONNX export imports (the ``export`` extra; onnxruntime, optional, checks parity)."""
PARITY_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What was exported: file, format, example input shape, embedding size, parity."""

    path: Path
    checkpoint: Path
    format: str
    input_shape: tuple[int, ...]
    embed_dim: int
    max_abs_diff: float
    """max |eager - exported| on a fresh random batch (nan: ONNX checked structurally only)."""


class ImageEmbedder(nn.Module):
    """``images (N, C, H, W) float32 -> embeddings (N, D)``, each of unit L2 norm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.embed(self.model.features(images))


def _input_shape(run, image_size: int | None) -> tuple[int, int, int]:
    from nirdml.data.registry import TRANSFORMS
    from nirdml.training.config import transform_preset

    cfg = run.config
    channels = int(run.state["model_spec"].get("in_channels", cfg.model.in_channels))
    if image_size is None:
        image_size = getattr(cfg.data, "image_size", None)
    if image_size is None:
        image_size = TRANSFORMS[transform_preset(cfg.data)].size
    if int(image_size) < 1:
        raise InputError(f"image_size must be a positive number of pixels, got {image_size}")
    return channels, int(image_size), int(image_size)


def _onnx_runtime_output(path: Path, images: Tensor) -> Tensor | None:
    """The ONNX file's output on ``images`` with onnxruntime (None if not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: images.numpy()})[0])


def _save_onnx(module: nn.Module, example: Tensor, out: Path, opset: int | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    try:
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        program.save(tmp, external_data=False)
        import onnx

        onnx.checker.check_model(tmp, full_check=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    *,
    format: str = "torchscript",
    image_size: int | None = None,
    opset: int | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export the embedding model of ``checkpoint`` (a .pt file, or a run folder: its
    ``checkpoints/best.pt``, else ``last.pt``) to ``out``.

    ``format``: ``"torchscript"`` (load with ``torch.jit.load``) or ``"onnx"``.
    ``image_size``: side of the example input (default: the run's test transform's output,
    e.g. 224 for photos, 28 for Omniglot). The batch dimension is dynamic in both formats.
    Raises ValueError when the exported model's output differs from the eager model's by
    more than 1e-4 on a fresh batch.
    """
    from nirdml.runtime import atomic_write
    from nirdml.training.artifacts import load_trained

    if format not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "onnx":  # before the model is loaded
        require_extra(
            "export",
            ONNX_MODULES,
            "ONNX export",
            alternative="export to TorchScript instead (--format torchscript)",
        )
    out = Path(out)
    run = load_trained(checkpoint, "cpu", with_loss=False)
    module = ImageEmbedder(run.model).eval()
    shape = _input_shape(run, image_size)
    gen = torch.Generator().manual_seed(seed)  # local: the global RNG is left alone
    example = torch.randn(2, *shape, generator=gen)
    check = torch.randn(3, *shape, generator=gen)  # another batch size: the axis is dynamic
    with torch.no_grad():
        expected = module(check)
        if format == "torchscript":
            with warnings.catch_warnings():  # torch.jit is deprecated upstream, still served
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(module, example, check_trace=False)
                atomic_write(out, lambda f: torch.jit.save(traced, f))
                got: Tensor | None = torch.jit.load(str(out))(check)
        else:
            _save_onnx(module, example, out, opset)
            got = _onnx_runtime_output(out, check)
    diff = float("nan") if got is None else float((got - expected).abs().max())
    if got is not None and not diff <= PARITY_TOLERANCE:
        out.unlink(missing_ok=True)
        raise InputError(
            f"the exported {format} model differs from the eager model by {diff:.2e} "
            f"(> {PARITY_TOLERANCE}); nothing was written. Try the other format or report it."
        )
    return ExportResult(out, run.path, format, (-1, *shape), int(expected.shape[1]), diff)
