"""Training throughput (images/s): the plain single-process path vs the DDP path.

The DDP path is what ``torchrun ... -m nirdml train`` runs: model + loss in ONE
DistributedDataParallel module (nirdml.training.distributed.DistContext.wrap), embeddings
all-gathered with gradients before the loss, synchronised BatchNorm where it trains, the
trainer's fused Adam and GuardedStep. On one device the process group has a single rank,
so "ddp" minus "plain" is the cost of the DDP machinery itself (bucketed all-reduce,
gather, hooks). "ddp_find_unused" is the same with ``find_unused_parameters=True`` (what
DDP needs for warmup epochs without nirdml's re-wrap), for comparison.

One step = forward of the global batch (90 = 45 classes x 2 by default), NIR + ProxyAnchor
loss, backward, optimizer step; synthetic images (nothing to download); the variants hold
identical weights and are timed interleaved in rounds, medians reported.

    python benchmarks/ddp_throughput.py --device cuda                  # ResNet50, 224 px, bf16
    python benchmarks/ddp_throughput.py --device cpu --arch small_cnn --image-size 28 \\
        --in-channels 1 --amp none --steps 10 --rounds 3               # quick CPU check
    torchrun --nproc_per_node=8 benchmarks/ddp_throughput.py --device cuda   # DDP, 8 GPUs

Writes benchmarks/results/ddp_throughput_<device>.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch

from machine import cpu_name  # benchmarks/machine.py
from nirdml.flow import ConditionalFlow
from nirdml.losses import NIRLoss, ProxyAnchorLoss
from nirdml.models import build_model
from nirdml.models.batchnorm import convert_sync_batchnorm
from nirdml.training.build import Criterion
from nirdml.training.config import OptimConfig
from nirdml.training.distributed import DistContext
from nirdml.training.optim import build_optimizer, param_groups
from nirdml.training.step import GuardedStep


class _DDPOnEveryWorldSize(DistContext):
    """DistContext whose DDP path runs even on one rank (to time its overhead)."""

    @property
    def enabled(self) -> bool:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _context() -> DistContext:
    if "WORLD_SIZE" not in os.environ:  # a plain process: a group of one
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
        )
    env = DistContext.from_env()
    return _DDPOnEveryWorldSize(env.rank, env.world_size, env.local_rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--freeze-bn", choices=["true", "false"], default="true")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=90, help="GLOBAL batch")
    p.add_argument("--samples-per-class", type=int, default=2)
    p.add_argument("--amp", choices=["none", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="plain,ddp,ddp_find_unused")
    p.add_argument("--out", help="output prefix (default benchmarks/results/ddp_throughput_DEV)")
    args = p.parse_args()

    ctx = _context()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    ctx.init(device)
    world = ctx.world_size
    variants = args.variants.split(",")
    if world > 1:
        variants = [v for v in variants if v != "plain"]  # one process per GPU: DDP only
    ctx.check_batch(args.batch_size)
    per_rank = ctx.slice_sizes(args.batch_size)[ctx.rank]
    amp = torch.bfloat16 if args.amp == "bf16" and device.type == "cuda" else None

    model = build_model(
        args.arch,
        args.embed_dim,
        pretrained=False,
        freeze_bn=args.freeze_bn == "true",
        in_channels=args.in_channels,
        seed=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        loss = NIRLoss(
            ProxyAnchorLoss(args.num_classes, args.embed_dim, positive_mean="samples"),
            proxy_weight=0.01,
            flow=ConditionalFlow(args.embed_dim),
        )
    optim_cfg = OptimConfig(lr=1e-5, proxy_lr_mult=4000, flow_lr_mult=50)

    def build(variant: str):
        m, lo = copy.deepcopy(model), copy.deepcopy(loss)
        if variant != "plain":
            m, _ = convert_sync_batchnorm(m, device)
        m, lo = m.to(device), lo.to(device)
        crit = Criterion(m, lo, ctx.gather_fn(args.batch_size) if variant != "plain" else None)
        if variant == "ddp":
            crit = ctx.wrap(crit, device)
        elif variant == "ddp_find_unused":
            from torch.nn.parallel import DistributedDataParallel as DDP

            crit = DDP(
                crit,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        opt = build_optimizer(param_groups(m, lo, optim_cfg), optim_cfg)
        return crit, GuardedStep(opt, device, fp16=False)

    g = torch.Generator().manual_seed(ctx.rank)
    shape = (per_rank, args.in_channels, args.image_size, args.image_size)
    images = torch.randn(shape, generator=g).to(device)
    groups = -(-per_rank // args.samples_per_class)
    classes = torch.randint(0, args.num_classes, (groups,), generator=g)
    classes = classes.repeat_interleave(args.samples_per_class)[:per_rank]
    runs = {v: build(v) for v in variants}

    def run(variant: str, steps: int) -> float:
        crit, step = runs[variant]
        crit.train()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = crit(images, classes, True)
            step(out)
        _sync(device)
        return time.perf_counter() - start

    for v in variants:
        run(v, args.warmup)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v].append(run(v, args.steps))
    rate = {v: args.batch_size * args.steps / statistics.median(t) for v, t in times.items()}

    if not ctx.is_main:
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    result = {
        "device": str(device),
        "device_name": name,
        "cpu_cores": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "host": platform.node(),
        "world_size": world,
        "torch": torch.__version__,
        "config": vars(args),
        "images_per_s": rate,
        "step_ms": {v: 1000 * statistics.median(t) / args.steps for v, t in times.items()},
    }
    tag = f"{device.type}{'' if world == 1 else f'_x{world}'}"
    prefix = Path(args.out or Path(__file__).parent / "results" / f"ddp_throughput_{tag}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    from nirdml.runtime import atomic_write_json, atomic_write_text

    atomic_write_json(prefix.with_suffix(".json"), result)
    lines = [
        f"# DDP throughput: {result['device_name']} ({device.type}, world size {world})",
        "",
        f"{args.arch}, {args.image_size} px, global batch {args.batch_size}, amp {args.amp}, "
        f"frozen BN {args.freeze_bn}, NIR + ProxyAnchor (D={args.embed_dim}, "
        f"C={args.num_classes}); {args.rounds} rounds x {args.steps} steps, median; "
        f"torch {torch.__version__}, host {platform.node()} ({os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end)",
        "",
        "| variant | images/s | ms/step |",
        "|---|---|---|",
    ]
    for v in variants:
        lines.append(f"| {v} | {rate[v]:.1f} | {result['step_ms'][v]:.1f} |")
    atomic_write_text(prefix.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(rate))


if __name__ == "__main__":
    main()
