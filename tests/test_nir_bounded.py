"""The noise-bounded NIR objectives, the controls and the inertness alarm's numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

from nirdml.flow import ConditionalFlow
from nirdml.losses import (
    INERT_THRESHOLD,
    OBJECTIVES,
    NIRLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
    nir_diagnostics,
)
from nirdml.losses.nir import BOUNDED, flow_dims, tangent_coordinates
from nirdml.training.config import ConfigError, load_config
from test_nir import _labels, _unit  # the same seeded unit vectors and paired labels

BOUNDED_NAMES = tuple(BOUNDED)


def _small_flow(objective: str, d: int, g: torch.Generator) -> ConditionalFlow:
    flow_dim, cond_dim = flow_dims(objective, d)
    return ConditionalFlow(
        flow_dim, hidden_width=32, hidden_layers=3, cond_dim=cond_dim, generator=g
    )


def _nir(objective: str, c: int = 10, d: int = 16, seed: int = 0, base=None, **kw) -> NIRLoss:
    g = torch.Generator().manual_seed(seed)
    base = base if base is not None else ProxyAnchorLoss(c, d, generator=g)
    return NIRLoss(base, objective, flow=_small_flow(objective, d, g), **kw)


def _householder_coordinates(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Log map at p, then an explicit reflection matrix taking p to -sign(p_D) e_D; by rows."""
    rows = []
    for xi, pi in zip(x, p, strict=True):
        xi = xi / xi.norm()
        theta = torch.arccos((xi @ pi).clamp(-1, 1))
        v = theta / torch.sin(theta) * (xi - torch.cos(theta) * pi)
        e = torch.zeros_like(pi)
        e[-1] = 1.0
        u = pi + (1.0 if pi[-1] >= 0 else -1.0) * e
        h = torch.eye(len(pi), dtype=pi.dtype) - 2.0 * torch.outer(u, u) / (u @ u)
        rows.append((h @ v)[:-1])
    return torch.stack(rows)


@pytest.mark.parametrize("objective", BOUNDED_NAMES)
@pytest.mark.parametrize("sigma_mode", ["relative", "absolute"])
def test_bounded_objective_equals_float64_hand_computation(objective, sigma_mode) -> None:
    """b_i = nll_i / d + 0.5 log(2 pi) - 0.5 log(2 pi e std^2) on x + std * eps, with eps
    the generator's first draw; L = L_proxy + w * mean_i b_i."""
    sigma = 0.3 if sigma_mode == "relative" else 0.05
    loss = _nir(objective, sigma=sigma, sigma_mode=sigma_mode, nir_weight=0.7, noise_seed=5)
    loss = loss.double()
    x, y = _unit(12, 16, seed=1).double(), _labels(12, 10, seed=2)
    value = loss(x, y)
    with torch.no_grad():
        p = F.normalize(loss.base_loss.proxies, dim=-1)[y]
        if BOUNDED[objective][0] == "tangent":
            coords = _householder_coordinates(x, p)
            dist = torch.arccos((x * p).sum(1).clamp(-1, 1))
        else:
            coords, dist = x, (x - p).norm(dim=1)
        d = coords.shape[1]
        std = sigma * dist.mean() / math.sqrt(d) if sigma_mode == "relative" else sigma
        std = torch.as_tensor(std, dtype=x.dtype)
        eps = torch.randn(coords.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
        z, logdet = loss.flow(coords + std * eps, p)
        nll = 0.5 * (z**2).sum(1) - logdet
        b = nll / d + 0.5 * math.log(2 * math.pi) - 0.5 * torch.log(2 * math.pi * math.e * std**2)
        expected = loss.base_loss(x, y) + 0.7 * b.mean()
    # 1e-9: the log map's angle by arccos here, by atan2 in the loss (float64 rounding)
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=x.dtype), rtol=1e-9, atol=0)
    torch.testing.assert_close(loss.last_stats["nir"], b.mean(), rtol=1e-9, atol=0)
    torch.testing.assert_close(loss.last_stats["nll"], nll.mean(), rtol=1e-9, atol=0)


