"""Distributed training (torchrun + DDP, gloo on CPU) equals single-process training.

One real 2-process launch (``python -m torch.distributed.run --standalone``, module
fixture ``two_ranks``) runs this file as a script; in that pair of processes:
the ``nirdml train`` command (2 epochs, the first a warmup), a run stopped after its first
epoch (then finished by ONE process), the resume of a one-process run, the float64
gradient check (trainable synchronised BatchNorm), and a sharded evaluation. Every result
is compared with one process trained on the same global batches.

The float32 runs use frozen BatchNorm statistics (the paper's recipe, model.freeze_bn):
then DDP and one process differ only in the order of float32 sums. Trainable BatchNorm is
checked in float64 (model.sync_bn): in float32 a 1-ulp change of the batch statistics
alone moves the flow weights by ~1e-4 within an epoch (Adam on near-zero gradients), in
one process as much as across ranks (docs/guide/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO_ROOT
from nirdml.data.samplers import slice_bounds
from nirdml.models.batchnorm import DistributedBatchNorm, convert_sync_batchnorm
from nirdml.training.build import Criterion
from nirdml.training.checkpoint import load_checkpoint
from nirdml.training.config import load_config
from nirdml.training.distributed import DistContext, DistributedSetupError
from nirdml.training.trainer import train

PRESET = "digits-nir"  # small CNN (trainable BatchNorm), ProxyAnchor + NIR, warmup 1 epoch
RUN = [
    "epochs=2",
    "data.batch_size=174",  # 5 steps per epoch; 87 per rank: a class group spans both
    "eval.every=2",
    "log.progress=false",
    "eval.metrics=[recall@1,recall@2,map@r,nmi]",
    "model.freeze_bn=true",  # the paper's recipe: frozen BatchNorm statistics
    "eval.reference=false",  # no epoch-0 evaluation: the comparisons do not read it
]
ATOL = 1e-5
LAUNCH_TIMEOUT = 600


# ----------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *args,
    ]
    proc = subprocess.run(
        cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=REPO_ROOT
    )
    # the workers' tracebacks come first in stderr, torchrun's summary last
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[:8000]}"
    )
    return proc


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state (dicts / lists), by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def _max_diffs(a: dict, b: dict, keys=("model", "loss", "optimizer")) -> dict[str, float]:
    """Largest absolute difference per top-level state part (same tensor set asserted)."""
    out = {}
    for key in keys:
        ta, tb = _tensors(a[key], key), _tensors(b[key], key)
        assert ta.keys() == tb.keys(), f"{key}: different entries"
        out[key] = max(
            ((x.double() - tb[n].double()).abs().max().item() if x.numel() else 0.0)
            for n, x in ta.items()
        )
    return out


def _assert_same_run(dist_dir: Path, ref_dir: Path) -> None:
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (dist_dir, ref_dir))
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    diffs = _max_diffs(a, b)
    assert all(d <= ATOL for d in diffs.values()), f"max |difference| {diffs} > {ATOL}"
    # The proxies and the flow are compared inside "loss"; name them to be explicit.
    loss_names = set(a["loss"])
    assert any("proxies" in n for n in loss_names) and any("flow" in n for n in loss_names)
    ha, hb = a["history"], b["history"]
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb]
    for ra, rb in zip(ha, hb, strict=True):
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], rel=1e-4)
        for k in rb:
            if k.startswith("test/"):
                # the models agree to 1e-5: a metric may move by one tied query at most
                assert ra[k] == pytest.approx(rb[k], abs=2e-3), k


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny CPU models run fastest on one thread (more stall when cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single(out: Path, overrides: list[str], stop_after_epoch: int | None = None) -> Path:
    with _one_thread():
        train(load_config(PRESET, overrides), out, stop_after_epoch=stop_after_epoch)
    return out


# ----------------------------------------------------------------------------- float64 check


def _grad_run(ctx: DistContext, steps: int = 5, warmup: int = 2) -> dict[str, torch.Tensor]:
    """SGD steps of the trainer's Criterion (small CNN with trainable synchronised BatchNorm,
    ProxyAnchor + NIR) in float64 on fixed global batches of 23; ``ctx`` decides the ranks.

    Returns every step's loss and (DDP-averaged) gradients and the final weights and
    buffers. The first ``warmup`` steps run the backbone under no_grad (DDP without it).
    """
    from nirdml.flow import ConditionalFlow
    from nirdml.losses import NIRLoss, ProxyAnchorLoss
    from nirdml.models import build_model

    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    model = build_model("small_cnn", 16, pretrained=False, in_channels=1, seed=0)
    if ctx.enabled:
        model, n = convert_sync_batchnorm(model, device)
        assert n == 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        flow = ConditionalFlow(16, hidden_width=32, hidden_layers=3)
        loss = NIRLoss(
            ProxyAnchorLoss(6, 16, positive_mean="samples"), proxy_weight=0.01, flow=flow
        )
    model, loss = model.double(), loss.double()
    batch = 23  # 11 + 12 rows on two ranks; the class pair of rows 10-11 spans both
    lo, hi = slice_bounds(batch, ctx.world_size, ctx.rank)
    criterion = Criterion(model, loss, ctx.gather_fn(batch))
    # plain SGD: unlike Adam, sensitive to the scale of the gradients
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=1e-4)
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    named += [(f"loss.{n}", p) for n, p in loss.named_parameters()]
    wrapped, wrapped_for = criterion, None
    state: dict[str, torch.Tensor] = {}
    for step in range(steps):
        images = torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 6, (batch // 2 + 1,), generator=g).repeat_interleave(2)[:batch]
        backbone_grad = step >= warmup
        if wrapped_for is not backbone_grad:
            wrapped = criterion
            exclude = () if backbone_grad else list(model.backbone_parameters())
            wrapped = ctx.wrap(criterion, device, exclude)
            wrapped_for = backbone_grad
        out = wrapped(images[lo:hi], labels[lo:hi], backbone_grad)
        optimizer.zero_grad(set_to_none=True)
        out.backward()
        state[f"step{step}.loss"] = out.detach().clone()
        for name, p in named:
            if p.grad is not None:
                state[f"step{step}.grad.{name}"] = p.grad.detach().clone()
        optimizer.step()
    state.update({f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    state.update({f"loss.{k}": v.detach().clone() for k, v in loss.state_dict().items()})
    return state


# ----------------------------------------------------------------------------- the launches


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Any]:
    """Single-process references, then ONE 2-rank launch running every 2-rank scenario."""
    root = tmp_path_factory.mktemp("ddp")
    ref = _single(root / "ref", RUN)
    half = _single(root / "half", RUN, stop_after_epoch=1)
    shutil.copytree(half, root / "resume_on_two")
    sets = [a for o in RUN for a in ("--set", o)]
    tasks = [
        {"kind": "cli", "argv": ["train", PRESET, *sets, "--quiet", "--out", str(root / "cli")]},
        {"kind": "train", "overrides": RUN, "out": str(root / "stopped"), "stop": 1},
        {"kind": "resume", "out": str(root / "resume_on_two")},
        {"kind": "grad", "out": str(root / "grad.pt")},
        {"kind": "evaluate", "checkpoint": str(ref), "out": str(root / "eval_two.pt")},
        {"kind": "errors", "out": str(root / "errors.json"), "scratch": str(root / "scratch")},
    ]
    spec = root / "tasks.json"
    spec.write_text(json.dumps(tasks))
    proc = _torchrun(str(Path(__file__).resolve()), str(spec))
    # the run stopped after epoch 1 on two ranks is finished by ONE process
    shutil.copytree(root / "stopped", root / "resume_on_one")
    with _one_thread():
        train(out_dir=root / "resume_on_one", resume=True)
    return {"root": root, "ref": ref, "stdout": proc.stdout}


def test_gradient_math_is_exact_in_float64(two_ranks):
    """Every step's loss and gradients (backbone, head, BatchNorm, proxies, flow) and the
    final weights and BatchNorm statistics on 2 ranks (slices of 11 and 12, a class pair
    split between them, warmup then full steps) equal one process to float64 precision."""
    two = torch.load(two_ranks["root"] / "grad.pt", weights_only=True)
    with _one_thread():
        one = _grad_run(DistContext())
    assert two.keys() == one.keys()
    for part in ("backbone", "head", "proxies", "flow", "running_var"):
        assert any(part in k for k in one if ".grad." in k or k.startswith(("model.", "loss.")))
    warm = [
        k for k in one if k.startswith(("step0.grad.model.backbone", "step1.grad.model.backbone"))
    ]
    assert not warm and "step2.grad.model.backbone.blocks.0.0.weight" in one
    worst = {k: (two[k] - one[k]).abs().max().item() for k in one}
    assert max(worst.values()) < 1e-10, max(worst.items(), key=lambda kv: kv[1])
    assert one["step4.grad.model.backbone.blocks.0.0.weight"].abs().max() > 1e-3  # not vacuous


def test_two_ranks_then_one_process_resume_matches_single_process(two_ranks):
    root = two_ranks["root"]
    stopped = load_checkpoint(root / "stopped" / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 0  # epoch 1 of 2 (warmup) done on two ranks
    _assert_same_run(root / "resume_on_one", two_ranks["ref"])


def test_one_process_then_two_rank_resume_matches_single_process(two_ranks):
    root = two_ranks["root"]
    _assert_same_run(root / "resume_on_two", two_ranks["ref"])
    summary = json.loads((root / "resume_on_two" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_sharded_evaluation_equals_single_process(two_ranks):
    from nirdml.training.artifacts import load_trained
    from nirdml.training.build import evaluate_model, load_splits

    got = torch.load(two_ranks["root"] / "eval_two.pt", weights_only=True)
    run = load_trained(two_ranks["ref"])
    test = load_splits(run.config).test
    from nirdml.evaluation import compute_embeddings

    emb, labels = compute_embeddings(run.model, test, batch_size=256)
    assert torch.equal(got["labels"], labels)
    torch.testing.assert_close(got["embeddings"], emb, atol=1e-6, rtol=0)
    metrics = evaluate_model(
        run.model,
        test,
        metrics=got["metric_names"],
        num_clusters=None,
        batch_size=256,
        num_workers=0,
        device=torch.device("cpu"),
        seed=0,
    )
    assert set(metrics) == set(got["metrics"])
    for k, v in metrics.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-9), k


def test_train_command_on_two_ranks_matches_single_process(two_ranks):
    """`nirdml train` under torchrun (2 ranks, a warmup epoch, frozen BatchNorm) equals one
    process; only rank 0 writes files and reports."""
    out, ref = two_ranks["root"] / "cli", two_ranks["ref"]
    _assert_same_run(out, ref)
    assert two_ranks["stdout"].count(": test recall@1 ") == 1, two_ranks["stdout"]  # rank 0
    assert two_ranks["stdout"].count("resuming ") == 1, two_ranks["stdout"]  # resume: rank 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*")), files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["images_per_s"] > 0


# ----------------------------------------------------------------------------- bad setups


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_inconsistent_launch_fails_on_every_rank_with_the_fix(two_ranks):
    messages = json.loads((two_ranks["root"] / "errors.json").read_text())
    assert "ranks [1] have a different config than rank 0" in messages["different_configs"]
    assert "same preset and --set overrides" in messages["different_configs"]
    assert not (two_ranks["root"] / "scratch").exists()  # refused before writing anything


def test_unsynchronised_batchnorm_is_announced():
    from nirdml.models import build_model

    model = build_model("small_cnn", 8, pretrained=False, in_channels=1)
    with pytest.warns(UserWarning, match="4 trainable BatchNorm.*model.sync_bn=true"):
        DistContext(rank=0, world_size=2).warn_unsynced_batchnorm(model)
    frozen = build_model("small_cnn", 8, pretrained=False, in_channels=1, freeze_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistContext(rank=0, world_size=2).warn_unsynced_batchnorm(frozen)
        DistContext().warn_unsynced_batchnorm(model)  # one process: nothing to say


def test_plain_process_is_rank_zero_of_one(clean_env):
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    clean_env.setenv("WORLD_SIZE", "1")
    assert not DistContext.from_env().enabled


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1234"}, "MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR and MASTER_PORT are not set"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, r"not in \[0"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "must be >= 1"),
        ({"RANK": "1"}, "WORLD_SIZE is not"),
    ],
)
def test_bad_world_setup_is_named_with_the_fix(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(DistributedSetupError, match=match) as info:
        DistContext.from_env()
    assert "torchrun" in str(info.value)


def test_global_batch_slices_cover_it_once_and_too_small_a_batch_is_refused():
    for world in (1, 2, 3, 4, 7, 8):
        ctx = DistContext(rank=0, world_size=world)
        sizes = ctx.slice_sizes(90)
        assert sum(sizes) == 90 and max(sizes) - min(sizes) <= 1
    with pytest.raises(DistributedSetupError, match="GLOBAL batch.*>= the world size"):
        DistContext(rank=0, world_size=4).check_batch(3)
    DistContext(rank=0, world_size=4).check_batch(90)  # 22/23 per rank: class pairs may split


def test_sync_batchnorm_conversion_keeps_weights_and_refuses_unknown_layers():
    from nirdml.models import build_model

    model = build_model("small_cnn", 8, pretrained=False, in_channels=1, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, n = convert_sync_batchnorm(model, torch.device("cpu"))
    assert n == 4 and sum(isinstance(m, DistributedBatchNorm) for m in model.modules()) == 4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # one process: identical to plain BatchNorm (nothing to synchronise)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = build_model("small_cnn", 8, pretrained=False, in_channels=1, seed=0)
    torch.testing.assert_close(model(x), plain(x))

    class OddBN(torch.nn.BatchNorm2d):
        pass

    with pytest.raises(DistributedSetupError, match="freeze_bn"):
        convert_sync_batchnorm(torch.nn.Sequential(OddBN(3)), torch.device("cpu"))
    frozen = build_model("small_cnn", 8, pretrained=False, in_channels=1, freeze_bn=True)
    assert convert_sync_batchnorm(frozen, torch.device("cpu"))[1] == 0


# ----------------------------------------------------------------------------- the worker


def _worker(spec_path: str) -> None:
    """Run the 2-rank tasks of ``spec_path`` (launched by torchrun from ``two_ranks``)."""
    from nirdml.training.artifacts import load_trained
    from nirdml.training.build import eval_metrics, evaluate_model, load_splits

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # one thread per rank (the conftest import asked for 2)
    for task in json.loads(Path(spec_path).read_text()):
        kind = task["kind"]
        if kind == "cli":
            from nirdml.cli import main

            assert main(task["argv"]) == 0
        elif kind == "grad":
            ctx = DistContext.from_env()
            ctx.init(torch.device("cpu"))
            state = _grad_run(ctx)
            if rank == 0:
                torch.save(state, task["out"])
        elif kind == "train":
            cfg = load_config(PRESET, task["overrides"])
            train(cfg, task["out"], stop_after_epoch=task.get("stop"))
        elif kind == "resume":
            train(out_dir=task["out"], resume=True)
        elif kind == "evaluate":
            ctx = DistContext.from_env()
            ctx.init(torch.device("cpu"))
            run = load_trained(task["checkpoint"])
            test = load_splits(run.config).test
            names = eval_metrics(run.config)
            emb, labels = ctx.compute_embeddings(
                run.model, test, batch_size=256, device=torch.device("cpu"), num_workers=0
            )
            metrics = evaluate_model(
                run.model,
                test,
                metrics=names,
                num_clusters=None,
                batch_size=256,
                num_workers=0,
                device=torch.device("cpu"),
                seed=0,
                dist=ctx,
            )
            if rank == 0:
                out = {"embeddings": emb, "labels": labels, "metrics": metrics}
                torch.save({**out, "metric_names": names}, task["out"])
            else:
                assert metrics == {}  # metrics are computed once, on rank 0
        elif kind == "errors":
            cases = {"different_configs": [[*RUN, "seed=0"], [*RUN, "seed=1"]]}  # per rank
            messages = {}
            for name, per_rank in cases.items():
                cfg = load_config(PRESET, per_rank[rank])
                try:
                    train(cfg, Path(task["scratch"]) / name)
                except DistributedSetupError as exc:
                    messages[name] = str(exc)
            if rank == 0:
                Path(task["out"]).write_text(json.dumps(messages))
        else:  # pragma: no cover
            raise ValueError(kind)


if __name__ == "__main__":
    _worker(sys.argv[1])
