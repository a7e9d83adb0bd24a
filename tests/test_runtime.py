"""The bottom runtime module: one device rule set, one error hierarchy, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import nirdml
from nirdml.errors import DeviceUnavailableError, NirdmlError, NonFiniteLossError
from nirdml.runtime import atomic_write_json, atomic_write_text, no_autocast, resolve_device


def test_non_finite_loss_error_is_caught_by_both_former_bases() -> None:
    for base in (FloatingPointError, RuntimeError, NirdmlError):
        with pytest.raises(base):
            raise NonFiniteLossError("nan")
    assert nirdml.NonFiniteLossError is NonFiniteLossError


def test_resolve_device_rules() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto == resolve_device(None)
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available") as info:
            resolve_device("cuda")
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_no_autocast_turns_cpu_autocast_off() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with no_autocast(torch.device("cpu")):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_atomic_writes(tmp_path) -> None:
    atomic_write_json(tmp_path / "a" / "x.json", {"b": 1, "a": [2]})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"b": 1, "a": [2]}
    atomic_write_text(tmp_path / "t.txt", "hé")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "hé"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_runtime_and_version_do_not_import_torch() -> None:
    code = "import sys, nirdml.runtime, nirdml; print(nirdml.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [nirdml.__version__, "False"]
