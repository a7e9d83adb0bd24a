"""The one table of metrics: name pattern, kind, function and description, as plain data.

``evaluate`` parses metric names against this table and calls its functions; config
validation (``eval.metrics``, ``eval.select_metric``) reads it too, so nothing here imports
torch: a function is named by ``"module:function"`` and imported only by
:meth:`Metric.load`. Adding a metric: its function (in retrieval.py, clustering.py or
structure.py) plus one :data:`METRICS` entry. The kind says how a function is called:

- ``retrieval``: per query block of the kNN search, ``fn(hits, num_relevant, k)`` for a
  name with a number ``k`` (``recall@4``: k = 4), ``fn(hits, num_relevant)`` for one without;
  ``depth`` says how many neighbours it needs. One float64 value per query.
- ``clustering``: ``fn(labels, assignment)`` on one k-means clustering.
- ``structure``: ``fn(embeddings, labels, seed=, device=, memory_budget_mb=)``.

Per query, retrieval metrics are NaN for queries with no same-class gallery item (``R =
0``), except the ``_authors`` one (0, as the authors' code); ``evaluate``'s ``no_relevant``
policy leaves those out (default) or counts them 0. Descriptions say what one query scores.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nirdml.errors import InputError

RETRIEVAL_DEPTHS = ("k", "relevant", "k_relevant", "first_hit")


@dataclass(frozen=True)
class Metric:
    """One family of metric names."""

    pattern: str
    """Regular expression a name must match in full; a group holds ``k``."""
    kind: str
    """"retrieval", "clustering" or "structure"."""
    target: str
    """``"module:function"`` of the function (imported by :meth:`load`)."""
    help: str
    """The name(s) as listed to users."""
    description: str
    depth: str = "k"
    """Retrieval: neighbours needed: "k" (the name's number), "relevant" (R, all of the
    query's class), "k_relevant" (min(k, R)) or "first_hit" (down to the first same-class
    item, however deep: ``evaluate`` searches further for the queries that need it)."""
    self_only: bool = False
    """Defined only when every query is also a gallery item (self-retrieval, or query/gallery
    sets where each query is in the gallery)."""

    def match(self, name: str) -> int | None | bool:
        """False when ``name`` is not of this family, else its ``k`` (None without one)."""
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return False
        return int(m.group(1)) if m.groups() else None

    def load(self) -> Callable[..., Any]:
        """The metric function (imports torch for retrieval and structure metrics)."""
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


_R = "nirdml.evaluation.retrieval:"
_C = "nirdml.evaluation.clustering:"
_S = "nirdml.evaluation.structure:"
_K = "([1-9][0-9]*)"

METRICS: dict[str, Metric] = {
    "recall@K": Metric(
        f"recall@{_K}",
        "retrieval",
        _R + "recall_at_k",
        "recall@K (any K >= 1)",
        "1 where a same-class item is among the K nearest neighbours (OML cmc@K)",
    ),
    "precision@K": Metric(
        f"precision@{_K}",
        "retrieval",
        _R + "precision_at",
        "precision@K",
        "same-class items among the K nearest, divided by min(K, R) (OML precision@K)",
    ),
    "mrr": Metric(
        r"mrr",
        "retrieval",
        _R + "reciprocal_rank",
        "mrr",
        "1 / rank of the first same-class item, however deep (PML mean_reciprocal_rank)",
        depth="first_hit",
    ),
    "mrr@K": Metric(
        f"mrr@{_K}",
        "retrieval",
        _R + "reciprocal_rank",
        "mrr@K",
        "1 / rank of the first same-class item among the K nearest, 0 if none",
    ),
    "map@r": Metric(
        r"map@r",
        "retrieval",
        _R + "map_at_r",
        "map@r",
        "sum of P@j over hits j <= R, divided by R (R: same-class gallery items)",
        depth="relevant",
    ),
    "map@r@K": Metric(
        f"map@r@{_K}",
        "retrieval",
        _R + "map_at_r_depth",
        "map@r@K",
        "map@r over the K nearest only: sum of P@j over hits j <= min(R, K), divided by R "
        "(PML mean_average_precision_at_r with k=K)",
        depth="k_relevant",
    ),
    "r_precision": Metric(
        r"r_precision",
        "retrieval",
        _R + "r_precision",
        "r_precision",
        "hits among the R nearest neighbours over R",
        depth="relevant",
    ),
    "r_precision@K": Metric(
        f"r_precision@{_K}",
        "retrieval",
        _R + "r_precision_depth",
        "r_precision@K",
        "hits among the min(R, K) nearest over min(R, K) (PML r_precision with k=K)",
        depth="k_relevant",
    ),
    "map@K": Metric(
        f"map@{_K}",
        "retrieval",
        _R + "map_at",
        "map@K",
        "AP truncated at K, divided by min(K, R)",
    ),
    "map@K_hits": Metric(
        f"map@{_K}_hits",
        "retrieval",
        _R + "map_at_hits",
        "map@K_hits",
        "AP truncated at K, divided by the hits among the K nearest, 0 without one (OML map@K)",
    ),
    "map@K_authors": Metric(
        f"map@{_K}_authors",
        "retrieval",
        _R + "map_at_authors",
        "map@K_authors (e.g. map@1000, map@1000_authors)",
        "the NIR authors' AP truncated at K divided by R + 1 (queries in the gallery only)",
        self_only=True,
    ),
    "nmi": Metric(r"nmi", "clustering", _C + "nmi", "nmi", "normalised mutual information"),
    "ami": Metric(r"ami", "clustering", _C + "ami", "ami", "adjusted mutual information"),
    "f1": Metric(r"f1", "clustering", _C + "pairwise_f1", "f1", "pairwise F1 of k-means"),
    "rho_spectrum": Metric(
        r"rho_spectrum",
        "structure",
        _S + "rho_spectrum_metric",
        "rho_spectrum",
        "KL(uniform || normalised singular value spectrum) of the embeddings",
    ),
    "pi_ratio": Metric(
        r"pi_ratio",
        "structure",
        _S + "pi_ratio_metric",
        "pi_ratio",
        "mean intra-class cosine distance over mean distance between class centres",
    ),
    "uniformity_g2": Metric(
        r"uniformity_g2",
        "structure",
        _S + "uniformity_g2_metric",
        "uniformity_g2",
        "mean exp(-2 ||a - b||^2) over pairs of distinct items (seeded subsample)",
    ),
}
METRIC_NAMES_HELP = ", ".join(m.help for m in METRICS.values())
RETRIEVAL_METRICS = tuple(k for k, m in METRICS.items() if m.kind == "retrieval")
CLUSTERING_METRICS = tuple(k for k, m in METRICS.items() if m.kind == "clustering")
STRUCTURE_METRICS = tuple(k for k, m in METRICS.items() if m.kind == "structure")

NO_RELEVANT_POLICIES = ("skip", "zero")
"""What a query with no same-class gallery item scores: left out (``skip``, PML) or 0
(``zero``, OML)."""
AVERAGES = ("queries", "classes")
"""How per-query values are averaged: over queries, or per class first (PML avg_of_avgs)."""

# Examples of every family, to suggest the closest valid name for a mistyped one.
_EXAMPLES = (
    "recall@1",
    "precision@5",
    "mrr",
    "mrr@10",
    "map@r",
    "map@r@100",
    "r_precision",
    "r_precision@100",
    "map@1000",
    "map@1000_hits",
    "map@1000_authors",
    *CLUSTERING_METRICS,
    *STRUCTURE_METRICS,
)


def unknown_metric_message(name: str, where: str = "metric") -> str:
    """ "unknown <where> 'x'" with the closest valid name and the list of valid names."""
    close = difflib.get_close_matches(name, _EXAMPLES, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {where} {name!r}.{hint} Valid names: {METRIC_NAMES_HELP}."


def normalise_metric_name(name: str) -> str:
    """The canonical spelling of a metric name (lower case, no surrounding space)."""
    return str(name).strip().lower()


def parse_metric(name: str) -> tuple[Metric, int | None]:
    """The table entry of ``name`` and its ``k``; a ValueError listing the names if none."""
    for metric in METRICS.values():
        k = metric.match(name)
        if k is not False:
            return metric, k
    raise InputError(unknown_metric_message(name))


def is_metric(name: str) -> bool:
    """Whether ``name`` (as spelled, after :func:`normalise_metric_name`) is a valid name."""
    try:
        parse_metric(normalise_metric_name(name))
    except ValueError:
        return False
    return True
