"""cars98: frozen heads vs partial fine-tuning of EfficientNet-Lite0, chosen on validation.

    python benchmarks/cars98_partial.py tune   --data-root DIR --features DIR [--shard I/N]
    python benchmarks/cars98_partial.py report --data-root DIR --features DIR --out FILE.md
    python benchmarks/cars98_partial.py losses --out DIR [--nir-weight LOSS=W ...]
    python benchmarks/cars98_partial.py ratio --data-root DIR --features DIR --out DIR
    python benchmarks/cars98_partial.py ablate --data-root DIR --features DIR [--shard I/N]
    python benchmarks/cars98_partial.py ablation-report --data-root DIR --features DIR
    python benchmarks/cars98_partial.py compare --runs RUNS [--out FILE.md --json FILE.json]

``ablate`` answers why the old frozen preset ended below the raw features: from that preset
(128 px, a random validation carve, head lr 3e-4) one change at a time towards the new one
(224 px, the last-classes carve, lr 1e-4), 5 seeds each, TEST metrics at the validation-
selected epoch against the raw pooled features of the same resolution (each run's epoch 0).

``compare`` reads the baseline arms of the two NIR studies (``RUNS/study_partial/runs/pa-base-s*``
and ``RUNS/study_frozen/runs/fr-base-s*``, the presets unchanged, every seed found) and
tabulates frozen head vs partial fine-tuning vs the raw features (each run's epoch 0), with
the paired partial - frozen differences over the seeds both have.

``tune`` trains the validation sweep (``SWEEP``: image size, cut, learning rates, embedding
size, epochs) on the tuning seed ``TUNE_SEED`` (not one of the study's seeds 0-4); the
report lists validation numbers only, so nothing is chosen on the test classes. Every run
starts from the frozen cars98 preset and overrides what the sweep varies; validation is the
last 9 training classes (``data.val_carve=last``: held out as a block of makes, as the test
classes are). Feature caches live under ``--features`` (one per image size and cut; built on
first use). Runs live in ``--runs`` (default ``runs/cars98_partial``), one folder per config
hash: finished runs are skipped, killed ones resumed. Run ONE process per core with
``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nirdml.runtime import atomic_write_json, atomic_write_text  # noqa: E402
from study import grid  # noqa: E402
from study.collect import RunRecord, by_seed, load_run  # noqa: E402
from study.runner import run_dir, run_specs  # noqa: E402
from study.stats import mean_std, paired_test  # noqa: E402

BASE = "cars98-frozen-proxyanchor-baseline"
TUNE_SEED = 100
PROXY_LR = 2e-2
"""Absolute proxy lr of every sweep point (the paper's 1e-5 x 2000)."""
COMMON = (  # every knob the sweep does not vary, pinned against later preset changes
    "data.val_classes=9",
    "data.val_carve=last",
    "eval.metrics=[recall@1,map@r]",
    "epochs=30",
)


def point(size: int, cut: str | None, lr: float, *more: str) -> tuple[str, tuple[str, ...]]:
    """A sweep point: its label and overrides (the feature folder is added per --features)."""
    where = "frozen" if cut is None else cut
    label = f"{size}px-{where}-lr{lr:g}" + "".join(f"-{m.split('.')[-1]}" for m in more)
    sets = (
        f"data.image_size={size}",
        f"model.cut={'null' if cut is None else cut}",
        "model.embed_dim=128",  # pinned: the base preset's own size may change
        f"optim.lr={lr}",
        f"optim.proxy_lr_mult={PROXY_LR / lr:g}",
        *more,
    )
    return label, sets


SWEEP = [
    point(128, None, 3e-4),
    point(224, None, 1e-4),
    point(224, None, 3e-4),
    point(224, None, 1e-3),
    point(224, "stage7", 3e-5),
    point(224, "stage7", 1e-4),
    point(224, "stage7", 3e-4),
    point(224, "stage6", 3e-5),
    point(224, "stage6", 1e-4),
    # Round 2: longer runs and a wider embedding for the best of each kind.
    point(224, None, 3e-5, "epochs=60"),
    point(224, None, 1e-4, "epochs=60"),
    point(224, None, 1e-4, "epochs=60", "model.embed_dim=512"),
    point(224, "stage7", 1e-4, "epochs=60"),
    point(224, "stage7", 1e-4, "epochs=60", "model.embed_dim=512"),
    point(224, "stage7", 1e-3),
    point(224, "stage7", 3e-4, "epochs=60"),
    point(224, "head", 3e-4),
    point(224, "stage7", 3e-4, "epochs=60", "model.embed_dim=512"),
]


ABLATION_SEEDS = (0, 1, 2, 3, 4)
ABLATION = [
    ("old preset: 128 px, random carve, lr 3e-4", 128, "random", 3e-4),
    ("128 px, last carve, lr 3e-4", 128, "last", 3e-4),
    ("224 px, random carve, lr 3e-4", 224, "random", 3e-4),
    ("224 px, last carve, lr 3e-4", 224, "last", 3e-4),
    ("224 px, last carve, lr 1e-4", 224, "last", 1e-4),
    ("new preset: 224 px, last carve, lr 1e-4, 512-d", 224, "last", 1e-4, 512),
]
"""(label, image size, validation carve, head lr[, embedding size]): the frozen head, 60
epochs, 128-d unless given, proxies at an absolute lr of 3e-2 as the old preset (x100 at
3e-4), 2e-2 at lr 1e-4 (the tuned points)."""


def _ablation_specs(args: argparse.Namespace) -> list[tuple[str, grid.RunSpec]]:
    out = []
    for label, size, carve, lr, *dim in ABLATION:
        proxy_lr = PROXY_LR if lr == 1e-4 else 3e-2
        embed = dim[0] if dim else 128
        folder = Path(args.features) / f"cars98-lite0-{size}px-pooled"
        sets = (
            "data.val_classes=9",
            f"data.val_carve={carve}",
            "eval.metrics=[recall@1,map@r]",
            "epochs=60",
            f"data.image_size={size}",
            "model.cut=null",
            f"optim.lr={lr}",
            f"optim.proxy_lr_mult={proxy_lr / lr:g}",
            f"data.features={folder}",
            f"model.embed_dim={embed}",
        )
        group = f"ablate-{size}px-{carve}-lr{lr:g}" + (f"-{embed}d" if dim else "")
        out += [(label, grid.RunSpec(group, seed, BASE, sets)) for seed in ABLATION_SEEDS]
    return out


def ablation_report(args: argparse.Namespace) -> str:
    """Per change: test R@1 / MAP@R at the validation-selected epoch (mean ± std over the
    seeds), the raw features of that resolution, seeds above them, paired Δ to the row above."""
    from study.stats import mean_std, paired_test

    rows, previous = [], None
    for label, *_ in ABLATION:
        recs = {}
        for lab, spec in _ablation_specs(args):
            if lab == label:
                rec = load_run(_folder(args, spec))
                if rec is not None:
                    recs[spec.seed] = rec
        if not recs:
            rows.append(f"| {label} | not finished | | | | | |")
            continue
        cells = []
        for metric in ("recall@1", "map@r"):
            test = [r.metrics("selected")[metric] for r in recs.values()]
            raw = [r.summary["reference"]["metrics"][f"test/{metric}"] for r in recs.values()]
            above = sum(t > w for t, w in zip(test, raw, strict=True))
            m, sd = mean_std(test)
            cells.append(f"{m:.4f} ± {sd:.4f} | {raw[0]:.4f} | {above}/{len(test)}")
        delta = ""
        if previous is not None:
            seeds = sorted(set(recs) & set(previous))
            if len(seeds) >= 2:
                p = paired_test(
                    [recs[s].metrics("selected")["recall@1"] for s in seeds],
                    [previous[s].metrics("selected")["recall@1"] for s in seeds],
                )
                delta = f"{p.mean:+.4f} ({p.wins}/{p.n})"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {delta} |")
        previous = recs
    head = [
        "| frozen head (60 epochs, 128-d unless said) | test R@1 | raw R@1 | above raw "
        "| test MAP@R | raw MAP@R | above raw | Δ R@1 vs row above (wins) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def _specs(args: argparse.Namespace) -> list[grid.RunSpec]:
    specs = []
    for label, sets in SWEEP:
        size = next(s.split("=")[1] for s in sets if s.startswith("data.image_size="))
        cut = next(s.split("=")[1] for s in sets if s.startswith("model.cut="))
        folder = Path(args.features) / f"cars98-lite0-{size}px-{cut.replace('null', 'pooled')}"
        specs.append(
            grid.RunSpec(
                f"tune-{label}", TUNE_SEED, BASE, (*COMMON, *sets, f"data.features={folder}")
            )
        )
    return specs


def _folder(args: argparse.Namespace, spec: grid.RunSpec) -> Path:
    """The spec's run folder; a run of the same point made before the config gained fields
    (whose defaults keep the old behaviour) has another hash: found by its label."""
    folder = run_dir(args.runs, spec, args.data_root)
    if folder.exists():
        return folder
    older = sorted((args.runs / "runs").glob(f"{spec.group}-s{spec.seed}-*"))
    return older[0] if len(older) == 1 else folder


def report(args: argparse.Namespace) -> str:
    lines = [
        "| point | epoch 0 val R@1 | epoch 0 val MAP@R | selected epoch | val R@1 | val MAP@R "
        "| s / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in _specs(args):
        rec = load_run(_folder(args, spec))
        if rec is None:
            lines.append(f"| {spec.group} | not finished | | | | | |")
            continue
        ref = rec.summary["reference"]["metrics"]
        val = rec.metrics("selected", "val")
        times = [r["train/epoch_time_s"] for r in rec.history]
        lines.append(
            f"| {spec.group[5:]} | {ref.get('val/recall@1', math.nan):.4f} | "
            f"{ref.get('val/map@r', math.nan):.4f} | {rec.epoch('selected')} | "
            f"{val['recall@1']:.4f} | {val['map@r']:.4f} | {sum(times) / len(times):.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_loss_variants(out: Path, nir_weights: dict[str, float] | None = None) -> list[Path]:
    """``cars98-partial-{proxynca,softtriple}-{baseline,nir}.yaml`` in ``out``: the partial
    ProxyAnchor presets with the loss replaced (its paper options; the optimizer, data and
    NIR settings unchanged, not tuned for these losses), for the NIR study; ``nir_weights``
    sets ``loss.nir.nir_weight`` of a loss's + NIR file (see ``ratio``)."""
    import yaml

    from nirdml.losses.registry import LOSSES
    from nirdml.training.config import preset_path

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("proxy_nca", "soft_triple"):
        key = LOSSES[name].preset_key
        for kind in ("baseline", "nir"):
            raw = yaml.safe_load(preset_path(f"cars98-partial-proxyanchor-{kind}").read_text())
            raw["name"] = f"cars98-partial-{key}-{kind}"
            raw["description"] = raw["description"].replace("ProxyAnchor", LOSSES[name].title)
            raw["loss"]["name"] = name
            raw["loss"]["params"] = dict(LOSSES[name].paper_params)
            if kind == "nir" and nir_weights and name in nir_weights:
                raw["loss"]["nir"]["nir_weight"] = nir_weights[name]
            path = out / f"{raw['name']}.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            written.append(path)
    return written


RATIO_EPOCHS = 3


def gradient_ratios(args: argparse.Namespace) -> dict[str, float]:
    """The NIR/proxy gradient ratio (the alarm's, geometric mean over ``RATIO_EPOCHS``
    epochs on the tuning seed) of each loss's + NIR preset at its default ``nir_weight``,
    and the weight that gives ProxyNCA and SoftTriple ProxyAnchor's ratio (the ratio is
    linear in the weight: the proxy loss's gradient does not depend on it)."""
    from nirdml.training.config import load_config
    from nirdml.training.trainer import train

    variants = {p.stem: p for p in write_loss_variants(args.out / "configs")}
    presets = {
        "proxy_anchor": "cars98-partial-proxyanchor-nir",
        "proxy_nca": str(variants["cars98-partial-proxynca-nir"]),
        "soft_triple": str(variants["cars98-partial-softtriple-nir"]),
    }
    ratios = {}
    for loss, preset in presets.items():
        sets = [
            f"data.root={args.data_root}",
            f"data.features={Path(args.features) / 'cars98-lite0-224px-stage7'}",
            f"seed={TUNE_SEED}",
            f"epochs={RATIO_EPOCHS}",
            f"eval.every={RATIO_EPOCHS}",
            "eval.metrics=[recall@1]",
            "eval.reference=false",
            "log.progress=false",
        ]
        folder = args.out / f"ratio-{loss}"
        if (folder / "summary.json").is_file():
            history = [
                json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            ]
        else:
            history = train(load_config(preset, sets), folder, progress=False).history
        values = [row["train/nir_grad_ratio"] for row in history]
        ratios[loss] = math.exp(sum(math.log(v) for v in values) / len(values))
        print(f"{loss}: ratio per epoch {[f'{v:.3g}' for v in values]}", flush=True)
    weights = {k: ratios["proxy_anchor"] / v for k, v in ratios.items() if k != "proxy_anchor"}
    result = {"ratios": ratios, "matched_nir_weight": weights, "epochs": RATIO_EPOCHS}
    (args.out / "ratios.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


COMPARED = {"frozen": ("study_frozen", "fr-base"), "partial": ("study_partial", "pa-base")}
"""Arm -> (study folder under --runs, run-folder group) of the preset baselines compared."""
METRICS = ("recall@1", "map@r")


def _baseline_runs(runs: Path, study: str, group: str) -> dict[int, RunRecord]:
    """Finished runs of one study's baseline arm, by seed."""
    found = [load_run(f) for f in sorted((runs / study / "runs").glob(f"{group}-s*"))]
    return by_seed([r for r in found if r is not None and r.spec["group"] == group])


def compare(runs: Path) -> dict[str, Any]:
    """Frozen vs partial preset vs raw features: per-seed test metrics at the validation-
    selected epoch, their summaries, and the paired partial - frozen differences."""
    arms = {arm: _baseline_runs(runs, *where) for arm, where in COMPARED.items()}
    if not all(arms.values()):
        missing = [f"{runs / s / 'runs'}/{g}-s*" for a, (s, g) in COMPARED.items() if not arms[a]]
        raise SystemExit(f"compare: no finished runs in {', '.join(missing)}")
    raw = next(iter(arms["partial"].values())).summary["reference"]["metrics"]
    out: dict[str, Any] = {"arms": {}, "paired": {}}
    out["raw"] = {m: raw[f"test/{m}"] for m in METRICS}
    for arm, recs in arms.items():
        seeds = sorted(recs)
        row: dict[str, Any] = {"seeds": seeds, "epochs": [recs[s].epoch("selected") for s in seeds]}
        for m in METRICS:
            row[m] = [recs[s].metrics("selected")[m] for s in seeds]
            row[f"{m}_above_raw"] = sum(v > out["raw"][m] for v in row[m])
        out["arms"][arm] = row
    out["paired_seeds"] = sorted(set(arms["partial"]) & set(arms["frozen"]))
    if len(out["paired_seeds"]) >= 2:
        for m in METRICS:
            partial, frozen = (
                [
                    out["arms"][arm][m][out["arms"][arm]["seeds"].index(s)]
                    for s in out["paired_seeds"]
                ]
                for arm in ("partial", "frozen")
            )
            out["paired"][m] = asdict(paired_test(partial, frozen))
    return out


def compare_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table and the paired lines."""
    lines = [
        "| embedding | seeds | test R@1 | above raw | test MAP@R | above raw | selected epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in result["arms"].items():
        n = len(row["seeds"])
        (r_m, r_s), (m_m, m_s) = mean_std(row["recall@1"]), mean_std(row["map@r"])
        lines.append(
            f"| {arm} preset | {n} | {r_m:.4f} ± {r_s:.4f} | {row['recall@1_above_raw']}/{n} | "
            f"{m_m:.4f} ± {m_s:.4f} | {row['map@r_above_raw']}/{n} | "
            f"{', '.join(map(str, row['epochs']))} |"
        )
    raw = result["raw"]
    lines.append(
        f"| raw pooled features (epoch 0) | | {raw['recall@1']:.4f} | | {raw['map@r']:.4f} | | |"
    )
    lines += ["", f"Paired by seed ({len(result['paired_seeds'])} seeds):", ""]
    for m, res in result["paired"].items():
        lines.append(
            f"- partial - frozen {m}: {res['mean']:+.4f} [{res['ci_low']:+.4f}, "
            f"{res['ci_high']:+.4f}] p={res['t_p']:.3g} (Wilcoxon {res['wilcoxon_p']:.3g}) "
            f"wins {res['wins']}/{res['n']}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "command",
        choices=("tune", "report", "losses", "ablate", "ablation-report", "ratio", "compare"),
    )
    parser.add_argument(
        "--nir-weight", action="append", default=[], metavar="LOSS=W", help="losses: weight"
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--features", default=None, help="folder of the feature caches")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "cars98_partial")
    parser.add_argument(
        "--shard", default=(0, 1), type=grid.shard_arg, help="I/N: every N-th run from I (0-based)"
    )
    parser.add_argument("--match", default="", help="only the points whose label has this")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="compare: also write this")
    args = parser.parse_args(argv)
    if args.command == "compare":
        result = compare(args.runs)
        text = compare_markdown(result)
        print(text)
        if args.out is not None:
            atomic_write_text(args.out, text)
        if args.json is not None:
            atomic_write_json(args.json, result)
        return 0
    if args.command == "losses":
        weights = {k: float(v) for k, v in (item.split("=") for item in args.nir_weight)}
        for path in write_loss_variants(args.out or Path("cars98_partial_losses"), weights):
            print(path)
        return 0
    if args.data_root is None or args.features is None:
        parser.error(f"{args.command} needs --data-root and --features")
    if args.command == "ratio":
        if args.out is None:
            parser.error("ratio needs --out DIR")
        print(json.dumps(gradient_ratios(args), indent=1))
        return 0
    if args.command == "ablate":
        index, count = args.shard
        specs = grid.shard([s for _, s in _ablation_specs(args)], args.data_root, index, count)
        run_specs(specs, args.runs, args.data_root)
        return 0
    if args.command == "ablation-report":
        print(ablation_report(args))
        return 0
    if args.command == "tune":
        index, count = args.shard
        specs = [s for s in _specs(args) if args.match in s.group]
        specs = grid.shard(specs, args.data_root, index, count)
        run_specs(specs, args.runs, args.data_root)
        return 0
    text = report(args)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
