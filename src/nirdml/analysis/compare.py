"""``compare_runs``: several training runs side by side (e.g. baseline vs + NIR over seeds).

Runs whose configs agree on everything that changes the result (all but the seed, the
name, paths, devices, workers and logging) form one group; each group gets one table row
with mean +- std over its runs and one curve (mean per epoch, +- std band, each run thin).
Each run's selected epoch is found exactly as training selected it: the first epoch with
the highest ``eval.select_metric`` on the validation split when the run had one, else on
the test split; the table reports that epoch's test metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.analysis import html as H
from nirdml.analysis import plots
from nirdml.analysis._json import json_safe
from nirdml.errors import InputError, MissingFileError
from nirdml.runtime import atomic_write, atomic_write_json, atomic_write_text

IGNORED_KEYS = (
    "name",
    "description",
    "seed",
    "device",
    "compile",
    "data.root",
    "data.num_workers",
    "data.cache",
    "data.download",
    "eval.batch_size",
    "log",
)
"""Config fields that do not change what a run learns: runs differing only here are one
group (seeds of the same experiment)."""


@dataclass
class RunRecord:
    """One run folder: its config (flat ``a.b`` keys), per-epoch history and selection."""

    path: Path
    name: str
    seed: int
    config: dict[str, Any]
    history: list[dict[str, Any]]
    select_metric: str
    selected_on: str
    best_epoch: int | None
    best: dict[str, float]


@dataclass
class Group:
    """Runs of one experiment (same config up to ``IGNORED_KEYS``)."""

    label: str
    runs: list[RunRecord] = field(default_factory=list)


@dataclass
class Comparison:
    """What :func:`compare_runs` found: the groups, the table (Markdown) and written files."""

    groups: list[Group]
    metrics: list[str]
    table: str
    rows: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "options" and k != "params":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ignored(key: str) -> bool:
    return any(key == i or key.startswith(i + ".") for i in IGNORED_KEYS)


def read_run(path: str | Path) -> RunRecord:
    """Read a run folder written by ``nirdml train`` (config.yaml + metrics.jsonl)."""
    from nirdml.training import selection
    from nirdml.training.config import load_config

    p = Path(path)
    cfg_file, hist_file = p / "config.yaml", p / "metrics.jsonl"
    if not p.is_dir() or not cfg_file.is_file() or not hist_file.is_file():
        raise MissingFileError(
            f"{p} is not a run folder (it needs config.yaml and metrics.jsonl, as `nirdml "
            "train` writes them); pass the folders given by --out"
        )
    cfg = load_config(cfg_file)
    history = [json.loads(line) for line in hist_file.read_text().splitlines() if line.strip()]
    select = cfg.eval.select_metric
    has_val = any(f"val/{select}" in r for r in history)
    split = "val" if has_val else "test"
    best_row = selection.best_row(history, split, select)  # the epoch training kept
    best = (
        {k.split("/", 1)[1]: float(v) for k, v in best_row.items() if k.startswith("test/")}
        if best_row
        else {}
    )
    return RunRecord(
        path=p,
        name=cfg.name,
        seed=cfg.seed,
        config=_flatten(cfg.to_dict()),
        history=history,
        select_metric=select,
        selected_on=split,
        best_epoch=int(best_row["epoch"]) if best_row else None,
        best=best,
    )


def group_runs(runs: list[RunRecord]) -> list[Group]:
    """Group runs by their config without ``IGNORED_KEYS``; label groups by config name,
    adding the differing settings where two groups share a name."""
    groups: dict[str, Group] = {}
    keys: dict[str, dict[str, Any]] = {}
    for r in runs:
        relevant = {k: v for k, v in r.config.items() if not _ignored(k)}
        sig = json.dumps(relevant, sort_keys=True, default=str)
        if sig not in groups:
            groups[sig] = Group(label=r.name)
            keys[sig] = relevant
        groups[sig].runs.append(r)
    by_name: dict[str, list[str]] = {}
    for sig, g in groups.items():
        by_name.setdefault(g.label, []).append(sig)
    for sigs in by_name.values():
        if len(sigs) < 2:
            continue
        all_keys = sorted(set().union(*(keys[s] for s in sigs)))
        differing = [
            k for k in all_keys if len({json.dumps(keys[s].get(k), default=str) for s in sigs}) > 1
        ]
        for s in sigs:
            extra = ", ".join(f"{k}={keys[s].get(k)}" for k in differing[:3])
            groups[s].label = f"{groups[s].label} [{extra}]"
    return list(groups.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _cell(mean: float, std: float, pm: str = "+-") -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} {pm} {std:.4f}"


def _epoch_cell(mean: float, std: float, pm: str = "+-") -> str:
    """The best epoch cell: "-" when unknown, whole with one run, else mean +- std."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.0f}" if math.isnan(std) else f"{mean:.1f} {pm} {std:.1f}"


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path | None = None,
    *,
    metric: str | None = None,
    split: str = "test",
) -> Comparison:
    """Compare run folders: one table (mean +- sample std over each group's runs) and the
    curves of ``split``/``metric`` per epoch (default metric: the runs' select metric).

    With ``out_dir``, writes ``compare.md``, ``compare.json``, ``compare.png`` and
    ``compare.html`` (the PNG embedded) there.
    """
    if not run_dirs:
        raise InputError("pass at least one run folder")
    if split not in ("test", "val"):
        raise InputError(f"split must be test or val, got {split!r}")
    runs = _read_runs(run_dirs)
    metric = metric or runs[0].select_metric
    groups = group_runs(runs)
    metrics = _metric_union(runs)
    rows = [_group_row(g, metrics) for g in groups]
    table = _markdown(rows, metrics)
    curves = [_curve(g, f"{split}/{metric}") for g in groups]
    comparison = Comparison(groups, metrics, table, rows)
    if out_dir is not None:
        _write_comparison(comparison, curves, Path(out_dir), metric, split)
    return comparison


