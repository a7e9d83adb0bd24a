"""EmbeddingModel: backbone -> global pooling -> Linear head -> L2-normalised embedding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EmbeddingModel", "PooledEmbedding"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class EmbeddingModel(nn.Module):
    """Image -> unit-norm embedding, split so a trainer can freeze the backbone cheaply.

    ``features(x)`` runs backbone + pooling (run it under ``torch.no_grad()`` for the
    warmup epochs), ``embed(features)`` runs the head and the L2 normalisation, and
    ``forward(x) == embed(features(x))``. ``spec`` records how the model was built, so a
    checkpoint can rebuild it with :func:`nirdml.models.model_from_spec`.

    Under mixed precision the embeddings are normalised and returned in float32: the proxy
    losses scale cosine similarities by up to 32 and the flow takes log-determinants, both
    too sensitive for half precision.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pool: nn.Module,
        num_features: int,
        embed_dim: int,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = nn.Linear(num_features, embed_dim)
        self.spec: dict[str, Any] = dict(spec or {})

    @property
    def num_features(self) -> int:
        """Width F of the pooled backbone features."""
        return self.head.in_features

    @property
    def embed_dim(self) -> int:
        """Dimension D of the embeddings."""
        return self.head.out_features

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (B, F)."""
        return self.pool(self.backbone(x))

    def embed(self, features: Tensor) -> Tensor:
        """Head + L2 normalisation: (B, F) -> (B, D) unit vectors."""
        z = self.head(features)
        if z.dtype in _LOW_PRECISION:
            z = z.float()
        return F.normalize(z, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone parameters to optimise (frozen BN affine parameters excluded)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of the Linear head."""
        return [p for p in self.head.parameters() if p.requires_grad]

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class PooledEmbedding(nn.Module):
    """A model's pooled backbone features, L2-normalised, as embeddings: no head. Before
    training it is the untrained reference every run is compared with ("epoch 0")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.model.features(x).float(), dim=-1)
