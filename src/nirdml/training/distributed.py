"""torch.distributed support: one model trained across processes launched by ``torchrun``.

Design (user documentation: docs/guide/distributed.md):

- ``data.batch_size`` is the GLOBAL batch. Every rank draws the same global batch sequence
  from (seed, epoch) and loads its contiguous slice (:class:`BatchSlicer`; any world size up
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
  on CUDA, :class:`DistributedBatchNorm` on other devices.
- Evaluation: each rank embeds a contiguous shard, the shards are gathered, rank 0 computes
  the metrics once and shares them; only rank 0 writes files and logs.
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

from nirdml.errors import DistributedSetupError

LAUNCH_HINT = "launch with `torchrun --nproc_per_node=N -m nirdml train PRESET ...`"
WAIT_TIMEOUT = datetime.timedelta(hours=3)
"""Timeout of the CPU group that waits for rank 0 (downloads, cache builds, metrics)."""


# ----------------------------------------------------------------------------- autograd


def slice_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice ``[lo, hi)`` of ``n`` items (sizes differ by <= 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _all_gather_rows(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's rows (rank r holds ``sizes[r]``), padding to equal shapes."""
    longest = max(sizes)
    pad = longest - tensor.shape[0]
    if pad:
        tensor = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int]) -> Tensor:
        rank = dist.get_rank()
        ctx.lo, ctx.hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _all_gather_rows(tensor, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.lo : ctx.hi], None


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


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
        raise ValueError(
            f"rank {dist.get_rank()} holds {embeddings.shape[0]} rows, expected "
            f"{sizes[dist.get_rank()]} (sizes {sizes})"
        )
    labels = _all_gather_rows(labels.to(embeddings.device), sizes)
    return _GatherWithGrad.apply(embeddings, sizes), labels


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


# ----------------------------------------------------------------------------- BatchNorm


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics of the global batch, on any backend (gloo on CPU too).

    Same parameters and buffers as ``nn.BatchNorm{1,2,3}d`` (checkpoints load either way).
    In training mode the per-channel mean and (biased) variance are computed over the
    samples of ALL ranks with two all-reduces that carry gradients, so outputs, gradients
    and running statistics equal those of one process holding the whole batch. In eval
    mode it communicates nothing (ranks may embed different numbers of batches): it
    normalises with the running statistics, as ``nn.SyncBatchNorm`` does.
    torch's ``nn.SyncBatchNorm`` (fused kernels) is used instead on CUDA.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or not (dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        # sums accumulated in float64 (as the CPU BatchNorm kernel does), then the two-pass
        # (centered) variance: accurate statistics for any number of ranks
        acc = torch.float64
        count = torch.tensor(input.numel() // input.shape[1], dtype=acc, device=input.device)
        dist.all_reduce(count)
        mean = (_AllReduceWithGrad.apply(input.sum(dims, dtype=acc)) / count).to(input.dtype)
        centered = input - mean.reshape(shape)
        var = _AllReduceWithGrad.apply((centered * centered).sum(dims, dtype=acc)) / count
        var = var.to(input.dtype)
        out = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = var.detach() * (count / (count - 1).clamp_min(1)).to(var.dtype)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out


_PLAIN_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """Replace every trainable ``nn.BatchNorm{1,2,3}d`` by a synchronised one (in place).

    CUDA: ``nn.SyncBatchNorm``; other devices: :class:`DistributedBatchNorm`. Frozen
    BatchNorm (the pretrained recipe) has fixed statistics and is left alone. Returns the
    module and the number of layers converted.
    """
    converted = 0

    def convert(child: nn.Module) -> nn.Module:
        nonlocal converted
        if isinstance(child, (nn.SyncBatchNorm, DistributedBatchNorm)):
            return child
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            if type(child) not in _PLAIN_BATCHNORM:
                raise DistributedSetupError(
                    f"model.sync_bn cannot convert {type(child).__module__}."
                    f"{type(child).__name__} (only nn.BatchNorm1d/2d/3d); use "
                    "model.freeze_bn=true, or model.sync_bn=false for per-rank statistics"
                )
            cls = nn.SyncBatchNorm if device.type == "cuda" else DistributedBatchNorm
            like = next(iter([*child.parameters(), *child.buffers()]), None)
            new = cls(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
                device=like.device if like is not None else None,
                dtype=child.weight.dtype if child.affine else None,
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            for p_new, p_old in zip(new.parameters(), child.parameters(), strict=True):
                p_new.requires_grad_(p_old.requires_grad)
            converted += 1
            return new
        for name, grandchild in child.named_children():
            setattr(child, name, convert(grandchild))
        return child

    return convert(module), converted


def trainable_batchnorm_count(module: nn.Module) -> int:
    """BatchNorm layers whose statistics come from the batch in training mode."""
    return sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, (nn.SyncBatchNorm, DistributedBatchNorm))
        for m in module.modules()
    )


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
        return [
            b - a
            for a, b in (
                slice_bounds(batch_size, self.world_size, r) for r in range(self.world_size)
            )
        ]

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
        self,
        model: nn.Module,
        dataset: Any,
        *,
        batch_size: int,
        device: torch.device,
        num_workers: int,
        amp: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Each rank embeds a contiguous shard; every rank gets all of them, in dataset order.

        Returns float32 / int64 CPU tensors, as :func:`nirdml.evaluation.compute_embeddings`.
        """
        from torch.utils.data import Subset

        from nirdml.evaluation import compute_embeddings

        n = len(dataset)
        if n < self.world_size:
            raise ValueError(
                f"cannot shard {n} evaluation items over {self.world_size} ranks; evaluate "
                "with fewer processes"
            )
        lo, hi = slice_bounds(n, self.world_size, self.rank)
        emb, labels = compute_embeddings(
            model,
            Subset(dataset, range(lo, hi)),
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            amp=amp,
        )
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        sizes = self.slice_sizes(n)
        emb_all = _all_gather_rows(emb.to(comm), sizes)
        return emb_all.cpu(), _all_gather_rows(labels.to(comm), sizes).cpu()


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
