"""The GLOW coupling maths of :class:`~nirdml.flow.ConditionalFlow` and its fused backward.

Each of the K blocks permutes the features, splits them into ``x1`` and ``x2`` and runs two
affine couplings whose subnets are ReLU MLPs; the log-scales are FrEIA's soft clamp
``clamp * (0.636 * atan(u))``, and the log-determinant is accumulated in FrEIA's order.
:class:`CouplingChain` runs the whole chain as one autograd node with a hand-written
backward: two matmuls per Linear layer and a few elementwise ops per coupling, with the
gradients written straight into the stacked gradient tensors, instead of FrEIA's ~1,500
autograd nodes (double backward through the chain is therefore not supported).

The functions take the flow for its sizes, clamp and permutations; ``w`` is the tuple of
stacked weights (``in_weight_a`` ... ``out_bias_b``, ``ConditionalFlow._weights()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from nirdml.flow.model import ConditionalFlow

ATAN_SCALE = 0.636  # FrEIA's "ATAN" soft clamp: clamp * 0.636 * atan(u) lies in (-clamp, clamp)


def subnet_views(flow: ConditionalFlow, w: tuple, transpose: bool) -> list[tuple]:
    """Per subnet ``i = 2k + side``: (in weight, hidden weights, hidden biases, out
    weight, out bias) as views of the stacked tensors ``w``, weights transposed to
    (in, out) when ``transpose``: a few ``unbind`` calls instead of ~300 ``select`` and
    ``t`` calls per step (CPU steps are partly bound by per-op overhead).
    """
    in_a, in_b, hw, hb, out_wa, out_ba, out_wb, out_bb = w

    def rows(t: Tensor | None, tr: bool = transpose) -> tuple[Tensor, ...]:
        if t is None:
            return ()
        return (t.transpose(1, 2) if tr else t).unbind(0)

    ins, outs = (rows(in_a), rows(in_b)), (rows(out_wa), rows(out_wb))
    out_bs = (rows(out_ba, False), rows(out_bb, False))
    hws, hbs = rows(hw), rows(hb, False)
    n = flow.hidden_layers - 2
    views = []
    for k in range(flow.num_blocks):
        for side in (0, 1):
            i = 2 * k + side
            hidden = slice(i * n, (i + 1) * n)
            views.append((ins[side][k], hws[hidden], hbs[hidden], outs[side][k], out_bs[side][k]))
    return views


def subnet_forward(
    flow: ConditionalFlow, i: int, inp: Tensor, offsets: Tensor, views: tuple, saved: list | None
) -> Tensor:
    """Subnet ``i``; ``views`` from ``subnet_views(transpose=True)``."""
    in_wt, hidden_wt, hidden_b, out_wt, out_b = views
    W = flow.hidden_width
    h = torch.addmm(offsets[:, i * W : (i + 1) * W], inp, in_wt).relu_()
    if saved is not None:
        saved += (inp, h)
    for wt, b in zip(hidden_wt, hidden_b, strict=True):
        h = torch.addmm(b, h, wt).relu_()
        if saved is not None:
            saved.append(h)
    return torch.addmm(out_b, h, out_wt)


def log_scale(flow: ConditionalFlow, u: Tensor) -> Tensor:
    """FrEIA's soft-clamped log-scale ``s = clamp * (0.636 * atan(u))``."""
    return torch.atan(u).mul_(ATAN_SCALE).mul_(flow.clamp)


def chain_forward(
    flow: ConditionalFlow, x: Tensor, offsets: Tensor, w: tuple, saved: list | None
) -> tuple[Tensor, Tensor]:
    """The K coupling blocks; ``saved`` collects what :func:`chain_backward` needs."""
    l1, l2 = flow.len1, flow.len2
    views = subnet_views(flow, w, transpose=True)
    h, logdet = x, None
    for k in range(flow.num_blocks):
        hp = h.index_select(1, flow.permutations[k])
        x1, x2 = hp[:, :l1], hp[:, l1:]
        if saved is not None:
            saved += (x1, x2)
        a = subnet_forward(flow, 2 * k, x2, offsets, views[2 * k], saved)
        u2, t2 = a[:, :l1], a[:, l1:]
        s2 = log_scale(flow, u2)
        e2 = torch.exp(s2)
        y1 = torch.addcmul(t2, e2, x1)
        b = subnet_forward(flow, 2 * k + 1, y1, offsets, views[2 * k + 1], saved)
        u1, t1 = b[:, :l2], b[:, l2:]
        s1 = log_scale(flow, u1)
        e1 = torch.exp(s1)
        y2 = torch.addcmul(t1, e1, x2)
        if saved is not None:
            saved += (u2, e2, u1, e1)
        jac = s2.sum(1) + s1.sum(1)  # FrEIA: log_jac = sum(s2) + sum(s1), summed over blocks
        logdet = jac if logdet is None else logdet + jac
        h = torch.cat([y1, y2], 1)
    return h, logdet


