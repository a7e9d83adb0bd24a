"""The controls the paper never ran, and the bounded NIR objectives, for ANY dataset config.

Every arm is a shipped preset (or YAML path) plus ``key=value`` overrides, built from two
base presets: a tuned baseline (``base``, e.g. ``omniglot``) and its + NIR preset (``nir``,
e.g. ``omniglot-nir``, same knobs plus ``loss.nir``). ``extra`` overrides (``--set``) go to
every arm, e.g. a frozen-feature switch or a data root layout option. Arms:

``base``               the baseline preset as it is.
``base-decay``         + the recipe's coupled Adam L2 decay (``RECIPE_DECAY`` if the base
                       has none; identical to ``base`` otherwise, then trained once).
``base-scaled-decay``  + the proxy loss scaled by ``proxy_weight`` (0.01) under that decay:
                       ``exp_nll`` with ``nir_scale=0`` (``L = 0.01 L_proxy``; the flow gets
                       zero gradients), i.e. decay ~100x stronger relative to the loss.
``base-proxylr``       + the recipe's proxy lr: ``recipe_proxy_lr_mult``, by default 2x the
                       base's (the authors' x4000 for NIR vs x2000 for the baseline; pass
                       4000 for a base at the paper's lr 1e-5).
``base-warmup``        + ``optim.warmup_epochs=1`` (backbone frozen in epoch 1).
``recipe-nir``         the authors' NIR recipe: ``exp_nll``, proxy_weight 0.01, decay,
                       the recipe's proxy lr, warmup 1, the nir preset's flow group.
``recipe-nir-x0``      the same with the NIR term multiplied by zero (``nir_scale=0``).
``recipe-nir-detached`` the same with ``detach_inputs=true``: the flow trains but cannot act.
``nir``                the nir preset as it is (its own objective and knobs).
``nir-exp_nll``        the nir preset with the authors' form (``objective=exp_nll``), whatever
                       objective the preset ships with.
``nir-nll``            the nir preset with the paper's plain-NLL form (``objective=nll``).
``nir-<objective>``    the nir preset with a bounded objective (its recommended defaults):
                       ``noise_nll``, ``noise_nll_spread``, ``tangent_nll``, ``tangent_spread``.

Paired differences are taken against ``base`` (and, for the ``recipe-*`` arms, against
``recipe-nir-x0``, which isolates the NIR term within the recipe).

Frozen backbones (``model.frozen=true`` without ``model.cut``): warmup means nothing there
(the config refuses it), so the ``recipe-*`` arms leave ``optim.warmup_epochs`` at 0 and
``base-warmup`` is refused. With a cut (partial fine-tuning) the upper stages train, and the
recipe's warmup applies to them as to a whole backbone.
"""

from __future__ import annotations

from typing import Any

from nirdml.losses.nir import BOUNDED
from nirdml.training.config import load_config
from study.grid import RunSpec

RECIPE_DECAY = 4e-4
"""The authors' L2 weight decay on backbone + head (Adam's coupled form)."""
RECIPE_PROXY_WEIGHT = 0.01
"""The authors' proxy-loss weight in exp_nll (Cars196; CUB200 0.0075)."""

BOUNDED_ARMS = tuple(f"nir-{objective}" for objective in BOUNDED)
ARMS = (
    "base",
    "base-decay",
    "base-scaled-decay",
    "base-proxylr",
    "base-warmup",
    "recipe-nir",
    "recipe-nir-x0",
    "recipe-nir-detached",
    "nir",
    "nir-exp_nll",
    "nir-nll",
    *BOUNDED_ARMS,
)
"""Every arm, in run order (the controls first)."""
REFERENCE = {arm: "base" for arm in ARMS if arm != "base"}
REFERENCE_RECIPE = {"recipe-nir": "recipe-nir-x0", "recipe-nir-detached": "recipe-nir-x0"}
"""Second reference of the recipe arms: the recipe itself with the NIR term x 0."""


