"""See the embedding space: analysis reports, run comparisons and image search.

- :func:`analyze`: a self-contained HTML report of a checkpoint or exported embeddings
  (:func:`compute_analysis` measures, :func:`write_report` renders and writes).
- :func:`compare_runs`: one table and overlaid metric-vs-epoch curves for several runs.
- :func:`search` / :func:`embed_gallery`: query a gallery folder with a trained model.
- Building blocks: :func:`query_scores`, :func:`retrieval_rows`,
  :func:`render_retrieval_grid`, :func:`class_spread`, :func:`project_2d`,
  :func:`draw_flow_samples`.
"""

from __future__ import annotations

from nirdml.analysis.compare import Comparison, compare_runs
from nirdml.analysis.flow_samples import FlowSamples, draw_flow_samples
from nirdml.analysis.inputs import AnalysisInput, load_input
from nirdml.analysis.projection import project_2d
from nirdml.analysis.report import (
    AnalysisReport,
    AnalysisResult,
    analyze,
    compute_analysis,
    write_report,
)
from nirdml.analysis.retrieval_grid import (
    GridLayout,
    QueryScores,
    RetrievalRow,
    query_scores,
    render_retrieval_grid,
    retrieval_rows,
)
from nirdml.analysis.search import GalleryIndex, SearchResult, embed_gallery, search, search_grid
from nirdml.analysis.spread import ClassSpread, class_spread

__all__ = [
    "AnalysisInput",
    "AnalysisReport",
    "AnalysisResult",
    "ClassSpread",
    "Comparison",
    "FlowSamples",
    "GalleryIndex",
    "GridLayout",
    "QueryScores",
    "RetrievalRow",
    "SearchResult",
    "analyze",
    "class_spread",
    "compare_runs",
    "compute_analysis",
    "draw_flow_samples",
    "embed_gallery",
    "load_input",
    "project_2d",
    "query_scores",
    "render_retrieval_grid",
    "retrieval_rows",
    "search",
    "search_grid",
    "write_report",
]
