"""FrEIA's weight layout: the authors' initial draw and the import of their state_dict.

FrEIA 0.2's ``GraphINN`` stores block k's permutation under ``module_list.{2k}.perm`` and its
coupling subnets under ``module_list.{2k+1}.subnet{1,2}.{2j}.{weight,bias}`` (the condition
columns appended to each first layer). :func:`initial_layout` draws fresh weights in that
layout and order, :func:`freia_layout` reads and checks an authors' state_dict, and
:func:`load_layout` copies either into the flow's stacked weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from nirdml.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from nirdml.flow.model import ConditionalFlow


def _linear_init(
    out_features: int, in_features: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Weight and bias drawn as ``nn.Linear.reset_parameters`` draws them, in the same order."""
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bias = torch.empty(out_features)
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound, generator=generator)
    return weight, bias


def freia_shapes(flow: ConditionalFlow, k: int) -> tuple[tuple[str, int, int], ...]:
    """(FrEIA subnet name, in_features, out_features) of block k, in FrEIA's build order."""
    extra = flow.cond_dim if k in flow.cond_slots else 0
    return (
        ("subnet1", flow.len1 + extra, 2 * flow.len2),
        ("subnet2", flow.len2 + extra, 2 * flow.len1),
    )


def _subnet_dims(flow: ConditionalFlow, d_in: int, d_out: int) -> list[int]:
    """Widths of a coupling subnet's layers, input to output (shared by draw and import)."""
    return [d_in] + [flow.hidden_width] * (flow.hidden_layers - 1) + [d_out]


def initial_layout(flow: ConditionalFlow, generator: torch.Generator | None) -> dict[str, Tensor]:
    """Fresh weights in FrEIA's layout, drawn as the authors' code draws them (FrEIA order,
    then the embedder), so the same ``torch.manual_seed`` gives the authors' initial flow."""
    layout: dict[str, Tensor] = {}
    for k in range(flow.num_blocks):
        layout[f"module_list.{2 * k}.perm"] = flow.permutations[k].clone()
        for name, d_in, d_out in freia_shapes(flow, k):
            dims = _subnet_dims(flow, d_in, d_out)
            for j in range(flow.hidden_layers):
                w, b = _linear_init(dims[j + 1], dims[j], generator)
                layout[f"module_list.{2 * k + 1}.{name}.{2 * j}.weight"] = w
                layout[f"module_list.{2 * k + 1}.{name}.{2 * j}.bias"] = b
    if flow.embedder is not None:
        for key, value in flow.embedder.state_dict().items():
            if key.endswith("weight"):
                w, b = _linear_init(value.shape[0], value.shape[1], generator)
                layout[f"embedder.{key}"] = w
                layout[f"embedder.{key[: -len('weight')]}bias"] = b
    return layout


@torch.no_grad()
def load_layout(flow: ConditionalFlow, layout: Mapping[str, Tensor]) -> None:
    """Copy a validated FrEIA-layout dict (GraphINN keys, ``embedder.*``) into the flow's
    stacked weights."""
    n_hidden, W = flow.hidden_layers - 2, flow.hidden_width
    for k in range(flow.num_blocks):
        perm = layout[f"module_list.{2 * k}.perm"].to(torch.long)
        flow.permutations[k].copy_(perm)
        flow.inverse_permutations[k].copy_(torch.argsort(perm))
        slot = flow.cond_slots.get(k)
        for side, name, in_w, out_w, out_b in (
            (0, "subnet2", flow.in_weight_a, flow.out_weight_a, flow.out_bias_a),
            (1, "subnet1", flow.in_weight_b, flow.out_weight_b, flow.out_bias_b),
        ):
            key = f"module_list.{2 * k + 1}.{name}"
            rows = slice(side * W, (side + 1) * W)
            w0 = layout[f"{key}.0.weight"]
            n_in = in_w.shape[2]
            in_w[k].copy_(w0[:, :n_in])
            flow.in_bias[k, rows].copy_(layout[f"{key}.0.bias"])
            if slot is not None:
                flow.cond_weight[slot, rows].copy_(w0[:, n_in:])
            for j in range(1, flow.hidden_layers - 1):
                idx = (2 * k + side) * n_hidden + (j - 1)
                flow.hidden_weight[idx].copy_(layout[f"{key}.{2 * j}.weight"])
                flow.hidden_bias[idx].copy_(layout[f"{key}.{2 * j}.bias"])
            last = 2 * (flow.hidden_layers - 1)
            out_w[k].copy_(layout[f"{key}.{last}.weight"])
            out_b[k].copy_(layout[f"{key}.{last}.bias"])
    if flow.embedder is not None:
        flow.embedder.load_state_dict(
            {name: layout[f"embedder.{name}"] for name in flow.embedder.state_dict()}
        )


