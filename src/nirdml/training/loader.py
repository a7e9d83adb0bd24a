"""Reproducible training batches: every sample's augmentation is seeded by its position.

The batch sampler decides *which* images form a batch (from the run seed and epoch). This
module decides *how* each image is augmented: sample ``j`` of global batch ``b`` in epoch
``e`` is loaded with the torch RNG seeded from ``(seed, e, b, j)`` inside
``torch.random.fork_rng``. So augmentation does not depend on the number of DataLoader
workers, the number of DDP ranks, or where a killed run is resumed, and the process's
global RNG is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nirdml.runtime import usable_workers


def sample_seeds(seed: int, epoch: int, batch: int, count: int, offset: int = 0) -> list[int]:
    """Seeds of slots ``offset .. offset+count-1`` of one global batch."""
    state = np.random.SeedSequence([seed, epoch, batch]).generate_state(offset + count)
    return [int(s) for s in state[offset:]]


class SeededDataset(Dataset):
    """Loads item ``(index, seed)`` of ``dataset`` with the torch RNG seeded locally."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (what the transforms draw from, and all that fork_rng
            # restores): torch.manual_seed would also re-seed every accelerator's generator,
            # unrestored, and costs ~35x more per sample (lazy-init bookkeeping).
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a class-balanced batch sampler and pairs every index with its sample seed.

    ``rank_offset`` is this rank's first slot inside the global batch, so a sample's
    seed is the same whether it is loaded by one process or by one of several ranks.
    """

    def __init__(self, batch_sampler: Any, seed: int, rank_offset: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.rank_offset = rank_offset
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` skips batches already consumed before a resume."""
        self.epoch = epoch
        self.start_batch = start_batch
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, indices in enumerate(self.batch_sampler):
            if b < self.start_batch:
                continue
            indices = list(indices)
            seeds = sample_seeds(self.seed, self.epoch, b, len(indices), self.rank_offset)
            yield list(zip(indices, seeds, strict=True))


def train_loader(
    dataset: Dataset,
    batch_sampler: Any,
    *,
    seed: int,
    num_workers: int,
    rank_offset: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, SeededBatchSampler]:
    """DataLoader over class-balanced batches with position-seeded augmentation."""
    sampler = SeededBatchSampler(batch_sampler, seed, rank_offset)
    workers = usable_workers(num_workers)
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # The loader draws its workers' base seed from this generator, not the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
