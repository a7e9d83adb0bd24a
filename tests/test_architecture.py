"""The contracts of docs/architecture.md that code review would otherwise have to check: the
layers import downwards only, the config fields reach their functions by name, the lazy
name tables agree with ``__all__``, and each table of choices is the one its code reads."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect

import pytest

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src" / "nirdml"

LAYERS = (
    ("errors", "runtime"),
    ("flow", "data", "models", "evaluation"),
    ("losses",),
    ("training",),
    ("analysis", "export"),
    ("cli", "__main__"),
)
"""Bottom first; a module may import its own layer and the ones below it."""
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str | None:
    """The top-level part of nirdml a dotted module name belongs to (None: the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        mine = rel.parts[0]
        if mine == "__init__":  # the root package names everything lazily
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                other = _part(target) if target.startswith("nirdml") else None
                if other is not None and LEVEL[other] > LEVEL[mine]:
                    upward.append(f"{rel}:{node.lineno} {mine} imports {target}")
    assert not upward, "\n".join(upward)


# config section -> (function its fields feed through options_for, fields that are not its
# parameters on purpose: the loop's own, or passed under another name)
OPTIONS_FOR = {
    "model": (
        "nirdml.models:build_model",
        {"frozen", "cut", "head", "head_hidden", "head_norm", "head_dropout"}
        | {"channels_last", "sync_bn"},
    ),
    "data": (
        "nirdml.data:load_dataset",
        {"transform", "batch_size", "samples_per_class", "sampler", "num_workers", "cache"}
        | {"features", "feature_views", "feature_dtype", "check_images", "options"},
    ),
    "loss.nir": ("nirdml.losses:NIRLoss", {"enabled", "alarm", "alarm_threshold", "flow"}),
    "loss.nir.flow": ("nirdml.flow:ConditionalFlow", set()),
}


@pytest.mark.parametrize("section", list(OPTIONS_FOR))
def test_config_fields_are_parameters_of_the_function_they_feed(section):
    """A field meant for the function must be one of its parameters by name (else
    options_for would drop it silently); the others are listed as the loop's."""
    from nirdml.training.config import RunConfig

    target, loop_fields = OPTIONS_FOR[section]
    module, name = target.split(":")
    params = set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    node = RunConfig()
    for part in section.split("."):
        node = getattr(node, part)
    fields = {f.name for f in dataclasses.fields(node)}
    assert loop_fields <= fields, f"{section}: listed fields that do not exist"
    missing = fields - loop_fields - params
    assert not missing, f"{section} fields that are not parameters of {target}: {missing}"


LAZY_PACKAGES = ("nirdml", "nirdml.data", "nirdml.models", "nirdml.losses", "nirdml.flow")
LAZY_PACKAGES += ("nirdml.evaluation",)


@pytest.mark.parametrize("package", [*LAZY_PACKAGES, "nirdml.analysis"])
def test_every_public_name_resolves_and_lazy_tables_agree_with_all(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    assert len(set(module.__all__)) == len(module.__all__), f"{package}: __all__ repeats"
    lazy = getattr(module, "_LAZY", None)
    if lazy is not None:
        direct = {n for n in module.__all__ if n not in lazy}
        assert direct <= {"__version__"}, f"{package}: in __all__, not in _LAZY: {direct}"
        assert set(lazy) <= set(module.__all__), f"{package}: lazy names missing from __all__"


def test_module_all_lists_resolve():
    import pkgutil

    import nirdml

    for info in pkgutil.walk_packages(nirdml.__path__, "nirdml."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{info.name}.__all__ names {name}, not defined"


def test_choice_tables_are_the_ones_the_code_reads():
    from nirdml.data.registry import TRANSFORMS, VAL_CARVES
    from nirdml.data.splits import VAL_CARVES as split_carves
    from nirdml.data.transforms import PRESETS
    from nirdml.flow import model as flow_model
    from nirdml.flow.registry import CONDITION_BLOCKS, CONDITION_MODES
    from nirdml.losses.nir import BOUNDED, OBJECTIVE_TERMS, OBJECTIVES
    from nirdml.losses.registry import BOUNDED_OBJECTIVES, NIR_OBJECTIVES
    from nirdml.models import head, pooling
    from nirdml.models.registry import HEAD_NORMS, HEADS, POOLINGS

    assert PRESETS == tuple(TRANSFORMS) and split_carves is VAL_CARVES
    assert (flow_model.CONDITION_MODES, flow_model.CONDITION_BLOCKS) == (
        CONDITION_MODES,
        CONDITION_BLOCKS,
    )
    assert tuple(OBJECTIVE_TERMS) == NIR_OBJECTIVES == OBJECTIVES
    assert tuple(BOUNDED) == BOUNDED_OBJECTIVES
    assert tuple(pooling.POOLING_CLASSES) == POOLINGS
    assert (head.HEADS, head.HEAD_NORMS) == (HEADS, HEAD_NORMS)
