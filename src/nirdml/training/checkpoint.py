"""Atomic, ``weights_only``-safe checkpoints.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(path, weights_only=True)``: no pickled classes, no code execution.
Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written checkpoint or results file.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nirdml.errors import CheckpointError, InputTypeError, MissingFileError
from nirdml.runtime import atomic_write

CHECKPOINT_FORMAT = 1


def _plain(obj: Any) -> Any:
    """Convert containers (Counter, defaultdict, tuples) to types the safe unpickler allows."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise InputTypeError(
        f"cannot store {type(obj).__name__} in a weights_only checkpoint; "
        "convert it to tensors / numbers / strings first"
    )


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Save ``state`` atomically; all values must be weights_only-loadable."""
    payload = _plain({"format": CHECKPOINT_FORMAT, **state})
    return atomic_write(path, lambda f: torch.save(payload, f))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` stands for, by the one rule every command follows: a file
    is used as given; a run folder (or its ``checkpoints/`` folder) means
    ``checkpoints/best.pt``, the epoch model selection kept, when it exists, else
    ``checkpoints/last.pt`` (a run stopped before its first evaluation)."""
    path = Path(path)
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            for name in ("best.pt", "last.pt"):
                if (folder / name).is_file():
                    return folder / name
        raise MissingFileError(
            f"{path} is a folder without checkpoints/best.pt or checkpoints/last.pt; pass a "
            "run folder written by `nirdml train` or the path of a .pt checkpoint"
        )
    if not path.is_file():
        raise MissingFileError(
            f"checkpoint {path} does not exist; pass a run folder written by `nirdml train` or "
            "the path of a .pt checkpoint"
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``
    (``path``: a file, or a run folder resolved by :func:`resolve_checkpoint`)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # not plain tensors and values (torch's advice is unsafe)
        raise CheckpointError(
            f"{path} is not an nirdml checkpoint: it is corrupt, or it was written by "
            "something else (a whole pickled model, another library's file), holding objects "
            "a checkpoint of `nirdml train` never holds. Pass a run folder, or its "
            "checkpoints/best.pt or last.pt."
        ) from None
    except Exception as exc:  # corrupt / truncated / not ours
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(exc).__name__}: {exc}); the file is "
            "corrupt or not an nirdml checkpoint. Use the run's other checkpoint "
            "(checkpoints/best.pt or last.pt) or retrain."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an nirdml checkpoint (format {CHECKPOINT_FORMAT}); pass a .pt file "
            "written by `nirdml train`"
        )
    return state


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """A scheduler's state_dict with its Counter milestones turned into a plain dict."""
    return _plain(scheduler.state_dict())


def load_scheduler_state(
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: Mapping[str, Any]
) -> None:
    state = dict(state)
    if "milestones" in state and isinstance(scheduler.state_dict().get("milestones"), dict):
        from collections import Counter

        state["milestones"] = Counter({int(k): int(v) for k, v in state["milestones"].items()})
    scheduler.load_state_dict(state)
