"""``compute_embeddings``: run a model over a dataset or loader, in eval mode (and its
sharded form for distributed evaluation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from nirdml.data.samplers import slice_bounds, slice_sizes
from nirdml.errors import InputError
from nirdml.runtime import resolve_device, usable_workers


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


CPU_PIXELS_PER_BATCH = 16 * 224 * 224
"""On a CPU, images are embedded at most this many pixels per forward pass (16 images at
224 px): a batch of 256 photos at 224 px held ~5 GB of activations, and larger batches are
no faster on a CPU (benchmarks/results/memory.md)."""


def cpu_batch_size(dataset: Dataset, batch_size: int) -> int:
    """``batch_size``, lowered on a CPU for large images to :data:`CPU_PIXELS_PER_BATCH`
    (read from the first item's shape; small inputs and feature vectors keep it)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return batch_size
    x = dataset[0][0]
    if not isinstance(x, Tensor) or x.dim() < 3:
        return batch_size
    return max(1, min(batch_size, CPU_PIXELS_PER_BATCH // (x.shape[-1] * x.shape[-2])))


def compute_embeddings(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item; returns ``(embeddings, labels)`` as float32 / int64 CPU tensors in
    dataset order.

    The model runs in eval mode under ``torch.inference_mode`` (its previous train/eval
    mode is restored afterwards). Items must be ``(input, label)`` pairs. A ``DataLoader``
    is used as given (``batch_size`` and ``num_workers`` then do not apply; it must not
    shuffle if the order matters). On a CPU, batches of large images are made smaller
    (:func:`cpu_batch_size`): the embeddings do not depend on the batch size. ``device``
    None means the model's own device; the model is never moved. ``amp=True`` runs the
    forward pass under float16 autocast (CUDA only).
    """
    dev = _compute_device(model, device, amp)
    loader = _as_loader(dataset_or_loader, batch_size, dev, num_workers)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            parts = [_embed_batch(model, batch, dev) for batch in loader]
    finally:
        model.train(was_training)
    if not parts:
        raise InputError("the dataset is empty; nothing to embed.")
    embs, labels = zip(*parts, strict=True)
    return torch.cat(embs), torch.cat(labels)


def _compute_device(model: nn.Module, device: str | torch.device | None, amp: bool) -> torch.device:
    """The device to embed on: the model's own (None) or ``device``, which must be where the
    model already is (it is never moved); ``amp`` needs CUDA."""
    own = _model_device(model)
    dev = own if device is None else resolve_device(device)
    if own != dev and not (dev.type == own.type and dev.index is None):
        raise InputError(
            f"the model is on {own} but device={dev}; move it first "
            "(model.to(device)) or pass device=None."
        )
    if amp and dev.type != "cuda":
        raise InputError("amp=True needs a CUDA device; pass amp=False on CPU.")
    return dev


def _as_loader(
    dataset_or_loader: Dataset | DataLoader, batch_size: int, dev: torch.device, num_workers: int
) -> DataLoader:
    """A given loader as it is; else an in-order loader over the dataset (smaller batches of
    large images on a CPU, see :func:`cpu_batch_size`)."""
    if isinstance(dataset_or_loader, DataLoader):
        return dataset_or_loader
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    if dev.type == "cpu":
        batch_size = cpu_batch_size(dataset_or_loader, batch_size)
    return DataLoader(
        dataset_or_loader,
        batch_size=batch_size,
        shuffle=False,
        num_workers=usable_workers(num_workers),
        pin_memory=dev.type == "cuda",
        # DataLoader draws its base seed from a generator: keep the global RNG untouched.
        generator=torch.Generator().manual_seed(0),
    )


def _embed_batch(model: nn.Module, batch: Any, dev: torch.device) -> tuple[Tensor, Tensor]:
    """One ``(input, label)`` batch as float32 embeddings and int64 labels on the CPU, with
    the batch and the model output checked."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise InputError(
            "dataset items must be (input, label) pairs; wrap the dataset so "
            "__getitem__ returns (tensor, int)."
        )
    x, y = batch[0], batch[1]
    out = model(x.to(dev, non_blocking=True))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the model must return a (batch, dim) tensor of embeddings, got {got}.")
    return out.float().cpu(), torch.as_tensor(y).long().cpu().reshape(-1)


def gather_rows(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Every rank's rows, concatenated in rank order (rank r holds ``sizes[r]``; padded to
    equal shapes for the all-gather). No gradient: see training.distributed.gather_batch."""
    longest = max(sizes)
    pad = longest - tensor.shape[0]
    if pad:
        tensor = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def compute_embeddings_sharded(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    amp: bool = False,
) -> tuple[Tensor, Tensor]:
    """Distributed: each rank embeds a contiguous shard of ``dataset``; every rank gets all
    of them, in dataset order (float32 / int64 CPU tensors, as :func:`compute_embeddings`).
    Call it on every rank of the initialised process group."""
    n, world, rank = len(dataset), dist.get_world_size(), dist.get_rank()
    if n < world:
        raise InputError(
            f"cannot shard {n} evaluation items over {world} ranks; evaluate with fewer processes"
        )
    lo, hi = slice_bounds(n, world, rank)
    emb, labels = compute_embeddings(
        model,
        Subset(dataset, range(lo, hi)),
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        amp=amp,
    )
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = slice_sizes(n, world)
    return gather_rows(emb.to(comm), sizes).cpu(), gather_rows(labels.to(comm), sizes).cpu()
