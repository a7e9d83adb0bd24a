"""The loss contract: :class:`ProxyCriterion`, what callers rely on in any criterion, and
:class:`ProxyLoss`, the base class every proxy loss implements (docs/architecture.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import InputError, InputTypeError, LossCallError
from nirdml.runtime import no_autocast


def init_proxies(num_rows: int, dim: int, generator: torch.Generator | None) -> nn.Parameter:
    """The authors' proxy init ``randn(rows, dim) / 8``.

    Only the direction matters to the losses (all normalise), but the norm sets how fast
    Adam turns the proxies, so the published lr multipliers (x2000 / x4000) assume it.
    """
    return nn.Parameter(torch.randn(num_rows, dim, generator=generator) / 8)


@runtime_checkable
class ProxyCriterion(Protocol):
    """A criterion with class proxies: ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss,
    PMLProxyLoss and NIRLoss implement it. Training, analysis and export type against it
    (no ``hasattr`` probes): every criterion has all of these members."""

    num_classes: int
    """The number of training classes C."""
    embed_dim: int
    """The embedding size D."""
    last_stats: dict[str, Tensor]
    """Detached 0-dim tensors of the last forward (at least ``"proxy_loss"``; ``{}``
    before the first), read without a host sync."""

    @property
    def proxies(self) -> Tensor:
        """``(C, D)`` proxies (``(C * K, D)`` with K centers per class)."""
        ...

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The scalar loss of a batch."""
        ...

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) class scores of the embeddings (higher: closer to the class's proxies), as
        pytorch-metric-learning's ``get_logits``."""
        ...

    def class_condition(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, D) L2-normalised proxy of each sample's own class, NOT detached (SoftTriple:
        the class's similarity-weighted center)."""
        ...

    def param_groups(
        self, lr: float, proxy_lr_mult: float, flow_lr_mult: float = 1.0
    ) -> list[dict]:
        """Optimizer groups of the criterion's own parameters, each with "name", "params",
        "lr" and "weight_decay": 0.0."""
        ...


class ProxyLoss(nn.Module, ABC):
    """A proxy-based metric-learning loss: ``loss(embeddings, labels) -> scalar``.

    Subclasses hold ``proxies`` (``(num_classes, embed_dim)``, or ``(num_classes * K,
    embed_dim)`` for
    K centers per class) and implement :meth:`compute` and :meth:`logits`. ``forward``
    validates the inputs, computes in the proxies' dtype (embeddings of any float dtype are
    cast to it, as pytorch-metric-learning does; autocast is off inside) and records
    ``last_stats["proxy_loss"]`` (detached, no host sync). Implements
    :class:`ProxyCriterion`; a criterion built on top of a proxy loss (NIRLoss) uses
    :meth:`loss_and_inputs` and :meth:`batch_conditions`.
    """

    num_classes: int
    embed_dim: int
    condition_per_class: bool = True
    """True when :meth:`class_condition` depends on the label only (not on the embedding)."""

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        if int(num_classes) < 1 or int(embed_dim) < 1:
            raise InputError(
                f"num_classes and embed_dim must be >= 1, got {num_classes} and {embed_dim}"
            )
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.last_stats: dict[str, Tensor] = {}

    @abstractmethod
    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss on inputs already checked by :meth:`check_inputs` (scalar tensor)."""

    @abstractmethod
    def logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) class scores of embeddings already checked by :meth:`check_embeddings`."""

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) class scores: higher = closer to the class (see each loss's
        :meth:`logits`); checked and cast like :meth:`forward`'s input, autocast off."""
        embeddings = self.check_embeddings(embeddings)
        with no_autocast(embeddings.device):
            return self.logits(embeddings)

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The learned tensors of the loss (the proxies), for the optimizer."""
        return [self.proxies]

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """The scalar loss of a batch. The extra arguments exist only to answer a
        pytorch-metric-learning style call with a clear error (:func:`check_call`)."""
        check_call(type(self).__name__, labels, indices_tuple, ref_emb, ref_labels)
        loss, _, _ = self.loss_and_inputs(embeddings, labels)
        self.last_stats = {"proxy_loss": loss.detach()}
        return loss

    def loss_and_inputs(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, checked embeddings, checked labels)`` without recording ``last_stats``:
        for a criterion on top of this loss that goes on with the same checked inputs."""
        embeddings, labels = self.check_inputs(embeddings, labels)
        with no_autocast(embeddings.device):
            loss = self.compute(embeddings, labels)
        return loss, embeddings, labels

    def check_embeddings(self, embeddings: Tensor) -> Tensor:
        """Validated embeddings in the proxies' dtype (any float dtype is cast, as
        pytorch-metric-learning does; the gradient flows back in the input's dtype)."""
        if not isinstance(embeddings, Tensor):
            raise InputTypeError(
                f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}"
            )
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise InputError(
                f"embeddings must have shape (batch, {self.embed_dim}), got "
                f"{tuple(embeddings.shape)}: the loss was built for embed_dim={self.embed_dim}"
            )
        if embeddings.shape[0] == 0:
            raise InputError("empty batch: pass at least one embedding")
        if not embeddings.is_floating_point():
            raise InputError(
                f"embeddings must be floating point, got {embeddings.dtype}: pass the model's "
                "output (e.g. x.float())"
            )
        dtype = self.proxy_parameters()[0].dtype
        return embeddings if embeddings.dtype == dtype else embeddings.to(dtype)

    def check_inputs(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Validated ``(embeddings in the proxies' dtype, int64 labels on their device)``."""
        embeddings = self.check_embeddings(embeddings)
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.shape != (embeddings.shape[0],):
            raise InputError(
                f"labels must have shape ({embeddings.shape[0]},) to match the embeddings, got "
                f"{tuple(labels.shape)}"
            )
        # Checked where the labels live: free for CPU labels (as a DataLoader yields them),
        # one host sync for labels already on an accelerator.
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise InputError(
                f"labels must lie in [0, {self.num_classes}): got values in "
                f"[{int(labels.min())}, {int(labels.max())}]; remap the dataset's classes to "
                "0..num_classes-1 or build the loss with the right num_classes"
            )
        return embeddings, labels.to(device=embeddings.device, dtype=torch.long, non_blocking=True)

    def class_condition(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, dim) L2-normalised proxy of each sample's own class; NOT detached."""
        return self.proxy_condition(labels)

    def proxy_condition(self, classes: Tensor) -> Tensor:
        """(n, dim) L2-normalised proxies of ``classes`` (only for ``condition_per_class``)."""
        return F.normalize(self.proxies.index_select(0, classes), dim=-1)

    def batch_conditions(
        self, embeddings: Tensor, labels: Tensor, host_labels: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """The class conditions of a batch, as ``(n, dim)`` rows and the row of each sample,
        or ``(B, dim)`` and None.

        When the condition depends on the class only and ``host_labels`` (the labels as
        given) lie on the CPU, as a DataLoader yields them, there is one row per class of
        the batch (a batch holds few classes: 45 x 2 samples); the unique runs on the CPU
        labels, so it never syncs an accelerator. NOT detached.
        """
        if self.condition_per_class and host_labels.device.type == "cpu":
            classes, index = torch.unique(host_labels, return_inverse=True)
            device = embeddings.device
            cond = self.proxy_condition(classes.to(device, torch.long, non_blocking=True))
            return cond, index.to(device, non_blocking=True)
        return self.class_condition(embeddings, labels), None

    def param_groups(
        self, lr: float, proxy_lr_mult: float, flow_lr_mult: float = 1.0
    ) -> list[dict]:
        """Optimizer group of the proxies (lr x ``proxy_lr_mult``, no weight decay).

        ``flow_lr_mult`` is accepted for a uniform interface with ``NIRLoss``; a plain proxy
        loss has no flow.
        """
        return [
            {
                "name": "proxies",
                "params": self.proxy_parameters(),
                "lr": lr * proxy_lr_mult,
                "weight_decay": 0.0,
            }
        ]


def inverse_norms(proxies: Tensor) -> Tensor:
    """``1 / max(||p||, eps)`` per row, F.normalize's scale: ``x @ P^T * inverse_norms(P)``
    gives cosine similarities without a normalised copy of all C proxies (whose (C, D)
    passes, forward and backward, cost more than the matmul when C is large)."""
    return 1.0 / torch.linalg.vector_norm(proxies, dim=-1).clamp_min(1e-12)


def log1p_sum_exp(values: Tensor, mask: Tensor, dim: int = 0) -> Tensor:
    """``log(1 + sum_{mask} exp(values))`` along ``dim``; 0 where the mask is empty.

    A zero is appended, as in the authors' and pytorch-metric-learning's masked logsumexp,
    so masked entries can be -inf (their exp is exactly 0, as with the dtype's most negative
    value those codes use, but without exp's slow underflow path: 3-4x faster here).
    """
    values = values.masked_fill(~mask, float("-inf"))
    shape = list(values.shape)
    shape[dim] = 1
    return torch.logsumexp(torch.cat([values, values.new_zeros(shape)], dim=dim), dim=dim)


def check_call(
    loss_name: str,
    labels: Any,
    indices_tuple: Any = None,
    ref_emb: Any = None,
    ref_labels: Any = None,
) -> None:
    """Refuse the pytorch-metric-learning call forms nirdml's proxy losses do not take:
    ``loss(embeddings)`` without labels, a miner's ``indices_tuple``, ``ref_emb`` /
    ``ref_labels`` (a LossCallError, also a ValueError, that says how to call them)."""
    how = (
        f"nirdml's proxy losses need labels and have no miners: call "
        f"{loss_name}(embeddings, labels) with one class index in [0, num_classes) per "
        "embedding"
    )
    if labels is None:
        raise LossCallError(f"{loss_name} was called without labels; {how}.")
    given = [
        name
        for name, value in (
            ("indices_tuple", indices_tuple),
            ("ref_emb", ref_emb),
            ("ref_labels", ref_labels),
        )
        if value is not None
    ]
    if given:
        raise LossCallError(
            f"{loss_name} got {', '.join(given)}, pytorch-metric-learning argument(s) it does "
            f"not take; {how} (every proxy is compared with every embedding, so there is "
            "nothing to mine and no reference set)."
        )
