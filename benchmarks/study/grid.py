"""The study's runs: which preset, which seed, which overrides, and where each run lives.

A run is a shipped Omniglot preset plus ``key=value`` overrides and a seed. Its folder is
named by a hash of its resolved config (everything that changes the numbers; not the data
root, the run name or logging), so

* a configuration shared by two parts of the study (e.g. the tuned NIR point, which is both
  a main-study run and a sweep point) is trained once;
* editing a preset changes the hash of the runs that use it: stale results are never
  reused for a changed configuration.

Parts (run in this order; each later part uses values chosen on the validation split by
the earlier ones, recorded as constants below):

``tune-base``  the baselines' own knobs (lr, proxy lr) on the tuning seed, validation R@1.
``main``       3 losses x {baseline, +NIR} x ``MAIN_SEEDS`` with the tuned presets.
``sweep``      ProxyAnchor + NIR: weight and objective, on ``SWEEP_SEEDS``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any

from nirdml.training.config import RunConfig, load_config

LOSSES: dict[str, tuple[str, str]] = {
    "proxy_anchor": ("omniglot", "omniglot-nir"),
    "proxy_nca": ("omniglot-proxynca", "omniglot-proxynca-nir"),
    "soft_triple": ("omniglot-softtriple", "omniglot-softtriple-nir"),
}
"""Loss -> (baseline preset, +NIR preset)."""
AUTHORS_NIR = ("loss.nir.objective=exp_nll",)
"""This study's "+ NIR" is the authors' form: pinned, since the + NIR presets now ship the
objective the later evidence supports (results/omniglot_nir.md). Same resolved configs, same
run hashes as when the presets held exp_nll."""
LOSS_LABELS = {"proxy_anchor": "ProxyAnchor", "proxy_nca": "ProxyNCA", "soft_triple": "SoftTriple"}

MAIN_SEEDS = (0, 1, 2, 3, 4)
"""Seeds of the main study (model init, proxies, flow, batches, augmentation, val split)."""
TUNE_SEED = 100
"""Tuning seed: never one of the main seeds, so the main numbers are not selected on."""
SWEEP_SEEDS = (0, 1)
"""The sweep runs on two main seeds, paired with (and sharing) the main baselines and the
main + NIR run (its default point)."""
TUNE_EPOCHS = 5
"""Tuning runs train 5 epochs; with a constant learning rate their epoch-3 state is the
3-epoch run's final state, so the 3-epoch budget is tuned on validation R@1 at epoch <= 3."""
BUDGET_EPOCHS = 3

# Knobs of the run config that do not change the numbers (left out of the run hash).
_VOLATILE = {("name",), ("description",), ("data", "root"), ("data", "num_workers"), ("log",)}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    group: str
    """Human-readable configuration label (unique per configuration within a part)."""
    seed: int
    preset: str
    overrides: tuple[str, ...] = ()

    def config(self, data_root: str) -> RunConfig:
        sets = [f"data.root={data_root}", f"seed={self.seed}", "log.progress=false"]
        cfg = load_config(self.preset, [*sets, *self.overrides])
        cfg.name = f"{self.group}-seed{self.seed}"
        return cfg

    def run_id(self, data_root: str) -> str:
        """``<group>-s<seed>-<hash of the resolved config>``: the run's folder name."""
        return f"{self.group}-s{self.seed}-{config_hash(self.config(data_root))}"

    def command(self, data_root: str, out_dir: str) -> str:
        """The ``nirdml train`` command line that repeats this run."""
        parts = ["nirdml", "train", self.preset, "--set", f"data.root={data_root}"]
        for item in (f"seed={self.seed}", *self.overrides):
            parts += ["--set", item]
        parts += ["--out", out_dir]
        return shlex.join(parts)


