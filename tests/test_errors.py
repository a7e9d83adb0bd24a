"""The error hierarchy: every error nirdml raises on purpose is a NirdmlError (and the builtin
type callers catch), and the command line turns each into one line and exit status 2."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import nirdml
from conftest import REPO_ROOT
from nirdml.errors import NirdmlError

SRC = REPO_ROOT / "src" / "nirdml"

ALLOWED_BUILTIN_RAISES = {
    ("__main__.py", "SystemExit"): "the exit status of `python -m nirdml`",
    ("cli.py", "SystemExit"): "the exit status of `python -m nirdml.cli`",
    ("data/base.py", "NotImplementedError"): "abstract methods of the ImageStorage interface",
    ("export.py", "ValueError"): "a scripted TorchScript forward raises builtin exceptions only",
    ("runtime.py", "AttributeError"): "PEP 562 __getattr__ must raise AttributeError",
}
"""(file, builtin exception) -> why that raise is not a NirdmlError."""


def _builtin_exception(node: ast.expr | None) -> str | None:
    """The builtin exception class a ``raise`` names (``raise X`` or ``raise X(...)``)."""
    target = node.func if isinstance(node, ast.Call) else node
    name = target.id if isinstance(target, ast.Name) else None
    value = getattr(builtins, name, None) if name else None
    if isinstance(value, type) and issubclass(value, BaseException):
        return name
    return None


def test_no_deliberate_error_is_a_bare_builtin_exception():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise):
                name = _builtin_exception(node.exc)
                if name and (rel, name) not in ALLOWED_BUILTIN_RAISES:
                    found.append(f"{rel}:{node.lineno}: raise {name}")
    assert not found, (
        "raise a nirdml.errors class (InputError, InputTypeError, MissingFileError, "
        "ConfigError, ...) instead of a builtin exception:\n" + "\n".join(found)
    )


def _modules() -> list[str]:
    names = ["nirdml"]
    for info in pkgutil.walk_packages(nirdml.__path__, "nirdml."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def test_every_error_class_is_a_nirdml_error():
    classes = {}
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Exception)
                and not issubclass(obj, Warning)
                and obj.__module__.startswith("nirdml")
            ):
                classes[f"{obj.__module__}.{obj.__qualname__}"] = obj
    assert len(classes) > 15
    stray = sorted(k for k, cls in classes.items() if not issubclass(cls, NirdmlError))
    assert not stray, f"not NirdmlError subclasses: {stray}"


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("nirdml.errors.ConfigError", ValueError),
        ("nirdml.errors.InputError", ValueError),
        ("nirdml.errors.InputTypeError", TypeError),
        ("nirdml.errors.MissingFileError", FileNotFoundError),
        ("nirdml.errors.OutputExistsError", FileExistsError),
        ("nirdml.errors.CheckpointError", ValueError),
        ("nirdml.errors.MissingDependencyError", ImportError),
        ("nirdml.errors.SetupError", RuntimeError),
        ("nirdml.data.errors.DatasetLayoutError", FileNotFoundError),
        ("nirdml.data.errors.MissingImageError", FileNotFoundError),
        ("nirdml.data.errors.CorruptImageError", ValueError),
        ("nirdml.data.errors.SamplerConfigError", ValueError),
        ("nirdml.data.download.ChecksumError", ValueError),
    ],
)
def test_errors_are_also_the_builtin_type_callers_catch(name, builtin):
    module, cls = name.rsplit(".", 1)
    error = getattr(importlib.import_module(module), cls)
    assert issubclass(error, NirdmlError) and issubclass(error, builtin)


def test_cli_turns_a_library_error_into_one_line_and_exit_2(tmp_path, capsys):
    from nirdml.cli import main

    missing = tmp_path / "nowhere"
    for argv in (
        ["evaluate", str(missing)],
        ["export", str(missing), "--format", "onnx", "-o", str(tmp_path / "m.onnx")],
        ["embed", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "e.npz")],
        ["compare", str(missing)],
        ["train", "--resume", str(tmp_path)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith(f"nirdml {argv[0]}: error: "), err
    assert not Path(tmp_path / "m.onnx").exists() and not (tmp_path / "e.npz").exists()
