"""Run the study's runs one after the other, resumably.

A run whose folder holds ``summary.json`` is finished and skipped; one that holds a
checkpoint but no summary (a killed process) is resumed from its last epoch, which ends
with the same numbers as an uninterrupted run. So the study can be run in parts, stopped
and restarted at will, and the report is always built from the run folders alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nirdml.errors import NonFiniteLossError
from nirdml.runtime import atomic_write_json
from study.grid import RunSpec, canonical


def _print(message: str) -> None:
    print(message, flush=True)  # the study runs under nohup: keep its log current


RUNS_SUBDIR = "runs"


def run_dir(runs_root: Path, spec: RunSpec, data_root: str) -> Path:
    """The spec's folder: an existing one with the same config hash (whatever part created
    it, so identical configurations are trained once), else ``<group>-s<seed>-<hash>``."""
    run_id = spec.run_id(data_root)
    base = runs_root / RUNS_SUBDIR
    suffix = run_id.rsplit("-", 1)[1]
    existing = sorted(base.glob(f"*-s{spec.seed}-{suffix}")) if base.is_dir() else []
    done = [f for f in existing if is_done(f)]
    return (done or existing or [base / run_id])[0]


def is_done(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


DIVERGED = "diverged.json"
"""Written instead of ``summary.json`` when training stopped on non-finite steps."""


def is_diverged(folder: Path) -> bool:
    return (folder / DIVERGED).is_file()


def _train(spec: RunSpec, cfg: Any, folder: Path, data_root: str, resume: bool) -> None:
    from nirdml.training.trainer import train

    if resume:
        train(out_dir=folder, resume=True, progress=False)
        return
    folder.mkdir(parents=True, exist_ok=True)
    # What the run is, readable without the hash: spec, resolved knobs, command.
    atomic_write_json(
        folder / "spec.json",
        {
            "group": spec.group,
            "seed": spec.seed,
            "preset": spec.preset,
            "overrides": list(spec.overrides),
            "command": spec.command(data_root, str(folder)),
            "config": canonical(cfg),
        },
    )
    train(cfg, folder, progress=False)


def run_specs(
    specs: Sequence[RunSpec],
    runs_root: Path,
    data_root: str,
    *,
    log: Callable[[str], None] = _print,
) -> list[Path]:
    """Train every spec that is not finished yet; return all their folders."""
    folders = []
    todo = [s for s in specs if not is_done(run_dir(runs_root, s, data_root))]
    log(f"{len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to run")
    for i, spec in enumerate(specs):
        folder = run_dir(runs_root, spec, data_root)
        folders.append(folder)
        if is_done(folder):
            continue
        if is_diverged(folder):
            log(f"[{i + 1}/{len(specs)}] skip {folder.name}: diverged before (diverged.json)")
            continue
        cfg = spec.config(data_root)
        start = time.perf_counter()
        resume = (folder / "checkpoints" / "last.pt").is_file()
        log(f"[{i + 1}/{len(specs)}] {'resume' if resume else 'train'} {folder.name}")
        try:
            _train(spec, cfg, folder, data_root, resume)
        except NonFiniteLossError as err:  # a result too: recorded, reported, not retried
            atomic_write_json(folder / DIVERGED, {"group": spec.group, "error": str(err)})
            log(f"    diverged: {err}")
            continue
        summary = json.loads((folder / "summary.json").read_text())
        best = summary.get("best") or {}
        log(
            f"    done in {time.perf_counter() - start:.0f} s: val R@1 {best.get('value', 0):.4f} "
            f"(epoch {best.get('epoch')}), test R@1 there "
            f"{best.get('metrics', {}).get('test/recall@1', float('nan')):.4f}"
        )
    return folders
