"""Input-pipeline speed per CPU core: JPEG decoding vs the pre-resized memory-mapped cache.

Builds N real-looking 500x375 JPEG photos (ORL face photos from ../shared/data, upscaled,
tinted and textured; falls back to smooth synthetic scenes without it), then measures
images/s on ONE thread in ONE process for: decode only, the "resnet" train and test
transforms from JPEG files, and the same transforms served from the cache. Results go to
benchmarks/results/data_pipeline.md (written atomically).

    python benchmarks/data_pipeline.py [--images 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from machine import cpu_name  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nirdml.data import build_cache, build_transforms, cached  # noqa: E402
from nirdml.data.base import FileStorage, RetrievalDataset, open_image  # noqa: E402


def shared_faces() -> np.ndarray | None:
    for base in (os.environ.get("NIRDML_SHARED_DATA"), ROOT.parent / "shared" / "data"):
        if base and (Path(base) / "orl_faces" / "orl_faces.npz").is_file():
            with np.load(Path(base) / "orl_faces" / "orl_faces.npz") as z:
                key = next(k for k in z.files if z[k].ndim >= 3)
                return np.asarray(z[key]).reshape(-1, *z[key].shape[-2:])
    return None


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """n colour 500x375 JPEGs (quality 90) in 10 class folders."""
    rng = np.random.default_rng(seed)
    faces = shared_faces()
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        if faces is not None:
            face = Image.fromarray(faces[i % len(faces)].astype(np.uint8)).resize(
                (500, 375), Image.BICUBIC
            )
            base = np.asarray(face, dtype=np.float32)
        else:
            base = 128 + 60 * np.sin(xx / rng.uniform(20, 60)) * np.cos(yy / rng.uniform(20, 60))
        tint = rng.uniform(0.6, 1.2, size=3).astype(np.float32)
        grad = (xx / 500 * rng.uniform(-40, 40) + yy / 375 * rng.uniform(-40, 40))[..., None]
        texture = rng.normal(0, 6, size=(375, 500, 3)).astype(np.float32)
        img = np.clip(base[..., None] * tint + grad + texture, 0, 255).astype(np.uint8)
        out = folder / f"class{i % 10:02d}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out / f"{i:05d}.jpg", quality=90)


def rate(fn, n: int, repeats: int) -> tuple[float, float]:
    """Median and best images/s over ``repeats`` passes of ``fn(i)`` for i < n."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_pipeline.md"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.images)
        jpeg_kb = sum(p.stat().st_size for p in photos.rglob("*.jpg")) / args.images / 1024
        files_all = sorted(photos.rglob("*.jpg"))
        names = sorted({p.parent.name for p in files_all})
        everything = RetrievalDataset(
            FileStorage([str(p) for p in files_all]),
            [names.index(p.parent.name) for p in files_all],
            names,
            name="photos",
        )
        t = time.perf_counter()
        cache_dir = build_cache(everything, Path(tmp) / "cache", progress=False)
        build_rate = len(everything) / (time.perf_counter() - t)
        cache_kb = (cache_dir / "pixels.u8").stat().st_size / len(everything) / 1024
        n = len(everything)
        tr, te = build_transforms("resnet", True), build_transforms("resnet", False)
        files = {"train": everything.with_transform(tr), "test": everything.with_transform(te)}
        mem = {k: cached(v, cache_dir) for k, v in files.items()}
        paths = everything.paths
        results = [
            (
                "decode JPEG only (PIL, full decode + RGB)",
                rate(lambda i: open_image(paths[i]).convert("RGB"), n, args.repeats),
            ),
            (
                "JPEG files + resnet train transform",
                rate(lambda i: files["train"][i], n, args.repeats),
            ),
            (
                "JPEG files + resnet test transform",
                rate(lambda i: files["test"][i], n, args.repeats),
            ),
            (
                "cache (short side 256) + resnet train transform",
                rate(lambda i: mem["train"][i], n, args.repeats),
            ),
            (
                "cache (short side 256) + resnet test transform",
                rate(lambda i: mem["test"][i], n, args.repeats),
            ),
            (
                "cache read only (memmap -> uint8 tensor)",
                rate(lambda i: mem["test"].storage.load(i), n, args.repeats),
            ),
        ]
    cpu = cpu_name()
    lines = [
        "# Data pipeline speed (images/s per CPU core)",
        "",
        f"`python benchmarks/data_pipeline.py --images {args.images} --repeats {args.repeats}`; "
        f"one process, `torch.set_num_threads(1)`; {cpu}; torch {torch.__version__}, "
        f"Pillow {PIL.__version__}, Python {platform.python_version()}.",
        "",
        f"Input: {n} colour 500x375 JPEGs (quality 90, {jpeg_kb:.0f} KiB each; ORL face photos "
        "upscaled, tinted, with gradient and noise texture). Cache: short side 256, uint8, "
        f"{cache_kb:.0f} KiB per image; built at {build_rate:.0f} images/s on one core.",
        "",
        "| pipeline | images/s (median) | images/s (best) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {med:.0f} | {best:.0f} |" for name, (med, best) in results]
    tr_speedup = results[3][1][0] / results[1][1][0]
    te_speedup = results[4][1][0] / results[2][1][0]
    lines += [
        "",
        f"Speed-up from the cache: train transform x{tr_speedup:.1f}, test transform "
        f"x{te_speedup:.1f}. Multiply by the number of DataLoader workers (one core each) "
        "for the throughput of a training input pipeline.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp_out, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
