"""Error types of the data package (all :class:`~nirdml.errors.NirdmlError`): each message
names the problem and the fix."""

from __future__ import annotations

from nirdml.errors import InputError, MissingFileError


class DatasetLayoutError(MissingFileError):
    """A dataset root is missing or does not have the expected layout."""


class MissingImageError(MissingFileError):
    """An annotation file references image files that do not exist."""


class CorruptImageError(InputError):
    """An image file exists but cannot be decoded (corrupt or truncated)."""


class SamplerConfigError(InputError):
    """A batch sampler cannot build class-balanced batches with the given settings."""


def list_some(items: list[str] | tuple[str, ...], limit: int = 5) -> str:
    """Short human-readable listing of a few items, e.g. for 'found: a, b, c, ... (12 in all)'."""
    items = list(items)
    if not items:
        return "nothing"
    shown = ", ".join(repr(x) for x in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in all)"
    return shown


def describe_dir(path: object, limit: int = 8) -> str:
    """What a folder contains (a few sorted names), for 'what was found' in layout errors."""
    from pathlib import Path

    p = Path(str(path))
    if not p.exists():
        return f"{p} does not exist"
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in p.iterdir())
    return f"{p} contains {list_some(names, limit)}"
