"""Run configuration: typed dataclasses, strict YAML loading, ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`. It is loaded from a YAML preset or
file with ``yaml.safe_load``, every key is checked (an unknown key is an error that
suggests the closest valid one), every value is type-checked and range-checked, and the
resolved config is written next to the run's outputs so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nirdml.data.registry import (
    DATASETS,
    SAMPLERS,
    TRANSFORMS,
    VAL_CARVES,
    dataset_choices,
    dataset_name,
    default_transform_preset,
    image_size_problem,
    option_problem,
)
from nirdml.errors import ConfigError, MissingFileError
from nirdml.evaluation import registry as metric_table
from nirdml.flow.registry import CONDITION_BLOCKS, CONDITION_MODES
from nirdml.losses.registry import (
    BOUNDED_OBJECTIVES,
    LOSS_NAMES,
    NIR_OBJECTIVES,
    SIGMA_MODES,
    params_problem,
)
from nirdml.models.registry import HEAD_NORMS, HEADS, POOLINGS, backbone, check_cut
from nirdml.runtime import DEVICE_TYPES, require_extra

OPTIMIZERS: dict[str, str] = {"adam": "Adam", "adamw": "AdamW"}
"""``optim.name`` -> the ``torch.optim`` class: Adam (L2 decay, as the authors) or AdamW."""
AMP_DTYPES: dict[str, str | None] = {"none": None, "bf16": "bfloat16", "fp16": "float16"}
"""``amp`` -> the autocast dtype (a ``torch`` attribute name) of the backbone on CUDA."""
FEATURE_DTYPES = ("float16", "float32")
"""``data.feature_dtype``: storage dtypes of the frozen-feature cache."""
NUM_CLUSTERS = ("test_classes", "train_classes")
"""``eval.num_clusters``: k of k-means, the classes of the evaluated split (standard) or of
the training split (the authors' code)."""
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class DataConfig:
    """Which dataset, how it is split, and how batches are built."""

    name: str = "digits"
    root: str | None = None
    transform: str | None = None
    """Transform preset ("resnet", "omniglot", "digits"); None picks the dataset's default."""
    image_size: int | None = None
    """Crop size of the RGB ("resnet") transform: train RandomResizedCrop(S), test
    Resize(round(S*256/224)) + CenterCrop(S); None = 224 (the paper)."""
    val_classes: float | str = "auto"
    """Classes carved from the training classes for model selection (fraction or count);
    "auto": 10% (at least 2) for digits, folder, csv, omniglot, cars98 when at least 2 training
    classes remain, none for CUB/Cars/SOP (the paper's protocol) or data with a val split."""
    val_carve: str = "random"
    """Which training classes validation takes: "random" (drawn from the seed) or "last"
    (the last ones in class order, the same for every seed: held out as a block like the
    test classes, so validation measures transfer rather than similarity to siblings)."""
    batch_size: int = 90
    samples_per_class: int = 2
    sampler: str = "authors"
    """"authors": classes and samples drawn with replacement; "m_per_class": without."""
    num_workers: int = 0
    cache: str | None = None
    """Folder of a pre-resized uint8 image cache (built on first use)."""
    features: str | None = None
    """With model.frozen: folder of the frozen-backbone feature cache (``nirdml features``;
    built there on first use, reused by every later run that matches it). None:
    ``features/<data>-<arch>-<size>px-<cut or pooled>`` in the working directory."""
    feature_views: int = 5
    """Augmented views per training image in the feature cache (one drawn per epoch)."""
    feature_dtype: str = "float16"
    """Storage dtype of the feature cache: float16 (half the size) or float32."""
    download: bool = False
    skip_corrupt: bool = False
    check_images: bool = True
    """Check every image file's header before training (fast; false to skip the check)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra layout options for ``load_dataset`` (e.g. a CSV's split rule)."""


@dataclass
class ModelConfig:
    """The embedding network: backbone, pooling, head."""

    arch: str = "small_cnn"
    embed_dim: int = 128
    pooling: str = "avg"
    pretrained: bool | str | None = None
    """None: ImageNet weights for backbones that have them (not small_cnn); a string picks a
    torchvision weights version (e.g. IMAGENET1K_V2)."""
    weights: str | None = None
    """A local weights file (torchvision/timm state_dict or an nirdml checkpoint)."""
    freeze_bn: bool | None = None
    """None: frozen running statistics exactly when the backbone is pretrained."""
    freeze_bn_affine: bool = False
    in_channels: int | None = None
    """Image channels the backbone takes (1 or 3); None: those of the run's transform."""
    frozen: bool = False
    """Train on a cache of the frozen backbone's outputs (data.features): a head on pooled
    features, or with ``cut`` the backbone's last stages + head on cached activations."""
    cut: str | None = None
    """With frozen=true: the first backbone stage that trains (e.g. stage7 of
    efficientnet_lite0, layer4 of a ResNet); the stages before it run once into the cache.
    None: the whole backbone is frozen and only the head trains."""
    head: str = "linear"
    """The head on the pooled features: "linear" (the paper's) or "mlp"."""
    head_hidden: list[int] = field(default_factory=lambda: [512])
    """mlp: hidden layer widths."""
    head_norm: str = "none"
    """mlp: normalisation after each hidden layer: "none", "layer" or "batch"."""
    head_dropout: float = 0.0
    """mlp: dropout after each hidden layer."""
    channels_last: bool = False
    sync_bn: bool = True
    """Distributed runs: trainable BatchNorm normalises with global-batch statistics, as one
    process does (false: per-rank statistics, no BatchNorm communication, results depend on
    the world size). No effect on frozen BatchNorm or on a single process."""


@dataclass
class FlowConfig:
    """The conditional normalizing flow of NIR (method.md section 2)."""

    num_blocks: int = 5
    hidden_width: int = 128
    hidden_layers: int = 8
    clamp: float = 2.0
    condition: str = "dense"
    condition_blocks: str = "all"


@dataclass
class NIRConfig:
    """Non-isotropy regularisation on top of the proxy loss; off for baseline runs."""

    enabled: bool = False
    objective: str = "exp_nll"
    """"exp_nll": authors' code form; "nll": paper form (method.md section 3); the
    noise-bounded "noise_nll", "tangent_nll" (embeddings descend: compact classes) and
    "noise_nll_spread", "tangent_spread" (embeddings ascend: spread classes); see NIRLoss."""
    proxy_weight: float | None = None
    """Weight of the proxy loss in "exp_nll" (None: NIRLoss's default)."""
    nir_weight: float | None = None
    """Weight of the NIR term in "nll" and the bounded objectives (None: NIRLoss's default,
    1/dim for "nll", 1 for the bounded ones)."""
    nir_scale: float = 1.0
    """Multiplies the NIR term of any objective; 0 is the "NIR term x 0" control."""
    nll_cap: float = 30.0
    """exp(nll) is exact below this NLL and continued linearly above (no overflow)."""
    sigma: float | None = None
    """Noise scale of the bounded objectives (None: 0.5; relative to the class spread)."""
    sigma_mode: str = "relative"
    """"relative" (sigma x running class spread per coordinate) or "absolute"."""
    ascend: bool | None = None
    """Bounded objectives: the embeddings ascend (true) or descend (false) the term; None:
    the objective's own sign."""
    detach_inputs: bool = False
    """Control: the flow trains on detached embeddings and proxies, so NIR cannot act."""
    alarm: bool = True
    """Inertness alarm: measure NIR's tangent gradient on the embeddings relative to the
    proxy loss's on one batch per logging interval, and warn when it stays below
    alarm_threshold for a whole epoch."""
    alarm_threshold: float = 1e-6
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass
class LossConfig:
    """The proxy loss and its hyperparameters (passed to its constructor)."""

    name: str = "proxy_anchor"
    params: dict[str, Any] = field(default_factory=dict)
    nir: NIRConfig = field(default_factory=NIRConfig)


@dataclass
class OptimConfig:
    """Optimizer groups and schedule (method.md section 5)."""

    name: str = "adam"
    lr: float = 1e-5
    weight_decay: float = 4e-4
    """L2 weight decay on backbone + head only; never on proxies or the flow."""
    proxy_lr_mult: float = 2000.0
    flow_lr_mult: float = 50.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    """Epochs that run the backbone under no_grad (head, proxies and flow still train)."""


@dataclass
class EvalConfig:
    """When and what to evaluate, and which metric selects the best checkpoint."""

    every: int = 1
    metrics: list[str] | None = None
    """None: the dataset's standard set (names: nirdml.evaluation.registry.METRICS)."""
    select_metric: str = "recall@1"
    batch_size: int = 256
    num_clusters: str = "test_classes"
    """k for k-means (NMI/F1): "test_classes" (standard) or "train_classes" (authors')."""
    reference: bool = True
    """Evaluate the untrained backbone's pooled features (no head) before training, as the
    "epoch 0" reference the kept epoch is compared with (summary.json, last console line)."""
    no_relevant: str = "skip"
    """Queries with no same-class gallery item: left out ("skip", PML) or counted 0 ("zero",
    OML)."""
    average: str = "queries"
    """Retrieval metrics averaged over queries, or per class first ("classes", PML's
    avg_of_avgs)."""


@dataclass
class LogConfig:
    """Optional loggers; W&B credentials come from the environment, never the CLI."""

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "nirdml"
    wandb_mode: str = "offline"
    progress: bool = True


@dataclass
class RunConfig:
    """Everything that defines a run."""

    name: str = "run"
    description: str = ""
    seed: int = 0
    epochs: int = 10
    device: str = "auto"
    amp: str = "none"
    """"none", "bf16" or "fp16" autocast for the backbone (CUDA); flow and losses stay fp32."""
    compile: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with safe numeric widening)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return _build_dataclass(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def _build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                f"unknown config key {full!r}.{hint} Valid keys here: {', '.join(names)}."
            )
        sub = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], sub)
    return cls(**kwargs)


