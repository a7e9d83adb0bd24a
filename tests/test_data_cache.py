"""Pre-resized memory-mapped cache: same tensors as decoding, atomic build, staleness checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nirdml.data import build_cache, cached, load_dataset


def photo_folder(root: Path) -> Path:
    """Noise 'photos' of several sizes and modes in 4 class folders (JPEG and PNG)."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (300, 200), (180, 120)]
    for c in range(4):
        for k, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            folder = root / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            if k == 3:
                img.convert("L").save(folder / f"{k}.png")
            else:
                img.save(folder / f"{k}.jpg", quality=90)
    return root


def test_cache_serves_identical_test_tensors(tmp_path: Path) -> None:
    s = load_dataset("folder", photo_folder(tmp_path / "photos"))
    directory = build_cache(s.test, tmp_path / "cache-test", progress=False)
    assert sorted(p.name for p in directory.iterdir()) == ["index.npz", "meta.json", "pixels.u8"]
    assert not list(tmp_path.glob(".cache-test.build-*"))
    c = cached(s.test, directory)
    assert len(c) == len(s.test) and np.array_equal(c.labels, s.test.labels)
    assert c.class_names == s.test.class_names and c.paths == s.test.paths
    for i in range(len(c)):
        x, y = c[i]
        ref, ref_y = s.test[i]
        assert y == ref_y and torch.equal(x, ref)  # Resize(256) + CenterCrop(224), bit-exact
    raw = cached(s.test.with_transform(None), directory)
    shapes = [tuple(raw[i][0].shape) for i in range(len(raw))]
    assert shapes[:4] == [
        (3, 256, 341),
        (3, 341, 256),
        (3, 200, 300),
        (1, 120, 180),
    ]  # no upscaling


def test_cached_train_split_with_workers(tmp_path: Path) -> None:
    s = load_dataset("folder", photo_folder(tmp_path / "photos"), val_classes=1)
    directory = build_cache(s.train, tmp_path / "c", num_workers=2, progress=False)
    c = cached(s.train, directory)
    batches = list(DataLoader(c, batch_size=4, num_workers=2))
    assert sum(len(y) for _, y in batches) == len(s.train)
    assert all(x.shape[1:] == (3, 224, 224) for x, _ in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(s.train.labels))


def test_cache_staleness_and_reuse(tmp_path: Path) -> None:
    s = load_dataset("folder", photo_folder(tmp_path / "photos"))
    d = build_cache(s.test, tmp_path / "c", progress=False)
    stamp = (d / "pixels.u8").stat().st_mtime_ns
    assert build_cache(s.test, d, progress=False) == d  # reused
    assert (d / "pixels.u8").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other images.*overwrite=True"):
        cached(s.train, d)
    with pytest.raises(ValueError, match="other images"):
        build_cache(s.train, d, progress=False)
    build_cache(s.train, d, overwrite=True, progress=False)
    assert len(cached(s.train, d)) == len(s.train)
    with pytest.raises(FileNotFoundError, match="not an image cache"):
        cached(s.train, tmp_path / "photos")
    with pytest.raises(ValueError, match="already held in memory"):
        build_cache(load_dataset("digits").train, tmp_path / "d", progress=False)
