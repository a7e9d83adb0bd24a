"""Global pooling of a backbone feature map (B, F, H, W) to a feature vector (B, F).

``"avg+max"`` is the sum of the average and the max pooled vectors: the authors' "double"
pooling (their code adds ``avgpool(x) + maxpool(x)``).
"""

from __future__ import annotations

from torch import Tensor, nn

from nirdml.errors import InputError
from nirdml.models.registry import POOLINGS

__all__ = [
    "POOLINGS",
    "POOLING_CLASSES",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GlobalAvgMaxPool",
    "build_pooling",
]


class GlobalAvgPool(nn.Module):
    """Mean over the spatial positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class GlobalMaxPool(nn.Module):
    """Maximum over the spatial positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=(-2, -1))


class GlobalAvgMaxPool(nn.Module):
    """Average pooling plus max pooling (the authors' "double" pooling)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1)) + x.amax(dim=(-2, -1))


POOLING_CLASSES: dict[str, type[nn.Module]] = dict(
    zip(POOLINGS, (GlobalAvgPool, GlobalMaxPool, GlobalAvgMaxPool), strict=True)
)
"""The module of each pooling of the table (:data:`nirdml.models.registry.POOLINGS`)."""


def build_pooling(name: str) -> nn.Module:
    """The pooling module called ``name`` (one of :data:`POOLINGS`)."""
    try:
        return POOLING_CLASSES[name]()
    except KeyError:
        raise InputError(
            f"Unknown pooling {name!r}: use one of {', '.join(repr(k) for k in POOLINGS)} "
            "('avg+max' is the authors' 'double' pooling)."
        ) from None
