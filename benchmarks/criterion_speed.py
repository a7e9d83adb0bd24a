"""Speed of one NIR criterion step: the authors' FrEIA-based criterion vs nirdml's NIRLoss.

A step is what a training loop pays for the criterion: zero_grad, forward on a batch of
(unit-norm, requires_grad) embeddings, backward, and an Adam step over proxies + flow, with
the authors' groups (proxies lr x4000, flow lr x50). Both criteria hold the same weights
(the authors' state_dict is loaded into ours) and the script checks they give the same loss.
Variants are timed interleaved in one process; medians (and minima) over the repeats.

    python benchmarks/criterion_speed.py                 # CPU, B=90, D=128/512, C=100/11318
    python benchmarks/criterion_speed.py --device cuda   # on a GPU

Writes benchmarks/results/criterion_speed.md (or --out).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from machine import cpu_name  # benchmarks/machine.py
from nirdml.losses import NIRLoss, ProxyAnchorLoss

LR = 1e-5


# ---------------------------------------------------------------- the authors' criterion
def _authors_subnet(d_in: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, 128)]
    for _ in range(6):
        layers += [nn.ReLU(), nn.Linear(128, 128)]
    layers += [nn.ReLU(), nn.Linear(128, d_out)]
    return nn.Sequential(*layers)


def _authors_flow(dim: int) -> Ff.GraphINN:
    conds = [Ff.ConditionNode(dim, name=f"condition_{k}") for k in range(5)]
    nodes: list = [Ff.InputNode(dim, name="Input")]
    for k in range(5):
        nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": k}, name=f"permute_{k}"))
        nodes.append(
            Ff.Node(
                nodes[-1],
                Fm.GLOWCouplingBlock,
                {"clamp": 2.0, "subnet_constructor": _authors_subnet},
                name=f"fc_{k}",
                conditions=conds[k],
            )
        )
    nodes.append(Ff.OutputNode(nodes[-1], name="output"))
    return Ff.GraphINN(nodes + conds)


def _masked_logsumexp(sims: Tensor, mask: Tensor) -> Tensor:
    sims = sims.masked_fill(~mask, torch.finfo(sims.dtype).min)
    sims = torch.cat([sims, sims.new_zeros(1, sims.shape[1])], dim=0)
    out = torch.logsumexp(sims, dim=0, keepdim=True)
    return out.masked_fill(~torch.any(mask, dim=0, keepdim=True), 0)


class AuthorsNIR(nn.Module):
    """criteria/nir.py of ExplainableML/NonIsotropicProxyDML (cond_mode='dense')."""

    def __init__(self, num_classes: int, dim: int, w_align: float = 0.01) -> None:
        super().__init__()
        self.w_align = w_align
        self.proxies = nn.Parameter(torch.randn(num_classes, dim) / 8)
        self.normflow = nn.Module()
        self.normflow.normflow = _authors_flow(dim)

    def panc(self, batch: Tensor, labels: Tensor) -> Tensor:
        proxies = F.normalize(self.proxies, dim=-1)
        batch = F.normalize(batch, dim=-1)
        lab = labels.unsqueeze(1)
        same = (lab.T == lab.view(-1, 1)).T
        diff = (torch.arange(len(proxies), device=batch.device).unsqueeze(1) != lab.T).T
        pos = _masked_logsumexp(-32.0 * (batch.mm(proxies[labels].T) - 0.1), same)
        neg = _masked_logsumexp(32.0 * (batch.mm(proxies.T) + 0.1), diff)
        return pos.mean() + neg.mean()

    def forward(self, batch: Tensor, labels: Tensor) -> Tensor:
        proxy_loss = self.panc(batch, labels)
        cond = F.normalize(self.proxies, dim=-1)[labels]
        z, log_jac = self.normflow.normflow(batch, c=[cond] * 5, rev=False, jac=True)
        mul = torch.ones(len(batch), dtype=torch.float64, device=batch.device)
        nll = mul * (0.5 * torch.sum(z**2, dim=(1,)) - log_jac)
        return torch.mean(torch.exp(nll)) + self.w_align * proxy_loss

    def param_groups(self) -> list[dict]:
        return [
            {"params": [self.proxies], "lr": LR * 4000},
            {"params": list(self.normflow.parameters()), "lr": LR * 50},
        ]


# ---------------------------------------------------------------- timing
def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = cpu_name()
    return f"{model}, {os.cpu_count()} logical CPUs"


def _step_fn(loss: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        loss(x, y).backward()
        opt.step()

    return step


def _time(fns: dict[str, Callable], repeats: int, warmup: int, sync: Callable) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: background load hits all variants alike
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _parity(authors: AuthorsNIR, ours: NIRLoss, x: Tensor, y: Tensor) -> dict[str, float]:
    """Max relative differences (to the largest reference entry) of loss and gradients."""
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref, val = authors(xa, y), ours(xb, y)
    ref.backward()
    val.backward()
    grads = {k: p.grad for k, p in authors.normflow.normflow.named_parameters()}
    grads.update({k: v for k, v in authors.normflow.normflow.state_dict().items() if "perm" in k})
    mapped = copy.deepcopy(ours.flow)
    mapped.load_freia_state_dict(grads)  # FrEIA's gradients, laid out as our weights
    flow_rel = max(
        _rel(p.grad, q) for p, q in zip(ours.flow.parameters(), mapped.parameters(), strict=True)
    )
    with torch.no_grad():
        cond = F.normalize(authors.proxies, dim=-1)[y]
        z_ref, ld_ref = authors.normflow.normflow(x, c=[cond] * 5)
        z, ld = ours.flow(x, cond)
    out = {
        "flow z (abs)": float((z - z_ref).abs().max()),
        "flow logdet (abs)": float((ld - ld_ref).abs().max()),
        "loss": abs(val.item() - ref.item()) / abs(ref.item()),
        "grad embeddings": _rel(xb.grad, xa.grad),
        "grad proxies": _rel(ours.base_loss.proxies.grad, authors.proxies.grad),
        "grad flow (worst tensor)": flow_rel,
    }
    authors.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return out


def build(
    dim: int, num_classes: int, device: torch.device
) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
    """Step functions of every variant (same weights, same batch) and their parity figures."""
    torch.manual_seed(0)
    authors = AuthorsNIR(num_classes, dim).to(device)
    ours = NIRLoss(ProxyAnchorLoss(num_classes, dim, positive_mean="samples"), proxy_weight=0.01)
    ours.load_authors_state_dict(authors.state_dict())
    ours.to(device)
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(90, dim, generator=g), dim=-1).to(device).requires_grad_()
    y = torch.randint(0, num_classes, (45,), generator=g).repeat_interleave(2).to(device)
    parity = _parity(authors, ours, x, y)
    assert parity["loss"] < 1e-5, f"losses differ: {parity}"

    def adam(groups: list[dict], **kw) -> torch.optim.Adam:
        return torch.optim.Adam(groups, **kw)

    variants = {
        "authors (FrEIA), Adam": (authors, adam(authors.param_groups())),
        "authors (FrEIA), Adam fused": (authors, adam(authors.param_groups(), fused=True)),
        "nirdml NIRLoss, Adam": (ours, adam(ours.param_groups(LR, 4000, 50))),
        "nirdml NIRLoss, Adam fused": (ours, adam(ours.param_groups(LR, 4000, 50), fused=True)),
    }
    proxy_only = ProxyAnchorLoss(num_classes, dim).to(device)
    variants["ProxyAnchor alone, Adam fused"] = (
        proxy_only,
        adam(proxy_only.param_groups(LR, 4000), fused=True),
    )
    return {name: _step_fn(loss, opt, x, y) for name, (loss, opt) in variants.items()}, parity


def bench(
    dim: int, num_classes: int, device: torch.device, repeats: int, warmup: int
) -> tuple[list, dict[str, float]]:
    fns, parity = build(dim, num_classes, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = _time(fns, repeats, warmup, sync)
    base = statistics.median(times["authors (FrEIA), Adam"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append((dim, num_classes, name, med, min(ts), med / base))
    return rows, parity


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 11318])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "criterion_speed.md"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load0 = os.getloadavg()
    rows, parities = [], []
    for dim in args.dims:
        for num_classes in args.classes:
            new_rows, parity = bench(dim, num_classes, device, args.repeats, args.warmup)
            rows += new_rows
            parities.append((dim, num_classes, parity))
            print(
                *(f"{r[0]} {r[1]} {r[2]}: {r[3]:.2f} ms ({r[5]:.2f}x)" for r in rows[-5:]),
                sep="\n",
                flush=True,
            )
    load1 = os.getloadavg()
    lines = [
        "# NIR criterion step: authors' FrEIA criterion vs nirdml NIRLoss",
        "",
        f"- machine: {_machine(device)}; device {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        f"- load average before / after: {load0[0]:.2f} / {load1[0]:.2f} (a shared machine "
        "inflates absolute times; variants are interleaved, so ratios stay comparable)",
        f"- step = zero_grad + forward + backward + Adam step (proxies x4000, flow x50); "
        f"batch 90 (45 classes x 2), unit-norm embeddings with grad; median (min) of "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up steps",
        "- ratio: median / median of the authors' criterion with plain Adam (their setup)",
        "- both criteria hold the same weights and give the same loss (checked to 1e-5)",
        "",
        "| D | C | variant | median ms | min ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {d} | {c} | {n} | {m:.2f} | {lo:.2f} | {r:.2f} |" for d, c, n, m, lo, r in rows]
    lines += [
        "",
        "Same weights, same batch, fp32: max |ours - authors| (flow z, logdet) and "
        "max |ours - authors| / max |authors| (loss, gradients)",
        "",
        "| D | C | " + " | ".join(parities[0][2]) + " |",
        "|---|---|" + "---|" * len(parities[0][2]),
    ]
    lines += [
        f"| {d} | {c} | " + " | ".join(f"{v:.1e}" for v in p.values()) + " |"
        for d, c, p in parities
    ]
    lines.append("")
    _write_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
