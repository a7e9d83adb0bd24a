"""Retrieval metrics: equal to pytorch-metric-learning's AccuracyCalculator and to a slow,
obviously-correct Python reference written here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nirdml.evaluation import evaluate

pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
pml_inf = pytest.importorskip("pytorch_metric_learning.utils.inference")


# ----------------------------------------------------------------------------- data
def random_data(n: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian vectors with random labels, plus three singleton classes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    y = rng.integers(0, n_classes, size=n)
    y[:3] = n_classes + np.arange(3)  # classes of size 1
    return x, y


def clustered_data(n_classes: int, per_class: int, dim: int, seed: int, noise: float = 0.7):
    """Class centres on the sphere plus noise, uneven class sizes, a few singletons,
    and exact duplicate vectors within classes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 2 * per_class, size=n_classes)
    sizes[:4] = 1
    y = np.repeat(np.arange(n_classes), sizes)
    c = rng.standard_normal((n_classes, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[y] + noise * rng.standard_normal((len(y), dim)) / np.sqrt(dim)
    # exact duplicates (same class): 15 rows copied onto others of their class
    for i in rng.choice(np.where(sizes[y] >= 3)[0], size=15, replace=False):
        same = np.where(y == y[i])[0]
        x[same[same != i][0]] = x[i]
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def with_cross_class_duplicates(x: np.ndarray, y: np.ndarray, seed: int):
    """Copy some vectors onto items of *other* classes: ties between different labels."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    src = rng.choice(len(x), size=12, replace=False)
    for i in src:
        other = np.where(y != y[i])[0]
        x[rng.choice(other)] = x[i]
    return x


def min_relevant_gap(x: np.ndarray, y: np.ndarray) -> float:
    """Smallest relative gap between the (float64) distances of two neighbours that are
    adjacent within the first R + 1 of some query's ranking and differ in relevance.
    Only such pairs can change recall@1 / r_precision / map@r when float32 rounding swaps
    them, so a large value is the precondition for comparing two float32 implementations
    exactly."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1)[:, :-1]
    ds = np.take_along_axis(d, order, 1)
    rel = y[order] == y[:, None]
    r = rel.sum(1)
    window = np.arange(ds.shape[1] - 1)[None, :] < np.maximum(r, 1)[:, None]
    differ = (rel[:, 1:] != rel[:, :-1]) & window
    gaps = np.diff(ds, axis=1)[differ]
    return float(gaps.min() / d[np.isfinite(d)].max())


# ------------------------------------------------------------------------ reference
def reference_rankings(q: np.ndarray, g: np.ndarray, self_mode: bool) -> list[np.ndarray]:
    """Per query, gallery indices sorted by (float64 distance, index), self removed."""
    out = []
    for i in range(len(q)):
        d = ((g - q[i]) ** 2).sum(1)
        idx = np.arange(len(g))
        if self_mode:
            keep = idx != i
            d, idx = d[keep], idx[keep]
        out.append(idx[np.lexsort((idx, d))])
    return out


def reference_metrics(q, qy, g, gy, self_mode, ks, ms):
    """Slow loop over queries with the textbook definitions."""
    ranks = reference_rankings(q, g, self_mode)
    rec = {k: [] for k in ks}
    rp, mapr = [], []
    mp = {m: [] for m in ms}
    mpa = {m: [] for m in ms}
    for i, order in enumerate(ranks):
        rel = gy[order] == qy[i]
        r = int(rel.sum())
        # authors: divide by class size including the query; singletons count 0
        for m in ms:
            hits, s = 0, 0.0
            for j in range(min(m, len(order))):
                if rel[j]:
                    hits += 1
                    s += hits / (j + 1)
            if self_mode:
                mpa[m].append(s / (r + 1))
            if r > 0:
                mp[m].append(s / min(m, r))
        if r == 0:
            continue
        for k in ks:
            rec[k].append(float(rel[:k].any()))
        rp.append(rel[:r].sum() / r)
        hits, s = 0, 0.0
        for j in range(r):
            if rel[j]:
                hits += 1
                s += hits / (j + 1)
        mapr.append(s / r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in rec.items()}
    out["r_precision"] = float(np.mean(rp))
    out["map@r"] = float(np.mean(mapr))
    for m in ms:
        out[f"map@{m}"] = float(np.mean(mp[m]))
        if self_mode:
            out[f"map@{m}_authors"] = float(np.mean(mpa[m]))
    return out


KS = (1, 2, 4, 8, 16)
MS = (5, 50, 1000)
NAMES = [f"recall@{k}" for k in KS] + ["r_precision", "map@r"]
NAMES += [f"map@{m}" for m in MS] + [f"map@{m}_authors" for m in MS]


def _quiet_evaluate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(*args, **kwargs)


@pytest.mark.parametrize(
    "data",
    [
        random_data(300, 8, 40, seed=1),
        clustered_data(45, 6, 16, seed=2),
        (
            with_cross_class_duplicates(*clustered_data(45, 6, 16, seed=3), seed=4),
            clustered_data(45, 6, 16, seed=3)[1],
        ),
    ],
    ids=["random", "clustered+dups", "cross-class-dups"],
)
def test_self_retrieval_matches_slow_reference(data):
    x, y = data
    ref = reference_metrics(x, y, x, y, True, KS, MS)
    # float64 in: our ranking is exact, so equality is to rounding of the means
    ours = _quiet_evaluate(x, y, NAMES, device="cpu")
    for name in NAMES:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
    # chunked to a few rows / gallery blocks: the same numbers
    tiny = _quiet_evaluate(x, y, NAMES, device="cpu", memory_budget_mb=0.02)
    assert tiny == ours


def test_query_gallery_matches_slow_reference():
    xq, yq = random_data(120, 8, 15, seed=5)
    xg, yg = random_data(260, 8, 15, seed=6)
    yq[:3] = 99  # queries whose class is absent from the gallery
    ref = reference_metrics(xq, yq, xg, yg, False, KS, MS)
    names = [n for n in NAMES if not n.endswith("_authors")]
    ours = _quiet_evaluate(xg, yg, names, query_embeddings=xq, query_labels=yq, device="cpu")
    for name in names:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name


def _pml(x, y, ref=None, ref_y=None, seed=0):
    calc = pml_acc.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI", "AMI"),
        k=None,
        device=torch.device("cpu"),
        kmeans_func=pml_inf.FaissKMeans(niter=20, seed=seed),
    )
    args = {} if ref is None else {"reference": ref, "reference_labels": ref_y}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calc.get_accuracy(torch.as_tensor(x), torch.as_tensor(y), **args)


@pytest.mark.parametrize(
    "data",
    [random_data(400, 16, 50, seed=11), clustered_data(70, 6, 32, seed=12)],
    ids=["random", "clustered+dups+singletons"],
)
def test_equals_pytorch_metric_learning(data):
    x, y = data
    x = x.astype(np.float32)
    assert min_relevant_gap(x.astype(np.float64), y) > 1e-6  # no float32 near-ties
    pml = _pml(x, y)
    ours = _quiet_evaluate(
        x, y, ["recall@1", "r_precision", "map@r", "nmi", "ami"], device="cpu", backend="faiss"
    )
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=1e-6)
    assert ours["ami"] == pytest.approx(pml["AMI"], abs=1e-6)
    # the default (torch kNN) backend gives the same retrieval numbers
    torch_r = _quiet_evaluate(x, y, ["recall@1", "r_precision", "map@r"], device="cpu")
    for k in torch_r:
        assert torch_r[k] == pytest.approx(ours[k], abs=1e-12)


