"""The PML / OML metric set: mrr, precision@K, retrieval depth (r_precision@K, map@r@K),
map@K_hits, per-class averages, the no-relevant policy and query/gallery by identity.

Oracles: pytorch-metric-learning's AccuracyCalculator, run on an exact (distance, index)
ranking (its ``knn_func`` hook) so that its metric code sees the same neighbour lists as
ours even with ties between classes; its own faiss kNN on data without near-ties; a slow
float64 loop written here; and open-metric-learning cases computed by hand (OML cannot be a
test dependency: it pins numpy<2, or torch 2.1 with numpy 2, against this project's torch
pin). Integer-valued embeddings make every distance exact in float32 and float64, so ties
are real ties and equality is exact up to the rounding of the means (1e-12).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nirdml.evaluation import evaluate, evaluate_per_class

pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")


# ----------------------------------------------------------------------------- data
def tied_data(seed: int, n_classes: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Integer vectors in {-2..2}^3 around integer class centres: many exact duplicates
    within and across classes; class sizes 1-12 (singletons included)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, size=n_classes)
    sizes[:3] = 1
    y = np.repeat(np.arange(n_classes), sizes)
    centres = rng.integers(-2, 3, size=(n_classes, 3))
    x = centres[y] + rng.integers(-1, 2, size=(len(y), 3))
    perm = rng.permutation(len(y))
    return np.clip(x[perm], -2, 2).astype(np.float64), y[perm]


def far_positives(n_classes: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Each class has one item near the origin and one far away: the first same-class item
    of a query lies ~n_classes deep, beyond any depth the other metrics need."""
    rng = np.random.default_rng(7)
    near = rng.integers(-3, 4, size=(n_classes, 4))
    far = near + 40
    y = np.concatenate([np.arange(n_classes), np.arange(n_classes)])
    return np.concatenate([near, far]).astype(np.float64), y


class ExactKNN:
    """A PML ``knn_func``: float64 squared distances, ranked by (distance, index); with
    ``ref_includes_query`` query i leaves out reference i (PML's FaissKNN does the same
    by position)."""

    def __call__(self, query, k, reference, ref_includes_query=False):
        q, r = query.double(), reference.double()
        d = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
        if ref_includes_query:
            rows = torch.arange(len(q))
            d[rows, rows] = float("inf")
        idx = torch.arange(len(r)).expand_as(d)
        order = np.lexsort((idx.numpy(), d.numpy()), axis=1)[:, :k]
        order = torch.from_numpy(order)
        return torch.gather(d, 1, order).float(), order


PML = {
    "precision_at_1": "recall@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map@r",
    "mean_reciprocal_rank": "mrr",
    "mean_average_precision": "map",
}


def pml(x, y, k=None, ref=None, ref_y=None, ref_includes_query=False, exact=True, **options):
    calc = pml_acc.AccuracyCalculator(
        include=tuple(PML),
        k=k,
        device=torch.device("cpu"),
        knn_func=ExactKNN() if exact else None,
        **options,
    )
    args = {} if ref is None else {"reference": ref, "reference_labels": ref_y}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calc.get_accuracy(
            torch.as_tensor(x), torch.as_tensor(y), ref_includes_query=ref_includes_query, **args
        )


def tol(their_name: str) -> float:
    """PML computes reciprocal ranks in float32 (the others in float64)."""
    return 1e-7 if their_name == "mean_reciprocal_rank" else 1e-12


