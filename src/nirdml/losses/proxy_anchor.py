"""ProxyAnchorLoss (Kim et al., CVPR 2020), in the paper's and the NIR authors' normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import InputError
from nirdml.losses.base import ProxyLoss, init_proxies, inverse_norms, log1p_sum_exp
from nirdml.losses.registry import LOSSES

POSITIVE_MEANS = LOSSES["proxy_anchor"].choices["positive_mean"]


class ProxyAnchorLoss(ProxyLoss):
    """Proxy Anchor loss on cosine similarities ``s(x, p)`` of normalised embeddings/proxies.

    ``pos = mean over positive proxies p of log(1 + sum_{x of class p} exp(-alpha (s - delta)))``
    ``neg = mean over all C proxies p of log(1 + sum_{x not of class p} exp(alpha (s + delta)))``

    Args:
        num_classes: number of training classes C (one proxy each).
        embed_dim: embedding size.
        alpha: scale (32). delta: margin (0.1).
        positive_mean: how the positive term is averaged.
            ``"proxies"``: over the distinct proxies with a positive in the batch (Kim et al.,
            equal to pytorch-metric-learning's ``ProxyAnchorLoss``).
            ``"samples"``: over the batch, each sample contributing the term of its own
            class's proxy (a class with n samples counts n times) -- the authors' NIR code
            (``criteria/nir.py: panc``), which produced the published NIR numbers.
        generator: draws the initial proxies ``randn(C, embed_dim) / 8`` (authors' init).
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        alpha: float = 32.0,
        delta: float = 0.1,
        positive_mean: str = "proxies",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, embed_dim)
        if positive_mean not in POSITIVE_MEANS:
            raise InputError(
                f"positive_mean must be one of {POSITIVE_MEANS}, got {positive_mean!r}"
            )
        self.alpha = float(alpha)
        self.delta = float(delta)
        self.positive_mean = positive_mean
        self.proxies = init_proxies(num_classes, embed_dim, generator)

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = F.normalize(embeddings, dim=-1)
        # Cosine similarities s(x, p) = (x . p) / ||p|| (see inverse_norms); the positives
        # are columns of the same product (no (C, D) scatter of their gradient).
        xp = x @ self.proxies.t()
        inv_norm = inverse_norms(self.proxies)
        # Negatives, (B, C): alpha * (s + delta); each sample's own class is masked with the
        # dtype's most negative value (B entries, not a (B, C) mask), and
        # log(1 + sum exp) = softplus(logsumexp).
        alpha_delta = xp.new_full((1,), self.alpha * self.delta)
        w_neg = torch.addcmul(alpha_delta, xp, inv_norm, value=self.alpha)
        w_neg.scatter_(1, labels.unsqueeze(1), torch.finfo(w_neg.dtype).min)
        neg = F.softplus(torch.logsumexp(w_neg, dim=0)).mean()
        # Positives, (B, B): column j holds the term of the proxy of sample j's class.
        pos_sims = xp.index_select(1, labels) * inv_norm.index_select(0, labels)
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        pos_cols = log1p_sum_exp(-self.alpha * (pos_sims - self.delta), same, dim=0)
        if self.positive_mean == "samples":
            return pos_cols.mean() + neg
        # A class with n samples has n identical columns: weight 1/n, divide by #classes.
        inv_count = 1.0 / same.sum(0).to(pos_cols.dtype)
        return (pos_cols * inv_count).sum() / inv_count.sum() + neg

    def logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) cosine similarities to the proxies (pytorch-metric-learning's
        ``ProxyAnchorLoss.get_logits``)."""
        x = F.normalize(embeddings, dim=-1)
        return (x @ self.proxies.t()) * inverse_norms(self.proxies)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, alpha={self.alpha}, "
            f"delta={self.delta}, positive_mean={self.positive_mean!r}"
        )