def _recipe(
    base_preset: str, extra: tuple[str, ...], proxy_lr_mult: float | None
) -> dict[str, Any]:
    """The recipe's knobs relative to the base preset: its decay (``RECIPE_DECAY`` if it has
    none) and proxy lr multiplier (``proxy_lr_mult``, or 2x the base's)."""
    cfg = load_config(base_preset, list(extra))
    decay = cfg.optim.weight_decay if cfg.optim.weight_decay > 0 else RECIPE_DECAY
    mult = 2.0 * cfg.optim.proxy_lr_mult if proxy_lr_mult is None else float(proxy_lr_mult)
    frozen = bool(cfg.model.frozen) and cfg.model.cut is None
    return {"decay": decay, "proxy_lr_mult": mult, "frozen": frozen}


def arm_spec(
    arm: str,
    seed: int,
    base_preset: str,
    nir_preset: str,
    extra: tuple[str, ...] = (),
    prefix: str = "ctl",
    recipe_proxy_lr_mult: float | None = None,
) -> RunSpec:
    """One arm on one seed (see the module docstring)."""
    if arm not in ARMS:
        import difflib

        close = difflib.get_close_matches(arm, ARMS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown arm {arm!r}.{hint} Arms: {', '.join(ARMS)}")
    r = _recipe(base_preset, extra, recipe_proxy_lr_mult)
    if r["frozen"] and arm == "base-warmup":
        raise ValueError(
            "base-warmup does not apply to a frozen backbone (model.frozen=true, no model.cut)"
        )
    scaled = (
        "loss.nir.objective=exp_nll",
        "loss.nir.nir_scale=0",
        f"loss.nir.proxy_weight={RECIPE_PROXY_WEIGHT}",
    )
    recipe = (
        "loss.nir.objective=exp_nll",
        f"loss.nir.proxy_weight={RECIPE_PROXY_WEIGHT}",
        f"optim.weight_decay={r['decay']}",
        f"optim.proxy_lr_mult={r['proxy_lr_mult']}",
        *(() if r["frozen"] else ("optim.warmup_epochs=1",)),
    )
    table: dict[str, tuple[str, tuple[str, ...]]] = {
        "base": (base_preset, ()),
        "base-decay": (base_preset, (f"optim.weight_decay={r['decay']}",)),
        "base-scaled-decay": (nir_preset, (*scaled, f"optim.weight_decay={r['decay']}")),
        "base-proxylr": (base_preset, (f"optim.proxy_lr_mult={r['proxy_lr_mult']}",)),
        "base-warmup": (base_preset, ("optim.warmup_epochs=1",)),
        "recipe-nir": (nir_preset, recipe),
        "recipe-nir-x0": (nir_preset, (*recipe, "loss.nir.nir_scale=0")),
        "recipe-nir-detached": (nir_preset, (*recipe, "loss.nir.detach_inputs=true")),
        "nir": (nir_preset, ()),
        "nir-exp_nll": (nir_preset, ("loss.nir.objective=exp_nll",)),
        "nir-nll": (nir_preset, ("loss.nir.objective=nll",)),
    }
    for objective in BOUNDED:
        table[f"nir-{objective}"] = (nir_preset, (f"loss.nir.objective={objective}",))
    preset, overrides = table[arm]
    return RunSpec(f"{prefix}-{arm}", seed, preset, (*extra, *overrides))


def control_specs(
    base_preset: str,
    nir_preset: str,
    seeds: tuple[int, ...],
    arms: tuple[str, ...] = ARMS,
    extra: tuple[str, ...] = (),
    prefix: str = "ctl",
    recipe_proxy_lr_mult: float | None = None,
) -> list[RunSpec]:
    """Every arm on every seed, seed-major (a partial study is still complete pairs)."""
    return [
        arm_spec(arm, seed, base_preset, nir_preset, extra, prefix, recipe_proxy_lr_mult)
        for seed in seeds
        for arm in arms
    ]
