"""ConditionalFlow: the conditional GLOW flow of NIR (method.md section 2), the module.

Numerically the authors' FrEIA 0.2 graph (``InputNode -> K x [PermuteRandom(seed=k),
GLOWCouplingBlock(clamp=2, subnet=8-layer ReLU MLP of width 128)] -> OutputNode``, each
block conditioned on the L2-normalised class proxy), re-implemented for speed. The math is
FrEIA's (:mod:`nirdml.flow.coupling`); only the bookkeeping differs:

- The condition's share of every subnet's first layer (its condition columns and bias) is
  computed for all subnets in ONE matmul up front; no ``torch.cat([x, c])`` per subnet.
- Weights of the same role are stacked (all hidden layers in one tensor, ...), so an
  optimizer updates ~10 tensors instead of FrEIA's ~160.
- The coupling chain has a hand-written backward (:class:`~nirdml.flow.coupling.CouplingChain`;
  forward + backward ~17% faster at B=90, ~30% at B=4 where per-op overhead dominates; the
  matmuls, the same FLOPs as FrEIA, are the rest).

``load_freia_state_dict`` imports the authors' weights (:mod:`nirdml.flow.freia`), and with
the same ``torch.manual_seed`` a new ``ConditionalFlow`` draws exactly the authors' initial
weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import InputError
from nirdml.flow.coupling import CouplingChain, chain_forward, chain_inverse
from nirdml.flow.freia import freia_layout, initial_layout, load_layout
from nirdml.flow.registry import CONDITION_BLOCKS, CONDITION_MODES
from nirdml.runtime import no_autocast

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_WEIGHT_NAMES = (
    "in_weight_a",
    "in_weight_b",
    "hidden_weight",
    "hidden_bias",
    "out_weight_a",
    "out_bias_a",
    "out_weight_b",
    "out_bias_b",
)


def _embedder(dim: int) -> nn.Sequential:
    """The authors' condition embedder: Linear(D, D) -> ReLU -> Linear(D, D)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def _check_sizes(
    dim: int, num_blocks: int, hidden_width: int, hidden_layers: int, clamp: float
) -> None:
    """Refuse sizes the flow cannot be built with, naming the argument."""
    if dim < 2:
        raise InputError(f"ConditionalFlow needs dim >= 2 to split features, got dim={dim}")
    if num_blocks < 1 or hidden_width < 1:
        raise InputError(
            f"num_blocks and hidden_width must be >= 1, got {num_blocks} and {hidden_width}"
        )
    if hidden_layers < 2:
        raise InputError(
            "hidden_layers counts the Linear layers of each subnet (input and output "
            f"included) and must be >= 2, got {hidden_layers}"
        )
    if not clamp > 0:
        raise InputError(f"clamp must be > 0, got {clamp}")


def _check_condition(condition: str, condition_blocks: str) -> None:
    """Refuse an unknown condition mode or choice of conditioned blocks."""
    if condition not in CONDITION_MODES:
        raise InputError(f"condition must be one of {CONDITION_MODES}, got {condition!r}")
    if condition_blocks not in CONDITION_BLOCKS:
        raise InputError(
            f"condition_blocks must be one of {CONDITION_BLOCKS}, got {condition_blocks!r}"
        )


def _resolve_cond_dim(dim: int, cond_dim: int | None) -> int:
    """The condition's dimension: ``dim`` unless given, and at least 1."""
    resolved = dim if cond_dim is None else int(cond_dim)
    if resolved < 1:
        raise InputError(f"cond_dim must be >= 1, got {cond_dim}")
    return resolved


