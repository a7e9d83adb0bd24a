"""Proxy losses: equal to pytorch-metric-learning's, and to hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import regularizers as pml_reg

from nirdml.flow import ConditionalFlow
from nirdml.losses import (
    NIRLoss,
    PMLProxyLoss,
    ProxyAnchorLoss,
    ProxyCriterion,
    ProxyNCALoss,
    SoftTripleLoss,
)
from test_flow_reference import authors_panc


def _batch(b: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    # b/2 classes drawn with replacement x 2 samples (the authors' sampler)
    labels = torch.randint(0, c, (b // 2,), generator=g).repeat_interleave(2)
    labels[-1] = labels[0]  # and a class with 3+ samples
    return x, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the largest reference entry."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_same_value_and_grads(ours, theirs, their_proxies, x, labels, to_ours=lambda g: g):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    la, lb = ours(xa, labels), theirs(xb, labels)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(la, [xa, ours.proxies])
    gb = torch.autograd.grad(lb, [xb, their_proxies])
    assert _rel(ga[0], gb[0]) < 1e-5
    assert _rel(ga[1], to_ours(gb[1])) < 1e-5


@pytest.mark.parametrize(("b", "d", "c"), [(30, 16, 20), (90, 128, 100), (8, 8, 3)])
def test_proxy_anchor_proxies_equals_pml(b: int, d: int, c: int) -> None:
    ours = ProxyAnchorLoss(c, d, generator=torch.Generator().manual_seed(0))
    theirs = pml.ProxyAnchorLoss(c, d, margin=0.1, alpha=32)
    theirs.proxies.data.copy_(ours.proxies.data)
    x, labels = _batch(b, d, c, seed=b)
    _assert_same_value_and_grads(ours, theirs, theirs.proxies, x, labels)


def test_proxy_anchor_proxies_with_a_class_without_negatives() -> None:
    ours = ProxyAnchorLoss(3, 8, generator=torch.Generator().manual_seed(1))
    theirs = pml.ProxyAnchorLoss(3, 8)
    theirs.proxies.data.copy_(ours.proxies.data)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(5, dtype=torch.long)  # every sample is class 0
    _assert_same_value_and_grads(ours, theirs, theirs.proxies, x, labels)


def _samples_by_hand(x: torch.Tensor, p: torch.Tensor, y: list[int], alpha=32.0, delta=0.1):
    """method.md section 4 / the authors' panc, written out with loops in float64."""
    x = F.normalize(x.double(), dim=-1)
    p = F.normalize(p.double(), dim=-1)
    b, c = len(y), p.shape[0]
    pos = 0.0
    for j in range(b):  # one term per batch column: the proxy of sample j's class
        s = sum(
            math.exp(-alpha * (float(x[i] @ p[y[j]]) - delta)) for i in range(b) if y[i] == y[j]
        )
        pos += math.log(1.0 + s)
    neg = 0.0
    for k in range(c):  # every proxy; classes without negatives in the batch add log(1) = 0
        s = sum(math.exp(alpha * (float(x[i] @ p[k]) + delta)) for i in range(b) if y[i] != k)
        neg += math.log(1.0 + s)
    return pos / b + neg / c


def test_proxy_anchor_samples_equals_hand_computation_and_authors_code() -> None:
    loss = ProxyAnchorLoss(
        6, 8, positive_mean="samples", generator=torch.Generator().manual_seed(3)
    )
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(4))
    y = [2, 2, 2, 0, 0, 5, 1]  # repeated classes; classes 3 and 4 absent
    value = loss(x, torch.tensor(y))
    assert math.isclose(value.item(), _samples_by_hand(x, loss.proxies.data, y), rel_tol=1e-6)
    torch.testing.assert_close(value, authors_panc(x, loss.proxies, torch.tensor(y)))
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ga = torch.autograd.grad(loss(xa, torch.tensor(y)), [xa, loss.proxies])
    gb = torch.autograd.grad(authors_panc(xb, loss.proxies, torch.tensor(y)), [xb, loss.proxies])
    for a, b in zip(ga, gb, strict=True):
        assert _rel(a, b) < 1e-5


