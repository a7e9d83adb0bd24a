"""ProxyNCALoss (Movshovitz-Attias et al., ICCV 2017) on normalised embeddings and proxies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import InputError
from nirdml.losses.base import ProxyLoss, init_proxies, inverse_norms


class ProxyNCALoss(ProxyLoss):
    """Softmax over ``-scale * ||x - p||^2`` of normalised embedding x and proxies p.

    ``loss_i = -log( exp(-scale d(x_i, p_y)) / sum_{p in Z} exp(-scale d(x_i, p)) )``, mean
    over the batch, with ``d`` the squared Euclidean distance (``2 - 2 cos`` on the sphere).

    Args:
        num_classes, embed_dim: number of classes (one proxy each) and embedding size.
        scale: multiplies the squared distances. 9 is the usual setting for normalised
            vectors (Kim et al. 2020's ProxyNCA baseline scales both vectors by 3;
            ProxyNCA++ uses temperature 1/9); pytorch-metric-learning calls it
            ``softmax_scale`` (default 1 there).
        exclude_positive: ``False`` (default): ``Z`` is all proxies -- cross-entropy, the
            form of pytorch-metric-learning's ``ProxyNCALoss`` (equal to it with
            ``softmax_scale=scale``), ProxyNCA++ and Kim et al.'s code. ``True``: ``Z`` is the
            other classes' proxies only, the original paper's NCA denominator.
        generator: draws the initial proxies ``randn(C, embed_dim) / 8``.

    Unlike pytorch-metric-learning, the log-softmax is computed stably, so no sample is
    dropped when its probability underflows.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        scale: float = 9.0,
        exclude_positive: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, embed_dim)
        if not scale > 0:
            raise InputError(f"scale must be > 0, got {scale}")
        if exclude_positive and num_classes < 2:
            raise InputError("exclude_positive=True needs num_classes >= 2 (negative proxies)")
        self.scale = float(scale)
        self.exclude_positive = bool(exclude_positive)
        self.proxies = init_proxies(num_classes, embed_dim, generator)

    def logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) logits of the softmax, ``-scale * ||x - p||^2`` on the sphere.
        pytorch-metric-learning's ``ProxyNCALoss.get_logits`` returns the squared distances
        themselves (lower = closer): theirs = ``-logits / scale``."""
        x = F.normalize(embeddings, dim=-1)
        cos = (x @ self.proxies.t()) * inverse_norms(self.proxies)
        return -self.scale * (2.0 - 2.0 * cos).clamp_min(0.0)

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        logits = self.logits(embeddings)
        if not self.exclude_positive:
            return F.cross_entropy(logits, labels)
        own = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, labels.unsqueeze(1), float("-inf"))
        return (torch.logsumexp(others, dim=1) - own).mean()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, scale={self.scale}, "
            f"exclude_positive={self.exclude_positive}"
        )
