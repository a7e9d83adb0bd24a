"""The training loop: one :class:`RunConfig` in, one folder of results out.

``train(config, out_dir)`` builds the run's parts through :mod:`nirdml.training.build`
(all randomness from ``config.seed`` through local generators; the global RNG is left as
it was), trains with the paper's recipe, evaluates every ``eval.every`` epochs, keeps the
last and the best checkpoint (atomically written, ``weights_only``-loadable), writes
metrics per epoch, a curve PNG and ``summary.json``. ``train(..., resume=True)`` continues
a killed run from its last checkpoint and ends with the same numbers as an uninterrupted
run.

The loop is a few named steps (one epoch, one step, evaluate, select the best, save) over
the run's built parts and a :class:`LoopState` that holds everything the loop changes.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import nirdml
from nirdml.errors import (
    ConfigError,
    InputError,
    MissingFileError,
    NIRInertWarning,
    NoImprovementWarning,
    NonFiniteLossError,
    OutputExistsError,
    SelectionWarning,
    TrainingInterrupted,
)
from nirdml.losses import ProxyCriterion
from nirdml.runtime import atomic_write_json, atomic_write_text, resolve_device
from nirdml.training import selection
from nirdml.training.alarm import (
    ALARM_KEYS,
    alarm_row,
    alarm_summary,
    inert_message,
    inert_summary,
)
from nirdml.training.build import (
    Criterion,
    amp_dtype,
    eval_metrics,
    eval_num_clusters,
    evaluate_model,
    load_run_data,
    place_model,
    run_loss,
    train_batches,
)
from nirdml.training.checkpoint import (
    load_checkpoint,
    load_scheduler_state,
    save_checkpoint,
    scheduler_state,
)
from nirdml.training.config import RunConfig, check_loggers, load_config
from nirdml.training.datacheck import corrupt_summary
from nirdml.training.distributed import DistContext
from nirdml.training.optim import build_optimizer, build_scheduler, group_lrs, param_groups
from nirdml.training.recorder import ExternalLoggers, plot_curves, write_history
from nirdml.training.step import GuardedStep, HostReader

LOG_EVERY = 10
"""Steps between progress reads; each reads the values of the previous read, so the host
never waits for the device inside an epoch (one read at the end of each epoch)."""
MAX_CONSECUTIVE_SKIPS = 50


@dataclass
class RunResult:
    """What ``train`` returns: the run folder, its summary and the per-epoch history."""

    out_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SkipWatch:
    """Counts consecutive skipped (non-finite) steps from the progress reads, which arrive
    one logging interval late, and stops training after ``MAX_CONSECUTIVE_SKIPS``."""

    consecutive: int = 0
    last: dict[str, float] = field(default_factory=lambda: {"skipped": 0.0, "steps": 0.0})

    def start_epoch(self, skipped: float) -> None:
        """The epoch's steps count from 0; ``skipped``: the skip counter before it."""
        self.last = {"skipped": skipped, "steps": 0.0}

    def check(self, read: dict[str, float], epoch: int) -> None:
        """Add one read's window; raise when every step of a long enough run was skipped."""
        new = int(read["skipped"] - self.last["skipped"])
        window = int(read["steps"] - self.last["steps"])
        self.last = read
        self.consecutive = self.consecutive + new if new == window else 0
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(
                f"the loss or its gradients were inf/NaN for {self.consecutive} consecutive "
                f"steps (epoch {epoch + 1}); nothing was updated in those steps. Fixes: lower "
                "optim.lr or optim.proxy_lr_mult/flow_lr_mult, use loss.nir.objective=nll, or "
                "amp=none; check the data for NaN/inf inputs. The last good checkpoint is "
                "checkpoints/last.pt."
            )