def test_query_gallery_equals_pytorch_metric_learning():
    xq, yq = random_data(150, 16, 20, seed=21)
    xg, yg = random_data(350, 16, 20, seed=22)
    xq, xg = xq.astype(np.float32), xg.astype(np.float32)
    pml = _pml(xq, yq, xg, yg)
    ours = _quiet_evaluate(
        xg,
        yg,
        ["recall@1", "r_precision", "map@r"],
        query_embeddings=xq,
        query_labels=yq,
        device="cpu",
    )
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_singletons_warn_and_count_zero_for_authors_map():
    x, y = random_data(100, 4, 10, seed=31)  # three singleton classes
    with pytest.warns(UserWarning, match="3 of 100 queries have no same-class item"):
        r = evaluate(x, y, ["recall@1", "map@1000", "map@1000_authors"], device="cpu")
    ref = reference_metrics(x, y, x, y, True, (1,), (1000,))
    assert r["map@1000_authors"] == pytest.approx(ref["map@1000_authors"], abs=1e-12)
    assert r["map@1000"] == pytest.approx(ref["map@1000"], abs=1e-12)


def test_perfect_ranking_values():
    # two tight, far-apart clusters: every metric but the authors' mAP reaches 1
    x = np.concatenate([np.zeros((5, 3)), np.full((4, 3), 10.0)])
    x += np.random.default_rng(0).normal(scale=1e-3, size=x.shape)
    y = np.array([0] * 5 + [1] * 4)
    r = evaluate(x, y, ["recall@1", "map@r", "r_precision", "map@1000", "map@1000_authors"])
    assert r["recall@1"] == r["map@r"] == r["r_precision"] == r["map@1000"] == 1.0
    # authors: R / (R + 1) per query -> (5 * 4/5 + 4 * 3/4) / 9
    assert r["map@1000_authors"] == pytest.approx((5 * 4 / 5 + 4 * 3 / 4) / 9)


def test_omniglot_raw_pixels_equal_pml(omniglot_dir):
    """Real data: 250 Omniglot evaluation characters x 20 drawers, 28x28 raw pixels."""
    d = np.load(omniglot_dir / "images_evaluation.npz")
    imgs = torch.from_numpy(~d["images"][:250]).float().reshape(-1, 1, 105, 105)
    x = torch.nn.functional.interpolate(imgs, size=(28, 28), mode="area").reshape(len(imgs), -1)
    x = torch.nn.functional.normalize(x, dim=1).numpy()
    y = np.repeat(np.arange(250), 20)
    ours = evaluate(x, y, ["recall@1", "r_precision", "map@r", "nmi"], device="cpu")
    pml = _pml(x, y)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=1e-6)
    assert 0.2 < ours["recall@1"] < 0.6
