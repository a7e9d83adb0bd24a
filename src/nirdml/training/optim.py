"""Optimizer groups and learning-rate schedule of the paper's recipe (method.md section 5).

Groups: ``backbone`` and ``head`` (base lr, L2 weight decay), then the loss's own groups
(``proxies`` at lr x proxy_lr_mult, ``flow`` at lr x flow_lr_mult, no weight decay).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from nirdml.errors import InputError
from nirdml.training.config import OPTIMIZERS, OptimConfig


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def param_groups(model: nn.Module, loss: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Named optimizer groups for the embedding model and the loss module."""
    groups = [
        {
            "name": "backbone",
            "params": _trainable(model.backbone_parameters()),
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
        },
        {
            "name": "head",
            "params": _trainable(model.head_parameters()),
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
        },
    ]
    groups += loss.param_groups(cfg.lr, cfg.proxy_lr_mult, cfg.flow_lr_mult)
    groups = [g for g in groups if len(list(g["params"])) > 0]
    seen: set[int] = set()
    for group in groups:
        group["params"] = list(group["params"])
        for p in group["params"]:
            if id(p) in seen:
                raise InputError(f"parameter appears in two optimizer groups ({group['name']})")
            seen.add(id(p))
    return groups


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam (L2 decay, as the authors) or AdamW (decoupled), fused where the build allows."""
    cls = getattr(torch.optim, OPTIMIZERS[cfg.name])
    try:
        return cls(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch / unsupported device
        return cls(groups, lr=cfg.lr, foreach=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR stepped once per epoch (milestones in epochs)."""
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma
    )


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr of every named group, for logging."""
    return {f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
