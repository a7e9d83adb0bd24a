"""Shared runtime helpers at the bottom of the package: version, lazy package attributes,
device resolution, DataLoader worker counts, the autocast guard and atomic file writes.

Every layer may import this module, and it imports no other part of nirdml except
:mod:`nirdml.errors`. torch is imported inside the functions that need it, so ``import
nirdml`` and the ``nirdml`` command's ``--help``, ``--version`` and config errors stay quick.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from nirdml.errors import DeviceUnavailableError, DistributedSetupError, MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import torch

__version__ = "0.1.0"

DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device types a run may name (``device=cpu``, ``cuda[:N]``, ``mps``, or ``auto``)."""


def lazy_attributes(
    package: str, table: Mapping[str, str], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__``: ``name`` is imported from the
    module ``table[name]`` on first access (then cached in the package), and each of
    ``submodules`` is importable as an attribute. Packages use it so that importing them
    does not import torch."""
    import importlib
    import sys

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later accesses skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table) | set(submodules))

    return __getattr__, __dir__


def require_extra(
    extra: str, modules: Sequence[str], what: str, setting: str = "", alternative: str = ""
) -> None:
    """A MissingDependencyError naming ``pip install "nirdml[extra]"`` unless every one of
    ``modules`` is installed (``importlib.util.find_spec``: nothing is imported, so it is
    checked before any work). ``what`` needs them; ``setting`` (``KEY=VALUE``) or
    ``alternative`` (words) is another way to go on without them."""
    import importlib.util

    missing = [m for m in modules if _find_spec(importlib.util, m) is None]
    if not missing:
        return
    problem = f"{what} needs the optional package(s) {', '.join(missing)}, not installed here:"
    install = f'pip install "nirdml[{extra}]"'
    library = [install, f"set {setting}" if setting else alternative]
    cli = [install, f"pass --set {setting}" if setting else alternative]
    raise MissingDependencyError(
        f"{problem} {', or '.join(x for x in library if x)}",
        cli=problem,
        fixes=[x for x in cli if x],
    )


def _find_spec(util: Any, module: str) -> Any:
    try:
        return util.find_spec(module)
    except (ImportError, ValueError):  # a parent package is missing, or a stub module
        return None


def resolve_device(
    device: str | torch.device | None = None, *, local_rank: int | None = None
) -> torch.device:
    """The device to run on, by one rule set for evaluation, analysis and training.

    ``None`` and ``"auto"`` mean CUDA when available (the current CUDA device), else CPU.
    ``local_rank`` is the process's local rank in a distributed run: there ``auto`` and a
    bare ``cuda`` mean ``cuda:LOCAL_RANK``, while an explicit ``cuda:N`` is kept (for
    launchers that give every process one GPU through CUDA_VISIBLE_DEVICES).
    """
    import torch

    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = torch.cuda.current_device() if local_rank is None else None
        device = torch.device("cuda", index)
    requested = str(device)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device={requested!r} was requested but CUDA is not available; pass "
            "device='cpu', or device='auto' (None) to pick automatically.",
            cli=f"device {requested} was requested but CUDA is not available on this machine;",
            fixes=("pass --set device=cpu", "--set device=auto to pick automatically"),
        )
    if device.type == "cuda" and device.index is None and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                "GPU(s); use torchrun --nproc_per_node <= the GPU count, or device=cuda:0 if "
                "your launcher gives every process its own GPU via CUDA_VISIBLE_DEVICES"
            )
        device = torch.device("cuda", local_rank)
    return device


_WORKERS_CAPPED: list[int] = []
"""The worker counts already said to be capped in this process (said once)."""


def usable_workers(requested: int) -> int:
    """DataLoader workers for ``requested``: at most the CPU cores this process may run on
    (``os.sched_getaffinity``, else ``os.cpu_count``), so ``data.num_workers: 8`` does not
    oversubscribe a small machine; the cap is said once per process, on stderr. Results do
    not depend on the number of workers."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    if requested <= cores:
        return requested
    if not _WORKERS_CAPPED:
        print(
            f"data.num_workers={requested}: using {cores} DataLoader worker(s), the CPU cores "
            "available here",
            file=sys.stderr,
            flush=True,
        )
    _WORKERS_CAPPED.append(requested)
    return cores


def no_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast switched off on ``device`` (a no-op context when it is not on), so the flow
    and the losses run in full precision inside an autocast region."""
    from contextlib import nullcontext

    import torch

    try:
        enabled = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device_type argument
        enabled = (
            torch.is_autocast_cpu_enabled() if device.type == "cpu" else torch.is_autocast_enabled()
        )
    return torch.autocast(device.type, enabled=False) if enabled else nullcontext()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(fileobj)`` to a temp file, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (keys in their order) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
