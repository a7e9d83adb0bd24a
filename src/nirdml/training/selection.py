"""Which epoch a run keeps, what validation could not tell, and whether training helped.

The rule, applied after every evaluation: keep the epoch with the highest selection metric
(``eval.select_metric``) on the validation split (the test split when there is none); a tie
goes to the higher :data:`TIE_BREAK` metric on the same split when it is computed, then to
the later epoch (more training). :func:`diagnose` says when the selection split cannot rank
epochs (too few classes, a saturated metric, tied values); :func:`verdict` compares the
kept epoch with the untrained reference ("epoch 0": the backbone's pooled features, no
head, on the same splits and metrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TIE_BREAK = "map@r"
"""Breaks ties of the selection metric (when computed and not the selection metric)."""
MIN_CLASSES = 5
"""Fewer classes than this in the selection split: its retrieval metrics rank epochs by
chance more than by quality (a 2-class validation split saturates quickly)."""
SATURATED = 0.999


def _value(row: Mapping[str, Any], key: str) -> float:
    """The row's value of ``key``; NaN or missing ranks below every number."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value)


def rank(row: Mapping[str, Any], split: str, metric: str) -> tuple[float, float]:
    """How an evaluated epoch ranks: (selection metric, tie-break metric) on ``split``."""
    tie = -math.inf if metric == TIE_BREAK else _value(row, f"{split}/{TIE_BREAK}")
    return _value(row, f"{split}/{metric}"), tie


def best_row(
    history: Sequence[Mapping[str, Any]], split: str, metric: str
) -> Mapping[str, Any] | None:
    """The evaluated epoch the rule keeps (what a finished run's best.pt holds); None when
    no epoch evaluated ``split/metric``."""
    best = None
    for row in history:
        if f"{split}/{metric}" in row and (
            best is None or rank(row, split, metric) >= rank(best, split, metric)
        ):
            best = row
    return best


def rule(split: str, metric: str, row: Mapping[str, Any] | None = None) -> str:
    """The rule in words (``row``: an evaluated epoch, to say whether the tie-break exists)."""
    tie = metric != TIE_BREAK and (row is None or f"{split}/{TIE_BREAK}" in row)
    return (
        f"the highest {split}/{metric}; ties go to "
        + (f"the higher {split}/{TIE_BREAK}, then " if tie else "")
        + "the later epoch"
    )


def diagnose(
    history: Sequence[Mapping[str, Any]], split: str, metric: str, num_classes: int | None
) -> dict[str, Any]:
    """What the selection split could not tell: ``tied_epochs`` (epochs sharing the best
    value of the selection metric) and ``warnings`` (sentences naming the cause and fix)."""
    key = f"{split}/{metric}"
    values = [(int(r["epoch"]), _value(r, key)) for r in history if key in r]
    out: dict[str, Any] = {"tied_epochs": [], "warnings": []}
    if not values:
        return out
    best = max(v for _, v in values)
    tied = [e for e, v in values if v == best]
    out["tied_epochs"] = tied if len(tied) > 1 else []
    notes = out["warnings"]
    if num_classes is not None and num_classes < MIN_CLASSES:
        few = f"the {split} split has only {num_classes} classes, too few to rank epochs"
        few += f" by {metric}"
        if split == "val":
            few += (
                f"; carve more (data.val_classes=N with N >= {MIN_CLASSES}) or use more "
                "training classes"
            )
        else:  # no validation split: data.val_classes=0, or too few training classes to carve
            few += (
                " (the run has no validation split to select on); use more classes: a "
                f"validation split of N >= {MIN_CLASSES} classes (data.val_classes=N) needs "
                "more than N training classes"
            )
        notes.append(few)
    if best >= SATURATED and len(values) > 1:
        notes.append(
            f"{key} is saturated ({best:.4f}): it cannot tell the epochs apart; a harder "
            "validation split (more classes) or another eval.select_metric (map@r) ranks them"
        )
    if len(tied) > 1:
        notes.append(
            f"epochs {_epoch_list(tied)} tie at {key} = {best:.4f}; the kept epoch "
            f"follows the rule: {rule(split, metric)}"
        )
    return out


def _epoch_list(epochs: Sequence[int], shown: int = 6) -> str:
    """``1, 2, 3`` or, for many, ``1, 2, 3, ..., 59, 60 (60 epochs)``."""
    if len(epochs) <= shown:
        return ", ".join(map(str, epochs))
    half = shown // 2
    head, tail = epochs[:half], epochs[-half:]
    return f"{', '.join(map(str, head))}, ..., {', '.join(map(str, tail))} ({len(epochs)} epochs)"


def verdict(
    best: Mapping[str, Any], reference: Mapping[str, float], metric: str
) -> dict[str, Any] | None:
    """Whether the kept epoch beats the untrained reference on the selection split: a dict
    with ``beats``, both values, their difference and a one-line ``message``; None when
    either is missing."""
    split = best.get("selected_on")
    key = f"{split}/{metric}"
    if not best or key not in reference or key not in best.get("metrics", {}):
        return None
    ours, ref = float(best["metrics"][key]), float(reference[key])
    beats = ours > ref
    message = (
        f"epoch {best['epoch']} {key} {ours:.4f} vs {ref:.4f} for the untrained features "
        f"(epoch 0): {'+' if ours >= ref else ''}{ours - ref:.4f}"
    )
    if beats:
        message = "training helped: " + message
    else:
        message = (
            "training did NOT help: "
            + message
            + ". The trained embedding retrieves no better than the backbone's pooled features "
            "it started from; try a lower optim.lr, fewer epochs, a larger model.embed_dim, or "
            "more training classes"
        )
    return {
        "split": split,
        "metric": metric,
        "selected": ours,
        "reference": ref,
        "delta": ours - ref,
        "beats": beats,
        "message": message,
    }
