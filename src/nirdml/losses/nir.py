"""NIRLoss: Non-isotropy regularisation on top of a proxy loss (method.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from nirdml.errors import NonFiniteLossError
from nirdml.flow import ConditionalFlow, no_autocast
from nirdml.losses.base import ProxyLoss
from nirdml.losses.pml import PMLProxyLoss

OBJECTIVES = ("exp_nll", "nll")


class NIRLoss(nn.Module):
    """A proxy loss plus NIR: every embedding must be likely under the conditional flow
    ``tau^-1( . | own-class proxy)``, i.e. reachable from its proxy by an invertible map.

    With ``nll_i = 0.5 ||z_i||^2 - log|det dz_i/dx_i|``, ``z_i = flow(x_i | c_i)``:

    - ``objective="exp_nll"`` (default; the authors' code, which produced the published
      numbers): ``L = mean_i exp(nll_i) + proxy_weight * L_proxy``. ``proxy_weight``: 0.01
      (their default and Cars196), 0.0075 for CUB200, 0.3 for SOP.
    - ``objective="nll"`` (the paper's equation): ``L = L_proxy + nir_weight * mean_i nll_i``.
      No value was published; the default ``nir_weight = 1 / dim`` makes the NIR term the
      NLL in nats per dimension, on the O(1) scale of the proxy losses (the summed NLL grows
      linearly with D and would otherwise swamp ``L_proxy``).

    Each weight only enters its own objective.

    The condition ``c_i`` is ``base_loss.class_condition``: the L2-normalised proxy of the
    sample's own class, not detached, so NIR gradients reach the proxies. For SoftTriple
    (K centers per class) it is the class's similarity-weighted center
    ``normalize(sum_k softmax_k(s(x, w_k) / gamma) w_k)``. When the condition depends on the
    class only and the labels come on the CPU (as a DataLoader yields them), the flow's
    condition projection runs once per class of the batch (``cond_index``): same numbers,
    fewer FLOPs, no device sync.

    Overflow (``exp_nll``): ``exp(nll)`` is computed, as in the authors' code, in float64
    (their ``np.ones`` multiplier promoted it; float32 on devices without float64) and is
    exact up to ``nll_cap`` (30 by default). Above the cap it continues linearly,
    ``exp(cap) * (1 + nll - cap)``, so value and gradient stay finite and keep pushing the
    NLL down. exp(30) ~ 1e13 lies far above healthy values (nll ~ 1 to 15 at init for
    D = 128 / 512, falling with training) yet keeps every float32 gradient, and Adam's
    squared gradient, finite. ``last_stats["capped"]`` counts the capped samples of the
    batch. Given the per-sample NLLs, the value below the cap is bit for bit the authors'
    float64 formula, then rounded to the working dtype.

    Non-finite values: with ``check_finite=True`` (default) a NaN/inf loss raises
    :class:`~nirdml.errors.NonFiniteLossError` naming the culprit (embeddings, proxies,
    flow weights). That check reads one value on the host (a sync on CUDA); with
    ``check_finite=False`` nothing syncs, a non-finite loss is returned as is, and
    ``last_stats["nonfinite"]`` (device tensor) counts the non-finite per-sample NLLs.

    Dtypes: computed in the parameters' dtype (float32, or float64 after ``.double()``);
    fp16/bf16 embeddings from autocast are upcast and autocast is off inside, so the proxies
    and flow never change dtype.

    Args:
        base_loss: a :class:`ProxyLoss`, or a pytorch-metric-learning proxy loss object
            (wrapped in :class:`PMLProxyLoss`).
        objective: ``"exp_nll"`` or ``"nll"``.
        proxy_weight: weight of ``L_proxy`` in ``exp_nll`` (default 0.01).
        nir_weight: weight of the mean NLL in ``nll`` (default ``1 / dim``).
        flow: the flow; ``None`` builds ``ConditionalFlow(dim)`` (the authors' flow).
        nll_cap: where ``exp_nll`` switches to the linear continuation.
        check_finite: raise on a non-finite loss (see above).
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
    ) -> None:
        super().__init__()
        if not isinstance(base_loss, ProxyLoss):
            if type(base_loss).__module__.startswith("pytorch_metric_learning"):
                base_loss = PMLProxyLoss(base_loss)
            else:
                raise TypeError(
                    f"base_loss must be a nirdml ProxyLoss (ProxyAnchorLoss, ProxyNCALoss, "
                    f"SoftTripleLoss, PMLProxyLoss) or a pytorch-metric-learning proxy loss, "
                    f"got {type(base_loss).__name__}"
                )
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        dim = base_loss.embedding_dim
        if flow is None:
            flow = ConditionalFlow(dim)
        if not isinstance(flow, ConditionalFlow) or flow.dim != dim:
            raise ValueError(
                f"flow must be a ConditionalFlow of dim {dim} (the base loss's dim), got {flow!r}"
            )
        proxy_weight = 0.01 if proxy_weight is None else float(proxy_weight)
        nir_weight = 1.0 / dim if nir_weight is None else float(nir_weight)
        for name, value in (("proxy_weight", proxy_weight), ("nir_weight", nir_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(nll_cap) and nll_cap > 0):
            raise ValueError(f"nll_cap must be a finite number > 0, got {nll_cap}")
        self.base_loss = base_loss
        self.flow = flow
        self.objective = objective
        self.proxy_weight = proxy_weight
        self.nir_weight = nir_weight
        self.nll_cap = float(nll_cap)
        self.check_finite = bool(check_finite)
        self.last_stats: dict[str, Tensor] = {}

    # The ProxyLoss-like surface the training loop uses.
    @property
    def num_classes(self) -> int:
        return self.base_loss.num_classes

    @property
    def embedding_dim(self) -> int:
        return self.base_loss.embedding_dim

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

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        given = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
        embeddings, labels = self.base_loss.check_inputs(embeddings, labels)
        with no_autocast(embeddings.device):
            proxy_loss = self.base_loss.compute(embeddings, labels)
            nll = self._nll(embeddings, labels, given)
            if self.objective == "exp_nll":
                wide = torch.float64 if nll.device.type in ("cpu", "cuda") else nll.dtype
                nll_wide = nll.to(wide)
                nir_wide = self.capped_exp(nll_wide).mean()
                loss = (nir_wide + self.proxy_weight * proxy_loss).to(nll.dtype)
                nir = nir_wide.detach().to(nll.dtype)
                capped = (nll_wide > self.nll_cap).sum()
            else:
                nir_mean = nll.mean()
                loss = proxy_loss + self.nir_weight * nir_mean
                nir = nir_mean.detach()
                capped = torch.zeros((), dtype=torch.long, device=nll.device)
        self.last_stats = {
            "proxy_loss": proxy_loss.detach(),
            "nll": nll.detach().mean(),
            "nir": nir,
            "capped": capped.detach(),
        }
        if self.check_finite:
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(self._diagnose(embeddings, nll, proxy_loss))
        else:
            self.last_stats["nonfinite"] = (~torch.isfinite(nll.detach())).sum()
        return loss

    def _nll(self, embeddings: Tensor, labels: Tensor, given: Tensor) -> Tensor:
        """Per-sample NLL under the flow conditioned on each sample's class condition."""
        base = self.base_loss
        if base.condition_per_class and given.device.type == "cpu":
            # A batch holds few classes (45 x 2 samples): condition once per class. The
            # unique runs on the CPU labels, so it never syncs an accelerator.
            classes, index = torch.unique(given, return_inverse=True)
            device = embeddings.device
            cond = base.proxy_condition(classes.to(device, torch.long, non_blocking=True))
            return self.flow.nll(embeddings, cond, index.to(device, non_blocking=True))
        return self.flow.nll(embeddings, base.class_condition(embeddings, labels))

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

    def param_groups(self, lr: float, proxy_lr_mult: float, flow_lr_mult: float) -> list[dict]:
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
            raise ValueError(
                "no 'proxies' entry: pass the state_dict of the authors' NIR criterion"
            )
        proxies = state_dict["proxies"]
        target = self.base_loss.proxies
        if tuple(proxies.shape) != tuple(target.shape):
            raise ValueError(
                f"the checkpoint's proxies have shape {tuple(proxies.shape)}, this loss's "
                f"{tuple(target.shape)}: build the base loss with matching num_classes and dim"
            )
        self.flow.load_freia_state_dict(state_dict)
        target.copy_(proxies)

    def extra_repr(self) -> str:
        weight = (
            f"proxy_weight={self.proxy_weight}, nll_cap={self.nll_cap}"
            if self.objective == "exp_nll"
            else f"nir_weight={self.nir_weight}"
        )
        return f"objective={self.objective!r}, {weight}"
