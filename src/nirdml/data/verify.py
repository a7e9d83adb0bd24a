"""Scan a split for unreadable images before training (with a progress bar)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from nirdml.data.base import RetrievalDataset
from nirdml.data.errors import CorruptImageError, MissingImageError
from nirdml.runtime import usable_workers


@dataclass(frozen=True)
class BadImage:
    """One unreadable item: its index in the split, file path and the decoder's message."""

    index: int
    path: str | None
    error: str


@dataclass
class VerifyReport:
    """Result of ``verify``: how many items were decoded and which failed."""

    checked: int
    bad: list[BadImage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def __str__(self) -> str:
        if self.ok:
            return f"all {self.checked:,} images decode"
        lines = [f"{len(self.bad)} of {self.checked:,} images are unreadable:"]
        lines += [f"  {b.path}: {b.error}" for b in self.bad]
        return "\n".join(lines)


def _as_list(batch: list) -> list:
    return batch


class _Probe(Dataset):
    """Decodes item i of a split (no transform); returns (i, error message or "")."""

    def __init__(self, ds: RetrievalDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, str]:
        try:
            self.ds.storage.load(int(self.ds.index[i]))
        except (CorruptImageError, MissingImageError) as e:
            return i, getattr(e, "reason", str(e))
        return i, ""


def verify(
    dataset: RetrievalDataset, *, num_workers: int = 0, progress: bool = True
) -> VerifyReport:
    """Decode every image of ``dataset`` (all of it, so truncation is caught) and list the
    bad ones. With ``skip_corrupt=True`` datasets, the bad files are also marked, so
    training replaces them without trying to decode them again."""
    loader = DataLoader(
        _Probe(dataset),
        batch_size=64,
        num_workers=usable_workers(num_workers),
        collate_fn=_as_list,
    )
    bad: list[BadImage] = []
    with tqdm(
        total=len(dataset),
        desc=f"verify {dataset.name}/{dataset.split}",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for batch in loader:
            for i, err in batch:
                if err:
                    pos = int(dataset.index[i])
                    bad.append(BadImage(int(i), dataset.storage.path(pos), err))
                    if dataset._bad is not None:
                        dataset._bad[pos] = 1
            bar.update(len(batch))
    return VerifyReport(len(dataset), bad)


def header_error(path: str) -> str:
    """Why the image file at ``path`` is unreadable ("" if it looks fine), cheaply.

    Opens the file and parses its header and structure (``PIL.Image.verify``: chunk CRCs
    for PNG, markers up to the scan for JPEG) without decoding pixels. A JPEG whose last
    4 KiB hold no end-of-image marker (the sign of a truncated download) is decoded in
    full to confirm, so files with trailing metadata are not flagged wrongly.
    """
    from PIL import Image

    from nirdml.data.base import open_image

    try:
        with open(path, "rb") as f:
            with Image.open(f) as img:
                fmt = img.format
                img.verify()
            suspect = False
            if fmt == "JPEG":
                size = f.seek(0, 2)
                f.seek(max(0, size - 4096))
                suspect = b"\xff\xd9" not in f.read()
    except FileNotFoundError:
        return "file does not exist"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return f"{type(e).__name__}: {e}"
    if suspect:
        try:
            open_image(path)
        except (CorruptImageError, MissingImageError) as e:
            return getattr(e, "reason", str(e))
    return ""


def check_headers(
    datasets: dict[str, RetrievalDataset | None], *, progress: bool = False
) -> dict[str, list[BadImage]]:
    """:func:`header_error` for every file of the given splits (each file once).

    In-memory splits are skipped. With ``skip_corrupt=True`` datasets the bad files are
    marked, so training replaces them without trying to decode them. Returns the bad files
    per split name.
    """
    todo = [(n, d) for n, d in datasets.items() if d is not None and d.storage.can_fail]
    seen: dict[tuple[int, int], str] = {}
    bad: dict[str, list[BadImage]] = {n: [] for n, _ in todo}
    with tqdm(
        total=sum(len(d) for _, d in todo),
        desc="check images",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    ) as bar:
        for name, ds in todo:
            for i, pos in enumerate(ds.index.tolist()):
                key = (id(ds.storage), pos)
                if key not in seen:
                    seen[key] = header_error(ds.storage.path(pos))
                if seen[key]:
                    bad[name].append(BadImage(i, ds.storage.path(pos), seen[key]))
                    if ds._bad is not None:
                        ds._bad[pos] = 1
                bar.update(1)
    return bad
