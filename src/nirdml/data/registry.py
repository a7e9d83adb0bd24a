"""The one table of datasets and of transform presets, as plain data.

``load_dataset``, config validation, the training builders and the evaluation defaults
read this table; nothing here imports torch (config errors stay quick), a reader is
imported only by :meth:`DatasetEntry.load_reader`. Adding a dataset: its reader module in
``nirdml/data/`` plus one :data:`DATASETS` entry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nirdml.errors import InputError

_COMMON_METRICS = ("map@r", "r_precision", "map@1000", "map@1000_authors", "nmi", "f1")
SMALL_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", *_COMMON_METRICS)
"""The paper's CUB/Cars metrics (the default of datasets with few items per class)."""
SOP_METRICS = ("recall@1", "recall@10", "recall@100", "recall@1000", *_COMMON_METRICS)
INSHOP_METRICS = ("recall@1", "recall@10", "recall@20", "recall@30", "recall@40", "map@r")
"""In-Shop's published Recall@k ks (queries against the gallery) and MAP@R."""


def _load(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: its reader and what it takes, its defaults."""

    reader: str
    """``"module:function"`` called as ``reader(root, skip_corrupt=..., **options)``."""
    transform: str
    """Default transform preset (a :data:`TRANSFORMS` key)."""
    options: frozenset[str] = frozenset()
    """Layout options the reader accepts (``data.options``)."""
    metrics: tuple[str, ...] = SMALL_METRICS
    """Metrics reported when ``eval.metrics`` is not set."""
    needs_root: bool = True
    """False: the data ships with a library (no ``data.root``)."""
    auto_val: bool = False
    """``val_classes="auto"`` carves a validation split (else: selection on test, as the
    paper's CUB/Cars/SOP runs)."""
    file_reader: str | None = None
    """``"module:function"`` post-processing each decoded image file (None: as decoded)."""
    aliases: tuple[str, ...] = ()
    """Other names ``load_dataset`` and the config accept."""

    def load_reader(self) -> Callable[..., Any]:
        """The reader function (imports torch)."""
        return _load(self.reader)

    def load_file_reader(self) -> Callable[[Any], Any] | None:
        """The file post-processing function, or None."""
        return None if self.file_reader is None else _load(self.file_reader)


DATASETS: dict[str, DatasetEntry] = {
    "cub200": DatasetEntry("nirdml.data.cub:load_cub200", "resnet", aliases=("cub", "cub200_2011")),
    "cars196": DatasetEntry("nirdml.data.cars:load_cars196", "resnet", aliases=("cars",)),
    "cars98": DatasetEntry(
        "nirdml.data.cars98:load_cars98", "resnet", frozenset({"train_classes"}), auto_val=True
    ),
    "orl": DatasetEntry(
        "nirdml.data.orl:load_orl", "resnet", frozenset({"train_classes"}), auto_val=True
    ),
    "sop": DatasetEntry(
        "nirdml.data.sop:load_sop",
        "resnet",
        metrics=SOP_METRICS,
        aliases=("stanford_online_products",),
    ),
    "inshop": DatasetEntry(
        "nirdml.data.inshop:load_inshop",
        "resnet",
        metrics=INSHOP_METRICS,
        aliases=("in_shop", "deepfashion_inshop", "inshop_clothes"),
    ),
    "omniglot": DatasetEntry(
        "nirdml.data.omniglot:load_omniglot",
        "omniglot",
        frozenset({"source"}),
        auto_val=True,
        file_reader="nirdml.data.omniglot:ink_high",
    ),
    "digits": DatasetEntry(
        "nirdml.data.digits:load_digits_splits", "digits", needs_root=False, auto_val=True
    ),
    "folder": DatasetEntry(
        "nirdml.data.custom:load_folder",
        "resnet",
        frozenset({"train_classes", "test_classes"}),
        auto_val=True,
    ),
    "csv": DatasetEntry(
        "nirdml.data.custom:load_csv",
        "resnet",
        frozenset({"image_root", "train_classes", "test_classes"}),
        auto_val=True,
    ),
}
DATASET_NAMES = tuple(DATASETS)
ALIASES = {alias: name for name, entry in DATASETS.items() for alias in entry.aliases}


@dataclass(frozen=True)
class TransformEntry:
    """What a transform preset makes (checked against the model without torch)."""

    channels: int
    output: str
    size: int
    """Side of the images it makes (the default crop for a resizable preset)."""
    resizable: bool = False
    """Takes ``data.image_size`` (the side of its square crop)."""


DEFAULT_IMAGE_SIZE = 224
"""The paper's crop size for the ``resnet`` preset."""
MIN_IMAGE_SIZE = 16

TRANSFORMS: dict[str, TransformEntry] = {
    "resnet": TransformEntry(3, "3x224x224 RGB", DEFAULT_IMAGE_SIZE, resizable=True),
    "omniglot": TransformEntry(1, "1x28x28 grey", 28),
    "digits": TransformEntry(1, "1x8x8 grey", 8),
}

SAMPLERS: dict[str, bool] = {"authors": True, "m_per_class": False}
"""Batch sampler name -> whether classes and samples are drawn with replacement
(``authors``: with, as the authors' sampler; ``m_per_class``: without)."""
VAL_CARVES = ("random", "last")
"""Which training classes a validation split takes: drawn from the seed, or the last ones."""
DOWNLOAD_OPTIONS = frozenset({"urls", "opener"})
"""Options of ``fetch_dataset`` that ``load_dataset`` passes on with ``download=True``."""


def image_size_problem(preset: str, image_size: object) -> str | None:
    """Why ``image_size`` does not suit the transform ``preset`` (None: it does; only a
    resizable preset takes one)."""
    if image_size is None:
        return None
    if not TRANSFORMS[preset].resizable:
        fixed = ", ".join(f"{k} {t.size}" for k, t in TRANSFORMS.items() if not t.resizable)
        return (
            f"data.image_size={image_size} applies to the RGB 'resnet' transform only; the "
            f"{preset!r} transform has a fixed size ({fixed}): drop data.image_size"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        image_size = repr(image_size)
    elif image_size >= MIN_IMAGE_SIZE:
        return None
    return (
        f"data.image_size must be >= {MIN_IMAGE_SIZE} (the side of the square crop, an "
        f"integer >= {MIN_IMAGE_SIZE} pixels), got {image_size}; e.g. 224 (the paper), 160 "
        "or 128"
    )


def option_problem(name: str, options: Iterable[str], download: bool) -> str | None:
    """Why the layout ``options`` do not fit dataset ``name`` (a :data:`DATASETS` key), or
    None when they fit; download options count only with ``download``."""
    allowed = DATASETS[name].options
    keys = set(options)
    unknown = keys - allowed - DOWNLOAD_OPTIONS
    if unknown:
        close = difflib.get_close_matches(str(min(unknown)), [*allowed, *DOWNLOAD_OPTIONS], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (
            f"{name} does not take option(s) {sorted(unknown)}; it accepts "
            f"{sorted(allowed) or 'none'} (download options {sorted(DOWNLOAD_OPTIONS)} need "
            f"download=True).{hint}"
        )
    if keys & DOWNLOAD_OPTIONS and not download:
        return f"{sorted(keys & DOWNLOAD_OPTIONS)} only apply with download=True"
    return None


def dataset_choices(name: str) -> str:
    """ "one of a, b, ..." and the closest name, for a message about an unknown ``name``."""
    close = difflib.get_close_matches(name.lower(), [*DATASETS, *ALIASES], n=1)
    return f"one of {', '.join(DATASETS)}" + (f". Did you mean {close[0]!r}?" if close else "")


def default_transform_preset(name: str) -> str:
    """The transform preset a dataset uses unless told otherwise ("resnet" for photos)."""
    return DATASETS[dataset_name(name)].transform


def dataset_name(name: str) -> str:
    """The table name of ``name`` (case-insensitive, aliases resolved); a ValueError that
    lists the datasets when it is unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose {dataset_choices(name)}")
    return key
