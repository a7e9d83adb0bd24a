"""Config loading: strict keys, typed values, overrides, presets in sync with the generator."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import yaml

from conftest import REPO_ROOT
from nirdml.training.config import (
    ConfigError,
    RunConfig,
    list_presets,
    load_config,
    parse_override,
)


def test_default_is_the_digits_preset():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "digits"


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*Did you mean 'lr'"):
        load_config("digits", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*'model'"):
        load_config({"modle": {"arch": "resnet50"}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("epochs=0", "epochs must be >= 1"),
        ("data.batch_size=91", r"divisible by data.samples_per_class"),
        ("data.name=imagenet", "not a known dataset"),
        ("model.pooling=mean", "model.pooling must be"),
        ("loss.name=arcface", "loss.name 'arcface' is unknown"),
        ("loss.nir.objective=likelihood", "objective must be exp_nll or nll"),
        ("optim.milestones=[50, 10]", "milestones must be increasing"),
        ("model.pretrained=maybe", "model.pretrained must be true, false"),
        ("amp=fp8", "amp must be none, bf16 or fp16"),
        ("data.batch_size=1.5", "expected an integer"),
    ],
)
def test_impossible_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["eval.metrics=[recall@1, mapr]"],
            r"unknown metric in eval.metrics 'mapr'. Did you "
            r"mean 'map@r'\? Valid names: recall@K",
        ),
        (
            ["eval.select_metric=recal@1"],
            r"unknown eval.select_metric 'recal@1'. Did you mean "
            r"'recall@1'",
        ),
        (
            ["eval.metrics=[map@r, nmi]"],
            r"eval.select_metric 'recall@1' is not among the "
            r"computed metrics \(map@r, nmi\)",
        ),
        (["eval.select_metric=mrr"], r"'mrr' is not among the computed metrics \(recall@1, "),
        (["eval.no_relevant=drop"], "eval.no_relevant must be skip or zero"),
        (["eval.average=class"], "eval.average must be queries or classes"),
    ],
)
def test_eval_metric_names_are_checked_against_the_metric_table(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", overrides)


def test_eval_metric_names_are_normalised_and_new_names_accepted():
    cfg = load_config(
        "digits",
        [
            "eval.metrics=[' Recall@1', mrr, precision@5, map@r@100, map@10_hits]",
            "eval.select_metric=MRR",
            "eval.no_relevant=zero",
            "eval.average=classes",
        ],
    )
    assert cfg.eval.metrics == ["recall@1", "mrr", "precision@5", "map@r@100", "map@10_hits"]
    assert cfg.eval.select_metric == "mrr"
    assert (cfg.eval.no_relevant, cfg.eval.average) == ("zero", "classes")


def test_overrides_parse_yaml_values_and_nest():
    assert parse_override("optim.lr=0.5") == {"optim": {"lr": 0.5}}
    assert parse_override("optim.milestones=[140, 230]") == {"optim": {"milestones": [140, 230]}}
    assert parse_override("loss.nir.enabled=true") == {"loss": {"nir": {"enabled": True}}}
    cfg = load_config("digits", ["optim.lr=2e-5", "loss.nir.enabled=true", "seed=3"])
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.loss.nir.enabled is True
    assert cfg.seed == 3
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("cub200-r128-avg-proxyanchor-nir", ["data.root=/data/cub"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert load_config(cfg.to_dict()) == cfg


def test_missing_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")
    with pytest.raises(ConfigError, match="nirdml presets"):
        load_config("cub200-r128-avg-proxyanchr-nir")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_presets", REPO_ROOT / "tools" / "make_presets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_presets"] = module
    spec.loader.exec_module(module)
    return module


def test_paper_presets_match_the_generator_and_the_recipe():
    gen = _generator()
    presets = gen.all_paper_presets()
    assert len(presets) == 3 * 2 * 2 * 3 * 2
    shipped = set(list_presets())
    for name, config in presets.items():
        assert name in shipped, f"{name} missing: run python tools/make_presets.py"
        text = (gen.PRESET_DIR / f"{name}.yaml").read_text()
        assert yaml.safe_load(text) == config, f"{name} is stale: run tools/make_presets.py"

    cub = load_config("cub200-r128-avg-proxyanchor-nir")
    assert (cub.epochs, cub.data.batch_size, cub.data.samples_per_class) == (100, 90, 2)
    assert cub.loss.nir.enabled and cub.loss.nir.proxy_weight == pytest.approx(0.0075)
    assert (cub.optim.proxy_lr_mult, cub.optim.flow_lr_mult, cub.optim.warmup_epochs) == (
        4000.0,
        50.0,
        1,
    )
    assert cub.optim.lr == pytest.approx(1e-5) and cub.optim.weight_decay == pytest.approx(4e-4)
    cars = load_config("cars196-r512-avgmax-proxyanchor-nir")
    assert cars.loss.nir.proxy_weight == pytest.approx(0.01) and cars.model.pooling == "avg+max"
    sop = load_config("sop-r128-avg-proxyanchor-nir")
    assert (sop.epochs, sop.optim.milestones, sop.optim.gamma) == (300, [140, 230], 0.2)
    assert (sop.optim.flow_lr_mult, sop.optim.warmup_epochs) == (1.0, 5)
    assert sop.loss.nir.proxy_weight == pytest.approx(0.3)
    base = load_config("cub200-r128-avg-proxyanchor-baseline")
    assert not base.loss.nir.enabled
    assert (base.optim.proxy_lr_mult, base.optim.warmup_epochs) == (2000.0, 0)


def test_inshop_presets_take_sops_recipe_and_the_query_gallery_metrics():
    gen = _generator()
    presets = gen.all_inshop_presets()
    assert sorted(presets) == [
        f"inshop-r{d}-avg-proxyanchor-{v}" for d in (128, 512) for v in ("baseline", "nir")
    ]
    for name, config in presets.items():
        text = (gen.PRESET_DIR / f"{name}.yaml").read_text()
        assert yaml.safe_load(text) == config, f"{name} is stale: run tools/make_presets.py"
    inshop = load_config("inshop-r512-avg-proxyanchor-nir", ["data.root=/data/inshop"])
    sop = load_config("sop-r512-avg-proxyanchor-nir")
    assert inshop.data.name == "inshop" and inshop.model.arch == "resnet50"
    assert (inshop.optim, inshop.loss, inshop.epochs) == (sop.optim, sop.loss, sop.epochs)
    assert inshop.data.batch_size == 90 and inshop.eval.select_metric == "recall@1"
    from nirdml.training.build import eval_metrics

    assert eval_metrics(inshop)[:5] == [f"recall@{k}" for k in (1, 10, 20, 30, 40)]


def test_frozen_presets_and_image_size_on_every_rgb_preset():
    gen = _generator()
    for name, config in gen.all_cached_presets().items():
        text = (gen.PRESET_DIR / f"{name}.yaml").read_text()
        assert yaml.safe_load(text) == config, f"{name} is stale: run tools/make_presets.py"
    for name in list_presets():
        cfg = load_config(name)
        rgb = (cfg.data.transform or "resnet") == "resnet" and cfg.data.name not in (
            "omniglot",
            "digits",
        )
        assert (cfg.data.image_size is not None) == rgb, name
    frozen = load_config("cars98-frozen-proxyanchor-nir")
    assert frozen.model.frozen and frozen.data.image_size == 224 and frozen.data.val_classes == 9
    assert frozen.optim.warmup_epochs == 0 and frozen.loss.nir.enabled
    with pytest.raises(ConfigError, match="image_size.*'omniglot' transform has a fixed size"):
        load_config("omniglot", ["data.image_size=64"])
    with pytest.raises(ConfigError, match="data.image_size must be >= 16"):
        load_config("cub200-r128-avg-proxyanchor-nir", ["data.image_size=8"])


def test_config_knows_every_nir_objective() -> None:
    from nirdml.losses.nir import OBJECTIVES
    from nirdml.losses.registry import NIR_OBJECTIVES

    assert NIR_OBJECTIVES == OBJECTIVES


def test_loss_table_matches_the_constructors_and_names_a_bad_option() -> None:
    import inspect

    from nirdml.losses.registry import LOSSES

    for name, entry in LOSSES.items():
        signature = inspect.signature(entry.load())
        options = {
            p.name: p.default
            for p in list(signature.parameters.values())[2:]
            if p.kind is p.POSITIONAL_OR_KEYWORD
        }
        assert options == dict(entry.options), name
    with pytest.raises(ConfigError, match="Did you mean 'alpha'"):
        load_config("digits", ["loss.params.alpah=16"])


def test_dataset_aliases_are_accepted_by_config_and_load_dataset_alike() -> None:
    from nirdml.data import load_dataset

    cfg = load_config("cub200-r128-avg-proxyanchor-nir", ["data.name=cub", "data.root=/x"])
    assert cfg.data.name == "cub200" and cfg.name == "cub200-r128-avg-proxyanchor-nir"
    with pytest.raises(ConfigError, match="Did you mean 'cub'"):
        load_config("digits", ["data.name=cubb"])
    with pytest.raises(ValueError, match="Did you mean 'cub'"):
        load_dataset("cubb")


def test_unknown_arch_is_a_config_error_with_the_closest_name() -> None:
    with pytest.raises(ConfigError, match="model.arch: Unknown arch 'resnet5'.*'resnet50'"):
        load_config("cub200-r128-avg-proxyanchor-nir", ["model.arch=resnet5"])


def test_a_preset_moved_to_other_data_keeps_its_recipe_not_its_dataset_choices():
    cfg = load_config(
        "cars98-partial-proxyanchor-baseline", ["data.name=folder", "data.root=/data/my_photos"]
    )
    assert cfg.name == "my_photos-partial-proxyanchor-baseline"
    assert cfg.data.val_classes == "auto"  # 9 was chosen for cars98's 49 training classes
    assert cfg.data.features == "features/my_photos-efficientnet_lite0-224px-stage7"
    assert (cfg.model.cut, cfg.data.val_carve) == ("stage7", "last")  # the recipe stays
    kept = load_config(
        "cars98-partial-proxyanchor-baseline",
        ["data.name=folder", "data.root=/data/my_photos", "data.val_classes=3"],
    )
    assert kept.data.val_classes == 3
    own = load_config("cars98-partial-proxyanchor-baseline")
    assert own.data.val_classes == 9
    assert own.data.features == "features/cars98-efficientnet_lite0-224px-stage7"


# ----------------------------------------------------------------------- every field, bad

FREE_TEXT = {
    "name",
    "description",
    "data.root",
    "data.cache",
    "data.features",
    "model.weights",
    "log.wandb_project",
}
"""String fields without a table of choices (any text is valid; only a wrong type is bad)."""
WRONG_TYPE = {str: "[1, 2]", int: "abc", float: "abc", bool: "maybe", list: "abc", dict: "3"}


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, annotation) of every field of a config dataclass, recursively."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(f"{key}.nonsense_key", None)]  # an unknown key in every section
            out += _leaves(tp, f"{key}.")
        else:
            out.append((key, tp))
    return out


def _bad_values(key: str, tp: object) -> list[str]:
    """Bad ``--set`` values for a field: the wrong type, out of range, an unknown choice,
    an unknown key (mappings)."""
    import types
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    kinds = args if origin in (typing.Union, types.UnionType) else [tp]
    kinds = [typing.get_origin(k) or k for k in kinds]
    if str in kinds:
        values = ["[1, 2]"] if key in FREE_TEXT else ["[1, 2]", "nonsense_value"]
    else:
        values = [WRONG_TYPE[kinds[0]]]
    if int in kinds or float in kinds:
        values.append("-1")
    if list in kinds:
        (item,) = next(typing.get_args(a) for a in [tp, *args] if typing.get_origin(a) is list)
        values.append("[-1]" if item is int else "[nonsense_value]")
    if dict in kinds:
        values.append("{nonsense_key: 1}")
    return values


def test_every_field_with_a_bad_value_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    """Each bad value through the command line: exit 2, one line on stderr, no traceback,
    no output folder (validation only: nothing may reach training)."""
    from nirdml.cli import main
    from nirdml.training import trainer

    def must_not_train(*args, **kwargs):
        raise AssertionError("a bad value passed validation and reached training")

    monkeypatch.setattr(trainer, "train", must_not_train)
    out = tmp_path / "run"
    cases = [
        (key, value)
        for key, tp in _leaves(RunConfig)
        for value in (["1"] if tp is None else _bad_values(key, tp))
    ]
    covered = {k for k, _ in cases}
    assert {k for k, _ in _leaves(RunConfig)} <= covered and len(cases) > 140
    for key, value in cases:
        rc = main(["train", "digits", "--set", f"{key}={value}", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, f"{key}={value} was accepted"
        assert err.count("\n") == 1 and "Traceback" not in err, f"{key}={value}: {err}"
        assert not out.exists(), f"{key}={value} wrote {out}"


def test_data_options_are_checked_against_the_dataset_table():
    with pytest.raises(ConfigError, match=r"data.options: digits does not take option"):
        load_config("digits", ["data.options.fo=1"])
    with pytest.raises(ConfigError, match=r"only apply with download=True"):
        load_config("omniglot", ["data.options.urls={a: b}"])
    cfg = load_config("omniglot", ["data.options.source=npz"])
    assert cfg.data.options == {"source": "npz"}


def test_loss_params_are_checked_for_type_and_choice():
    with pytest.raises(ConfigError, match="loss.params.alpha of proxy_anchor must be a number"):
        load_config("digits", ["loss.params.alpha=abc"])
    with pytest.raises(ConfigError, match="positive_mean of proxy_anchor must be one of"):
        load_config("digits", ["loss.params.positive_mean=mean"])
    assert load_config("digits", ["loss.params.alpha=16"]).loss.params["alpha"] == 16
