"""torch.distributed support: one model trained across processes launched by ``torchrun``.

Design (documented in the README):
- The configured ``data.batch_size`` is the GLOBAL batch. Every rank draws the same global
  batch sequence and takes its contiguous slice (class groups kept whole), so ranks see
  different, class-balanced samples.
- Model AND loss (proxies, flow) are wrapped together in one DDP module, so every learned
  tensor is synchronised (proxies owned by the loss would otherwise drift apart).
- Embeddings are all-gathered WITH gradients before the loss, so ProxyAnchor's per-proxy
  terms and the NIR flow see exactly the global batch a single process would see. The
  gather's backward sums the per-rank gradients of each slice; with DDP's gradient
  averaging this reproduces single-process gradients exactly (BatchNorm statistics
  frozen, as in the paper's recipe).
- Evaluation: each rank embeds a contiguous shard; rank 0 gathers them and computes the
  metrics once; only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class DistributedSetupError(RuntimeError):
    """The torch.distributed environment is inconsistent."""


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward all-reduces the gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.size
        return grad[start : start + ctx.size]


def gather_batch(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The global batch from every rank's slice (embeddings keep their autograd graph)."""
    world = dist.get_world_size()
    labels = labels.to(embeddings.device)
    parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts, labels.contiguous())
    return _GatherWithGrad.apply(embeddings), torch.cat(parts)


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain process is rank 0 of 1."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), _local_rank())
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            world = int(os.environ["WORLD_SIZE"])
            rank = int(os.environ.get("RANK", "-1"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise DistributedSetupError(
                f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); launch with torchrun"
            ) from exc
        if world < 1 or not 0 <= rank < world:
            raise DistributedSetupError(
                f"RANK={os.environ.get('RANK')} is not in [0, WORLD_SIZE={world}); launch with "
                "`torchrun --nproc_per_node=N -m nirdml train ...` which sets both"
            )
        if world > 1 and "MASTER_ADDR" not in os.environ:
            raise DistributedSetupError(
                "WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun (which sets "
                "MASTER_ADDR/MASTER_PORT) or set them for every node"
            )
        return cls(rank, world, local)

    def init(self, device: torch.device) -> None:
        """Create the process group (NCCL on CUDA, gloo on CPU) if not already there."""
        if not self.enabled or dist.is_initialized():
            return
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedSetupError(
                    f"LOCAL_RANK={self.local_rank} but this node has "
                    f"{torch.cuda.device_count()} GPUs; use --nproc_per_node <= the GPU count"
                )
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        self._owns_group = True

    def wrap(self, module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
        """DDP over ``module`` (model + loss) when distributed, else the module itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )

    def gather_fn(self) -> Any:
        return gather_batch if self.enabled else None

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def compute_embeddings(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        batch_size: int,
        device: torch.device,
        num_workers: int,
    ) -> tuple[Tensor, Tensor]:
        """Each rank embeds a contiguous shard; rank 0 returns all, in dataset order."""
        from torch.utils.data import Subset

        from nirdml.evaluation import compute_embeddings

        n = len(dataset)
        bounds = [n * r // self.world_size for r in range(self.world_size + 1)]
        shard = Subset(dataset, range(bounds[self.rank], bounds[self.rank + 1]))
        emb, labels = compute_embeddings(
            model, shard, batch_size=batch_size, device=device, num_workers=num_workers
        )
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (emb.cpu(), labels.cpu()))
        if not self.is_main:
            return emb, labels
        return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
