"""RetrievalDataset and DatasetSplits: the data contract used by training and evaluation.

A RetrievalDataset is a view (an index array) into an image *storage* -- files on disk, an
in-memory array, or a pre-resized memory-mapped cache -- with int64 labels 0..C-1 for its
own split, the class names, and a transform. Views are cheap: the validation carve, the
cache wrapper and ``with_transform`` all share the storage instead of copying images.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from nirdml.data.errors import CorruptImageError, MissingImageError
from nirdml.errors import InputError

Transform = Callable[[Any], Any]


class ImageStorage:
    """Where images live; ``load(pos)`` returns a PIL image or a uint8/float CHW tensor."""

    #: True when loading can fail on bad files (so corrupt-image bookkeeping is needed).
    can_fail: bool = False

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def load(self, pos: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def path(self, pos: int) -> str | None:
        """File path of an image, or None for in-memory storages."""
        return None

    def paths_for(self, index: np.ndarray) -> list[str] | None:
        """File paths of several images, or None for in-memory storages."""
        return None


def _fix_message(path: str) -> str:
    return (
        f"Replace or re-extract {path}, run nirdml.data.verify(dataset) to list every bad "
        "file, or pass skip_corrupt=True to load_dataset to replace bad images by another "
        "image of the same class (counted in dataset.corrupt_count)."
    )


def _cli_fixes(path: str) -> tuple[str, str]:
    """The command line's fixes of a bad image file (the second one where a command takes
    ``data.skip_corrupt``)."""
    return (
        f"Replace, re-extract or remove {path}",
        "pass --set data.skip_corrupt=true to go on without the unreadable images (each "
        "replaced by another image of its class and counted)",
    )


def open_image(
    path: str, convert: Callable[[Image.Image], Image.Image] | None = None
) -> Image.Image:
    """Decode an image file fully (so truncation is detected now, not in a transform).

    Raises CorruptImageError / MissingImageError naming the file and the fix.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except FileNotFoundError as e:
        problem = f"image file {path} does not exist."
        err = MissingImageError(
            f"{problem} {_fix_message(path)}", cli=problem, fixes=_cli_fixes(path)
        )
        err.reason = "file does not exist"
        raise err from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        reason = f"{type(e).__name__}: {e}"
        problem = f"cannot decode image {path} ({reason})."
        err = CorruptImageError(
            f"{problem} {_fix_message(path)}", cli=problem, fixes=_cli_fixes(path)
        )
        err.reason = reason
        raise err from e
    return convert(img) if convert is not None else img


class FileStorage(ImageStorage):
    """Images as files. Paths are kept as one numpy bytes array (UTF-8): compact, and no
    per-path Python objects whose refcounts would copy memory in forked DataLoader workers."""

    can_fail = True

    def __init__(
        self, paths: Sequence[str], convert: Callable[[Image.Image], Image.Image] | None = None
    ) -> None:
        encoded = [os.fsencode(str(p)) for p in paths]
        self.paths = np.asarray(encoded, dtype=np.bytes_) if encoded else np.asarray([], "S1")
        self.convert = convert

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, pos: int) -> Image.Image:
        return open_image(self.path(pos), self.convert)

    def path(self, pos: int) -> str:
        return os.fsdecode(self.paths[pos])

    def paths_for(self, index: np.ndarray) -> list[str]:
        return [os.fsdecode(p) for p in self.paths[index]]


class ArrayStorage(ImageStorage):
    """Images kept in memory in their compact form (uint8/bool); ``to_image`` converts one."""

    def __init__(self, array: np.ndarray, to_image: Callable[[np.ndarray], Any]) -> None:
        self.array = array
        self.to_image = to_image

    def __len__(self) -> int:
        return len(self.array)

    def load(self, pos: int) -> Any:
        return self.to_image(self.array[pos])


