"""build_model: the one entry point that assembles an EmbeddingModel from a few choices."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nirdml.errors import InputError, MissingFileError

from .batchnorm import freeze_batchnorm
from .embedding import EmbeddingModel
from .pooling import build_pooling
from .registry import ARCHS, Backbone, backbone
from .weights import is_embedding_state, load_matching, read_state_dict

__all__ = ["ARCHS", "build_model", "model_from_spec"]

_SPEC_KEYS = (
    "arch",
    "embed_dim",
    "pooling",
    "pretrained",
    "weights",
    "freeze_bn",
    "freeze_bn_affine",
    "in_channels",
    "seed",
)


def build_model(
    arch: str,
    embed_dim: int,
    *,
    pooling: str = "avg",
    pretrained: bool | str | None = None,
    weights: str | Path | None = None,
    freeze_bn: bool | None = None,
    freeze_bn_affine: bool = False,
    in_channels: int = 3,
    seed: int = 0,
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel`: backbone, global pooling, Linear head, L2 norm.

    Args:
        arch: ``"resnet50"``, ``"resnet18"``, ``"efficientnet_lite0"``, ``"small_cnn"`` or
            ``"timm:<name>"`` (any timm model, e.g. ``"timm:resnet50.a1_in1k"``).
        embed_dim: embedding dimension D.
        pooling: ``"avg"``, ``"max"`` or ``"avg+max"`` (sum of both: the authors' "double").
        pretrained: start from ImageNet weights. ``None`` (default): yes, except for
            ``small_cnn``, which has none. For ResNets a torchvision weights name selects
            the version: ``True`` = ``"IMAGENET1K_V1"`` (the authors'), ``"IMAGENET1K_V2"``.
        weights: a local weights file used instead of any download: the backbone's upstream
            state_dict (torchvision / efficientnet-lite / timm format) or one of our own
            ``EmbeddingModel`` states (then the head is loaded too).
        freeze_bn: keep the BatchNorm running statistics fixed (also in train mode).
            ``None`` (default): frozen when the backbone starts from pretrained weights
            (``pretrained`` or ``weights``), trained normally otherwise and for ``small_cnn``.
        freeze_bn_affine: also freeze the BatchNorm weight and bias (needs frozen BN).
        in_channels: input channels (3 for RGB). Pretrained torchvision / EfficientNet
            backbones need 3; timm adapts its first conv itself.
        seed: seed of the random initialisation (a local RNG: the global one is untouched).
    """
    _check_sizes(embed_dim, in_channels)
    pool = build_pooling(pooling)
    entry = backbone(arch)
    weights = _existing_file(weights)
    from_file = weights is not None
    pretrained = _resolve_pretrained(arch, pretrained, from_file=from_file)
    freeze_bn = _resolve_freeze_bn(
        entry, freeze_bn, freeze_bn_affine, starts_pretrained=bool(pretrained) or from_file
    )
    _check_in_channels(arch, entry, pretrained, in_channels)
    spec = {
        "arch": arch,
        "embed_dim": embed_dim,
        "pooling": pooling,
        "pretrained": pretrained,
        "weights": None if weights is None else str(weights),
        "freeze_bn": bool(freeze_bn),
        "freeze_bn_affine": bool(freeze_bn_affine),
        "in_channels": in_channels,
        "seed": int(seed),
    }
    return _assemble(entry, pool, spec, weights, freeze_affine=freeze_bn_affine)


def _check_sizes(embed_dim: int, in_channels: int) -> None:
    """Refuse an embedding dimension or channel count that is not a positive int."""
    if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
        raise InputError(f"embed_dim must be a positive int, got {embed_dim!r}.")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise InputError(f"in_channels must be a positive int, got {in_channels!r}.")


def _existing_file(weights: str | Path | None) -> Path | None:
    """The weights file as a Path (``~`` expanded), refused early when it does not exist."""
    if weights is None:
        return None
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise MissingFileError(
            f"weights={str(weights)!r} does not exist: pass the path of a saved state_dict "
            "(or weights=None to use pretrained= instead)."
        )
    return weights


def _resolve_freeze_bn(
    entry: Backbone, freeze_bn: bool | None, freeze_bn_affine: bool, *, starts_pretrained: bool
) -> bool:
    """Whether BN is frozen (default: when a pretrained backbone starts from weights)."""
    if freeze_bn is None:
        freeze_bn = entry.has_pretrained and starts_pretrained
    if freeze_bn_affine and not freeze_bn:
        raise InputError(
            "freeze_bn_affine=True only applies to frozen BatchNorm: pass freeze_bn=True as well."
        )
    return freeze_bn


