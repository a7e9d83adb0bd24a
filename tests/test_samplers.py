"""ClassBalancedBatchSampler: composition, both sampling schemes, determinism, DDP shards."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nirdml.data import ClassBalancedBatchSampler, SamplerConfigError


def labels_of(sizes: list[int], seed: int = 0) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(y)  # items of a class are scattered


def groups(batch: list[int], y: np.ndarray, m: int) -> list[int]:
    """Class of each consecutive group of m items; asserts each group is one class."""
    out = []
    for g in range(0, len(batch), m):
        cls = set(y[batch[g : g + m]].tolist())
        assert len(cls) == 1, f"group {batch[g : g + m]} mixes classes {cls}"
        out.append(cls.pop())
    return out


@pytest.mark.parametrize("replacement", [True, False])
def test_batch_composition_and_epoch_length(replacement: bool) -> None:
    y = labels_of([7, 3, 5, 9, 4, 6, 8, 2, 5, 11])
    s = ClassBalancedBatchSampler(y, 12, 2, replacement=replacement, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == len(y) // 12
    for b in batches:
        assert len(b) == 12 and all(0 <= i < len(y) for i in b)
        cls = groups(b, y, 2)
        assert len(cls) == 6
        if not replacement:
            assert len(set(cls)) == 6  # each class at most once per batch


def test_authors_sampler_draws_classes_uniformly_with_replacement() -> None:
    # Class 0 is huge, the others tiny: classes (not images) are drawn uniformly.
    y = labels_of([400] + [2] * 9)
    s = ClassBalancedBatchSampler(y, 20, 2, replacement=True, seed=0)
    counts = np.zeros(10)
    repeated_class = repeated_image = 0
    for epoch in range(20):
        s.set_epoch(epoch)
        for b in s:
            cls = groups(b, y, 2)
            counts += np.bincount(cls, minlength=10)
            repeated_class += len(set(cls)) < len(cls)
            repeated_image += any(b[g] == b[g + 1] for g in range(0, 20, 2))
    freq = counts / counts.sum()
    assert np.allclose(freq, 0.1, atol=0.02), freq
    assert repeated_class > 0 and repeated_image > 0  # with replacement at both levels


def test_m_per_class_cycles_each_class() -> None:
    y = labels_of([5, 3, 4, 6, 7, 5])
    s = ClassBalancedBatchSampler(y, 6, 2, replacement=False, seed=1)
    seq: dict[int, list[int]] = {}
    for epoch in range(6):
        s.set_epoch(epoch)
        for b in s:
            for g in range(0, 6, 2):
                seq.setdefault(int(y[b[g]]), []).extend(b[g : g + 2])
    # (The cycle is continuous within an epoch; check the first full pass of each class.)
    s.set_epoch(0)
    first: dict[int, list[int]] = {}
    for b in s:
        for g in range(0, 6, 2):
            first.setdefault(int(y[b[g]]), []).extend(b[g : g + 2])
    for c, picks in first.items():
        n = int((y == c).sum())
        whole = len(picks) // n * n
        for k in range(0, whole, n):
            assert sorted(picks[k : k + n]) == sorted(np.flatnonzero(y == c).tolist())
    assert set(seq) == set(range(6))


def test_deterministic_by_seed_and_epoch_without_global_rng() -> None:
    y = labels_of([6] * 12)
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    a = list(ClassBalancedBatchSampler(y, 8, 2, seed=11))
    b = list(ClassBalancedBatchSampler(y, 8, 2, seed=11))
    c = list(ClassBalancedBatchSampler(y, 8, 2, seed=12))
    s = ClassBalancedBatchSampler(y, 8, 2, seed=11)
    s.set_epoch(1)
    d = list(s)
    assert a == b and a != c and a != d
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert random.getstate() == py_state
    for replacement in (True, False):  # global RNG state does not matter either
        torch.manual_seed(0)
        e = list(ClassBalancedBatchSampler(y, 8, 2, seed=11, replacement=replacement))
        torch.manual_seed(1)
        f = list(ClassBalancedBatchSampler(y, 8, 2, seed=11, replacement=replacement))
        assert e == f


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_are_slices_of_the_global_batch(world: int, replacement: bool) -> None:
    y = labels_of([9, 8, 7, 10, 6, 9, 8, 7, 12, 11, 5, 9])
    batch = 12
    single = ClassBalancedBatchSampler(y, batch, 2, replacement=replacement, seed=4)
    ranks = [
        ClassBalancedBatchSampler(
            y, batch, 2, replacement=replacement, seed=4, num_replicas=world, rank=r
        )
        for r in range(world)
    ]
    for epoch in (0, 5):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        glob = list(single)
        shards = [list(r) for r in ranks]
        assert all(len(sh) == len(glob) == len(r) for sh, r in zip(shards, ranks, strict=True))
        for k, g in enumerate(glob):
            parts = [sh[k] for sh in shards]
            assert sum(parts, []) == g  # contiguous slices, in rank order
            for p in parts:
                assert len(p) == batch // world
                groups(p, y, 2)  # whole class groups on each rank
        # Every rank sees different batches.
        assert all(shards[0][k] != shards[1][k] for k in range(len(glob)))


def test_state_dict_resume_mid_epoch() -> None:
    y = labels_of([5] * 20)
    s = ClassBalancedBatchSampler(y, 10, 2, seed=7)
    s.set_epoch(3)
    full = list(s)
    it = iter(s)
    consumed = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state == {
        "seed": 7,
        "epoch": 3,
        "position": 4,
        "num_replicas": 1,
        "batch_size": 10,
        "samples_per_class": 2,
        "replacement": 1,
    }
    assert s.state_dict(batches_consumed=2)["position"] == 2
    resumed = ClassBalancedBatchSampler(y, 10, 2, seed=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert consumed + rest == full
    assert list(resumed) == full  # the next pass is the whole epoch again
    again = ClassBalancedBatchSampler(y, 10, 2)
    again.load_state_dict(state)
    again.set_epoch(3)  # a loop that calls set_epoch at the start of the resumed epoch
    assert list(again) == rest
    with pytest.raises(SamplerConfigError, match="num_replicas=1.*same num_replicas"):
        ClassBalancedBatchSampler(y, 10, 2, num_replicas=5, rank=0).load_state_dict(state)
    with pytest.raises(SamplerConfigError, match="batch_size=10"):
        ClassBalancedBatchSampler(y, 20, 2).load_state_dict(state)


def test_with_dataloader() -> None:
    y = labels_of([4] * 10)
    ds = TensorDataset(torch.arange(len(y)), torch.from_numpy(y))
    s = ClassBalancedBatchSampler(torch.from_numpy(y), 8, 4, seed=0)
    out = list(DataLoader(ds, batch_sampler=s))
    assert len(out) == 5
    for idx, lab in out:
        assert lab.shape == (8,) and torch.equal(lab, torch.from_numpy(y)[idx])
        assert len(set(lab[:4].tolist())) == 1 and len(set(lab[4:].tolist())) == 1


def test_bad_settings_are_clear_errors() -> None:
    y = labels_of([4] * 10)
    with pytest.raises(SamplerConfigError, match="divisible by num_replicas x samples_per_class"):
        ClassBalancedBatchSampler(y, 9, 2)
    with pytest.raises(SamplerConfigError, match=r"= 2 x 2 = 4.*batch_size=8"):
        ClassBalancedBatchSampler(y, 6, 2, num_replicas=2, rank=0)
    with pytest.raises(SamplerConfigError, match="rank 2 is not valid"):
        ClassBalancedBatchSampler(y, 8, 2, num_replicas=2, rank=2)
    with pytest.raises(SamplerConfigError, match="distinct classes per batch"):
        ClassBalancedBatchSampler(labels_of([10, 10]), 8, 2, replacement=False)
    with pytest.raises(SamplerConfigError, match="no full batch"):
        ClassBalancedBatchSampler(labels_of([3, 3]), 8, 2)
    with pytest.raises(SamplerConfigError, match="1-D integer"):
        ClassBalancedBatchSampler(np.zeros(10), 4, 2)


def test_small_classes_skip_or_error() -> None:
    y = labels_of([5, 1, 5, 2, 5])
    with pytest.warns(UserWarning, match="fewer than samples_per_class=2"):
        s = ClassBalancedBatchSampler(y, 4, 2)
    assert s.skipped_classes == [1]
    for epoch in range(10):
        s.set_epoch(epoch)
        for b in s:
            assert 1 not in y[b]
    with pytest.raises(SamplerConfigError, match=r"labels \[1, 3\].*lower samples_per_class"):
        ClassBalancedBatchSampler(y, 6, 3, small_classes="error")


def _ddp_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    import datetime
    import json

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=5),  # a loaded 2-core CI machine is slow to connect
    )
    try:
        y = labels_of([6, 5, 7, 8, 6, 9, 5, 6])
        s = ClassBalancedBatchSampler(y, 8, 2, seed=9)  # rank/world from torch.distributed
        s.set_epoch(2)
        batches = list(s)
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"world": s.num_replicas, "rank": s.rank, "batches": batches})
        )
    finally:
        dist.destroy_process_group()


def test_real_torch_distributed_ranks(tmp_path: Path) -> None:
    import json

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free loopback port for the TCP rendezvous (as torchrun)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(g["world"], g["rank"]) for g in got] == [(2, 0), (2, 1)]
    ref = ClassBalancedBatchSampler(labels_of([6, 5, 7, 8, 6, 9, 5, 6]), 8, 2, seed=9)
    ref.set_epoch(2)
    for k, g in enumerate(ref):
        assert got[0]["batches"][k] + got[1]["batches"][k] == g
