"""Config to objects: every step that turns a :class:`RunConfig` into the parts of a run.

The training loop (trainer.py), a finished run's artifacts (artifacts.py), the analysis and
the benchmarks build through these functions, so each config field is read in one place.
A builder takes the config section it needs and hands plain keyword arguments to the
lower layers (data, models, losses, evaluation), which never see a config object. All
randomness comes from the config's seed through local generators or :func:`seeded`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nirdml.data.registry import DATASETS, SAMPLERS, dataset_name
from nirdml.data.samplers import slice_bounds
from nirdml.errors import ConfigError
from nirdml.losses import ProxyCriterion
from nirdml.losses.registry import LOSSES
from nirdml.models.batchnorm import convert_sync_batchnorm
from nirdml.training.compiled import CompiledOrEager
from nirdml.training.config import (
    AMP_DTYPES,
    DataConfig,
    LossConfig,
    RunConfig,
    check_data_root,
)
from nirdml.training.datacheck import check_images
from nirdml.training.distributed import DistContext
from nirdml.training.loader import SeededBatchSampler, train_loader


def options_for(fn: Callable[..., Any], section: Any) -> dict[str, Any]:
    """The fields of a config section that ``fn`` takes as parameters, by name.

    Config fields are named after the parameters of the function they feed (``model.*``
    after ``build_model``, ``data.*`` after ``load_dataset``, ``loss.nir.*`` after
    ``NIRLoss``, ``loss.nir.flow.*`` after ``ConditionalFlow``), so no field is copied by
    hand; the other fields (``loss.nir.alarm``, ``data.batch_size``...) are the loop's.
    """
    params = inspect.signature(fn).parameters
    return {
        f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in params
    }


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU torch RNG seeded, restoring the global state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (:data:`~nirdml.training.config.AMP_DTYPES`); None for
    "none", and off CUDA (with a warning)."""
    name = AMP_DTYPES[amp]
    if name is None:
        return None
    if device.type != "cuda":
        warnings.warn(f"amp={amp} is only used on CUDA; running in fp32 on {device}", stacklevel=3)
        return None
    return getattr(torch, name)


# ----------------------------------------------------------------------------- loss


def build_loss(cfg: LossConfig, num_classes: int, embed_dim: int, seed: int = 0) -> ProxyCriterion:
    """The proxy loss of ``cfg.name``, wrapped in NIRLoss when ``cfg.nir.enabled``
    (``seed``: the bounded objectives' noise generator)."""
    from nirdml.flow import ConditionalFlow
    from nirdml.losses import NIRLoss
    from nirdml.losses.nir import flow_dims

    try:
        base = LOSSES[cfg.name].load()(num_classes, embed_dim, **cfg.params)
    except TypeError as exc:
        raise ConfigError(f"loss.params for {cfg.name}: {exc}") from exc
    if not cfg.nir.enabled:
        return base
    flow_dim, cond_dim = flow_dims(cfg.nir.objective, embed_dim)
    options = options_for(NIRLoss, cfg.nir)
    options["flow"] = ConditionalFlow(
        flow_dim, cond_dim=cond_dim, **options_for(ConditionalFlow, cfg.nir.flow)
    )
    # No per-step host sync: non-finite steps are skipped and counted by GuardedStep, and a
    # run of them stops training with a clear error.
    return NIRLoss(base, noise_seed=seed, check_finite=False, **options)


def run_loss(cfg: RunConfig, num_classes: int) -> ProxyCriterion:
    """The loss module of a run, initialised as training does (proxies from seed + 1)."""
    with seeded(cfg.seed + 1):
        return build_loss(cfg.loss, num_classes, cfg.model.embed_dim, cfg.seed)


# ----------------------------------------------------------------------------- model


def build_model_from_config(cfg: RunConfig) -> nn.Module:
    """The embedding model of ``cfg.model``, initialised from ``cfg.seed``."""
    from nirdml.models import build_model

    return build_model(**options_for(build_model, cfg.model), seed=cfg.seed)