def canonical(cfg: RunConfig) -> dict[str, Any]:
    """The config's fields that determine the numbers (volatile ones dropped)."""

    def strip(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {
                k: strip(v, (*path, k))
                for k, v in sorted(node.items())
                if (*path, k) not in _VOLATILE
            }
        return node

    return strip(cfg.to_dict(), ())


def config_hash(cfg: RunConfig) -> str:
    text = json.dumps(canonical(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- tuning


def _o(**knobs: Any) -> tuple[str, ...]:
    """Overrides from ``section__field=value`` keywords (``optim__lr=1e-3``)."""
    return tuple(f"{k.replace('__', '.')}={v}" for k, v in knobs.items())


BASE_LR_GRID = {
    "proxy_anchor": ((1e-3, 100.0), (3e-3, 100.0), (1e-3, 1000.0), (1e-3, 10.0)),
    "proxy_nca": ((1e-3, 100.0), (1e-3, 1000.0)),
    "soft_triple": ((1e-3, 100.0), (1e-3, 1000.0)),
}
"""(lr, proxy_lr_mult) tried for each baseline (the loss's own hyperparameters keep the
defaults of its paper: ProxyAnchor alpha 32 / delta 0.1, ProxyNCA scale 9, SoftTriple
K 10, lambda 20, gamma 0.1, tau 0.2, margin 0.01)."""
SHORT = {"proxy_anchor": "pa", "proxy_nca": "pnca", "soft_triple": "st"}


def tune_base_specs() -> list[RunSpec]:
    """Baseline knobs on the tuning seed (validation R@1 at the best validation epoch)."""
    specs = []
    for loss, grid in BASE_LR_GRID.items():
        for lr, mult in grid:
            specs.append(
                RunSpec(
                    f"tune-{SHORT[loss]}-lr{lr:g}-p{mult:g}",
                    TUNE_SEED,
                    LOSSES[loss][0],
                    _o(optim__lr=lr, optim__proxy_lr_mult=mult, epochs=TUNE_EPOCHS),
                )
            )
    return specs


TUNED_BASE = {
    "proxy_anchor": (1e-3, 10.0),
    "proxy_nca": (1e-3, 100.0),
    "soft_triple": (1e-3, 100.0),
}
"""(lr, proxy_lr_mult) chosen by ``tune-base`` (best validation R@1); written into the presets."""

NIR_GRID = {
    "exp_nll": (0.01, 0.1, 1.0),
    "nll": (1.0 / 128, 1.0),
}
"""Objective -> weights tried on ProxyAnchor (``proxy_weight`` for exp_nll, on the proxy
loss; ``nir_weight`` for nll, on the mean NLL). exp_nll 0.01 and nll 1/D are the defaults."""


def _weight_key(objective: str) -> str:
    return "loss__nir__proxy_weight" if objective == "exp_nll" else "loss__nir__nir_weight"


def nir_spec(
    loss: str,
    seed: int,
    objective: str,
    weight: float,
    *,
    flow_lr_mult: float = 1.0,
    warmup: int = 0,
    prefix: str = "tune",
) -> RunSpec:
    """A +NIR run with explicit knobs on top of the loss's tuned baseline knobs."""
    lr, mult = TUNED_BASE[loss]
    name = f"{prefix}-{SHORT[loss]}-nir-{objective}-w{weight:.4g}"
    if flow_lr_mult != 1.0:
        name += f"-flow{flow_lr_mult:g}"
    if warmup:
        name += f"-warm{warmup}"
    knobs = {
        "optim__lr": lr,
        "optim__proxy_lr_mult": mult,
        "optim__flow_lr_mult": flow_lr_mult,
        "optim__warmup_epochs": warmup,
        "loss__nir__objective": objective,
        _weight_key(objective): weight,
    }
    return RunSpec(name, seed, LOSSES[loss][1], _o(**knobs))


def main_group(loss: str, variant: str) -> str:
    return f"main-{SHORT[loss]}-{variant}"


def main_specs() -> list[RunSpec]:
    """3 losses x {baseline, +NIR} x MAIN_SEEDS, from the tuned presets."""
    specs = []
    for seed in MAIN_SEEDS:  # seed by seed: a partial study is still complete pairs
        for loss, (base, nir) in LOSSES.items():
            specs.append(RunSpec(main_group(loss, "base"), seed, base))
            specs.append(RunSpec(main_group(loss, "nir"), seed, nir, AUTHORS_NIR))
    return specs


def sweep_specs() -> list[RunSpec]:
    """ProxyAnchor: every NIR_GRID point and the baseline, on SWEEP_SEEDS."""
    lr, mult = TUNED_BASE["proxy_anchor"]
    specs = []
    for seed in SWEEP_SEEDS:
        specs.append(
            RunSpec(
                "sweep-pa-baseline",
                seed,
                LOSSES["proxy_anchor"][0],
                _o(optim__lr=lr, optim__proxy_lr_mult=mult),
            )
        )
        for obj, ws in NIR_GRID.items():
            specs += [nir_spec("proxy_anchor", seed, obj, w, prefix="sweep") for w in ws]
    return probe_specs() + specs  # the probes first: they answer "why"


PROBES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "warmup1": ({"optim__warmup_epochs": 1}, {"optim__warmup_epochs": 1}),
}
"""Why NIR helps or hurts: probe -> (baseline knobs, + NIR knobs), each a paired comparison
under another training setting. ``warmup1``: the first epoch trains the head, proxies (and
the flow) with the backbone frozen, as in the authors' recipe (1 epoch for CUB and Cars).
(A flow lr x50, the authors' multiplier, diverged here: their base lr is 1e-5, ours 1e-3,
so x50 is a flow lr of 0.05, 100x theirs; see the findings.)"""

PROBE_RUNS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("warmup1", "proxy_anchor", MAIN_SEEDS),
    ("warmup1", "proxy_nca", SWEEP_SEEDS),
    ("warmup1", "soft_triple", SWEEP_SEEDS),
)
"""(probe, loss, seeds): ProxyAnchor on all main seeds, the other losses on two."""


def probe_group(probe: str, loss: str, variant: str) -> str:
    return f"probe-{probe}-{SHORT[loss]}-{variant}"


def probe_specs() -> list[RunSpec]:
    """Each probe's baseline and + NIR (the main presets otherwise), seed-major per loss."""
    specs = []
    for probe, loss, seeds in PROBE_RUNS:
        lr, mult = TUNED_BASE[loss]
        for seed in seeds:
            for variant, preset, knobs in zip(
                ("base", "nir"), LOSSES[loss], PROBES[probe], strict=True
            ):
                all_knobs = {"optim__lr": lr, "optim__proxy_lr_mult": mult, **knobs}
                pinned = AUTHORS_NIR if variant == "nir" else ()
                specs.append(
                    RunSpec(
                        probe_group(probe, loss, variant), seed, preset, _o(**all_knobs) + pinned
                    )
                )
    return specs


def diagnosis_runs(runs_root: Any, data_root: str) -> list[Any]:
    """Finished + NIR runs analysed by ``diagnose``: every sweep point and the main + NIR
    runs of each loss, on the first main seed."""
    from study.runner import is_done, run_dir

    seed = MAIN_SEEDS[0]
    specs = [s for s in sweep_specs() if s.seed == seed and "-nir-" in s.group]
    specs += [
        RunSpec(main_group(loss, "nir"), seed, presets[1], AUTHORS_NIR)
        for loss, presets in LOSSES.items()
    ]
    specs += [s for s in probe_specs() if s.seed == seed and s.group.endswith("-nir")]
    folders: list[Any] = []
    for spec in specs:
        folder = run_dir(runs_root, spec, data_root)
        if is_done(folder) and folder not in folders:
            folders.append(folder)
    return folders


def adam_runs(runs_root: Any, data_root: str) -> list[Any]:
    """Finished runs whose optimizer state ``diagnose`` tabulates: seed 0's main baseline
    and + NIR of each loss, and the warmup probes' ProxyAnchor pair."""
    from study.runner import is_done, run_dir

    seed = MAIN_SEEDS[0]
    specs = [
        RunSpec(main_group(loss, v), seed, presets[v == "nir"])
        for loss, presets in LOSSES.items()
        for v in ("base", "nir")
    ]
    specs += [s for s in probe_specs() if s.seed == seed and "-pa-" in s.group]
    return [f for f in (run_dir(runs_root, s, data_root) for s in specs) if is_done(f)]


def chosen_groups() -> set[str]:
    """Tuning runs whose knobs the presets use (marked in the report)."""
    return {f"tune-{SHORT[loss]}-lr{lr:g}-p{mult:g}" for loss, (lr, mult) in TUNED_BASE.items()}


def shard_arg(text: str) -> tuple[int, int]:
    """The argparse type of ``--shard I/N``: ``(I, N)`` with ``0 <= I < N`` (a shard out of
    range would silently skip runs)."""
    import argparse

    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/2, 1/2")
    return index, count


def shard(specs: list[RunSpec], data_root: str, index: int, count: int) -> list[RunSpec]:
    """Every ``count``-th distinct configuration from ``index``: ``count`` processes share
    a part and never train the same folder (specs with equal seed and config hash, e.g. a
    probe's baseline that another probe shares, are one run)."""
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        unique.setdefault(f"{spec.seed}-{config_hash(spec.config(data_root))}", spec)
    return list(unique.values())[index::count]


def controls_specs() -> list[RunSpec]:
    """The NIR controls and bounded objectives (study/controls.py), ProxyAnchor, on the
    main seeds; the same arms run on any other preset pair through
    ``benchmarks/nir_controls.py``."""
    from study.controls import control_specs

    base, nir = LOSSES["proxy_anchor"]
    return control_specs(base, nir, MAIN_SEEDS)


PARTS = {
    "tune-base": tune_base_specs,
    "main": main_specs,
    "sweep": sweep_specs,
    "controls": controls_specs,
}

PROTOCOL_TEXT = """
- Data: Omniglot, train on the 964 `images_background` characters minus 96 held out as a
  class-disjoint validation split (`data.val_classes=0.1`, drawn from the run seed), test
  on the 659 `images_evaluation` characters (13,180 images, every image queries all
  others). 28x28 inputs, train augmentation: random affine (+-10 deg, +-10% shift,
  0.9-1.1 scale).
- Model: small CNN (Conv-4: 4 x conv3x3-BN-ReLU-maxpool, widths 32-64-128-256), linear
  head to 128 dims, L2-normalised; trained from scratch.
- Batches: 120 = 60 classes x 2 images, classes and images drawn with replacement (the
  authors' sampler); an epoch is 144 batches. Adam, no weight decay.
- Budget: 3 epochs for every run (baseline and + NIR alike; ~1 CPU-minute per epoch),
  evaluated after every epoch. The curves still rise at epoch 3: this is a short-budget
  comparison (what the paper calls convergence speed), not converged accuracy.
- Model selection: the epoch with the best validation R@1 (`summary["best"]`); we report
  the test metrics there. The paper's protocol (best *test* epoch) is reported separately.
- Seeds: main study on seeds 0-4; tuning on seed 100 only, so no main number was used
  to choose anything.
"""

SWEEP_TEXT = """
ProxyAnchor + NIR with the tuned base knobs, varying only the objective and its weight,
on seeds 0 and 1 (shared with the main study); the baseline at the same seeds for the paired
difference. `exp_nll`: `mean exp(NLL) + proxy_weight * L_proxy` (authors' code; larger
weight = more proxy loss). `nll`: `L_proxy + nir_weight * mean NLL` (paper's equation;
larger weight = more NIR). Test numbers at the val-selected epoch.
"""

PROBE_TEXT = """
The main presets, baseline and + NIR both changed by one training knob: a 1-epoch backbone
warmup (`optim.warmup_epochs=1`; head, proxies and flow train while the CNN is frozen, as in
the authors' recipe). ProxyAnchor on the 5 main seeds, ProxyNCA and SoftTriple on seeds 0
and 1 (test R@1 at the val-selected epoch; each main-study row restricted to the same seeds).
With 2 seeds a row shows the direction and size of an effect, not its significance.
"""

ADAM_TEXT = """
Adam's state at the end of each run (seed 0, `checkpoints/last.pt`), per parameter group:
median sqrt(v), Adam's second-moment estimate (beta2 = 0.999: it remembers the gradient
magnitudes of the last ~1,000 steps, more than this study's 432), and median |m| / sqrt(v),
the last update's size relative to the learning rate (near 1 when recent gradients are as
large as the remembered ones; near 0 when the optimizer still remembers much larger ones).
"""

TUNING_TEXT = """
One 5-epoch run per setting on seed 100, ranked by validation R@1 at epoch 3, the study's
budget (96 held-out training classes; the test set is not looked at). The learning rate is
constant, so epoch 3 of these runs is exactly a 3-epoch run. Only the baselines' own knobs
(lr, proxy lr) were tuned, and the + NIR runs inherit them; NIR's knobs keep the authors'
defaults (`exp_nll`, proxy weight 0.01, flow lr = base lr) and are probed by the sweep.
"""

RERUN_TEXT = """
```bash
export OMP_NUM_THREADS=1            # one thread, one run at a time
python benchmarks/omniglot_study.py run --part tune-base --data-root /path/to/omniglot
python benchmarks/omniglot_study.py run --part main      --data-root /path/to/omniglot
python benchmarks/omniglot_study.py run --part sweep     --data-root /path/to/omniglot
python benchmarks/omniglot_study.py flow                 --data-root /path/to/omniglot
python benchmarks/omniglot_study.py report               --data-root /path/to/omniglot
```

Each part is resumable (finished runs are skipped, killed runs resumed). One run of the
main study is one `nirdml train` call, e.g.

```bash
nirdml train omniglot     --set data.root=/path/to/omniglot --set seed=3
nirdml train omniglot-nir --set data.root=/path/to/omniglot --set seed=3
```

(`omniglot-proxynca[-nir]`, `omniglot-softtriple[-nir]` for the other losses); each run
folder's `spec.json` holds its exact command.
"""


def specs_of(part: str) -> list[RunSpec]:
    if part == "all":
        out: list[RunSpec] = []
        for name in PARTS:
            out += [s for s in PARTS[name]() if s not in out]
        return out
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {', '.join(PARTS)} or all")
    return PARTS[part]()


DIAGNOSIS_TEXT = """
`python benchmarks/omniglot_study.py diagnose`: for each + NIR run on seed 0 (last
checkpoint), 8 fresh training batches; the gradient of each loss term with respect to the
L2-normalised embeddings. Tangent ratio: how strongly the NIR term pulls the network
compared with the proxy term (only the tangent part reaches it). Radial share: part of the
NIR gradient that points off the sphere and is thrown away by the normalisation. Top-5%
share: how concentrated a term's gradient is on a few samples (0.05 = evenly spread).
"""
