"""Corrupt / truncated images: clear errors naming the file, or counted replacements."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nirdml.data import CorruptImageError, load_dataset, verify
from test_data_datasets import class_id_of, make_cub


def damage(base: Path) -> tuple[Path, Path]:
    """Truncate one image of class 1 and overwrite one of class 150 with junk bytes."""
    truncated = sorted((base / "images" / "001.Bird_1").iterdir())[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    junk = sorted((base / "images" / "150.Bird_150").iterdir())[0]
    junk.write_bytes(b"this is not an image" * 10)
    return truncated, junk


class ClassIdTensor:
    """Picklable transform (for spawned workers): image -> its encoded class id."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.tensor(class_id_of(img))


def index_of(ds, path: Path) -> int:
    return ds.paths.index(str(path))


def test_corrupt_image_error_names_file_and_option(tmp_path: Path) -> None:
    truncated, junk = damage(make_cub(tmp_path))
    s = load_dataset("cub200", tmp_path)
    for ds, bad in ((s.train, truncated), (s.test, junk)):
        with pytest.raises(CorruptImageError) as e:
            ds[index_of(ds, bad)]
        assert str(bad) in str(e.value) and "skip_corrupt=True" in str(e.value)
    # Inside DataLoader workers the error reaches the main process with the file name.
    batches = iter(DataLoader(s.train, batch_size=4, num_workers=2))
    with pytest.raises(CorruptImageError, match="Bird_1_0001_1.jpg"):
        for _ in batches:
            pass
    # Stop the failed loader's workers now: left to the garbage collector, a later fork
    # would inherit it and wait for workers that are not its children.
    batches._shutdown_workers()


def test_verify_lists_bad_files(tmp_path: Path) -> None:
    truncated, junk = damage(make_cub(tmp_path))
    s = load_dataset("cub200", tmp_path)
    report = verify(s.train, progress=False)
    assert report.checked == 9 and [b.path for b in report.bad] == [str(truncated)]
    assert "truncated" in report.bad[0].error.lower()
    report = verify(s.test, progress=False, num_workers=2)
    assert [b.path for b in report.bad] == [str(junk)] and not report.ok
    assert str(junk) in str(report)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_skip_corrupt_replaces_and_counts_across_workers(tmp_path: Path, context: str) -> None:
    truncated, junk = damage(make_cub(tmp_path))
    s = load_dataset("cub200", tmp_path, skip_corrupt=True, transform_preset="none")
    ds = s.train
    i = index_of(ds, truncated)
    # Workers hit the bad file; the count is visible here afterwards.
    wrapped = ds.with_transform(ClassIdTensor())
    loader = DataLoader(
        wrapped,
        batch_size=3,
        num_workers=2 if context == "fork" else 1,
        multiprocessing_context=context,
    )
    seen = torch.cat([x for x, _ in loader])
    assert seen.tolist() == [(1, 2, 100)[y] for y in ds.labels]  # replaced by its own class
    assert ds.corrupt_count == 1 and ds.corrupt_paths() == [str(truncated)]
    assert s.test.corrupt_count == 0
    # Deterministic replacement: the next image of the same class.
    img, label = ds[i]
    assert label == 0
    members = [k for k in range(len(ds)) if ds.labels[k] == 0]
    nxt = members[(members.index(i) + 1) % len(members)]
    assert img.tobytes() == ds[nxt][0].tobytes()
    assert ds.corrupt_count == 1  # counted once per file
    assert "1 corrupt file(s) replaced" in ds.describe()


def test_skip_corrupt_whole_class_unreadable(tmp_path: Path) -> None:
    base = make_cub(tmp_path)
    for p in (base / "images" / "002.Bird_2").iterdir():
        p.write_bytes(b"junk")
    s = load_dataset("cub200", tmp_path, skip_corrupt=True)
    i = int((s.train.labels == 1).nonzero()[0][0])
    with pytest.raises(CorruptImageError, match="every image of class '002.Bird_2'"):
        s.train[i]
    assert s.train.corrupt_count == 3


def test_verify_marks_for_skip(tmp_path: Path) -> None:
    truncated, _ = damage(make_cub(tmp_path))
    s = load_dataset("cub200", tmp_path, skip_corrupt=True)
    verify(s.train, progress=False)
    assert s.train.corrupt_paths() == [str(truncated)]
