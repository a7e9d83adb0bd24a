"""The NIR inertness alarm: is the regulariser's gradient on the embeddings negligible?

One batch per logging interval NIRLoss measures its tangent gradient on the embeddings
relative to the proxy loss's (``ALARM_KEYS``); at the end of an epoch the probes become the
epoch's alarm columns, a warning that says what to change, and summary.json's ``nir_alarm``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from nirdml.training.config import RunConfig

ALARM_KEYS = ("grad_ratio", "grad_nir", "grad_proxy", "nll_min", "nll_max")
"""NIRLoss diagnostics measured on one batch per logging interval (the inertness alarm)."""


def alarm_row(probes: list[dict[str, Tensor]], threshold: float) -> dict[str, float]:
    """An epoch's alarm columns from its probes (one host read, at the end of the epoch):
    geometric mean and max of the tangent gradient ratio NIR / proxy, NLL min / max, and
    ``nir_inert`` (1 when every probe's ratio is below ``threshold``)."""
    stacked = {k: torch.stack([p[k].detach().double() for p in probes]) for k in probes[0]}
    ratio = stacked["grad_ratio"]
    finite = ratio[torch.isfinite(ratio)]
    values = torch.stack(
        [
            finite.clamp_min(1e-300).log().mean().exp()
            if finite.numel()
            else ratio.new_tensor(math.nan),
            finite.max() if finite.numel() else ratio.new_tensor(math.nan),
            stacked["nll_min"].min(),
            stacked["nll_max"].max(),
        ]
    ).tolist()
    inert = bool(finite.numel()) and values[1] < threshold
    return {
        "train/nir_grad_ratio": values[0],
        "train/nir_grad_ratio_max": values[1],
        "train/nll_min": values[2],
        "train/nll_max": values[3],
        "train/nir_inert": int(inert),
    }


def inert_message(row: dict[str, Any], cfg: RunConfig) -> str:
    """The one-line warning of an inert NIR epoch: what was measured, what to change."""
    n = cfg.loss.nir
    msg = (
        f"NIR is inert in epoch {row['epoch']}: its gradient on the embeddings stayed below "
        f"{n.alarm_threshold:g} of the proxy loss's (max {row['train/nir_grad_ratio_max']:.1e} "
        f"over the measured batches; NLL {row['train/nll_min']:.3g} to "
        f"{row['train/nll_max']:.3g}), so the regulariser does nothing. "
    )
    if n.detach_inputs or n.nir_scale == 0 or (n.nir_weight == 0 and n.objective != "exp_nll"):
        return msg + "Expected for this control (loss.nir.detach_inputs / nir_scale=0)."
    if n.objective == "exp_nll":
        return msg + (
            "exp_nll saturates once the flow fits the sphere: for a term that acts, use a "
            "bounded objective (--set loss.nir.objective=tangent_spread: never inert in the "
            "benchmarks; with ProxyAnchor above the baseline when the backbone trains from "
            "scratch, level when fine-tuning a pretrained one; compare it with your baseline)."
        )
    return msg + "Raise loss.nir.nir_weight (or loss.nir.sigma for a bounded objective)."


def inert_summary(alarm: dict[str, Any] | None, epochs: int) -> str | None:
    """The end-of-run line when NIR was inert in more than one epoch (the first one was
    warned about with the advice, :func:`inert_message`); None otherwise."""
    inert = (alarm or {}).get("inert_epochs") or []
    if len(inert) < 2:
        return None
    return (
        f"NIR was inert in {len(inert)} of {epochs} epochs (first: epoch {inert[0]}, last: "
        f"epoch {inert[-1]}; per epoch: summary.json nir_alarm); the advice of the first "
        "warning applies"
    )


def alarm_summary(history: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any] | None:
    """summary.json's ``nir_alarm``: threshold, per-epoch ratio, inert epochs."""
    rows = [r for r in history if "train/nir_grad_ratio" in r]
    if not rows:
        return None
    return {
        "threshold": cfg.loss.nir.alarm_threshold,
        "grad_ratio_per_epoch": [r["train/nir_grad_ratio"] for r in rows],
        "inert_epochs": [r["epoch"] for r in rows if r.get("train/nir_inert")],
        "final_grad_ratio": rows[-1]["train/nir_grad_ratio"],
    }
