"""A small CNN for small grey images: Omniglot (1x28x28) and scikit-learn digits (1x8x8).

Four conv-BN-ReLU-maxpool blocks, the classic few-shot "Conv-4" layout (Vinyals et al.
2016) with growing widths. The 2x2 max pools use ``ceil_mode``, so they never shrink a
map below 1x1: the same network handles 28x28 (-> 2x2 map) and 8x8 (-> 1x1 map) inputs,
and the global pooling of the embedding model does the rest. Its BatchNorm has no
pretrained statistics and trains normally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from nirdml.errors import InputError

from .weights import load_matching

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Conv-4 backbone: (B, C, H, W) -> (B, widths[-1], ceil(H/16), ceil(W/16)) feature map."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if len(widths) == 0 or any(int(w) < 1 for w in widths):
            raise InputError(f"widths must be a non-empty list of positive ints, got {widths!r}.")
        blocks = []
        c_in = in_channels
        for w in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, int(w), kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(int(w)),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
                )
            )
            c_in = int(w)
        self.blocks = nn.Sequential(*blocks)
        self.num_features: int = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``block1``, ``block2``, ...: applied in order, they are ``forward``."""
        return [(f"block{i}", b) for i, b in enumerate(self.blocks, start=1)]

    def load_reference_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a SmallCNN state_dict."""
        load_matching(self, state, what="small_cnn")


def build_small_cnn(arch: str, pretrained: bool | str, in_channels: int) -> SmallCNN:
    """The small CNN of the grey presets (no pretrained weights)."""
    return SmallCNN(in_channels=in_channels)