def _check_in_channels(
    arch: str, entry: Backbone, pretrained: bool | str, in_channels: int
) -> None:
    """Refuse non-RGB input where the pretrained weights or the backbone need 3 channels."""
    if in_channels != 3 and pretrained and not entry.any_channels:
        raise InputError(
            f"Pretrained {arch} takes 3-channel RGB input, got in_channels={in_channels}: convert "
            "grey images to RGB in the transform, or pass pretrained=False."
        )
    if entry.rgb_only and in_channels != 3:
        raise InputError(
            f"{arch} takes 3-channel RGB input (its input re-normalisation is per RGB "
            f"channel), got in_channels={in_channels}: convert the images to RGB."
        )


def _assemble(
    entry: Backbone,
    pool: nn.Module,
    spec: dict[str, Any],
    weights: Path | None,
    *,
    freeze_affine: bool,
) -> EmbeddingModel:
    """The model ``spec`` describes, seeded for a reproducible init, with ``weights`` loaded."""
    arch = spec["arch"]
    state = read_state_dict(weights) if weights is not None else None
    own_state = state is not None and is_embedding_state(state)

    # Construct under a forked, seeded RNG: reproducible init, global RNG left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        net = entry.load_builder()(arch, spec["pretrained"], spec["in_channels"])
        if state is not None and not own_state:
            net.load_reference_state_dict(state)
        if spec["freeze_bn"]:
            freeze_batchnorm(net, freeze_affine=freeze_affine)
        model = EmbeddingModel(net, pool, net.num_features, spec["embed_dim"], spec)
    if own_state:
        load_matching(model, state, what=f"EmbeddingModel({arch}, embed_dim={spec['embed_dim']})")
    return model


def model_from_spec(
    spec: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None
) -> EmbeddingModel:
    """Rebuild the model that ``build_model`` described in ``spec`` (``model.spec``).

    No weights are downloaded or read: the structure (including frozen BN) is rebuilt with
    random weights, then ``state_dict`` (e.g. from a checkpoint) is loaded if given.

    A frozen-feature run's spec (``kind: frozen``) rebuilds its backbone from the weights'
    source (pretrained weights or the local file, checked against the recorded identity)
    and loads the head: see :func:`nirdml.models.head.compose_frozen`.
    """
    if spec.get("kind") == "frozen":
        from .head import compose_frozen

        return compose_frozen(spec, state_dict)
    unknown = set(spec) - set(_SPEC_KEYS)
    missing = {"arch", "embed_dim"} - set(spec)
    if unknown or missing:
        raise InputError(
            f"Not a model spec (unknown keys {sorted(unknown)}, missing {sorted(missing)}): pass "
            "the dict stored as model.spec by build_model."
        )
    model = build_model(
        spec["arch"],
        spec["embed_dim"],
        pooling=spec.get("pooling", "avg"),
        pretrained=False,
        freeze_bn=spec.get("freeze_bn", False),
        freeze_bn_affine=spec.get("freeze_bn_affine", False),
        in_channels=spec.get("in_channels", 3),
        seed=spec.get("seed", 0),
    )
    model.spec = dict(spec)
    if state_dict is not None:
        load_matching(model, state_dict, what=f"EmbeddingModel({spec['arch']})")
    return model


def _resolve_pretrained(arch: str, pretrained: bool | str | None, *, from_file: bool) -> bool | str:
    """What to download: False, True, or a torchvision weights name (ResNets)."""
    if from_file:
        return False  # a local weights file replaces any download
    entry = backbone(arch)
    if pretrained is None:
        pretrained = entry.has_pretrained
    if pretrained and not entry.has_pretrained:
        raise InputError(
            f"{arch} has no pretrained weights: pass pretrained=False (or leave it None)."
        )
    if isinstance(pretrained, str):
        if not entry.weight_versions:
            raise InputError(
                f"pretrained={pretrained!r}: named weight versions are for the torchvision "
                f"ResNets; for {arch} pass pretrained=True (timm: put the tag in the name, "
                "e.g. 'timm:resnet50.a1_in1k')."
            )
        from .backbones import torchvision_weights

        return torchvision_weights(arch, pretrained).name
    if not isinstance(pretrained, bool):
        raise InputError(f"pretrained must be a bool, a weights name or None, got {pretrained!r}.")
    if pretrained and entry.weight_versions:
        return "IMAGENET1K_V1"
    return pretrained