def test_tangent_coordinates_are_the_log_map() -> None:
    x = F.normalize(_unit(50, 8, seed=3).double(), dim=-1)
    p = F.normalize(_unit(50, 8, seed=4).double(), dim=-1)
    p[0] = x[0]  # a sample exactly at its proxy: coordinates 0, finite gradient
    p[1, -1] = -p[1, -1]  # both signs of p_D
    coords, theta = tangent_coordinates(x, p)
    torch.testing.assert_close(
        coords[1:], _householder_coordinates(x[1:], p[1:]), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(coords.norm(dim=1), theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(theta, torch.arccos((x * p).sum(1).clamp(-1, 1)), atol=1e-7, rtol=0)
    assert float(coords[0].abs().max()) < 1e-15
    xg = x.clone().requires_grad_()
    tangent_coordinates(xg, p)[0].sum().backward()
    assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("objective", ["noise_nll", "tangent_nll"])
def test_bound_holds_after_the_flow_fits_the_data(objective) -> None:
    """E[b] >= 0 for any flow: train the flow (and only it) to fit a tight cluster, where
    an unbounded NLL would run away, then average b over fresh noise draws.

    Margin: 4 standard errors of the Monte Carlo mean (b's std over the draws / sqrt(n)),
    a one-sided 4-sigma band, plus 0.02 nats/dim for the flow's remaining finite-sample
    overfit to the 64 fixed points (each draw is fresh noise, so the flow cannot fit it).
    """
    d, c = 8, 4
    loss = _nir(objective, c=c, d=d, sigma=0.05, sigma_mode="absolute", noise_seed=1)
    y = torch.arange(c).repeat_interleave(16)
    with torch.no_grad():
        p = F.normalize(loss.base_loss.proxies, dim=-1)[y]
        x = F.normalize(p + 0.02 * _unit(len(y), d, seed=7), dim=-1)  # tight classes
    opt = torch.optim.Adam(loss.flow.parameters(), lr=3e-3)  # only the flow is optimised
    for _ in range(300):
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()
    with torch.no_grad():
        draws = []
        for _ in range(200):
            loss(x, y)
            draws.append(float(loss.last_stats["nir"]))
    draws_t = torch.tensor(draws)
    mean, sem = float(draws_t.mean()), float(draws_t.std() / math.sqrt(len(draws)))
    assert mean > -(4 * sem + 0.02), f"E[b] = {mean:.4f} (sem {sem:.4f}) broke the bound"
    # ... while the flow did learn: well below the untrained flow's value
    fresh = _nir(objective, c=c, d=d, sigma=0.05, sigma_mode="absolute", noise_seed=1)
    with torch.no_grad():
        fresh(x, y)
    assert mean < float(fresh.last_stats["nir"]) - 1.0


@pytest.mark.parametrize("objective", ["noise_nll", "tangent_nll"])
def test_gradients_reach_everything_and_the_spread_sign_reverses_only_the_embeddings(
    objective,
) -> None:
    spread = {"noise_nll": "noise_nll_spread", "tangent_nll": "tangent_spread"}[objective]
    x0, y = _unit(12, 16, seed=8).double(), _labels(12, 10, seed=9)
    grads = {}
    for name in (objective, spread):
        loss = _nir(name, noise_seed=3, nir_weight=2.0).double()
        x = x0.clone().requires_grad_()
        value = loss(x, y)
        value.backward()
        px = x0.clone().requires_grad_()
        loss.base_loss(px, y).backward()
        grads[name] = {
            "nir_emb": x.grad - px.grad,  # the NIR term's part of the embedding gradient
            "proxies": loss.base_loss.proxies.grad.clone(),
            "flow": [p.grad.clone() for p in loss.flow.parameters()],
            "value": value.detach(),
        }
        assert float(x.grad.abs().sum()) > 0
        assert float(loss.base_loss.proxies.grad.abs().sum()) > 0
        assert all(float(p.grad.abs().sum()) > 0 for p in loss.flow.parameters())
    desc, asc = grads[objective], grads[spread]
    assert float(desc["nir_emb"].abs().max()) > 1e-6
    torch.testing.assert_close(asc["nir_emb"], -desc["nir_emb"], rtol=1e-9, atol=1e-12)
    assert torch.equal(asc["value"], desc["value"])
    assert torch.equal(asc["proxies"], desc["proxies"])  # the proxies descend in both
    assert all(torch.equal(a, b) for a, b in zip(asc["flow"], desc["flow"], strict=True))
    # the ascend option is the same thing as the named objective
    named = _nir(spread, noise_seed=3)
    option = _nir(objective, noise_seed=3, ascend=True)
    assert named.ascend and option.ascend and not _nir(objective).ascend
    xa, xb = x0.float().clone().requires_grad_(), x0.float().clone().requires_grad_()
    named(xa, y).backward()
    option(xb, y).backward()
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("objective", BOUNDED_NAMES)
@pytest.mark.parametrize(
    "base",
    [
        lambda: ProxyNCALoss(10, 16),
        lambda: SoftTripleLoss(10, 16, centers_per_class=3),
        lambda: pml.ProxyAnchorLoss(10, 16),
    ],
)
def test_bounded_objectives_on_other_proxy_losses(objective, base) -> None:
    loss = NIRLoss(base(), objective)
    x, y = _unit(12, 16, seed=10).requires_grad_(), _labels(12, 10, seed=11)
    value = loss(x, y)
    assert torch.isfinite(value)
    value.backward()
    assert float(x.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in loss.base_loss.proxy_parameters())
    assert all(p.grad is not None for p in loss.flow.parameters())


def test_noise_is_private_fresh_and_resumable() -> None:
    loss = _nir("noise_nll", noise_seed=4)
    x, y = _unit(12, 16, seed=12), _labels(12, 10, seed=13)
    before = torch.get_rng_state()
    first = loss(x, y).detach()
    assert torch.equal(torch.get_rng_state(), before), "the global RNG was used"
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in loss.state_dict().items()}
    second = loss(x, y).detach()
    assert not torch.equal(first, second), "the noise must be fresh each step"
    resumed = _nir("noise_nll", noise_seed=99)
    resumed.load_state_dict(state)  # generator state and running spread come with it
    assert torch.equal(resumed(x, y).detach(), second)
    assert float(resumed.noise.spread) > 0


def test_sigma_is_relative_to_the_running_spread() -> None:
    loss = _nir("noise_nll", sigma=0.5)
    x, y = _unit(12, 16, seed=14), _labels(12, 10, seed=15)
    loss(x, y)
    with torch.no_grad():
        p = F.normalize(loss.base_loss.proxies, dim=-1)[y]
        r = (x - p).norm(dim=1).mean()
    torch.testing.assert_close(loss.last_stats["sigma"], 0.5 * r / 4.0)  # sqrt(16) = 4
    torch.testing.assert_close(loss.noise.spread, r)
    loss(x * 0 + p, y)  # the next batch sits at the proxies: spread 0, running 0.9 * r
    torch.testing.assert_close(loss.noise.spread, 0.9 * r)
    absolute = _nir("tangent_nll", sigma=0.01, sigma_mode="absolute")
    absolute(x, y)
    assert float(absolute.last_stats["sigma"]) == pytest.approx(0.01)


def test_controls_zero_term_and_detached_inputs() -> None:
    x0, y = _unit(12, 16, seed=16), _labels(12, 10, seed=17)
    zero = _nir("exp_nll", nir_scale=0.0, proxy_weight=0.01)
    x = x0.clone().requires_grad_()
    value = zero(x, y)
    torch.testing.assert_close(value, 0.01 * zero.base_loss(x0, y), rtol=1e-6, atol=0)
    value.backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in zero.flow.parameters())
    assert float(nir_diagnostics(zero, x0, y)["grad_ratio"]) == 0.0
    for objective in ("exp_nll", "noise_nll_spread"):
        det = _nir(objective, detach_inputs=True)
        x = x0.clone().requires_grad_()
        det(x, y).backward()
        px = x0.clone().requires_grad_()
        scale = det.proxy_weight if objective == "exp_nll" else 1.0
        (scale * det.base_loss(px, y)).backward()
        torch.testing.assert_close(x.grad, px.grad)  # only the proxy loss reaches them
        assert all(float(p.grad.abs().sum()) > 0 for p in det.flow.parameters())
        stats = nir_diagnostics(det, x0, y)
        assert stats["grad_ratio"] == 0.0 and stats["inert"]


