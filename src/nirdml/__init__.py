"""nirdml: Non-isotropy Regularization (NIR) for proxy-based Deep Metric Learning.

The pieces, from data to training (each also usable on its own)::

    nirdml.data        datasets, zero-shot splits, class-balanced samplers, transforms
    nirdml.models      backbones (ResNet, EfficientNet-Lite0, small CNN, timm) -> embeddings
    nirdml.losses      ProxyAnchor / ProxyNCA / SoftTriple, and NIRLoss on top of any of them
    nirdml.flow        the conditional normalizing flow of NIR
    nirdml.evaluation  exact retrieval, clustering and structure metrics
    nirdml.training    configs, the training loop, checkpoints, distributed training
"""

__version__ = "0.1.0"

from nirdml.data import ClassBalancedBatchSampler, build_transforms, load_dataset
from nirdml.errors import NonFiniteLossError
from nirdml.evaluation import compute_embeddings, evaluate
from nirdml.flow import ConditionalFlow
from nirdml.losses import (
    NIRLoss,
    PMLProxyLoss,
    ProxyAnchorLoss,
    ProxyLoss,
    ProxyNCALoss,
    SoftTripleLoss,
)
from nirdml.models import EmbeddingModel, build_model
from nirdml.training.config import RunConfig, load_config
from nirdml.training.trainer import train

__all__ = [
    "ClassBalancedBatchSampler",
    "ConditionalFlow",
    "EmbeddingModel",
    "NIRLoss",
    "NonFiniteLossError",
    "PMLProxyLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "RunConfig",
    "SoftTripleLoss",
    "build_model",
    "build_transforms",
    "compute_embeddings",
    "evaluate",
    "load_config",
    "load_dataset",
    "train",
    "__version__",
]
