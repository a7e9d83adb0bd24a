"""Evaluation speed and memory at Stanford Online Products scale, against
pytorch-metric-learning's AccuracyCalculator, in one run.

Data: SOP-shaped synthetic embeddings (60,502 items, 11,316 classes of 2-12 items, mean
5.35, as SOP's test split), clustered: 12 "super-category" directions, class centres
around them, items around their class centre, L2-normalised. Noise is set per dimension so
that Recall@1 is in SOP's range (~0.75-0.8).

Every measurement runs in its own subprocess (same seed, same data) so that its peak
memory is its own: peak RSS (``ru_maxrss``) of that process, and the increase over the RSS
just before the timed call (data, Python, torch and faiss already loaded). Wall-clock time
covers the timed call only. Threads: 2 for torch and faiss (the machine's cores).

Rows:
- ``pml``: AccuracyCalculator(include=(precision_at_1, r_precision,
  mean_average_precision_at_r, NMI), k="max_bin_count") with its default faiss kNN and
  ``FaissKMeans(niter=20)`` (faiss's default seed 1234). (k=None, its default, would ask
  faiss for all 60,502 neighbours of every item: ~44 GB.)
- ``ours_shared``: ``evaluate`` of the same four numbers (recall@1 = precision_at_1),
  default backend (exact torch kNN, faiss k-means with the same niter and seed=1234: the
  same clustering, hence the same NMI).
- ``ours_shared_torch``: the same with ``backend="torch"`` (torch k-means, its own init:
  NMI is a different, equally valid k-means run).
- ``ours_full``: the full SOP metric set (recall@1,10,100,1000, r_precision, map@r,
  map@1000, map@1000_authors, nmi, ami, f1, rho_spectrum, pi_ratio, uniformity_g2).

``--new-metrics``: peak memory (and time) of the PML / OML metric set against the existing
retrieval metrics at the same depth (1,000 neighbours), each in its own process, on the
same data; the section between the ``new-metrics`` markers of eval_speed.md is rewritten:
- ``ret_existing``: recall@1,10,100,1000, r_precision, map@r, map@1000, map@1000_authors.
- ``ret_new``: mrr (full depth: queries whose first hit is beyond 1,000 are searched again,
  deeper), mrr@1000, precision@1,10,100,1000, r_precision@10, map@r@10, map@1000_hits.
- ``ret_new_classes``: the same with ``average="classes"`` and ``no_relevant="zero"``.
- ``ret_new_per_class``: the same names through ``evaluate_per_class`` (11,316-row table).
- ``ret_overlap``: ``ret_new`` plus recall@1,10,100,1000 and map@r with ``is_query`` /
  ``is_gallery`` masks: every second item a query, 3/4 of the items gallery (overlapping
  sets: queries in the gallery leave themselves out).

Run (about 11 min on an idle 2-core machine with --reps 2, longer under load; writes
benchmarks/results/eval_speed.md):

    nohup /work/venv/bin/python benchmarks/eval_speed.py > benchmarks/results/eval_speed.log 2>&1 &

``--dims 128`` or ``--quick`` (10x smaller data) for a faster look.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_name  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ("recall@1", "r_precision", "map@r", "nmi")
PML_NAMES = {
    "recall@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
    "nmi": "NMI",
}
FULL = (
    "recall@1",
    "recall@10",
    "recall@100",
    "recall@1000",
    "r_precision",
    "map@r",
    "map@1000",
    "map@1000_authors",
    "nmi",
    "ami",
    "f1",
    "rho_spectrum",
    "pi_ratio",
    "uniformity_g2",
)
NOISE = {128: 1.0, 512: 1.65}
EXISTING_RETRIEVAL = FULL[:8]
NEW_RETRIEVAL = (
    "mrr",
    "mrr@1000",
    "precision@1",
    "precision@10",
    "precision@100",
    "precision@1000",
    "r_precision@10",
    "map@r@10",
    "map@1000_hits",
)
NEW_METHODS = ("ret_existing", "ret_new", "ret_new_classes", "ret_new_per_class", "ret_overlap")


def sop_like(
    dim: int, n: int = 60_502, n_classes: int = 11_316, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """SOP-shaped clustered embeddings (see module docstring)."""
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.binomial(10, (n / n_classes - 2) / 10, size=n_classes)
    diff = n - int(sizes.sum())
    while diff != 0:
        j = rng.integers(n_classes)
        step = 1 if diff > 0 else -1
        if 2 <= sizes[j] + step <= 12:
            sizes[j] += step
            diff -= step
    labels = np.repeat(np.arange(n_classes), sizes)
    groups = rng.standard_normal((12, dim))
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = groups[rng.integers(12, size=n_classes)]
    centres = centres + 0.9 * rng.standard_normal((n_classes, dim)) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = NOISE.get(dim, 1.0)
    x = centres[labels] + noise * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return x[perm].astype(np.float32), labels[perm]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(method: str, dim: int, quick: bool) -> dict:
    """Child process body: build data, time one method, report JSON."""
    import torch

    torch.set_num_threads(2)
    import faiss

    faiss.omp_set_num_threads(2)
    sys.path.insert(0, str(ROOT / "src"))
    from nirdml.evaluation import evaluate, evaluate_per_class

    n, c = (6_050, 1_132) if quick else (60_502, 11_316)
    x, y = sop_like(dim, n, c)
    if method in NEW_METHODS:
        kwargs: dict = {"device": "cpu"}
        names = NEW_RETRIEVAL
        call = evaluate
        if method == "ret_existing":
            names = EXISTING_RETRIEVAL
        elif method == "ret_new_classes":
            kwargs |= {"average": "classes", "no_relevant": "zero"}
        elif method == "ret_new_per_class":
            call = evaluate_per_class
        elif method == "ret_overlap":
            names = (*EXISTING_RETRIEVAL[:6], *NEW_RETRIEVAL)
            rng = np.random.default_rng(1)
            kwargs |= {"is_query": np.arange(n) % 2 == 0, "is_gallery": rng.random(n) < 0.75}
            kwargs["is_gallery"][::2] |= rng.random(len(kwargs["is_gallery"][::2])) < 0.5
        before = _rss_mb()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        out = call(x, y, names, **kwargs)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        if method == "ret_new_per_class":
            rows = list(out.values())
            values = {"classes": float(len(rows))}
            values |= {k: float(np.nanmean([r[k] for r in rows])) for k in names}
        else:
            values = dict(out)
    elif method == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=tuple(PML_NAMES.values()), k="max_bin_count", device=torch.device("cpu")
        )
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        before = _rss_mb()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        out = calc.get_accuracy(xt, yt)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        values = {ours: float(out[theirs]) for ours, theirs in PML_NAMES.items()}
    else:
        metrics = FULL if method == "ours_full" else SHARED
        backend = "torch" if method == "ours_shared_torch" else "auto"
        before = _rss_mb()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        values = evaluate(x, y, metrics, device="cpu", backend=backend, seed=1234)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "dim": dim,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "values": values,
    }


def machine() -> str:
    import faiss
    import pytorch_metric_learning
    import torch

    cpu = cpu_name()
    return (
        f"{cpu}, {os.cpu_count()} cores visible (2 threads used), Linux, Python "
        f"{platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}, "
        f"pytorch-metric-learning {pytorch_metric_learning.__version__}; CPU only"
    )


METHODS = ("pml", "ours_shared", "ours_shared_torch", "ours_full")
MARK_BEGIN = "<!-- new-metrics: begin (benchmarks/eval_speed.py --new-metrics) -->"
MARK_END = "<!-- new-metrics: end -->"


def _best(rows: list[dict], dim: int, method: str) -> dict:
    """The repetition with the shortest wall time (least disturbed by other jobs)."""
    runs = [r for r in rows if r["dim"] == dim and r["method"] == method]
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["cpu_seconds"] = min(r["cpu_seconds"] for r in runs)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def write_report(rows: list[dict], quick: bool, command: str, reps: int) -> Path:
    lines = [
        "# Evaluation speed at SOP scale: nirdml.evaluation vs pytorch-metric-learning",
        "",
        f"Machine: {machine()}. The 2 cores are shared with other jobs, so wall times swing "
        f"(up to ~2.5x seen); each method ran {reps} time(s), interleaved with the others; "
        "the table shows the fastest wall time (all runs in brackets) and the lowest CPU "
        "time (user + system seconds of the process during the call, less sensitive to "
        "other jobs).",
        "",
        "Data: SOP-shaped synthetic embeddings, "
        f"{'6,050 x D, 1,132' if quick else '60,502 x D, 11,316'} classes of 2-12 items "
        "(mean 5.35), clustered (see benchmarks/eval_speed.py).",
        "",
        "Memory: peak RSS of the measuring process (`ru_maxrss`, includes Python, torch, "
        "faiss and the data), and its increase over the RSS just before the timed call.",
        "",
        f"Command: `{command}`",
        "",
        "| dim | method | metrics | wall (s) | CPU (s) | peak RSS (MB) | increase (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    dims = sorted({r["dim"] for r in rows})
    for dim in dims:
        for method in METHODS:
            if not any(r["dim"] == dim and r["method"] == method for r in rows):
                continue
            r = _best(rows, dim, method)
            what = (
                "full SOP set (14 metrics)" if method == "ours_full" else "p@1, r_prec, map@r, NMI"
            )
            runs = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
            lines.append(
                f"| {dim} | {method} | {what} | {r['seconds']:.1f} ({runs}) | "
                f"{r['cpu_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} |"
            )
    lines += ["", "## Speed-up over pml and agreement on the shared metrics", ""]
    lines += [
        "| dim | ours_shared: wall / CPU | ours_shared_torch: wall / CPU | max abs diff "
        "(recall@1, r_precision, map@r) | NMI: pml / ours (faiss, same seed) / ours (torch) |",
        "|---|---|---|---|---|",
    ]
    for dim in dims:
        if not all(any(r["dim"] == dim and r["method"] == m for r in rows) for m in METHODS[:3]):
            continue
        p, o, t = (_best(rows, dim, m) for m in METHODS[:3])
        diff = max(abs(p["values"][m] - o["values"][m]) for m in SHARED[:3])
        lines.append(
            f"| {dim} | {p['seconds'] / o['seconds']:.2f}x / "
            f"{p['cpu_seconds'] / o['cpu_seconds']:.2f}x | "
            f"{p['seconds'] / t['seconds']:.2f}x / {p['cpu_seconds'] / t['cpu_seconds']:.2f}x | "
            f"{diff:.1e} | {p['values']['nmi']:.6f} / {o['values']['nmi']:.6f} / "
            f"{t['values']['nmi']:.6f} |"
        )
    lines += ["", "## Metric values (first run of each)", ""]
    seen = set()
    for r in rows:
        if (r["dim"], r["method"]) in seen:
            continue
        seen.add((r["dim"], r["method"]))
        vals = ", ".join(f"{k} {v:.6f}" for k, v in r["values"].items())
        lines.append(f"- {r['dim']} / {r['method']}: {vals}")
    lines.append("")
    name = "eval_speed_quick.md" if quick else "eval_speed.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, out)
    return out


def write_new_metrics_section(rows: list[dict], quick: bool, command: str, reps: int) -> Path:
    """Rewrite the new-metrics section of the results file (the rest is left as it is)."""
    name = "eval_speed_quick.md" if quick else "eval_speed.md"
    out = RESULTS / name
    what = {
        "ret_existing": "existing retrieval set (8 metrics)",
        "ret_new": "PML / OML set (9 metrics)",
        "ret_new_classes": "PML / OML set, average=classes, no_relevant=zero",
        "ret_new_per_class": "PML / OML set, evaluate_per_class table",
        "ret_overlap": "14 metrics, is_query / is_gallery masks (overlapping sets)",
    }
    lines = [
        MARK_BEGIN,
        "## New metrics (PML / OML set): memory against the existing ones",
        "",
        f"Machine: {machine()}. Same data as above; each method in its own process, "
        f"{reps} run(s), fastest wall time shown (all runs in brackets), highest peak RSS. "
        "Every method searches the same 1,000 neighbours per query (exact torch kNN, default "
        "512 MB budget); only per-query numbers are kept.",
        "",
        f"Command: `{command}`",
        "",
        "| dim | method | metrics | wall (s) | CPU (s) | peak RSS (MB) | increase (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for dim in sorted({r["dim"] for r in rows}):
        for method in NEW_METHODS:
            if not any(r["dim"] == dim and r["method"] == method for r in rows):
                continue
            r = _best(rows, dim, method)
            runs = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
            lines.append(
                f"| {dim} | {method} | {what[method]} | {r['seconds']:.1f} ({runs}) | "
                f"{r['cpu_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} |"
            )
    for dim in sorted({r["dim"] for r in rows}):
        have = {r["method"] for r in rows if r["dim"] == dim}
        if not {"ret_existing", "ret_new"} <= have:
            continue
        old, new = (_best(rows, dim, m)["peak_rss_mb"] for m in ("ret_existing", "ret_new"))
        worst = max(_best(rows, dim, m)["peak_rss_mb"] for m in have - {"ret_overlap"})
        lines += [
            "",
            f"D={dim}: peak RSS of the PML / OML set {new:.0f} MB vs {old:.0f} MB for the "
            f"existing set ({new - old:+.0f} MB, {100 * (new - old) / old:+.1f}%; every "
            f"variant but the overlapping sets within {worst - old:+.0f} MB). Per-query values "
            "cost 8 bytes per query and metric (0.5 MB each here); the rest is the shared kNN "
            "(chunk temporaries bounded by the budget). Overlapping sets add copies of the "
            "query and gallery embeddings.",
        ]
    lines += ["", "Values (first run of each):", ""]
    seen = set()
    for r in rows:
        if (r["dim"], r["method"]) in seen:
            continue
        seen.add((r["dim"], r["method"]))
        vals = ", ".join(f"{k} {v:.6f}" for k, v in r["values"].items())
        lines.append(f"- {r['dim']} / {r['method']}: {vals}")
    lines += ["", MARK_END, ""]
    old = out.read_text() if out.is_file() else ""
    if MARK_BEGIN in old:
        head, rest = old.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n") if MARK_END in rest else ""
    else:
        head, tail = old, ""
    text = head.rstrip("\n") + "\n\n" + "\n".join(lines) + tail
    RESULTS.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--quick", action="store_true", help="10x smaller data")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    ap.add_argument(
        "--new-metrics",
        action="store_true",
        help="memory of the PML / OML metric set vs the existing retrieval metrics",
    )
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "DIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.quick)))
        return
    rows = []
    methods = NEW_METHODS if args.new_metrics else METHODS
    for dim in args.dims:
        for _ in range(args.reps):
            for method in methods:
                cmd = [sys.executable, __file__, "--child", method, str(dim)]
                cmd += ["--quick"] if args.quick else []
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise RuntimeError(f"{method} dim {dim} failed:\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:])
    if args.new_metrics:
        print(write_new_metrics_section(rows, args.quick, command.strip(), args.reps))
    else:
        print(write_report(rows, args.quick, command.strip(), args.reps))


if __name__ == "__main__":
    main()
