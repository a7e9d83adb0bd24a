"""nirdml: Non-isotropy Regularization (NIR) for proxy-based Deep Metric Learning.

The pieces, from data to training (each also usable on its own)::

    nirdml.data        datasets, zero-shot splits, class-balanced samplers, transforms
    nirdml.models      backbones (ResNet, EfficientNet-Lite0, small CNN, timm) -> embeddings
    nirdml.losses      ProxyAnchor / ProxyNCA / SoftTriple, and NIRLoss on top of any of them
    nirdml.flow        the conditional normalizing flow of NIR
    nirdml.evaluation  exact retrieval, clustering and structure metrics
    nirdml.training    configs, the training loop, checkpoints, distributed training

The top-level names are imported lazily (PEP 562), so ``import nirdml`` and the ``nirdml``
command's ``--help``, ``--version`` and config errors do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.runtime import __version__, lazy_attributes

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "ClassBalancedBatchSampler": "nirdml.data",
    "build_transforms": "nirdml.data",
    "load_dataset": "nirdml.data",
    "NonFiniteLossError": "nirdml.errors",
    "compute_embeddings": "nirdml.evaluation",
    "evaluate": "nirdml.evaluation",
    "ConditionalFlow": "nirdml.flow",
    "NIRLoss": "nirdml.losses",
    "PMLProxyLoss": "nirdml.losses",
    "ProxyAnchorLoss": "nirdml.losses",
    "ProxyLoss": "nirdml.losses",
    "ProxyNCALoss": "nirdml.losses",
    "SoftTripleLoss": "nirdml.losses",
    "EmbeddingModel": "nirdml.models",
    "build_model": "nirdml.models",
    "RunConfig": "nirdml.training.config",
    "load_config": "nirdml.training.config",
    "train": "nirdml.training.trainer",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
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


_SUBMODULES = ("analysis", "data", "evaluation", "export", "flow", "losses", "models", "training")


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)

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