def freia_layout(flow: ConditionalFlow, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The flow's weights in FrEIA's layout from the authors' state_dict, every key and shape
    checked against the flow's configuration (a mismatch names the key and the fix)."""
    order = _graph_modules(flow, state_dict)
    layout: dict[str, Tensor] = {}
    for k in range(flow.num_blocks):
        perm, coupling = order[2 * k], order[2 * k + 1]
        layout[f"module_list.{2 * k}.perm"] = _checked_perm(flow, k, perm)
        for subnet in freia_shapes(flow, k):
            layout.update(_subnet_layout(flow, k, coupling, subnet))
    layout.update(_embedder_layout(flow, state_dict))
    return layout


def _graph_modules(
    flow: ConditionalFlow, state_dict: Mapping[str, Tensor]
) -> list[dict[str, Tensor]]:
    """The GraphINN's modules in order, checked to be one flow of num_blocks blocks."""
    pattern = re.compile(r"^(.*?)module_list\.(\d+)\.(.+)$")
    prefixes: set[str] = set()
    modules: dict[int, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        m = pattern.match(key)
        if m:
            prefixes.add(m.group(1))
            modules.setdefault(int(m.group(2)), {})[m.group(3)] = value
    if not modules:
        raise InputError(
            "no FrEIA GraphINN keys ('...module_list.<i>....') in the state_dict: pass the "
            "state_dict of the authors' flow (GraphINN) or of their NIR criterion"
        )
    if len(prefixes) > 1:
        raise InputError(
            f"the state_dict holds several flows (key prefixes {sorted(prefixes)}): pass "
            "only one flow's entries"
        )
    order = [modules[i] for i in sorted(modules)]
    kinds = ["perm" if "perm" in m else "coupling" for m in order]
    if kinds != ["perm", "coupling"] * flow.num_blocks:
        raise InputError(
            f"expected the authors' graph of {flow.num_blocks} x [PermuteRandom, "
            f"GLOWCouplingBlock], found modules {kinds}: build "
            "ConditionalFlow(num_blocks=...) to match the checkpoint"
        )
    return order


def _checked_perm(flow: ConditionalFlow, k: int, perm: Mapping[str, Tensor]) -> Tensor:
    """Block k's permutation (int64, CPU), checked against range(dim) and any 'perm_inv'."""
    arange = torch.arange(flow.dim)
    p = perm["perm"].detach().cpu().long()
    if p.shape != (flow.dim,) or not torch.equal(p.sort().values, arange):
        raise InputError(
            f"block {k}: 'perm' is not a permutation of range({flow.dim}) (shape "
            f"{tuple(p.shape)}): build ConditionalFlow(dim=...) with the checkpoint's dim"
        )
    if "perm_inv" in perm and not torch.equal(perm["perm_inv"].cpu().long()[p], arange):
        raise InputError(f"block {k}: 'perm_inv' is not the inverse of 'perm'")
    return p


def _linear_ids(
    flow: ConditionalFlow, k: int, coupling: Mapping[str, Tensor], name: str
) -> list[int]:
    """Checkpoint indices of subnet ``name``'s Linear layers, checked to be hidden_layers."""
    ids = sorted(
        int(m.group(1)) for key in coupling if (m := re.fullmatch(rf"{name}\.(\d+)\.weight", key))
    )
    if len(ids) != flow.hidden_layers:
        raise InputError(
            f"block {k} {name}: the checkpoint has {len(ids)} Linear layers, this "
            f"flow hidden_layers={flow.hidden_layers}: build "
            "ConditionalFlow(hidden_layers=...) to match"
        )
    return ids


def _subnet_layout(
    flow: ConditionalFlow,
    k: int,
    coupling: Mapping[str, Tensor],
    subnet: tuple[str, int, int],
) -> dict[str, Tensor]:
    """Block k's subnet (name, in, out) in FrEIA's layout, each weight and bias shape-checked."""
    name, d_in, d_out = subnet
    dims = _subnet_dims(flow, d_in, d_out)
    layout: dict[str, Tensor] = {}
    for j, lid in enumerate(_linear_ids(flow, k, coupling, name)):
        for part, shape in (("weight", (dims[j + 1], dims[j])), ("bias", (dims[j + 1],))):
            src = f"{name}.{lid}.{part}"
            if src not in coupling:
                raise InputError(f"block {k}: '{src}' is missing from the checkpoint")
            if tuple(coupling[src].shape) != shape:
                raise InputError(
                    f"block {k} '{src}' has shape {tuple(coupling[src].shape)}, "
                    f"expected {shape} (dim={flow.dim}, hidden_width="
                    f"{flow.hidden_width}, block conditioned: {k in flow.cond_slots}): "
                    "build ConditionalFlow(dim=..., hidden_width=..., "
                    "condition_blocks=...) to match the checkpoint"
                )
            layout[f"module_list.{2 * k + 1}.{name}.{2 * j}.{part}"] = coupling[src]
    return layout


def _embedder_layout(flow: ConditionalFlow, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``embedder.*`` entries, checked against the flow's embedder (empty: it has none)."""
    emb = {
        f"embedder.{m.group(1)}": v
        for key, v in state_dict.items()
        if (m := re.match(r"^(?:.*\.)?embedder\.(.+)$", key))
    }
    if flow.embedder is None:
        if emb:
            raise InputError(
                "the checkpoint has a condition embedder (authors' cond_mode 'dense_embed' "
                "or 'dense_embed_multi'): build ConditionalFlow(condition='embed' or "
                "'embed_per_block')"
            )
        return {}
    own = {f"embedder.{k}": v for k, v in flow.embedder.state_dict().items()}
    if set(own) != set(emb):
        raise InputError(
            f"condition={flow.condition!r} needs the embedder weights {sorted(own)}, the "
            f"checkpoint has {sorted(emb)}: pass the authors' whole criterion state_dict "
            "(it holds normflow_cond_prep.embedder.*) or merge those keys in"
        )
    for key, value in own.items():
        if emb[key].shape != value.shape:
            raise InputError(
                f"'{key}' has shape {tuple(emb[key].shape)}, expected {tuple(value.shape)}"
            )
    return emb
