"""Class-balanced batch samplers: the authors' sampler and m-per-class, DDP-sharded.

Every rank builds the same global batch sequence from (seed, epoch) with a local
torch.Generator; rank r yields the r-th contiguous slice of each global batch (class
groups of ``samples_per_class`` are kept whole). One process with world size 1 sees exactly
the global batches. An epoch has ``len(labels) // batch_size`` global batches.

:class:`BatchSlicer` gives a rank its contiguous slice of every GLOBAL batch of another
sampler (the trainer's distributed batches; slices may split class groups).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from nirdml.data.errors import SamplerConfigError

SMALL_CLASS_POLICIES = ("skip", "error")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A local generator whose state depends on (seed, epoch) only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
    g = torch.Generator()
    g.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF))
    return g


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        else:
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise SamplerConfigError(
            f"rank {rank} is not valid for num_replicas={num_replicas}; ranks run 0..world_size-1"
        )
    return int(num_replicas), int(rank)


def _label_array(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """The labels as a numpy array, checked to be one integer class label per item."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise SamplerConfigError(
            f"labels must be a 1-D integer array (one class label per item), got "
            f"{y.dtype} {y.shape}"
        )
    return y


def _check_options(batch_size: int, samples_per_class: int, small_classes: str) -> None:
    """Reject an unknown small-class policy and batch / group sizes below 1."""
    if small_classes not in SMALL_CLASS_POLICIES:
        raise SamplerConfigError(
            f"small_classes must be one of {SMALL_CLASS_POLICIES}, got {small_classes!r}"
        )
    if samples_per_class < 1 or batch_size < 1:
        raise SamplerConfigError(
            f"batch_size ({batch_size}) and samples_per_class ({samples_per_class}) must be >= 1"
        )


def _check_whole_groups(batch_size: int, samples_per_class: int, num_replicas: int) -> None:
    """Every rank must get whole class groups of the global batch (with a batch size to use
    instead)."""
    group = num_replicas * samples_per_class
    if batch_size % group != 0:
        suggestion = max(1, round(batch_size / group)) * group
        raise SamplerConfigError(
            f"batch_size {batch_size} must be divisible by num_replicas x samples_per_class "
            f"= {num_replicas} x {samples_per_class} = {group} so every rank gets "
            f"whole class groups; use e.g. batch_size={suggestion}"
        )