def test_proxy_anchor_modes_differ_only_with_repeated_classes() -> None:
    gen = torch.Generator().manual_seed(5)
    a = ProxyAnchorLoss(10, 8, positive_mean="proxies", generator=gen)
    b = ProxyAnchorLoss(10, 8, positive_mean="samples")
    b.proxies.data.copy_(a.proxies.data)
    x = torch.randn(6, 8, generator=gen)
    distinct = torch.tensor([0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(a(x, distinct), b(x, distinct))
    repeated = torch.tensor([0, 0, 0, 0, 1, 2])
    assert not torch.allclose(a(x, repeated), b(x, repeated))


@pytest.mark.parametrize("scale", [1.0, 9.0])
def test_proxy_nca_equals_pml(scale: float) -> None:
    ours = ProxyNCALoss(50, 32, scale=scale, generator=torch.Generator().manual_seed(6))
    theirs = pml.ProxyNCALoss(50, 32, softmax_scale=scale)
    theirs.proxies.data.copy_(ours.proxies.data)
    x, labels = _batch(40, 32, 50, seed=7)
    _assert_same_value_and_grads(ours, theirs, theirs.proxies, x, labels)


def test_proxy_nca_exclude_positive_equals_hand_computation() -> None:
    loss = ProxyNCALoss(
        5, 4, scale=3.0, exclude_positive=True, generator=torch.Generator().manual_seed(8)
    )
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    y = [0, 0, 1, 3, 3, 4]
    xs, ps = F.normalize(x.double(), dim=-1), F.normalize(loss.proxies.data.double(), dim=-1)
    total = 0.0
    for i, yi in enumerate(y):
        d = [float((xs[i] - ps[k]).square().sum()) for k in range(5)]
        total += -math.log(
            math.exp(-3.0 * d[yi]) / sum(math.exp(-3.0 * d[k]) for k in range(5) if k != yi)
        )
    assert math.isclose(loss(x, torch.tensor(y)).item(), total / 6, rel_tol=1e-5)


def test_soft_triple_equals_pml_without_and_with_center_regulariser() -> None:
    c, d, k = 12, 16, 10
    ours = SoftTripleLoss(c, d, tau=0.0, generator=torch.Generator().manual_seed(10))
    theirs = pml.SoftTripleLoss(c, d, centers_per_class=k, la=20, gamma=0.1, margin=0.01)
    theirs.fc.data.copy_(ours.proxies.data.t())
    x, labels = _batch(20, d, c, seed=11)
    _assert_same_value_and_grads(ours, theirs, theirs.fc, x, labels, to_ours=lambda g: g.t())

    ours = SoftTripleLoss(c, d, generator=torch.Generator().manual_seed(12))  # tau = 0.2
    theirs = pml.SoftTripleLoss(
        c, d, weight_regularizer=pml_reg.SparseCentersRegularizer(c, k), weight_reg_weight=0.2
    )
    theirs.fc.data.copy_(ours.proxies.data.t())
    # PML's epsilon in the sqrt is 1e-38, the original code's (ours) 1e-5: ~1e-6 apart
    torch.testing.assert_close(ours(x, labels), theirs(x, labels), rtol=1e-5, atol=1e-5)


def test_soft_triple_condition_is_the_weighted_center() -> None:
    loss = SoftTripleLoss(4, 8, centers_per_class=3, generator=torch.Generator().manual_seed(13))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(14))
    y = torch.tensor([0, 3, 3, 1, 2])
    cond = loss.class_condition(x, y)
    xs, w = F.normalize(x, dim=-1), F.normalize(loss.proxies, dim=-1)
    for i in range(5):
        centers = w[3 * int(y[i]) : 3 * int(y[i]) + 3]
        p = torch.softmax(centers @ xs[i] / 0.1, dim=0)
        torch.testing.assert_close(cond[i], F.normalize(p @ centers, dim=0))
    cond.sum().backward()
    assert loss.proxies.grad is not None and loss.proxies.grad.abs().sum() > 0


def test_pml_adapter_keeps_pml_values_and_exposes_proxies() -> None:
    inner = pml.ProxyAnchorLoss(10, 16)
    adapter = PMLProxyLoss(inner)
    x, labels = _batch(12, 16, 10, seed=15)
    torch.testing.assert_close(adapter(x, labels), inner(x, labels))
    assert adapter.proxies is inner.proxies and adapter.num_classes == 10
    assert adapter.param_groups(1e-5, 2000)[0]["params"] == [inner.proxies]
    cond = adapter.class_condition(x, labels)
    torch.testing.assert_close(cond, F.normalize(inner.proxies, dim=-1)[labels])

    st = PMLProxyLoss(pml.SoftTripleLoss(10, 16, centers_per_class=4))
    assert st.proxies.shape == (40, 16) and st.centers_per_class == 4
    assert st.class_condition(x, labels).shape == (12, 16)
    arc = PMLProxyLoss(pml.ArcFaceLoss(10, 16))
    assert arc.proxies.shape == (10, 16)
    with pytest.raises(TypeError, match="no class proxies"):
        PMLProxyLoss(pml.TripletMarginLoss())


def test_input_validation_names_problem_and_fix() -> None:
    loss = ProxyAnchorLoss(5, 8)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"shape \(batch, 8\)"):
        loss(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        loss(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="integer"):
        loss(x, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        loss(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="floating point"):
        loss(torch.ones(4, 8, dtype=torch.long), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="positive_mean"):
        ProxyAnchorLoss(5, 8, positive_mean="batch")
    assert loss(x, [0, 1, 2, 3]).item() > 0  # lists / numpy labels are accepted


@pytest.mark.parametrize("cls", [ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss])
def test_autocast_float64_stats_and_param_groups(cls) -> None:
    loss = cls(10, 16, generator=torch.Generator().manual_seed(16))
    x, labels = _batch(12, 16, 10, seed=17)
    ref = loss(x.bfloat16().float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x.bfloat16(), labels)
    assert value.dtype == torch.float32 and loss.proxies.dtype == torch.float32
    torch.testing.assert_close(value, ref)
    assert torch.equal(loss.last_stats["proxy_loss"], value.detach())
    value64 = loss.double()(x.double(), labels)
    assert value64.dtype == torch.float64
    torch.testing.assert_close(value64.float(), loss.float()(x, labels), rtol=1e-5, atol=1e-6)
    (group,) = loss.param_groups(1e-5, 2000.0, 50.0)
    assert group["name"] == "proxies" and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(0.02) and group["params"] == [loss.proxies]


def test_generator_init_is_reproducible_and_authors_scale() -> None:
    state = torch.random.get_rng_state()
    a = ProxyAnchorLoss(100, 128, generator=torch.Generator().manual_seed(0))
    b = ProxyAnchorLoss(100, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a.proxies, b.proxies)
    assert abs(a.proxies.detach().std().item() - 1 / 8) < 0.005
    assert SoftTripleLoss(7, 4).proxies.shape == (70, 4)


def test_every_criterion_implements_the_protocol() -> None:
    """The five criteria are ProxyCriterion instances, with last_stats from the start and
    after a forward, and the same members (no probes needed by callers)."""
    flow = ConditionalFlow(8, num_blocks=1, hidden_width=8, hidden_layers=2)
    criteria = [
        ProxyAnchorLoss(5, 8),
        ProxyNCALoss(5, 8),
        SoftTripleLoss(5, 8, centers_per_class=2),
        PMLProxyLoss(pml.ProxyAnchorLoss(5, 8)),
        NIRLoss(ProxyAnchorLoss(5, 8), flow=flow),
    ]
    x, labels = _batch(6, 8, 5, seed=0)
    for criterion in criteria:
        assert isinstance(criterion, ProxyCriterion), type(criterion).__name__
        assert criterion.last_stats == {}
        assert (criterion.num_classes, criterion.embed_dim) == (5, 8)
        assert criterion.class_condition(x, labels).shape == (6, 8)
        groups = criterion.param_groups(1.0, 10.0, 2.0)
        assert groups[0]["name"] == "proxies" and groups[0]["lr"] == 10.0
        criterion(x, labels)
        assert "proxy_loss" in criterion.last_stats


@pytest.mark.parametrize(
    ("ours_cls", "theirs_cls", "to_theirs"),
    [
        (ProxyAnchorLoss, pml.ProxyAnchorLoss, lambda p: p),
        (ProxyNCALoss, pml.ProxyNCALoss, lambda p: p),
        (SoftTripleLoss, pml.SoftTripleLoss, lambda p: p.t()),
    ],
)
def test_float64_embeddings_are_cast_to_the_proxies_dtype_as_pml(ours_cls, theirs_cls, to_theirs):
    """PML casts where nirdml used to raise: float64 embeddings with float32 proxies give
    the float32 value, and the gradient reaches the float64 input."""
    options = {"tau": 0.0} if ours_cls is SoftTripleLoss else {}
    ours = ours_cls(10, 16, generator=torch.Generator().manual_seed(20), **options)
    extra = {"softmax_scale": 9.0} if ours_cls is ProxyNCALoss else {}
    theirs = theirs_cls(10, 16, **extra)
    param = theirs.fc if ours_cls is SoftTripleLoss else theirs.proxies
    param.data.copy_(to_theirs(ours.proxies.data))
    x, labels = _batch(12, 16, 10, seed=21)
    x64 = x.double().requires_grad_()
    value = ours(x64, labels)
    assert value.dtype == torch.float32 and ours.proxies.dtype == torch.float32
    assert torch.equal(value, ours(x, labels))
    torch.testing.assert_close(value.double(), theirs(x.double(), labels), rtol=1e-5, atol=1e-6)
    value.backward()
    assert x64.grad is not None and x64.grad.dtype == torch.float64


def test_get_logits_equals_pml():
    x, labels = _batch(12, 16, 10, seed=22)
    pa = ProxyAnchorLoss(10, 16, generator=torch.Generator().manual_seed(23))
    pa_pml = pml.ProxyAnchorLoss(10, 16)
    pa_pml.proxies.data.copy_(pa.proxies.data)
    torch.testing.assert_close(pa.get_logits(x), pa_pml.get_logits(x))
    st = SoftTripleLoss(10, 16, centers_per_class=3, generator=torch.Generator().manual_seed(24))
    st_pml = pml.SoftTripleLoss(10, 16, centers_per_class=3)
    st_pml.fc.data.copy_(st.proxies.data.t())
    torch.testing.assert_close(st.get_logits(x), st_pml.get_logits(x))
    # ProxyNCA: ours are the softmax's logits, PML's the squared distances (theirs = -ours/s)
    nca = ProxyNCALoss(10, 16, scale=9.0, generator=torch.Generator().manual_seed(25))
    nca_pml = pml.ProxyNCALoss(10, 16, softmax_scale=9.0)
    nca_pml.proxies.data.copy_(nca.proxies.data)
    torch.testing.assert_close(-nca.get_logits(x) / 9.0, nca_pml.get_logits(x), atol=1e-5, rtol=0)
    assert torch.equal(nca.get_logits(x).argmax(1), nca_pml.get_logits(x).argmin(1))
    # the adapter and NIR expose the base loss's scores; float64 / autocast inputs are cast
    adapter = PMLProxyLoss(pa_pml)
    torch.testing.assert_close(adapter.get_logits(x), pa_pml.get_logits(x))
    flow = ConditionalFlow(16, num_blocks=1, hidden_width=8, hidden_layers=2)
    torch.testing.assert_close(NIRLoss(pa, flow=flow).get_logits(x), pa.get_logits(x))
    assert pa.get_logits(x.double()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pa.get_logits(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("kind", ["anchor", "nir"])
def test_pml_call_forms_give_a_clear_value_error(kind):
    """loss(emb) without labels, a miner's indices_tuple or a reference set: PML call forms
    nirdml's proxy losses do not take; a ValueError (LossCallError) says how to call them."""
    from nirdml.errors import LossCallError, NirdmlError

    loss = ProxyAnchorLoss(5, 8)
    if kind == "nir":
        loss = NIRLoss(loss, flow=ConditionalFlow(8, num_blocks=1, hidden_width=8))
    x, labels = _batch(6, 8, 5, seed=26)
    with pytest.raises(ValueError, match="without labels; nirdml's proxy losses need labels"):
        loss(x)
    pairs = (labels[:2], labels[2:4], labels[:2], labels[4:6])
    with pytest.raises(LossCallError, match="got indices_tuple, .*have no miners"):
        loss(x, labels, pairs)
    with pytest.raises(LossCallError, match="got ref_emb, ref_labels"):
        loss(x, labels, ref_emb=x, ref_labels=labels)
    assert issubclass(LossCallError, NirdmlError) and issubclass(LossCallError, ValueError)
    assert loss(x, labels).ndim == 0
