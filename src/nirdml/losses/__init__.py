"""Proxy losses and NIR on top of them (docs/architecture.md, losses contract)."""

from nirdml.losses.base import ProxyLoss
from nirdml.losses.nir import INERT_THRESHOLD, OBJECTIVES, NIRLoss, nir_diagnostics
from nirdml.losses.pml import PMLProxyLoss
from nirdml.losses.proxy_anchor import ProxyAnchorLoss
from nirdml.losses.proxy_nca import ProxyNCALoss
from nirdml.losses.soft_triple import SoftTripleLoss

__all__ = [
    "INERT_THRESHOLD",
    "OBJECTIVES",
    "NIRLoss",
    "PMLProxyLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "nir_diagnostics",
]