def _deep_update(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=2e-5"`` -> ``{"optim": {"lr": 2e-05}}`` (value parsed as safe YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. optim.lr=2e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------- presets


def _preset_dir() -> Path:
    return Path(str(resources.files("nirdml") / "configs" / "presets"))


def list_presets() -> list[str]:
    """Names of the presets shipped with the package (``nirdml presets``)."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, list_presets(), n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"no preset named {name!r}.{hint} Run `nirdml presets` to list them, "
            "or pass the path of a YAML file."
        )
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return dict(data)


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> RunConfig:
    """Resolve a run config from a preset name, a YAML path or a mapping, plus overrides.

    ``source=None`` gives the embedded default (the ``digits`` preset).
    """
    if source is None:
        source = "digits"
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            raw = _read_yaml(path)
        else:
            raw = _read_yaml(preset_path(str(source)))
    preset_data = (raw.get("data") or {}).get("name", DataConfig.name)
    if isinstance(overrides, Mapping):
        named = "name" in overrides
        raw = _deep_update(raw, overrides)
    else:
        parsed = [parse_override(text) for text in overrides]
        named = any("name" in o for o in parsed)
        for override in parsed:
            raw = _deep_update(raw, override)
    moved = (raw.get("data") or {}).get("name", DataConfig.name) != preset_data
    if moved and not _overridden(overrides, "data", "val_classes"):
        # A preset moved to other data: its validation size was chosen for its own dataset.
        raw["data"] = {**raw["data"], "val_classes": DataConfig.val_classes}
    config = _build_dataclass(RunConfig, raw, "")
    validate(config)
    if config.data.name != preset_data and not named:
        config.name = _custom_data_name(config.name, preset_data, config.data)
    return config


def _overridden(overrides: Sequence[str] | Mapping[str, Any], *key: str) -> bool:
    """Whether the overrides set ``key`` (a path such as ``("data", "val_classes")``)."""
    items = [overrides] if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for node in items:
        for part in key:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


def data_label(d: DataConfig) -> str:
    """A short name of the data: the dataset, or a folder's / CSV file's own name."""
    label = d.name
    if d.root and d.name in ("folder", "csv"):
        path = Path(d.root).expanduser()
        stem = path.stem if d.name == "csv" else path.name
        label = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or d.name
    return label


def default_features_dir(cfg: RunConfig) -> str:
    """``features/<data>-<arch>-<size>px-<cut or pooled>``: where a cached-feature run keeps
    its cache when ``data.features`` is not set (relative to the working directory; one
    cache per data, backbone, image size and cut, shared by every run that matches it)."""
    m = cfg.model
    arch = re.sub(r"[^A-Za-z0-9_.-]+", "-", m.arch)
    size = cfg.data.image_size or 224
    return f"features/{data_label(cfg.data)}-{arch}-{size}px-{m.cut or 'pooled'}"


def _custom_data_name(name: str, preset_data: str, d: DataConfig) -> str:
    """A preset run moved to other data is named after that data, not the preset's dataset:
    ``digits-proxyanchor`` on ``folder`` ``/data/flowers`` -> ``flowers-proxyanchor``."""
    label = data_label(d)
    prefix = preset_data.split("_")[0]
    rest = name[len(prefix) :] if name.startswith(prefix) else f"-{name}"
    return label + rest


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_choice(value: Any, choices: Iterable[str], field: str) -> None:
    """A ConfigError unless ``value`` is one of ``choices`` (a table's names), naming them and
    the closest one."""
    names = list(choices)
    if value in names:
        return
    listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f". Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{field} must be {listed}, not {value!r}{hint}")


def check_data_root(d: DataConfig, *, exists: bool = True) -> None:
    """A clear error when ``data.root`` is unset for a dataset read from a folder, or (with
    ``exists``) names nothing on disk; no file is opened and torch is not imported, so the
    command line finds it in a fraction of a second."""
    entry = DATASETS[dataset_name(d.name)]
    if d.root is None and entry.needs_root:
        raise ConfigError(
            f"data.root is not set: {d.name} is read from a folder you provide. Pass "
            f"--set data.root=/path/to/{d.name} (or data.root and data.download=true to fetch "
            "the public archives, where the dataset allows it)"
        )
    if exists and d.root is not None and entry.needs_root and not d.download:
        path = Path(d.root).expanduser()
        if not path.exists():
            what = "CSV file" if d.name == "csv" else "folder"
            raise MissingFileError(
                f"data.root {path} does not exist: pass the {what} that holds the {d.name} "
                f"data, --set data.root=/path/to/{d.name}"
            )


def transform_preset(d: DataConfig) -> str:
    """The transform preset a run uses: ``data.transform``, else the dataset's default."""
    return d.transform or default_transform_preset(d.name)


def validate(cfg: RunConfig) -> None:
    """Range, choice and consistency checks of every field, before anything is built or
    written. Choices come from their one table (datasets, transforms, samplers, backbones,
    poolings, heads, losses, NIR objectives, flow options, metrics; optimizers, amp and the
    other loop options above); each message names the field and the fix. A dataset alias
    (``cub``) becomes its table name (``cub200``)."""
    _validate_run(cfg)
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_frozen(cfg)
    _check_transform_fits_model(cfg)
    _validate_loss(cfg.loss)
    _validate_optim(cfg.optim, cfg.epochs)
    _validate_eval(cfg.eval, cfg.data)
    _check_choice(cfg.log.wandb_mode, WANDB_MODES, "log.wandb_mode")


def check_loggers(log: LogConfig) -> None:
    """A MissingDependencyError (before anything is written) unless the packages of the
    loggers ``log`` switches on are installed. Not part of :func:`validate`: a run logged to
    TensorBoard can still be evaluated where TensorBoard is not installed."""
    if log.tensorboard:
        require_extra(
            "tensorboard", ("tensorboard",), "log.tensorboard=true", "log.tensorboard=false"
        )
    if log.wandb and log.wandb_mode != "disabled":
        require_extra("wandb", ("wandb",), "log.wandb=true", "log.wandb=false")


def _validate_run(cfg: RunConfig) -> None:
    """epochs, seed, amp, device."""
    _check(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}: set e.g. --set epochs=1")
    _check(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}: set e.g. --set seed=0")
    _check_choice(cfg.amp, AMP_DTYPES, "amp")
    kind, _, index = cfg.device.partition(":")
    _check(
        cfg.device == "auto"
        or (kind in DEVICE_TYPES and (not index or (kind == "cuda" and index.isdigit()))),
        f"device must be auto, cpu, cuda[:N] or mps, not {cfg.device!r}",
    )


def _validate_data(d: DataConfig) -> None:
    """data.*: the dataset and its layout options, the split, batches, the image size."""
    try:  # aliases (cub -> cub200) are accepted as load_dataset accepts them
        d.name = dataset_name(d.name)
    except ValueError:
        raise ConfigError(
            f"data.name {d.name!r} is not a known dataset; use {dataset_choices(d.name)}"
        ) from None
    problem = option_problem(d.name, d.options, d.download)
    _check(problem is None, f"data.options: {problem}")
    _check_choice(d.val_carve, VAL_CARVES, "data.val_carve")
    _check(d.batch_size >= 2, f"data.batch_size must be >= 2, got {d.batch_size}")
    _check(
        d.samples_per_class >= 1,
        f"data.samples_per_class must be >= 1, got {d.samples_per_class}: set e.g. "
        "--set data.samples_per_class=2",
    )
    _check(
        d.batch_size % d.samples_per_class == 0,
        f"data.batch_size ({d.batch_size}) must be divisible by data.samples_per_class "
        f"({d.samples_per_class}); e.g. batch_size="
        f"{d.batch_size // d.samples_per_class * d.samples_per_class}",
    )
    _check_choice(d.sampler, SAMPLERS, "data.sampler")
    _check(
        d.num_workers >= 0,
        f"data.num_workers must be >= 0, got {d.num_workers}: set e.g. --set data.num_workers=0",
    )
    _check(
        d.val_classes == "auto" if isinstance(d.val_classes, str) else d.val_classes >= 0,
        f"data.val_classes must be auto, a fraction < 1 or a class count >= 0, "
        f"not {d.val_classes!r}",
    )
    _check(d.feature_views >= 1, f"data.feature_views must be >= 1, got {d.feature_views}")
    _check_choice(d.feature_dtype, FEATURE_DTYPES, "data.feature_dtype")
    if d.transform is not None:  # None: the dataset's default
        _check_choice(d.transform, TRANSFORMS, "data.transform")
    problem = image_size_problem(transform_preset(d), d.image_size)
    _check(problem is None, str(problem))


def _validate_model(m: ModelConfig) -> None:
    """model.*: backbone, embedding size, pooling, head, weights."""
    _check(m.embed_dim >= 2, f"model.embed_dim must be >= 2, got {m.embed_dim}")
    _check(
        not isinstance(m.pretrained, str) or m.pretrained.startswith("IMAGENET1K_V"),
        f"model.pretrained must be true, false or a torchvision weights version such as "
        f"IMAGENET1K_V1 / IMAGENET1K_V2, not {m.pretrained!r}",
    )
    _check_choice(m.pooling, POOLINGS, "model.pooling")
    _check(
        m.in_channels in (None, 1, 3),
        f"model.in_channels must be 1 or 3, got {m.in_channels}: set --set model.in_channels=3 "
        "(RGB) or 1 (grey), or leave it out to follow the transform",
    )
    try:
        entry = backbone(m.arch)
    except ValueError as exc:
        raise ConfigError(f"model.arch: {exc}") from None
    entry.require_installed(m.arch)
    _check_choice(m.head, HEADS, "model.head")
    _check(
        all(w >= 1 for w in m.head_hidden) and (m.head != "mlp" or len(m.head_hidden) >= 1),
        f"model.head_hidden must list one or more widths >= 1 for head=mlp, got {m.head_hidden}",
    )
    _check_choice(m.head_norm, HEAD_NORMS, "model.head_norm")
    _check(0 <= m.head_dropout < 1, f"model.head_dropout must be in [0, 1), got {m.head_dropout}")


def _validate_loss(loss: LossConfig) -> None:
    """loss.*: the proxy loss and its params, NIR's options and its flow."""
    _check(
        loss.name in LOSS_NAMES,
        f"loss.name {loss.name!r} is unknown; use one of {', '.join(LOSS_NAMES)}",
    )
    params_error = params_problem(loss.name, loss.params)
    _check(params_error is None, str(params_error))
    n = loss.nir
    close = difflib.get_close_matches(n.objective, NIR_OBJECTIVES, n=1)
    _check(
        n.objective in NIR_OBJECTIVES,
        f"loss.nir.objective must be exp_nll or nll, or a bounded objective "
        f"({', '.join(BOUNDED_OBJECTIVES)}), not {n.objective!r}"
        + (f". Did you mean {close[0]!r}?" if close else ""),
    )
    _check(
        n.objective in BOUNDED_OBJECTIVES or (n.sigma is None and n.ascend is None),
        f"loss.nir.sigma and loss.nir.ascend only apply to the bounded objectives "
        f"({', '.join(BOUNDED_OBJECTIVES)}), not {n.objective}: drop them",
    )
    _check(n.sigma is None or n.sigma > 0, f"loss.nir.sigma must be > 0, got {n.sigma}")
    _check_choice(n.sigma_mode, SIGMA_MODES, "loss.nir.sigma_mode")
    _check(n.alarm_threshold >= 0, "loss.nir.alarm_threshold must be >= 0")
    _check(n.nir_scale >= 0, f"loss.nir.nir_scale must be >= 0, got {n.nir_scale}")
    _check(
        all(w is None or w >= 0 for w in (n.proxy_weight, n.nir_weight)),
        "loss.nir.proxy_weight and loss.nir.nir_weight must be >= 0",
    )
    _check(n.nll_cap > 0, "loss.nir.nll_cap must be > 0")
    f = n.flow
    _check(
        f.num_blocks >= 1 and f.hidden_layers >= 2 and f.hidden_width >= 1,
        "loss.nir.flow needs num_blocks >= 1, hidden_layers >= 2, hidden_width >= 1",
    )
    _check(f.clamp > 0, "loss.nir.flow.clamp must be > 0")
    _check_choice(f.condition, CONDITION_MODES, "loss.nir.flow.condition")
    _check_choice(f.condition_blocks, CONDITION_BLOCKS, "loss.nir.flow.condition_blocks")


def _validate_optim(o: OptimConfig, epochs: int) -> None:
    """optim.*: optimizer, learning rates, schedule, warmup."""
    _check_choice(o.name, OPTIMIZERS, "optim.name")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(
        o.weight_decay >= 0,
        f"optim.weight_decay must be >= 0, got {o.weight_decay}: set e.g. "
        "--set optim.weight_decay=0",
    )
    _check(
        o.proxy_lr_mult > 0 and o.flow_lr_mult > 0,
        f"optim.proxy_lr_mult ({o.proxy_lr_mult}) and optim.flow_lr_mult ({o.flow_lr_mult}) "
        "must be > 0: set e.g. --set optim.proxy_lr_mult=1 --set optim.flow_lr_mult=1",
    )
    _check(0 < o.gamma <= 1, f"optim.gamma must be in (0, 1], got {o.gamma}")
    _check(
        all(0 < e for e in o.milestones) and o.milestones == sorted(o.milestones),
        f"optim.milestones must be increasing positive epochs, got {o.milestones}: set e.g. "
        "--set optim.milestones=[30,60], or [] for a constant learning rate",
    )
    _check(
        0 <= o.warmup_epochs < epochs or o.warmup_epochs == 0,
        f"optim.warmup_epochs ({o.warmup_epochs}) must be smaller than epochs ({epochs}): "
        f"set --set optim.warmup_epochs={max(epochs - 1, 0)} (0: no warmup) or more epochs",
    )


def _validate_eval(e: EvalConfig, d: DataConfig) -> None:
    """eval.*: the metric names (the metric table), the selection metric, the options."""
    _check(e.every >= 1, f"eval.every must be >= 1, got {e.every}: set e.g. --set eval.every=1")
    _check(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    _check_choice(e.num_clusters, NUM_CLUSTERS, "eval.num_clusters")
    if e.metrics is not None:
        e.metrics = [metric_table.normalise_metric_name(x) for x in e.metrics]
        for name in e.metrics:
            _check(
                metric_table.is_metric(name),
                metric_table.unknown_metric_message(name, "metric in eval.metrics"),
            )
    e.select_metric = metric_table.normalise_metric_name(e.select_metric)
    _check(
        metric_table.is_metric(e.select_metric),
        metric_table.unknown_metric_message(e.select_metric, "eval.select_metric"),
    )
    computed = e.metrics or list(DATASETS[d.name].metrics)
    _check(
        e.select_metric in computed,
        f"eval.select_metric {e.select_metric!r} is not among the computed metrics "
        f"({', '.join(computed)}); add it to eval.metrics or select one of them",
    )
    _check_choice(e.no_relevant, metric_table.NO_RELEVANT_POLICIES, "eval.no_relevant")
    _check_choice(e.average, metric_table.AVERAGES, "eval.average")


def _check_transform_fits_model(cfg: RunConfig) -> None:
    """The images the transform makes must fit the model's first layer (checked before
    anything is built or written, with the settings that fix it)."""
    d, m = cfg.data, cfg.model
    preset = transform_preset(d)
    where = f"data.transform={d.transform}" if d.transform else f"data.name={d.name}"
    _check(
        preset != "digits" or d.name == "digits",
        f"{where}: the digits transform does not resize, it only fits the in-memory 8x8 "
        f"digits; for {d.name} images use --set data.transform=omniglot (1x28x28 grey, for "
        "the small CNN) or --set data.transform=resnet (3x224x224 RGB, for ResNet/timm)",
    )
    channels = TRANSFORMS[preset].channels
    entry = backbone(m.arch)
    if m.in_channels is None:  # what the images have; RGB for backbones with pretrained weights
        m.in_channels = 3 if entry.has_pretrained else channels
    pretrained = m.pretrained is not False or m.weights is not None
    _check(
        m.in_channels == 3 or not entry.has_pretrained or entry.any_channels or not pretrained,
        f"model.in_channels={m.in_channels}: pretrained {m.arch} weights take 3-channel RGB; "
        "use --set model.in_channels=3 --set data.transform=resnet, or --set "
        "model.pretrained=false to train it from scratch",
    )
    if m.in_channels == channels:
        return
    produced = f"{where} makes {TRANSFORMS[preset].output} images ('{preset}' transform)"
    if not entry.has_pretrained and channels == 3:
        raise ConfigError(
            f"{produced}, but model.in_channels={m.in_channels} (the small CNN of this preset "
            "takes 1-channel images). Fix one of: --set data.transform=omniglot (grey 28x28, "
            "for the small CNN), --set model.in_channels=3 (the small CNN on 224 px RGB, slow "
            "on a CPU), or start from a photo preset with a pretrained backbone, e.g. `nirdml "
            "train cub200-r128-avg-proxyanchor-nir --set data.name=folder --set "
            "data.root=/path/to/images`"
        )
    if entry.has_pretrained and channels == 1:
        raise ConfigError(
            f"{produced}, but model.in_channels={m.in_channels} ({m.arch}). Fix: --set "
            "data.transform=resnet (RGB 224 px, what pretrained weights expect), or train "
            "from scratch on grey images with --set model.pretrained=false --set "
            "model.in_channels=1"
        )
    raise ConfigError(
        f"{produced}, but model.in_channels={m.in_channels} ({m.arch}). Fix: --set "
        f"model.in_channels={channels}"
    )


def _validate_frozen(cfg: RunConfig) -> None:
    """model.frozen / data.features / head options (see nirdml.training.features)."""
    d, m = cfg.data, cfg.model
    if m.cut is not None:
        _check(
            m.frozen,
            f"model.cut={m.cut} trains the backbone from that stage on over a cache of the "
            "stages before it: it needs model.frozen=true (and data.features=DIR); for "
            "end-to-end training drop model.cut",
        )
        check_cut(m.arch, m.cut)
    if not m.frozen:
        _check(
            m.head == "linear",
            f"model.head={m.head!r} needs model.frozen=true (end-to-end training uses the "
            "Linear head); set model.frozen=true or model.head=linear",
        )
        return
    if d.features is None:
        d.features = default_features_dir(cfg)
    _check(
        cfg.optim.warmup_epochs == 0 or m.cut is not None,
        f"optim.warmup_epochs={cfg.optim.warmup_epochs} means nothing with model.frozen=true "
        "and no model.cut: warmup trains the head with the backbone frozen for the first "
        "epochs, and here the backbone is frozen for every epoch. Set optim.warmup_epochs=0 "
        "(or train the last stages with model.cut=STAGE)",
    )
    _check(
        d.cache is None,
        "data.cache (pre-resized images) is not used with model.frozen=true: "
        "the images are read once by the feature extraction. Drop data.cache",
    )
