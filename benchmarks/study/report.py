"""Build ``benchmarks/results/omniglot.md`` and its PNGs from the finished run folders.

Numbers come only from the runs' own outputs (``summary.json``, ``metrics.jsonl``); runs
that are not finished are listed as missing, never guessed. The hand-written analysis
(``benchmarks/study/findings.md``) is inserted verbatim under "Findings".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from machine import cpu_name  # benchmarks/machine.py
from nirdml.runtime import atomic_write, atomic_write_text
from study import grid
from study.collect import RunRecord, by_seed, load_run, values
from study.runner import run_dir
from study.stats import holm, mean_std, paired_test

FINDINGS = Path(__file__).resolve().parent / "findings.md"

TABLE_METRICS = (
    ("recall@1", "R@1"),
    ("recall@2", "R@2"),
    ("recall@4", "R@4"),
    ("recall@8", "R@8"),
    ("map@r", "MAP@R"),
    ("nmi", "NMI"),
    ("rho_spectrum", "rho"),
    ("pi_ratio", "pi ratio"),
    ("uniformity_g2", "G2"),
)
PAIRED_METRICS = (("recall@1", "R@1"), ("map@r", "MAP@R"), ("nmi", "NMI"))
READING_TITLES = {
    "selected": "epoch selected on validation R@1",
    "best_test": "best test epoch (the paper's protocol; selects on test)",
    "final": "last epoch",
}


def _records(specs: Sequence[grid.RunSpec], runs_root: Path, data_root: str) -> dict:
    """``{group: [RunRecord...]}`` of finished runs, plus the list of missing run ids."""
    out: dict[str, list[RunRecord]] = {}
    missing: list[str] = []
    for spec in specs:
        record = load_run(run_dir(runs_root, spec, data_root))
        if record is None:
            missing.append(spec.run_id(data_root))
            continue
        out.setdefault(spec.group, []).append(record)
    return {"groups": out, "missing": missing}


def _fmt(mean: float, std: float, digits: int = 3, scale: float = 1.0) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _knobs(record: RunRecord) -> dict[str, Any]:
    c = record.config
    nir = c["loss"]["nir"]
    out = {"lr": c["optim"]["lr"], "proxy_lr_mult": c["optim"]["proxy_lr_mult"]}
    if nir["enabled"]:
        out["objective"] = nir["objective"]
        out["weight"] = nir["proxy_weight"] if nir["objective"] == "exp_nll" else nir["nir_weight"]
        out["flow_lr_mult"] = c["optim"]["flow_lr_mult"]
        out["warmup"] = c["optim"]["warmup_epochs"]
    return out


# ----------------------------------------------------------------------------- sections


def _tuning_section(title: str, groups: dict[str, list[RunRecord]], chosen: set[str]) -> str:
    rows = []
    for group, recs in groups.items():
        r = recs[0]
        knobs = _knobs(r)
        budget = r.history[grid.BUDGET_EPOCHS - 1] if len(r.history) >= grid.BUDGET_EPOCHS else {}
        rows.append(
            [
                group + (" **(chosen)**" if group in chosen else ""),
                r.config["loss"]["name"],
                ", ".join(
                    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items()
                ),
                f"{budget.get('val/recall@1', math.nan):.4f}",
                f"{budget.get('val/map@r', math.nan):.4f}",
                f"{r.metrics('selected', 'val')['recall@1']:.4f}",
                str(r.epoch("selected")),
                f"{np.mean([h.get('train/epoch_time_s', math.nan) for h in r.history]):.0f}",
            ]
        )
    e = grid.BUDGET_EPOCHS
    return f"### {title}\n\n" + _table(
        [
            "run",
            "loss",
            "knobs",
            f"val R@1, epoch {e}",
            f"val MAP@R, epoch {e}",
            "best val R@1 (5 epochs)",
            "at epoch",
            "s/epoch",
        ],
        rows,
    )


def _main_table(groups: dict[str, list[RunRecord]], reading: str) -> str:
    rows = []
    for loss, label in grid.LOSS_LABELS.items():
        for variant, suffix in (("base", ""), ("nir", " + NIR")):
            recs = groups.get(grid.main_group(loss, variant), [])
            if not recs:
                continue
            cells = [label + suffix, str(len(recs))]
            for metric, _ in TABLE_METRICS:
                m, s = mean_std(values(recs, reading, metric))
                cells.append(_fmt(m, s, 3 if metric != "uniformity_g2" else 4))
            e = [r.epoch(reading) for r in recs]
            cells.append(f"{np.mean(e):.1f}")
            rows.append(cells)
    header = ["configuration", "seeds", *[name for _, name in TABLE_METRICS], "epoch"]
    return _table(header, rows)


def _paired_rows(groups: dict[str, list[RunRecord]]) -> tuple[list[list[str]], list[dict]]:
    rows, raw = [], []
    for reading in ("selected", "best_test", "final"):
        for loss, label in grid.LOSS_LABELS.items():
            base = by_seed(groups.get(grid.main_group(loss, "base"), []))
            nir = by_seed(groups.get(grid.main_group(loss, "nir"), []))
            seeds = sorted(set(base) & set(nir))
            if len(seeds) < 2:
                continue
            cells = [READING_TITLES[reading].split(" (")[0], label, str(len(seeds))]
            for metric, _ in PAIRED_METRICS:
                a = [nir[s].metrics(reading).get(metric, math.nan) for s in seeds]
                b = [base[s].metrics(reading).get(metric, math.nan) for s in seeds]
                res = paired_test(a, b)
                raw.append({"reading": reading, "loss": loss, "metric": metric, "res": res})
                if metric == "recall@1":
                    cells += [
                        f"{_signed(res.mean, 4)} ± {res.std:.4f}",
                        f"[{_signed(res.ci_low, 4)}, {_signed(res.ci_high, 4)}]",
                        _p(res.t_p),
                        _p(res.wilcoxon_p),
                        f"{res.cohen_dz:+.2f}",
                        f"{res.wins}/{res.n}",
                    ]
                else:
                    cells.append(f"{_signed(res.mean, 4)} (p={_p(res.t_p)})")
            rows.append(cells)
    return rows, raw


def _per_epoch_delta(groups: dict[str, list[RunRecord]], split: str = "test") -> str:
    """Paired Δ R@1 (+ NIR minus baseline) after every epoch: does NIR converge faster?"""
    rows, width = [], 0
    for loss, label in grid.LOSS_LABELS.items():
        base = by_seed(groups.get(grid.main_group(loss, "base"), []))
        nir = by_seed(groups.get(grid.main_group(loss, "nir"), []))
        seeds = sorted(set(base) & set(nir))
        if len(seeds) < 2:
            continue
        a = np.array([nir[s].curve(f"{split}/recall@1") for s in seeds])
        b = np.array([base[s].curve(f"{split}/recall@1") for s in seeds])
        cells = [label, str(len(seeds))]
        for e in range(a.shape[1]):
            res = paired_test(a[:, e], b[:, e])
            cells.append(f"{_signed(res.mean, 4)} (p={_p(res.t_p)})")
        width = max(width, a.shape[1])
        # Epochs NIR needs to reach the baseline's best R@1 of the same seed.
        reach = []
        for i in range(len(seeds)):
            hit = np.nonzero(a[i] >= np.nanmax(b[i]))[0]
            reach.append(str(hit[0] + 1) if hit.size else "-")
        cells.append(" ".join(reach))
        rows.append(cells)
    header = ["loss", "n", *[f"epoch {e + 1}" for e in range(width)]]
    header.append("epoch + NIR reaches the baseline's best (per seed; - = never)")
    return _table(header, rows)


def _curves_png(groups: dict[str, list[RunRecord]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for col, (loss, label) in enumerate(grid.LOSS_LABELS.items()):
        for row, split in enumerate(("test", "val")):
            ax = axes[row, col]
            for variant, color, name in (("base", "C0", "baseline"), ("nir", "C3", "+ NIR")):
                recs = groups.get(grid.main_group(loss, variant), [])
                if not recs:
                    continue
                curves = np.array([r.curve(f"{split}/recall@1") for r in recs])
                epochs = np.arange(1, curves.shape[1] + 1)
                m, s = np.nanmean(curves, 0), np.nanstd(curves, 0, ddof=1) if len(recs) > 1 else 0
                ax.plot(epochs, m, "-o", color=color, label=f"{name} (n={len(recs)})", ms=3)
                ax.fill_between(epochs, m - s, m + s, color=color, alpha=0.2)
            ax.set_title(
                f"{label}: {split} R@1 ("
                + ("659 unseen" if split == "test" else "96 held-out")
                + " classes)"
            )
            ax.set_xlabel("epoch")
            ax.set_ylabel("R@1")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(loc="lower right")
    fig.suptitle("Omniglot zero-shot, R@1 per epoch: mean ± std over seeds")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _sweep_section(groups: dict[str, list[RunRecord]], base_groups: dict, png: Path) -> str:
    """Sweep rows (objective x weight), paired against the baseline at the same seeds."""
    base = {}
    for g in base_groups.values():
        for r in g:
            base[r.seed] = r
    rows, points = [], []
    for group, recs in groups.items():
        k = _knobs(recs[0])
        seeds = sorted(r.seed for r in recs)
        val_m, val_s = mean_std(values(recs, "selected", "recall@1", "val"))
        test_m, test_s = mean_std(values(recs, "selected", "recall@1"))
        bt_m, bt_s = mean_std(values(recs, "best_test", "recall@1"))
        pi_m, pi_s = mean_std(values(recs, "selected", "pi_ratio"))
        paired = [s for s in seeds if s in base]
        if len(paired) >= 2 and group not in base_groups:
            mine = by_seed(recs)
            res = paired_test(
                [mine[s].metrics("selected")["recall@1"] for s in paired],
                [base[s].metrics("selected")["recall@1"] for s in paired],
            )
            delta = f"{_signed(res.mean, 4)} (p={_p(res.t_p)}, {res.wins}/{res.n})"
        else:
            delta = "n/a"
        nll = np.mean([r.history[-1].get("train/nll", math.nan) for r in recs])
        rows.append(
            [
                group,
                str(k.get("objective", "baseline")),
                f"{k['weight']:g}" if "weight" in k else "",
                ",".join(str(s) for s in seeds),
                _fmt(val_m, val_s, 4),
                _fmt(test_m, test_s, 4),
                delta,
                _fmt(bt_m, bt_s, 4),
                _fmt(pi_m, pi_s, 3),
                f"{nll:.1f}" if not math.isnan(nll) else "",
            ]
        )
        if "weight" in k:
            points.append((k["objective"], k["weight"], test_m, test_s, val_m, val_s))
    table = _table(
        [
            "run",
            "objective",
            "weight",
            "seeds",
            "val R@1 (selected)",
            "test R@1 (selected)",
            "Δ test R@1 vs baseline",
            "test R@1 (best test epoch)",
            "test pi ratio",
            "final train NLL",
        ],
        rows,
    )
    _sweep_png(points, base, png)
    return table


def _knob_text(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('__', '.')}={v:g}" for k, v in knobs.items()) or "as main"


def _probe_section(probes: dict[str, list[RunRecord]], main: dict[str, list[RunRecord]]) -> str:
    """Per (loss, seeds): the main setting and each probe, baseline vs + NIR, paired."""
    rows = []
    for probe, loss, seeds in grid.PROBE_RUNS:
        settings = [
            (
                "main study (no warmup)",
                main.get(grid.main_group(loss, "base"), []),
                main.get(grid.main_group(loss, "nir"), []),
            ),
            (
                f"`{probe}`: " + _knob_text(grid.PROBES[probe][1]),
                probes.get(grid.probe_group(probe, loss, "base"), []),
                probes.get(grid.probe_group(probe, loss, "nir"), []),
            ),
        ]
        for label, base_recs, nir_recs in settings:
            base, nir = by_seed(base_recs), by_seed(nir_recs)
            paired = [s for s in seeds if s in base and s in nir]
            cells = [grid.LOSS_LABELS[loss], label, ",".join(map(str, paired)) or "none"]
            if not paired:
                rows.append(cells + ["n/a"] * 5)
                continue
            b = [base[s].metrics("selected")["recall@1"] for s in paired]
            n = [nir[s].metrics("selected")["recall@1"] for s in paired]
            bt = [
                nir[s].metrics("best_test")["recall@1"] - base[s].metrics("best_test")["recall@1"]
                for s in paired
            ]
            if len(paired) >= 2:
                res = paired_test(n, b)
                delta = (
                    f"{_signed(res.mean, 4)} ± {res.std:.4f} "
                    f"(p={_p(res.t_p)}, {res.wins}/{res.n} wins)"
                )
            else:
                delta = _signed(n[0] - b[0], 4)
            rows.append(
                cells
                + [
                    _fmt(*mean_std(b), 4),
                    _fmt(*mean_std(n), 4),
                    delta,
                    ", ".join(_signed(y - x, 3) for x, y in zip(b, n, strict=True)),
                    _fmt(*mean_std(bt), 4),
                ]
            )
    return _table(
        [
            "loss",
            "setting (baseline and + NIR alike)",
            "seeds",
            "baseline test R@1",
            "+ NIR test R@1",
            "Δ (mean ± std, t-test p, wins)",
            "Δ per seed",
            "Δ at the best test epoch",
        ],
        rows,
    )


def _sweep_png(points: list[tuple], base: dict[int, RunRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, split, idx in ((axes[0], "test", 2), (axes[1], "val", 4)):
        for obj, color, name in (
            ("exp_nll", "C3", "exp_nll: weight = proxy_weight (on L_proxy)"),
            ("nll", "C2", "nll: weight = nir_weight (on mean NLL)"),
        ):
            pts = sorted(p for p in points if p[0] == obj)
            if pts:
                w = [p[1] for p in pts]
                m = np.array([p[idx] for p in pts])
                s = np.array([p[idx + 1] for p in pts])
                ax.errorbar(w, m, yerr=s, fmt="-o", color=color, label=name, capsize=3, ms=4)
        if base:
            b = [r.metrics("selected", split)["recall@1"] for r in base.values()]
            bm, bs = mean_std(b)
            ax.axhspan(bm - bs, bm + bs, color="C0", alpha=0.15)
            ax.axhline(bm, color="C0", label=f"ProxyAnchor baseline (n={len(b)})")
        ax.set_xscale("log")
        ax.set_xlabel("weight")
        ax.set_ylabel(f"{split} R@1 at the val-selected epoch")
        ax.set_title(f"ProxyAnchor + NIR sweep: {split} R@1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _diagnostics(groups: dict[str, list[RunRecord]]) -> str:
    """NIR training internals per configuration: NLL per epoch, capped and skipped steps."""
    rows = []
    for group, recs in groups.items():
        if not recs[0].config["loss"]["nir"]["enabled"]:
            continue
        nll = np.nanmean([r.curve("train/nll") for r in recs], axis=0)
        nir = np.nanmean([r.curve("train/nir") for r in recs], axis=0)
        proxy = np.nanmean([r.curve("train/proxy_loss") for r in recs], axis=0)
        capped = sum(int(sum(r.curve("train/capped"))) for r in recs)
        skipped = sum(int(r.summary.get("skipped_steps", 0)) for r in recs)
        rows.append(
            [
                group,
                " / ".join(f"{v:.1f}" for v in nll),
                " / ".join(f"{v:.2g}" for v in nir),
                " / ".join(f"{v:.2f}" for v in proxy),
                str(capped),
                str(skipped),
            ]
        )
    return _table(
        [
            "configuration",
            "train NLL per epoch",
            "NIR term per epoch",
            "proxy loss per epoch",
            "capped samples",
            "skipped steps",
        ],
        rows,
    )


def _baseline_proxy_rows(groups: dict[str, list[RunRecord]]) -> str:
    rows = []
    for loss, label in grid.LOSS_LABELS.items():
        recs = groups.get(grid.main_group(loss, "base"), [])
        if recs:
            proxy = np.nanmean([r.curve("train/proxy_loss") for r in recs], axis=0)
            rows.append([label, " / ".join(f"{v:.2f}" for v in proxy)])
    return _table(["baseline", "proxy loss per epoch"], rows)


# ----------------------------------------------------------------------------- the file


def write_report(runs_root: Path, data_root: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {name: _records(grid.specs_of(name), runs_root, data_root) for name in grid.PARTS}
    main = parts["main"]["groups"]
    lines: list[str] = []
    add = lines.append

    add("# Omniglot zero-shot evidence study: does NIR improve proxy-based DML?\n")
    add(
        "Generated by `benchmarks/omniglot_study.py report` from the run folders; every "
        "number below is read from a run's `summary.json` / `metrics.jsonl`.\n"
    )
    add("## Findings\n")
    add(FINDINGS.read_text().strip() + "\n" if FINDINGS.is_file() else "(not written yet)\n")

    add("## Protocol\n")
    add(grid.PROTOCOL_TEXT.strip() + "\n")
    add(
        f"Machine: {cpu_name()}, 1 thread per run (`OMP_NUM_THREADS=1`), one run at a time, "
        "CPU only, shared with other jobs (epoch times below vary with their load).\n"
    )

    add("## Main study: baseline vs + NIR\n")
    for reading in ("selected", "best_test"):
        add(f"### Test metrics at the {READING_TITLES[reading]}\n")
        add(
            "Mean ± std over seeds. rho: spectral decay; pi ratio: intra/inter class distance; "
            "G2: uniformity (lower = more uniform).\n"
        )
        add(_main_table(main, reading) + "\n")
    add("### Paired difference (+ NIR minus baseline, same seed)\n")
    prow, raw = _paired_rows(main)
    add(
        "Per seed, the NIR run and its baseline share init, proxies, batches, augmentation and "
        "validation split. 95% CI of the mean difference (t, n-1 dof); p-values: two-sided "
        "paired t-test and exact Wilcoxon signed-rank (with n seeds its smallest possible "
        f"p is 2 / 2^n = {2 / 2 ** len(grid.MAIN_SEEDS):.4g} for n = {len(grid.MAIN_SEEDS)}); "
        "d_z = mean / std of the differences; wins = seeds where NIR is higher.\n"
    )
    add(
        _table(
            [
                "reading",
                "loss",
                "n",
                "Δ R@1 (mean ± std)",
                "95% CI",
                "t-test p",
                "Wilcoxon p",
                "d_z",
                "wins",
                "Δ MAP@R",
                "Δ NMI",
            ],
            prow,
        )
        + "\n"
    )
    primary = [r for r in raw if r["reading"] == "selected" and r["metric"] == "recall@1"]
    if primary:
        adj = holm([r["res"].t_p for r in primary])
        add(
            "Holm-adjusted t-test p for the three primary comparisons (R@1, val-selected): "
            + ", ".join(
                f"{grid.LOSS_LABELS[r['loss']]} {_p(a)}" for r, a in zip(primary, adj, strict=True)
            )
            + ".\n"
        )
    add("### Paired Δ test R@1 after each epoch (convergence)\n")
    add(_per_epoch_delta(main) + "\n")
    _curves_png(main, out_dir / "omniglot_curves.png")
    add("### R@1 per epoch\n")
    add("![R@1 per epoch](omniglot_curves.png)\n")

    add("## Sweep: NIR weight and objective (ProxyAnchor)\n")
    add(grid.SWEEP_TEXT.strip() + "\n")
    sweep_groups = {g: r for g, r in parts["sweep"]["groups"].items() if not g.startswith("probe-")}
    probe_groups = {g: r for g, r in parts["sweep"]["groups"].items() if g.startswith("probe-")}
    base_groups = {
        g: r for g, r in sweep_groups.items() if not r[0].config["loss"]["nir"]["enabled"]
    }
    nir_groups = {g: r for g, r in sweep_groups.items() if r[0].config["loss"]["nir"]["enabled"]}
    add(
        _sweep_section({**base_groups, **nir_groups}, base_groups, out_dir / "omniglot_sweep.png")
        + "\n"
    )
    add("![sweep](omniglot_sweep.png)\n")

    add("## Probes: the comparison with a backbone warmup (all three losses)\n")
    add(grid.PROBE_TEXT.strip() + "\n")
    add(_probe_section(probe_groups, main) + "\n")

    flow_md = out_dir / "omniglot_flow.md"
    add("## Flow samples around training-class proxies\n")
    if flow_md.is_file():
        add(flow_md.read_text().strip() + "\n")
    else:
        add("(run `python benchmarks/omniglot_study.py flow` first)\n")

    add("## Why: where the NIR gradient goes\n")
    diag_md = out_dir / "omniglot_diagnostics.md"
    if diag_md.is_file():
        add(grid.DIAGNOSIS_TEXT.strip() + "\n")
        add(diag_md.read_text().strip() + "\n")
    adam_md = out_dir / "omniglot_adam.md"
    if adam_md.is_file():
        add(grid.ADAM_TEXT.strip() + "\n")
        add(adam_md.read_text().strip() + "\n")
    else:
        add("(run `python benchmarks/omniglot_study.py diagnose` first)\n")

    add("## Training internals\n")
    add(
        "Means over seeds, per epoch. NLL = mean per-sample negative log-likelihood under the "
        "flow (no constant); NIR term = mean exp(NLL) (exp_nll) or mean NLL (nll).\n"
    )
    all_groups = {**sweep_groups, **main}
    add(_diagnostics(all_groups) + "\n")
    add(_baseline_proxy_rows(main) + "\n")

    add("## Tuning (validation split only, tuning seed)\n")
    add(grid.TUNING_TEXT.strip() + "\n")
    add(_tuning_section("Baselines", parts["tune-base"]["groups"], grid.chosen_groups()) + "\n")

    add("## Rerun\n")
    add(grid.RERUN_TEXT.strip() + "\n")
    missing = sorted({m for p in parts.values() for m in p["missing"]})
    if missing:
        add(
            f"Runs not finished when this file was written ({len(missing)}): "
            + ", ".join(f"`{m}`" for m in missing)
            + "\n"
        )
    path = out_dir / "omniglot.md"
    atomic_write_text(path, "\n".join(lines))
    return path