def _usable_classes(
    y: np.ndarray, samples_per_class: int, small_classes: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Items sorted by class (stable), the start and size of each usable class's run in that
    order, and the skipped classes: those with fewer than ``samples_per_class`` items, which
    warn ("skip") or raise ("error")."""
    order = np.argsort(y, kind="stable")
    classes, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    small = counts < samples_per_class
    skipped = [int(c) for c in classes[small]]
    if small.any():
        text = (
            f"{small.sum()} class(es) have fewer than samples_per_class="
            f"{samples_per_class} images (e.g. labels {skipped[:5]} with "
            f"{counts[small][:5].tolist()} images)"
        )
        if small_classes == "error":
            raise SamplerConfigError(
                f"{text}; lower samples_per_class, remove those classes, or pass "
                "small_classes='skip' to leave them out of sampling"
            )
        # stacklevel 3: the code that builds the sampler
        warnings.warn(f"{text}: left out of sampling (sampler.skipped_classes)", stacklevel=3)
    keep = ~small
    return order, starts[keep], counts[keep], skipped


def _check_class_supply(
    num_classes: int, samples_per_class: int, classes_per_batch: int, replacement: bool
) -> None:
    """Enough usable classes: at least one, and a batch's worth of distinct ones without
    replacement."""
    if num_classes == 0:
        raise SamplerConfigError(
            f"no class has at least samples_per_class={samples_per_class} images; "
            "lower samples_per_class"
        )
    if not replacement and num_classes < classes_per_batch:
        raise SamplerConfigError(
            f"m-per-class sampling without replacement needs {classes_per_batch} "
            f"distinct classes per batch but only {num_classes} are usable; lower "
            "batch_size, raise samples_per_class, or use replacement=True"
        )


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // samples_per_class`` classes x ``samples_per_class`` images.

    - ``replacement=True`` (the authors' sampler, method.md section 5): each batch draws its
      classes uniformly WITH replacement (a class may appear twice) and each class's
      samples WITH replacement.
    - ``replacement=False`` (m-per-class): each class at most once per batch (classes taken
      from shuffled passes over all classes); each class's images are shuffled and cycled.

    ``small_classes``: classes with fewer than ``samples_per_class`` images are dropped from
    sampling and counted in ``skipped_classes`` ("skip", with a warning) or raise ("error").

    DDP: pass ``num_replicas``/``rank`` (default: from torch.distributed when initialised).
    ``batch_size`` is the GLOBAL batch; each rank yields ``batch_size // num_replicas``
    indices per batch, and ``len()`` batches per epoch. Call ``set_epoch(e)`` every epoch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        samples_per_class: int,
        *,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        small_classes: str = "skip",
    ) -> None:
        y = _label_array(labels)
        _check_options(batch_size, samples_per_class, small_classes)
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        _check_whole_groups(batch_size, samples_per_class, self.num_replicas)
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.classes_per_batch = self.batch_size // self.samples_per_class
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.epoch = 0
        self._position = 0  # batches yielded in the current epoch
        self._resume_from = 0  # batches to skip at the next __iter__ (after load_state_dict)

        order, starts, counts, self.skipped_classes = _usable_classes(
            y, self.samples_per_class, small_classes
        )
        self._order = torch.from_numpy(order.astype(np.int64))
        self._starts = torch.from_numpy(starts.astype(np.int64))
        self._counts = torch.from_numpy(counts.astype(np.int64))
        self.num_classes = len(counts)
        _check_class_supply(
            self.num_classes, self.samples_per_class, self.classes_per_batch, self.replacement
        )
        self.num_batches = len(y) // self.batch_size
        if self.num_batches == 0:
            raise SamplerConfigError(
                f"{len(y)} items give no full batch of {self.batch_size}; lower batch_size"
            )

    # -- epoch / checkpoint -------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the batch sequence of ``epoch`` (same on every rank)."""
        if int(epoch) != self.epoch:
            self._position = 0
            self._resume_from = 0
        self.epoch = int(epoch)

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, int]:
        """Seed, epoch and position within the epoch, for checkpoints.

        ``batches_consumed``: how many batches of this epoch the training loop has used.
        Pass it when a DataLoader prefetches (workers run ahead of the loop); without it the
        count of batches this sampler has yielded is stored.
        """
        position = self._position if batches_consumed is None else int(batches_consumed)
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": position,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "samples_per_class": self.samples_per_class,
            "replacement": int(self.replacement),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues epoch ``state["epoch"]`` after ``position``
        batches."""
        mine = self.state_dict()
        for key in ("num_replicas", "batch_size", "samples_per_class", "replacement"):
            if key in state and int(state[key]) != mine[key]:
                raise SamplerConfigError(
                    f"checkpoint was taken with {key}={state[key]}, this sampler has "
                    f"{mine[key]}; the batch sequence would differ: resume with the same "
                    f"{key} (and world size)"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._resume_from = int(state.get("position", 0))
        self._position = self._resume_from

    # -- batches --------------------------------------------------------------------------
    def global_batches(self, epoch: int | None = None) -> torch.Tensor:
        """All global batches of an epoch: int64 [num_batches, batch_size] item indices."""
        g = _epoch_generator(self.seed, self.epoch if epoch is None else epoch)
        if self.replacement:
            cls = torch.randint(
                self.num_classes, (self.num_batches, self.classes_per_batch), generator=g
            )
            u = torch.rand(
                self.num_batches,
                self.classes_per_batch,
                self.samples_per_class,
                generator=g,
                dtype=torch.float64,
            )
            within = (u * self._counts[cls].unsqueeze(-1)).long()
            within = torch.minimum(within, self._counts[cls].unsqueeze(-1) - 1)
            pos = self._starts[cls].unsqueeze(-1) + within
        else:
            pos = self._without_replacement(g)
        return self._order[pos.reshape(self.num_batches, self.batch_size)]

    def _without_replacement(self, g: torch.Generator) -> torch.Tensor:
        """m-per-class: distinct classes per batch; per-class images shuffled and cycled."""
        k, m = self.classes_per_batch, self.samples_per_class
        counts = self._counts.tolist()
        starts = self._starts.tolist()
        class_queue: list[int] = []
        perms: dict[int, list[int]] = {}
        cursor: dict[int, int] = {}
        out = torch.empty(self.num_batches, k, m, dtype=torch.int64)
        for b in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < k:
                if not class_queue:
                    class_queue = torch.randperm(self.num_classes, generator=g).tolist()[::-1]
                c = class_queue.pop()
                if c in chosen:  # only at a pass boundary: defer to the next batch
                    class_queue.insert(0, c)
                    continue
                chosen.append(c)
            for j, c in enumerate(chosen):
                picks = []
                while len(picks) < m:
                    if cursor.get(c, counts[c]) >= counts[c]:
                        perms[c] = torch.randperm(counts[c], generator=g).tolist()
                        cursor[c] = 0
                    take = min(m - len(picks), counts[c] - cursor[c])
                    picks += perms[c][cursor[c] : cursor[c] + take]
                    cursor[c] += take
                out[b, j] = torch.tensor(picks) + starts[c]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        per_rank = self.batch_size // self.num_replicas
        lo = self.rank * per_rank
        start, self._resume_from = self._resume_from, 0
        self._position = start
        for b in range(start, self.num_batches):
            self._position = b + 1
            yield batches[b, lo : lo + per_rank].tolist()
        self._position = 0


# ----------------------------------------------------------------------------- ranks


def slice_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice ``[lo, hi)`` of ``n`` items (sizes differ by <= 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def slice_sizes(n: int, world_size: int) -> list[int]:
    """Items of each rank's slice of ``n`` (:func:`slice_bounds`), in rank order."""
    return [b - a for a, b in (slice_bounds(n, world_size, r) for r in range(world_size))]


class BatchSlicer:
    """This rank's contiguous slice of every global batch of a batch sampler.

    Wraps a sampler of GLOBAL batches (the same on every rank, e.g.
    ``ClassBalancedBatchSampler(..., num_replicas=1)``); slices may split class groups and
    differ in size by one, since the loss sees the gathered global batch anyway.
    ``offset`` is the slice's first slot in the global batch (seeds its augmentation).
    """

    def __init__(self, batch_sampler: Any, batch_size: int, world_size: int, rank: int) -> None:
        self.batch_sampler = batch_sampler
        self.offset, self.end = slice_bounds(batch_size, world_size, rank)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield list(batch)[self.offset : self.end]