def _conditioned_blocks(condition_blocks: str, num_blocks: int) -> tuple[int, ...]:
    """The indices of the blocks that see the condition (the authors' start/mid/end/all)."""
    return {
        "all": tuple(range(num_blocks)),
        "first": (0,),
        "middle": (num_blocks // 2,),
        "last": (num_blocks - 1,),
    }[condition_blocks]


def _permutations(dim: int, num_blocks: int) -> np.ndarray:
    """(K, D): block k's ``RandomState(k).permutation(D)``, FrEIA's PermuteRandom(seed=k)."""
    return np.stack([np.random.RandomState(k).permutation(dim) for k in range(num_blocks)])


def _condition_embedder(condition: str, cond_dim: int, n_cond: int) -> nn.Module | None:
    """The condition mode's embedder: one shared, one per conditioned block, or none."""
    if condition == "embed":
        return _embedder(cond_dim)
    if condition == "embed_per_block":
        return nn.ModuleList(_embedder(cond_dim) for _ in range(n_cond))
    return None


class ConditionalFlow(nn.Module):
    """Conditional GLOW flow ``tau^-1``: embedding ``x`` -> residual ``z``, given condition ``c``.

    Args:
        dim: embedding (and condition) dimension D.
        num_blocks: number of [fixed permutation + GLOW affine coupling] blocks (authors: 5).
        hidden_width: width of each coupling subnet's hidden layers (authors: 128).
        hidden_layers: number of Linear layers per subnet (the authors' ``fc_depth``: 8).
        clamp: soft clamp of the log-scales, ``|s| < clamp`` (authors: 2.0).
        condition: ``"dense"`` feeds the condition itself to every conditioned block (authors'
            default); ``"embed"`` first maps it through one shared MLP
            ``Linear(D,D)-ReLU-Linear(D,D)`` (their ``dense_embed``); ``"embed_per_block"``
            uses one such MLP per conditioned block (their ``dense_embed_multi``).
        condition_blocks: which blocks see the condition: ``"all"`` (default), ``"first"``,
            ``"middle"`` (block ``num_blocks // 2``) or ``"last"`` (their start/mid/end).
        cond_dim: dimension of the condition; ``None`` (default) is ``dim``. NIR's
            tangent-space objectives model D-1 tangent coordinates given the D-dim proxy.
        generator: draws the initial weights (PyTorch's default Linear init); ``None`` uses
            torch's global RNG like any ``nn.Module``, in the authors' draw order, so the same
            ``torch.manual_seed`` gives the authors' initial flow.

    Block k permutes the features with ``np.random.RandomState(k).permutation(D)`` (exactly
    FrEIA's ``PermuteRandom(seed=k)``, without touching numpy's global RNG), then splits
    them into ``x1`` (the first ``round(D/2)``) and ``x2``. The permutations are buffers.

    ``flow(x, c) -> (z, logdet)``; ``flow.inverse(z, c) -> (x, logdet_of_inverse)``;
    ``flow.nll(x, c)`` is ``0.5 * ||z||^2 - logdet`` per sample; ``flow.sample(c, n)`` draws
    embeddings around a condition. fp16/bf16 inputs are computed in the parameters' dtype
    with autocast disabled: the flow always runs in fp32 (or fp64 after ``.double()``).
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int = 5,
        hidden_width: int = 128,
        hidden_layers: int = 8,
        clamp: float = 2.0,
        condition: str = "dense",
        condition_blocks: str = "all",
        *,
        cond_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_blocks, hidden_width, hidden_layers, clamp)
        _check_condition(condition, condition_blocks)
        self.dim = dim
        self.cond_dim = _resolve_cond_dim(dim, cond_dim)
        self.num_blocks = num_blocks
        self.hidden_width = hidden_width
        self.hidden_layers = hidden_layers
        self.clamp = float(clamp)
        self.condition = condition
        self.condition_blocks = condition_blocks
        # FrEIA: split_len1 = round(0.5 * D) (Python's round); x1 = first split_len1 features.
        self.len1 = round(0.5 * dim)
        self.len2 = dim - self.len1
        conditioned = _conditioned_blocks(condition_blocks, num_blocks)
        self.conditioned_blocks = conditioned
        self.cond_slots = {k: j for j, k in enumerate(conditioned)}
        """Conditioned block -> its row of ``cond_weight`` (and of the embedders)."""

        perms = _permutations(dim, num_blocks)
        self.register_buffer("permutations", torch.from_numpy(perms).long())
        self.register_buffer("inverse_permutations", torch.from_numpy(np.argsort(perms, 1)))
        self._create_weights(len(conditioned))
        self.embedder: nn.Module | None = _condition_embedder(
            condition, self.cond_dim, len(conditioned)
        )
        self.reset_parameters(generator)

    def _create_weights(self, n_cond: int) -> None:
        """Register the stacked subnet weights (uninitialised), in the state_dict's order."""
        # Block k runs subnet "a" ((s, t) of x1 from x2; FrEIA's subnet2), then subnet "b"
        # ((s, t) of x2 from y1; FrEIA's subnet1). First-layer weights are split into the
        # x-columns (in_weight_*) and the condition columns (cond_weight); rows [0, W) of
        # cond_weight[j] / in_bias[k] belong to subnet a, rows [W, 2W) to subnet b.
        K, W, n_hidden = self.num_blocks, self.hidden_width, self.hidden_layers - 2
        self.cond_weight = nn.Parameter(torch.empty(n_cond, 2 * W, self.cond_dim))
        self.in_bias = nn.Parameter(torch.empty(K, 2 * W))
        self.in_weight_a = nn.Parameter(torch.empty(K, W, self.len2))
        self.in_weight_b = nn.Parameter(torch.empty(K, W, self.len1))
        if n_hidden:  # subnet (k, side) owns rows [(2k + side) * n_hidden, ... + n_hidden)
            self.hidden_weight = nn.Parameter(torch.empty(2 * K * n_hidden, W, W))
            self.hidden_bias = nn.Parameter(torch.empty(2 * K * n_hidden, W))
        else:
            self.register_parameter("hidden_weight", None)
            self.register_parameter("hidden_bias", None)
        self.out_weight_a = nn.Parameter(torch.empty(K, 2 * self.len1, W))
        self.out_bias_a = nn.Parameter(torch.empty(K, 2 * self.len1))
        self.out_weight_b = nn.Parameter(torch.empty(K, 2 * self.len2, W))
        self.out_bias_b = nn.Parameter(torch.empty(K, 2 * self.len2))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw all weights as the authors' code does (FrEIA order, then the embedder)."""
        load_layout(self, initial_layout(self, generator))

    def load_freia_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Import the weights of the authors' FrEIA flow (``GraphINN.state_dict()``).

        Keys look like ``module_list.1.subnet1.0.weight``; any prefix before
        ``module_list.`` is accepted, so the authors' whole criterion state_dict
        (``normflow.normflow.module_list...``) works too. For ``condition="embed"`` /
        ``"embed_per_block"`` the embedder weights are read from the keys containing
        ``embedder.`` (their ``normflow_cond_prep.embedder...``). Shapes are checked against
        this flow's configuration; a mismatch raises ``ValueError`` naming the key and fix.
        """
        load_layout(self, freia_layout(self, state_dict))

    # ------------------------------------------------------------------ computation
    def _prepare(
        self, x: Tensor, cond: Tensor, what: str, cond_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        ref = self.in_bias
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(
                f"{what} must have shape (batch, {self.dim}), got {tuple(x.shape)}: pass a 2-D "
                "batch whose width is the flow's dim"
            )
        if cond_index is not None:
            if cond_index.shape != (x.shape[0],) or cond_index.dtype != torch.long:
                raise InputError(
                    f"cond_index must be an int64 tensor of shape ({x.shape[0]},) (the row of "
                    f"cond for each sample), got {cond_index.dtype} {tuple(cond_index.shape)}"
                )
            if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
                raise InputError(
                    f"with cond_index, cond must have shape (n, {self.cond_dim}), got "
                    f"{tuple(cond.shape)}"
                )
        elif cond.dim() == 1:
            cond = cond.expand(x.shape[0], -1)
        if cond_index is None and cond.shape != (x.shape[0], self.cond_dim):
            raise InputError(
                f"cond must have shape ({x.shape[0]}, {self.cond_dim}) or ({self.cond_dim},), got "
                f"{tuple(cond.shape)}: pass one condition (normalised proxy) per sample"
            )
        out = []
        for name, t in ((what, x), ("cond", cond)):
            if t.dtype != ref.dtype:
                if t.dtype not in _LOW_PRECISION:
                    raise InputError(
                        f"{name} is {t.dtype} but the flow's parameters are {ref.dtype}: "
                        f"convert one of them (flow.to({t.dtype}) or {name}.to({ref.dtype}))"
                    )
                t = t.to(ref.dtype)
            out.append(t)
        return out[0], out[1]

    def _first_layer_offsets(self, cond: Tensor) -> Tensor:
        """(B, K * 2W): every subnet's first-layer bias plus its condition share ``Wc @ c``."""
        K, W2 = self.num_blocks, 2 * self.hidden_width
        if self.condition == "embed_per_block":
            conds = [emb(cond) for emb in self.embedder]
        else:
            c = self.embedder(cond) if self.embedder is not None else cond
            if len(self.conditioned_blocks) == K:  # the usual case: one matmul for all
                weight = self.cond_weight.reshape(K * W2, self.cond_dim)
                return F.linear(c, weight, self.in_bias.reshape(-1))
            conds = [c] * len(self.conditioned_blocks)
        pieces = []
        for k in range(K):
            j = self.cond_slots.get(k)
            if j is None:
                pieces.append(self.in_bias[k].expand(cond.shape[0], W2))
            else:
                pieces.append(F.linear(conds[j], self.cond_weight[j], self.in_bias[k]))
        return torch.cat(pieces, 1)

    def _weights(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, name) for name in _WEIGHT_NAMES)

    def forward(
        self, x: Tensor, cond: Tensor, cond_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Embedding ``x`` (B, D) -> residual ``z`` (B, D) and ``log|det dz/dx|`` (B,).

        ``cond`` is (B, D), one condition per sample, or (D,) for all. With ``cond_index``
        (B,) int64, ``cond`` holds n distinct conditions (n, D) and sample i uses row
        ``cond_index[i]``: the same result, with the condition projections computed once per
        distinct row (NIRLoss passes the batch's classes this way).
        """
        with no_autocast(x.device):
            x, cond = self._prepare(x, cond, "x", cond_index)
            offsets = self._first_layer_offsets(cond)
            if cond_index is not None:
                offsets = offsets.index_select(0, cond_index)
            weights = self._weights()
            inputs = (x, offsets, *weights)
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
                return CouplingChain.apply(self, *inputs)
            return chain_forward(self, x, offsets, weights, None)

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Residual ``z`` -> embedding ``x`` and ``log|det dx/dz|`` (= -forward logdet at x).

        Plain autograd (not the fused backward): meant for sampling and checks.
        """
        with no_autocast(z.device):
            z, cond = self._prepare(z, cond, "z")
            return chain_inverse(self, z, self._first_layer_offsets(cond), self._weights())

    def nll(self, x: Tensor, cond: Tensor, cond_index: Tensor | None = None) -> Tensor:
        """Per-sample negative log-likelihood ``0.5 * ||z||^2 - logdet`` (B,), the NIR term.

        The constant ``D/2 * log(2 pi)`` is left out, as in the authors' code. Arguments as
        in :meth:`forward`.
        """
        z, logdet = self(x, cond, cond_index)
        return 0.5 * torch.sum(z**2, dim=1) - logdet

    def sample(self, cond: Tensor, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` embeddings per condition: ``x = tau(z | c)`` with ``z ~ N(0, I)``.

        ``cond`` (D,) -> (n, D); ``cond`` (M, D) -> (M, n, D). Pass the L2-normalised proxy,
        as NIRLoss conditions on it; the samples are not re-normalised. ``generator`` (on the
        flow's device) makes the draw reproducible. Wrap in ``torch.no_grad()`` unless you
        need gradients.
        """
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        if cond.dim() not in (1, 2):
            raise InputError(f"cond must be (D,) or (M, D), got shape {tuple(cond.shape)}")
        c = cond.reshape(-1, cond.shape[-1])
        z = torch.randn(
            c.shape[0] * n,
            self.dim,
            generator=generator,
            device=self.in_bias.device,
            dtype=self.in_bias.dtype,
        )
        x, _ = self.inverse(z, c.repeat_interleave(n, dim=0))
        x = x.reshape(c.shape[0], n, self.dim)
        return x[0] if cond.dim() == 1 else x

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_blocks={self.num_blocks}, hidden_width={self.hidden_width}, "
            f"hidden_layers={self.hidden_layers}, clamp={self.clamp}, "
            f"condition={self.condition!r}, condition_blocks={self.condition_blocks!r}"
            + (f", cond_dim={self.cond_dim}" if self.cond_dim != self.dim else "")
        )
