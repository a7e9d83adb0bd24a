"""Independent references for the core tests (no tests here): the authors' FrEIA flow and
NIR criterion, rebuilt from FrEIA 0.2 as the authors built them (criteria/nir.py)."""

from __future__ import annotations

import copy

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def float64_copy(module: nn.Module) -> nn.Module:
    """The same reference, weights and all, in float64: the oracle parity tests compare to.

    The float32 reference is not exact itself: FrEIA's own float32 gradients through the
    authors' criterion (D=128, test_nir.py's inputs) are 4.7e-4 (embeddings) and 7.8e-3
    (proxies) away from FrEIA in float64, depending on CPU and BLAS, while nirdml's float32
    path stays within 1e-6 of float64. A tolerance against the float32 reference would
    measure the reference's rounding; against float64 it measures ours.
    """
    return copy.deepcopy(module).double()


def freia_subnet(width: int = 128, depth: int = 8):
    """The authors' subnet_fc: Linear(in, W), (depth - 2) x [ReLU, Linear(W, W)], ReLU,
    Linear(W, out); PyTorch default init, no dropout."""

    def build(d_in: int, d_out: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Linear(d_in, width)]
        for _ in range(depth - 2):
            layers += [nn.ReLU(), nn.Linear(width, width)]
        layers += [nn.ReLU(), nn.Linear(width, d_out)]
        return nn.Sequential(*layers)

    return build


def build_freia_flow(
    dim: int,
    cond_mode: str = "dense",
    num_blocks: int = 5,
    width: int = 128,
    depth: int = 8,
    clamp: float = 2.0,
) -> Ff.GraphINN:
    """GraphINN of the authors' NormFlow.init_normflow."""
    cond_list: list = [None] * num_blocks
    if cond_mode == "start":
        cond_list[0] = Ff.ConditionNode(dim, name="condition")
    elif cond_mode == "mid":
        cond_list[num_blocks // 2] = Ff.ConditionNode(dim, name="condition")
    elif cond_mode == "end":
        cond_list[-1] = Ff.ConditionNode(dim, name="condition")
    elif "dense" in cond_mode:
        cond_list = [Ff.ConditionNode(dim, name=f"condition_{k}") for k in range(num_blocks)]
    nodes: list = [Ff.InputNode(dim, name="Input")]
    for k in range(num_blocks):
        nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": k}, name=f"permute_{k}"))
        nodes.append(
            Ff.Node(
                nodes[-1],
                Fm.GLOWCouplingBlock,
                {"clamp": clamp, "subnet_constructor": freia_subnet(width, depth)},
                name=f"fc_{k}",
                conditions=cond_list[k],
            )
        )
    nodes.append(Ff.OutputNode(nodes[-1], name="output"))
    return Ff.GraphINN(nodes + [c for c in cond_list if c is not None])


class AuthorsCondPrep(nn.Module):
    """The authors' NormflowCondPrep (dense, dense_embed, dense_embed_multi, start/mid/end)."""

    def __init__(self, dim: int, num_blocks: int, mode: str) -> None:
        super().__init__()
        self.mode, self.num_blocks = mode, num_blocks

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

        if mode == "dense_embed":
            self.embedder = mlp()
        elif mode == "dense_embed_multi":
            self.embedder = nn.ModuleList(mlp() for _ in range(num_blocks))

    def forward(self, c: Tensor) -> list[Tensor]:
        if self.mode == "dense_embed":
            return [self.embedder(c)] * self.num_blocks
        if self.mode == "dense":
            return [c] * self.num_blocks
        if self.mode == "dense_embed_multi":
            return [e(c) for e in self.embedder]
        return [c]


def authors_masked_logsumexp(sims: Tensor, mask: Tensor, dim: int = 0) -> Tensor:
    sims = sims.masked_fill(~mask, torch.finfo(sims.dtype).min)
    shape = list(sims.shape)
    shape[dim] = 1
    out = torch.logsumexp(torch.cat([sims, sims.new_zeros(shape)], dim=dim), dim=dim, keepdim=True)
    return out.masked_fill(~torch.any(mask, dim=dim, keepdim=True), 0)


def authors_panc(
    batch: Tensor, proxies: Tensor, labels: Tensor, alpha: float = 32.0, delta: float = 0.1
) -> Tensor:
    """The authors' panc (criteria/nir.py) with pos/neg alpha 32, pos delta 0.1, neg -0.1."""
    proxies = F.normalize(proxies, dim=-1)
    batch = F.normalize(batch, dim=-1)
    lab = labels.unsqueeze(1)
    same = (lab.T == lab.view(-1, 1)).T
    diff = (torch.arange(len(proxies)).unsqueeze(1) != lab.T).T
    w_pos = -alpha * (batch.mm(proxies[labels].T) - delta)
    w_neg = alpha * (batch.mm(proxies.T) - (-delta))
    pos = authors_masked_logsumexp(w_pos, same, dim=0)
    neg = authors_masked_logsumexp(w_neg, diff, dim=0)
    return pos.mean() + neg.mean()


class AuthorsNIR(nn.Module):
    """The authors' NIR criterion: same construction order (proxies, flow, cond prep) and
    forward (panc, normalised own proxy as condition, float64 exp via np.ones multiplier)."""

    def __init__(
        self, num_classes: int, dim: int, w_align: float = 0.01, cond_mode: str = "dense"
    ) -> None:
        super().__init__()
        self.w_align = w_align
        self.proxies = nn.Parameter(torch.randn(num_classes, dim) / 8)
        self.normflow = nn.Module()
        self.normflow.normflow = build_freia_flow(dim, cond_mode)
        self.normflow_cond_prep = AuthorsCondPrep(dim, 5, cond_mode)

    def forward(self, batch: Tensor, labels: Tensor) -> Tensor:
        proxy_align_loss = authors_panc(batch, self.proxies, labels)
        cond = self.normflow_cond_prep(F.normalize(self.proxies, dim=-1)[labels])
        z, log_jac_det = self.normflow.normflow(batch, c=cond, rev=False, jac=True)
        mul = torch.ones(len(batch), dtype=torch.float64)
        loss = mul * (0.5 * torch.sum(z**2, dim=(1,)) - log_jac_det)
        return torch.mean(torch.exp(loss)) + self.w_align * proxy_align_loss
