"""NIRLoss: Non-isotropy regularisation on top of a proxy loss (method.md section 3)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import InputError, InputTypeError, NonFiniteLossError
from nirdml.flow import ConditionalFlow
from nirdml.losses.base import ProxyLoss, check_call
from nirdml.losses.pml import PMLProxyLoss
from nirdml.losses.registry import NIR_OBJECTIVES, SIGMA_MODES
from nirdml.runtime import no_autocast

OBJECTIVES = NIR_OBJECTIVES
BOUNDED = {
    # objective -> (space, embeddings ascend the NLL)
    "noise_nll": ("ambient", False),
    "noise_nll_spread": ("ambient", True),
    "tangent_nll": ("tangent", False),
    "tangent_spread": ("tangent", True),
}
"""The noise-bounded objectives: where the flow models the embeddings (``ambient``: the
D-dim embedding; ``tangent``: D-1 log-map coordinates at the own proxy) and their default
sign for the embeddings (``True``: they ascend the flow's NLL, i.e. spread each class)."""
DEFAULT_SIGMA = 0.5
"""Default ``sigma`` of the bounded objectives (relative: the noise's per-coordinate std is
0.5 x the class spread per coordinate, ``sigma * r / sqrt(d)``)."""
DEFAULT_BOUNDED_WEIGHT = 1.0
"""Default ``nir_weight`` of the bounded objectives (their term is in nats per dimension,
on the O(1) scale of the proxy losses)."""
SPREAD_MOMENTUM = 0.9
"""Momentum of the running class spread ``r`` (mean distance to the own proxy) that sets a
relative ``sigma``; 0.9 follows the spread within ~10 steps."""
INERT_THRESHOLD = 1e-6
"""Tangent gradient ratio NIR / proxy below which the regulariser is called inert (the
authors' ``exp_nll`` reaches ~1e-11 once the flow fits the sphere)."""


def flow_dims(objective: str, embed_dim: int) -> tuple[int, int]:
    """(flow dim, condition dim) that ``objective`` needs for D-dim embeddings: the tangent
    objectives model D-1 coordinates conditioned on the D-dim proxy."""
    if BOUNDED.get(objective, ("ambient",))[0] == "tangent":
        return embed_dim - 1, embed_dim
    return embed_dim, embed_dim


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient backward (the embeddings ascend the NIR term)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return -grad


def reverse_grad(x: Tensor) -> Tensor:
    """``x`` whose gradient is negated on the way back (a gradient reversal)."""
    return _ReverseGrad.apply(x)


def tangent_coordinates(x: Tensor, proxy: Tensor) -> tuple[Tensor, Tensor]:
    """Log map of each row of ``x`` to the tangent space at its (unit) ``proxy`` row, in
    D-1 coordinates, and the geodesic distance.

    ``v = theta / sin(theta) * (x_hat - cos(theta) p)``, ``theta = angle(x_hat, p)``; then the
    Householder reflection ``H = I - 2 u u^T / u^T u``, ``u = p + sign(p_D) e_D``, maps ``p``
    to ``-sign(p_D) e_D`` and the tangent plane onto the first D-1 axes (``(H v)_D = 0``).
    Returns ``((B, D-1) coordinates, (B,) theta)``.
    """
    x_hat = F.normalize(x, dim=-1)
    cos = (x_hat * proxy).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    w = x_hat - cos * proxy
    s = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    theta = torch.atan2(s, cos)
    small = s < 1e-7
    scale = torch.where(small, torch.ones_like(s), theta / s.clamp_min(1e-7))
    v = w * scale
    sign = torch.where(proxy[:, -1:] >= 0, 1.0, -1.0).to(proxy.dtype)
    u = torch.cat([proxy[:, :-1], proxy[:, -1:] + sign], dim=-1)
    hv = v - 2.0 * u * ((u * v).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True))
    return hv[:, :-1], theta.squeeze(-1)


