"""Shared test fixtures: thread limits and the optional shared real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The read-only real-data folder (``../shared/data`` beside the checkout), if present.

    ``NIRDML_SHARED_DATA`` overrides the location.
    """
    env = os.environ.get("NIRDML_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared real-data folder ../shared/data is absent (set NIRDML_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def omniglot_dir(shared_data: Path) -> Path:
    d = shared_data / "omniglot"
    if not (d / "images_background.npz").is_file():
        pytest.skip(f"Omniglot npz files not found in {d}")
    return d


@pytest.fixture(scope="session")
def omniglot_small(omniglot_dir: Path, tmp_path_factory) -> Path:
    """Omniglot with fewer training characters (the first 300 of the 964 background ones, all
    20 drawings each; the whole evaluation set) in the npz layout: real data for end-to-end
    tests at a third of the cost of an epoch (50 batches of 120)."""
    import numpy as np

    out = tmp_path_factory.mktemp("omniglot_small")
    for name, classes in (("images_background", 300), ("images_evaluation", 659)):
        with np.load(omniglot_dir / f"{name}.npz") as z:
            np.savez(
                out / f"{name}.npz", images=z["images"][:classes], labels=z["labels"][:classes]
            )
    return out
