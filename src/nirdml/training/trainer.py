"""The training loop: one :class:`RunConfig` in, one folder of results out.

``train(config, out_dir)`` builds the data, model and loss from the config (all
randomness from ``config.seed`` through local generators; the global RNG is left as it
was), trains with the paper's recipe, evaluates every ``eval.every`` epochs, keeps the
last and the best checkpoint (atomically written, ``weights_only``-loadable), writes
metrics per epoch, a curve PNG and ``summary.json``. ``train(..., resume=True)`` continues
a killed run from its last checkpoint and ends with the same numbers as an uninterrupted
run.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import nirdml
from nirdml.errors import ConfigError, NIRInertWarning, NonFiniteLossError
from nirdml.runtime import atomic_write_json, atomic_write_text, resolve_device
from nirdml.training.checkpoint import (
    load_checkpoint,
    load_scheduler_state,
    save_checkpoint,
    scheduler_state,
)
from nirdml.training.compiled import CompiledOrEager
from nirdml.training.config import LossConfig, RunConfig, load_config
from nirdml.training.datacheck import check_images, corrupt_summary
from nirdml.training.distributed import (
    DistContext,
    convert_sync_batchnorm,
    slice_bounds,
)
from nirdml.training.loader import train_loader
from nirdml.training.optim import build_optimizer, build_scheduler, group_lrs, param_groups
from nirdml.training.recorder import ExternalLoggers, plot_curves, write_history
from nirdml.training.step import GuardedStep, HostReader

LOG_EVERY = 10
"""Steps between progress reads; each reads the values of the previous read, so the host
never waits for the device inside an epoch (one read at the end of each epoch)."""
MAX_CONSECUTIVE_SKIPS = 50


ALARM_KEYS = ("grad_ratio", "grad_nir", "grad_proxy", "nll_min", "nll_max")
"""NIRLoss diagnostics measured on one batch per logging interval (the inertness alarm)."""


def alarm_row(probes: list[dict[str, Tensor]], threshold: float) -> dict[str, float]:
    """An epoch's alarm columns from its probes (one host read, at the end of the epoch):
    geometric mean and max of the tangent gradient ratio NIR / proxy, NLL min / max, and
    ``nir_inert`` (1 when every probe's ratio is below ``threshold``)."""
    stacked = {k: torch.stack([p[k].detach().double() for p in probes]) for k in probes[0]}
    ratio = stacked["grad_ratio"]
    finite = ratio[torch.isfinite(ratio)]
    values = torch.stack(
        [
            finite.clamp_min(1e-300).log().mean().exp()
            if finite.numel()
            else ratio.new_tensor(math.nan),
            finite.max() if finite.numel() else ratio.new_tensor(math.nan),
            stacked["nll_min"].min(),
            stacked["nll_max"].max(),
        ]
    ).tolist()
    inert = bool(finite.numel()) and values[1] < threshold
    return {
        "train/nir_grad_ratio": values[0],
        "train/nir_grad_ratio_max": values[1],
        "train/nll_min": values[2],
        "train/nll_max": values[3],
        "train/nir_inert": int(inert),
    }


def inert_message(row: dict[str, Any], cfg: RunConfig) -> str:
    """The one-line warning of an inert NIR epoch: what was measured, what to change."""
    n = cfg.loss.nir
    msg = (
        f"NIR is inert in epoch {row['epoch']}: its gradient on the embeddings stayed below "
        f"{n.alarm_threshold:g} of the proxy loss's (max {row['train/nir_grad_ratio_max']:.1e} "
        f"over the measured batches; NLL {row['train/nll_min']:.3g} to "
        f"{row['train/nll_max']:.3g}), so the regulariser does nothing. "
    )
    if n.detach_inputs or n.nir_scale == 0 or (n.nir_weight == 0 and n.objective != "exp_nll"):
        return msg + "Expected for this control (loss.nir.detach_inputs / nir_scale=0)."
    if n.objective == "exp_nll":
        return msg + (
            "exp_nll saturates once the flow fits the sphere: use a bounded objective "
            "(--set loss.nir.objective=noise_nll_spread or tangent_spread)."
        )
    return msg + "Raise loss.nir.nir_weight (or loss.nir.sigma for a bounded objective)."


def alarm_summary(history: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any] | None:
    """summary.json's ``nir_alarm``: threshold, per-epoch ratio, inert epochs."""
    rows = [r for r in history if "train/nir_grad_ratio" in r]
    if not rows:
        return None
    return {
        "threshold": cfg.loss.nir.alarm_threshold,
        "grad_ratio_per_epoch": [r["train/nir_grad_ratio"] for r in rows],
        "inert_epochs": [r["epoch"] for r in rows if r.get("train/nir_inert")],
        "final_grad_ratio": rows[-1]["train/nir_grad_ratio"],
    }


@dataclass
class RunResult:
    """What ``train`` returns: the run folder, its summary and the per-epoch history."""

    out_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- building


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU torch RNG seeded, restoring the global state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_loss(cfg: LossConfig, num_classes: int, embed_dim: int, seed: int = 0) -> nn.Module:
    """The proxy loss of ``cfg.name``, wrapped in NIRLoss when ``cfg.nir.enabled``
    (``seed``: the bounded objectives' noise generator)."""
    from nirdml.flow import ConditionalFlow
    from nirdml.losses import NIRLoss
    from nirdml.losses.nir import flow_dims
    from nirdml.losses.registry import LOSSES

    try:
        base = LOSSES[cfg.name].load()(num_classes, embed_dim, **cfg.params)
    except TypeError as exc:
        raise ValueError(f"loss.params for {cfg.name}: {exc}") from exc
    if not cfg.nir.enabled:
        return base
    f = cfg.nir.flow
    flow_dim, cond_dim = flow_dims(cfg.nir.objective, embed_dim)
    flow = ConditionalFlow(
        flow_dim,
        cond_dim=cond_dim,
        num_blocks=f.num_blocks,
        hidden_width=f.hidden_width,
        hidden_layers=f.hidden_layers,
        clamp=f.clamp,
        condition=f.condition,
        condition_blocks=f.condition_blocks,
    )
    return NIRLoss(
        base,
        objective=cfg.nir.objective,
        proxy_weight=cfg.nir.proxy_weight,
        nir_weight=cfg.nir.nir_weight,
        flow=flow,
        nll_cap=cfg.nir.nll_cap,
        sigma=cfg.nir.sigma,
        sigma_mode=cfg.nir.sigma_mode,
        ascend=cfg.nir.ascend,
        detach_inputs=cfg.nir.detach_inputs,
        nir_scale=cfg.nir.nir_scale,
        noise_seed=seed,
        # No per-step host sync: non-finite steps are skipped and counted by GuardedStep,
        # and a run of them stops training with a clear error.
        check_finite=False,
    )


def build_model_from_config(cfg: RunConfig) -> nn.Module:
    """The embedding model of ``cfg.model``, initialised from ``cfg.seed``."""
    from nirdml.models import build_model

    m = cfg.model
    return build_model(
        m.arch,
        m.embed_dim,
        pooling=m.pooling,
        pretrained=m.pretrained,
        weights=m.weights,
        freeze_bn=m.freeze_bn,
        freeze_bn_affine=m.freeze_bn_affine,
        in_channels=m.in_channels,
        seed=cfg.seed,
    )


def load_splits(cfg: RunConfig, progress: bool = False):
    """The dataset splits of ``cfg.data`` (train / test / optional val).

    With ``data.cache`` set, every split is served from a pre-resized uint8 cache in that
    folder (built on first use), so JPEG decoding does not bound training.
    """
    from nirdml.data import DatasetSplits, build_cache, cached, load_dataset

    d = cfg.data
    if d.root is None and d.name != "digits":
        raise ConfigError(
            f"data.root is not set: {d.name} is read from a folder you provide. Pass "
            f"--set data.root=/path/to/{d.name} (or data.root and data.download=true to fetch "
            "the public archives, where the dataset allows it)"
        )
    splits = load_dataset(
        d.name,
        d.root,
        transform_preset=d.transform,
        val_classes=d.val_classes,
        seed=cfg.seed,
        download=d.download,
        skip_corrupt=d.skip_corrupt,
        image_size=d.image_size,
        **d.options,
    )
    if d.cache is None:
        return splits

    def from_cache(split, name: str):
        if split is None:
            return None
        folder = Path(d.cache) / name
        build_cache(split, folder, num_workers=d.num_workers, progress=progress)
        return cached(split, folder)

    return DatasetSplits(
        from_cache(splits.train, "train"),
        from_cache(splits.test, "test"),
        from_cache(splits.val, "val"),
    )


class Criterion(nn.Module):
    """Model + loss as one module, so DDP synchronises the proxies and the flow too."""

    def __init__(self, model: nn.Module, loss: nn.Module, gather: Any = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.gather = gather

    def forward(self, images: Tensor, labels: Tensor, backbone_grad: bool = True) -> Tensor:
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            features = self.model.features(images)
        embeddings = self.model.embed(features)
        if self.gather is not None:
            embeddings, labels = self.gather(embeddings, labels)
        return self.loss(embeddings, labels)


# ----------------------------------------------------------------------------- evaluation


def eval_metrics(cfg: RunConfig) -> list[str]:
    from nirdml.evaluation import DEFAULT_METRICS

    if cfg.eval.metrics:
        return list(cfg.eval.metrics)
    return list(DEFAULT_METRICS.get(cfg.data.name, DEFAULT_METRICS["cub200"]))


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    metrics: list[str],
    num_clusters: int | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    seed: int,
    amp_dtype: torch.dtype | None = None,
    dist: DistContext | None = None,
) -> dict[str, float]:
    """Embed ``dataset`` with ``model`` and compute ``metrics`` (every test item a query)."""
    from nirdml.evaluation import compute_embeddings, evaluate

    if dist is not None and dist.enabled:
        embeddings, labels = dist.compute_embeddings(
            model,
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            amp=amp_dtype is not None,
        )
        if not dist.is_main:
            return {}
    else:
        embeddings, labels = compute_embeddings(
            model,
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            amp=amp_dtype is not None,
        )
    return evaluate(
        embeddings, labels, metrics=metrics, num_clusters=num_clusters, seed=seed, device=device
    )


# ----------------------------------------------------------------------------- the loop


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def _amp_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "none":
        return None
    if device.type != "cuda":
        warnings.warn(
            f"amp={cfg.amp} is only used on CUDA; running in fp32 on {device}", stacklevel=3
        )
        return None
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def default_out_dir(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """``runs/<name>``, or ``runs/<name>-N`` if that folder already holds a run."""
    base = Path(root) / cfg.name
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        candidate = Path(f"{base}-{n}")
        n += 1
    return candidate


def train(
    config: RunConfig | str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool | None = None,
    stop_after_epoch: int | None = None,
) -> RunResult:
    """Train one run; see the module docstring. ``stop_after_epoch`` ends early (tests)."""
    dist = DistContext.from_env()
    if resume:
        if out_dir is None:
            raise ValueError("resume=True needs the run folder to resume (out_dir)")
        out_dir = Path(out_dir)
        state = load_checkpoint(out_dir)
        cfg = load_config(state["config"])
    else:
        cfg = config if isinstance(config, RunConfig) else load_config(config)
        state = None
        out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
        if (out_dir / "checkpoints" / "last.pt").exists():
            raise FileExistsError(
                f"{out_dir} already holds a run; resume it with `nirdml train --resume {out_dir}` "
                "or choose another --out folder"
            )
    return _Run(cfg, out_dir, state, dist, progress).fit(stop_after_epoch)


class _Run:
    """State of one training run (private: the public API is :func:`train`)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: Path,
        state: dict[str, Any] | None,
        dist: DistContext,
        progress: bool | None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.dist = dist
        self.device = resolve_device(
            cfg.device, local_rank=dist.local_rank if dist.enabled else None
        )
        dist.init(self.device)
        dist.check_same(
            cfg.to_dict(), "config", "start every rank with the same preset and --set overrides"
        )
        dist.check_batch(cfg.data.batch_size)
        self.progress = (cfg.log.progress if progress is None else progress) and dist.is_main
        self.amp_dtype = _amp_dtype(cfg, self.device)

        with dist.main_first():  # downloads, caches and weights fetched once
            if cfg.model.frozen:  # a head on cached features (nirdml.training.features)
                from nirdml.training.features import build_head_model, load_feature_splits

                self.splits = load_feature_splits(cfg, progress=self.progress)
                self.image_check = {"checked": 0, "skipped": "frozen: checked by the cache build"}
                model = build_head_model(
                    cfg, self.splits.train.num_features, self.splits.cache.meta["backbone"]
                )
            else:
                self.splits = load_splits(cfg, progress=self.progress)
                self.image_check = check_images(
                    cfg, self.splits, progress=self.progress, echo=dist.is_main
                )
                model = build_model_from_config(cfg)
        train_set = self.splits.train
        if dist.enabled and cfg.model.sync_bn:
            model, _ = convert_sync_batchnorm(model, self.device)
        else:
            dist.warn_unsynced_batchnorm(model)
        with seeded(cfg.seed + 1):
            loss = build_loss(cfg.loss, train_set.num_classes, cfg.model.embed_dim, cfg.seed)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        self.loss = loss.to(self.device)
        if cfg.compile:
            # The embedding network (backbone, pooling, head); the flow and the losses stay
            # eager: their hand-written backward already fuses the chain (docs/guide/speed.md).
            model.features = CompiledOrEager(model.features, f"the {cfg.model.arch} backbone")

        from nirdml.data import ClassBalancedBatchSampler

        d = cfg.data
        self.batch_sampler = ClassBalancedBatchSampler(
            train_set.labels,
            d.batch_size,
            d.samples_per_class,
            replacement=d.sampler == "authors",
            seed=cfg.seed,
            num_replicas=1,  # the GLOBAL batches; each rank takes its slice of every one
            rank=0,
        )
        self.loader, self.seeded_sampler = train_loader(
            train_set,
            dist.shard(self.batch_sampler, d.batch_size),
            seed=cfg.seed,
            num_workers=d.num_workers,
            rank_offset=slice_bounds(d.batch_size, dist.world_size, dist.rank)[0],
            pin_memory=self.device.type == "cuda",
        )

        self._criterion = Criterion(self.model, self.loss, dist.gather_fn(d.batch_size))
        self.criterion: nn.Module = self._criterion
        self._wrapped_backbone: bool | None = None  # whether the DDP module trains the backbone
        self.optimizer = build_optimizer(param_groups(self.model, self.loss, cfg.optim), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.step = GuardedStep(self.optimizer, self.device, fp16=self.amp_dtype == torch.float16)

        self.metrics = eval_metrics(cfg)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.start_epoch = 0
        self.global_step = 0
        self.train_time = 0.0
        self.images_seen = 0
        if state is not None:
            self._restore(state)
            if dist.is_main:
                done = self.start_epoch >= cfg.epochs
                print(
                    f"{out_dir}: all {cfg.epochs} epochs are done; nothing to resume"
                    if done
                    else f"resuming {out_dir} from epoch {self.start_epoch + 1}/{cfg.epochs} "
                    f"(last checkpoint: end of epoch {self.start_epoch})",
                    flush=True,
                )

        self.loggers = None
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
            self.loggers = ExternalLoggers(
                out_dir,
                tensorboard=cfg.log.tensorboard,
                wandb=cfg.log.wandb,
                wandb_project=cfg.log.wandb_project,
                wandb_mode=cfg.log.wandb_mode,
                run_name=cfg.name,
                config=cfg.to_dict(),
            )

    # -- checkpoints

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "version": nirdml.__version__,
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "model": _unwrap(self.model).state_dict(),
            "model_spec": dict(getattr(_unwrap(self.model), "spec", {})),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "step_guard": self.step.state_dict(),
            "sampler": {"seed": self.cfg.seed, "epoch": epoch + 1, "position": 0},
            "history": self.history,
            "best": self.best,
            "train_time_s": self.train_time,
            "images_seen": self.images_seen,
            "num_classes": self.splits.train.num_classes,
            "class_names": {"train": list(self.splits.train.class_names)},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        self.step.load_state_dict(state["step_guard"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = int(state["epoch"]) + 1
        self.global_step = int(state["global_step"])
        self.train_time = float(state["train_time_s"])
        self.images_seen = int(state["images_seen"])

    def _save(self, epoch: int, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        state = self._state(epoch)
        ckpt = self.out_dir / "checkpoints"
        save_checkpoint(ckpt / "last.pt", state)
        if is_best:
            save_checkpoint(ckpt / "best.pt", state)

    # -- one epoch

    def _wrap(self, backbone_grad: bool) -> None:
        """(Re)build the DDP module when the trained parameters change (end of warmup)."""
        if self._wrapped_backbone is backbone_grad:
            return
        self.criterion = self._criterion  # drops the previous DDP module and its hooks
        exclude = () if backbone_grad else list(self.model.backbone_parameters())
        self.criterion = self.dist.wrap(self._criterion, self.device, exclude)
        self._wrapped_backbone = backbone_grad

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        backbone_grad = epoch >= cfg.optim.warmup_epochs
        self._wrap(backbone_grad)
        self.criterion.train()
        self.seeded_sampler.set_epoch(epoch)
        if hasattr(self.splits.train, "set_epoch"):  # cached features: the epoch's views
            self.splits.train.set_epoch(epoch)
        sums: dict[str, Tensor] = {}
        skipped_before = self.step.skipped.clone()
        reader = HostReader(self.device)  # progress is read one interval late: no sync
        self._last_read = {"skipped": float(skipped_before), "steps": 0.0}
        n_steps, n_images = 0, 0
        start = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(self.loader),
                desc=f"epoch {epoch + 1}/{cfg.epochs}" + (" (warmup)" if not backbone_grad else ""),
                leave=False,
                dynamic_ncols=True,
            )
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        alarm = cfg.loss.nir.enabled and cfg.loss.nir.alarm
        probes: list[dict[str, Tensor]] = []
        for images, labels in self.loader:
            log_step = (n_steps + 1) % LOG_EVERY == 0 or n_steps + 1 == len(self.loader)
            if alarm and log_step:  # the alarm's gradients, on this interval's last batch
                self.loss.diagnose_next = True
            stats = self._train_step(images, labels, backbone_grad, autocast)
            probe = {k: stats.pop(k) for k in ALARM_KEYS if k in stats}
            if probe:
                probes.append(probe)
            for k, v in stats.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v.clone()
            n_steps += 1
            n_images += cfg.data.batch_size  # the global batch, over all ranks
            self.global_step += 1
            if n_steps % LOG_EVERY == 0 or n_steps == len(self.loader):
                progress = {"skipped": self.step.skipped}
                progress.update({k: sums[k] for k in ("loss", "nll") if k in sums})
                if probe:
                    progress["grad_ratio"] = probe["grad_ratio"]
                read = reader.submit(progress, steps=n_steps)
                if read is not None:
                    self._progress(read, bar, n_images / max(time.perf_counter() - start, 1e-9))
                    self._check_skips(read, epoch)
        read = reader.flush()
        if read is not None:  # the last interval: the bar reaches 100%
            self._progress(read, bar, n_images / max(time.perf_counter() - start, 1e-9))
            self._check_skips(read, epoch)
        if bar is not None:
            bar.refresh()  # show the full bar even when the last update came within mininterval
            bar.close()
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        self.images_seen += n_images
        row = {f"train/{k}": (v / max(n_steps, 1)).item() for k, v in sums.items()}
        if "capped" in sums:  # a count, not a mean
            row["train/capped"] = sums["capped"].item()
        if probes:
            row.update(alarm_row(probes, cfg.loss.nir.alarm_threshold))
        row["train/skipped_steps"] = int((self.step.skipped - skipped_before).item())
        row["train/images_per_s"] = n_images / max(elapsed, 1e-9)
        row["train/epoch_time_s"] = elapsed
        return row

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
            loss = self.criterion(images, labels, backbone_grad)
        self.step(loss)
        return {"loss": loss.detach(), **getattr(self.loss, "last_stats", {})}

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

    def _check_skips(self, read: dict[str, float], epoch: int) -> None:
        """Stop after MAX_CONSECUTIVE_SKIPS consecutive skipped steps (counted on the
        device, read one logging interval late)."""
        last, self._last_read = self._last_read, read
        new = int(read["skipped"] - last["skipped"])
        window = int(read["steps"] - last["steps"])
        self._consecutive = getattr(self, "_consecutive", 0)
        self._consecutive = self._consecutive + new if new == window else 0
        if self._consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(
                f"the loss or its gradients were inf/NaN for {self._consecutive} consecutive "
                f"steps (epoch {epoch + 1}); nothing was updated in those steps. Fixes: lower "
                "optim.lr or optim.proxy_lr_mult/flow_lr_mult, use loss.nir.objective=nll, or "
                "amp=none; check the data for NaN/inf inputs. The last good checkpoint is "
                "checkpoints/last.pt."
            )

    # -- evaluation and selection

    def _num_clusters(self, split: str) -> int | None:
        if self.cfg.eval.num_clusters == "train_classes":
            return self.splits.train.num_classes
        return None  # evaluate() uses the number of classes in the evaluated split

    def _evaluate(self, epoch: int) -> dict[str, float]:
        row: dict[str, float] = {}
        splits = [("test", self.splits.test)]
        if self.splits.val is not None:
            splits.append(("val", self.splits.val))
        model = _unwrap(self.model)
        self.dist.sync_buffers(model)  # every shard embedded with rank 0's BN statistics
        for name, dataset in splits:
            metrics = evaluate_model(
                model,
                dataset,
                metrics=self.metrics,
                num_clusters=self._num_clusters(name),
                batch_size=self.cfg.eval.batch_size,
                num_workers=self.cfg.data.num_workers,
                device=self.device,
                seed=self.cfg.seed,
                amp_dtype=self.amp_dtype,
                dist=self.dist,
            )
            row.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
        return row

    def _update_best(self, epoch: int, row: dict[str, Any]) -> bool:
        split = "val" if self.splits.val is not None else "test"
        key = f"{split}/{self.cfg.eval.select_metric}"
        if key not in row:
            raise ValueError(
                f"eval.select_metric {self.cfg.eval.select_metric!r} is not among the "
                f"computed metrics {self.metrics}; add it to eval.metrics"
            )
        value = row[key]
        if not self.best or value > self.best["value"]:
            self.best = {
                "epoch": epoch + 1,
                "selected_on": split,
                "metric": self.cfg.eval.select_metric,
                "value": value,
                "metrics": {k: v for k, v in row.items() if k.split("/")[0] in ("test", "val")},
            }
            return True
        return False

    # -- the run

    def fit(self, stop_after_epoch: int | None = None) -> RunResult:
        cfg = self.cfg
        last_eval_epoch = -1
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                row: dict[str, Any] = {"epoch": epoch + 1, **group_lrs(self.optimizer)}
                row.update(self._train_epoch(epoch))
                self.scheduler.step()
                is_best = False
                if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
                    row.update(self._evaluate(epoch))
                    row = self.dist.broadcast_object(row)  # rank 0's metrics on every rank
                    is_best = self._update_best(epoch, row)
                    last_eval_epoch = epoch
                self.history.append(row)
                if row.get("train/nir_inert") and self.dist.is_main:
                    warnings.warn(inert_message(row, self.cfg), NIRInertWarning, stacklevel=2)
                self._save(epoch, is_best)
                if self.dist.is_main:
                    write_history(self.out_dir, self.history)
                    plot_curves(self.out_dir / "curves.png", self.history, cfg.eval.select_metric)
                    self.loggers.log(row, step=epoch + 1)
                    self._print_epoch(row)
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                    break
        finally:
            if self.loggers is not None:
                self.loggers.close()
        del last_eval_epoch
        summary = self._summary()
        if self.dist.is_main:
            atomic_write_json(self.out_dir / "summary.json", summary)
        return RunResult(self.out_dir, summary, list(self.history))

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

    def _summary(self) -> dict[str, Any]:
        evaluated = [r for r in self.history if any(k.startswith("test/") for k in r)]
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
            "epochs_run": len(self.history),
            "epochs": self.cfg.epochs,
            "best": self.best,
            "best_selected_on": self.best.get("selected_on"),
            "best_test_epoch": (
                {
                    "epoch": best_test["epoch"],
                    "metrics": {k: v for k, v in best_test.items() if k.startswith("test/")},
                }
                if best_test
                else None
            ),
            "final": self.history[-1] if self.history else None,
            "skipped_steps": int(sum(r.get("train/skipped_steps", 0) for r in self.history)),
            "image_check": self.image_check,
            "corrupt_images": corrupt_summary(self.splits),
            "classes": {
                n: s.num_classes
                for n, s in (("train", self.splits.train), ("val", self.splits.val))
                + (("test", self.splits.test),)
                if s is not None
            },
            "nir_alarm": alarm_summary(self.history, self.cfg),
            "train_time_s": self.train_time,
            "images_per_s": self.images_seen / max(self.train_time, 1e-9),
            "out_dir": str(self.out_dir),
        }
