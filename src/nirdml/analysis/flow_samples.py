"""Flow samples of a NIR model: what the conditional flow generates around a class proxy,
next to that class's real embeddings.

NIR trains the flow so that every embedding is ``tau(z | proxy of its class)`` with
``z ~ N(0, I)``. Sampling ``z`` and mapping it through the flow shows the class shape the
regulariser has learnt. Proxies exist for the *training* classes only (the test classes
are unseen), so the real embeddings shown are those of training images, embedded with the
test transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from nirdml.errors import InputError
from nirdml.losses.base import ProxyCriterion
from nirdml.losses.nir import NIRLoss


@dataclass
class FlowSamples:
    """Per chosen class: real embeddings, flow samples (as drawn, not re-normalised), the
    L2-normalised proxy (the condition) and summary numbers (see :func:`flow_stats`)."""

    classes: list[int]
    names: list[str]
    real: list[np.ndarray]
    samples: list[np.ndarray]
    proxies: np.ndarray
    stats: list[dict[str, float]] = field(default_factory=list)
    temperature: float = 1.0


def is_nir(loss: ProxyCriterion) -> TypeGuard[NIRLoss]:
    """Whether a criterion is NIR (a conditional flow on top of a proxy loss)."""
    return isinstance(loss, NIRLoss)


def choose_classes(labels: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` classes with >= 2 items, drawn with a local RNG (sorted)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    usable = classes[counts >= 2]
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(usable, size=min(n, len(usable)), replace=False))


def _unit(a: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.double(), dim=-1)


def flow_stats(
    real: torch.Tensor,
    samples: torch.Tensor,
    proxy: torch.Tensor,
    own: int,
    all_proxies: torch.Tensor,
    nll_real: torch.Tensor,
    z_real: torch.Tensor,
) -> dict[str, float]:
    """Numbers that say whether the samples look like the class.

    - ``spread_real`` / ``spread_samples``: mean cosine distance to the set's own mean
      direction (how wide each cloud is, after L2-normalisation);
    - ``norm_samples``: mean L2 norm of the raw samples (real embeddings have norm 1);
    - ``cos_real_proxy`` / ``cos_samples_proxy``: cosine of the set's mean direction to the
      proxy;
    - ``nearest_proxy_real`` / ``nearest_proxy_samples``: fraction whose most similar
      proxy (cosine, over all training classes) is this class's;
    - ``nll_real``: mean flow NLL of the real embeddings under their own condition;
    - ``z_norm_real``: mean ``||z||`` of the real embeddings mapped back to the flow's base
      space. Draws from ``N(0, I)`` have ``||z|| ~ sqrt(D)``; a much smaller value means the
      flow squeezed the class into a small part of its base distribution, so samples at
      temperature 1 land far outside the class.
    """
    ru, su, pu = _unit(real), _unit(samples), _unit(proxy)
    allp = _unit(all_proxies)

    def spread(u: torch.Tensor) -> float:
        m = F.normalize(u.mean(0), dim=0)
        return float((1.0 - u @ m).mean())

    def cos_mean(u: torch.Tensor) -> float:
        return float(F.normalize(u.mean(0), dim=0) @ pu)

    def nearest(u: torch.Tensor) -> float:
        return float(((u @ allp.T).argmax(1) == own).double().mean())

    return {
        "n_real": float(len(real)),
        "n_samples": float(len(samples)),
        "spread_real": spread(ru),
        "spread_samples": spread(su),
        "norm_samples": float(samples.double().norm(dim=1).mean()),
        "cos_real_proxy": cos_mean(ru),
        "cos_samples_proxy": cos_mean(su),
        "nearest_proxy_real": nearest(ru),
        "nearest_proxy_samples": nearest(su),
        "nll_real": float(nll_real.double().mean()),
        "z_norm_real": float(z_real.double().norm(dim=1).mean()),
    }


def _check_flow_request(loss: ProxyCriterion, temperature: float) -> None:
    """Refuse a bad temperature or a loss without a flow, before anything is embedded."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a finite number > 0, got {temperature}")
    if not is_nir(loss):
        raise InputError(
            "flow samples need a NIR model (its loss has a flow); this checkpoint was trained "
            "without NIR (loss.nir.enabled=false)"
        )


