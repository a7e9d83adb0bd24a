"""Frozen-feature benchmark on cars98: extraction speed, step times, cache size, results.

    OMP_NUM_THREADS=1 python benchmarks/frozen_features.py --cache /tmp/frozen_cars98_feats \\
        --runs /tmp/frozen_runs/baseline /tmp/frozen_runs/nir

Measures (one thread unless --threads): EfficientNet-Lite0 feature extraction images/s at
the preset's resolution (JPEG decode + test transform + forward, batch 16); a training step
(forward, backward, Adam) on cached features vs end to end through the backbone at batch 90
(ProxyAnchor, and + NIR); the cache's size; the retrieval metrics of the raw pooled
features (cosine) and of the given runs at their validation-selected epoch. Writes
benchmarks/results/frozen_features.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from nirdml import load_config  # noqa: E402
from nirdml.training.build import Criterion, build_loss, build_model_from_config  # noqa: E402
from nirdml.training.features import FeatureCache, _image_splits, load_feature_splits  # noqa: E402

PRESET = "cars98-frozen-proxyanchor-baseline"
METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def extraction_speed(cfg, images: int) -> float:
    from nirdml.models import build_model

    splits = _image_splits(cfg)
    model = build_model("efficientnet_lite0", 2).eval()
    data = splits.test
    n = min(images, len(data))
    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, 16):
            x = torch.stack([data[i][0] for i in range(start, min(start + 16, n))])
            model.features(x)
    return n / (time.perf_counter() - t)


def step_times(cfg, splits, repeats: int) -> dict[str, float]:
    """Median seconds of one optimizer step, cached features vs end to end, at batch 90."""
    out = {}
    b = cfg.data.batch_size
    labels = torch.arange(b) // 2 % splits.train.num_classes
    feats = torch.stack([splits.train[i][0] for i in range(b)])
    size = cfg.data.image_size
    images = torch.randn(b, 3, size, size)
    for nir in (False, True):
        c = load_config(cfg.to_dict(), {"loss": {"nir": {"enabled": nir}}})
        loss = build_loss(c.loss, splits.train.num_classes, c.model.embed_dim)
        from nirdml.training.build import build_head_model

        head = build_head_model(c, splits.train.num_features, splits.cache.meta["backbone"])
        e2e_cfg = load_config(c.to_dict(), {"model": {"frozen": False}})
        e2e = build_model_from_config(e2e_cfg)
        for name, model, x in (("cache", head, feats), ("end to end", e2e, images)):
            crit = Criterion(model, loss)
            params = [p for p in crit.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=1e-5)

            def step(crit=crit, opt=opt, x=x):
                value = crit(x, labels)
                opt.zero_grad()
                value.backward()
                opt.step()

            key = f"{name}{' + NIR' if nir else ''}"
            out[key] = _time(step, repeats if name == "cache" else max(2, repeats // 10))
    return out


def raw_feature_metrics(splits) -> dict[str, float]:
    from nirdml.evaluation import evaluate

    x = torch.from_numpy(splits.cache.test.astype("float32"))
    x = torch.nn.functional.normalize(x, dim=-1)
    return evaluate(x, torch.from_numpy(splits.test.labels), METRICS, seed=0)


def composition_check(run: Path, splits) -> dict:
    """The trained run composed with its backbone on raw test images vs head(cache)."""
    from nirdml.evaluation import compute_embeddings, evaluate
    from nirdml.training.artifacts import checkpoint_data, load_trained

    trained = load_trained(run / "checkpoints" / "best.pt")
    _, raw_test, _ = checkpoint_data(trained, "test")
    t = time.perf_counter()
    composed, labels = compute_embeddings(trained.model, raw_test, batch_size=16)
    seconds = time.perf_counter() - t
    cached, _ = compute_embeddings(trained.model.head_only(), splits.test, batch_size=256)
    metrics = ["recall@1", "map@r"]
    return {
        "max_abs_diff": float((composed - cached).abs().max()),
        "composed": evaluate(composed, labels, metrics, seed=0),
        "cached": evaluate(cached, labels, metrics, seed=0),
        "seconds": seconds,
    }


def run_numbers(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best"]
    return {
        "name": summary["name"],
        "epoch": best["epoch"],
        "selected_on": best["selected_on"],
        "metrics": {m: best["metrics"].get(f"test/{m}") for m in METRICS},
        "val": best["metrics"].get("val/recall@1"),
        "train_time_s": summary["train_time_s"],
        "epochs": summary["epochs_run"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="the cars98 feature cache (nirdml features)")
    p.add_argument("--root", default="../shared/data/cars98")
    p.add_argument("--runs", nargs="*", default=[], help="run folders to report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=256, help="images timed for extraction")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--compose", action="store_true", help="check the first run composed")
    p.add_argument("--timings", help="extra timing lines (JSON: label -> text) to include")
    p.add_argument("--out", default="benchmarks/results/frozen_features.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(PRESET, [f"data.root={args.root}", f"data.features={args.cache}"])
    cache = FeatureCache.open(args.cache)
    splits = load_feature_splits(cfg)
    speed = extraction_speed(cfg, args.images)
    steps = step_times(cfg, splits, args.repeats)
    raw = raw_feature_metrics(splits)
    runs = [run_numbers(Path(r)) for r in args.runs]
    compose = composition_check(Path(args.runs[0]), splits) if args.compose and runs else None
    stats = cache.meta.get("stats", {})

    lines = [
        "# Frozen EfficientNet-Lite0 features on cars98",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {torch.__version__}, {args.threads} thread(s). Command: `OMP_NUM_THREADS="
        f"{args.threads} python benchmarks/frozen_features.py {' '.join(argv or sys.argv[1:])}`.",
        "",
        f"Preset `{PRESET}` (and `-nir`): classes 1-49 train (9 carved for validation, seed "
        f"0), 50-98 test; {cfg.data.image_size} px; {cfg.data.feature_views} train views; "
        f"{cfg.data.feature_dtype}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| extraction, JPEG + test transform + forward, batch 16, {cfg.data.image_size} px | "
        f"{speed:.1f} images/s per core |",
        f"| the full cache build (`nirdml features`, {stats.get('images', 0):,} images) | "
        f"{stats.get('images_per_s_this_session', 0):.1f} images/s "
        f"({stats.get('threads')} thread(s), {stats.get('seconds_this_session', 0) / 60:.1f} "
        "min, machine shared) |",
        f"| cache size | {cache.nbytes / 2**20:.1f} MiB ({cache.num_features} features x "
        f"({cache.test.shape[0]} test + {cache.train_plain.shape[0]} plain + "
        f"{cache.train_views.shape[0]} x {cache.train_views.shape[1]} views)) |",
    ]
    for key, value in steps.items():
        lines.append(f"| train step at batch 90, {key} | {value * 1000:.1f} ms |")
    for key in ("", " + NIR"):
        ratio = steps[f"end to end{key}"] / steps[f"cache{key}"]
        lines.append(f"| end to end / cache{key} | {ratio:.0f}x |")
    if args.timings:
        for label, text in json.loads(Path(args.timings).read_text()).items():
            lines.append(f"| {label} | {text} |")
    lines += [
        "",
        "Test metrics (classes 50-98, 2,057 images, every image a query); runs at the epoch "
        "selected on validation R@1:",
        "",
        "| embedding | epoch | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
        "| raw pooled features (1280-d, cosine) | - | "
        + " | ".join(f"{raw[m]:.4f}" for m in METRICS)
        + " |",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']} ({r['epochs']} epochs, {r['train_time_s']:.0f} s of training) | "
            f"{r['epoch']} (val R@1 {r['val']:.4f}) | "
            + " | ".join(f"{r['metrics'][m]:.4f}" for m in METRICS)
            + " |"
        )
    if compose is not None:
        lines += [
            "",
            f"Composition (`{args.runs[0]}`, best.pt): backbone + head on the raw test JPEGs vs "
            f"the head on the cached ({cfg.data.feature_dtype}) test features: largest "
            f"embedding difference {compose['max_abs_diff']:.2e} (float16 storage rounding; "
            "a float32 cache agrees to 1e-5, tests/test_features.py); R@1 "
            f"{compose['composed']['recall@1']:.4f} vs {compose['cached']['recall@1']:.4f}, "
            f"MAP@R {compose['composed']['map@r']:.4f} vs {compose['cached']['map@r']:.4f}; "
            f"embedding the 2,057 raw images took {compose['seconds']:.0f} s.",
        ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
