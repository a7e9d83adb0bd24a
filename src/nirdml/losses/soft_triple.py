"""SoftTripleLoss (Qian et al., ICCV 2019): K centers per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import InputError
from nirdml.losses.base import ProxyLoss, init_proxies


def weighted_class_center(
    embeddings: Tensor, centers: Tensor, labels: Tensor, centers_per_class: int, inv_gamma: float
) -> Tensor:
    """(B, dim) normalised similarity-weighted center of each sample's own class.

    ``centers`` is ``(C * K, dim)`` (row ``c * K + k`` = center k of class c). The weights
    are SoftTriple's own: ``softmax_k(s(x, w_ck) / gamma)``. Nothing is detached.
    """
    x = F.normalize(embeddings, dim=-1)
    w = F.normalize(centers, dim=-1).view(-1, centers_per_class, centers.shape[-1])[labels]
    weights = torch.softmax(torch.bmm(w, x.unsqueeze(2)).squeeze(2) * inv_gamma, dim=1)
    return F.normalize(torch.bmm(weights.unsqueeze(1), w).squeeze(1), dim=-1)


class SoftTripleLoss(ProxyLoss):
    """SoftTriple: a softmax loss with K centers per class and a small-margin.

    ``S_c(x) = sum_k softmax_k(s(x, w_ck) / gamma) s(x, w_ck)``;
    ``loss = CE(la * (S(x) - margin * onehot(y)), y) + tau * R`` with the original code's
    center regulariser (it merges redundant centers)
    ``R = sum_c sum_{k < k'} sqrt(2 + 1e-5 - 2 s(w_ck, w_ck')) / (C K (K - 1))``.
    Cosine similarities throughout.

    Defaults are the paper's: ``centers_per_class=10, la=20, gamma=0.1, tau=0.2,
    margin=0.01``. ``proxies`` is ``(num_classes * centers_per_class, embed_dim)``. With ``tau=0``
    it equals pytorch-metric-learning's ``SoftTripleLoss``; with ``tau`` it equals PML's
    with ``weight_regularizer=SparseCentersRegularizer`` and ``weight_reg_weight=tau`` (up to
    PML's epsilon, 1e-38 instead of 1e-5). For NIR the condition of a sample is its class's
    similarity-weighted center (:func:`weighted_class_center`).
    """

    condition_per_class = False  # the weighted center depends on the embedding

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, embed_dim)
        if centers_per_class < 1:
            raise InputError(f"centers_per_class must be >= 1, got {centers_per_class}")
        if not (la > 0 and gamma > 0 and tau >= 0):
            raise InputError(f"need la > 0, gamma > 0, tau >= 0; got {la}, {gamma}, {tau}")
        self.centers_per_class = int(centers_per_class)
        self.la = float(la)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.margin = float(margin)
        self.proxies = init_proxies(num_classes * centers_per_class, embed_dim, generator)

    def logits(self, embeddings: Tensor) -> Tensor:
        """(B, C) class similarities ``S_c(x)`` (pytorch-metric-learning's
        ``SoftTripleLoss.get_logits``)."""
        return self._class_similarities(embeddings, F.normalize(self.proxies, dim=-1))

    def _class_similarities(self, embeddings: Tensor, w: Tensor) -> Tensor:
        x = F.normalize(embeddings, dim=-1)
        sims = (x @ w.t()).view(x.shape[0], self.num_classes, self.centers_per_class)
        prob = torch.softmax(sims * (1.0 / self.gamma), dim=2)
        return (prob * sims).sum(2)

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        K = self.centers_per_class
        w = F.normalize(self.proxies, dim=-1)
        sim_class = self._class_similarities(embeddings, w)
        margins = F.one_hot(labels, self.num_classes).to(sim_class.dtype) * self.margin
        loss = F.cross_entropy(self.la * (sim_class - margins), labels)
        if self.tau > 0 and K > 1:
            wc = w.view(self.num_classes, K, -1)
            gram = torch.bmm(wc, wc.transpose(1, 2))
            upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=w.device), diagonal=1)
            dist = torch.sqrt((2.0 - 2.0 * gram[:, upper]).clamp_min(0.0) + 1e-5)
            loss = loss + self.tau * dist.sum() / (self.num_classes * K * (K - 1))
        return loss

    def class_condition(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, dim): the normalised similarity-weighted center of each sample's class."""
        return weighted_class_center(
            embeddings, self.proxies, labels, self.centers_per_class, 1.0 / self.gamma
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"tau={self.tau}, margin={self.margin}"
        )
