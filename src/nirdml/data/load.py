"""``load_dataset``: a dataset of the table (nirdml.data.registry), split and transformed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nirdml.data.base import DatasetSplits, RetrievalDataset
from nirdml.data.download import fetch_dataset
from nirdml.data.registry import (
    DATASETS,
    DOWNLOAD_OPTIONS,
    TRANSFORMS,
    dataset_name,
    option_problem,
)
from nirdml.data.splits import carve_validation
from nirdml.data.transforms import build_transforms, check_image_size
from nirdml.errors import InputError, InputTypeError


def file_reader(name: str) -> Callable[[Any], Any] | None:
    """How dataset ``name`` post-processes a decoded image file (None: as decoded).

    Omniglot PNGs are black ink on white; the reader inverts them to ink = 255, the
    convention of the whole Omniglot pipeline. Use it to embed new files like the training data.
    """
    return DATASETS[dataset_name(name)].load_file_reader()


def auto_val_classes(name: str, num_train_classes: int) -> int:
    """How many training classes ``val_classes="auto"`` moves into a validation split:
    10% (at least 2, so retrieval among them means something) for digits, folder, csv,
    Omniglot and cars98, if at least 2 training classes remain; else 0 (selection on test)."""
    entry = DATASETS.get(name)
    if entry is None or not entry.auto_val:
        return 0
    n_val = max(2, round(0.1 * num_train_classes))
    return n_val if num_train_classes - n_val >= 2 else 0


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    transform_preset: str | None = None,
    val_classes: float | int | str = 0,
    val_carve: str = "random",
    seed: int = 0,
    download: bool = False,
    skip_corrupt: bool = False,
    image_size: int | None = None,
    **layout_options: Any,
) -> DatasetSplits:
    """Load the train/test(/val) splits of a dataset, with the preset's transforms.

    name: "cub200", "cars196", "cars98", "orl", "sop", "inshop", "omniglot", "digits", "folder"
        or "csv".
    transform_preset: "resnet", "omniglot", "digits", "none" (raw PIL images / tensors) or
        None for the dataset's default ("resnet" for photos).
    val_classes: a fraction in (0, 1) or a count of TRAIN classes moved (chosen from
        ``seed``) into a class-disjoint validation split; 0 for none; ``"auto"``: see
        :func:`auto_val_classes` (the training configs' default).
    val_carve: ``"random"`` (classes drawn from ``seed``) or ``"last"`` (the last training
        classes in class order, a block like the test split; see ``carve_validation``).
    download: fetch and extract the public archives into ``root`` first (CUB, SOP,
        Omniglot); ``urls={archive file name: mirror url}`` overrides a source.
    image_size: crop size of the RGB ``resnet`` transform (train RandomResizedCrop, test
        Resize(round(S*256/224)) + CenterCrop(S)); None = 224, the paper's.
    skip_corrupt: drop missing files (counted in ``split.missing``) and replace unreadable
        images by another image of the same class (counted in ``split.corrupt_count``).
    layout_options: omniglot ``source`` ("auto"/"png"/"npz"); cars98/orl ``train_classes``
        ([first, last] class ids / subject numbers); folder/csv ``train_classes``,
        ``test_classes``; csv ``image_root``.
    """
    key = dataset_name(name)
    entry = DATASETS[key]
    splits = _read_splits(key, root, download, skip_corrupt, layout_options)
    preset = _checked_preset(
        entry.transform if transform_preset is None else transform_preset, image_size
    )
    train, val = _validation_split(key, splits.train, splits.val, val_classes, seed, val_carve)
    return DatasetSplits(
        _transformed(train, preset, True, image_size),
        _transformed(splits.test, preset, False, image_size),
        _transformed(val, preset, False, image_size),
    )


def _read_splits(
    key: str,
    root: str | Path | None,
    download: bool,
    skip_corrupt: bool,
    options: dict[str, Any],
) -> DatasetSplits:
    """The dataset's splits as its reader gives them (downloaded into ``root`` first if
    asked), after checking the options are the dataset's."""
    problem = option_problem(key, options, download)
    if problem is not None:
        raise InputTypeError(problem)
    download_opts = {k: v for k, v in options.items() if k in DOWNLOAD_OPTIONS}
    layout_options = {k: v for k, v in options.items() if k not in DOWNLOAD_OPTIONS}
    if download:
        if root is None:
            raise InputError(f"download=True needs root=... (the folder to download {key} into)")
        fetch_dataset(key, root, **download_opts)
    return DATASETS[key].load_reader()(root, skip_corrupt=skip_corrupt, **layout_options)


def _checked_preset(preset: str, image_size: int | None) -> str:
    """``preset`` if it is a transform preset (or ``"none"``) that takes ``image_size``."""
    if preset != "none" and preset not in TRANSFORMS:
        raise InputError(
            f"unknown transform_preset {preset!r}; choose one of {', '.join(TRANSFORMS)}, "
            "'none' or None"
        )
    if preset != "none":
        check_image_size(preset, image_size)
    return preset


def _validation_split(
    key: str,
    train: RetrievalDataset,
    val: RetrievalDataset | None,
    val_classes: float | int | str,
    seed: int,
    val_carve: str,
) -> tuple[RetrievalDataset, RetrievalDataset | None]:
    """(train, val): ``val_classes`` of the training classes carved into a validation split,
    unless the data defines one."""
    if val_classes == "auto":
        val_classes = 0 if val is not None else auto_val_classes(key, train.num_classes)
    if val_classes:
        if val is not None:
            raise InputError(
                f"{key} data already defines a validation split; drop val_classes or the 'val' rows"
            )
        train, val = carve_validation(train, val_classes, seed, val_carve)
    return train, val


def _transformed(
    ds: RetrievalDataset | None, preset: str, is_train: bool, image_size: int | None
) -> RetrievalDataset | None:
    """``ds`` with the preset's train or test transform (None: no split, stays None)."""
    if ds is None:
        return None
    return ds.with_transform(
        None if preset == "none" else build_transforms(preset, is_train, image_size)
    )
