"""Embedding models: backbones (torchvision ResNet, EfficientNet-Lite0, small CNN, timm),
frozen BatchNorm, global pooling and the L2-normalised embedding head.

Entry point: :func:`build_model` -> :class:`EmbeddingModel`. The backbones are listed
once, in :mod:`nirdml.models.registry`. The names are imported lazily (PEP 562), so config
validation reads that torch-free table without importing torch.
"""

from __future__ import annotations

from nirdml.runtime import lazy_attributes

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "EfficientNetLite0Backbone": "nirdml.models.backbones",
    "InputRenorm": "nirdml.models.backbones",
    "ResNetBackbone": "nirdml.models.backbones",
    "TimmBackbone": "nirdml.models.backbones",
    "FrozenBatchNorm2d": "nirdml.models.batchnorm",
    "FrozenBatchNormAct2d": "nirdml.models.batchnorm",
    "freeze_batchnorm": "nirdml.models.batchnorm",
    "EmbeddingModel": "nirdml.models.embedding",
    "PooledEmbedding": "nirdml.models.embedding",
    "PooledFeatures": "nirdml.models.head",
    "split_backbone": "nirdml.models.head",
    "build_model": "nirdml.models.factory",
    "model_from_spec": "nirdml.models.factory",
    "FeatureHead": "nirdml.models.head",
    "FrozenBackboneModel": "nirdml.models.head",
    "HeadModel": "nirdml.models.head",
    "compose_frozen": "nirdml.models.head",
    "weights_identity": "nirdml.models.head",
    "POOLINGS": "nirdml.models.registry",
    "build_pooling": "nirdml.models.pooling",
    "ARCHS": "nirdml.models.registry",
    "SmallCNN": "nirdml.models.small_cnn",
    "WeightsUnavailableError": "nirdml.models.weights",
    "read_state_dict": "nirdml.models.weights",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

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
    "PooledEmbedding",
    "PooledFeatures",
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
    "split_backbone",
    "weights_identity",
]
