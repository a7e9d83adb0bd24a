"""``torch.compile`` with a safe fallback: when compilation fails, warn once and run eager.

``torch.compile`` compiles lazily, on the first call, and can fail there for reasons that
have nothing to do with the model (no C++ compiler for the CPU backend, an unsupported
Python or platform, a backend bug). :class:`CompiledOrEager` calls the compiled function;
if that raises and the eager function succeeds on the same inputs, the failure was the
compiler's: it warns once (naming the error and the fix) and runs eager from then on. If
eager raises too, the inputs are at fault and eager's error propagates unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


class CompiledOrEager:
    """``torch.compile(fn, **options)`` that falls back to ``fn`` when compilation fails.

    Args:
        fn: the eager function or bound method (e.g. ``model.features``).
        name: what is compiled, for the warning.
        **options: passed to ``torch.compile`` (``dynamic``, ``mode``, ``backend``...).

    ``compiled`` is False once the fallback has been taken (or when ``torch.compile`` is
    unavailable), so callers and tests can tell which path runs.
    """

    def __init__(self, fn: Callable, name: str, **options: Any) -> None:
        import torch

        self.eager = fn
        self.name = name
        self.compiled = True
        try:
            self._fn = torch.compile(fn, **options)
        except Exception as exc:  # unsupported platform/Python: compile refuses up front
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        self.compiled = False
        self._fn = self.eager
        warnings.warn(
            f"torch.compile of {self.name} failed ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); running it "
            "eagerly (same results, eager speed). Set compile=false to silence this, or fix "
            "the compiler setup (the CPU backend needs a working C++ compiler).",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            return self._fn(*args, **kwargs)
        except Exception as exc:
            result = self.eager(*args, **kwargs)  # raises if the inputs are at fault
            self._fall_back(exc)
            return result