def ours(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(*args, device="cpu", **kwargs)


def names_for(k: int | None, n: int) -> dict[str, str]:
    """Our name of each PML metric under AccuracyCalculator(k=k) on n items."""
    if k is None:
        return {**PML, "mean_average_precision": f"map@{n}"}  # K >= every R: min(K, R) = R
    return {
        "precision_at_1": "recall@1",
        "r_precision": f"r_precision@{k}",
        "mean_average_precision_at_r": f"map@r@{k}",
        "mean_reciprocal_rank": f"mrr@{k}",
    }


# ----------------------------------------------------------------------- PML oracle
@pytest.mark.parametrize("k", [None, 1, 3, 7, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_depth_variants_and_mrr_equal_pml_with_ties(k, seed):
    """k below (1, 3, 7) and above (20) the class sizes (1-12); k=None = every item."""
    x, y = tied_data(seed)
    theirs = pml(x, y, k=k)
    names = names_for(k, len(y))
    mine = ours(x, y, list(names.values()), memory_budget_mb=0.01)  # tiny chunks
    for their_name, name in names.items():
        assert mine[name] == pytest.approx(theirs[their_name], abs=tol(their_name)), name
    assert mine == ours(x, y, list(names.values()), backend="faiss")


def test_depth_variants_equal_plain_ones_at_depth_max_bin_count():
    x, y = tied_data(2)
    r_max = int(np.bincount(y).max()) - 1
    mine = ours(x, y, ["r_precision", "map@r", f"r_precision@{r_max}", f"map@r@{r_max}"])
    assert mine["r_precision"] == mine[f"r_precision@{r_max}"]
    assert mine["map@r"] == mine[f"map@r@{r_max}"]
    theirs = pml(x, y, k="max_bin_count")
    assert mine["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)


def test_mrr_searches_deeper_for_far_first_hits():
    """The first same-class item is ~60 deep: mrr searches those queries again, deeper;
    PML (k=None) ranks everything."""
    x, y = far_positives()
    mine = ours(x, y, ["mrr", "map@r", "mrr@5"], memory_budget_mb=0.01)
    theirs = pml(x, y)
    assert mine["mrr"] == pytest.approx(theirs["mean_reciprocal_rank"], abs=1e-7)
    theirs5 = pml(x, y, k=5)["mean_reciprocal_rank"]
    assert mine["mrr"] < 0.1 and mine["mrr@5"] == pytest.approx(theirs5, abs=1e-7)
    assert mine == ours(x, y, ["mrr", "map@r", "mrr@5"])  # one block: the same numbers


@pytest.mark.parametrize("k", [None, 4])
def test_avg_of_avgs_and_per_class_equal_pml(k):
    x, y = tied_data(3)
    names = names_for(k, len(y))
    if k is None:
        del names["mean_average_precision"]
    theirs = pml(x, y, k=k, avg_of_avgs=True)
    mine = ours(x, y, list(names.values()), average="classes")
    for their_name, name in names.items():
        assert mine[name] == pytest.approx(theirs[their_name], abs=tol(their_name)), name
    per_class = pml(x, y, k=k, return_per_class=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = evaluate_per_class(x, y, list(names.values()), device="cpu")
    assert list(table) == sorted(set(y.tolist()))
    for their_name, name in names.items():
        defined = [row[name] for row in table.values() if not np.isnan(row[name])]
        np.testing.assert_allclose(defined, per_class[their_name], rtol=0, atol=tol(their_name))
    # singleton classes (no same-class item) are NaN rows under no_relevant="skip"
    lone = [c for c, n in zip(*np.unique(y, return_counts=True), strict=True) if n == 1]
    assert lone and all(np.isnan(table[c]["recall@1"]) for c in lone)


def test_queries_inside_the_reference_set_equal_pml_prefix_mode():
    """PML's ref_includes_query: the queries are the first items of the reference set.
    Ours by id and by masks; plain query/gallery mode would let each query find itself."""
    x, y = tied_data(4)
    nq = 70
    theirs = pml(x[:nq], y[:nq], ref=x, ref_y=y, ref_includes_query=True)
    by_ids = ours(
        x,
        y,
        list(PML.values())[:4],
        query_embeddings=x[:nq],
        query_labels=y[:nq],
        query_ids=np.arange(nq),
        gallery_ids=np.arange(len(y)),
    )
    is_query = np.arange(len(y)) < nq
    by_mask = ours(x, y, list(PML.values())[:4], is_query=is_query)
    assert by_ids == by_mask
    for their_name, name in list(PML.items())[:4]:
        assert by_ids[name] == pytest.approx(theirs[their_name], abs=tol(their_name)), name
    theirs5 = pml(x[:nq], y[:nq], k=5, ref=x, ref_y=y, ref_includes_query=True)
    mine5 = ours(x, y, ["r_precision@5", "map@r@5", "mrr@5"], is_query=is_query)
    assert mine5["r_precision@5"] == pytest.approx(theirs5["r_precision"], abs=1e-12)
    assert mine5["map@r@5"] == pytest.approx(theirs5["mean_average_precision_at_r"], abs=1e-12)
    assert mine5["mrr@5"] == pytest.approx(theirs5["mean_reciprocal_rank"], abs=1e-7)
    plain = ours(x, y, ["recall@1"], query_embeddings=x[:nq], query_labels=y[:nq])
    # without ids each query finds its own copy in the gallery (first among its ties)
    assert plain["recall@1"] > by_ids["recall@1"] + 0.05


def test_pml_with_its_own_faiss_knn_on_continuous_data():
    """PML's default kNN (faiss, no index tie-break) on data without near-ties."""
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(60), rng.integers(1, 9, size=60))
    x = (rng.standard_normal((60, 16))[y] + 0.8 * rng.standard_normal((len(y), 16))).astype(
        np.float32
    )
    theirs = pml(x, y, exact=False, avg_of_avgs=True)
    mine = ours(x, y, ["recall@1", "r_precision", "map@r", "mrr"], average="classes")
    for their_name, name in list(PML.items())[:4]:
        assert mine[name] == pytest.approx(theirs[their_name], abs=1e-6), name


# ------------------------------------------------------- slow float64 reference loop
def reference(x, y, q_idx, g_idx, names):
    """Textbook definitions, one query at a time; a query leaves out itself (same item)."""
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in q_idx:
        gal = np.array([j for j in g_idx if j != i])
        d = ((x[gal] - x[i]) ** 2).sum(1)
        order = gal[np.lexsort((np.arange(len(gal)), d))]
        rel = y[order] == y[i]
        r = int(rel.sum())
        if r == 0:
            continue
        first = int(np.argmax(rel)) + 1
        cum = np.cumsum(rel)
        prec = cum / np.arange(1, len(rel) + 1)
        for n in names:
            kind, _, num = n.partition("@")
            k = int(num.split("_")[0]) if num[:1].isdigit() else None
            if n == "mrr":
                v = 1 / first
            elif kind == "mrr":
                v = 1 / first if first <= k else 0.0
            elif kind == "precision":
                v = rel[:k].sum() / min(k, r)
            elif n.endswith("_hits"):
                v = (prec[:k] * rel[:k]).sum() / rel[:k].sum() if rel[:k].any() else 0.0
            elif kind == "map" and k is not None:
                v = (prec[:k] * rel[:k]).sum() / min(k, r)
            else:
                raise AssertionError(n)
            out[n].append(float(v))
    return {n: float(np.mean(v)) for n, v in out.items()}


NEW = ["mrr", "mrr@3", "precision@1", "precision@4", "precision@30", "map@4_hits", "map@30_hits"]


def test_new_metrics_equal_slow_reference_self_and_overlapping_sets():
    x, y = tied_data(6)
    n = len(y)
    assert ours(x, y, NEW) == pytest.approx(reference(x, y, range(n), range(n), NEW), abs=1e-12)
    rng = np.random.default_rng(8)
    is_query, is_gallery = rng.random(n) < 0.6, rng.random(n) < 0.7
    got = ours(x, y, NEW + ["map@4"], is_query=is_query, is_gallery=is_gallery)
    ref = reference(x, y, np.flatnonzero(is_query), np.flatnonzero(is_gallery), NEW + ["map@4"])
    assert got == pytest.approx(ref, abs=1e-12)
    tiny = ours(x, y, NEW, is_query=is_query, is_gallery=is_gallery, memory_budget_mb=0.01)
    assert tiny == {k: got[k] for k in NEW}
    # K = the gallery size: queries in the gallery have one item less (their lists end in
    # padding, which is never a hit)
    small_x, small_y = x[:40], y[:40]
    is_gallery = np.arange(40) < 25
    names = ["mrr", "precision@25", "map@25_hits", "map@25", "mrr@25"]
    for backend in ("torch", "faiss"):
        got = ours(small_x, small_y, names, is_gallery=is_gallery, backend=backend)
        ref = reference(small_x, small_y, range(40), range(25), names)
        assert got == pytest.approx(ref, abs=1e-12), backend


# ------------------------------------------------------------- OML, computed by hand
# Gallery on a line: positions 0..7 with labels A B A A B C C B (A=0, B=1, C=2).
G_X = np.arange(8, dtype=np.float64)[:, None]
G_Y = np.array([0, 1, 0, 0, 1, 2, 2, 1])
# Queries (not in the gallery): at -0.4 (A), 3.6 (B), 7.3 (C), 2.2 (class 3: absent).
Q_X = np.array([[-0.4], [3.6], [7.3], [2.2]])
Q_Y = np.array([0, 1, 2, 3])
# Rankings (no ties) and hits:
#   q0 at -0.4: gallery 0 1 2 3 4 5 6 7 -> A B A A B C C B -> hits 1 0 1 1 0 0 0 0, R = 3
#   q1 at  3.6: gallery 4 3 5 2 6 1 7 0 -> B A C A C B B A -> hits 1 0 0 0 0 1 1 0, R = 3
#   q2 at  7.3: gallery 7 6 5 4 3 2 1 0 -> B C C B A A B A -> hits 0 1 1 0 0 0 0 0, R = 2
#   q3: no gallery item of its class (R = 0).
OML_BY_HAND = {
    # cmc@1 = recall@1: 1, 1, 0
    "recall@1": 2 / 3,
    # cmc@3: 1, 1, 1
    "recall@3": 1.0,
    # OML precision@3 = hits in top 3 / min(3, R): 2/3, 1/3, 2/2
    "precision@3": (2 / 3 + 1 / 3 + 1) / 3,
    # precision@5: 3/3, 1/3, 2/2
    "precision@5": (1 + 1 / 3 + 1) / 3,
    # OML map@3 = sum of P@j at hits j <= 3 / hits in top 3:
    #   q0 (1 + 2/3) / 2 = 5/6; q1 1 / 1; q2 (1/2 + 2/3) / 2 = 7/12
    "map@3_hits": (5 / 6 + 1 + 7 / 12) / 3,
    # the same sums over min(3, R): (5/3) / 3, 1 / 3, (7/6) / 2
    "map@3": (5 / 9 + 1 / 3 + 7 / 12) / 3,
    # first hit at ranks 1, 1, 2
    "mrr": (1 + 1 + 1 / 2) / 3,
}


def test_oml_metrics_by_hand_and_queries_without_gallery_items():
    names = list(OML_BY_HAND)
    skip = ours(G_X, G_Y, names, query_embeddings=Q_X, query_labels=Q_Y)
    assert skip == pytest.approx(OML_BY_HAND, abs=1e-12)
    # OML counts q3 (no same-class gallery item) as 0: the sums over 4 queries
    zero = ours(G_X, G_Y, names, query_embeddings=Q_X, query_labels=Q_Y, no_relevant="zero")
    assert zero == pytest.approx({n: v * 3 / 4 for n, v in OML_BY_HAND.items()}, abs=1e-12)
    with pytest.warns(UserWarning, match="1 of 4 queries have no same-class item"):
        evaluate(G_X, G_Y, ["recall@1"], query_embeddings=Q_X, query_labels=Q_Y)


def test_oml_per_category_by_hand():
    """OML's per-category metrics: q0, q1 in "top", q2, q3 in "shoes" (q3 counts 0)."""
    table = evaluate_per_class(
        G_X,
        G_Y,
        ["recall@1", "precision@3"],
        categories=np.array(["top", "top", "shoes", "shoes"]),
        query_embeddings=Q_X,
        query_labels=Q_Y,
        no_relevant="zero",
        device="cpu",
    )
    # top: recall@1 (1 + 1) / 2, precision@3 (2/3 + 1/3) / 2; shoes: (0 + 0) / 2, (1 + 0) / 2
    assert table == {
        "shoes": {"recall@1": 0.0, "precision@3": 0.5},
        "top": {"recall@1": 1.0, "precision@3": pytest.approx(0.5, abs=1e-12)},
    }


def test_oml_is_query_is_gallery_by_hand():
    """Items at 0, 0.8, 2, 3, 10 with labels 0 0 1 1 0; is_query 1 1 0 1 0, is_gallery
    1 0 1 1 1: items 0 and 3 are both, so each leaves itself out.
      item 0 -> gallery 2, 3, 4 (labels 1 1 0): hits 0 0 1, R = 1 (item 4)
      item 1 -> gallery 0, 2, 3, 4 (labels 0 1 1 0): hits 1 0 0 1, R = 2
      item 3 -> gallery 2, 0, 4 (labels 1 0 0): hits 1 0 0, R = 1 (item 2)"""
    x = np.array([[0.0], [0.8], [2.0], [3.0], [10.0]])
    y = np.array([0, 0, 1, 1, 0])
    is_query = np.array([True, True, False, True, False])
    is_gallery = np.array([True, False, True, True, True])
    names = ["recall@1", "mrr", "map@r", "precision@2", "map@2_hits"]
    expected = {
        "recall@1": (0 + 1 + 1) / 3,
        "mrr": (1 / 3 + 1 + 1) / 3,
        "map@r": (0 + 1 / 2 + 1) / 3,  # item 1: P@1 over R = 2
        "precision@2": (0 / 1 + 1 / 2 + 1 / 1) / 3,
        "map@2_hits": (0 + 1 + 1) / 3,
    }
    by_mask = ours(x, y, names, is_query=is_query, is_gallery=is_gallery)
    assert by_mask == pytest.approx(expected, abs=1e-12)
    q, g = [0, 1, 3], [0, 2, 3, 4]
    by_ids = ours(
        x[g],
        y[g],
        names,
        query_embeddings=x[q],
        query_labels=y[q],
        query_ids=np.array(q),
        gallery_ids=np.array(g),
    )
    assert by_ids == by_mask
    # string ids (e.g. image paths) work the same
    paths = np.array([f"img/{i}.jpg" for i in range(5)])
    by_paths = ours(
        x[g],
        y[g],
        names,
        query_embeddings=x[q],
        query_labels=y[q],
        query_ids=paths[q],
        gallery_ids=paths[g],
    )
    assert by_paths == by_mask


# ------------------------------------------------------------------------- errors
def test_query_gallery_and_policy_errors_name_the_fix():
    x, y = tied_data(9)
    with pytest.raises(ValueError, match="gallery_ids must be unique"):
        evaluate(
            x,
            y,
            ["recall@1"],
            query_embeddings=x[:3],
            query_labels=y[:3],
            query_ids=[0, 1, 2],
            gallery_ids=np.zeros(len(y), dtype=int),
        )
    with pytest.raises(ValueError, match="the same id must name the same item"):
        evaluate(
            x,
            y,
            ["recall@1"],
            query_embeddings=x[:3],
            query_labels=y[:3] + 100,
            query_ids=[0, 1, 2],
            gallery_ids=np.arange(len(y)),
        )
    with pytest.raises(ValueError, match="query_ids and gallery_ids go together"):
        evaluate(x, y, ["recall@1"], query_ids=[0])
    with pytest.raises(ValueError, match="ONE set of embeddings"):
        evaluate(
            x, y, ["recall@1"], is_query=np.ones(len(y), bool), query_embeddings=x, query_labels=y
        )
    with pytest.raises(ValueError, match="is_gallery must be a boolean array"):
        evaluate(x, y, ["recall@1"], is_gallery=np.ones(len(y)))
    with pytest.raises(ValueError, match="no_relevant must be one of 'skip', 'zero'"):
        evaluate(x, y, ["recall@1"], no_relevant="drop")
    with pytest.raises(ValueError, match="average must be one of 'queries', 'classes'"):
        evaluate(x, y, ["recall@1"], average="class")
    with pytest.raises(ValueError, match="nmi is not per-query retrieval"):
        evaluate_per_class(x, y, ["recall@1", "nmi"])
    with pytest.raises(ValueError, match="every query is also a gallery item"):
        evaluate(x, y, ["map@10_authors"], is_gallery=np.arange(len(y)) % 2 == 0)
    # every query in the gallery: the authors' metric is defined
    r = ours(x, y, ["map@10_authors"], is_gallery=np.ones(len(y), bool))
    assert r == ours(x, y, ["map@10_authors"])
