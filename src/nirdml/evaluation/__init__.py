"""Exact retrieval, clustering and structure metrics for DML embeddings.

Main entry points: :func:`evaluate` (every metric by name) and :func:`compute_embeddings`.
The building blocks (:func:`knn_search`, :func:`kmeans`, the per-metric functions) are
public too.
"""

from __future__ import annotations

from nirdml.evaluation.api import DEFAULT_METRICS, evaluate
from nirdml.evaluation.clustering import ami, nmi, pairwise_f1
from nirdml.evaluation.embed import compute_embeddings
from nirdml.evaluation.kmeans_backends import kmeans
from nirdml.evaluation.knn import faiss_available, knn_search
from nirdml.evaluation.registry import (
    CLUSTERING_METRICS,
    METRIC_NAMES_HELP,
    METRICS,
    STRUCTURE_METRICS,
)
from nirdml.evaluation.retrieval import (
    map_at,
    map_at_authors,
    map_at_r,
    r_precision,
    recall_at_k,
)
from nirdml.evaluation.structure import pi_ratio, rho_spectrum, singular_values, uniformity_g2

__all__ = [
    "CLUSTERING_METRICS",
    "DEFAULT_METRICS",
    "METRICS",
    "METRIC_NAMES_HELP",
    "STRUCTURE_METRICS",
    "ami",
    "compute_embeddings",
    "evaluate",
    "faiss_available",
    "kmeans",
    "knn_search",
    "map_at",
    "map_at_authors",
    "map_at_r",
    "nmi",
    "pairwise_f1",
    "pi_ratio",
    "r_precision",
    "recall_at_k",
    "rho_spectrum",
    "singular_values",
    "uniformity_g2",
]
