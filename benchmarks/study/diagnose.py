"""Where NIR's gradient goes: the two loss terms' gradients at the embeddings, per sample.

For a trained + NIR run (its last checkpoint) and fresh training batches (the run's own
sampler and augmentation, at an epoch it never trained on), split the gradient of the loss
with respect to the L2-normalised embeddings ``x`` into the NIR term and the proxy term:

* ``tangent ratio``: ||NIR grad|| / ||proxy grad||, both projected on the sphere's tangent
  space. Only the tangent part reaches the network (the normalisation's Jacobian removes
  the radial part), so this is the term balance the backbone actually sees;
* ``radial share``: the fraction of the NIR gradient's norm that is radial (along ``x``)
  and therefore discarded: likelihood the flow gains by modelling the sphere's thin shell,
  which no embedding can move along;
* ``top-5% share``: the fraction of a term's squared tangent gradient carried by the 5% of
  samples with the largest one (1 / 0.05 = uniform would be 0.05);
* ``cosine``: agreement of the two terms' tangent gradients over the batch.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nirdml.runtime import atomic_write_text


def _tangent(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radial = (g * x).sum(-1, keepdim=True) * x
    return g - radial, radial


def term_gradients(
    nir: Any, x: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``NIRLoss``'s two terms w.r.t. the embeddings ``x`` (their sum is the
    gradient of ``nir(x, labels)``), and the per-sample NLL."""
    x = x.detach().requires_grad_(True)
    base = nir.base_loss
    proxy_loss = base(x, labels)
    nll = nir.flow.nll(x, base.class_condition(x, labels))
    if nir.objective == "exp_nll":
        nir_term = nir.capped_exp(nll.double()).mean().to(x.dtype)
        proxy_term = nir.proxy_weight * proxy_loss
    else:
        nir_term = nir.nir_weight * nll.mean()
        proxy_term = proxy_loss
    (g_nir,) = torch.autograd.grad(nir_term, x, retain_graph=True)
    (g_proxy,) = torch.autograd.grad(proxy_term, x)
    return g_nir, g_proxy, nll.detach()


def _top_share(per_sample: torch.Tensor, frac: float = 0.05) -> float:
    k = max(1, int(round(frac * per_sample.numel())))
    return float(per_sample.topk(k).values.sum() / per_sample.sum().clamp_min(1e-30))


def gradient_diagnostics(run_folder: Path, data_root: str, *, batches: int = 8) -> dict[str, Any]:
    """Mean over ``batches`` training batches of the quantities in the module docstring."""
    from nirdml.data import ClassBalancedBatchSampler
    from nirdml.training.artifacts import load_trained
    from nirdml.training.build import load_splits
    from nirdml.training.loader import train_loader

    run = load_trained(run_folder / "checkpoints" / "last.pt")
    cfg = run.config
    if not cfg.loss.nir.enabled:
        raise ValueError(f"{run_folder} is a baseline run: gradient diagnostics need + NIR")
    cfg.data.root = data_root or None
    train = load_splits(cfg).train
    d = cfg.data
    sampler = ClassBalancedBatchSampler(
        train.labels,
        d.batch_size,
        d.samples_per_class,
        replacement=d.sampler == "authors",
        seed=cfg.seed,
    )
    loader, seeded = train_loader(train, sampler, seed=cfg.seed, num_workers=0)
    seeded.set_epoch(10_000)  # batches the run never trained on
    nir = run.loss
    model = run.model.train()  # BatchNorm with batch statistics, as in training
    rows = []
    for images, labels in itertools.islice(loader, batches):
        with torch.no_grad():
            feats = model.features(images)
            x0 = model.embed(feats)
        x = x0.detach()
        g_nir, g_proxy, nll = term_gradients(nir, x, labels)
        t_nir, r_nir = _tangent(g_nir, x.detach())
        t_proxy, _ = _tangent(g_proxy, x.detach())
        rows.append(
            {
                "tangent_ratio": float(t_nir.norm() / t_proxy.norm().clamp_min(1e-30)),
                "radial_share": float(r_nir.norm() / g_nir.norm().clamp_min(1e-30)),
                "top5_share_nir": _top_share(t_nir.pow(2).sum(-1)),
                "top5_share_proxy": _top_share(t_proxy.pow(2).sum(-1)),
                "cosine": float(F.cosine_similarity(t_nir.flatten(), t_proxy.flatten(), dim=0)),
                "nll_mean": float(nll.mean()),
                "nll_max": float(nll.max()),
            }
        )
    keys = rows[0].keys()
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    # Ratios spread over orders of magnitude: also report their geometric mean.
    out["tangent_ratio_geomean"] = float(
        np.exp(np.mean([np.log(r["tangent_ratio"]) for r in rows]))
    )
    out.update(
        run=run_folder.name,
        objective=nir.objective,
        weight=nir.proxy_weight if nir.objective == "exp_nll" else nir.nir_weight,
        batches=len(rows),
    )
    return out


