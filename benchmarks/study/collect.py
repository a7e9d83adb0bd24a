"""Read finished runs back from their folders (summary.json, metrics.jsonl, spec.json).

Three readings of one run, all from ``nirdml.training.train``'s outputs:

* ``selected``: test metrics at the epoch with the best *validation* R@1 (model selection
  on held-out training classes; the protocol this study reports first);
* ``best_test``: test metrics at the epoch with the best *test* R@1 (the paper's protocol,
  optimistic because it selects on the test set);
* ``final``: test metrics after the last epoch (no selection at all).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READINGS = ("selected", "best_test", "final")


@dataclass
class RunRecord:
    """One finished run: its spec, summary and per-epoch history."""

    folder: Path
    spec: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def seed(self) -> int:
        return int(self.spec["seed"])

    @property
    def config(self) -> dict[str, Any]:
        return self.spec["config"]

    def metrics(self, reading: str, split: str = "test") -> dict[str, float]:
        """``{metric: value}`` of ``split`` under one of ``READINGS``."""
        if reading == "selected":
            row = (self.summary.get("best") or {}).get("metrics", {})
        elif reading == "best_test":
            row = (self.summary.get("best_test_epoch") or {}).get("metrics", {})
        elif reading == "final":
            row = self.history[-1] if self.history else {}
        else:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
        prefix = f"{split}/"
        return {k[len(prefix) :]: float(v) for k, v in row.items() if k.startswith(prefix)}

    def epoch(self, reading: str) -> int:
        if reading == "selected":
            return int(self.summary["best"]["epoch"])
        if reading == "best_test":
            return int(self.summary["best_test_epoch"]["epoch"])
        return len(self.history)

    def curve(self, key: str) -> list[float]:
        """Per-epoch values of a history column (``"test/recall@1"``), NaN where absent."""
        return [float(row.get(key, math.nan)) for row in self.history]


def load_run(folder: Path) -> RunRecord | None:
    """The run in ``folder``, or None while it is not finished."""
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return None
    spec = json.loads((folder / "spec.json").read_text())
    summary = json.loads(summary_path.read_text())
    history = [
        json.loads(line)
        for line in (folder / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return RunRecord(folder, spec, summary, history)


def values(
    records: Sequence[RunRecord], reading: str, metric: str, split: str = "test"
) -> list[float]:
    return [r.metrics(reading, split).get(metric, math.nan) for r in records]


def by_seed(records: Sequence[RunRecord]) -> dict[int, RunRecord]:
    out: dict[int, RunRecord] = {}
    for r in records:
        if r.seed in out:
            raise ValueError(f"two runs with seed {r.seed}: {out[r.seed].folder} and {r.folder}")
        out[r.seed] = r
    return out
