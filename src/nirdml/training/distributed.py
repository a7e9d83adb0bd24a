"""torch.distributed support: one model trained across processes launched by ``torchrun``.

This module holds the process-group context (:class:`DistContext`: environment, setup,
waits, DDP wrapping) and the training collectives (:func:`gather_batch`); the pieces that
serve other layers live next to them: batch slicing in data/samplers.py, the synchronised
BatchNorm in models/batchnorm.py, sharded embedding in evaluation/embed.py.

Design (user documentation: docs/guide/distributed.md):

- ``data.batch_size`` is the GLOBAL batch. Every rank draws the same global batch sequence
  from (seed, epoch) and loads its contiguous slice (``BatchSlicer``; any world size up
  to the batch size, slices differ by at most one row, a class group may span two ranks),
  and augmentation is seeded by the global slot (training/loader.py): the same images,
  augmented the same way, for any world size.
- Model AND loss (proxies, flow) sit in ONE DistributedDataParallel module, so every learned
  tensor is synchronised (proxies owned by the loss would otherwise drift apart).
- Embeddings and labels are all-gathered WITH gradients before the loss
  (:func:`gather_batch`), so ProxyAnchor's per-proxy terms, the softmax of ProxyNCA and the
  NIR flow see exactly the global batch that a single process sees. Every rank computes the
  same global loss L; the gather's backward sums the ranks' gradients of each slice
  (``world * dL/dslice``) and DDP averages over ranks, which gives exactly dL/dparameter
  for the backbone, the head, the proxies and the flow.
- Warmup epochs run the backbone under no_grad. Instead of DDP's per-step unused-parameter
  search, the DDP module is rebuilt when the set of trained parameters changes: during
  warmup the backbone is left out of DDP, afterwards it is in (one rebuild per run).
- BatchNorm: frozen statistics (the paper's recipe) need nothing. Trainable BatchNorm uses
  global-batch statistics when ``model.sync_bn`` (default): torch's ``nn.SyncBatchNorm``
  on CUDA, ``DistributedBatchNorm`` (models/batchnorm.py) on other devices.
- Evaluation: each rank embeds a contiguous shard, the shards are gathered
  (evaluation/embed.py), rank 0 computes the metrics once and shares them; only rank 0
  writes files and logs.
- Long waits (a download or cache build on rank 0, metrics on rank 0) use a CPU (gloo)
  group with a long timeout, so NCCL's watchdog does not stop the run meanwhile.
- The process group lives as long as the process: re-creating it (e.g. for a second run in
  the same process) races between ranks under torchrun's store.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nirdml.data.samplers import BatchSlicer, slice_sizes
from nirdml.errors import DistributedSetupError, InputError
from nirdml.evaluation.embed import compute_embeddings_sharded, gather_rows
from nirdml.models.batchnorm import trainable_batchnorm_count

LAUNCH_HINT = "launch with `torchrun --nproc_per_node=N -m nirdml train PRESET ...`"
WAIT_TIMEOUT = datetime.timedelta(hours=3)
"""Timeout of the CPU group that waits for rank 0 (downloads, cache builds, metrics)."""


# ----------------------------------------------------------------------------- autograd


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int]) -> Tensor:
        rank = dist.get_rank()
        ctx.lo, ctx.hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.lo : ctx.hi], None


def gather_batch(
    embeddings: Tensor, labels: Tensor, sizes: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """The global batch from every rank's slice, in rank order.

    ``sizes``: rows held by each rank (default: all equal to this rank's). The embeddings
    keep their autograd graph: under DDP (gradient averaging) the parameter gradients
    equal those of one process computing the loss on the whole batch, for any slice sizes.
    """
    if sizes is None:
        sizes = [embeddings.shape[0]] * dist.get_world_size()
    if embeddings.shape[0] != sizes[dist.get_rank()]:
        raise InputError(
            f"rank {dist.get_rank()} holds {embeddings.shape[0]} rows, expected "
            f"{sizes[dist.get_rank()]} (sizes {sizes})"
        )
    labels = gather_rows(labels.to(embeddings.device), sizes)
    return _GatherWithGrad.apply(embeddings, sizes), labels


# ----------------------------------------------------------------------------- environment


def _env_int(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    if raw is None:
        raise DistributedSetupError(
            f"WORLD_SIZE is set but {name} is not; {LAUNCH_HINT} (torchrun sets RANK, "
            "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process)"
        )
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"{name}={raw!r} is not an integer; {LAUNCH_HINT}") from None


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _wait_group: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain process is rank 0 of 1.

        An already initialised default process group (a caller that set one up) is used
        as it is. Inconsistent variables raise :class:`DistributedSetupError`.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", "0"))
        if "WORLD_SIZE" not in os.environ:
            if "RANK" in os.environ and os.environ["RANK"] not in ("", "0"):
                raise DistributedSetupError(
                    f"RANK={os.environ['RANK']} is set but WORLD_SIZE is not; {LAUNCH_HINT}"
                )
            return cls()
        world = _env_int("WORLD_SIZE")
        if world < 1:
            raise DistributedSetupError(f"WORLD_SIZE={world} must be >= 1; {LAUNCH_HINT}")
        if world == 1:
            return cls(0, 1, 0)
        rank = _env_int("RANK")
        local = _env_int("LOCAL_RANK", "0")
        if not 0 <= rank < world:
            raise DistributedSetupError(
                f"RANK={rank} is not in [0, WORLD_SIZE={world}); {LAUNCH_HINT}, which numbers "
                "the ranks 0..WORLD_SIZE-1"
            )
        if local < 0:
            raise DistributedSetupError(f"LOCAL_RANK={local} must be >= 0; {LAUNCH_HINT}")
        if not dist.is_available():
            raise DistributedSetupError(
                f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed; install "
                "a build with distributed support or run one process"
            )
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise DistributedSetupError(
                f"WORLD_SIZE={world} but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; {LAUNCH_HINT} (it sets them), "
                "or for a multi-node run pass --master_addr/--master_port (or --rdzv_endpoint) "
                "to torchrun on every node"
            )
        return cls(rank, world, local)

    # -- setup

    def init(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo otherwise), creating it if needed.

        The group lives as long as the process (destroyed at exit): several runs in one
        process share it, since re-creating it under torchrun's store races between ranks.
        """
        if not self.enabled:
            return
        if device.type not in ("cpu", "cuda"):
            raise DistributedSetupError(
                f"distributed training runs on CUDA (NCCL) or CPU (gloo), not {device.type}; "
                "use device=auto, cuda or cpu"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend)
            except (RuntimeError, ValueError) as exc:
                raise DistributedSetupError(
                    f"rank {self.rank} could not join the {backend} process group at "
                    f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                    f"({type(exc).__name__}: {exc}); check that every node reaches that "
                    "address and port and that all WORLD_SIZE processes were started"
                ) from exc
            atexit.register(_destroy_process_group)
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise DistributedSetupError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"the environment says rank {self.rank} of {self.world_size}"
            )
        self._wait_group = _cpu_group()

    def check_batch(self, batch_size: int) -> None:
        """Every rank needs at least one sample of the global batch."""
        if batch_size < self.world_size:
            raise DistributedSetupError(
                f"data.batch_size={batch_size} is the GLOBAL batch, split over WORLD_SIZE="
                f"{self.world_size} ranks: it must be >= the world size. Raise "
                "data.batch_size or start fewer processes"
            )

    def slice_sizes(self, batch_size: int) -> list[int]:
        """Rows of the global batch held by each rank."""
        return slice_sizes(batch_size, self.world_size)

    def shard(self, batch_sampler: Any, batch_size: int) -> Any:
        """This rank's slices of a global batch sampler (the sampler itself on one process)."""
        if not self.enabled:
            return batch_sampler
        return BatchSlicer(batch_sampler, batch_size, self.world_size, self.rank)

    def check_same(self, obj: Any, what: str, fix: str) -> None:
        """Raise on every rank if ranks hold different ``obj`` (JSON-serialisable)."""
        if not self.enabled:
            return
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self._wait_group)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedSetupError(
                f"ranks {differ} have a different {what} than rank 0; {fix}"
            )

    def warn_unsynced_batchnorm(self, model: nn.Module) -> None:
        """Warn (rank 0) that trainable BatchNorm normalises with per-rank statistics."""
        n = trainable_batchnorm_count(model)
        if self.enabled and self.is_main and n:
            warnings.warn(
                f"the model has {n} trainable BatchNorm layer(s): each rank normalises with "
                "the statistics of its own slice of the batch, so training differs from a "
                "single process. Set model.sync_bn=true for global-batch statistics, or "
                "model.freeze_bn=true",
                stacklevel=2,
            )

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0, then on every node's local rank 0, then on the rest.

        For downloads and caches: built once (by rank 0 on a shared filesystem, or once per
        node on node-local disks) and then only read by the other ranks.
        """
        if not self.enabled:
            yield
            return
        phase = 0 if self.rank == 0 else 1 if self.local_rank == 0 else 2
        for _ in range(phase):
            dist.barrier(group=self._wait_group)
        try:
            yield
        finally:
            for _ in range(phase, 2):
                dist.barrier(group=self._wait_group)

    def wrap(
        self, module: nn.Module, device: torch.device, exclude: Iterable[nn.Parameter] = ()
    ) -> nn.Module:
        """DDP over ``module`` (model + loss) when distributed, else the module itself.

        ``exclude``: parameters that receive no gradient in the coming steps (the backbone
        during warmup); DDP leaves them out instead of searching for unused parameters
        every step. Buffers are not broadcast per step: frozen and synchronised BatchNorm
        statistics agree on every rank anyway; :meth:`sync_buffers` aligns the rest.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        skip = {id(p) for p in exclude}
        names = [n for n, p in module.named_parameters() if id(p) in skip]
        DDP._set_params_and_buffers_to_ignore_for_model(module, names)
        no_buffer_sync = (
            {"forward_sync_buffers": False}  # torch >= 2.13 name of broadcast_buffers
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False}
        )
        return DDP(
            module, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
        )

    # -- communication

    def gather_fn(self, batch_size: int) -> Any:
        """Gathers the global batch of ``batch_size`` rows from the ranks' slices."""
        if not self.enabled:
            return None
        return functools.partial(gather_batch, sizes=self.slice_sizes(batch_size))

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._wait_group)
        return box[0]

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank."""
        if not self.enabled:
            return
        for buf in module.buffers():
            dist.broadcast(buf, src=0)

    def compute_embeddings(
        self, model: nn.Module, dataset: Any, **options: Any
    ) -> tuple[Tensor, Tensor]:
        """Each rank embeds a contiguous shard; every rank gets all of them, in dataset order:
        :func:`nirdml.evaluation.embed.compute_embeddings_sharded` (same ``options``)."""
        return compute_embeddings_sharded(model, dataset, **options)


_CPU_GROUP: list[Any] = []  # [default group, its gloo side group]


def _cpu_group() -> Any:
    """The default group if it is gloo, else one gloo side group with a long timeout (so
    waits for rank 0 do not trip the NCCL watchdog), created once per default group."""
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    if not _CPU_GROUP or _CPU_GROUP[0] is not world:
        _CPU_GROUP[:] = [world, dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)]
    return _CPU_GROUP[1]


def _destroy_process_group() -> None:
    _CPU_GROUP.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
