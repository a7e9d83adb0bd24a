"""Export a trained embedding model to TorchScript or ONNX: images in, L2-normalised
embeddings out.

The exported graph is the network of the checkpoint in eval mode (backbone, pooling, head,
L2 normalisation); the image preprocessing (resize, crop, mean/std) stays outside, as in
every serving stack: feed it what the run's test transform produces, float32
``(N, C, H, W)``. The batch dimension is dynamic. Every export is checked against the
eager model on a fresh input (TorchScript always; ONNX with onnxruntime when installed,
else by ``onnx.checker``) and written atomically.

Image size: a TorchScript export takes any size when its output matches the eager model's
at a second size too (input-size-dependent "SAME" padding is computed in TorchScript, so
the trace keeps it); otherwise, and always for ONNX, it takes the one size it was exported
at and refuses another. Which one is stored in the file (:func:`read_metadata`).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import InputError
from nirdml.runtime import require_extra

FORMATS = ("torchscript", "onnx")
ONNX_MODULES = ("onnx", "onnxscript")
"""What ONNX export imports (the ``export`` extra; onnxruntime, optional, checks parity)."""
PARITY_TOLERANCE = 1e-4
METADATA = "nirdml.json"
"""Name of the metadata in an exported file (TorchScript extra file, ONNX metadata_props
key): JSON with ``image_size`` (None: any size) and the input and output shapes."""


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
    image_size: int | None = None
    """The one input size (H = W) the file takes, or None: any size (checked at two)."""
    checked_sizes: tuple[int, ...] = ()
    """The sizes at which parity with the eager model was checked."""

    def size_note(self) -> str:
        """``any size (checked at 224 and 280 px)`` or ``fixed size 224x224 only``."""
        if self.image_size is None:
            return f"any size (checked at {' and '.join(map(str, self.checked_sizes))} px)"
        n = self.image_size
        return f"fixed size {n}x{n} only (another size is refused)"


class ImageEmbedder(nn.Module):
    """``images (N, C, H, W) float32 -> embeddings (N, D)``, each of unit L2 norm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.embed(self.model.features(images))


