"""The one table of metrics: name pattern, kind, function and description.

``evaluate`` parses metric names against this table and calls its functions; adding a
metric: its function (in retrieval.py, clustering.py or structure.py) plus one
:data:`METRICS` entry. The kind says what a function is given:

- ``retrieval``: ``fn(hits, num_relevant, k)`` per query block of the kNN search, ``k``
  the number in the name (None without one); ``depth`` says how many neighbours it needs.
- ``clustering``: ``fn(labels, assignment)`` on one k-means clustering.
- ``structure``: ``fn(embeddings, labels, seed=, device=, memory_budget_mb=)``.

Every retrieval metric but the ``_authors`` one leaves out queries with no same-class item
(NaN per query); descriptions say what one query scores (``evaluate`` averages them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nirdml.evaluation import clustering, retrieval, structure


@dataclass(frozen=True)
class Metric:
    """One family of metric names."""

    pattern: str
    """Regular expression a name must match in full; a group holds ``k``."""
    kind: str
    """"retrieval", "clustering" or "structure"."""
    fn: Callable[..., Any]
    help: str
    """The name(s) as listed to users."""
    description: str
    depth: str = "k"
    """Retrieval: neighbours needed: "k" (the name's number) or "relevant" (all of the
    query's class)."""
    self_only: bool = False
    """Defined for self-retrieval only (not for query/gallery evaluation)."""

    def match(self, name: str) -> int | None | bool:
        """False when ``name`` is not of this family, else its ``k`` (None without one)."""
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return False
        return int(m.group(1)) if m.groups() else None


def _up_to_class_size(name: str, fn: Callable[..., Any], description: str) -> Metric:
    """A retrieval metric over the R nearest neighbours, R the query's same-class count."""
    return Metric(
        name, "retrieval", lambda hits, rel, _: fn(hits, rel), name, description, "relevant"
    )


METRICS: dict[str, Metric] = {
    "recall@K": Metric(
        r"recall@([1-9][0-9]*)",
        "retrieval",
        retrieval.recall_at_k,
        "recall@K (any K >= 1)",
        "1 where a same-class item is among the K nearest neighbours",
    ),
    "map@r": _up_to_class_size(
        "map@r",
        retrieval.map_at_r,
        "sum of P@j over hits j <= R, divided by R (R: same-class gallery items)",
    ),
    "r_precision": _up_to_class_size(
        "r_precision", retrieval.r_precision, "hits among the R nearest neighbours over R"
    ),
    "map@K": Metric(
        r"map@([1-9][0-9]*)",
        "retrieval",
        retrieval.map_at,
        "map@K",
        "AP truncated at K, divided by min(K, R)",
    ),
    "map@K_authors": Metric(
        r"map@([1-9][0-9]*)_authors",
        "retrieval",
        retrieval.map_at_authors,
        "map@K_authors (e.g. map@1000, map@1000_authors)",
        "the NIR authors' AP truncated at K divided by R + 1 (self-retrieval only)",
        self_only=True,
    ),
    "nmi": Metric(r"nmi", "clustering", clustering.nmi, "nmi", "normalised mutual information"),
    "ami": Metric(r"ami", "clustering", clustering.ami, "ami", "adjusted mutual information"),
    "f1": Metric(r"f1", "clustering", clustering.pairwise_f1, "f1", "pairwise F1 of k-means"),
    "rho_spectrum": Metric(
        r"rho_spectrum",
        "structure",
        lambda x, _, **kw: structure.rho_spectrum(x, device=kw["device"]),
        "rho_spectrum",
        "KL(uniform || normalised singular value spectrum) of the embeddings",
    ),
    "pi_ratio": Metric(
        r"pi_ratio",
        "structure",
        lambda x, y, **kw: structure.pi_ratio(x, y, device=kw["device"]),
        "pi_ratio",
        "mean intra-class cosine distance over mean distance between class centres",
    ),
    "uniformity_g2": Metric(
        r"uniformity_g2",
        "structure",
        lambda x, _, **kw: structure.uniformity_g2(x, **kw),
        "uniformity_g2",
        "mean exp(-2 ||a - b||^2) over pairs of distinct items (seeded subsample)",
    ),
}
METRIC_NAMES_HELP = ", ".join(m.help for m in METRICS.values())
CLUSTERING_METRICS = tuple(k for k, m in METRICS.items() if m.kind == "clustering")
STRUCTURE_METRICS = tuple(k for k, m in METRICS.items() if m.kind == "structure")


def parse_metric(name: str) -> tuple[Metric, int | None]:
    """The table entry of ``name`` and its ``k``; a ValueError listing the names if none."""
    for metric in METRICS.values():
        k = metric.match(name)
        if k is not False:
            return metric, k
    raise ValueError(f"unknown metric {name!r}; valid names: {METRIC_NAMES_HELP}.")
