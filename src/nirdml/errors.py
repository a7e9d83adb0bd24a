"""Shared error types of nirdml (kept tiny: most bad input raises a plain ValueError)."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A loss came out NaN/inf; the message names the non-finite input and the fix."""
