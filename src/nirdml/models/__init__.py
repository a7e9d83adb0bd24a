"""Embedding models: backbones (torchvision ResNet, EfficientNet-Lite0, small CNN, timm),
frozen BatchNorm, global pooling and the L2-normalised embedding head.

Entry point: :func:`build_model` -> :class:`EmbeddingModel`.
"""

from __future__ import annotations

from .backbones import (
    EfficientNetLite0Backbone,
    InputRenorm,
    ResNetBackbone,
    TimmBackbone,
)
from .batchnorm import FrozenBatchNorm2d, FrozenBatchNormAct2d, freeze_batchnorm
from .embedding import EmbeddingModel
from .factory import ARCHS, build_model, model_from_spec
from .head import FeatureHead, FrozenBackboneModel, HeadModel, compose_frozen, weights_identity
from .pooling import POOLINGS, build_pooling
from .small_cnn import SmallCNN
from .weights import WeightsUnavailableError, read_state_dict

__all__ = [
    "ARCHS",
    "POOLINGS",
    "EfficientNetLite0Backbone",
    "EmbeddingModel",
    "FeatureHead",
    "FrozenBackboneModel",
    "HeadModel",
    "FrozenBatchNorm2d",
    "FrozenBatchNormAct2d",
    "InputRenorm",
    "ResNetBackbone",
    "SmallCNN",
    "TimmBackbone",
    "WeightsUnavailableError",
    "build_model",
    "build_pooling",
    "compose_frozen",
    "freeze_batchnorm",
    "model_from_spec",
    "read_state_dict",
    "weights_identity",
]
