"""ConditionalFlow: exactness against the authors' FrEIA 0.2 flow, invertibility, modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nirdml.flow import ConditionalFlow
from test_flow_reference import AuthorsCondPrep, build_freia_flow, float64_copy


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _freia_grads_as_flow(flow: ConditionalFlow, freia: torch.nn.Module) -> ConditionalFlow:
    """A ConditionalFlow whose *weights* are FrEIA's *gradients* (same layout mapping)."""
    sd = {k: p.grad for k, p in freia.named_parameters() if p.requires_grad}
    sd.update({k: v for k, v in freia.state_dict().items() if k.endswith("perm")})
    mapped = ConditionalFlow(
        flow.dim,
        flow.num_blocks,
        flow.hidden_width,
        flow.hidden_layers,
        flow.clamp,
        flow.condition,
        flow.condition_blocks,
    )
    mapped.load_freia_state_dict(sd)
    return mapped


@pytest.mark.parametrize(("dim", "count"), [(128, 1_402_880), (512, 2_635_520)])
def test_parameter_count_matches_method_md(dim: int, count: int) -> None:
    flow = ConditionalFlow(dim)
    assert sum(p.numel() for p in flow.parameters()) == count
    assert len(list(flow.parameters())) == 10  # stacked: one optimizer tensor per role


def test_permutations_are_freia_seeds_without_global_rng() -> None:
    state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    flow = ConditionalFlow(64, generator=torch.Generator().manual_seed(0))
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state(), strict=True))
    assert torch.equal(torch_state, torch.random.get_rng_state())
    for k in range(5):
        expected = torch.from_numpy(np.random.RandomState(k).permutation(64))
        assert torch.equal(flow.permutations[k], expected)
        assert torch.equal(flow.inverse_permutations[k][expected], torch.arange(64))
    buffers = dict(flow.named_buffers())
    assert set(buffers) == {"permutations", "inverse_permutations"}
    assert not any("perm" in n for n, _ in flow.named_parameters())


@pytest.mark.parametrize("dim", [128, 512])
def test_freia_parity_values_and_gradients(dim: int) -> None:
    """Authors' GraphINN -> state_dict -> ConditionalFlow (float32) against FrEIA in float64
    on the same weights: z, logdet to 1e-5, all gradients to 1e-5 relative (ours measures
    < 1e-6; FrEIA's own float32 is not the oracle, see float64_copy)."""
    torch.manual_seed(100 + dim)
    freia = build_freia_flow(dim)
    freia64 = float64_copy(freia)
    flow = ConditionalFlow(dim, generator=torch.Generator().manual_seed(1))
    flow.load_freia_state_dict(freia.state_dict())
    x = _unit(64, dim, seed=1).requires_grad_()
    c = _unit(64, dim, seed=2).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    z_ref, ld_ref = freia64(x64, c=[c64] * 5, rev=False, jac=True)
    z, ld = flow(x, c)
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld.double(), ld_ref, rtol=1e-5, atol=1e-5)

    # A loss that weighs z and logdet differently, so both backward paths are exercised.
    wz = torch.randn(64, dim, generator=torch.Generator().manual_seed(3))
    wl = torch.linspace(-1.0, 2.0, 64)
    ((z_ref * wz.double()).sum() + (ld_ref * wl.double()).sum()).backward()
    ((z * wz).sum() + (ld * wl).sum()).backward()
    assert _rel(x.grad.double(), x64.grad) < 1e-5
    assert _rel(c.grad.double(), c64.grad) < 1e-5
    ref = _freia_grads_as_flow(flow, freia64)  # float64 grads, stored in float32
    for (name, p), (_, q) in zip(flow.named_parameters(), ref.named_parameters(), strict=True):
        assert _rel(p.grad.double(), q.data) < 1e-5, name


def test_same_torch_seed_gives_the_authors_initial_flow() -> None:
    torch.manual_seed(7)
    freia = build_freia_flow(32)
    torch.manual_seed(7)
    flow = ConditionalFlow(32)
    x, c = _unit(16, 32, seed=4), _unit(16, 32, seed=5)
    z_ref, ld_ref = freia(x, c=[c] * 5)
    z, ld = flow(x, c)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-5)