@dataclass
class LoopState:
    """Everything the loop changes; all but ``skips`` is saved in every checkpoint."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    start_epoch: int = 0
    global_step: int = 0
    train_time: float = 0.0
    images_seen: int = 0
    reference: dict[str, float] = field(default_factory=dict)
    """Metrics of the untrained reference (epoch 0): pooled backbone features, no head."""
    skips: SkipWatch = field(default_factory=SkipWatch)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> LoopState:
        """The loop state after the checkpointed epoch."""
        return cls(
            history=list(state["history"]),
            best=dict(state["best"]),
            start_epoch=int(state["epoch"]) + 1,
            global_step=int(state["global_step"]),
            train_time=float(state["train_time_s"]),
            images_seen=int(state["images_seen"]),
            reference=dict(state.get("reference", {})),
        )


@dataclass
class _EpochTally:
    """One epoch's running totals, kept on the device (read once, for the epoch's row)."""

    start: float
    sums: dict[str, Tensor] = field(default_factory=dict)
    probes: list[dict[str, Tensor]] = field(default_factory=list)
    steps: int = 0
    images: int = 0

    def add(self, stats: dict[str, Tensor], batch_size: int) -> dict[str, Tensor]:
        """Sum one step's statistics, its alarm probe kept apart; returns the probe."""
        probe = {k: stats.pop(k) for k in ALARM_KEYS if k in stats}
        if probe:
            self.probes.append(probe)
        for k, v in stats.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.steps += 1
        self.images += batch_size  # the global batch, over all ranks
        return probe

    def progress(self, skipped: Tensor, probe: dict[str, Tensor]) -> dict[str, Tensor]:
        """The values a progress read shows: skip counter, running sums, the last probe."""
        progress = {"skipped": skipped}
        progress.update({k: self.sums[k] for k in ("loss", "nll") if k in self.sums})
        if probe:
            progress["grad_ratio"] = probe["grad_ratio"]
        return progress

    def rate(self) -> float:
        """Images per second since the epoch started."""
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def row(self, elapsed: float, skipped: Tensor, alarm_threshold: float) -> dict[str, float]:
        """The epoch's ``train/...`` columns: step means, counts, alarm and speed."""
        row = {f"train/{k}": (v / max(self.steps, 1)).item() for k, v in self.sums.items()}
        if "capped" in self.sums:  # a count, not a mean
            row["train/capped"] = self.sums["capped"].item()
        if self.probes:
            row.update(alarm_row(self.probes, alarm_threshold))
        row["train/skipped_steps"] = int(skipped.item())
        row["train/images_per_s"] = self.images / max(elapsed, 1e-9)
        row["train/epoch_time_s"] = elapsed
        return row


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def last_checkpoint(out_dir: str | Path) -> Path:
    """``out_dir/checkpoints/last.pt``: the file that makes a folder hold a run (what resume
    continues from). A run that fails before it is written leaves nothing that blocks the
    same folder next time."""
    return Path(out_dir) / "checkpoints" / "last.pt"


