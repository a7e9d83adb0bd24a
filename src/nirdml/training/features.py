"""The feature cache: run the frozen part of a backbone once, train many models on it.

:func:`build_feature_cache` runs the frozen part of a config's backbone (eval mode) over its
dataset and stores what it outputs in memory-mapped ``.npy`` files. Without ``model.cut``
that is the whole backbone + pooling (pooled features: a head trains on them); with a cut
(``model.cut=stage7``) it is the stages before the cut, and the cache holds their
activation maps (C x H x W): the stages from the cut on train with the head over them
(partial fine-tuning, :class:`~nirdml.models.HeadModel` with ``upper``).

- ``test.npy`` (test split, test transform) and ``train_plain.npy`` (every training-class
  image, test transform: the validation split is carved from these at training time, so
  one cache serves every run seed);
- ``train_views.npy`` (``views`` x images x item): each training image under ``views``
  augmentations of the train transform, view ``v`` of image ``i`` drawn with the CPU RNG
  seeded from ``(view_seed, i, v)`` inside ``torch.random.fork_rng`` (the global RNG is
  left as it was), so the cache does not depend on batching, workers or resumes.

Before anything is written the cache's size is printed and checked against the free disk
space. Images are processed in fixed batches; after each batch the arrays are flushed and
the batch count is written atomically to ``.partial/progress.json``, so a killed extraction
resumes at its next batch and produces the same bytes as an uninterrupted one. The arrays
live in ``DIR/.partial/`` until the end, then move into ``DIR`` and ``meta.json`` is written
last (atomically): a folder without ``meta.json`` is never read as a cache.

``meta.json`` records what the cache depends on: backbone spec and cut, weights identity
(file size + sha256), transform and image size, dataset and split fingerprints (relative
file paths + sizes + labels), dtype and views. A cache that does not match a config is
refused with the list of what differs (:class:`FeatureCacheMismatch`), e.g.
``backbone.cut: cache 'stage7', config 'head'``.

:func:`load_feature_splits` gives the training / validation / test splits of a config as
feature datasets (the trainer uses it under ``model.frozen=true``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nirdml.errors import InputError, InsufficientDiskError, MissingFileError
from nirdml.runtime import atomic_write_json, resolve_device, usable_workers
from nirdml.training.config import ConfigError, RunConfig, load_config, transform_preset

FEATURE_FORMAT = 1
META = "meta.json"
PARTIAL = ".partial"
#: Keys recorded in meta.json that do not have to match the config.
_NOT_COMPARED = ("view_seed", "dataset.root", "num_features", "item_shape", "stats")


class FeatureCacheMismatch(ConfigError):
    """A feature cache was built for another backbone, transform, dataset, dtype or views."""


# ----------------------------------------------------------------------------- fingerprints


def split_fingerprint(split: Any, root: str | None) -> dict[str, Any]:
    """Identity of a split's items: relative paths + file sizes + labels (sha256) and counts.

    In-memory datasets (digits, Omniglot npz) hash their pixel arrays instead of files.
    """
    h = hashlib.sha256()
    paths = split.paths
    if paths is not None:
        base = Path(root).expanduser() if root else None
        for p in paths:
            rel = os.path.relpath(p, base) if base is not None else p
            h.update(f"{rel}\0{os.path.getsize(p)}\n".encode())
    else:
        array = getattr(split.storage, "array", None)
        if array is None:
            raise InputError(f"cannot fingerprint {split.describe()}: no file paths or arrays")
        h.update(np.ascontiguousarray(array[split.index]).tobytes())
    h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
    h.update("\n".join(split.class_names).encode())
    return {"items": len(split), "classes": int(split.num_classes), "sha256": h.hexdigest()}


def backbone_spec(cfg: RunConfig) -> dict[str, Any]:
    """The backbone of a cached-feature run: how it is built, the identity of its weights,
    and where it is cut (``cut``: None caches pooled features)."""
    from nirdml.models import weights_identity
    from nirdml.models.factory import _resolve_pretrained

    m = cfg.model
    weights = None if m.weights is None else str(Path(m.weights).expanduser())
    pretrained = _resolve_pretrained(m.arch, m.pretrained, from_file=weights is not None)
    return {
        "arch": m.arch,
        "pooling": m.pooling,
        "pretrained": pretrained,
        "weights": weights,
        "in_channels": m.in_channels,
        "seed": cfg.seed if not pretrained and weights is None else 0,
        "weights_identity": weights_identity(m.arch, pretrained, weights, cfg.seed),
        "cut": m.cut,
        "freeze_bn": m.freeze_bn,
        "freeze_bn_affine": m.freeze_bn_affine,
    }


def cache_identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What of a backbone spec the cached arrays depend on: not the BatchNorm options of the
    trained stages, and with a cut not the pooling (both act above the cache)."""
    drop = {"freeze_bn", "freeze_bn_affine"} | ({"pooling"} if spec.get("cut") else set())
    return {k: v for k, v in spec.items() if k not in drop}