def _check_training_classes(classes: list[int], num_classes: int) -> None:
    """Refuse classes the model has no proxy (no condition) for."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise InputError(
            f"flow classes {bad} are not training classes of this model (0..{num_classes - 1})"
        )


def _real_members(
    labels: np.ndarray, c: int, max_real: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of class c's training images, a seeded sorted sample of ``max_real`` at most."""
    members = np.flatnonzero(labels == c)
    if len(members) == 0:
        raise InputError(f"class {c} has no training images to compare the samples with")
    if len(members) > max_real:
        members = np.sort(rng.choice(members, size=max_real, replace=False))
    return members


def _class_level_proxies(loss: NIRLoss) -> torch.Tensor:
    """One L2-normalised proxy per class; SoftTriple holds K centers per class: their mean."""
    all_proxies = F.normalize(loss.proxies.detach(), dim=-1)
    if all_proxies.shape[0] == loss.num_classes:
        return all_proxies
    per_class = all_proxies.view(loss.num_classes, -1, all_proxies.shape[1])
    return F.normalize(per_class.mean(1), dim=-1)


def _sample_condition(
    base: ProxyCriterion, cond_real: torch.Tensor, c: int, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample conditions, proxy): class c's proxy, else its real conditions cycled and mean."""
    if base.condition_per_class:
        proxy = base.proxy_condition(torch.tensor([c], device=cond_real.device))[0]
        return proxy.expand(num_samples, -1), proxy
    reps = math.ceil(num_samples / len(cond_real))
    return cond_real.repeat(reps, 1)[:num_samples], F.normalize(cond_real.mean(0), dim=0)


@torch.no_grad()
def _draw_around_class(
    loss: NIRLoss,
    real: torch.Tensor,
    c: int,
    num_samples: int,
    temperature: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c's flow samples from ``z ~ N(0, t^2 I)``, its proxy, and real NLL and z."""
    base, flow = loss.base_loss, loss.flow
    y = torch.full((len(real),), c, dtype=torch.long, device=real.device)
    cond_real = base.class_condition(real, y)
    z_real, logdet = flow(real, cond_real)
    nll_real = 0.5 * (z_real**2).sum(1) - logdet
    cond, proxy = _sample_condition(base, cond_real, c, num_samples)
    z = torch.randn(num_samples, flow.dim, generator=gen, device=real.device, dtype=real.dtype)
    samples, _ = flow.inverse(z * temperature, cond)
    return samples, proxy, nll_real, z_real


def draw_flow_samples(
    model: torch.nn.Module,
    loss: ProxyCriterion,
    train_data: Any,
    *,
    classes: list[int] | None = None,
    num_classes: int = 6,
    num_samples: int = 60,
    max_real: int = 60,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
) -> FlowSamples:
    """Embed up to ``max_real`` training images of each chosen class and draw
    ``num_samples`` flow samples around the class's condition.

    The condition is the one NIR trained with: the L2-normalised class proxy; for losses
    whose condition depends on the embedding (SoftTriple's similarity-weighted center), the
    conditions of the class's real embeddings, cycled. ``temperature`` scales the base
    draws, ``z ~ N(0, temperature^2 I)`` (1 = the model's own distribution; Glow-style
    visualisations often use 0.7). Seeded by ``seed`` (local generators only).
    """
    from nirdml.evaluation import compute_embeddings

    _check_flow_request(loss, temperature)
    labels = np.asarray(train_data.labels)
    if classes is None:
        classes = choose_classes(labels, num_classes, seed)
    _check_training_classes(classes, loss.num_classes)
    device = next(loss.flow.parameters()).device
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    names = list(getattr(train_data, "class_names", []))
    out = FlowSamples(
        classes=list(classes), names=[], real=[], samples=[], proxies=None, temperature=temperature
    )
    own_proxies = _class_level_proxies(loss)
    proxies = []
    for c in classes:
        members = _real_members(labels, c, max_real, rng)
        real, _ = compute_embeddings(
            model,
            Subset(train_data, members.tolist()),
            batch_size=batch_size,
            num_workers=num_workers,
        )
        real = real.to(device)
        samples, proxy, nll_real, z_real = _draw_around_class(
            loss, real, c, num_samples, temperature, gen
        )
        out.stats.append(flow_stats(real, samples, proxy, c, own_proxies, nll_real, z_real))
        out.real.append(real.cpu().numpy())
        out.samples.append(samples.cpu().numpy())
        proxies.append(proxy.cpu().numpy())
        out.names.append(names[c] if c < len(names) else str(c))
    out.proxies = np.stack(proxies)
    return out