def _same_pad(x: Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> Tensor:
    """TF "SAME" padding of ``x`` for a conv, computed from its actual size."""
    ih, iw = x.shape[-2], x.shape[-1]
    pad_h = max((-(-ih // stride[0]) - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1 - ih, 0)
    pad_w = max((-(-iw // stride[1]) - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1 - iw, 0)
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


@functools.cache
def _scripted_same_pad() -> Any:
    with warnings.catch_warnings():  # torch.jit is deprecated upstream, still served
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(_same_pad)


class _ScriptedSamePadConv(nn.Module):
    """A "SAME"-padding conv whose padding is computed in TorchScript: a trace calls the
    scripted function instead of fixing the padding of the traced size."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        k, s, d = list(c.kernel_size), list(c.stride), list(c.dilation)
        x = _scripted_same_pad()(x, k, s, d)
        return F.conv2d(x, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _size_independent_padding_(module: nn.Module) -> nn.Module:
    """Swap every efficientnet-lite-pytorch ``Conv2dDynamicSamePadding`` (its padding
    follows the input size in Python, which a trace would freeze) for a
    :class:`_ScriptedSamePadConv` with the same weights, in place; returns ``module``."""
    for name, child in module.named_children():
        if type(child).__name__ == "Conv2dDynamicSamePadding":
            setattr(module, name, _ScriptedSamePadConv(child))
        else:
            _size_independent_padding_(child)
    return module


class _FixedSize(nn.Module):
    """The exported model with its one input size enforced (scripted: a clear error)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.message = (
            f"this exported model takes {size}x{size} images only (it was exported at that "
            f"fixed size); resize the images to {size}x{size}, or export the checkpoint again "
            "with --image-size N (image_size=N) for N px"
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2] != self.size or images.shape[-1] != self.size:
            raise ValueError(self.message)
        return self.model(images)


def _matches(module: nn.Module, exported: Any, images: Tensor) -> bool:
    """Whether ``exported`` gives the eager ``module``'s output on ``images`` (False when
    either fails at that size)."""
    try:
        with torch.no_grad():
            diff = float((exported(images) - module(images)).abs().max())
    except RuntimeError:
        return False
    return diff <= PARITY_TOLERANCE


def _other_size(size: int) -> int:
    """A second input size to check a size-agnostic export at: larger, and odd where
    ``size`` is even (strided "SAME" padding differs between odd and even sizes)."""
    return size + max(8, size // 4) + 1


def _metadata(input_shape: tuple[int, ...], embed_dim: int, image_size: int | None) -> str:
    """The :data:`METADATA` JSON of an export: its size rule and shapes."""
    channels = input_shape[1]
    size: list[int | str] = ["H", "W"] if image_size is None else [image_size, image_size]
    return json.dumps(
        {
            "image_size": image_size,
            "input": ["N", channels, *size],
            "output": ["N", embed_dim],
            "dtype": "float32",
        }
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an export wrote into ``path`` (:data:`METADATA`): ``image_size`` (None:
    any size), ``input`` and ``output`` shapes."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props[METADATA])
    files = {METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[METADATA])


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


def _save_onnx(
    module: nn.Module, example: Tensor, out: Path, opset: int | None, metadata: str
) -> None:
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

        model = onnx.load(tmp)
        model.metadata_props.add(key=METADATA, value=metadata)
        onnx.save(model, tmp)
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
    A TorchScript file takes any image size when it matches the eager model at a second
    size too, else (and an ONNX file always) only ``image_size``, refusing another with an
    error; ``ExportResult.image_size`` and the file's metadata (:func:`read_metadata`) say
    which.
    Raises ValueError when the exported model's output differs from the eager model's by
    more than 1e-4 on a fresh batch.
    """
    from nirdml.training.artifacts import load_trained

    _check_format(format)
    out = Path(out)
    run = load_trained(checkpoint, "cpu", with_loss=False)
    module = ImageEmbedder(_size_independent_padding_(run.model)).eval()
    shape = _input_shape(run, image_size)
    example, check, check_other = _example_batches(shape, seed)
    with torch.no_grad():
        expected = module(check)
    embed_dim = int(expected.shape[1])
    checks = [check]
    if format == "torchscript":
        loaded, fixed = _save_torchscript(module, example, check_other, out, shape, embed_dim)
        checks += [check_other] if fixed is None else []
        with torch.no_grad():
            outputs: list[Tensor | None] = [loaded(x) for x in checks]
    else:  # the spatial size is fixed in the ONNX graph: onnxruntime refuses another
        fixed = shape[1]
        _save_onnx(module, example, out, opset, _metadata((-1, *shape), embed_dim, fixed))
        outputs = [_onnx_runtime_output(out, check)]
    diff = _check_parity(module, checks, outputs, out, format)
    sizes = tuple(x.shape[-1] for x in checks)
    return ExportResult(out, run.path, format, (-1, *shape), embed_dim, diff, fixed, sizes)


def _check_format(fmt: str) -> None:
    """Refuse an unknown format, and ONNX without its extra, before the model is loaded."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "onnx":
        require_extra(
            "export",
            ONNX_MODULES,
            "ONNX export",
            alternative="export to TorchScript instead (--format torchscript)",
        )


def _example_batches(shape: tuple[int, int, int], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(trace example, parity batch, parity batch at another image size), seeded locally."""
    gen = torch.Generator().manual_seed(seed)  # local: the global RNG is left alone
    example = torch.randn(2, *shape, generator=gen)
    check = torch.randn(3, *shape, generator=gen)  # another batch size: the axis is dynamic
    other = _other_size(shape[1])
    check_other = torch.randn(2, shape[0], other, other, generator=gen)
    return example, check, check_other


def _save_torchscript(
    module: nn.Module,
    example: Tensor,
    check_other: Tensor,
    out: Path,
    shape: tuple[int, int, int],
    embed_dim: int,
) -> tuple[Any, int | None]:
    """Trace, write and reload ``out``: (loaded model, its fixed size, None if size-agnostic)."""
    from nirdml.runtime import atomic_write

    with warnings.catch_warnings():  # torch.jit is deprecated upstream, still served
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # sizes checked below
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        fixed = None if _matches(module, traced, check_other) else shape[1]
        exported = traced if fixed is None else torch.jit.script(_FixedSize(traced, fixed))
        files = {METADATA: _metadata((-1, *shape), embed_dim, fixed)}
        atomic_write(out, lambda f: torch.jit.save(exported, f, _extra_files=files))
        return torch.jit.load(str(out)), fixed


def _check_parity(
    module: nn.Module, checks: list[Tensor], outputs: list[Tensor | None], out: Path, fmt: str
) -> float:
    """Max |eager - exported| (nan: none run); over the tolerance ``out`` is deleted, an error."""
    with torch.no_grad():
        diffs = [
            float((got - module(x)).abs().max())
            for x, got in zip(checks, outputs, strict=True)
            if got is not None
        ]
    diff = max(diffs) if diffs else float("nan")
    if diffs and not diff <= PARITY_TOLERANCE:
        out.unlink(missing_ok=True)
        raise InputError(
            f"the exported {fmt} model differs from the eager model by {diff:.2e} "
            f"(> {PARITY_TOLERANCE}); nothing was written. Try the other format or report it."
        )
    return diff
