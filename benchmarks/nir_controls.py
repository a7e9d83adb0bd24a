"""NIR controls and bounded objectives on any dataset config, multi-seed, paired.

    python benchmarks/nir_controls.py list   --base omniglot --nir omniglot-nir --data-root DIR
    python benchmarks/nir_controls.py run    --base omniglot --nir omniglot-nir --data-root DIR \
        --seeds 0 1 2 3 4 [--arms base recipe-nir-x0 ...] [--set key=value ...] [--shard I/N]
    python benchmarks/nir_controls.py report --base omniglot --nir omniglot-nir --data-root DIR \
        --seeds 0 1 2 3 4 --out benchmarks/results/omniglot_controls.md

The arms are defined in ``study/controls.py`` (``--arms`` takes any subset; default all).
``--set`` overrides go to every arm (e.g. another engineer's frozen-feature switch, or
``epochs=...``). Runs live in ``--runs`` (default ``runs/nir_controls/<base>``), one folder
per configuration hash: finished runs are skipped, killed ones resumed, identical configs
trained once, diverged ones recorded (``diverged.json``) and counted in the report. Run ONE
process per core with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import controls, grid  # noqa: E402
from study.collect import load_run  # noqa: E402
from study.runner import is_diverged, is_done, run_dir, run_specs  # noqa: E402
from study.stats import holm, mean_std, paired_test  # noqa: E402


def _specs(args: argparse.Namespace) -> list[grid.RunSpec]:
    return controls.control_specs(
        args.base,
        args.nir,
        tuple(args.seeds),
        tuple(args.arms),
        tuple(args.set),
        args.prefix,
        args.recipe_proxy_lr_mult,
    )


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def _raw(record, metric: str) -> float:
    """The run's untrained reference (epoch 0: the backbone's pooled features, no head)."""
    ref = (record.summary.get("reference") or {}).get("metrics", {})
    return ref.get(f"test/{metric}", math.nan)


def _untrained_lines(runs: dict, metrics: list[str]) -> list[str]:
    """Does training help at all: each arm's test metrics against its runs' own epoch 0, and
    the selected epochs."""
    every = [r for recs in runs.values() for r in recs.values()]
    if not every or all(math.isnan(_raw(r, metrics[0])) for r in every):
        return []
    raw = ", ".join(f"{m} {_fmt(*mean_std([_raw(r, m) for r in every]))}" for m in metrics)
    lines = [
        "",
        f"Untrained features (each run's epoch 0, no head; the same on every seed's test "
        f"split): test {raw}. Runs above their own epoch 0 at the selected epoch, and the "
        "selected epochs:",
        "",
        "| arm | " + " | ".join(f"above raw {m}" for m in metrics) + " | selected epochs |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for arm, recs in runs.items():
        recs = list(recs.values())
        cells = [
            f"{sum(r.metrics('selected').get(m, math.nan) > _raw(r, m) for r in recs)}/{len(recs)}"
            for m in metrics
        ]
        epochs = ", ".join(str(r.epoch("selected")) for r in recs)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {epochs} |")
    return lines


def report(args: argparse.Namespace) -> str:
    """Markdown: per arm, val/test R@1 at the val-selected epoch, the paired Δ test R@1 vs
    its reference (95% CI, t-test p, Holm over the arms vs base, wins), best-test-epoch Δ,
    the alarm's final gradient ratio and inert epochs, diverged runs."""
    runs = {}  # arm -> {seed: record}
    diverged = {}
    for arm in args.arms:
        runs[arm], diverged[arm] = {}, 0
        for seed in args.seeds:
            spec = controls.arm_spec(
                arm,
                seed,
                args.base,
                args.nir,
                tuple(args.set),
                args.prefix,
                args.recipe_proxy_lr_mult,
            )
            folder = run_dir(args.runs, spec, args.data_root)
            if is_diverged(folder):
                diverged[arm] += 1
            record = load_run(folder) if is_done(folder) else None
            if record is not None:
                runs[arm][seed] = record

    metric = args.metric
    short = {"recall@1": "R@1", "map@r": "MAP@R"}.get(metric, metric)

    def r1(record, reading: str = "selected", split: str = "test") -> float:
        return record.metrics(reading, split).get(metric, math.nan)

    def paired(arm: str, ref: str, reading: str = "selected"):
        seeds = sorted(set(runs.get(arm, {})) & set(runs.get(ref, {})))
        if len(seeds) < 2:
            return None
        return paired_test(
            [r1(runs[arm][s], reading) for s in seeds], [r1(runs[ref][s], reading) for s in seeds]
        )

    vs_base = {arm: paired(arm, "base") for arm in args.arms if arm != "base" and "base" in runs}
    tested = [a for a, p in vs_base.items() if p is not None]
    adjusted = dict(zip(tested, holm([vs_base[a].t_p for a in tested]), strict=True))
    lines = [
        f"# NIR controls: `{args.base}` / `{args.nir}`",
        "",
        "Generated by `benchmarks/nir_controls.py report`; arms: `benchmarks/study/controls.py`."
        f" Seeds {', '.join(map(str, args.seeds))}; extra overrides: "
        f"{', '.join(f'`{s}`' for s in args.set) or 'none'}. Test {short} at the epoch selected "
        "on validation (the config's `eval.select_metric`); Δ = arm minus reference on the "
        "same seed (95% t CI, two-sided paired "
        "t-test, Holm over all arms vs `base`); alarm: the final epoch's geometric-mean ratio "
        "of NIR's tangent gradient on the embeddings to the proxy loss's.",
        "",
        f"| arm | runs (diverged) | val {short} | test {short} | reference | Δ test {short} | "
        "95% CI | p | "
        "Holm p | wins | Δ best-test-epoch | alarm ratio | inert epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in args.arms:
        recs = list(runs[arm].values())
        val = mean_std([r1(r, split="val") for r in recs])
        test = mean_std([r1(r) for r in recs])
        ratios = [
            (r.summary.get("nir_alarm") or {}).get("final_grad_ratio", math.nan) for r in recs
        ]
        finite = [x for x in ratios if x is not None and not math.isnan(x) and x > 0]
        alarm = f"{math.exp(sum(map(math.log, finite)) / len(finite)):.1e}" if finite else ""
        inert = sum(len((r.summary.get("nir_alarm") or {}).get("inert_epochs", [])) for r in recs)
        refs = [("base", vs_base.get(arm))] if arm != "base" else [("", None)]
        if arm in controls.REFERENCE_RECIPE:
            ref = controls.REFERENCE_RECIPE[arm]
            refs.append((ref, paired(arm, ref)))
        for i, (ref, p) in enumerate(refs):
            head = (
                f"| {arm} | {len(recs)} ({diverged[arm]}) | {_fmt(*val)} | {_fmt(*test)} "
                if i == 0
                else "| | | | "
            )
            if p is None:
                lines.append(head + f"| {ref} | | | | | | | {alarm if i == 0 else ''} | |")
                continue
            best = paired(arm, ref, "best_test")
            holm_p = f"{adjusted[arm]:.3g}" if ref == "base" and arm in adjusted else ""
            lines.append(
                head + f"| {ref} | {p.mean:+.4f} | [{p.ci_low:+.4f}, {p.ci_high:+.4f}] | "
                f"{p.t_p:.3g} | {holm_p} | {p.wins}/{p.n} | "
                f"{best.mean:+.4f} | {alarm if i == 0 else ''} | {inert if i == 0 else ''} |"
            )
    if args.also:
        lines += [
            "",
            "Other test metrics at the same (validation-selected) epochs, mean ± std over seeds:",
            "",
            "| arm | " + " | ".join(f"test {m} | Δ vs base (wins)" for m in args.also) + " |",
            "|---|" + "---|---|" * len(args.also),
        ]
        for arm in args.arms:
            recs = list(runs[arm].values())
            cells = []
            for m in args.also:
                cells.append(
                    _fmt(*mean_std([r.metrics("selected").get(m, math.nan) for r in recs]))
                )
                seeds = sorted(set(runs[arm]) & set(runs.get("base", {})))
                if arm == "base" or len(seeds) < 2:
                    cells.append("")
                    continue
                d = paired_test(
                    [runs[arm][s].metrics("selected")[m] for s in seeds],
                    [runs["base"][s].metrics("selected")[m] for s in seeds],
                )
                cells.append(f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] ({d.wins}/{d.n})")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += _untrained_lines(runs, [metric, *args.also])
    if args.json is not None:
        raw = {m: f"raw_test_{m}" for m in [metric, *args.also]}
        per_run = {
            arm: {
                str(seed): {
                    "val": r1(rec, split="val"),
                    "test": r1(rec),
                    "epoch": rec.epoch("selected"),
                    "best_test": r1(rec, "best_test"),
                    "best_test_epoch": rec.epoch("best_test"),
                    "alarm_ratio": (rec.summary.get("nir_alarm") or {}).get("final_grad_ratio"),
                    **{f"test_{m}": rec.metrics("selected").get(m) for m in args.also},
                    **{key: _raw(rec, m) for m, key in raw.items()},
                }
                for seed, rec in sorted(runs[arm].items())
            }
            for arm in args.arms
        }
        args.json.write_text(
            json.dumps({"metric": metric, "diverged": diverged, "runs": per_run}, indent=1) + "\n"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--base", required=True, help="baseline preset or YAML (tuned)")
        p.add_argument("--nir", required=True, help="its + NIR preset or YAML")
        p.add_argument("--data-root", required=True)
        p.add_argument("--seeds", type=int, nargs="+", default=list(grid.MAIN_SEEDS))
        p.add_argument("--arms", nargs="+", default=list(controls.ARMS), metavar="ARM")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--prefix", default="ctl", help="run-folder name prefix")
        p.add_argument(
            "--recipe-proxy-lr-mult",
            type=float,
            default=None,
            help="the recipe's proxy lr multiplier (default 2x the base's; 4000 at lr 1e-5)",
        )
        p.add_argument("--runs", type=Path, default=None)
        if name == "run":
            p.add_argument(
                "--shard",
                default=(0, 1),
                type=grid.shard_arg,
                help="I/N: every N-th run from I (0-based)",
            )
        if name == "report":
            p.add_argument("--out", type=Path, default=None, help="markdown file (else stdout)")
            p.add_argument("--json", type=Path, default=None, help="per-run numbers (JSON)")
            p.add_argument("--metric", default="recall@1", help="the test/val metric reported")
            p.add_argument(
                "--also",
                nargs="+",
                default=[],
                metavar="METRIC",
                help="more test metrics at the selected epoch, one table (e.g. map@r nmi)",
            )
    args = parser.parse_args(argv)
    for arm in args.arms:
        if arm not in controls.ARMS:
            parser.error(f"unknown arm {arm!r}; choose from {', '.join(controls.ARMS)}")
    if args.runs is None:
        args.runs = REPO / "runs" / "nir_controls" / Path(args.base).stem
    if args.command == "list":
        for spec in _specs(args):
            folder = run_dir(args.runs, spec, args.data_root)
            state = "done" if is_done(folder) else ("partial" if folder.exists() else "todo")
            print(f"{state:8s} {folder.name}  {spec.command(args.data_root, str(folder))}")
        return 0
    if args.command == "run":
        index, count = args.shard
        run_specs(grid.shard(_specs(args), args.data_root, index, count), args.runs, args.data_root)
        return 0
    text = report(args)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
