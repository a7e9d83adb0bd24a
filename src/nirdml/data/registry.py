"""The one table of datasets and of transform presets, as plain data.

``load_dataset``, config validation, the training builders and the evaluation defaults
read this table; nothing here imports torch (config errors stay quick), a reader is
imported only by :meth:`DatasetEntry.load_reader`. Adding a dataset: its reader module in
``nirdml/data/`` plus one :data:`DATASETS` entry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
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


TRANSFORMS: dict[str, TransformEntry] = {
    "resnet": TransformEntry(3, "3x224x224 RGB"),
    "omniglot": TransformEntry(1, "1x28x28 grey"),
    "digits": TransformEntry(1, "1x8x8 grey"),
}


def dataset_choices(name: str) -> str:
    """ "one of a, b, ..." and the closest name, for a message about an unknown ``name``."""
    close = difflib.get_close_matches(name.lower(), [*DATASETS, *ALIASES], n=1)
    return f"one of {', '.join(DATASETS)}" + (f". Did you mean {close[0]!r}?" if close else "")


def dataset_name(name: str) -> str:
    """The table name of ``name`` (case-insensitive, aliases resolved); a ValueError that
    lists the datasets when it is unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose {dataset_choices(name)}")
    return key