def subnet_backward(
    flow: ConditionalFlow,
    i: int,
    g: Tensor,
    acts: tuple,
    views: tuple,
    grads: tuple,
    g_offsets: Tensor,
) -> Tensor:
    """Backward of subnet ``i``: writes its weight grads into ``grads`` (views of the
    stacked gradient tensors) and its first-layer offset grad into ``g_offsets``;
    returns the grad of its input. ``acts``: its input and post-ReLU activations."""
    in_w, hidden_w, _, out_w, _ = views
    g_in_w, g_hidden_w, g_hidden_b, g_out_w, g_out_b = grads
    torch.mm(g.t(), acts[-1], out=g_out_w)
    torch.sum(g, 0, out=g_out_b)
    g = torch.mm(g, out_w)
    for j in reversed(range(len(hidden_w))):
        g = torch.ops.aten.threshold_backward(g, acts[2 + j], 0)  # ReLU
        torch.mm(g.t(), acts[1 + j], out=g_hidden_w[j])
        torch.sum(g, 0, out=g_hidden_b[j])
        g = torch.mm(g, hidden_w[j])
    g = torch.ops.aten.threshold_backward(g, acts[1], 0)
    torch.mm(g.t(), acts[0], out=g_in_w)
    W = flow.hidden_width
    g_offsets[:, i * W : (i + 1) * W].copy_(g)
    return torch.mm(g, in_w)


def chain_backward(
    flow: ConditionalFlow, g_z: Tensor, g_logdet: Tensor, saved: tuple, w: tuple
) -> tuple[Tensor, Tensor, list]:
    """Gradients of :func:`chain_forward` w.r.t. x, the first-layer offsets and the weights."""
    l1 = flow.len1
    dscale = ATAN_SCALE * flow.clamp  # d s / d u = clamp * 0.636 / (1 + u^2)
    grads = [None if t is None else torch.empty_like(t) for t in w]
    views = subnet_views(flow, w, transpose=False)
    grad_views = subnet_views(flow, tuple(grads), transpose=False)
    n_layers = flow.hidden_layers
    per_block = 6 + 2 * n_layers
    g_offsets = g_z.new_empty(g_z.shape[0], flow.num_blocks * 2 * flow.hidden_width)
    g_l = g_logdet.unsqueeze(1)
    gh = g_z
    for k in reversed(range(flow.num_blocks)):
        blk = saved[k * per_block : (k + 1) * per_block]
        x1, x2 = blk[0], blk[1]
        acts_a = blk[2 : 2 + n_layers]
        acts_b = blk[2 + n_layers : 2 + 2 * n_layers]
        u2, e2, u1, e1 = blk[2 + 2 * n_layers :]
        gy1, gy2 = gh[:, :l1], gh[:, l1:]
        # y2 = exp(s1) * x2 + t1, s1 = clamp * 0.636 * atan(u1), (u1, t1) = subnet_b(y1)
        g_x2 = gy2 * e1
        g_u1 = g_x2 * x2 + g_l  # d logdet / d s1 = 1
        g_u1.mul_(dscale).div_(u1.square().add_(1.0))
        i = 2 * k + 1
        g_b = torch.cat([g_u1, gy2], 1)
        gy1 = gy1 + subnet_backward(flow, i, g_b, acts_b, views[i], grad_views[i], g_offsets)
        # y1 = exp(s2) * x1 + t2, (u2, t2) = subnet_a(x2)
        g_x1 = gy1 * e2
        g_u2 = g_x1 * x1 + g_l
        g_u2.mul_(dscale).div_(u2.square().add_(1.0))
        i = 2 * k
        g_a = torch.cat([g_u2, gy1], 1)
        g_x2 += subnet_backward(flow, i, g_a, acts_a, views[i], grad_views[i], g_offsets)
        gh = torch.cat([g_x1, g_x2], 1).index_select(1, flow.inverse_permutations[k])
    return gh, g_offsets, grads


def chain_inverse(
    flow: ConditionalFlow, z: Tensor, offsets: Tensor, w: tuple
) -> tuple[Tensor, Tensor]:
    """The K coupling blocks run backwards (plain autograd): ``z`` -> ``x`` and the inverse's
    log-determinant."""
    views = subnet_views(flow, w, transpose=True)
    l1, l2 = flow.len1, flow.len2
    h, logdet = z, None
    for k in reversed(range(flow.num_blocks)):
        y1, y2 = h[:, :l1], h[:, l1:]
        b = subnet_forward(flow, 2 * k + 1, y1, offsets, views[2 * k + 1], None)
        s1, t1 = log_scale(flow, b[:, :l2]), b[:, l2:]
        x2 = (y2 - t1) * torch.exp(-s1)
        a = subnet_forward(flow, 2 * k, x2, offsets, views[2 * k], None)
        s2, t2 = log_scale(flow, a[:, :l1]), a[:, l1:]
        x1 = (y1 - t2) * torch.exp(-s2)
        jac = -s2.sum(1) + -s1.sum(1)
        logdet = jac if logdet is None else logdet + jac
        h = torch.cat([x1, x2], 1).index_select(1, flow.inverse_permutations[k])
    return h, logdet


class CouplingChain(torch.autograd.Function):
    """The coupling chain as one autograd node with the hand-written backward."""

    @staticmethod
    def forward(ctx, flow: ConditionalFlow, x: Tensor, offsets: Tensor, *weights: Tensor):
        saved: list[Tensor] = []
        z, logdet = chain_forward(flow, x, offsets, weights, saved)
        ctx.flow = flow
        ctx.n_saved = len(saved)
        ctx.save_for_backward(*saved, *(w for w in weights if w is not None))
        ctx.weight_present = tuple(w is not None for w in weights)
        return z, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, g_z: Tensor, g_logdet: Tensor):  # undefined grads arrive as zeros
        flow: ConditionalFlow = ctx.flow
        tensors = ctx.saved_tensors
        saved, present = tensors[: ctx.n_saved], iter(tensors[ctx.n_saved :])
        weights = tuple(next(present) if p else None for p in ctx.weight_present)
        g_x, g_offsets, g_weights = chain_backward(flow, g_z, g_logdet, saved, weights)
        return (None, g_x, g_offsets, *g_weights)
