"""Run outputs: per-epoch metrics (CSV + JSONL), training curves, optional TensorBoard / W&B.

The per-epoch history lives in the checkpoint; the CSV/JSONL files and the curve PNG are
re-written atomically from it after every epoch, so a resumed run's files never hold
epochs from the killed attempt twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nirdml.errors import SetupError
from nirdml.runtime import atomic_write, atomic_write_text
from nirdml.training.config import LogConfig, check_loggers


def write_history(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """metrics.jsonl (one object per epoch) and metrics.csv (union of all columns)."""
    lines = "".join(json.dumps(dict(row)) + "\n" for row in history)
    atomic_write_text(out_dir / "metrics.jsonl", lines)
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())


def plot_curves(path: Path, history: Sequence[Mapping[str, Any]], select_metric: str) -> None:
    """Training loss and the selection metric (test, and val if present) per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [row.get("train/loss", math.nan) for row in history], label="loss")
    if any("train/nll" in row for row in history):
        ax2 = ax_loss.twinx()
        ax2.plot(epochs, [row.get("train/nll", math.nan) for row in history], "C1", label="nll")
        ax2.set_ylabel("mean NLL", color="C1")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("training loss")
    for split, style in (("test", "C0-o"), ("val", "C2-s")):
        key = f"{split}/{select_metric}"
        pts = [(row["epoch"], row[key]) for row in history if key in row]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax_metric.plot(xs, ys, style, label=split, markersize=3)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(select_metric)
    ax_metric.set_title(f"{select_metric} per epoch")
    if ax_metric.lines:
        ax_metric.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


class ExternalLoggers:
    """TensorBoard and W&B, both optional; W&B credentials only from the environment."""

    def __init__(
        self,
        out_dir: Path,
        *,
        tensorboard: bool,
        wandb: bool,
        wandb_project: str,
        wandb_mode: str,
        run_name: str,
        config: Mapping[str, Any],
    ) -> None:
        self.tb = None
        self.wandb_run = None
        check_loggers(LogConfig(tensorboard=tensorboard, wandb=wandb, wandb_mode=wandb_mode))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if wandb and wandb_mode != "disabled":
            import wandb as wandb_lib

            if wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
                netrc = Path.home() / ".netrc"
                if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
                    raise SetupError(
                        "log.wandb_mode=online needs W&B credentials: run `wandb login` or set "
                        "WANDB_API_KEY in the environment (never on the command line); or use "
                        "log.wandb_mode=offline and `wandb sync` later"
                    )
            self.wandb_run = wandb_lib.init(
                project=wandb_project,
                name=run_name,
                mode=wandb_mode,
                dir=str(out_dir),
                config=dict(config),
                resume="allow",
                id=_wandb_id(out_dir),
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        scalars = {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_id(out_dir: Path) -> str:
    """A stable W&B run id per output folder, so a resumed run continues the same W&B run."""
    path = out_dir / ".wandb_id"
    if path.is_file():
        return path.read_text().strip()
    import hashlib

    run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:16]
    atomic_write_text(path, run_id)
    return run_id