class NoiseSource(nn.Module):
    """Private Gaussian noise and the running class spread of the bounded objectives.

    The noise comes from a ``torch.Generator`` seeded with ``seed`` (created on the
    embeddings' device at the first draw), never the global RNG; its state and the running
    spread are part of ``state_dict`` (buffer + extra state), so a resumed run draws the
    same noise. A state saved on another device type (CPU vs CUDA) cannot be restored: the
    generator then restarts from ``seed``.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = int(seed)
        self.register_buffer("spread", torch.zeros(()))
        self._generator: torch.Generator | None = None
        self._pending_state: tuple[str, Tensor] | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generator
        if gen is None or gen.device.type != device.type:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._pending_state is not None and self._pending_state[0] == device.type:
                gen.set_state(self._pending_state[1])
            self._pending_state = None
            self._generator = gen
        return gen

    def randn_like(self, x: Tensor) -> Tensor:
        return torch.randn(
            x.shape, generator=self.generator(x.device), device=x.device, dtype=x.dtype
        )

    @torch.no_grad()
    def update_spread(self, batch_spread: Tensor) -> Tensor:
        """Running mean of the batch's mean distance to the own proxy (no host sync)."""
        value = batch_spread.detach().to(self.spread.dtype)
        mixed = SPREAD_MOMENTUM * self.spread + (1.0 - SPREAD_MOMENTUM) * value
        self.spread.copy_(torch.where(self.spread > 0, mixed, value))
        return self.spread

    def get_extra_state(self) -> dict:
        gen = self._generator
        if gen is None:
            if self._pending_state is not None:
                return {"device": self._pending_state[0], "state": self._pending_state[1]}
            return {"device": "", "state": torch.zeros(0, dtype=torch.uint8)}
        return {"device": gen.device.type, "state": gen.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator = None
        self._pending_state = (state["device"], state["state"]) if state["device"] else None

    def extra_repr(self) -> str:
        return f"seed={self.seed}"


def _proxy_loss(base_loss: ProxyLoss | nn.Module) -> ProxyLoss:
    """``base_loss`` as a :class:`ProxyLoss` (a pytorch-metric-learning one wrapped)."""
    if isinstance(base_loss, ProxyLoss):
        return base_loss
    if type(base_loss).__module__.startswith("pytorch_metric_learning"):
        return PMLProxyLoss(base_loss)
    raise InputTypeError(
        f"base_loss must be a nirdml ProxyLoss (ProxyAnchorLoss, ProxyNCALoss, "
        f"SoftTripleLoss, PMLProxyLoss) or a pytorch-metric-learning proxy loss, "
        f"got {type(base_loss).__name__}"
    )


def _check_objective(
    objective: str, sigma: float | None, ascend: bool | None, sigma_mode: str
) -> None:
    """The objective is known; ``sigma`` / ``ascend`` are given only to a bounded one."""
    if objective not in OBJECTIVES:
        close = difflib.get_close_matches(str(objective), OBJECTIVES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"objective must be one of {OBJECTIVES}, got {objective!r}.{hint}")
    if objective not in BOUNDED:
        for name, value in (("sigma", sigma), ("ascend", ascend)):
            if value is not None:
                raise InputError(
                    f"{name} only applies to the bounded objectives {tuple(BOUNDED)}, "
                    f"not {objective!r}: drop it or pick one of them"
                )
    if sigma_mode not in SIGMA_MODES:
        raise InputError(f"sigma_mode must be one of {SIGMA_MODES}, got {sigma_mode!r}")


def _check_weights(
    sigma: float, proxy_weight: float, nir_weight: float, nir_scale: float, nll_cap: float
) -> None:
    """Finite, non-negative weights; positive sigma and cap."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a finite number > 0, got {sigma}")
    for name, value in (
        ("proxy_weight", proxy_weight),
        ("nir_weight", nir_weight),
        ("nir_scale", nir_scale),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(nll_cap) and nll_cap > 0):
        raise InputError(f"nll_cap must be a finite number > 0, got {nll_cap}")


@dataclass
class ObjectiveTerms:
    """What an objective makes of one batch: the per-sample flow NLL, its NIR term, and how
    the loss weighs the term and the proxy loss (``None``: not weighted)."""

    nll: Tensor
    """(B,) flow NLL of each sample (of its noised input for the bounded objectives)."""
    term: Tensor
    """The NIR term, unweighted (``exp_nll``: ``mean_i exp(nll_i)``, in float64)."""
    weight: float | None
    """Weight of ``term`` in the loss (``nir_weight``; None for ``exp_nll``)."""
    proxy_weight: float | None = None
    """Weight of the proxy loss (``proxy_weight`` for ``exp_nll``; None: 1)."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """Extra ``last_stats`` of the objective (``capped``, ``sigma``, ``spread``)."""


Objective = Callable[["NIRLoss", Tensor, Tensor, Tensor], ObjectiveTerms]


def exp_nll_terms(loss: NIRLoss, x: Tensor, labels: Tensor, given: Tensor) -> ObjectiveTerms:
    """The authors' form: ``mean_i exp(nll_i)`` (capped, in float64 where the device has it;
    ``capped`` counts the samples above the cap), the proxy loss weighted by
    ``proxy_weight``."""
    nll = loss.flow_nll(x, labels, given)
    wide = torch.float64 if nll.device.type in ("cpu", "cuda") else nll.dtype
    nll_wide = nll.to(wide)
    return ObjectiveTerms(
        nll,
        loss.capped_exp(nll_wide).mean(),
        None,
        loss.proxy_weight,
        {"capped": (nll_wide > loss.nll_cap).sum()},
    )


def nll_terms(loss: NIRLoss, x: Tensor, labels: Tensor, given: Tensor) -> ObjectiveTerms:
    """The paper's form: ``mean_i nll_i``, weighted by ``nir_weight``."""
    nll = loss.flow_nll(x, labels, given)
    return ObjectiveTerms(nll, nll.mean(), loss.nir_weight)