def adam_state(run_folder: Path) -> dict[str, Any]:
    """Adam's state at the end of a run, per parameter group: the median of sqrt(v) (the
    second-moment estimate, which remembers ~1/(1 - beta2) = 1,000 steps of gradient
    magnitudes) and of |m| / (sqrt(v) + eps), the size of the last update relative to lr
    (about 1 when the recent gradients are as large as the remembered ones)."""
    state = torch.load(run_folder / "checkpoints" / "last.pt", weights_only=True)
    opt = state["optimizer"]
    groups: dict[str, Any] = {}
    for group in opt["param_groups"]:
        ids = [i for i in group["params"] if i in opt["state"]]
        if not ids:
            continue
        eps = float(group.get("eps", 1e-8))
        v = torch.cat([opt["state"][i]["exp_avg_sq"].float().flatten() for i in ids]).sqrt()
        m = torch.cat([opt["state"][i]["exp_avg"].float().flatten() for i in ids]).abs()
        groups[group.get("name", "?")] = {
            "sqrt_v_median": float(v.median()),
            "update_over_lr_median": float((m / (v + eps)).median()),
        }
    return {"run": run_folder.name, "groups": groups}


def write_adam_states(states: list[dict[str, Any]], out_dir: Path) -> Path:
    """``omniglot_adam.md``: the Adam-state table (the report includes it)."""
    atomic_write_text(out_dir / "omniglot_adam.json", json.dumps(states, indent=2) + "\n")
    names = ["backbone", "head", "proxies", "flow"]
    lines = [
        "| run | " + " | ".join(f"{n}: sqrt(v) / update÷lr" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for st in states:
        cells = []
        for n in names:
            g = st["groups"].get(n)
            cells.append(
                f"{g['sqrt_v_median']:.2e} / {g['update_over_lr_median']:.3f}" if g else "-"
            )
        lines.append(f"| {st['run']} | " + " | ".join(cells) + " |")
    path = out_dir / "omniglot_adam.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_diagnostics(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """``omniglot_diagnostics.json`` and the markdown table the report includes."""
    atomic_write_text(out_dir / "omniglot_diagnostics.json", json.dumps(results, indent=2) + "\n")
    lines = [
        "| run | objective | weight | tangent ratio NIR/proxy (geo-mean) | NIR grad radial "
        "share | top-5% share NIR | top-5% share proxy | cosine NIR vs proxy | NLL mean / max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["objective"], r["weight"])):
        lines.append(
            f"| {r['run']} | {r['objective']} | {r['weight']:.4g} | "
            f"{r['tangent_ratio_geomean']:.3g} | {r['radial_share']:.3f} | "
            f"{r['top5_share_nir']:.3f} | {r['top5_share_proxy']:.3f} | {r['cosine']:+.3f} | "
            f"{r['nll_mean']:.1f} / {r['nll_max']:.1f} |"
        )
    path = out_dir / "omniglot_diagnostics.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
