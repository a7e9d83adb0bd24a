"""PMLProxyLoss: run NIR on top of a pytorch-metric-learning proxy loss."""

from __future__ import annotations

from torch import Tensor, nn

from nirdml.errors import InputError, InputTypeError
from nirdml.losses.base import ProxyLoss
from nirdml.losses.soft_triple import weighted_class_center

# attribute -> True when the classes are rows ((C, D)), False when columns ((D, C))
_PROXY_ATTRIBUTES = {"proxies": True, "W": False, "fc": False}


class PMLProxyLoss(ProxyLoss):
    """Adapter for a pytorch-metric-learning loss that holds class proxies.

    Accepts any PML loss with a ``num_classes`` attribute and its proxies in ``proxies``
    (``(C, D)``: ProxyAnchorLoss, ProxyNCALoss), ``W`` (``(D, C)``: NormalizedSoftmaxLoss,
    ArcFaceLoss, CosFaceLoss, ...) or ``fc`` (``(D, C*K)``: SoftTripleLoss). The PML loss
    computes the value (its own formula, reducer and regularisers); this adapter adds the
    :class:`ProxyLoss` interface NIR needs. ``proxies`` is a ``(C [* K], D)`` tensor: the PML
    parameter itself for row layouts, a transposed view of it otherwise (gradients reach the
    PML parameter either way). For SoftTriple the NIR condition is the class's
    similarity-weighted center, with PML's own ``gamma``.

    The optimizer group holds all of the PML loss's parameters (``pml_loss.parameters()``).
    Computation runs in the PML parameters' dtype with autocast off, so PML never re-casts
    its proxies.
    """

    def __init__(self, pml_loss: nn.Module) -> None:
        found = [
            a for a in _PROXY_ATTRIBUTES if isinstance(getattr(pml_loss, a, None), nn.Parameter)
        ]
        if not found or not hasattr(pml_loss, "num_classes"):
            raise InputTypeError(
                f"{type(pml_loss).__name__} has no class proxies: PMLProxyLoss needs a "
                "pytorch-metric-learning loss with `num_classes` and a `proxies`, `W` or `fc` "
                "parameter (e.g. ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss, ArcFaceLoss)"
            )
        attr = found[0]
        param: nn.Parameter = getattr(pml_loss, attr)
        rows = _PROXY_ATTRIBUTES[attr]
        num_classes = int(pml_loss.num_classes)
        centers = int(getattr(pml_loss, "centers_per_class", 1))
        n_rows = param.shape[0] if rows else param.shape[1]
        if n_rows != num_classes * centers:
            raise InputError(
                f"{type(pml_loss).__name__}.{attr} has {n_rows} proxies, expected num_classes "
                f"x centers_per_class = {num_classes * centers}"
            )
        super().__init__(num_classes, param.shape[1] if rows else param.shape[0])
        self.pml_loss = pml_loss
        self._attr = attr
        self._rows = rows
        self.centers_per_class = centers
        self.condition_per_class = centers == 1

    @property
    def proxies(self) -> Tensor:
        """``(C * K, D)`` view of the PML proxies (the parameter itself for row layouts)."""
        param = getattr(self.pml_loss, self._attr)
        return param if self._rows else param.t()

    def proxy_parameters(self) -> list[nn.Parameter]:
        return list(self.pml_loss.parameters())

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.pml_loss(embeddings, labels)

    def logits(self, embeddings: Tensor) -> Tensor:
        """The PML loss's own ``get_logits``."""
        get_logits = getattr(self.pml_loss, "get_logits", None)
        if get_logits is None:
            raise InputTypeError(
                f"{type(self.pml_loss).__name__} has no get_logits; compute scores from "
                "loss.proxies instead"
            )
        return get_logits(embeddings)

    def class_condition(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.centers_per_class == 1:
            return super().class_condition(embeddings, labels)
        return weighted_class_center(
            embeddings, self.proxies, labels, self.centers_per_class, float(self.pml_loss.gamma)
        )

    def extra_repr(self) -> str:
        return f"proxies from {type(self.pml_loss).__name__}.{self._attr}"
