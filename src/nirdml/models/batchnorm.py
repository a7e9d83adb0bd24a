"""Frozen BatchNorm: normalise with the pretrained running statistics, also in train mode.

The published NIR runs fine-tune an ImageNet ResNet50 whose BatchNorm layers keep their
ImageNet running statistics (the authors put every BN module in eval mode and disabled its
``.train``) while the affine weight and bias still train. Here that behaviour is a module
class, so it survives ``.train()``, ``deepcopy``, pickling and ``state_dict`` round trips,
and nothing is monkeypatched.

Distributed training with trainable BatchNorm: :func:`convert_sync_batchnorm` swaps in
layers that normalise with global-batch statistics (:class:`DistributedBatchNorm`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import DistributedSetupError, InputError

__all__ = ["FrozenBatchNorm2d", "FrozenBatchNormAct2d", "freeze_batchnorm"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d that always uses its running statistics and never updates them.

    The state-dict layout is the one of :class:`torch.nn.BatchNorm2d` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so torchvision / timm /
    EfficientNet checkpoints load unchanged. ``weight`` and ``bias`` stay ``nn.Parameter``:
    they train unless ``freeze_affine`` is set, in which case they are excluded from
    autograd in ``forward`` (robust even if someone flips ``requires_grad`` back on).

    It deliberately does not subclass ``nn.BatchNorm2d``: ``nn.SyncBatchNorm`` conversion
    (distributed training) would otherwise turn it back into a statistics-updating layer.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        freeze_affine: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.freeze_affine = freeze_affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features), requires_grad=not freeze_affine)
            self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=not freeze_affine)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, *, freeze_affine: bool = False
    ) -> FrozenBatchNorm2d:
        """A frozen copy of ``bn`` (same parameters, statistics, dtype and device)."""
        frozen = cls(bn.num_features, bn.eps, affine=bn.affine, freeze_affine=freeze_affine)
        frozen._copy_from(bn)
        return frozen

    def _copy_from(self, bn: nn.BatchNorm2d) -> None:
        ref = bn.running_mean
        self.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if bn.affine:
                self.weight.copy_(bn.weight)
                self.bias.copy_(bn.bias)
            self.running_mean.copy_(bn.running_mean)
            self.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                self.num_batches_tracked.copy_(bn.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if self.freeze_affine and weight is not None:
            weight, bias = weight.detach(), bias.detach()
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Old BatchNorm checkpoints have no num_batches_tracked; nn.BatchNorm2d accepts them too.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, freeze_affine={self.freeze_affine}"


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Frozen version of timm's ``BatchNormAct2d`` (BN, then its ``drop`` and ``act`` modules)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        freeze_affine: bool = False,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine=affine, freeze_affine=freeze_affine)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, *, freeze_affine: bool = False
    ) -> FrozenBatchNormAct2d:
        frozen = cls(
            bn.num_features,
            bn.eps,
            affine=bn.affine,
            freeze_affine=freeze_affine,
            drop=bn.drop,
            act=bn.act,
        )
        frozen._copy_from(bn)
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _is_timm_bn_act(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")


def freeze_batchnorm(module: nn.Module, *, freeze_affine: bool = False) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a frozen copy; returns ``module``.

    Handles ``nn.BatchNorm2d`` and timm's ``BatchNormAct2d``. BatchNorm layers without
    running statistics (``track_running_stats=False``) have nothing to freeze and are left
    as they are. Any other BatchNorm subclass raises, rather than being silently changed.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _freeze_one(module, freeze_affine)
    for name, child in list(module.named_children()):
        frozen = freeze_batchnorm(child, freeze_affine=freeze_affine)
        if frozen is not child:
            setattr(module, name, frozen)
    return module


def _freeze_one(bn: nn.modules.batchnorm._BatchNorm, freeze_affine: bool) -> nn.Module:
    if not bn.track_running_stats or bn.running_mean is None:
        return bn
    if _is_timm_bn_act(bn):
        return FrozenBatchNormAct2d.from_batchnorm(bn, freeze_affine=freeze_affine)
    if type(bn) is nn.BatchNorm2d:
        return FrozenBatchNorm2d.from_batchnorm(bn, freeze_affine=freeze_affine)
    raise InputError(
        f"Cannot freeze the BatchNorm layer of type {type(bn).__module__}.{type(bn).__name__}: "
        "only nn.BatchNorm2d and timm's BatchNormAct2d are supported. "
        "Build the model with freeze_bn=False to train it with ordinary BatchNorm."
    )


# ----------------------------------------------------------------------------- distributed


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
            raise InputError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

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