def bounded_terms(loss: NIRLoss, x: Tensor, labels: Tensor, given: Tensor) -> ObjectiveTerms:
    """A noise-bounded form: the flow NLL of the noised input (ambient or tangent), the term
    ``mean_i b_i`` weighted by ``nir_weight``, and the noise's ``sigma`` and ``spread``."""
    cond, index = loss.conditions(x, labels, given)
    own = cond if index is None else cond.index_select(0, index)
    if loss.space == "tangent":
        x, dist = tangent_coordinates(x, own)
    else:
        dist = torch.linalg.vector_norm(x.detach() - own.detach(), dim=-1)
    d = x.shape[1]
    if loss.sigma_mode == "relative":
        spread = dist.detach().mean()
        if loss.training:
            spread = loss.noise.update_spread(spread)
        else:  # eval: the running value once there is one (no host sync)
            running = loss.noise.spread.to(spread.dtype)
            spread = torch.where(running > 0, running, spread)
        std = (loss.sigma / math.sqrt(d)) * spread.to(x.dtype).clamp_min(1e-12)
    else:
        std = x.new_full((), loss.sigma)
    noised = x + std * loss.noise.randn_like(x)
    nll = loss.flow.nll(noised, cond, index)
    # b_i = nll_i / d + 0.5 log(2 pi) - 0.5 log(2 pi e std^2) = nll_i / d - 0.5 - log std
    term = nll.mean() / d - 0.5 - torch.log(std.detach())
    stats = {"sigma": std.detach(), "spread": dist.detach().mean()}
    return ObjectiveTerms(nll, term, loss.nir_weight, stats=stats)


OBJECTIVE_TERMS: dict[str, Objective] = {
    "exp_nll": exp_nll_terms,
    "nll": nll_terms,
    **{name: bounded_terms for name in BOUNDED},
}
"""Objective name -> the function that computes its terms (the maths:
docs/guide/core.md, "The objectives, exactly")."""