def is_run_folder(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` was written by ``nirdml train``: it holds the run's config.yaml
    (written before the first epoch) or a checkpoint."""
    out_dir = Path(out_dir)
    return (out_dir / "config.yaml").is_file() or last_checkpoint(out_dir).is_file()


def _holds_other_files(out_dir: Path) -> bool:
    """A non-empty folder that no run wrote (a run never writes into one)."""
    return out_dir.is_dir() and not is_run_folder(out_dir) and any(out_dir.iterdir())


def default_out_dir(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """``runs/<name>``, or ``runs/<name>-N`` if that folder already holds a run (or files no
    run wrote)."""
    base = Path(root) / cfg.name
    candidate, n = base, 1
    while last_checkpoint(candidate).exists() or _holds_other_files(candidate):
        candidate = Path(f"{base}-{n}")
        n += 1
    return candidate


def _resumed(out_dir: Path) -> tuple[RunConfig, dict[str, Any] | None]:
    """The config and last checkpoint of the run in ``out_dir``; a run stopped before its
    first checkpoint restarts from epoch 1 with its config.yaml (no checkpoint)."""
    if last_checkpoint(out_dir).is_file():
        state = load_checkpoint(last_checkpoint(out_dir))
        return load_config(state["config"]), state
    if (out_dir / "config.yaml").is_file():
        print(
            f"{out_dir} holds no checkpoint yet (stopped in its first epoch): starting it "
            "again from epoch 1 with its config.yaml",
            flush=True,
        )
        return load_config(out_dir / "config.yaml"), None
    raise MissingFileError(
        f"{out_dir} holds no checkpoints/last.pt or config.yaml to resume; pass the folder of "
        "a run written by `nirdml train`, or start it again without --resume"
    )


def _check_out_dir(out_dir: Path) -> None:
    """A new run's folder: refused when it holds a run or is a file. (A caller may prepare
    the folder, as the study runner does with its spec.json.)"""
    if last_checkpoint(out_dir).exists():
        raise OutputExistsError(
            f"{out_dir} already holds a run; resume it with `nirdml train --resume {out_dir}` "
            "or choose another --out folder"
        )
    if out_dir.is_file():
        raise OutputExistsError(f"{out_dir} is a file; pass --out a folder path")


def _write_config(out_dir: Path, cfg: RunConfig) -> None:
    """Create the run folder with its config.yaml: enough for a resume to start the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())


def check_new_out(out_dir: str | Path) -> None:
    """The folder a user named for a new run: refused when it holds a run, is a file, or
    holds files no run wrote (``nirdml train --out``, before anything is written)."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if _holds_other_files(out_dir):
        raise OutputExistsError(
            f"{out_dir} already holds files that no nirdml run wrote; pass --out a new folder "
            "or an empty one (a run writes config.yaml, metrics and checkpoints/ into it)"
        )


def train(
    config: RunConfig | str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool | None = None,
    stop_after_epoch: int | None = None,
) -> RunResult:
    """Train one run; see the module docstring. ``stop_after_epoch`` ends early (tests).

    Ctrl-C (KeyboardInterrupt) raises :class:`~nirdml.errors.TrainingInterrupted`, whose
    message says where training stopped and how to resume; the folder then always resumes
    (``resume=True``): from its last checkpoint, or before the first one from epoch 1.
    """
    dist = DistContext.from_env()
    if resume:
        if out_dir is None:
            raise InputError("resume=True needs the run folder to resume (out_dir)")
        out_dir = Path(out_dir)
        cfg, state = _resumed(out_dir)
    else:
        cfg = config if isinstance(config, RunConfig) else load_config(config)
        state = None
        out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
        _check_out_dir(out_dir)
    check_loggers(cfg.log)
    run: _Run | None = None
    try:
        run = _Run(cfg, out_dir, state, dist, progress)
        return run.fit(stop_after_epoch)
    except KeyboardInterrupt:
        if dist.is_main and not is_run_folder(out_dir):  # stopped while loading: resumable too
            _write_config(out_dir, cfg)
        if run is not None and run.bar is not None:
            run.bar.close()
        where = "while loading the data" if run is None else run.stop_point()
        raise TrainingInterrupted(
            f"interrupted {where}; resume with: nirdml train --resume {out_dir}"
        ) from None


def _start_device(cfg: RunConfig, dist: DistContext) -> torch.device:
    """The run's device, once the ranks have joined and agree on the config and batch."""
    device = resolve_device(cfg.device, local_rank=dist.local_rank if dist.enabled else None)
    dist.init(device)
    dist.check_same(
        cfg.to_dict(), "config", "start every rank with the same preset and --set overrides"
    )
    dist.check_batch(cfg.data.batch_size)
    return device


class _Run:
    """One training run: its built parts and the loop over them (private: the public API
    is :func:`train`)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: Path,
        checkpoint: dict[str, Any] | None,
        dist: DistContext,
        progress: bool | None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.dist = dist
        self.device = _start_device(cfg, dist)
        self.progress = (cfg.log.progress if progress is None else progress) and dist.is_main
        self.position = "while loading the data"
        """Where the run is, for the message of an interrupt."""
        self.saved_epoch = 0
        """The epoch of the last checkpoint written (0: none yet)."""
        self.bar: Any = None
        """The epoch's progress bar (closed by an interrupt)."""
        self.warned_inert = False
        """Whether this session warned that NIR was inert (the first inert epoch only)."""
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        with dist.main_first():  # downloads, caches and weights fetched once
            data = load_run_data(cfg, progress=self.progress, echo=dist.is_main)
        self.splits = data.splits
        self.image_check = data.image_check
        self.model = place_model(data.model, cfg, dist, self.device)
        self.loss: ProxyCriterion = run_loss(cfg, self.splits.train.num_classes).to(self.device)
        self.loader, self.seeded_sampler = train_batches(
            self.splits.train, cfg.data, seed=cfg.seed, dist=dist, device=self.device
        )
        self.criterion = Criterion(self.model, self.loss, dist.gather_fn(cfg.data.batch_size))
        self.trained: nn.Module = self.criterion
        """The module the steps run: the criterion, or DDP over it when distributed."""
        self.trained_backbone: bool | None = None
        """Whether ``trained`` trains the backbone (None: not wrapped yet)."""
        self.optimizer = build_optimizer(param_groups(self.model, self.loss, cfg.optim), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.step = GuardedStep(self.optimizer, self.device, fp16=self.amp_dtype == torch.float16)
        self.metrics = eval_metrics(cfg)
        self.state = LoopState()
        if checkpoint is not None:
            self._restore(checkpoint)
        self.loggers: ExternalLoggers | None = self._open_outputs()

    def _open_outputs(self) -> ExternalLoggers | None:
        """Rank 0: write the run folder's config.yaml and open the external loggers."""
        if not self.dist.is_main:
            return None
        cfg = self.cfg
        _write_config(self.out_dir, cfg)
        return ExternalLoggers(
            self.out_dir,
            tensorboard=cfg.log.tensorboard,
            wandb=cfg.log.wandb,
            wandb_project=cfg.log.wandb_project,
            wandb_mode=cfg.log.wandb_mode,
            run_name=cfg.name,
            config=cfg.to_dict(),
        )

    # -- checkpoints

    def _checkpoint(self, epoch: int) -> dict[str, Any]:
        s = self.state
        return {
            "version": nirdml.__version__,
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "global_step": s.global_step,
            "model": _unwrap(self.model).state_dict(),
            "model_spec": dict(getattr(_unwrap(self.model), "spec", {})),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "step_guard": self.step.state_dict(),
            "sampler": {"seed": self.cfg.seed, "epoch": epoch + 1, "position": 0},
            "history": s.history,
            "best": s.best,
            "train_time_s": s.train_time,
            "images_seen": s.images_seen,
            "reference": s.reference,
            "num_classes": self.splits.train.num_classes,
            "class_names": {"train": list(self.splits.train.class_names)},
        }

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.loss.load_state_dict(checkpoint["loss"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        load_scheduler_state(self.scheduler, checkpoint["scheduler"])
        self.step.load_state_dict(checkpoint["step_guard"])
        self.state = LoopState.from_checkpoint(checkpoint)
        self.saved_epoch = self.state.start_epoch
        if self.dist.is_main:
            cfg, start = self.cfg, self.state.start_epoch
            print(
                f"{self.out_dir}: all {cfg.epochs} epochs are done; nothing to resume"
                if start >= cfg.epochs
                else f"resuming {self.out_dir} from epoch {start + 1}/{cfg.epochs} "
                f"(last checkpoint: end of epoch {start})",
                flush=True,
            )

    def _save(self, epoch: int, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        checkpoint = self._checkpoint(epoch)
        folder = self.out_dir / "checkpoints"
        save_checkpoint(folder / "last.pt", checkpoint)
        if is_best:
            save_checkpoint(folder / "best.pt", checkpoint)
        self.saved_epoch = epoch + 1

    def stop_point(self) -> str:
        """Where the run stopped and what a resume continues from, for an interrupt."""
        if self.saved_epoch:
            return f"{self.position} (last checkpoint: end of epoch {self.saved_epoch})"
        return f"{self.position} (no checkpoint yet: a resume starts again from epoch 1)"

    # -- one epoch

    def _wrap(self, backbone_grad: bool) -> None:
        """(Re)build the DDP module when the trained parameters change (end of warmup)."""
        if self.trained_backbone is backbone_grad:
            return
        self.trained = self.criterion  # drops the previous DDP module and its hooks
        exclude = () if backbone_grad else list(self.model.backbone_parameters())
        self.trained = self.dist.wrap(self.criterion, self.device, exclude)
        self.trained_backbone = backbone_grad

    def _progress_bar(self, epoch: int, backbone_grad: bool) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=len(self.loader),
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}"
            + (" (warmup)" if not backbone_grad else ""),
            leave=False,
            dynamic_ncols=True,
        )

    def _start_epoch(self, epoch: int) -> bool:
        """Set the epoch's trained module, sampler and views; whether the backbone trains."""
        backbone_grad = epoch >= self.cfg.optim.warmup_epochs
        self._wrap(backbone_grad)
        self.trained.train()
        self.seeded_sampler.set_epoch(epoch)
        if hasattr(self.splits.train, "set_epoch"):  # cached features: the epoch's views
            self.splits.train.set_epoch(epoch)
        return backbone_grad

    def _autocast(self) -> Any:
        """The steps' autocast context for the run's AMP dtype (a no-op without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; returns its ``train/...`` columns."""
        cfg, state = self.cfg, self.state
        backbone_grad = self._start_epoch(epoch)
        skipped_before = self.step.skipped.clone()
        reader = HostReader(self.device)  # progress is read one interval late: no sync
        state.skips.start_epoch(float(skipped_before))
        tally = _EpochTally(start=time.perf_counter())
        bar = self.bar = self._progress_bar(epoch, backbone_grad)
        autocast = self._autocast()
        alarm = cfg.loss.nir.enabled and cfg.loss.nir.alarm
        for images, labels in self.loader:
            step, total = tally.steps + 1, len(self.loader)
            self.position = f"at epoch {epoch + 1}/{cfg.epochs}, step {step}/{total}"
            log_step = step % LOG_EVERY == 0 or step == total
            if alarm and log_step:  # the alarm's gradients, on this interval's last batch
                self.loss.diagnose_next = True
            stats = self._train_step(images, labels, backbone_grad, autocast)
            probe = tally.add(stats, cfg.data.batch_size)
            state.global_step += 1
            if log_step:
                progress = tally.progress(self.step.skipped, probe)
                rate = tally.rate()
                self._read(reader.submit(progress, steps=tally.steps), bar, rate, epoch)
        # the last interval: the bar reaches 100%
        self._read(reader.flush(), bar, tally.rate(), epoch)
        if bar is not None:
            bar.refresh()  # show the full bar even when the last update came within mininterval
            bar.close()
        elapsed = time.perf_counter() - tally.start
        state.train_time += elapsed
        state.images_seen += tally.images
        skipped = self.step.skipped - skipped_before
        return tally.row(elapsed, skipped, cfg.loss.nir.alarm_threshold)

    def _train_step(
        self, images: Tensor, labels: Tensor, backbone_grad: bool, autocast: Any
    ) -> dict[str, Tensor]:
        """One optimizer step; returns the step's statistics as device tensors.

        Nothing here reads a device value on the host (tests/test_speed.py checks it).
        """
        images = images.to(self.device, non_blocking=True)
        # Labels stay on the CPU: the losses move them without a device sync.
        if self.cfg.model.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = self.trained(images, labels, backbone_grad)
        self.step(loss)
        return {"loss": loss.detach(), **self.loss.last_stats}

    def _read(self, read: dict[str, float] | None, bar: Any, rate: float, epoch: int) -> None:
        """A progress read (``LOG_EVERY`` steps late, None before the first): update the
        bar and count skipped steps."""
        if read is None:
            return
        self._progress(read, bar, rate)
        self.state.skips.check(read, epoch)

    def _progress(self, read: dict[str, float], bar: Any, rate: float) -> None:
        """Progress-bar update from values read ``LOG_EVERY`` steps late."""
        if bar is None:
            return
        steps = max(read["steps"], 1.0)
        post = {"loss": f"{read['loss'] / steps:.4g}"}
        if "nll" in read:
            post["nll"] = f"{read['nll'] / steps:.4g}"
        if "grad_ratio" in read:
            post["nir/proxy"] = f"{read['grad_ratio']:.1e}"
        post["img/s"] = f"{rate:.0f}"
        bar.set_postfix(post, refresh=False)
        bar.update(int(read["steps"]) - bar.n)

    # -- evaluation and selection

    def _evaluate(self, reference: bool = False) -> dict[str, float]:
        """Metrics of the test (and val) split, keyed ``test/...`` / ``val/...``; with
        ``reference``, of the model's pooled backbone features (no head) instead."""
        from nirdml.models.embedding import PooledEmbedding

        row: dict[str, float] = {}
        splits = [("test", self.splits.test)]
        if self.splits.val is not None:
            splits.append(("val", self.splits.val))
        model = _unwrap(self.model)
        self.dist.sync_buffers(model)  # every shard embedded with rank 0's BN statistics
        if reference:
            model = PooledEmbedding(model)
        for name, dataset in splits:
            metrics = evaluate_model(
                model,
                dataset,
                metrics=self.metrics,
                num_clusters=eval_num_clusters(self.cfg, self.splits.train.num_classes),
                batch_size=self.cfg.eval.batch_size,
                num_workers=self.cfg.data.num_workers,
                device=self.device,
                seed=self.cfg.seed,
                amp_dtype=self.amp_dtype,
                dist=self.dist,
                no_relevant=self.cfg.eval.no_relevant,
                average=self.cfg.eval.average,
            )
            row.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
        return row

    def _selection_split(self) -> str:
        return "val" if self.splits.val is not None else "test"

    def _select(self, epoch: int, row: dict[str, Any]) -> bool:
        """Keep ``row`` as the best epoch if it ranks at least as high as the best so far
        (nirdml.training.selection: ties go to the tie-break metric, then the later epoch)."""
        split, metric = self._selection_split(), self.cfg.eval.select_metric
        if f"{split}/{metric}" not in row:
            raise ConfigError(
                f"eval.select_metric {metric!r} is not among the "
                f"computed metrics {self.metrics}; add it to eval.metrics"
            )
        best = self.state.best
        if best and selection.rank(row, split, metric) < selection.rank(
            best["metrics"], split, metric
        ):
            return False
        self.state.best = {
            "epoch": epoch + 1,
            "selected_on": split,
            "metric": metric,
            "value": row[f"{split}/{metric}"],
            "metrics": {k: v for k, v in row.items() if k.split("/")[0] in ("test", "val")},
        }
        return True

    # -- the run

    def _epoch(self, epoch: int) -> dict[str, Any]:
        """Train, schedule, evaluate and select, save: one epoch's row of metrics."""
        cfg = self.cfg
        row: dict[str, Any] = {"epoch": epoch + 1, **group_lrs(self.optimizer)}
        row.update(self._train_epoch(epoch))
        self.scheduler.step()
        is_best = False
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
            self.position = f"at epoch {epoch + 1}/{cfg.epochs} (evaluating)"
            row.update(self._evaluate())
            row = self.dist.broadcast_object(row)  # rank 0's metrics on every rank
            is_best = self._select(epoch, row)
        self.state.history.append(row)
        if row.get("train/nir_inert") and self.dist.is_main and not self.warned_inert:
            # once per run: later inert epochs are counted at the end (inert_summary)
            warnings.warn(inert_message(row, cfg), NIRInertWarning, stacklevel=3)
            self.warned_inert = True
        self._save(epoch, is_best)
        return row

    def _record(self, row: dict[str, Any]) -> None:
        """Rank 0: metrics files, curves, external loggers and the epoch's line."""
        if not self.dist.is_main:
            return
        history = self.state.history
        write_history(self.out_dir, history)
        plot_curves(self.out_dir / "curves.png", history, self.cfg.eval.select_metric)
        self.loggers.log(row, step=row["epoch"])
        self._print_epoch(row)

    def fit(self, stop_after_epoch: int | None = None) -> RunResult:
        """Run the remaining epochs; write and return the summary."""
        self.position = "before the first epoch (evaluating the untrained features)"
        if self.state.start_epoch == 0 and self.cfg.eval.reference:
            self.state.reference = self.dist.broadcast_object(self._evaluate(reference=True))
            self._print_reference()
        try:
            for epoch in range(self.state.start_epoch, self.cfg.epochs):
                self._record(self._epoch(epoch))
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                    break
        finally:
            if self.loggers is not None:
                self.loggers.close()
        summary = self._summary()
        if self.dist.is_main:
            atomic_write_json(self.out_dir / "summary.json", summary)
            inert = inert_summary(summary["nir_alarm"], len(self.state.history))
            if inert is not None:
                warnings.warn(inert, NIRInertWarning, stacklevel=2)
            for note in summary["selection"]["warnings"]:
                warnings.warn(f"model selection: {note}", SelectionWarning, stacklevel=2)
            found = summary["reference"]["verdict"]
            if found is not None and not found["beats"]:
                warnings.warn(found["message"], NoImprovementWarning, stacklevel=2)
        return RunResult(self.out_dir, summary, list(self.state.history))

    def _print_reference(self) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        metric = self.cfg.eval.select_metric
        parts = [
            f"{split} {metric} {self.state.reference[f'{split}/{metric}']:.4f}"
            for split in ("val", "test")
            if f"{split}/{metric}" in self.state.reference
        ]
        tqdm.write("epoch 0 (untrained features, no head) | " + " | ".join(parts))

    def _print_epoch(self, row: dict[str, Any]) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        parts = [
            f"epoch {row['epoch']}/{self.cfg.epochs}",
            f"loss {row.get('train/loss', math.nan):.4g}",
        ]
        if "train/nll" in row:
            parts.append(f"nll {row['train/nll']:.4g}")
        for split in ("val", "test"):
            key = f"{split}/{self.cfg.eval.select_metric}"
            if key in row:
                parts.append(f"{split} {self.cfg.eval.select_metric} {row[key]:.4f}")
        if "train/nir_grad_ratio" in row:
            parts.append(
                f"nir/proxy grad {row['train/nir_grad_ratio']:.1e}"
                + (" INERT" if row.get("train/nir_inert") else "")
            )
        if row.get("train/skipped_steps"):
            parts.append(f"SKIPPED {row['train/skipped_steps']} non-finite steps")
        parts.append(f"{row['train/images_per_s']:.0f} img/s")
        tqdm.write(" | ".join(parts))

    def _selection_summary(self) -> dict[str, Any]:
        split, metric = self._selection_split(), self.cfg.eval.select_metric
        chosen = self.splits.val if split == "val" else self.splits.test
        evaluated = [r for r in self.state.history if f"{split}/{metric}" in r]
        return {
            "rule": selection.rule(split, metric, evaluated[-1] if evaluated else None),
            **selection.diagnose(self.state.history, split, metric, chosen.num_classes),
        }

    def _summary(self) -> dict[str, Any]:
        evaluated = [r for r in self.state.history if any(k.startswith("test/") for k in r)]
        key = f"test/{self.cfg.eval.select_metric}"
        best_test = max(evaluated, key=lambda r: r.get(key, -math.inf), default=None)
        return {
            "name": self.cfg.name,
            "nirdml_version": nirdml.__version__,
            "torch_version": torch.__version__,
            "device": str(self.device)
            + (
                f" ({torch.cuda.get_device_name(self.device)})"
                if self.device.type == "cuda"
                else ""
            ),
            "host": platform.node(),
            "world_size": self.dist.world_size,
            "epochs_run": len(self.state.history),
            "epochs": self.cfg.epochs,
            "best": self.state.best,
            "best_selected_on": self.state.best.get("selected_on"),
            "best_test_epoch": (
                {
                    "epoch": best_test["epoch"],
                    "metrics": {k: v for k, v in best_test.items() if k.startswith("test/")},
                }
                if best_test
                else None
            ),
            "final": self.state.history[-1] if self.state.history else None,
            "skipped_steps": int(sum(r.get("train/skipped_steps", 0) for r in self.state.history)),
            "image_check": self.image_check,
            "corrupt_images": corrupt_summary(self.splits),
            "classes": {
                n: s.num_classes
                for n, s in (("train", self.splits.train), ("val", self.splits.val))
                + (("test", self.splits.test),)
                if s is not None
            },
            "nir_alarm": alarm_summary(self.state.history, self.cfg),
            "selection": self._selection_summary(),
            "reference": {
                "what": "the backbone's pooled features before training, L2-normalised, no "
                "head (epoch 0), on the same splits and metrics",
                "metrics": self.state.reference,
                "verdict": selection.verdict(
                    self.state.best, self.state.reference, self.cfg.eval.select_metric
                ),
            },
            "train_time_s": self.state.train_time,
            "images_per_s": self.state.images_seen / max(self.state.train_time, 1e-9),
            "out_dir": str(self.out_dir),
        }
