"""The one error hierarchy of nirdml: every error it raises on purpose is a
:class:`NirdmlError` and also the builtin type callers already catch (``ValueError`` for bad
input, ...), and each message names the problem and the fix. No torch import here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


class NirdmlError(Exception):
    """Base of the errors nirdml raises on purpose (``except nirdml.errors.NirdmlError``).

    The message words its fix for library callers (``pass device='cpu'``). Where the fix
    reads otherwise on the command line, ``cli`` is the message for the ``nirdml`` command
    and ``fixes`` its alternative fixes, settings written ``--set KEY=VALUE``; each command
    spells those as its own options and leaves out the fixes it cannot take
    (:meth:`cli_message`).
    """

    def __init__(self, *args: object, cli: str | None = None, fixes: Sequence[str] = ()) -> None:
        super().__init__(*args)
        self.cli = cli
        self.fixes = tuple(fixes)

    def cli_message(
        self, options: Mapping[str, str] | None = None, *, any_setting: bool = True
    ) -> str:
        """The one-line message for the ``nirdml`` command: ``cli`` (else the message) and
        the ``fixes`` the command can take, joined by "or". A ``--set KEY=VALUE`` whose KEY
        the command takes as an option of its own is spelled as that option (``options``:
        KEY -> option, ``{}`` standing for VALUE, e.g. ``{"device": "--device {}"}``); with
        ``any_setting`` False (a command without ``--set``) a fix naming another setting is
        left out."""
        options = options or {}

        def spell(match: re.Match[str]) -> str:
            option = options.get(match.group(1))
            return match.group(0) if option is None else option.format(match.group(2))

        def render(text: str) -> str | None:
            keys = {m.group(1) for m in _SETTING.finditer(text)}
            return _SETTING.sub(spell, text) if any_setting or keys <= set(options) else None

        text = self.cli if self.cli is not None else str(self)
        kept = [f for f in (render(fix) for fix in self.fixes) if f]
        if kept:
            text = f"{text} {', or '.join(kept)}."
        return " ".join((render(text) or text).split())


_SETTING = re.compile(r"--set ([\w.]+)=([^\s,;)]*[^\s,;).])")
"""A config setting in a message: ``--set KEY=VALUE``."""


class NonFiniteLossError(NirdmlError, FloatingPointError, RuntimeError):
    """A loss came out NaN/inf (NIRLoss), or training met non-finite gradients for too many
    consecutive steps; the message names the culprit and the fix. Both a FloatingPointError
    and a RuntimeError, so handlers written for either keep catching it."""


class ConfigError(NirdmlError, ValueError):
    """A config key or value is invalid; the message names it and the fix."""


class InputError(NirdmlError, ValueError):
    """A value given to a nirdml function is invalid (a shape, a range, an unknown choice, data
    that do not fit together); the message names it and the fix."""


class InputTypeError(NirdmlError, TypeError):
    """A value given to a nirdml function has the wrong type (or an option the function does
    not take); the message names what it takes."""


class MissingFileError(NirdmlError, FileNotFoundError):
    """A file or folder a call needs does not exist (a checkpoint, a run folder, an embeddings
    file, a dataset root); the message says what to pass instead."""


class OutputExistsError(NirdmlError, FileExistsError):
    """The output path already holds something that must not be overwritten (a run, a file
    where a folder goes); the message says how to resume or where else to write."""


class TrainingInterrupted(NirdmlError, KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the message says where and the command that
    resumes it. A KeyboardInterrupt, so handlers written for Ctrl-C keep catching it."""


class CheckpointError(NirdmlError, ValueError):
    """A file is not a readable nirdml checkpoint (corrupt, truncated, another format)."""


class SetupError(NirdmlError, RuntimeError):
    """This machine's setup does not allow what was asked (missing credentials, an installed
    package whose structure differs from the one supported); the message says what to set up."""


class MissingDependencyError(NirdmlError, ImportError):
    """An optional package a feature needs is not installed; the message names the
    ``pip install`` that adds it."""


class DistributedSetupError(NirdmlError, ValueError):
    """The torch.distributed environment or the run config does not fit a distributed run."""


class DeviceUnavailableError(NirdmlError, ValueError, RuntimeError):
    """The requested device is not available here (e.g. ``cuda`` without CUDA). A ValueError
    (bad argument) and a RuntimeError, as evaluation and training raised before."""


class InsufficientDiskError(NirdmlError, OSError):
    """A cache would not fit on the disk it is to be written to; nothing was written."""


class NIRInertWarning(UserWarning):
    """NIR's gradient on the embeddings stayed negligible for a whole epoch."""


class WeightsUnavailableError(NirdmlError, RuntimeError):
    """Pretrained weights could not be fetched (typically: no network).

    ``url`` and ``reason`` say what failed; the message for the ``nirdml`` command is the
    one-paragraph advice ``--set model.weights=...`` instead of library arguments.
    """

    def __init__(
        self, message: str, *, what: str = "", url: str = "", reason: str = "", cache: str = ""
    ) -> None:
        super().__init__(message, cli=_weights_advice(what, url, reason, cache) if url else None)
        self.what, self.url, self.reason, self.cache = what, url, reason, cache


def _weights_advice(what: str, url: str, reason: str, cache: str) -> str:
    filename = url.rstrip("/").rsplit("/", 1)[-1]
    where = f" (or put it, name unchanged, in {cache})" if cache else ""
    return (
        f"could not fetch the pretrained weights of {what} from {url} "
        f"({reason}); this machine is probably offline. Download that file on a "
        f"machine with network, copy it here and pass --set model.weights=/path/to/{filename}"
        f"{where}, or train from random weights with --set model.pretrained=false."
    )


class NoImprovementWarning(UserWarning):
    """The epoch a run kept does not beat the untrained backbone features (epoch 0) on the
    split that selected it: training made retrieval worse."""


class SelectionWarning(UserWarning):
    """The selection split could not rank the epochs (too few classes, a saturated metric,
    tied values); the message says which and how the tie was broken."""


class LossCallError(NirdmlError, ValueError):
    """A proxy loss was called the way another library calls its losses: without labels, or
    with a miner's ``indices_tuple`` / a reference set (``ref_emb``, ``ref_labels``), which
    nirdml's proxy losses do not take; the message says how to call them."""


class ManualDownloadError(NirdmlError, FileNotFoundError):
    """A dataset has no stable direct download (``download=True`` cannot fetch it); the
    message says where to get it and which files to place under the root."""
