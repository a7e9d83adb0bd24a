"""Exact retrieval, clustering and structure metrics for DML embeddings.

Main entry points: :func:`evaluate` (every metric by name), :func:`evaluate_per_class` (the
per-class / per-category table) and :func:`compute_embeddings`. The building blocks
(:func:`knn_search`, :func:`kmeans`, the per-metric functions) are public too.

The names are imported lazily (PEP 562), so the torch-free metric table
:mod:`nirdml.evaluation.registry` is read by config validation without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.runtime import lazy_attributes

_RETRIEVAL = "nirdml.evaluation.retrieval"
_STRUCTURE = "nirdml.evaluation.structure"
_REGISTRY = "nirdml.evaluation.registry"
#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "DEFAULT_METRICS": "nirdml.evaluation.api",
    "evaluate": "nirdml.evaluation.api",
    "evaluate_per_class": "nirdml.evaluation.api",
    "ami": "nirdml.evaluation.clustering",
    "nmi": "nirdml.evaluation.clustering",
    "pairwise_f1": "nirdml.evaluation.clustering",
    "compute_embeddings": "nirdml.evaluation.embed",
    "kmeans": "nirdml.evaluation.kmeans_backends",
    "faiss_available": "nirdml.evaluation.knn",
    "knn_search": "nirdml.evaluation.knn",
    "AVERAGES": _REGISTRY,
    "CLUSTERING_METRICS": _REGISTRY,
    "METRICS": _REGISTRY,
    "METRIC_NAMES_HELP": _REGISTRY,
    "NO_RELEVANT_POLICIES": _REGISTRY,
    "RETRIEVAL_METRICS": _REGISTRY,
    "STRUCTURE_METRICS": _REGISTRY,
    "map_at": _RETRIEVAL,
    "map_at_authors": _RETRIEVAL,
    "map_at_hits": _RETRIEVAL,
    "map_at_r": _RETRIEVAL,
    "map_at_r_depth": _RETRIEVAL,
    "precision_at": _RETRIEVAL,
    "r_precision": _RETRIEVAL,
    "r_precision_depth": _RETRIEVAL,
    "recall_at_k": _RETRIEVAL,
    "reciprocal_rank": _RETRIEVAL,
    "pi_ratio": _STRUCTURE,
    "rho_spectrum": _STRUCTURE,
    "singular_values": _STRUCTURE,
    "uniformity_g2": _STRUCTURE,
}
_SUBMODULES = (
    "api",
    "clustering",
    "embed",
    "kmeans_backends",
    "knn",
    "registry",
    "retrieval",
    "structure",
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from nirdml.evaluation.api import DEFAULT_METRICS, evaluate, evaluate_per_class
    from nirdml.evaluation.clustering import ami, nmi, pairwise_f1
    from nirdml.evaluation.embed import compute_embeddings
    from nirdml.evaluation.kmeans_backends import kmeans
    from nirdml.evaluation.knn import faiss_available, knn_search
    from nirdml.evaluation.registry import (
        AVERAGES,
        CLUSTERING_METRICS,
        METRIC_NAMES_HELP,
        METRICS,
        NO_RELEVANT_POLICIES,
        RETRIEVAL_METRICS,
        STRUCTURE_METRICS,
    )
    from nirdml.evaluation.retrieval import (
        map_at,
        map_at_authors,
        map_at_hits,
        map_at_r,
        map_at_r_depth,
        precision_at,
        r_precision,
        r_precision_depth,
        recall_at_k,
        reciprocal_rank,
    )
    from nirdml.evaluation.structure import (
        pi_ratio,
        rho_spectrum,
        singular_values,
        uniformity_g2,
    )

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)

__all__ = [
    "AVERAGES",
    "CLUSTERING_METRICS",
    "DEFAULT_METRICS",
    "METRICS",
    "METRIC_NAMES_HELP",
    "NO_RELEVANT_POLICIES",
    "RETRIEVAL_METRICS",
    "STRUCTURE_METRICS",
    "ami",
    "compute_embeddings",
    "evaluate",
    "evaluate_per_class",
    "faiss_available",
    "kmeans",
    "knn_search",
    "map_at",
    "map_at_authors",
    "map_at_hits",
    "map_at_r",
    "map_at_r_depth",
    "nmi",
    "pairwise_f1",
    "pi_ratio",
    "precision_at",
    "r_precision",
    "r_precision_depth",
    "recall_at_k",
    "reciprocal_rank",
    "rho_spectrum",
    "singular_values",
    "uniformity_g2",
]
