"""The embedded default job: ProxyAnchor vs ProxyAnchor + NIR on sklearn digits, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nirdml.training.config import load_config
from nirdml.training.trainer import RunResult, default_out_dir, train

DEFAULT_PRESETS = ("digits", "digits-nir")


def compare_table(results: Sequence[RunResult], metrics: Sequence[str] | None = None) -> str:
    """A Markdown table of each run's TEST metrics at its selected epoch (and the split that
    selected it)."""
    rows = []
    for result in results:
        best = result.summary.get("best") or {}
        values = {
            k.split("/", 1)[1]: v
            for k, v in best.get("metrics", {}).items()
            if k.startswith("test/")
        }
        rows.append((result.summary["name"], best.get("epoch"), best.get("selected_on"), values))
    if metrics is None:
        metrics = [m for m in rows[0][3]] if rows else []
    header = "| run | epoch | selected on | " + " | ".join(f"test {m}" for m in metrics) + " |"
    sep = "|---|---|---|" + "---|" * len(metrics)
    lines = [header, sep]
    for name, epoch, split, values in rows:
        cells = " | ".join(f"{values[m]:.4f}" if m in values else "-" for m in metrics)
        lines.append(f"| {name} | {epoch} | {split} | {cells} |")
    return "\n".join(lines)


def run_default(
    out_root: str | Path = "runs", *, overrides: Sequence[str] = (), progress: bool = True
) -> list[RunResult]:
    """Train the digits baseline and + NIR with the same seed; return both results."""
    results = []
    for preset in DEFAULT_PRESETS:
        cfg = load_config(preset, overrides)
        results.append(train(cfg, default_out_dir(cfg, out_root), progress=progress))
    return results