def test_diagnostics_are_the_tangent_gradient_ratio_and_change_nothing() -> None:
    x0, y = _unit(12, 16, seed=18).double(), _labels(12, 10, seed=19)
    for objective in ("exp_nll", "tangent_spread"):
        loss = _nir(objective, noise_seed=2).double()
        plain = _nir(objective, noise_seed=2).double()
        stats = nir_diagnostics(loss, x0, y)
        # by hand: the two weighted terms' gradients, projected tangent to the sphere
        x = x0.clone().requires_grad_()
        value = plain(x, y)
        weight = plain.proxy_weight if objective == "exp_nll" else 1.0
        (g_all,) = torch.autograd.grad(value, x)
        px = x0.clone().requires_grad_()
        (g_proxy,) = torch.autograd.grad(weight * plain.base_loss(px, y), px)
        g_nir = g_all - g_proxy

        def tangent(g):
            return g - (g * x0).sum(1, keepdim=True) * x0

        ratio = tangent(g_nir).norm() / tangent(g_proxy).norm()
        assert stats["grad_ratio"] == pytest.approx(float(ratio), rel=1e-6)
        assert stats["nll_min"] <= stats["nll"] <= stats["nll_max"]
        assert stats["inert"] is (stats["grad_ratio"] < INERT_THRESHOLD)
        assert stats["nir"] == pytest.approx(float(plain.last_stats["nir"]), rel=1e-12)
        # a diagnosed training step: same loss and gradients as an undiagnosed one
        a, b = _nir(objective, noise_seed=2), _nir(objective, noise_seed=2)
        xa, xb = x0.float().clone().requires_grad_(), x0.float().clone().requires_grad_()
        a.diagnose_next = True
        va, vb = a(xa, y), b(xb, y)
        assert "grad_ratio" in a.last_stats and "grad_ratio" not in b.last_stats
        assert not a.diagnose_next  # one batch only
        va.backward()
        vb.backward()
        assert torch.equal(va, vb) and torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("objective", BOUNDED_NAMES)
