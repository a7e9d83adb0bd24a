"""Structure metrics against direct (slow) implementations of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist
from scipy.stats import entropy

from nirdml.evaluation import pi_ratio, rho_spectrum, singular_values, uniformity_g2


def data(n=300, dim=24, n_classes=20, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    c = rng.standard_normal((n_classes, dim))
    x = c[y] + 0.8 * rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


@pytest.mark.parametrize("shape", [(300, 24), (10, 24)])
def test_rho_spectrum_equals_svd_and_scipy_kl(shape):
    x = np.random.default_rng(1).standard_normal(shape) + 0.5
    s = torch.linalg.svdvals(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(singular_values(x).numpy(), s, rtol=1e-9)
    p = s / s.sum()
    assert rho_spectrum(x) == pytest.approx(entropy(np.ones(len(s)) / len(s), p), rel=1e-9)
    # authors' rho_spectrum@3: the two largest singular values dropped
    p3 = s[2:] / s[2:].sum()
    expect = entropy(np.ones(len(p3)) / len(p3), p3)
    assert rho_spectrum(x, exclude_largest=2) == pytest.approx(expect, rel=1e-9)


def test_rho_spectrum_flat_vs_decaying():
    rng = np.random.default_rng(2)
    flat = rng.standard_normal((2000, 16))
    decaying = flat * (0.5 ** np.arange(16))
    assert rho_spectrum(flat) < 0.01 < rho_spectrum(decaying)
    assert rho_spectrum(np.c_[flat, np.zeros(2000)]) == float("inf")


def pi_ratio_authors(x, y):
    """The authors' dists@intra_over_inter, singleton classes left out of intra."""
    intra = []
    for lab in np.unique(y):
        loc = np.where(y == lab)[0]
        if len(loc) < 2:
            continue
        d = cdist(x[loc], x[loc], "cosine")
        intra.append(d.sum() / (len(d) ** 2 - len(d)))
    coms = np.stack([x[y == lab].mean(0) for lab in np.unique(y)])
    coms /= np.linalg.norm(coms, axis=1, keepdims=True)
    d = cdist(coms, coms, "cosine")
    inter = d.sum() / (len(d) ** 2 - len(d))
    return np.mean(intra) / inter


def test_pi_ratio_equals_authors_definition():
    x, y = data()
    y[:2] = [98, 99]  # two singleton classes
    assert pi_ratio(x, y) == pytest.approx(pi_ratio_authors(x, y), rel=1e-9)
    # not normalised input: cosine distance ignores the scale
    scaled = x * np.random.default_rng(3).uniform(0.5, 2, (len(x), 1))
    assert pi_ratio(scaled, y) == pytest.approx(pi_ratio_authors(scaled, y), rel=1e-9)


def test_pi_ratio_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        pi_ratio(np.ones((4, 2)), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="all-zero"):
        pi_ratio(np.zeros((4, 2)), [0, 0, 1, 1])


def test_uniformity_g2_exact_equals_pdist():
    x, _ = data(n=500)
    expect = np.exp(-2 * pdist(x, "sqeuclidean")).mean()
    assert uniformity_g2(x) == pytest.approx(expect, rel=1e-6)
    assert uniformity_g2(x.astype(np.float32), memory_budget_mb=0.05) == pytest.approx(
        expect, rel=1e-6
    )


def test_uniformity_g2_subsample_is_seeded_and_exact_on_subset():
    x, _ = data(n=800)
    a = uniformity_g2(x, max_points=300, seed=5)
    assert a == uniformity_g2(x, max_points=300, seed=5)
    sub = torch.randperm(800, generator=torch.Generator().manual_seed(5))[:300].numpy()
    expect = np.exp(-2 * pdist(x[np.sort(sub)], "sqeuclidean")).mean()
    assert a == pytest.approx(expect, rel=1e-6)
    full = np.exp(-2 * pdist(x, "sqeuclidean")).mean()
    assert a == pytest.approx(full, rel=0.1)
