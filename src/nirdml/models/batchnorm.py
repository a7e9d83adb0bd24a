"""Frozen BatchNorm: normalise with the pretrained running statistics, also in train mode.

The published NIR runs fine-tune an ImageNet ResNet50 whose BatchNorm layers keep their
ImageNet running statistics (the authors put every BN module in eval mode and disabled its
``.train``) while the affine weight and bias still train. Here that behaviour is a module
class, so it survives ``.train()``, ``deepcopy``, pickling and ``state_dict`` round trips,
and nothing is monkeypatched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    raise ValueError(
        f"Cannot freeze the BatchNorm layer of type {type(bn).__module__}.{type(bn).__name__}: "
        "only nn.BatchNorm2d and timm's BatchNormAct2d are supported. "
        "Build the model with freeze_bn=False to train it with ordinary BatchNorm."
    )
