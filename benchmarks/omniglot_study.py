"""Evidence study: does NIR improve proxy-based DML? Omniglot zero-shot, multi-seed.

Train on the 964 Omniglot background characters (96 held out, class-disjoint, for model
selection), retrieve among the 659 evaluation characters never seen. For ProxyAnchor,
ProxyNCA and SoftTriple: the baseline and +NIR over several seeds with a fixed epoch
budget; a ProxyAnchor sweep of NIR's weight and objective; flow samples around proxies.

    python benchmarks/omniglot_study.py list  [--part all]          # runs and their status
    python benchmarks/omniglot_study.py run   --part tune-base      # train (resumable)
    python benchmarks/omniglot_study.py run   --part all
    python benchmarks/omniglot_study.py run   --part main --shard 1/2   # 2nd of 2 processes
    python benchmarks/omniglot_study.py flow                        # flow samples PNG
    python benchmarks/omniglot_study.py diagnose                    # NIR gradient analysis
    python benchmarks/omniglot_study.py report                      # results file + PNGs

Runs live in ``--runs`` (default ``runs/omniglot_study``); a finished run (its
``summary.json``) is skipped, a killed one resumed. Run ONE process at a time with
``OMP_NUM_THREADS=1``; ``--data-root`` defaults to ``$NIRDML_SHARED_DATA/omniglot`` or
the first ``shared/data/omniglot`` beside or above the checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import grid  # noqa: E402
from study.runner import is_done, run_dir, run_specs  # noqa: E402


def default_data_root() -> str:
    """``$NIRDML_SHARED_DATA/omniglot``, else the first ``shared/data/omniglot`` above the repo."""
    env = os.environ.get("NIRDML_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "data" for p in (REPO.parent, REPO.parent.parent)]
    for base in candidates:
        if (base / "omniglot").is_dir():
            return str((base / "omniglot").resolve())
    return str(candidates[0] / "omniglot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "run", "flow", "diagnose", "report"):
        p = sub.add_parser(name)
        p.add_argument("--runs", type=Path, default=REPO / "runs" / "omniglot_study")
        p.add_argument("--data-root", default=default_data_root())
        if name in ("list", "run"):
            p.add_argument("--part", default="all", choices=[*grid.PARTS, "all"])
        if name == "run":
            p.add_argument(
                "--shard",
                default=(0, 1),
                type=grid.shard_arg,
                help="I/N: run only every N-th run starting at I (0-based), so N processes (one "
                "per core, OMP_NUM_THREADS=1) share a part without touching the same run",
            )
        if name in ("flow", "diagnose", "report"):
            p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
        if name == "flow":
            p.add_argument(
                "--seed",
                type=int,
                default=grid.MAIN_SEEDS[0],
                help="main-study seed whose ProxyAnchor (+NIR) runs are used",
            )
    args = parser.parse_args(argv)

    if args.command == "list":
        for spec in grid.specs_of(args.part):
            folder = run_dir(args.runs, spec, args.data_root)
            state = "done" if is_done(folder) else ("partial" if folder.exists() else "todo")
            print(f"{state:8s} {folder.name}")
        return 0
    if args.command == "run":
        if not Path(args.data_root).is_dir():
            parser.error(f"--data-root {args.data_root} is not a folder (the Omniglot npz/PNGs)")
        index, count = args.shard
        specs = grid.shard(grid.specs_of(args.part), args.data_root, index, count)
        run_specs(specs, args.runs, args.data_root)
        return 0
    if args.command == "flow":
        from study.flow_viz import flow_study

        folders = {}
        for variant in ("base", "nir"):
            spec = grid.RunSpec(
                grid.main_group("proxy_anchor", variant),
                args.seed,
                grid.LOSSES["proxy_anchor"][variant == "nir"],
            )
            folders[variant] = run_dir(args.runs, spec, args.data_root)
            if not is_done(folders[variant]):
                parser.error(f"{folders[variant]} is not finished: run --part main first")
        flow_study(folders["nir"], folders["base"], args.data_root, args.out)
        print(f"wrote {args.out / 'omniglot_flow.md'} and omniglot_flow_samples.png")
        return 0
    if args.command == "diagnose":
        from study.diagnose import (
            adam_state,
            gradient_diagnostics,
            write_adam_states,
            write_diagnostics,
        )

        results = []
        for folder in grid.diagnosis_runs(args.runs, args.data_root):
            print(f"diagnosing {folder.name}", flush=True)
            results.append(gradient_diagnostics(folder, args.data_root))
        print(f"wrote {write_diagnostics(results, args.out)}")
        states = [adam_state(f) for f in grid.adam_runs(args.runs, args.data_root)]
        print(f"wrote {write_adam_states(states, args.out)}")
        return 0
    from study.report import write_report

    path = write_report(args.runs, args.data_root, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
