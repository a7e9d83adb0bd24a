"""Proxy losses and NIR on top of them (docs/architecture.md, losses contract).

The names are imported lazily (PEP 562), so the torch-free table
:mod:`nirdml.losses.registry` is read by config validation without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.runtime import lazy_attributes

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "ProxyCriterion": "nirdml.losses.base",
    "ProxyLoss": "nirdml.losses.base",
    "INERT_THRESHOLD": "nirdml.losses.nir",
    "OBJECTIVES": "nirdml.losses.nir",
    "NIRLoss": "nirdml.losses.nir",
    "nir_diagnostics": "nirdml.losses.nir",
    "PMLProxyLoss": "nirdml.losses.pml",
    "ProxyAnchorLoss": "nirdml.losses.proxy_anchor",
    "ProxyNCALoss": "nirdml.losses.proxy_nca",
    "SoftTripleLoss": "nirdml.losses.soft_triple",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from nirdml.losses.base import ProxyCriterion, ProxyLoss
    from nirdml.losses.nir import INERT_THRESHOLD, OBJECTIVES, NIRLoss, nir_diagnostics
    from nirdml.losses.pml import PMLProxyLoss
    from nirdml.losses.proxy_anchor import ProxyAnchorLoss
    from nirdml.losses.proxy_nca import ProxyNCALoss
    from nirdml.losses.soft_triple import SoftTripleLoss


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "INERT_THRESHOLD",
    "OBJECTIVES",
    "NIRLoss",
    "PMLProxyLoss",
    "ProxyAnchorLoss",
    "ProxyCriterion",
    "ProxyLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "nir_diagnostics",
]