def build_head_model(cfg: RunConfig, num_features: int, spec: Mapping[str, Any]) -> nn.Module:
    """The trained model of a cached-feature run (``spec``: its backbone, see
    ``features.backbone_spec``), the head initialised from ``cfg.seed`` (local RNG).

    Without a cut: the head on ``num_features``-wide cached features. With a cut: the
    backbone's stages from the cut on (starting from its weights) + pooling + the head.
    """
    from nirdml.models import FeatureHead, HeadModel
    from nirdml.models.head import backbone_for, split_backbone

    m = cfg.model
    upper = pool = None
    if spec.get("cut") is not None:
        with seeded(cfg.seed):
            net = backbone_for({"backbone": spec})
        _, upper = split_backbone(net.backbone, spec["cut"], spec["arch"])
        pool, num_features = net.pool, net.num_features
    with seeded(cfg.seed):
        head = FeatureHead(
            num_features,
            m.embed_dim,
            m.head,
            m.head_hidden,
            m.head_norm,
            m.head_dropout,
            seed=cfg.seed,
        )
    return HeadModel(head, spec, upper, pool)


def place_model(
    model: nn.Module, cfg: RunConfig, dist: DistContext, device: torch.device
) -> nn.Module:
    """``model`` ready to train on ``device``: synchronised BatchNorm when distributed
    (``model.sync_bn``), channels-last memory, and the compiled embedding network
    (``compile``; the flow and losses stay eager, their backward is fused by hand)."""
    if dist.enabled and cfg.model.sync_bn:
        model, _ = convert_sync_batchnorm(model, device)
    else:
        dist.warn_unsynced_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    if cfg.compile:
        model.features = CompiledOrEager(model.features, f"the {cfg.model.arch} backbone")
    return model


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


# ----------------------------------------------------------------------------- data


def load_splits(cfg: RunConfig, progress: bool = False) -> Any:
    """The dataset splits of ``cfg.data`` (train / test / optional val).

    With ``data.cache`` set, every split is served from a pre-resized uint8 cache in that
    folder (built on first use), so JPEG decoding does not bound training.
    """
    from nirdml.data import DatasetSplits, build_cache, cached, load_dataset

    d = cfg.data
    check_data_root(d, exists=False)  # a missing root: the dataset's own error says more
    splits = load_dataset(
        **options_for(load_dataset, d), transform_preset=d.transform, seed=cfg.seed, **d.options
    )
    if d.cache is None:
        return splits

    def from_cache(split: Any, name: str) -> Any:
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


@dataclass
class RunData:
    """A run's splits, what the image check found, and its (untrained) model."""

    splits: Any
    image_check: dict[str, Any]
    model: nn.Module


def load_run_data(cfg: RunConfig, *, progress: bool, echo: bool) -> RunData:
    """The splits and model of a run: images and the embedding model, or with
    ``model.frozen`` the cached backbone features and a head (nirdml.training.features).
    ``echo``: print the image check's findings (rank 0)."""
    if cfg.model.frozen:
        from nirdml.training.features import backbone_spec, load_feature_splits

        splits = load_feature_splits(cfg, progress=progress)
        model = build_head_model(cfg, splits.train.num_features, backbone_spec(cfg))
        return RunData(
            splits, {"checked": 0, "skipped": "frozen: checked by the cache build"}, model
        )
    splits = load_splits(cfg, progress=progress)
    check_batch_fits(splits.train, splits.val, cfg.data)
    image_check = check_images(cfg, splits, progress=progress, echo=echo)
    return RunData(splits, image_check, build_model_from_config(cfg))


def check_batch_fits(train: Any, val: Any, d: DataConfig) -> None:
    """A ConfigError naming the settings that fix it when the training split (after the
    validation carve took ``val``) holds fewer images than one batch of ``data.batch_size``
    (checked before the images are read or a feature cache is extracted)."""
    n, m = len(train), d.samples_per_class
    if n >= d.batch_size:
        return
    fits = n // m * m
    fixes = []
    if fits >= 2:
        fixes.append(f"--set data.batch_size={fits} (a multiple of data.samples_per_class={m})")
    carved = ""
    if val is not None:
        carved = f" after data.val_classes took {val.num_classes} classes for validation"
        fixes.append(
            f"fewer validation classes (--set data.val_classes=N, N < {val.num_classes}; 0 "
            f"trains on all {n + len(val)} images and selects the epoch on test)"
        )
    fixes.append("more images per class or more classes")
    raise ConfigError(
        f"the training split holds {n} images in {train.num_classes} classes{carved}: no "
        f"full batch of data.batch_size={d.batch_size}. Fix: " + ", or ".join(fixes)
    )