def test_generator_init_is_reproducible_and_leaves_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = ConditionalFlow(24, generator=torch.Generator().manual_seed(5))
    b = ConditionalFlow(24, generator=torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.random.get_rng_state())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("authors_mode", "condition", "blocks"),
    [
        ("dense_embed", "embed", "all"),
        ("dense_embed_multi", "embed_per_block", "all"),
        ("start", "dense", "first"),
        ("mid", "dense", "middle"),
        ("end", "dense", "last"),
    ],
)
def test_condition_modes_match_the_authors(authors_mode: str, condition: str, blocks: str) -> None:
    dim = 16
    torch.manual_seed(11)
    freia = build_freia_flow(dim, authors_mode, width=32, depth=4)
    prep = AuthorsCondPrep(dim, 5, authors_mode)
    flow = ConditionalFlow(
        dim, hidden_width=32, hidden_layers=4, condition=condition, condition_blocks=blocks
    )
    sd = {f"normflow.normflow.{k}": v for k, v in freia.state_dict().items()}
    sd.update({f"normflow_cond_prep.{k}": v for k, v in prep.state_dict().items()})
    flow.load_freia_state_dict(sd)
    freia, prep = float64_copy(freia), float64_copy(prep)  # the oracle: same weights, float64
    x = _unit(12, dim, seed=6).requires_grad_()
    c = _unit(12, dim, seed=7).requires_grad_()
    x64, c64 = x.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    z_ref, ld_ref = freia(x64, c=prep(c64))
    z, ld = flow(x, c)
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld.double(), ld_ref, rtol=1e-5, atol=1e-5)
    (z_ref.square().sum() - ld_ref.sum()).backward()
    (z.square().sum() - ld.sum()).backward()
    assert _rel(x.grad.double(), x64.grad) < 1e-5 and _rel(c.grad.double(), c64.grad) < 1e-5
    if flow.embedder is not None:
        ours = dict(flow.embedder.named_parameters())
        for name, p in prep.embedder.named_parameters():
            assert _rel(ours[name].grad.double(), p.grad) < 1e-5, name


@pytest.mark.parametrize(
    ("dim", "condition", "blocks"),
    [(128, "dense", "all"), (7, "embed", "middle"), (9, "embed_per_block", "last")],
)
def test_inverse_undoes_forward_and_negates_logdet(dim: int, condition: str, blocks: str) -> None:
    flow = ConditionalFlow(
        dim,
        condition=condition,
        condition_blocks=blocks,
        generator=torch.Generator().manual_seed(2),
    )
    x, c = _unit(32, dim, seed=8), _unit(32, dim, seed=9)
    with torch.no_grad():
        z, ld = flow(x, c)
        x_back, ld_inv = flow.inverse(z, c)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-5, atol=1e-5)