class NIRLoss(nn.Module):
    """A proxy loss plus NIR: every embedding must be likely under the conditional flow
    ``tau^-1( . | own-class proxy)``, i.e. reachable from its proxy by an invertible map.

    ``loss = proxy_weight * L_proxy + nir_scale * nir_weight * term``, the term chosen by
    ``objective`` (:data:`OBJECTIVE_TERMS`; the maths in docs/guide/core.md, "The
    objectives, exactly"):

    - ``"exp_nll"`` (default): ``mean_i exp(nll_i) + proxy_weight * L_proxy``, the authors'
      code, which produced the published numbers (``proxy_weight`` 0.01; CUB200 0.0075,
      SOP 0.3); ``exp`` in float64, continued linearly above ``nll_cap``.
    - ``"nll"``: ``L_proxy + nir_weight * mean_i nll_i``, the paper's equation
      (``nir_weight`` default ``1 / dim``: nats per dimension).
    - the noise-bounded ``"noise_nll"``, ``"tangent_nll"`` (embeddings descend: compact
      classes) and ``"noise_nll_spread"``, ``"tangent_spread"`` (embeddings ascend: spread
      classes): the flow models the embedding (or its tangent coordinates at the proxy) plus
      Gaussian noise of std ``sigma`` (relative to the class spread by default), a term
      bounded below by 0 for every flow (``nir_weight`` default 1).

    The condition is ``base_loss.class_condition``: the sample's own L2-normalised proxy, not
    detached, so NIR also moves the proxies. Controls: ``nir_scale=0`` (the "NIR x 0" run)
    and ``detach_inputs=True`` (the flow trains on detached inputs). ``last_stats`` holds
    detached device tensors: ``proxy_loss``, ``nll``, ``nir``, ``capped`` (and ``sigma``,
    ``spread`` for the bounded forms); after ``diagnose_next = True`` also the alarm's
    ``grad_ratio``, ``grad_nir``, ``grad_proxy``, ``nll_min``, ``nll_max``. A NaN/inf loss
    raises :class:`~nirdml.errors.NonFiniteLossError` naming the culprit (``check_finite``;
    off: no host sync, ``last_stats["nonfinite"]`` counts them). Computed in the parameters'
    dtype with autocast off.

    ``base_loss``: a :class:`ProxyLoss` or a pytorch-metric-learning proxy loss (wrapped in
    :class:`PMLProxyLoss`); ``flow``: None builds ``ConditionalFlow(*flow_dims(objective,
    embed_dim))``; ``noise_seed``: the bounded forms' private noise generator.
    """

    def __init__(
        self,
        base_loss: ProxyLoss | nn.Module,
        objective: str = "exp_nll",
        proxy_weight: float | None = None,
        nir_weight: float | None = None,
        flow: ConditionalFlow | None = None,
        *,
        nll_cap: float = 30.0,
        check_finite: bool = True,
        sigma: float | None = None,
        sigma_mode: str = "relative",
        ascend: bool | None = None,
        detach_inputs: bool = False,
        noise_seed: int = 0,
        nir_scale: float = 1.0,
    ) -> None:
        super().__init__()
        base_loss = _proxy_loss(base_loss)
        _check_objective(objective, sigma, ascend, sigma_mode)
        embed_dim = base_loss.embed_dim
        flow_dim, cond_dim = flow_dims(objective, embed_dim)
        if flow is None:
            flow = ConditionalFlow(flow_dim, cond_dim=cond_dim)
        if (
            not isinstance(flow, ConditionalFlow)
            or flow.dim != flow_dim
            or flow.cond_dim != cond_dim
        ):
            raise InputError(
                f"objective {objective!r} needs a ConditionalFlow of dim {flow_dim} with a "
                f"condition of dim {cond_dim} (build it as ConditionalFlow(*flow_dims("
                f"{objective!r}, {embed_dim}))), got {flow!r}"
            )
        bounded = objective in BOUNDED
        sigma = DEFAULT_SIGMA if sigma is None else float(sigma)
        proxy_weight = 0.01 if proxy_weight is None else float(proxy_weight)
        if nir_weight is None:
            nir_weight = DEFAULT_BOUNDED_WEIGHT if bounded else 1.0 / embed_dim
        _check_weights(sigma, float(proxy_weight), float(nir_weight), float(nir_scale), nll_cap)
        self.base_loss = base_loss
        self.flow = flow
        self.objective = objective
        self.terms: Objective = OBJECTIVE_TERMS[objective]
        self.proxy_weight = proxy_weight
        self.nir_weight = float(nir_weight)
        self.nll_cap = float(nll_cap)
        self.check_finite = bool(check_finite)
        self.detach_inputs = bool(detach_inputs)
        self.nir_scale = float(nir_scale)
        self.space = BOUNDED[objective][0] if bounded else None
        self.ascend = (
            (BOUNDED[objective][1] if ascend is None else bool(ascend)) if bounded else False
        )
        self.sigma = sigma if bounded else None
        self.sigma_mode = sigma_mode
        self.noise = NoiseSource(noise_seed) if bounded else None
        self.diagnose_next = False
        """Set True to measure the diagnostics (gradient ratio) on the next forward."""
        self.last_stats: dict[str, Tensor] = {}

    # ProxyCriterion: classes, proxies and conditions are the base loss's.
    @property
    def num_classes(self) -> int:
        return self.base_loss.num_classes

    @property
    def embed_dim(self) -> int:
        return self.base_loss.embed_dim

    @property
    def proxies(self) -> Tensor:
        return self.base_loss.proxies

    def class_condition(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.base_loss.class_condition(embeddings, labels)

    def capped_exp(self, nll: Tensor) -> Tensor:
        """``exp(nll)`` exact up to ``nll_cap``, ``exp(cap) * (1 + nll - cap)`` above it."""
        cap = self.nll_cap
        over = nll > cap
        exact = torch.exp(torch.where(over, cap, nll))  # never evaluates exp above the cap
        return torch.where(over, math.exp(cap) * (nll - cap + 1.0), exact)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The base loss's (B, C) class scores (see :meth:`ProxyLoss.get_logits`)."""
        return self.base_loss.get_logits(embeddings)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: object = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_call(type(self).__name__, labels, indices_tuple, ref_emb, ref_labels)
        given = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
        proxy_loss, embeddings, labels = self.base_loss.loss_and_inputs(embeddings, labels)
        diagnose, self.diagnose_next = self.diagnose_next, False
        with no_autocast(embeddings.device):
            flow_input = embeddings.detach() if self.detach_inputs else embeddings
            if self.ascend:
                flow_input = reverse_grad(flow_input)
            t = self.terms(self, flow_input, labels, given)
            nir_part = t.term if t.weight is None else t.weight * t.term
            if self.nir_scale != 1.0:  # 1.0 (every recipe but the controls) leaves it as is
                nir_part = self.nir_scale * nir_part
            proxy_part = proxy_loss if t.proxy_weight is None else t.proxy_weight * proxy_loss
            loss = (proxy_part + nir_part).to(t.nll.dtype)
            stats = dict(t.stats)
            capped = stats.pop("capped", None)
            if capped is None:
                capped = torch.zeros((), dtype=torch.long, device=t.nll.device)
        # "nir": the term as it enters the loss when it has no weight of its own (exp_nll),
        # else the unweighted term.
        nir = nir_part if t.weight is None else t.term
        self.last_stats = {
            "proxy_loss": proxy_loss.detach(),
            "nll": t.nll.detach().mean(),
            "nir": nir.detach().to(t.nll.dtype),
            "capped": capped.detach(),
            **stats,
        }
        if diagnose:
            self.last_stats.update(self._gradient_stats(embeddings, nir_part, proxy_part, t.nll))
        if self.check_finite:
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(self._diagnose(embeddings, t.nll, proxy_loss))
        else:
            self.last_stats["nonfinite"] = (~torch.isfinite(t.nll.detach())).sum()
        return loss

    def _gradient_stats(
        self, embeddings: Tensor, nir_part: Tensor, proxy_part: Tensor, nll: Tensor
    ) -> dict[str, Tensor]:
        """The alarm's numbers: tangent gradient norms of both weighted terms on the
        embeddings, their ratio, NLL min/max (device tensors; no host sync)."""
        stats = {"nll_min": nll.detach().amin(), "nll_max": nll.detach().amax()}
        if not (torch.is_grad_enabled() and embeddings.requires_grad):
            nan = embeddings.new_full((), math.nan)
            stats.update(grad_ratio=nan, grad_nir=nan, grad_proxy=nan)
            return stats
        unit = F.normalize(embeddings.detach(), dim=-1)

        def tangent_norm(term: Tensor) -> Tensor:
            if not term.requires_grad:
                return embeddings.new_zeros(())
            (g,) = torch.autograd.grad(term, embeddings, retain_graph=True, allow_unused=True)
            if g is None:
                return embeddings.new_zeros(())
            g = g.detach().to(unit.dtype)
            g = g - (g * unit).sum(-1, keepdim=True) * unit
            return torch.linalg.vector_norm(g)

        with no_autocast(embeddings.device):
            g_nir = tangent_norm(nir_part).to(unit.dtype)
            g_proxy = tangent_norm(proxy_part).to(unit.dtype)
        tiny = torch.finfo(unit.dtype).tiny
        stats.update(grad_ratio=g_nir / g_proxy.clamp_min(tiny), grad_nir=g_nir, grad_proxy=g_proxy)
        return stats

    def conditions(
        self, embeddings: Tensor, labels: Tensor, given: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """The flow's conditions: ``(n, D)`` rows and the row of each sample (or ``(B, D)``
        and None). Detached for ``detach_inputs``."""
        cond, index = self.base_loss.batch_conditions(embeddings, labels, given)
        if self.detach_inputs:
            cond = cond.detach()
        return cond, index

    def flow_nll(self, embeddings: Tensor, labels: Tensor, given: Tensor) -> Tensor:
        """Per-sample NLL under the flow conditioned on each sample's class condition."""
        cond, index = self.conditions(embeddings, labels, given)
        return self.flow.nll(embeddings, cond, index)

    def _diagnose(self, embeddings: Tensor, nll: Tensor, proxy_loss: Tensor) -> str:
        def finite(t: Tensor) -> bool:
            return bool(torch.isfinite(t.detach()).all())

        if not finite(embeddings):
            return (
                "NIRLoss: the embeddings contain NaN/inf, so the backbone or head has diverged "
                "(or the input batch is corrupt): lower the learning rate, check the data, or "
                "use a GradScaler with fp16"
            )
        if not all(finite(p) for p in self.base_loss.proxy_parameters()):
            return "NIRLoss: the proxies contain NaN/inf: lower proxy_lr_mult"
        if not all(finite(p) for p in self.flow.parameters()):
            return "NIRLoss: the flow weights contain NaN/inf: lower flow_lr_mult"
        if not finite(proxy_loss):
            return "NIRLoss: the proxy loss is NaN/inf on finite inputs: check its parameters"
        if not finite(nll):
            return (
                "NIRLoss: the flow's NLL overflowed on finite inputs (the flow weights are "
                "huge): lower flow_lr_mult"
            )
        return "NIRLoss: the loss is NaN/inf: lower the weights or nll_cap"

    def param_groups(
        self, lr: float, proxy_lr_mult: float, flow_lr_mult: float = 1.0
    ) -> list[dict]:
        """Optimizer groups: ``proxies`` (lr x proxy_lr_mult) and ``flow`` (lr x flow_lr_mult),
        no weight decay on either (authors' recipe: x4000 and x50 for CUB/Cars, x1 flow SOP).
        """
        groups = self.base_loss.param_groups(lr, proxy_lr_mult)
        groups.append(
            {
                "name": "flow",
                "params": list(self.flow.parameters()),
                "lr": lr * flow_lr_mult,
                "weight_decay": 0.0,
            }
        )
        return groups

    @torch.no_grad()
    def load_authors_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the state_dict of the authors' NIR criterion (``criteria/nir.py``).

        Takes ``proxies`` into ``base_loss`` and the FrEIA flow (and condition embedder)
        into ``flow`` (see :meth:`ConditionalFlow.load_freia_state_dict`).
        """
        if "proxies" not in state_dict:
            raise InputError(
                "no 'proxies' entry: pass the state_dict of the authors' NIR criterion"
            )
        proxies = state_dict["proxies"]
        target = self.base_loss.proxies
        if tuple(proxies.shape) != tuple(target.shape):
            raise InputError(
                f"the checkpoint's proxies have shape {tuple(proxies.shape)}, this loss's "
                f"{tuple(target.shape)}: build the base loss with matching num_classes and dim"
            )
        self.flow.load_freia_state_dict(state_dict)
        target.copy_(proxies)

    def extra_repr(self) -> str:
        if self.objective == "exp_nll":
            weight = f"proxy_weight={self.proxy_weight}, nll_cap={self.nll_cap}"

        else:
            weight = f"nir_weight={self.nir_weight}"
        if self.objective in BOUNDED:
            weight += f", sigma={self.sigma} ({self.sigma_mode}), ascend={self.ascend}"
        if self.nir_scale != 1.0:
            weight += f", nir_scale={self.nir_scale}"
        if self.detach_inputs:
            weight += ", detach_inputs=True"
        return f"objective={self.objective!r}, {weight}"


def nir_diagnostics(criterion: NIRLoss, embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """The inertness alarm's numbers on one batch, for your own loop.

    Runs ``criterion(embeddings, labels)`` with the diagnostics on (gradients are taken
    with ``torch.autograd.grad``, nothing accumulates into ``.grad``) and returns
    ``last_stats`` as floats plus ``inert`` (``grad_ratio < INERT_THRESHOLD``):
    ``grad_ratio`` (tangent gradient of the NIR term over the proxy term's, on the
    embeddings), ``grad_nir``, ``grad_proxy``, ``nll`` (mean), ``nll_min``, ``nll_max``,
    ``nir`` (the term), ``proxy_loss``. It reads the values on the host (one sync): call it
    every few hundred steps, or set ``criterion.diagnose_next = True`` before a training
    step and read ``criterion.last_stats`` later. A bounded objective draws its noise for
    this batch (the generator advances as in a training step).
    """
    if not isinstance(criterion, NIRLoss):
        raise InputTypeError(f"criterion must be an NIRLoss, got {type(criterion).__name__}")
    if not embeddings.requires_grad:
        embeddings = embeddings.detach().requires_grad_(True)
    with torch.enable_grad():
        criterion.diagnose_next = True
        criterion(embeddings, labels)
    out = {k: float(v) for k, v in criterion.last_stats.items()}
    out["inert"] = bool(out["grad_ratio"] < INERT_THRESHOLD)
    return out