def test_bounded_float64_and_autocast(objective) -> None:
    x, y = _unit(12, 16, seed=20), _labels(12, 10, seed=21)
    ref = _nir(objective, noise_seed=6)(x.bfloat16().float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = _nir(objective, noise_seed=6)(x.bfloat16(), y)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref)
    v64 = _nir(objective, noise_seed=6).double()(x.double(), y)
    assert v64.dtype == torch.float64
    # float32 and float64 noise draws of one generator differ slightly: a loose check
    # (test_bounded_objective_equals_float64_hand_computation checks float64 exactly)
    torch.testing.assert_close(v64.float(), ref.detach(), rtol=1e-2, atol=0)


def test_rejects_bad_bounded_configuration() -> None:
    with pytest.raises(ValueError, match="Did you mean 'noise_nll'"):
        _nir("noise_nl")
    with pytest.raises(ValueError, match="only applies to the bounded"):
        _nir("exp_nll", sigma=0.1)
    with pytest.raises(ValueError, match="sigma must be"):
        _nir("noise_nll", sigma=0.0)
    with pytest.raises(ValueError, match="sigma_mode"):
        _nir("noise_nll", sigma_mode="rel")
    with pytest.raises(ValueError, match=r"dim 15 with a condition of dim 16"):
        NIRLoss(ProxyAnchorLoss(4, 16), "tangent_nll", flow=ConditionalFlow(16))


def test_config_selects_and_validates_objectives() -> None:
    from nirdml.training import config as config_module
    from nirdml.training.build import build_loss

    for objective in OBJECTIVES:
        cfg = load_config("omniglot-nir", [f"loss.nir.objective={objective}"])
        loss = build_loss(cfg.loss, 20, cfg.model.embed_dim, seed=3)
        assert loss.objective == objective
        assert loss.flow.dim == flow_dims(objective, 128)[0]
    assert loss.noise.seed == 3
    with pytest.raises(ConfigError, match="Did you mean 'tangent_spread'"):
        load_config("omniglot-nir", ["loss.nir.objective=tangent_sprad"])
    with pytest.raises(ConfigError, match="only apply to the bounded"):
        load_config("omniglot-nir", ["loss.nir.objective=exp_nll", "loss.nir.sigma=0.1"])
    with pytest.raises(ConfigError, match="sigma_mode"):
        load_config("omniglot-nir", ["loss.nir.objective=noise_nll", "loss.nir.sigma_mode=x"])
    cfg = load_config(
        "omniglot-nir",
        ["loss.nir.objective=noise_nll", "loss.nir.ascend=true", "loss.nir.sigma=0.2"],
    )
    loss = build_loss(cfg.loss, 20, 128)
    assert loss.ascend and loss.sigma == 0.2
    assert "OBJECTIVES" not in vars(config_module)  # the config stays torch-free ...
    assert tuple(BOUNDED) == OBJECTIVES[2:]  # ... and its list matches the loss's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("objective", BOUNDED_NAMES)
def test_bounded_cuda_with_autocast(objective) -> None:
    loss = NIRLoss(ProxyAnchorLoss(100, 128), objective).cuda()
    x, y = _unit(90, 128, seed=22).cuda(), _labels(90, 100, seed=23)
    with torch.autocast("cuda", dtype=torch.float16):
        value = loss(x.half(), y)
    assert value.dtype == torch.float32 and loss.base_loss.proxies.dtype == torch.float32
    assert torch.isfinite(value)
    value.backward()
    stats = nir_diagnostics(loss, x, y)
    assert math.isfinite(stats["grad_ratio"])
    state = loss.state_dict()
    again = NIRLoss(ProxyAnchorLoss(100, 128), objective).cuda()
    again.load_state_dict(state)
    torch.testing.assert_close(again(x, y), loss(x, y))
