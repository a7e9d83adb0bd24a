"""Speed machinery: a sync-free training step, lagged progress reads, compile with fallback.

The step's claim (no host read of a device value) is checked on the CPU by instrumenting
every ATen call of the trainer's step; on a GPU, by CUDA's own sync detector
(``torch.cuda.set_sync_debug_mode("error")``, run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nirdml.training.compiled import CompiledOrEager
from nirdml.training.config import load_config
from nirdml.training.distributed import DistContext
from nirdml.training.step import HostReader
from nirdml.training.trainer import _Run, train

FAST = ["epochs=2", "eval.every=2", "log.progress=false"]


@pytest.fixture
def one_thread():
    """The digits runs' tiny ops gain nothing from threads; on a busy 2-core box two torch
    threads stall each other (a 6 s run took 100 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ATen ops that make the host wait for the device when their input lives on one.
_SYNC_OPS = (
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "aten.is_nonzero",
    "aten.nonzero",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.masked_select",
    "aten.repeat_interleave.Tensor",
    "aten.equal",
)


class _HostReads(TorchDispatchMode):
    """Records sync-forcing ops on "device" data, i.e. anything not derived only from the
    tensors declared as host data (the labels, which the loader yields on the CPU)."""

    def __init__(self, host_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.keep = list(host_tensors)  # held, so their ids stay unique
        self.host = {id(t) for t in host_tensors}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_host = bool(tensors) and all(id(t) in self.host for t in tensors)
        name = str(func)
        if not on_host and name.startswith(_SYNC_OPS):
            self.reads.append(name)
        out = func(*args, **kwargs)
        if on_host:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.keep.append(t)
                    self.host.add(id(t))
        return out


def test_training_step_reads_nothing_from_the_device(tmp_path, monkeypatch, one_thread):
    """Steps of a real run (model, loss, NIR flow, guarded fused Adam), in the warmup epoch
    (backbone under no_grad) and after it, under the instrumentation: no host read of device
    data (the labels' checks run on the CPU, where they cost no sync)."""
    real_step = _Run._train_step
    reads: list[str] = []
    seen: list[bool] = []

    def instrumented(self, images, labels, backbone_grad, autocast):
        assert labels.device.type == "cpu"
        if seen.count(backbone_grad) >= 3:  # three steps of each kind: instrumentation is slow
            return real_step(self, images, labels, backbone_grad, autocast)
        seen.append(backbone_grad)
        mode = _HostReads([labels])
        with mode:
            out = real_step(self, images, labels, backbone_grad, autocast)
        reads.extend(mode.reads)
        return out

    monkeypatch.setattr(_Run, "_train_step", instrumented)
    cfg = load_config("digits-nir", [*FAST, "optim.warmup_epochs=1"])
    assert cfg.optim.name == "adam"
    train(cfg, tmp_path / "run")
    assert sorted(seen) == [False] * 3 + [True] * 3
    assert reads == [], f"host reads of device values inside the step: {sorted(set(reads))}"


def test_the_instrumentation_catches_host_reads():
    x = torch.randn(4, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0])
    mode = _HostReads([labels])
    with mode:
        _ = bool((labels > 0).any())  # host data: allowed
        torch.unique(labels)
        _ = (x * 2).sum().item()  # device data: a sync on an accelerator
        torch.unique(x.detach())
    assert mode.reads == ["aten._local_scalar_dense.default", "aten._unique2.default"]


def test_host_reader_returns_each_read_one_interval_late():
    reader = HostReader(torch.device("cpu"))
    value = torch.tensor(1.5)
    assert reader.submit({"loss": value}, steps=10) is None
    value += 1.0  # the submitted value was copied
    assert reader.submit({"loss": value}, steps=20) == {"loss": 1.5, "steps": 10}
    assert reader.flush() == {"loss": 2.5, "steps": 20}
    assert reader.flush() is None


def test_compiled_or_eager_falls_back_with_a_warning(monkeypatch):
    calls = []

    def broken_compile(fn, **options):
        def compiled(*args, **kwargs):
            calls.append("compiled")
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = CompiledOrEager(lambda x: x * 2, "the test function")
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler.*running it eagerly"):
        assert wrapped(torch.tensor(3.0)).item() == 6.0
    assert not wrapped.compiled
    assert wrapped(torch.tensor(4.0)).item() == 8.0
    assert calls == ["compiled"]  # not retried

    # Bad inputs fail eagerly too: that error propagates, no fallback, no warning.
    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = CompiledOrEager(lambda x: x @ x, "the test function")
    with pytest.raises(RuntimeError, match="both arguments to matmul need to be at least 1D"):
        wrapped(torch.tensor(3.0))

    def unsupported(fn, **options):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.warns(RuntimeWarning, match="not supported on this platform"):
        wrapped = CompiledOrEager(lambda x: x + 1, "the test function")
    assert wrapped(torch.tensor(1.0)).item() == 2.0


def test_compile_flag_compiles_the_model_and_changes_no_number(tmp_path, monkeypatch, one_thread):
    """compile=true: the embedding network runs through torch.compile (Dynamo graph capture;
    the "eager" backend keeps the test fast and bit-exact), the steps give the same numbers
    as eager ones, and the checkpointed state_dict keys are unchanged."""
    compiled_fns = []
    real_compile = torch.compile

    def dynamo_only(fn, **options):
        compiled_fns.append(fn)
        return real_compile(fn, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", dynamo_only)
    torch._dynamo.reset()
    base = ["epochs=2", "optim.warmup_epochs=0", "log.progress=false"]
    runs = {}
    for flag in ("false", "true"):
        cfg = load_config("digits-nir", [*base, f"compile={flag}"])
        run = _Run(cfg, tmp_path / flag, None, DistContext.from_env(), progress=False)
        images, labels = next(iter(run.loader))
        stats = [run._train_step(images, labels, True, contextlib.nullcontext()) for _ in range(3)]
        runs[flag] = (run, stats)
    torch._dynamo.reset()
    assert [f.__name__ for f in compiled_fns] == ["features"]
    assert isinstance(runs["true"][0].model.features, CompiledOrEager)
    assert runs["true"][0].model.features.compiled
    for a, b in zip(runs["false"][1], runs["true"][1], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert list(runs["true"][0].model.state_dict()) == list(runs["false"][0].model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_step_is_sync_free(tmp_path, monkeypatch, amp):
    """CUDA's sync detector around every step after the first two (lazy initialisation):
    AMP autocast, channels_last, NIR loss, GuardedStep with fused Adam (and GradScaler for
    fp16) never make the host wait."""
    real_step = _Run._train_step
    count = []

    def detected(self, *args):
        count.append(1)
        if len(count) <= 2:
            return real_step(self, *args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(_Run, "_train_step", detected)
    cfg = load_config(
        "digits-nir", [*FAST, "device=cuda", f"amp={amp}", "model.channels_last=true"]
    )
    result = train(cfg, tmp_path / "run")
    assert len(count) > 10
    assert result.summary["skipped_steps"] == 0 or amp == "fp16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_host_reader_does_not_wait():
    reader = HostReader(torch.device("cuda"))
    x = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert reader.submit({"x": x * 2}, steps=1) is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reader.submit({"x": x * 3}, steps=2) == {"x": 2.0, "steps": 1}
    assert reader.flush() == {"x": 3.0, "steps": 2}
