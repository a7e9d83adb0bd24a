"""Splits against an independent reader: pytorch-metric-learning's CUB, SOP and Cars196.

Same files on disk; both readers must give the same images per split and the same
official class of each image (ours re-indexed 0..C-1 in official id order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nirdml.data import load_dataset
from test_data_datasets import make_cub, make_sop, write_image

pml = pytest.importorskip("pytorch_metric_learning.datasets")


def assert_same(ours, ref_paths: list[str], ref_ids: list[int]) -> None:
    """Same (path -> official id) pairs, and our labels ordered like the official ids."""
    ref = {str(Path(p)): int(c) for p, c in zip(ref_paths, ref_ids, strict=True)}
    assert sorted(ours.paths) == sorted(ref)
    official = np.array([ref[p] for p in ours.paths])
    # One label per official id, increasing with the id.
    order = sorted(set(official.tolist()))
    assert np.array_equal(ours.labels, np.searchsorted(order, official))


@pytest.mark.parametrize("split", ["train", "test"])
def test_cub_matches_pml(tmp_path: Path, split: str) -> None:
    make_cub(tmp_path, ids=(1, 7, 99, 100, 101, 102, 180, 200))
    ours = getattr(load_dataset("cub200", tmp_path), split)
    ref = pml.CUB(str(tmp_path), split=split)
    assert_same(ours, ref.paths, ref.labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_sop_matches_pml(tmp_path: Path, split: str) -> None:
    make_sop(tmp_path)
    ours = getattr(load_dataset("sop", tmp_path), split)
    ref = pml.StanfordOnlineProducts(str(tmp_path), split=split)
    assert_same(ours, ref.paths, ref.labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cars_kaggle_layout_matches_pml(tmp_path: Path, split: str) -> None:
    names = [f"Brand{i} Model/Sub {2000 + i % 13}" for i in range(1, 197)]
    (tmp_path / "names.csv").write_text("\n".join(names) + "\n")
    annos = {"train": [], "test": []}
    n = 0
    for cid in (1, 2, 97, 98, 99, 100, 150, 196):
        for half in ("train", "test"):
            n += 1
            fname = f"{n:05d}.jpg"
            folder = tmp_path / "car_data" / "car_data" / half / names[cid - 1].replace("/", "-")
            write_image(folder / fname, cid)
            annos[half].append(f"{fname},1,2,10,8,{cid}")
    for half, rows in annos.items():
        (tmp_path / f"anno_{half}.csv").write_text("\n".join(rows) + "\n")
    ours = getattr(load_dataset("cars196", tmp_path), split)
    ref = pml.Cars196(str(tmp_path), split=split)
    assert_same(ours, ref.paths, ref.labels)