def check_files_exist(paths: Sequence[str], annotation: str, skip_missing: bool) -> np.ndarray:
    """Boolean mask of the paths that exist; raise MissingImageError unless ``skip_missing``.

    Only ``stat`` calls -- no image is decoded -- so this stays fast on 120k-image datasets.
    """
    exists = np.fromiter((Path(p).is_file() for p in paths), dtype=bool, count=len(paths))
    if not exists.all() and not skip_missing:
        missing = [str(p) for p, ok in zip(paths, exists, strict=True) if not ok]
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        problem = f"{annotation} references {len(missing)} image(s) that do not exist: {shown}."
        raise MissingImageError(
            f"{problem} Re-extract the dataset archive (or use download=True), or pass "
            "skip_corrupt=True to drop missing images and count them (dataset.missing).",
            cli=problem,
            fixes=(
                "Re-extract the dataset (or correct the paths)",
                "pass --set data.skip_corrupt=true to drop the missing images and count them",
            ),
        )
    return exists


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run a block with one intra-op thread, as DataLoader workers do.

    One image's decoding and augmentation are tiny tensor ops: with several threads their
    synchronisation costs more than the work, and on a busy machine (threads spinning for
    cores other jobs hold) it made Omniglot's train transform 25x slower (0.9 ms -> 21 ms
    per image). Worker processes already run with one thread; this gives ``num_workers=0``
    (the main process) the same.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RetrievalDataset(Dataset):
    """One split of a retrieval dataset: ``(image_tensor, label)`` items, labels 0..C-1.

    Attributes: ``labels`` (int64 array), ``num_classes``, ``class_names`` (in label order),
    ``paths`` (file paths or None), ``transform``, ``name``/``split`` (for ``describe``),
    ``missing`` (paths dropped at load time because the file did not exist, with
    ``skip_corrupt=True``), and for a query/gallery test split (In-Shop, a CSV with
    ``is_query``/``is_gallery`` columns) ``is_query`` / ``is_gallery``: boolean arrays saying
    which items query and which are searched (an item may be both; None: every item is
    both, the DML protocol). Evaluation uses them (``nirdml.evaluation.evaluate``).

    Corrupt images: with ``skip_corrupt=False`` (default) a bad file raises
    CorruptImageError naming it. With ``skip_corrupt=True`` the item is replaced by the next
    good image of the same class (deterministic) and the file is marked in a shared-memory
    mask, so ``corrupt_count`` / ``corrupt_paths()`` read in the main process include what
    DataLoader workers found (each bad file is counted once).
    """

    def __init__(
        self,
        storage: ImageStorage,
        labels: np.ndarray | Sequence[int],
        class_names: Sequence[str],
        *,
        index: np.ndarray | None = None,
        transform: Transform | None = None,
        name: str = "dataset",
        split: str = "all",
        skip_corrupt: bool = False,
        missing: Sequence[str] = (),
        is_query: np.ndarray | Sequence[bool] | None = None,
        is_gallery: np.ndarray | Sequence[bool] | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        index = np.arange(len(storage), dtype=np.int64) if index is None else np.asarray(index)
        if len(index) != len(labels):
            raise InputError(f"index has {len(index)} entries but labels has {len(labels)}")
        self.storage = storage
        self.index = index.astype(np.int64, copy=False)
        self.labels = labels
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(
                f"labels must lie in 0..{self.num_classes - 1} (one per class name); "
                f"got {labels.min()}..{labels.max()}"
            )
        self.transform = transform
        self.name = name
        self.split = split
        self.skip_corrupt = skip_corrupt
        self.missing = list(missing)
        self.is_query, self.is_gallery = _roles(is_query, is_gallery, len(labels))
        # One byte per storage position, in shared memory so DataLoader workers' marks are
        # visible here (fork and spawn both pass shared tensors by handle).
        self._bad = (
            torch.zeros(len(storage), dtype=torch.uint8).share_memory_()
            if skip_corrupt and storage.can_fail
            else None
        )
        self._members: dict[int, np.ndarray] | None = None

    # -- basic protocol -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        label = int(self.labels[i])
        with one_thread():
            img = self._load(i)
            if self.transform is not None:
                img = self.transform(img)
        return img, label

    def _load(self, i: int) -> Any:
        pos = int(self.index[i])
        if self._bad is None:
            return self.storage.load(pos)
        if not self._bad[pos]:
            try:
                return self.storage.load(pos)
            except (CorruptImageError, MissingImageError):
                self._bad[pos] = 1
        return self._substitute(i)

    def _substitute(self, i: int) -> Any:
        """Next good image of the same class, in a fixed cyclic order (deterministic)."""
        members = self._class_members(int(self.labels[i]))
        start = int(np.searchsorted(members, i))
        for k in range(1, len(members) + 1):
            j = int(members[(start + k) % len(members)])
            pos = int(self.index[j])
            if self._bad[pos]:
                continue
            try:
                return self.storage.load(pos)
            except (CorruptImageError, MissingImageError):
                self._bad[pos] = 1
        cls = self.class_names[int(self.labels[i])]
        raise CorruptImageError(
            f"every image of class {cls!r} in {self.name}/{self.split} is unreadable "
            f"(e.g. {self.storage.path(int(self.index[i]))}); re-extract the dataset or remove "
            "the class (run nirdml.data.verify(dataset) to list the bad files)."
        )

    def _class_members(self, label: int) -> np.ndarray:
        if self._members is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._members = {c: order[bounds[c] : bounds[c + 1]] for c in range(self.num_classes)}
        return self._members[label]

    # -- information ----------------------------------------------------------------------
    @property
    def paths(self) -> list[str] | None:
        """File path of each item (None when images live in memory)."""
        return self.storage.paths_for(self.index)

    @property
    def corrupt_count(self) -> int:
        """How many distinct files of this split were found unreadable and replaced."""
        if self._bad is None:
            return 0
        return int(self._bad.numpy()[self.index].sum())

    def corrupt_paths(self) -> list[str]:
        """Paths of the files found unreadable so far (with ``skip_corrupt=True``)."""
        if self._bad is None:
            return []
        bad = self.index[self._bad.numpy()[self.index] > 0]
        return [str(self.storage.path(int(p))) for p in np.unique(bad)]

    def class_counts(self) -> np.ndarray:
        """Number of images of each class, in label order."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def describe(self) -> str:
        """One line: name, split, image and class counts, images per class."""
        counts = self.class_counts()
        per = (
            f"{counts.min()}-{counts.max()} (median {int(np.median(counts))}) images/class"
            if len(counts)
            else "no classes"
        )
        text = (
            f"{self.name}/{self.split}: {len(self):,} images, {self.num_classes:,} classes, {per}"
        )
        if self.is_query is not None and self.is_gallery is not None:
            text += (
                f" ({int(self.is_query.sum()):,} queries, {int(self.is_gallery.sum()):,} gallery)"
            )
        if self.missing:
            text += f", {len(self.missing)} missing file(s) skipped"
        if self.corrupt_count:
            text += f", {self.corrupt_count} corrupt file(s) replaced"
        return text

    def __repr__(self) -> str:
        return f"<RetrievalDataset {self.describe()}>"

    # -- derived views --------------------------------------------------------------------
    def with_transform(self, transform: Transform | None) -> RetrievalDataset:
        """Same items and labels (and shared storage), another transform."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def select(
        self,
        items: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        split: str,
    ) -> RetrievalDataset:
        """A view of some of this dataset's items with new labels (e.g. the validation carve)."""
        view = copy.copy(self)
        view.index = self.index[np.asarray(items, dtype=np.int64)]
        view.labels = np.asarray(labels, dtype=np.int64)
        view.class_names = [str(c) for c in class_names]
        view.num_classes = len(view.class_names)
        view.split = split
        view.missing = []
        view._members = None
        if self.is_query is not None and self.is_gallery is not None:
            view.is_query, view.is_gallery = _roles(
                self.is_query[items], self.is_gallery[items], len(view.labels)
            )
        return view