def _image_splits(cfg: RunConfig):
    """The config's train (all training classes, not carved) and test image splits."""
    import copy

    from nirdml.training.build import load_splits

    uncarved = copy.deepcopy(cfg)
    uncarved.data.val_classes = 0.0
    uncarved.data.cache = None
    return load_splits(uncarved)


def expected_meta(cfg: RunConfig, splits: Any | None = None) -> dict[str, Any]:
    """What ``meta.json`` of a cache for ``cfg`` must say (minus the build statistics)."""
    from nirdml.data import build_transforms

    d = cfg.data
    splits = _image_splits(cfg) if splits is None else splits
    preset = transform_preset(d)
    return {
        "format": FEATURE_FORMAT,
        "backbone": cache_identity(backbone_spec(cfg)),
        "transform": {
            "preset": preset,
            "image_size": d.image_size,
            "train": repr(build_transforms(preset, True, d.image_size)),
            "test": repr(build_transforms(preset, False, d.image_size)),
        },
        "dataset": {
            "name": d.name,
            "root": d.root,
            "options": dict(d.options),
            "skip_corrupt": d.skip_corrupt,
            "train": split_fingerprint(splits.train, d.root),
            "test": split_fingerprint(splits.test, d.root),
        },
        "dtype": d.feature_dtype,
        "views": d.feature_views,
    }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def meta_differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Lines ``key: cache X, config Y`` for every compared key that differs."""
    a, b = _flatten(found), _flatten(wanted)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in _NOT_COMPARED):
            continue
        if a.get(key) != b.get(key):
            lines.append(f"{key}: cache {a.get(key)!r}, config {b.get(key)!r}")
    return lines


def _refuse(where: Path, diffs: list[str], partial: bool) -> FeatureCacheMismatch:
    what = "an unfinished extraction for another config" if partial else "a feature cache"
    shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 8 else "")
    fix = (
        f"delete {where} to restart it"
        if partial
        else "extract a new cache into another folder (--set data.features=NEW_DIR, or "
        "`nirdml features ... --out NEW_DIR`), or delete this one"
    )
    return FeatureCacheMismatch(
        f"{where} holds {what} that does not match this config: {shown}. Fix: {fix}"
    )


# ----------------------------------------------------------------------------- the cache


@dataclass
class FeatureCache:
    """An extracted cache: memory-mapped arrays + its ``meta.json``."""

    path: Path
    meta: dict[str, Any]
    test: np.ndarray
    train_plain: np.ndarray
    train_views: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.test.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.test, self.train_plain, self.train_views))

    @classmethod
    def open(cls, path: str | Path, expected: Mapping[str, Any] | None = None) -> FeatureCache:
        """Open a finished cache; with ``expected`` (see :func:`expected_meta`) check it."""
        path = Path(path)
        meta_file = path / META
        if not meta_file.is_file():
            raise MissingFileError(
                f"{path} is not a finished feature cache (no {META}); build it with "
                "`nirdml features CONFIG --out DIR` or build_feature_cache(cfg, DIR)"
            )
        meta = json.loads(meta_file.read_text())
        if expected is not None:
            diffs = meta_differences(meta, expected)
            if diffs:
                raise _refuse(path, diffs, partial=False)
        arrays = {
            name: np.load(path / f"{name}.npy", mmap_mode="r")
            for name in ("test", "train_plain", "train_views")
        }
        return cls(path, meta, **arrays)


class _ExtractionItems(Dataset):
    """Item ``k`` of the extraction's flat job list -> (image tensor, k)."""

    def __init__(self, jobs: list[tuple[str, Any, int | None, int]], view_seed: int) -> None:
        self.jobs = jobs  # (array, dataset, view, count) in extraction order
        self.view_seed = view_seed
        self.starts = np.cumsum([0] + [j[3] for j in jobs])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, k: int) -> tuple[int, int]:
        j = int(np.searchsorted(self.starts, k, side="right") - 1)
        return j, k - int(self.starts[j])

    def __getitem__(self, k: int) -> tuple[Any, int]:
        j, row = self.locate(k)
        _, dataset, view, _ = self.jobs[j]
        if view is None:
            return dataset[row][0], k
        seed = int(np.random.SeedSequence([self.view_seed, row, view]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return dataset[row][0], k


def build_feature_cache(
    config: RunConfig | str | Path,
    out_dir: str | Path | None = None,
    *,
    view_seed: int = 0,
    batch_size: int = 16,
    num_workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    splits: Any | None = None,
) -> FeatureCache:
    """Extract (or resume, or reuse) the feature cache of ``config`` in ``out_dir``.

    ``out_dir`` defaults to ``config.data.features``. A finished cache that matches is
    returned as is; one that does not match raises :class:`FeatureCacheMismatch`. The
    cache's size is printed before anything is written and checked against the free disk
    space (:class:`~nirdml.errors.InsufficientDiskError`). ``on_batch(done)`` is called after
    each batch is safely recorded (tests use it to interrupt an extraction). ``batch_size``
    16: on a CPU, larger batches are slower (EfficientNet-Lite0 at 128 px, one core: 70
    images/s at 16, 43 at 32, 18 at 64), as activations above glibc's 32 MB mmap threshold
    are mapped and page-faulted anew on every call. ``splits``: the config's uncarved image
    splits, when the caller has them already.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    dev = resolve_device(device)  # before anything is read or written
    out = _cache_folder(cfg, out_dir)
    splits = _image_splits(cfg) if splits is None else splits
    if not (out / META).is_file():  # the images will be read: check them first
        from nirdml.training.datacheck import check_images

        check_images(cfg, splits, progress=progress)
    wanted = expected_meta(cfg, splits)
    if (out / META).is_file():
        return FeatureCache.open(out, wanted)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    extraction = _Extraction(out, wanted, dev, batch_size, workers, on_batch)
    return extraction.run(cfg, splits, view_seed, progress)


@dataclass
class _Extraction:
    """One extraction into ``out``: into its partial folder (resumed where a killed one
    stopped), then moved into place."""

    out: Path
    wanted: Mapping[str, Any]
    device: torch.device
    batch_size: int
    workers: int
    on_batch: Callable[[int], None] | None

    def run(self, cfg: RunConfig, splits: Any, view_seed: int, progress: bool) -> FeatureCache:
        out, wanted, dev = self.out, self.wanted, self.device
        partial = out / PARTIAL
        view_seed = _resumable_view_seed(partial, wanted, view_seed)
        extractor = _extractor(wanted["backbone"]).to(dev).eval()
        jobs = _extraction_jobs(cfg, splits, wanted)
        items = _ExtractionItems(jobs, view_seed)
        with torch.inference_mode():
            item_shape = tuple(extractor(items[0][0][None].to(dev)).shape[1:])
        shapes = _array_shapes(jobs, item_shape)
        dtype = np.dtype(cfg.data.feature_dtype)
        _check_disk(out, partial, shapes, dtype, echo=progress)
        # Nothing was written before this line.
        done = _start_partial(partial, wanted, view_seed)
        arrays = _open_arrays(partial, shapes, dtype, resume=done > 0)
        start = time.perf_counter()
        extracted = _extract(
            extractor,
            items,
            _fixed_batches(items, jobs, self.batch_size),
            arrays,
            partial,
            done,
            dev,
            workers=self.workers,
            label=_progress_label(cfg, wanted) if progress else None,
            on_batch=self.on_batch,
        )
        elapsed = time.perf_counter() - start
        del arrays
        meta = {**wanted, "view_seed": view_seed, "item_shape": item_shape}
        meta.update(
            num_features=int(item_shape[0]), stats=self._stats(len(items), extracted, elapsed)
        )
        _finish(out, partial, shapes, meta)
        return FeatureCache.open(out)

    def _stats(self, images: int, extracted: int, elapsed: float) -> dict[str, Any]:
        """How fast this session extracted (recorded in meta.json)."""
        return {
            "images": images,
            "seconds_this_session": round(elapsed, 3),
            "images_per_s_this_session": round(extracted / max(elapsed, 1e-9), 2),
            "threads": torch.get_num_threads(),
            "batch_size": self.batch_size,
            "device": str(self.device),
        }


def _open_arrays(
    partial: Path, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype, *, resume: bool
) -> dict[str, np.ndarray]:
    """The cache's arrays as memory maps in the partial folder (kept when resuming)."""
    return {
        name: np.lib.format.open_memmap(
            partial / f"{name}.npy",
            mode="r+" if (partial / f"{name}.npy").is_file() and resume else "w+",
            dtype=dtype,
            shape=shape,
        )
        for name, shape in shapes.items()
    }


def _progress_label(cfg: RunConfig, wanted: Mapping[str, Any]) -> str:
    label = f"features {cfg.model.arch} {wanted['transform']['image_size'] or 224}px"
    if cfg.model.cut is not None:
        label += f" (before {cfg.model.cut})"
    return label


def _cache_folder(cfg: RunConfig, out_dir: str | Path | None) -> Path:
    target = out_dir if out_dir is not None else cfg.data.features
    if target is None:
        raise ConfigError(
            "no feature cache folder: pass --out DIR (library: out_dir=...) or set "
            "data.features=DIR"
        )
    return Path(target)


def _resumable_view_seed(partial: Path, wanted: Mapping[str, Any], view_seed: int) -> int:
    """The view seed of an unfinished extraction of the same config (else ``view_seed``);
    an unfinished extraction for another config is refused."""
    if not (partial / META).is_file():
        return view_seed
    found = json.loads((partial / META).read_text())
    diffs = meta_differences(found, wanted)
    if diffs:
        raise _refuse(partial, diffs, partial=True)
    return int(found.get("view_seed", view_seed))


def _extractor(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Images -> what the cache holds: the whole backbone + pooling (no cut) or the stages
    before the cut (their activations), built under a forked RNG."""
    from nirdml.models.head import PooledFeatures, backbone_for, split_backbone

    with torch.random.fork_rng(devices=[]):
        model = backbone_for({"backbone": spec})
    if spec.get("cut") is None:
        return PooledFeatures(model)
    lower, _ = split_backbone(model.backbone, spec["cut"], spec["arch"])
    return lower


def _extraction_jobs(
    cfg: RunConfig, splits: Any, wanted: Mapping[str, Any]
) -> list[tuple[str, Any, int | None, int]]:
    """``(array, dataset, view, count)`` in extraction order: the test split, every training
    image under the test transform, then each augmented view of the training images."""
    from nirdml.data import build_transforms

    preset = wanted["transform"]["preset"]
    size = cfg.data.image_size
    train_views = splits.train.with_transform(build_transforms(preset, True, size))
    train_plain = splits.train.with_transform(build_transforms(preset, False, size))
    return [
        ("test", splits.test, None, len(splits.test)),
        ("train_plain", train_plain, None, len(train_plain)),
    ] + [("train_views", train_views, v, len(train_views)) for v in range(cfg.data.feature_views)]


def _array_shapes(
    jobs: list[tuple[str, Any, int | None, int]], item_shape: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    views = sum(1 for j in jobs if j[0] == "train_views")
    count = {name: n for name, _, _, n in jobs}
    return {
        "test": (count["test"], *item_shape),
        "train_plain": (count["train_plain"], *item_shape),
        "train_views": (views, count["train_plain"], *item_shape),
    }


def _fixed_batches(
    items: _ExtractionItems, jobs: list[tuple[str, Any, int | None, int]], batch_size: int
) -> list[list[int]]:
    """Fixed batches that never cross a job boundary, so a resumed run repeats them."""
    batches: list[list[int]] = []
    for j, job in enumerate(jobs):
        start = int(items.starts[j])
        batches += [
            list(range(start + b, start + min(b + batch_size, job[3])))
            for b in range(0, job[3], batch_size)
        ]
    return batches


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _check_disk(
    out: Path, partial: Path, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype, *, echo: bool
) -> None:
    """Print the cache's size and refuse it (before writing) if the disk cannot hold it."""
    total = sum(int(np.prod(s)) * dtype.itemsize for s in shapes.values())
    written = 0
    if (partial / META).is_file():  # a resumed extraction already holds part of it
        written = sum(f.stat().st_blocks * 512 for f in partial.glob("*.npy") if f.is_file())
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    needed = max(total - written, 0)
    item = "x".join(map(str, shapes["test"][1:]))
    if echo:
        print(
            f"feature cache {out}: {_human(total)} ({shapes['test'][0]:,} test + "
            f"{shapes['train_plain'][0]:,} train images x {1 + shapes['train_views'][0]} "
            f"(plain + views), each {item} {dtype.name}); {_human(free)} free",
            flush=True,
        )
    margin = 64 * 2**20
    if needed + margin > free:
        raise InsufficientDiskError(
            f"the feature cache needs {_human(needed)} more at {out} but only {_human(free)} "
            f"is free there. Fix: cache into a folder on a larger disk (--out DIR / "
            "data.features=DIR), fewer data.feature_views, data.feature_dtype=float16, a "
            "smaller data.image_size, or a later model.cut (smaller activations)"
        )


def _start_partial(partial: Path, wanted: Mapping[str, Any], view_seed: int) -> int:
    """Batches already extracted into ``partial`` (a fresh folder: 0)."""
    if (partial / META).is_file():
        progress_file = partial / "progress.json"
        return json.loads(progress_file.read_text())["batches"] if progress_file.is_file() else 0
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    atomic_write_json(partial / META, {**wanted, "view_seed": view_seed})
    return 0


def _extract(
    extractor: torch.nn.Module,
    items: _ExtractionItems,
    batches: list[list[int]],
    arrays: dict[str, np.ndarray],
    partial: Path,
    done: int,
    dev: torch.device,
    *,
    workers: int,
    label: str | None,
    on_batch: Callable[[int], None] | None,
) -> int:
    """Run the remaining batches into the arrays, recording progress after each; returns
    the number of images extracted in this session."""
    loader = DataLoader(
        items,
        batch_sampler=batches[done:],
        num_workers=usable_workers(workers),
        generator=torch.Generator().manual_seed(0),
    )
    bar = None
    if label is not None:
        from tqdm.auto import tqdm

        initial = sum(len(b) for b in batches[:done])
        bar = tqdm(total=len(items), initial=initial, unit="img", desc=label, dynamic_ncols=True)
    extracted = 0
    with torch.inference_mode():
        for b, (images, keys) in enumerate(loader, start=done):
            out = extractor(images.to(dev)).float().cpu().numpy()
            j, row = items.locate(int(keys[0]))
            name, _, view, _ = items.jobs[j]
            rows = slice(row, row + len(keys))
            target = arrays[name] if view is None else arrays[name][view]
            target[rows] = out.astype(arrays[name].dtype)
            arrays[name].flush()
            atomic_write_json(partial / "progress.json", {"batches": b + 1})
            extracted += len(keys)
            if bar is not None:
                bar.update(len(keys))
            if on_batch is not None:
                on_batch(b + 1)
    if bar is not None:
        bar.close()
    return extracted


def _finish(
    out: Path, partial: Path, shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, Any]
) -> None:
    """Move the finished arrays into ``out`` and write ``meta.json`` last (atomically)."""
    for name in shapes:
        with open(partial / f"{name}.npy", "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial / f"{name}.npy", out / f"{name}.npy")
    atomic_write_json(out / META, dict(meta))
    shutil.rmtree(partial, ignore_errors=True)


# ----------------------------------------------------------------------------- datasets


class FeatureDataset(Dataset):
    """Cached features of some images of a split: ``(float32 features, label)`` items.

    A cached item is a pooled feature vector, or with a cut (``model.cut``) the activation
    map entering that stage. ``views`` (train: the array has a leading view axis): item
    ``i`` returns view ``draw[rows[i]]`` of its image, with
    ``draw`` drawn for every cached image from ``(seed, epoch)`` (:meth:`set_epoch`; the
    epoch lives in shared memory, so DataLoader workers follow it).
    """

    def __init__(
        self,
        array: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        class_names: list[str],
        *,
        split: str,
        seed: int = 0,
        views: bool = False,
    ) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.split = split
        self.seed = seed
        self.has_views = views
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._draw: tuple[int, np.ndarray] | None = None

    # Features never fail to decode: unreadable images were checked (and, with
    # data.skip_corrupt, replaced) when the cache was built. The dataset surface the
    # trainer's summary reads (RetrievalDataset's corrupt_count / missing / corrupt_paths).
    corrupt_count = 0
    missing: tuple[str, ...] = ()
    is_query: np.ndarray | None = None
    """Query/gallery roles of a query/gallery split (In-Shop's test split), as its images'."""
    is_gallery: np.ndarray | None = None

    def corrupt_paths(self) -> list[str]:
        return []

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one cached item: (F,) pooled features or (C, H, W) activations."""
        return tuple(int(n) for n in self.array.shape[2 if self.has_views else 1 :])

    @property
    def num_features(self) -> int:
        """Width of a cached item (its channels, with a cut)."""
        return self.item_shape[0]

    @property
    def num_views(self) -> int:
        return int(self.array.shape[0]) if self.has_views else 1

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def views_of_epoch(self, epoch: int) -> np.ndarray:
        """The view every cached image (row) uses in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.integers(0, self.num_views, size=self.array.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[i])
        if self.has_views:
            epoch = int(self._epoch[0])
            if self._draw is None or self._draw[0] != epoch:
                self._draw = (epoch, self.views_of_epoch(epoch))
            x = self.array[self._draw[1][row], row]
        else:
            x = self.array[row]
        return torch.from_numpy(np.array(x, dtype=np.float32)), int(self.labels[i])

    def describe(self) -> str:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        views = f", {self.num_views} views" if self.has_views else ""
        return (
            f"features/{self.split}: {len(self):,} images, {self.num_classes:,} classes, "
            f"{counts.min()}-{counts.max()} images/class{views}"
        )


@dataclass
class FeatureSplits:
    """Train / test / val feature datasets of a config + the cache they come from."""

    train: FeatureDataset
    test: FeatureDataset
    val: FeatureDataset | None
    cache: FeatureCache

    def describe(self) -> str:
        parts = [self.train, self.test] + ([self.val] if self.val is not None else [])
        return "\n".join(p.describe() for p in parts)


def load_feature_splits(cfg: RunConfig, progress: bool = False) -> FeatureSplits:
    """The feature splits of ``cfg`` (``data.features``), extracting the cache if needed.

    The validation split (``data.val_classes``) is carved from the cached training
    classes with ``cfg.seed`` exactly as ``load_dataset`` carves the images.
    """
    from nirdml.data import auto_val_classes, carve_validation
    from nirdml.training.build import check_batch_fits

    if cfg.data.features is None:
        raise ConfigError("model.frozen=true needs data.features=DIR (the feature cache)")
    splits = _image_splits(cfg)
    pool = splits.train
    val_classes = cfg.data.val_classes
    if val_classes == "auto":  # as load_dataset resolves it for the images
        val_classes = auto_val_classes(cfg.data.name, pool.num_classes)
    train, val = carve_validation(pool, val_classes, cfg.seed, cfg.data.val_carve)
    check_batch_fits(train, val, cfg.data)  # before minutes of extraction
    cache = build_feature_cache(cfg, cfg.data.features, progress=progress, splits=splits)
    order = np.argsort(pool.index, kind="stable")

    def rows_of(part: Any) -> np.ndarray:
        return order[np.searchsorted(pool.index, part.index, sorter=order)]

    def feats(array: np.ndarray, part: Any, split: str, views: bool) -> FeatureDataset:
        rows = rows_of(part) if part is not pool else np.arange(len(pool))
        return FeatureDataset(
            array, rows, part.labels, part.class_names, split=split, seed=cfg.seed, views=views
        )

    test_rows = np.arange(len(splits.test))
    test = FeatureDataset(
        cache.test, test_rows, splits.test.labels, splits.test.class_names, split="test"
    )
    test.is_query, test.is_gallery = splits.test.is_query, splits.test.is_gallery
    return FeatureSplits(
        feats(cache.train_views, train, "train", views=True),
        test,
        None if val is None else feats(cache.train_plain, val, "val", views=False),
        cache,
    )
