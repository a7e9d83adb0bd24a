"""Exact chunked kNN: brute-force equality, chunking invariance, ties, self-exclusion by
index, faiss agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nirdml.evaluation import faiss_available, knn_search


def brute_force(q: np.ndarray, g: np.ndarray, k: int, self_mode: bool):
    """float64 distances, (distance, index) order, own index removed."""
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if self_mode:
        np.fill_diagonal(d, np.inf)
    idx = np.tile(np.arange(g.shape[0]), (q.shape[0], 1))
    order = np.lexsort((idx, d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("k", [1, 7, 300])
@pytest.mark.parametrize("budget", [0.1, 512.0])
def test_self_knn_equals_brute_force_for_any_chunking(k, budget):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 12))
    d, i = knn_search(x, None, k, memory_budget_mb=budget, device="cpu")
    ref_d, ref_i = brute_force(x, x, k, True)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-10, atol=1e-10)


def test_large_k_sampled_threshold_path_is_exact():
    # gallery > 2 x 4096 columns and k > 256: the sampled-threshold selection
    rng = np.random.default_rng(1)
    g = rng.standard_normal((9000, 6)).astype(np.float32)
    q = rng.standard_normal((64, 6)).astype(np.float32)
    d, i = knn_search(q, g, 700, device="cpu")
    ref_d, ref_i = brute_force(q.astype(np.float64), g.astype(np.float64), 700, False)
    # float32 distances: compare the sets of the 690 first (boundary may swap near-ties)
    for row in range(len(q)):
        assert set(i[row, :690].tolist()) <= set(ref_i[row].tolist())
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-4, atol=1e-4)
    assert bool((d[:, 1:] >= d[:, :-1]).all())


def test_chunked_equals_unchunked_float32():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((900, 32)).astype(np.float32)
    big = knn_search(x, None, 50, memory_budget_mb=1024, device="cpu")
    small = knn_search(x, None, 50, memory_budget_mb=0.3, device="cpu")
    np.testing.assert_array_equal(big[1].numpy(), small[1].numpy())
    np.testing.assert_allclose(big[0].numpy(), small[0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [0.02, 512.0])
@pytest.mark.parametrize("k", [3, 400])
def test_ties_are_broken_by_gallery_index(budget, k):
    # every vector identical: all distances tie, so neighbours are 0, 1, 2, ... minus self
    x = np.ones((500, 4), dtype=np.float32)
    d, i = knn_search(x, None, k, memory_budget_mb=budget, device="cpu")
    for row in (0, 1, 250, 499):
        expected = [j for j in range(500) if j != row][:k]
        assert i[row].tolist() == expected
    assert float(d.abs().max()) == 0.0


def test_self_excluded_by_index_not_by_rank():
    # item 5 has an exact duplicate at index 2: 5's first neighbour is 2 (distance 0) and
    # 5 itself never appears, even though the duplicate ties with it
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 3))
    x[2] = x[5]
    _, i = knn_search(x, None, 19, device="cpu")
    assert i[5, 0].item() == 2 and i[2, 0].item() == 5
    for row in range(20):
        assert row not in i[row].tolist()
        assert sorted(i[row].tolist()) == [j for j in range(20) if j != row]


def test_query_gallery_mode_keeps_identical_items():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((50, 5))
    d, i = knn_search(g[:10], g, 3, device="cpu")
    assert i[:, 0].tolist() == list(range(10))
    assert float(d[:, 0].abs().max()) < 1e-12


def test_cosine_distance_normalises_first():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((80, 6))
    scaled = x * rng.uniform(0.1, 10, size=(80, 1))
    d1, i1 = knn_search(x / np.linalg.norm(x, axis=1, keepdims=True), None, 5, device="cpu")
    d2, i2 = knn_search(scaled, None, 5, distance="cosine", device="cpu")
    np.testing.assert_array_equal(i1.numpy(), i2.numpy())
    np.testing.assert_allclose(d1.numpy(), d2.numpy(), atol=1e-12)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("self_mode", [True, False])
def test_faiss_backend_agrees_with_torch(self_mode):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    q = None if self_mode else rng.standard_normal((100, 16)).astype(np.float32)
    args = (x, None) if self_mode else (q, x)
    dt, it = knn_search(*args, 40, backend="torch", device="cpu")
    df, i_f = knn_search(*args, 40, backend="faiss")
    # float32 rounding differs between the two GEMMs, so neighbours whose distances are
    # equal to ~1e-7 may swap; everything else is identical
    assert (it == i_f).float().mean().item() > 0.995
    qq = x if self_mode else q
    true = lambda i: ((qq[:, None, :].astype(np.float64) - x[i.numpy()]) ** 2).sum(-1)  # noqa: E731
    np.testing.assert_allclose(true(it), true(i_f), rtol=1e-5)
    np.testing.assert_allclose(dt.numpy(), df.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_backend_breaks_ties_by_index():
    x = np.ones((300, 4), dtype=np.float32)
    _, i = knn_search(x, None, 10, backend="faiss")
    assert i[7].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]


def test_bad_input_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="k=10 but only 9 gallery items"):
        knn_search(x, None, 10)
    with pytest.raises(ValueError, match="positive integer"):
        knn_search(x, None, 0)
    with pytest.raises(ValueError, match="2-D"):
        knn_search(np.zeros(5), None, 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        knn_search(np.full((4, 2), np.nan), None, 1)
    with pytest.raises(ValueError, match="dim 3 but the gallery has dim 4"):
        knn_search(x, np.zeros((5, 4)), 1)
    with pytest.raises(ValueError, match="unknown distance"):
        knn_search(x, None, 1, distance="manhattan")
    with pytest.raises(ValueError, match="unknown kNN backend"):
        knn_search(x, None, 1, backend="annoy")
    with pytest.raises(ValueError, match="memory_budget_mb must be positive"):
        knn_search(x, None, 1, memory_budget_mb=0)


def test_torch_tensors_in_and_grad_ignored():
    x = torch.randn(30, 4, requires_grad=True)
    d, i = knn_search(x, None, 2)
    assert i.dtype == torch.int64 and d.dtype == torch.float32 and not d.requires_grad


def test_multi_tile_gallery_small_k_equals_brute_force():
    # 5,000 items: the small-k path splits the gallery into 4,096-column tiles
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5000, 10))
    x[4500] = x[10]  # a duplicate across the tile boundary
    d, i = knn_search(x, None, 6, device="cpu")
    sq = (x * x).sum(1)
    for s in range(0, 5000, 1000):
        dd = sq[s : s + 1000, None] + sq[None, :] - 2 * x[s : s + 1000] @ x.T
        dd[np.arange(1000), np.arange(s, s + 1000)] = np.inf
        idx = np.tile(np.arange(5000), (1000, 1))
        ref = np.lexsort((idx, dd), axis=1)[:, :6]
        np.testing.assert_array_equal(i[s : s + 1000].numpy(), ref)
    assert i[10, 0].item() == 4500 and i[4500, 0].item() == 10


def brute_force_excluding(q: np.ndarray, g: np.ndarray, exclude: np.ndarray, k: int):
    """float64 (distance, index) order over the gallery minus each row's excluded index;
    rows with fewer than k items end in (inf, -1)."""
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    rows = np.flatnonzero(exclude >= 0)
    d[rows, exclude[rows]] = np.inf
    idx = np.tile(np.arange(g.shape[0]), (q.shape[0], 1))
    order = np.lexsort((idx, d), axis=1)[:, :k]
    out_d = np.take_along_axis(d, order, 1)
    return out_d, np.where(np.isinf(out_d), -1, order)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("budget", [0.02, 512.0])
@pytest.mark.parametrize("k", [1, 9, 300])
def test_exclude_by_index_equals_brute_force(backend, budget, k):
    """Queries that are gallery items (some duplicated elsewhere) leave out their own index
    only; the others rank the whole gallery."""
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    rng = np.random.default_rng(4)
    g = rng.integers(-3, 4, size=(310, 6)).astype(np.float32)  # many exact ties
    q = np.concatenate([g[::3], rng.integers(-3, 4, size=(40, 6)).astype(np.float32)])
    exclude = np.concatenate([np.arange(0, 310, 3), -np.ones(40, dtype=np.int64)])
    d, i = knn_search(
        q, g, k, exclude=exclude, backend=backend, memory_budget_mb=budget, device="cpu"
    )
    ref_d, ref_i = brute_force_excluding(q.astype(np.float64), g.astype(np.float64), exclude, k)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclude_pads_rows_that_have_one_item_less(backend):
    """k = gallery size: a row that left itself out has one item less and ends in padding
    (index -1, distance inf); self-retrieval through exclude equals gallery=None."""
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss not installed")
    rng = np.random.default_rng(5)
    g = rng.standard_normal((30, 4))
    q = g[[0, 7]] + 0.0
    q = np.concatenate([q, rng.standard_normal((1, 4))])
    d, i = knn_search(q, g, 30, exclude=np.array([0, 7, -1]), backend=backend, device="cpu")
    assert i[0, -1].item() == -1 and i[1, -1].item() == -1 and i[2, -1].item() != -1
    assert torch.isinf(d[:2, -1]).all() and torch.isfinite(d[2]).all()
    assert sorted(i[0, :-1].tolist()) == [j for j in range(30) if j != 0]
    assert sorted(i[2].tolist()) == list(range(30))
    same = knn_search(g, g, 29, exclude=np.arange(30), backend=backend, device="cpu")
    ref = knn_search(g, None, 29, backend=backend, device="cpu")
    np.testing.assert_array_equal(same[1].numpy(), ref[1].numpy())


def test_exclude_errors_name_the_fix():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="one integer gallery index"):
        knn_search(x, x, 1, exclude=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match=r"outside \[-1, 5\)"):
        knn_search(x, x, 1, exclude=np.array([0, 1, 2, 3, 5]))
    with pytest.raises(ValueError, match="self-retrieval"):
        knn_search(x, None, 1, exclude=np.arange(5))
