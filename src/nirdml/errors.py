"""Shared error types of nirdml (kept tiny: most bad input raises a plain ValueError)."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A loss came out NaN/inf; the message names the non-finite input and the fix."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (typically: no network).

    ``url`` and ``reason`` say what failed; :meth:`cli_message` is the one-paragraph advice
    for the ``nirdml`` command (``--set model.weights=...``) instead of library arguments.
    """

    def __init__(
        self, message: str, *, what: str = "", url: str = "", reason: str = "", cache: str = ""
    ) -> None:
        super().__init__(message)
        self.what, self.url, self.reason, self.cache = what, url, reason, cache

    def cli_message(self) -> str:
        if not self.url:
            return str(self)
        filename = self.url.rstrip("/").rsplit("/", 1)[-1]
        where = f" (or put it, name unchanged, in {self.cache})" if self.cache else ""
        return (
            f"could not fetch the pretrained weights of {self.what} from {self.url} "
            f"({self.reason}); this machine is probably offline. Download that file on a "
            f"machine with network, copy it here and pass --set model.weights=/path/to/{filename}"
            f"{where}, or train from random weights with --set model.pretrained=false."
        )
