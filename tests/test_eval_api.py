"""evaluate(): names, defaults, modes, errors; compute_embeddings()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nirdml.evaluation import (
    DEFAULT_METRICS,
    compute_embeddings,
    evaluate,
    nmi,
    pi_ratio,
    rho_spectrum,
    uniformity_g2,
)


def test_metric_table_is_torch_free_and_every_entry_loads():
    """Config validation reads the table: importing it must not import torch; each entry's
    "module:function" names a real function."""
    code = (
        "import sys; from nirdml.evaluation.registry import METRICS, parse_metric\n"
        "parse_metric('map@r@100'); print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"
    from nirdml.evaluation import METRICS

    assert all(callable(m.load()) for m in METRICS.values())


def small(seed=0, n=240, dim=10, n_classes=12):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n // n_classes)
    c = rng.standard_normal((n_classes, dim)) * 3
    return (c[y] + rng.standard_normal((n, dim))).astype(np.float32), y


def test_default_metrics_per_dataset():
    assert DEFAULT_METRICS["cub200"][:4] == ("recall@1", "recall@2", "recall@4", "recall@8")
    assert DEFAULT_METRICS["cars196"] == DEFAULT_METRICS["cub200"]
    assert DEFAULT_METRICS["sop"][:4] == ("recall@1", "recall@10", "recall@100", "recall@1000")
    for name in ("omniglot", "digits", "folder", "csv"):
        assert name in DEFAULT_METRICS
    x, y = small()
    r = evaluate(x, y, device="cpu")
    assert list(r) == list(DEFAULT_METRICS["cub200"])
    assert all(isinstance(v, float) for v in r.values())
    r = evaluate(x, y, DEFAULT_METRICS["sop"], device="cpu")
    assert r["recall@1000"] == 1.0  # 239 others: every class is inside the list


def test_all_metrics_and_order_follow_the_request():
    x, y = small()
    names = [
        "uniformity_g2",
        "recall@3",
        "f1",
        "map@r",
        "ami",
        "rho_spectrum",
        "pi_ratio",
        "map@20_authors",
        "map@20",
        "r_precision",
        "nmi",
    ]
    r = evaluate(x, y, names, device="cpu", backend="torch")
    assert list(r) == names
    assert r["rho_spectrum"] == pytest.approx(rho_spectrum(x))
    assert r["pi_ratio"] == pytest.approx(pi_ratio(x, y))
    assert r["uniformity_g2"] == pytest.approx(uniformity_g2(x))
    assert 0.9 < r["nmi"] <= 1.0 and 0.9 < r["recall@3"] <= 1.0
    # names are case/space tolerant and de-duplicated
    assert list(evaluate(x, y, [" Recall@1", "recall@1"], device="cpu")) == ["recall@1"]


def test_num_clusters_and_seed():
    x, y = small()
    a = evaluate(x, y, ["nmi"], num_clusters=5, seed=1, backend="torch", device="cpu")
    b = evaluate(x, y, ["nmi"], num_clusters=5, seed=1, backend="torch", device="cpu")
    assert a == b
    from nirdml.evaluation import kmeans

    assign = kmeans(x, 5, seed=1, backend="torch", device="cpu")
    assert a["nmi"] == pytest.approx(nmi(y, assign))


def test_query_gallery_mode_and_defaults():
    x, y = small()
    r = evaluate(x[::2], y[::2], query_embeddings=x[1::2], query_labels=y[1::2], device="cpu")
    assert not any(k.endswith("_authors") for k in r)
    with pytest.raises(ValueError, match="only exists when every query is also a gallery item"):
        evaluate(x, y, ["map@1000_authors"], query_embeddings=x, query_labels=y)
    with pytest.raises(ValueError, match="pass both query_embeddings and query_labels"):
        evaluate(x, y, query_embeddings=x)
    with pytest.raises(ValueError, match="query_embeddings have dim 3"):
        evaluate(x, y, ["recall@1"], query_embeddings=x[:, :3], query_labels=y)


def test_bad_input_errors():
    x, y = small()
    with pytest.raises(ValueError, match="unknown metric .precison@1.. Did you mean .precision@5."):
        evaluate(x, y, ["precison@1"])
    with pytest.raises(ValueError, match="recall@0|unknown metric"):
        evaluate(x, y, ["recall@0"])
    with pytest.raises(ValueError, match="labels has 239 entries"):
        evaluate(x, y[:-1])
    with pytest.raises(ValueError, match="integer class ids"):
        evaluate(x, y + 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluate(np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="metrics is empty"):
        evaluate(x, y, [])
    with pytest.raises(ValueError, match="CUDA is not available"):
        if not torch.cuda.is_available():
            evaluate(x, y, ["recall@1"], device="cuda")
        else:
            raise ValueError("CUDA is not available")  # keep the test meaningful on GPU hosts


def test_accepts_tensors_lists_and_float_labels():
    x, y = small()
    a = evaluate(torch.from_numpy(x), torch.from_numpy(y), ["recall@1", "map@r"], device="cpu")
    b = evaluate(x.tolist(), y.astype(float), ["recall@1", "map@r"], device="cpu")
    assert a == b


def test_sklearn_digits_end_to_end():
    """Real data always available offline: 1,797 8x8 digits, raw pixels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    r = evaluate(d.data, d.target, ["recall@1", "map@r", "nmi"], distance="cosine", device="cpu")
    assert 0.95 < r["recall@1"] < 1.0
    assert 0.3 < r["map@r"] < 0.9
    assert 0.6 < r["nmi"] < 0.95


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return nn.functional.normalize(self.drop(self.lin(x)), dim=1)


