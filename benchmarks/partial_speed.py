"""Speed and size of frozen heads, partial fine-tuning (each cut) and full fine-tuning.

    OMP_NUM_THREADS=1 python benchmarks/partial_speed.py --data-root DIR --features DIR \\
        [--size 224] [--cuts pooled head stage7 stage6 full] [--out benchmarks/results/...]

Each mode runs in its own process (so its peak memory is its own): the cars98 partial
preset with ``model.cut`` set to the mode (``pooled``: no cut, a head on pooled features;
``full``: ``model.frozen=false``, the whole network end to end on augmented images), its
real training DataLoader (``data.num_workers=0``: decoding and augmentation in the timed
loop for ``full``; memory-mapped cache reads for the others) and real optimizer steps at
batch 90 (ProxyAnchor). Cached modes time a whole epoch; ``full`` times ``--full-steps``
steps after one warm-up step and scales to an epoch. The caches (``--features``, folder
names as benchmarks/cars98_partial.py) are built first if missing; their extraction speed
comes from their meta.json. Writes a Markdown table and the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PRESET = "cars98-partial-proxyanchor-baseline"
MODES = ("pooled", "head", "stage7", "stage6", "full")


def cache_folder(features: Path, size: int, mode: str) -> Path:
    return features / f"cars98-lite0-{size}px-{mode}"


def _config(args: argparse.Namespace, mode: str):
    from nirdml.training.config import load_config

    sets = [f"data.root={args.data_root}", f"data.image_size={args.size}", "log.progress=false"]
    if mode == "full":
        sets += ["model.frozen=false", "model.cut=null", "optim.warmup_epochs=0"]
    else:
        cut = "null" if mode == "pooled" else mode
        folder = cache_folder(Path(args.features), args.size, mode)
        sets += [f"model.cut={cut}", f"data.features={folder}"]
    return load_config(PRESET, sets)


def measure(args: argparse.Namespace, mode: str) -> dict:
    """One mode, in this process: seconds per epoch, images/s, cache size, peak memory."""
    import torch

    from nirdml.training.build import (
        Criterion,
        load_run_data,
        place_model,
        run_loss,
        train_batches,
    )
    from nirdml.training.distributed import DistContext
    from nirdml.training.optim import build_optimizer, param_groups

    torch.set_num_threads(args.threads)
    cfg = _config(args, mode)
    data = load_run_data(cfg, progress=False, echo=False)
    device = torch.device("cpu")
    model = place_model(data.model, cfg, DistContext(), device)
    loss = run_loss(cfg, data.splits.train.num_classes)
    loader, _ = train_batches(
        data.splits.train, cfg.data, seed=0, dist=DistContext(), device=device
    )
    criterion = Criterion(model, loss)
    optimizer = build_optimizer(param_groups(model, loss, cfg.optim), cfg.optim)
    criterion.train()
    steps = len(loader) if mode != "full" else args.full_steps + 1
    times, cpu = [], []
    batches = iter(loader)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        images, labels = next(batches)  # loading is part of the step
        value = criterion(images, labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - start)
        cpu.append(now_cpu - start_cpu)
        start, start_cpu = now, now_cpu
    if mode == "full":
        times, cpu = times[1:], cpu[1:]  # the warm-up step
    per_step = sum(times) / len(times)
    per_step_cpu = sum(cpu) / len(cpu)
    out = {
        "mode": mode,
        "size": args.size,
        "trained_params": sum(p.numel() for p in criterion.parameters() if p.requires_grad),
        "steps_timed": len(times),
        "steps_per_epoch": len(loader),
        "seconds_per_step": per_step,
        "seconds_per_epoch": per_step * len(loader),
        "cpu_seconds_per_epoch": per_step_cpu * len(loader),
        "images_per_s": cfg.data.batch_size / per_step,
        "images_per_cpu_s": cfg.data.batch_size / per_step_cpu,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if mode != "full":
        cache = data.splits.cache
        stats = cache.meta.get("stats", {})
        out.update(
            cache_mib=sum(f.stat().st_size for f in cache.path.glob("*.npy")) / 2**20,
            item_shape=list(cache.meta.get("item_shape", [cache.num_features])),
            extraction_images_per_s=stats.get("images_per_s_this_session"),
            extraction_threads=stats.get("threads"),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--features", required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/partial_speed.md")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process of one mode
        print(json.dumps(measure(args, args.one)))
        return 0
    from machine import cpu_name

    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--data-root", args.data_root,
               "--features", args.features, "--size", str(args.size),
               "--threads", str(args.threads), "--full-steps", str(args.full_steps)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    full = next((r for r in rows if r["mode"] == "full"), None)
    lines = [
        "# Frozen head, partial and full fine-tuning of EfficientNet-Lite0: speed and size",
        "",
        f"Machine: {cpu_name()}, {args.threads} thread(s); torch "
        f"{__import__('torch').__version__}. Command: `OMP_NUM_THREADS={args.threads} python "
        f"benchmarks/partial_speed.py --data-root {args.data_root} --features {args.features} "
        f"--size {args.size}`. cars98 training split (1,995 images of 49 classes: 9 held out for "
        f"validation, so {rows[0]['steps_per_epoch']} batches of 90 per epoch), {args.size} px, "
        "ProxyAnchor, Adam; loading included (JPEG decoding + augmentation for full "
        "fine-tuning, memory-mapped cache reads otherwise). CPU seconds (this process's "
        "user + system time) are the per-core figure when other jobs share the machine; wall "
        "seconds are what a user waits on an idle core.",
        "",
        "| mode | trained parameters | cached item | cache on disk | s / epoch (wall) "
        "| CPU s / epoch | images per CPU-s | vs full (CPU) | peak memory |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        item = "x".join(map(str, r.get("item_shape", []))) or "images"
        cache = f"{r['cache_mib']:.0f} MiB" if "cache_mib" in r else "-"
        speedup = (
            f"{full['cpu_seconds_per_epoch'] / r['cpu_seconds_per_epoch']:.0f}x" if full else ""
        )
        timed = "" if r["mode"] != "full" else f" ({r['steps_timed']} steps timed)"
        lines.append(
            f"| {r['mode']} | {r['trained_params']:,} | {item} | {cache} | "
            f"{r['seconds_per_epoch']:.1f}{timed} | {r['cpu_seconds_per_epoch']:.1f} | "
            f"{r['images_per_cpu_s']:.0f} | {speedup} | {r['peak_rss_mib']:.0f} MiB |"
        )
    lines += [
        "",
        "Cache extraction (one pass of the frozen stages over the test images, every training "
        "image and its augmented views; from each cache's meta.json):",
        "",
    ]
    for r in rows:
        if r.get("extraction_images_per_s"):
            lines.append(
                f"- {r['mode']}: {r['extraction_images_per_s']:.1f} images/s "
                f"({r['extraction_threads']} thread(s))"
            )
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
