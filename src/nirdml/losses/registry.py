"""The one table of proxy losses, and the NIR option names, as plain data.

Config validation, the trainer's builder, the report and the preset generator read this
table; nothing here imports torch (``nirdml --help`` and config errors stay quick), the
loss class is imported only by :meth:`LossEntry.load`. Adding a loss: its module in
``nirdml/losses/`` plus one :data:`LOSSES` entry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LossEntry:
    """One proxy loss: where its class lives and what its constructor takes."""

    target: str
    """``"module:Class"``; the class is called as ``Class(num_classes, embed_dim, **params)``."""
    title: str
    """Its name in reports and preset descriptions (e.g. "ProxyAnchor")."""
    preset_key: str
    """Its short name in preset file names (e.g. "proxyanchor")."""
    options: Mapping[str, Any]
    """The constructor's keyword options (``loss.params``) and their defaults."""
    paper_params: Mapping[str, Any] = field(default_factory=dict)
    """``loss.params`` of the paper presets (the recipe's values where they differ)."""
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The values a string option takes (read by the constructor and config validation)."""

    def load(self) -> type:
        """The loss class (imports torch)."""
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


LOSSES: dict[str, LossEntry] = {
    "proxy_anchor": LossEntry(
        "nirdml.losses.proxy_anchor:ProxyAnchorLoss",
        "ProxyAnchor",
        "proxyanchor",
        {"alpha": 32.0, "delta": 0.1, "positive_mean": "proxies"},
        {"alpha": 32.0, "delta": 0.1, "positive_mean": "samples"},
        {"positive_mean": ("proxies", "samples")},
    ),
    "proxy_nca": LossEntry(
        "nirdml.losses.proxy_nca:ProxyNCALoss",
        "ProxyNCA",
        "proxynca",
        {"scale": 9.0, "exclude_positive": False},
    ),
    "soft_triple": LossEntry(
        "nirdml.losses.soft_triple:SoftTripleLoss",
        "SoftTriple",
        "softtriple",
        {"centers_per_class": 10, "la": 20.0, "gamma": 0.1, "tau": 0.2, "margin": 0.01},
    ),
}
LOSS_NAMES = tuple(LOSSES)

NIR_OBJECTIVES = (
    "exp_nll",
    "nll",
    "noise_nll",
    "noise_nll_spread",
    "tangent_nll",
    "tangent_spread",
)
"""NIRLoss objectives: the authors' ``exp_nll``, the paper's ``nll``, then the bounded ones."""
BOUNDED_OBJECTIVES = NIR_OBJECTIVES[2:]
"""The noise-bounded objectives (the only ones that take ``sigma`` and ``ascend``)."""
SIGMA_MODES = ("relative", "absolute")


def params_problem(name: str, params: Mapping[str, Any]) -> str | None:
    """Why ``params`` do not fit loss ``name``'s constructor: an unknown option (with the
    closest one) or a value of another type than the option's default; None when they fit."""
    options = LOSSES[name].options
    for key, value in params.items():
        if key not in options:
            close = difflib.get_close_matches(str(key), list(options), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return (
                f"loss.params.{key} is not an option of {name}.{hint} Valid options: "
                f"{', '.join(options)}."
            )
        if not _fits(value, options[key]):
            return (
                f"loss.params.{key} of {name} must be {_KIND_NAMES[type(options[key])]} "
                f"(default {options[key]!r}), got {value!r}"
            )
        allowed = LOSSES[name].choices.get(key)
        if allowed is not None and value not in allowed:
            return f"loss.params.{key} of {name} must be one of {', '.join(allowed)}, not {value!r}"
    return None


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the type of the option's ``default`` (an int fits a float)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