def train_batches(
    train_set: Any, d: DataConfig, *, seed: int, dist: DistContext, device: torch.device
) -> tuple[DataLoader, SeededBatchSampler]:
    """The training DataLoader: class-balanced GLOBAL batches (``data.batch_size``), this
    rank's slice of each, augmentation seeded by the slot in the global batch."""
    from nirdml.data import ClassBalancedBatchSampler

    batches = ClassBalancedBatchSampler(
        train_set.labels,
        d.batch_size,
        d.samples_per_class,
        replacement=SAMPLERS[d.sampler],
        seed=seed,
        num_replicas=1,  # the GLOBAL batches; each rank takes its slice of every one
        rank=0,
    )
    return train_loader(
        train_set,
        dist.shard(batches, d.batch_size),
        seed=seed,
        num_workers=d.num_workers,
        rank_offset=slice_bounds(d.batch_size, dist.world_size, dist.rank)[0],
        pin_memory=device.type == "cuda",
    )


# ----------------------------------------------------------------------------- evaluation


def eval_num_clusters(cfg: RunConfig, num_train_classes: int) -> int | None:
    """k of k-means (``eval.num_clusters``): the training classes (the authors' code), or
    None: the classes of the evaluated split (the standard)."""
    return num_train_classes if cfg.eval.num_clusters == "train_classes" else None


def eval_metrics(cfg: RunConfig) -> list[str]:
    """``eval.metrics``, or the dataset's standard set."""
    if cfg.eval.metrics:
        return list(cfg.eval.metrics)
    return list(DATASETS[dataset_name(cfg.data.name)].metrics)


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
    no_relevant: str = "skip",
    average: str = "queries",
) -> dict[str, float]:
    """Embed ``dataset`` with ``model`` and compute ``metrics``: every item queries all the
    others, or, for a query/gallery split (``dataset.is_query`` / ``dataset.is_gallery``,
    e.g. In-Shop's test split), its queries search its gallery (an item in both never
    retrieves itself). ``no_relevant`` / ``average``: see ``nirdml.evaluation.evaluate``."""
    from nirdml.evaluation import compute_embeddings, evaluate

    sharded = dist is not None and dist.enabled
    embed = dist.compute_embeddings if sharded else compute_embeddings
    embeddings, labels = embed(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        amp=amp_dtype is not None,
    )
    if sharded and not dist.is_main:
        return {}
    is_query, is_gallery = query_gallery_roles(dataset)
    return evaluate(
        embeddings,
        labels,
        metrics=metrics_for_roles(metrics, is_query, is_gallery),
        is_query=is_query,
        is_gallery=is_gallery,
        no_relevant=no_relevant,
        average=average,
        num_clusters=num_clusters,
        seed=seed,
        device=device,
    )


def query_gallery_roles(dataset: Any) -> tuple[Any, Any]:
    """``(is_query, is_gallery)`` of a query/gallery split, ``(None, None)`` otherwise (every
    item queries all others; also image-free feature splits, which carry no roles)."""
    return getattr(dataset, "is_query", None), getattr(dataset, "is_gallery", None)


def metrics_for_roles(metrics: list[str], is_query: Any, is_gallery: Any) -> list[str]:
    """``metrics`` without the ones defined only when every query is a gallery item
    (map@K_authors) when some queries are not (a warning names them): a dataset's default
    set stays usable on its query/gallery split."""
    from nirdml.evaluation.registry import normalise_metric_name, parse_metric

    if is_query is None or is_gallery is None or bool(is_gallery[is_query].all()):
        return metrics
    dropped = [m for m in metrics if parse_metric(normalise_metric_name(m))[0].self_only]
    if dropped:
        warnings.warn(
            f"{', '.join(dropped)} left out: defined only when every query is also a gallery "
            "item, which this query/gallery split does not have (use map@K or map@K_hits)",
            stacklevel=3,
        )
    return [m for m in metrics if m not in dropped]