def test_logdet_is_the_log_determinant_of_the_jacobian() -> None:
    """Independent of FrEIA: logdet == log|det dz/dx| from autograd (float64)."""
    flow = ConditionalFlow(
        6, hidden_width=16, hidden_layers=3, generator=torch.Generator().manual_seed(3)
    ).double()
    x, c = _unit(4, 6, seed=10).double(), _unit(4, 6, seed=11).double()
    _, ld = flow(x, c)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: flow(v[None], c[i])[0][0], x[i])
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hidden_layers", [2, 3])
def test_fused_backward_passes_gradcheck(hidden_layers: int) -> None:
    """The hand-written backward against finite differences (float64), inputs and weights."""
    flow = ConditionalFlow(
        6,
        num_blocks=2,
        hidden_width=6,
        hidden_layers=hidden_layers,
        generator=torch.Generator().manual_seed(4),
    ).double()
    x = _unit(3, 6, seed=12).double().requires_grad_()
    c = _unit(3, 6, seed=13).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: flow(a, b), (x, c))
    names = [n for n, _ in flow.named_parameters()]
    assert ("hidden_weight" in names) == (hidden_layers > 2)

    def as_function_of_weights(*ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = dict(zip(names, ws, strict=True))
        return torch.func.functional_call(flow, params, (x.detach(), c.detach()))

    assert torch.autograd.gradcheck(
        as_function_of_weights, tuple(flow.parameters()), fast_mode=True
    )
    # each output alone (the other one's gradient arrives as zeros)
    assert torch.autograd.gradcheck(lambda a: flow(a, c)[1], (x,))


def test_cond_index_equals_per_sample_conditions() -> None:
    flow = ConditionalFlow(16, generator=torch.Generator().manual_seed(9))
    rows = _unit(3, 16, seed=23).requires_grad_()
    index = torch.tensor([2, 0, 2, 1, 1, 2])
    x = _unit(6, 16, seed=24).requires_grad_()
    nll = flow.nll(x, rows, index)
    grads = torch.autograd.grad(nll.sum(), [x, rows, flow.cond_weight])
    ref = flow.nll(x, rows[index])
    ref_grads = torch.autograd.grad(ref.sum(), [x, rows, flow.cond_weight])
    torch.testing.assert_close(nll, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        assert _rel(a, b) < 1e-5
    with pytest.raises(ValueError, match="cond_index"):
        flow.nll(x, rows, index.int())


def test_double_backward_is_refused_clearly() -> None:
    flow = ConditionalFlow(8, hidden_width=8)
    x = _unit(4, 8, seed=14).requires_grad_()
    (g,) = torch.autograd.grad(flow.nll(x, _unit(4, 8, seed=15)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_sample_shapes_reproducibility_and_likelihood() -> None:
    flow = ConditionalFlow(16, generator=torch.Generator().manual_seed(5))
    c = _unit(3, 16, seed=16)
    with torch.no_grad():
        one = flow.sample(c[0], 5, generator=torch.Generator().manual_seed(0))
        again = flow.sample(c[0], 5, generator=torch.Generator().manual_seed(0))
        many = flow.sample(c, 4)
        z, _ = flow(one, c[0])
    assert one.shape == (5, 16) and many.shape == (3, 4, 16)
    assert torch.equal(one, again)
    expected_z = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, expected_z, rtol=1e-4, atol=1e-4)


def test_float64_and_low_precision_inputs() -> None:
    flow = ConditionalFlow(16, generator=torch.Generator().manual_seed(6))
    x, c = _unit(8, 16, seed=17), _unit(8, 16, seed=18)
    z32, _ = flow(x, c)
    zb, _ = flow(x.bfloat16(), c)  # upcast, computed in fp32
    assert zb.dtype == torch.float32
    torch.testing.assert_close(zb, flow(x.bfloat16().float(), c)[0])
    with pytest.raises(ValueError, match="float64"):
        flow(x.double(), c)
    z64, _ = flow.double()(x.double(), c.double())
    assert z64.dtype == torch.float64
    torch.testing.assert_close(z64.float(), z32, rtol=1e-5, atol=1e-5)


def test_runs_in_fp32_under_autocast() -> None:
    flow = ConditionalFlow(16, generator=torch.Generator().manual_seed(7))
    x, c = _unit(8, 16, seed=19), _unit(8, 16, seed=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, ld = flow(x.bfloat16(), c)
    assert z.dtype == ld.dtype == torch.float32 and flow.in_bias.dtype == torch.float32
    torch.testing.assert_close(z, flow(x.bfloat16().float(), c)[0])


def test_bad_input_and_config_errors_name_the_fix() -> None:
    flow = ConditionalFlow(16)
    with pytest.raises(ValueError, match=r"shape \(batch, 16\)"):
        flow(torch.zeros(4, 8), torch.zeros(4, 16))
    with pytest.raises(ValueError, match="one condition"):
        flow(torch.zeros(4, 16), torch.zeros(3, 16))
    with pytest.raises(ValueError, match="condition must be one of"):
        ConditionalFlow(16, condition="dense_embed")
    with pytest.raises(ValueError, match="condition_blocks"):
        ConditionalFlow(16, condition_blocks="start")
    with pytest.raises(ValueError, match="hidden_layers"):
        ConditionalFlow(16, hidden_layers=1)


def test_load_freia_state_dict_rejects_mismatches() -> None:
    freia = build_freia_flow(16, width=32, depth=4)
    sd = freia.state_dict()
    with pytest.raises(ValueError, match="dim"):
        ConditionalFlow(20, hidden_width=32, hidden_layers=4).load_freia_state_dict(sd)
    with pytest.raises(ValueError, match="num_blocks"):
        ConditionalFlow(16, num_blocks=4, hidden_width=32, hidden_layers=4).load_freia_state_dict(
            sd
        )
    with pytest.raises(ValueError, match="hidden_layers"):
        ConditionalFlow(16, hidden_width=32, hidden_layers=5).load_freia_state_dict(sd)
    with pytest.raises(ValueError, match="hidden_width"):
        ConditionalFlow(16, hidden_width=16, hidden_layers=4).load_freia_state_dict(sd)
    with pytest.raises(ValueError, match="condition_blocks"):
        ConditionalFlow(
            16, hidden_width=32, hidden_layers=4, condition_blocks="first"
        ).load_freia_state_dict(sd)
    with pytest.raises(ValueError, match="embedder"):
        ConditionalFlow(
            16, hidden_width=32, hidden_layers=4, condition="embed"
        ).load_freia_state_dict(sd)
    with pytest.raises(ValueError, match="GraphINN"):
        ConditionalFlow(16).load_freia_state_dict({"proxies": torch.zeros(3, 16)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    flow = ConditionalFlow(128, generator=torch.Generator().manual_seed(8))
    x = _unit(90, 128, seed=21).requires_grad_()
    c = _unit(90, 128, seed=22)
    z, ld = flow(x, c)
    (z.square().sum() - ld.sum()).backward()
    gx = x.grad.clone()
    flow_cuda = flow.cuda()
    xc = x.detach().cuda().requires_grad_()
    zc, ldc = flow_cuda(xc, c.cuda())
    (zc.square().sum() - ldc.sum()).backward()
    torch.testing.assert_close(zc.cpu(), z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ldc.cpu(), ld, rtol=1e-4, atol=1e-4)
    assert _rel(xc.grad.cpu(), gx) < 1e-3
    with torch.autocast("cuda", dtype=torch.float16):
        zh, _ = flow_cuda(xc.half(), c.cuda().half())
    assert zh.dtype == torch.float32
