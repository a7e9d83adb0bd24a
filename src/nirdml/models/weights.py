"""Reading weight files, fetching pretrained weights, and loading them with clear errors.

Two kinds of files are accepted by ``build_model(..., weights=path)``:

* the backbone's upstream format: a torchvision ResNet ``state_dict`` (``conv1.weight``, ...,
  ``fc.*`` is ignored), the EfficientNet-Lite0 package's file, or a timm ``state_dict``
  (``.pth``/``.pt``/``.bin`` or ``.safetensors``);
* our own model state: ``EmbeddingModel.state_dict()`` (keys ``backbone.*`` and ``head.*``),
  bare or inside a checkpoint dict under ``"model"``, ``"state_dict"``, ``"model_state"`` or
  ``"model_state_dict"``.

``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) key prefixes
are removed. Files are loaded with ``weights_only=True``: no code from the file runs.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nirdml.errors import (
    InputError,
    MissingDependencyError,
    MissingFileError,
    WeightsUnavailableError,
)

__all__ = [
    "WeightsUnavailableError",
    "fetch_url_state_dict",
    "is_embedding_state",
    "load_matching",
    "read_state_dict",
]

CHECKPOINT_KEYS = ("model", "state_dict", "model_state", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def offline_message(what: str, url: str, err: BaseException, *, cache_hint: str) -> str:
    """The message for weights that could not be fetched: what failed and how to go offline."""
    filename = url.rstrip("/").rsplit("/", 1)[-1]
    return (
        f"Could not fetch the pretrained weights of {what} from {url} "
        f"({type(err).__name__}: {err}). This machine is probably offline. "
        f"To use these weights without network, download {url} on a machine that has it, "
        f"copy it here and pass weights='/path/to/{filename}' to build_model "
        f"(that replaces the download), or {cache_hint}. "
        "To start from random weights instead, pass pretrained=False."
    )


def fetch_url_state_dict(url: str, what: str) -> dict[str, Tensor]:
    """Download (or read from the torch hub cache) the state_dict at ``url``.

    Fails with :class:`WeightsUnavailableError` naming the URL, the cache folder and the
    ``weights=path`` alternative.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as err:  # network, HTTP, hash mismatch: all mean "not available here"
        hint = f"put the file, with its name unchanged, in the torch hub cache {cache}"
        raise WeightsUnavailableError(
            offline_message(what, url, err, cache_hint=hint),
            what=what,
            url=url,
            reason=f"{type(err).__name__}: {err}",
            cache=f"the torch hub cache {cache}",
        ) from err
    return dict(state)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors stored in a weights file (a state_dict or a checkpoint holding one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(
            f"Weights file {str(path)!r} does not exist: pass the path of a state_dict saved "
            "with torch.save (.pth/.pt) or a .safetensors file."
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise MissingDependencyError(
                f"Reading {path.name} needs the safetensors package: pip install safetensors"
            ) from err
        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise InputError(
                f"Could not read {str(path)!r} as a weights file ({type(err).__name__}: {err}). "
                "It must hold plain tensors (loaded with weights_only=True): save it with "
                "torch.save(model.state_dict(), path) or as .safetensors."
            ) from err
    return _strip_wrapper_prefixes(_unwrap(obj, path))


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    if _is_state_dict(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        found = ", ".join(repr(k) for k in list(obj)[:10])
        raise InputError(
            f"{str(path)!r} is neither a state_dict nor a checkpoint holding one: its top-level "
            f"keys are {found}. Save the model's state_dict, or put it under one of "
            f"{', '.join(repr(k) for k in CHECKPOINT_KEYS)}."
        )
    raise InputError(
        f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict: "
        "save it with torch.save(model.state_dict(), path)."
    )


def _strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def is_embedding_state(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` is an ``EmbeddingModel.state_dict()`` (vs a bare backbone's)."""
    return "head.weight" in state and any(k.startswith("backbone.") for k in state)


def load_matching(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    what: str,
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``module``: every tensor must fit, keys under ``ignore_prefixes``
    (e.g. the classifier of an ImageNet checkpoint) excepted. Raises ``ValueError`` listing
    missing, unexpected and wrongly-shaped entries."""
    prefixes = tuple(ignore_prefixes)
    state = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    own = module.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        for label, items in (
            ("wrong shapes", mismatched),
            ("missing", missing),
            ("unexpected", unexpected),
        ):
            if items:
                more = f"; ... ({len(items)} in all)" if len(items) > 5 else ""
                shown = "; ".join(items[:5]) + more
                parts.append(f"{label}: {shown}")
        raise InputError(
            f"The weights do not fit {what} ({' | '.join(parts)}). Check that the file was saved "
            "from the same architecture (arch, embed_dim, in_channels) as the model being built."
        )
    module.load_state_dict(state, strict=False)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_identity(path: str | Path, source: str) -> dict[str, Any]:
    """A weights file by content: name, size and sha256 (cached per path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return {"source": source, "file": path.name, "bytes": st.st_size, "sha256": _HASHES[key]}
