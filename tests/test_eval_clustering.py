"""NMI / AMI / pairwise F1 against scikit-learn, and the two k-means backends."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

from nirdml.evaluation import ami, faiss_available, kmeans, nmi, pairwise_f1


def labelings():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 30, 500)
    yield "random", y, rng.integers(0, 25, 500)
    yield "correlated", y, np.where(rng.random(500) < 0.7, y, rng.integers(0, 40, 500))
    yield "identical", y, y + 100
    yield "one_cluster", y, np.zeros(500, int)
    yield "both_one", np.zeros(50, int), np.zeros(50, int)
    yield "all_singletons", np.arange(60), rng.integers(0, 5, 60)
    sizes = rng.integers(2, 12, 800)  # SOP-like: many small classes
    ys = np.repeat(np.arange(800), sizes)
    yield "sop_like", ys, np.where(rng.random(len(ys)) < 0.8, ys, rng.integers(0, 800, len(ys)))


CASES = list(labelings())


@pytest.mark.parametrize("name,y,c", CASES, ids=[c[0] for c in CASES])
def test_nmi_ami_equal_sklearn(name, y, c):
    assert nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c), abs=1e-10)
    assert ami(y, c) == pytest.approx(adjusted_mutual_info_score(y, c), abs=1e-10)


def _f1_from_sklearn(y, c):
    # pair_confusion_matrix counts ordered pairs: [[TN, FP], [FN, TP]]
    (_, fp), (fn, tp) = pair_confusion_matrix(y, c)
    return 2 * tp / (2 * tp + fp + fn)


def _f1_authors_loop(y, c):
    """Literal transcription of the authors' counting (classes x clusters loops)."""
    from scipy.special import comb

    tp_fp = sum(comb(np.sum(y == k), 2) for k in np.unique(y))
    tp = sum(comb(np.sum((y == k) & (c == j)), 2) for k in np.unique(y) for j in np.unique(c))
    count = sum(comb(np.sum(c == j), 2) for j in np.unique(c))
    p, r = tp / tp_fp, tp / count
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("name,y,c", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_pairwise_f1_equals_sklearn_pairs_and_authors_counting(name, y, c):
    assert pairwise_f1(y, c) == pytest.approx(_f1_from_sklearn(y, c), abs=1e-12)
    assert pairwise_f1(y, c) == pytest.approx(_f1_authors_loop(y, c), abs=1e-12)


def test_pairwise_f1_edge_cases():
    assert pairwise_f1([0, 1, 2], [0, 1, 2]) != pairwise_f1([0, 1, 2], [0, 1, 2])  # NaN
    assert pairwise_f1([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
    assert pairwise_f1([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0


def blobs(n_per=30, k=12, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)) * 6
    y = np.repeat(np.arange(k), n_per)
    return centres[y] + rng.standard_normal((len(y), dim)), y


def reference_lloyd(x, k, niter, seed):
    """Plain Lloyd (full assignment each iteration) with the torch backend's init and
    empty-cluster rule, in float64 numpy."""
    import torch

    init = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k].numpy()
    c = x[init].copy()

    def assign(c):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        return d.argmin(1), d.min(1)

    a, dist = assign(c)
    for _ in range(niter):
        counts = np.bincount(a, minlength=k)
        new = c.copy()
        for j in range(k):
            if counts[j]:
                new[j] = x[a == j].mean(0)
        empty = np.where(counts == 0)[0]
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            new[empty] = x[far]
        c = new
        a2, dist = assign(c)
        if (a2 == a).all():
            break
        a = a2
    return a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_kmeans_equals_plain_lloyd(seed):
    # many clusters relative to points: empty clusters and many iterations happen
    x, _ = blobs(n_per=12, k=10, dim=5, seed=seed)
    ours = kmeans(x, 40, niter=20, seed=seed, backend="torch", device="cpu")
    ref = reference_lloyd(x, 40, 20, seed)
    np.testing.assert_array_equal(ours, ref)


def test_torch_kmeans_seeded_and_recovers_blobs():
    x, y = blobs()
    a = kmeans(x, 12, seed=3, backend="torch", device="cpu")
    b = kmeans(x, 12, seed=3, backend="torch", device="cpu")
    np.testing.assert_array_equal(a, b)
    assert nmi(y, a) > 0.9
    # chunked assignment (tiny budget) gives the same clustering
    c = kmeans(x, 12, seed=3, backend="torch", device="cpu", memory_budget_mb=0.001)
    np.testing.assert_array_equal(a, c)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_kmeans_equals_pml_faiss_kmeans():
    pml_inf = pytest.importorskip("pytorch_metric_learning.utils.inference")
    import torch

    x, y = blobs(n_per=20, k=15, dim=16, seed=4)
    x = x.astype(np.float32)
    ours = kmeans(x, 15, seed=7, backend="faiss")
    theirs = pml_inf.FaissKMeans(niter=20, seed=7)(torch.from_numpy(x), 15).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_kmeans_bad_input():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="unknown k-means backend"):
        kmeans(x, 2, backend="sklearn")
    with pytest.raises(ValueError, match="clusters has 2 entries but 3 are expected"):
        nmi([0, 1, 2], [0, 1])


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("seed", [0, 3])
def test_faiss_kmeans_early_stop_equals_one_full_faiss_run(seed):
    """Our faiss driver runs one iteration per call and stops at a fixed point; it must
    equal a single 20-iteration faiss run, also when empty clusters get split."""
    import faiss

    rng = np.random.default_rng(seed)
    # many identical points: duplicate initial centroids, empty clusters, splits
    x = (rng.integers(0, 4, (400, 3)) + 0.01 * rng.integers(0, 3, (400, 3))).astype(np.float32)
    clus = faiss.Clustering(3, 60)
    clus.niter, clus.seed = 20, seed
    clus.min_points_per_centroid, clus.max_points_per_centroid = 1, 2**31 - 1
    index = faiss.IndexFlatL2(3)
    clus.train(x, index)
    stats = clus.iteration_stats
    assert sum(stats.at(i).nsplit for i in range(stats.size())) > 0  # splits happened
    _, ref = index.search(x, 1)
    np.testing.assert_array_equal(kmeans(x, 60, seed=seed, backend="faiss"), ref[:, 0])