def _read_runs(run_dirs: list[str | Path]) -> list[RunRecord]:
    """Every run folder read, refusing one given twice (same folder after resolving)."""
    runs = [read_run(p) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for r in runs:
        rp = r.path.resolve()
        if rp in seen:
            raise InputError(f"{r.path} is given twice; pass each run folder once")
        seen[rp] = r.path
    return runs


def _metric_union(runs: list[RunRecord]) -> list[str]:
    """The selected-epoch test metrics of all runs, in order of first appearance."""
    metrics: list[str] = []
    for r in runs:
        metrics += [m for m in r.best if m not in metrics]
    return metrics


def _group_row(g: Group, metrics: list[str]) -> dict[str, Any]:
    """A group's row: runs, seeds, (mean, std) of best epoch and metrics (nan: a run lacks it)."""
    missing = (float("nan"), float("nan"))
    best_epochs = [r.best_epoch for r in g.runs if r.best_epoch is not None]
    row: dict[str, Any] = {
        "group": g.label,
        "runs": len(g.runs),
        "seeds": [r.seed for r in g.runs],
        "selected_on": sorted({r.selected_on for r in g.runs}),
        "best_epoch": _mean_std(best_epochs) if best_epochs else missing,
        "epochs": max(len(r.history) for r in g.runs),
    }
    for m in metrics:
        vals = [r.best[m] for r in g.runs if m in r.best]
        row[m] = _mean_std(vals) if len(vals) == len(g.runs) else missing
    return row


def _write_comparison(
    comparison: Comparison, curves: list[plots.Curve], out: Path, metric: str, split: str
) -> None:
    """Write compare.png, .md, .json and .html into ``out``; record them in ``files``."""
    png = plots.curves_plot(curves, f"{split} {metric}", f"{split} {metric} per epoch")
    files = comparison.files
    files["compare.png"] = atomic_write(out / "compare.png", lambda f: f.write(png))
    files["compare.md"] = atomic_write_text(out / "compare.md", comparison.table + "\n")
    files["compare.json"] = atomic_write_json(
        out / "compare.json", json_safe(_comparison_json(comparison, curves, metric, split))
    )
    files["compare.html"] = atomic_write_text(
        out / "compare.html",
        _html(comparison.rows, comparison.metrics, png, metric, split, comparison.groups),
    )


def _comparison_json(
    comparison: Comparison, curves: list[plots.Curve], metric: str, split: str
) -> dict[str, Any]:
    """compare.json's content: per group its row ((mean, std) as a dict), folders, curve."""
    return {
        "metric": metric,
        "split": split,
        "groups": [
            {
                **{
                    k: ({"mean": v[0], "std": v[1]} if isinstance(v, tuple) else v)
                    for k, v in row.items()
                },
                "run_dirs": [str(r.path) for r in g.runs],
                "curve": {
                    "epochs": c.epochs.tolist(),
                    "values": c.values,
                },
            }
            for row, g, c in zip(comparison.rows, comparison.groups, curves, strict=True)
        ],
    }


def _curve(g: Group, key: str) -> plots.Curve:
    epochs = sorted({int(r["epoch"]) for run in g.runs for r in run.history if key in r})
    values = np.full((len(g.runs), len(epochs)), np.nan)
    pos = {e: i for i, e in enumerate(epochs)}
    for i, run in enumerate(g.runs):
        for r in run.history:
            if key in r:
                values[i, pos[int(r["epoch"])]] = float(r[key])
    return plots.Curve(g.label, np.asarray(epochs), values)


def _markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    head = ["run group", "runs", "best epoch"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        be = _epoch_cell(*row["best_epoch"])
        cells = [row["group"], _runs_cell(row), be] + [_cell(*row[m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [n for n in map(_seed_note, rows) if n]
    return "\n".join(lines + ([""] + notes if notes else []))


def _runs_cell(row: dict[str, Any]) -> str:
    """The number of runs, with the number of seeds when runs share one."""
    seeds = len(set(row["seeds"]))
    if seeds == row["runs"]:
        return str(row["runs"])
    return f"{row['runs']} ({seeds} seed{'s' if seeds > 1 else ''})"


def _seed_note(row: dict[str, Any]) -> str | None:
    """What the spread of a group whose runs share seeds means (None: every seed differs)."""
    seeds = len(set(row["seeds"]))
    if seeds == row["runs"]:
        return None
    return (
        f"{row['group']}: {row['runs']} runs, {seeds} seed{'s' if seeds > 1 else ''}: runs "
        "share a seed, so the spread is not seed variance (only what the grouping ignores "
        "differs: threads, workers, device); run other seeds (--set seed=N) to measure it"
    )


def _html(rows, metrics, png, metric, split, groups) -> str:
    body = ["<h1>nirdml run comparison</h1>"]
    body.append(
        '<p class="meta">Test metrics at each run\'s selected epoch (its best '
        "select metric on val when it had a validation split, else on test), mean +- "
        "sample std over the runs of each group. Runs are grouped when their configs agree "
        "on everything but seed, name, paths, devices, workers and logging.</p>"
    )
    head = ["run group", "runs", "best epoch"] + metrics
    trs = []
    for row in rows:
        cells = [
            f'<td class="l">{H.esc(row["group"])}</td>',
            f"<td>{H.esc(_runs_cell(row))}</td>",
            f"<td>{_epoch_cell(*row['best_epoch'], '&plusmn;')}</td>",
        ]
        cells += [f"<td>{_cell(*row[m], '&plusmn;')}</td>" for m in metrics]
        trs.append("<tr>" + "".join(cells) + "</tr>")
    ths = "".join(
        f'<th class="{"l" if i == 0 else ""}">{H.esc(h)}</th>' for i, h in enumerate(head)
    )
    body.append(f"<table><thead><tr>{ths}</tr></thead><tbody>{''.join(trs)}</tbody></table>")
    body += [f'<p class="meta">{H.esc(n)}</p>' for n in map(_seed_note, rows) if n]
    body.append(
        H.figure(
            "compare.png",
            png,
            f"{H.esc(split)} {H.esc(metric)} per epoch: mean "
            "(thick), +- std band and each run (thin).",
            "curves",
        )
    )
    body.append("<h2>Runs</h2><ul>")
    for g in groups:
        for r in g.runs:
            body.append(f"<li>{H.esc(g.label)}: seed {r.seed}, <code>{H.esc(r.path)}</code></li>")
    body.append("</ul>")
    return H.page("nirdml run comparison", "\n".join(body))
