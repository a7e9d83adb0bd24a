"""Small helpers shared by the dataset readers: image listing, annotation tables, root checks."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nirdml.data.errors import DatasetLayoutError, describe_dir

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_ID_PREFIX = re.compile(r"^(\d+)[._ -](.+)$")


def require_root(root: str | Path | None, dataset: str, how_to_get: str) -> Path:
    """The dataset root as a Path; a clear error when it is None or missing."""
    if root is None:
        raise DatasetLayoutError(f"{dataset} needs a root folder: pass root=... ({how_to_get})")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetLayoutError(f"{dataset} root {path} does not exist. {how_to_get}")
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, sorted, hidden files ignored)."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                out.append(Path(e.path))
    return sorted(out)


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and not e.name.startswith("."))


def id_prefixed(name: str) -> tuple[int, str] | None:
    """``"001.Black_footed_Albatross"`` -> ``(1, "Black_footed_Albatross")``; else None."""
    m = _ID_PREFIX.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def read_table(path: Path, ncols: int, *, header: bool = False) -> list[list[str]]:
    """Whitespace-separated annotation rows with at least ``ncols`` fields (the last one may
    contain spaces); malformed lines raise an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if header and lineno == 1:
                continue
            line = line.strip()
            if not line:
                continue
            fields = line.split(maxsplit=ncols - 1)
            if len(fields) < ncols:
                raise DatasetLayoutError(
                    f"{path}:{lineno}: expected {ncols} fields, found {line!r}; the annotation "
                    "file is damaged: re-extract the dataset archive"
                )
            rows.append(fields)
    return rows


def layout_error(dataset: str, root: Path, expected: str, fix: str) -> DatasetLayoutError:
    """'expected X, found Y, fix Z' for a root whose layout is not recognised."""
    return DatasetLayoutError(
        f"{dataset}: {root} does not have a known layout. Expected {expected}; found: "
        f"{describe_dir(root)}. {fix}"
    )