def test_compute_embeddings_eval_mode_order_and_restore():
    torch.manual_seed(0)
    net = _Net().train()
    x = torch.randn(50, 6)
    y = torch.arange(50) % 7
    ds = TensorDataset(x, y)
    e1, l1 = compute_embeddings(net, ds, batch_size=8)
    assert net.training  # restored
    e2, l2 = compute_embeddings(net, DataLoader(ds, batch_size=13))
    torch.testing.assert_close(e1, e2)  # dropout off: deterministic, same order
    torch.testing.assert_close(e1, nn.functional.normalize(net.lin(x), dim=1).detach())
    assert l1.tolist() == y.tolist() and l2.dtype == torch.int64
    assert not e1.requires_grad and e1.dtype == torch.float32


def test_compute_embeddings_errors():
    net = _Net()
    with pytest.raises(ValueError, match="amp=True needs a CUDA device"):
        compute_embeddings(net, TensorDataset(torch.randn(4, 6), torch.zeros(4)), amp=True)
    with pytest.raises(ValueError, match=r"\(input, label\) pairs"):
        compute_embeddings(net, TensorDataset(torch.randn(4, 6)))
    with pytest.raises(ValueError, match="empty"):
        compute_embeddings(net, TensorDataset(torch.randn(0, 6), torch.zeros(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    x, y = small(n=600)
    names = [
        "recall@1",
        "recall@4",
        "map@r",
        "r_precision",
        "map@100",
        "map@100_authors",
        "rho_spectrum",
        "pi_ratio",
        "uniformity_g2",
        "mrr",
        "precision@4",
        "r_precision@3",
        "map@r@3",
        "map@100_hits",
    ]
    cpu = evaluate(x, y, names, device="cpu")
    gpu = evaluate(torch.from_numpy(x).cuda(), y, names, device="cuda")
    for name in names:
        assert gpu[name] == pytest.approx(cpu[name], abs=1e-6), name
    roles = {"is_query": np.arange(600) % 3 == 0, "is_gallery": np.arange(600) % 2 == 0}
    qg = names[:5] + names[-5:]
    cpu = evaluate(x, y, qg, device="cpu", average="classes", **roles)
    gpu = evaluate(x, y, qg, device="cuda", average="classes", **roles)
    for name in qg:
        assert gpu[name] == pytest.approx(cpu[name], abs=1e-6), name
    a = evaluate(x, y, ["nmi"], backend="torch", device="cuda", seed=2)
    b = evaluate(x, y, ["nmi"], backend="torch", device="cuda", seed=2)
    assert a == b  # seeded and reproducible on GPU too
