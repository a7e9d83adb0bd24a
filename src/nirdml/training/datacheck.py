"""The image check at the start of a run: every file's header, before anything is written."""

from __future__ import annotations

import sys
import time
from typing import Any

from nirdml.training.config import RunConfig


def check_images(
    cfg: RunConfig, splits: Any, *, progress: bool = False, echo: bool = True
) -> dict[str, Any]:
    """Check the header of every image file of ``splits`` (``data.check_images``).

    A bad file stops the run with an error that names it and the fixes, unless
    ``data.skip_corrupt`` is set: then the bad files are replaced by other images of their
    class, and the count is printed (``echo``: rank 0 only). Returns what was checked
    (for ``summary.json``).
    """
    from nirdml.data.errors import CorruptImageError
    from nirdml.data.verify import check_headers

    named = {"train": splits.train, "test": splits.test, "val": splits.val}
    report: dict[str, Any] = {"checked": 0, "seconds": 0.0}
    if not cfg.data.check_images:
        return {"checked": 0, "skipped": "data.check_images=false"}
    start = time.perf_counter()
    bad = check_headers(named, progress=progress)
    report["checked"] = sum(len(d) for n, d in named.items() if n in bad)
    report["seconds"] = round(time.perf_counter() - start, 3)
    found = [b for items in bad.values() for b in items]
    if not found:
        return report
    shown = "; ".join(f"{b.path} ({b.error})" for b in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    if not cfg.data.skip_corrupt:
        raise CorruptImageError(
            f"{len(found)} of {report['checked']:,} image files cannot be read: {shown}{more}. "
            "Replace or re-extract them, or pass --set data.skip_corrupt=true to replace each "
            "by another image of its class (counted in summary.json); --set "
            "data.check_images=false skips this check"
        )
    counts = ", ".join(f"{n} {len(items)}" for n, items in bad.items() if items)
    if not echo:
        return report
    print(
        f"data: {len(found)} unreadable image file(s) will be replaced by another image of "
        f"their class (data.skip_corrupt=true): {counts}; e.g. {shown}{more}",
        file=sys.stderr,
        flush=True,
    )
    return report


def corrupt_summary(splits: Any) -> dict[str, Any]:
    """Files replaced (unreadable) and skipped (missing) per split, for ``summary.json``."""
    named = {"train": splits.train, "test": splits.test, "val": splits.val}
    named = {n: d for n, d in named.items() if d is not None}
    paths = sorted({p for d in named.values() for p in d.corrupt_paths()})
    return {
        "replaced": sum(d.corrupt_count for d in named.values()),
        "replaced_per_split": {n: d.corrupt_count for n, d in named.items()},
        "missing_skipped": sum(len(d.missing) for d in named.values()),
        "replaced_paths": paths[:100],
    }