def _roles(
    is_query: np.ndarray | Sequence[bool] | None,
    is_gallery: np.ndarray | Sequence[bool] | None,
    n: int,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Checked ``(is_query, is_gallery)`` boolean arrays, or ``(None, None)`` when every item
    is both (self-retrieval)."""
    if is_query is None and is_gallery is None:
        return None, None
    q = np.ones(n, bool) if is_query is None else np.asarray(is_query)
    g = np.ones(n, bool) if is_gallery is None else np.asarray(is_gallery)
    for name, a in (("is_query", q), ("is_gallery", g)):
        if a.dtype != bool or a.shape != (n,):
            raise InputError(f"{name} must be a boolean array with one entry per item ({n})")
    if not (q | g).all():
        raise InputError(
            f"{int((~(q | g)).sum())} item(s) are neither query nor gallery; drop them or "
            "mark them as one of the two"
        )
    return q, g


@dataclass
class DatasetSplits:
    """The class-disjoint splits of one dataset (``val`` is carved from train, or None)."""

    train: RetrievalDataset
    test: RetrievalDataset
    val: RetrievalDataset | None = None

    def describe(self) -> str:
        parts = [self.train.describe(), self.test.describe()]
        if self.val is not None:
            parts.append(self.val.describe())
        return "\n".join(parts)


def make_split(
    name: str,
    split: str,
    storage: ImageStorage,
    class_ids: Sequence[Any] | np.ndarray,
    class_names_by_id: dict[Any, str],
    *,
    skip_corrupt: bool,
    missing: Sequence[str] = (),
    index: np.ndarray | None = None,
    is_query: np.ndarray | None = None,
    is_gallery: np.ndarray | None = None,
) -> RetrievalDataset:
    """Build a split from per-item official class ids: labels 0..C-1 in sorted id order
    (``is_query`` / ``is_gallery``: a query/gallery split, see :class:`RetrievalDataset`)."""
    ids = np.asarray(class_ids)
    uniq, labels = np.unique(ids, return_inverse=True)
    names = [class_names_by_id[k.item() if hasattr(k, "item") else k] for k in uniq]
    return RetrievalDataset(
        storage,
        labels.astype(np.int64),
        names,
        index=index,
        name=name,
        split=split,
        skip_corrupt=skip_corrupt,
        missing=missing,
        is_query=is_query,
        is_gallery=is_gallery,
    )


def split_by_class_id(
    name: str,
    paths: Sequence[str],
    ids: Sequence[int],
    classes: dict[int, str],
    train_ids: range,
    *,
    source: str,
    skip_corrupt: bool,
) -> DatasetSplits:
    """Train = images whose official class id is in ``train_ids``, test = all others.

    Labels follow the official class ids; files are only checked to exist (not decoded).
    """
    if len(paths) == 0:
        raise MissingImageError(f"{name}: {source} lists no image; re-extract the dataset")
    exists = check_files_exist(paths, source, skip_missing=skip_corrupt)
    arr_paths = np.asarray(paths)
    arr_ids = np.asarray(ids, dtype=np.int64)
    in_train = (arr_ids >= train_ids.start) & (arr_ids < train_ids.stop)
    out = []
    for split, mask in (("train", in_train), ("test", ~in_train)):
        if not (mask & exists).any():
            wanted = (
                f"{train_ids.start}-{train_ids.stop - 1}"
                if split == "train"
                else f"outside {train_ids.start}-{train_ids.stop - 1}"
            )
            raise MissingImageError(
                f"{name}: {source} has no image of the {split} classes (official class ids "
                f"{wanted}); the dataset is incomplete: re-extract or re-download it"
            )
        out.append(
            make_split(
                name,
                split,
                FileStorage(arr_paths[mask & exists].tolist()),
                arr_ids[mask & exists],
                classes,
                skip_corrupt=skip_corrupt,
                missing=arr_paths[mask & ~exists].tolist(),
            )
        )
    return DatasetSplits(out[0], out[1])
