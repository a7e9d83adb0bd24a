"""``analyze``: one self-contained HTML report of an embedding space.

The report holds the metric table, the structure metrics (singular value spectrum and rho,
pi ratio, G2, per-class spread), a 2-D map coloured by class, retrieval grids of random and
of the worst queries, and for NIR models flow samples next to real embeddings. Every
figure is written as a PNG into the output folder AND embedded in ``report.html`` as a
data URI, so the page opens anywhere on its own; ``report.json`` has every number.

:func:`compute_analysis` measures and draws (an :class:`AnalysisResult`); the renderers in
:mod:`nirdml.analysis.render` turn it into ``report.json`` and ``report.html``, and
:func:`write_report` writes the folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.analysis import plots
from nirdml.analysis._json import json_safe
from nirdml.analysis.flow_samples import FlowSamples, draw_flow_samples, is_nir
from nirdml.analysis.inputs import AnalysisInput, load_input
from nirdml.analysis.projection import project_2d, resolve_method
from nirdml.analysis.render import ALARM_COLUMNS, render_html, report_numbers
from nirdml.analysis.retrieval_grid import (
    QueryScores,
    RetrievalRow,
    pick_queries,
    query_scores,
    render_retrieval_grid,
    retrieval_rows,
)
from nirdml.analysis.spread import ClassSpread, class_spread
from nirdml.errors import InputError, OutputExistsError
from nirdml.runtime import atomic_write, atomic_write_json, atomic_write_text, resolve_device


@dataclass
class AnalysisReport:
    """What :func:`analyze` wrote: the page, the PNGs (name -> path) and every number."""

    out_dir: Path
    html: Path
    files: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)


class _Stopwatch:
    """Wall time per named stage (``lap`` closes the stage that has just run)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


@dataclass
class AnalysisResult:
    """What :func:`compute_analysis` measured and drew, before rendering."""

    inp: AnalysisInput
    metrics: dict[str, float]
    spread: ClassSpread
    map_method: str
    """The 2-D map's method as used (``umap``, ``tsne`` or ``pca``)."""
    map_points: int
    """How many embeddings the 2-D map shows."""
    scores: QueryScores
    grids: dict[str, list[RetrievalRow]]
    """Retrieval grid PNG name -> its rows."""
    k: int
    """Neighbours per query in the grids."""
    seed: int
    figures: dict[str, bytes]
    """PNG name -> PNG bytes."""
    flow: FlowSamples | None = None
    flow_note: str | None = None
    """Why a NIR model has no flow samples (no training data), else None."""
    nir_alarm: dict[str, Any] | None = None
    """See :func:`nir_alarm`."""
    clock: _Stopwatch = field(default_factory=_Stopwatch)
    """Wall time per stage so far; writing adds its own."""


def map_subset(
    labels: np.ndarray, max_points: int, max_classes: int, seed: int
) -> tuple[np.ndarray, list[int]]:
    """Items for the 2-D map and the classes drawn in colour.

    Up to ``max_classes`` classes (all when there are that few, else a seeded random
    choice) are highlighted with all their items; the rest of the ``max_points`` budget
    is a seeded random sample of the other items, drawn in grey.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    if len(classes) <= max_classes:
        highlight = classes
    else:
        highlight = np.sort(rng.choice(classes, size=max_classes, replace=False))
    if len(labels) <= max_points:
        return np.arange(len(labels)), [int(c) for c in highlight]
    hl = np.flatnonzero(np.isin(labels, highlight))
    if len(hl) > max_points:
        hl = np.sort(rng.choice(hl, size=max_points, replace=False))
    others = np.flatnonzero(~np.isin(labels, highlight))
    fill = min(len(others), max_points - len(hl))
    picked = rng.choice(others, size=fill, replace=False) if fill > 0 else np.empty(0, int)
    return np.sort(np.concatenate([hl, picked])).astype(np.int64), [int(c) for c in highlight]


def _metric_names(inp: AnalysisInput, dataset_overridden: bool) -> list[str]:
    from nirdml.evaluation import DEFAULT_METRICS, STRUCTURE_METRICS
    from nirdml.training.build import eval_metrics

    if inp.run is not None and not dataset_overridden:
        names = eval_metrics(inp.run.config)
    else:
        names = list(DEFAULT_METRICS.get(inp.dataset or "folder", DEFAULT_METRICS["folder"]))
    for extra in ("map@r", "r_precision"):
        if extra not in names:
            names.append(extra)
    return [m for m in names if m not in STRUCTURE_METRICS] + list(STRUCTURE_METRICS)


def _num_clusters(inp: AnalysisInput, dataset_overridden: bool) -> int | None:
    """The run's k-means k (``eval.num_clusters``) on its own data; None otherwise."""
    from nirdml.training.build import eval_num_clusters

    if inp.run is None or dataset_overridden:
        return None
    return eval_num_clusters(inp.run.config, int(inp.run.state["num_classes"]))


def analyze(source: str | Path, out_dir: str | Path, **options: Any) -> AnalysisReport:
    """Analyse a checkpoint or an embeddings file and write ``out_dir/report.html``:
    :func:`compute_analysis` with the keyword ``options``, then :func:`write_report`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another -o folder")
    return write_report(compute_analysis(source, **options), out)


def compute_analysis(
    source: str | Path,
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str = "test",
    k: int = 8,
    num_queries: int = 8,
    map_method: str = "auto",
    map_points: int = 3000,
    map_classes: int = 20,
    flow_classes: list[int] | None = None,
    flow_temperature: float = 1.0,
    device: str = "auto",
    seed: int = 0,
) -> AnalysisResult:
    """Load, embed and measure ``source`` and draw the figures; nothing is written.

    Args:
        source: run folder, ``.pt`` checkpoint, or ``.npz``/``.pt`` embeddings file.
        dataset, root, split: which data a checkpoint embeds (default: its own test split).
        k: neighbours per query in the retrieval grids.
        num_queries: queries in each grid (random ones, and the worst ones).
        map_method: ``auto`` (UMAP if installed, else t-SNE), ``umap``, ``tsne``, ``pca``.
        map_points, map_classes: size of the 2-D map sample and classes drawn in colour.
        flow_classes: training classes to draw flow samples for (NIR models; default a
            seeded choice of 6).
        flow_temperature: flow samples use ``z ~ N(0, t^2 I)`` (1 = the model's own).
        device: ``auto``, ``cpu``, ``cuda``...
        seed: every random choice (queries, map sample, flow draws) comes from it.
    """
    watch = _Stopwatch()
    _check_options(k, num_queries, map_method)
    dev = resolve_device(device)
    inp = load_input(source, dataset=dataset, root=root, split=split, device=str(dev))
    _check_flow_input(inp, flow_classes)
    watch.lap("load_and_embed")
    overridden = dataset is not None or root is not None
    k = min(k, _check_classes(inp) - 1)
    figures: dict[str, bytes] = {}
    metrics = _metrics(inp, overridden, seed, dev)
    watch.lap("metrics")
    spread = _structure(inp, metrics, dev, figures)
    watch.lap("structure")
    shown, method = _map(inp, map_method, map_points, map_classes, seed, figures)
    watch.lap("map")
    scores = query_scores(inp.embeddings, inp.labels, device=dev)
    grids = _retrieval_grids(inp, scores, k, num_queries, seed, dev, figures)
    watch.lap("retrieval")
    result = AnalysisResult(inp, metrics, spread, method, shown, scores, grids, k, seed, figures)
    result.clock = watch
    return _add_run_extras(result, flow_classes, flow_temperature)


def _check_options(k: int, num_queries: int, map_method: str) -> None:
    """Refuse bad grid sizes and map methods before anything is loaded or embedded."""
    if k < 1 or num_queries < 1:
        raise InputError(f"k and num_queries must be >= 1, got k={k}, num_queries={num_queries}")
    resolve_method(map_method)  # a bad map method fails before anything is embedded


def _check_flow_input(inp: AnalysisInput, flow_classes: list[int] | None) -> None:
    """Refuse flow classes for an input without a flow (not a NIR checkpoint)."""
    if flow_classes and (inp.run is None or not is_nir(inp.run.loss)):
        raise InputError(
            "flow classes were given but the input is not a NIR checkpoint (no flow to sample)"
        )


def _add_run_extras(
    result: AnalysisResult, flow_classes: list[int] | None, temperature: float
) -> AnalysisResult:
    """What only a checkpoint has: flow samples (NIR), training curve and NIR alarm."""
    inp = result.inp
    result.flow, result.flow_note = _flow(
        inp, flow_classes, temperature, result.seed, result.figures
    )
    result.clock.lap("flow")
    if inp.run is not None:
        curve = _training_curve(inp.run)
        if curve is not None:
            result.figures["training.png"] = curve
        result.nir_alarm = nir_alarm(inp.run)
    return result


def _check_classes(inp: AnalysisInput) -> int:
    """The number of items; an InputError unless there are 2 classes and one with 2 items."""
    n = inp.embeddings.shape[0]
    counts = np.bincount(np.unique(inp.labels, return_inverse=True)[1])
    if len(counts) < 2 or counts.max() < 2:
        raise InputError(
            f"{inp.source}: {n} items in {len(counts)} class(es); the analysis needs at least 2 "
            "classes and a class with 2 or more items"
        )
    return n


def _metrics(inp: AnalysisInput, overridden: bool, seed: int, dev: Any) -> dict[str, float]:
    """The run's metrics (or the dataset's) plus map@r, r_precision and the structure ones."""
    from nirdml.evaluation import evaluate

    return evaluate(
        inp.embeddings,
        inp.labels,
        _metric_names(inp, overridden),
        num_clusters=_num_clusters(inp, overridden),
        seed=seed,
        device=dev,
    )


def _structure(
    inp: AnalysisInput, metrics: dict[str, float], dev: Any, figures: dict[str, bytes]
) -> ClassSpread:
    """Per-class spread; the singular value spectrum and spread figures."""
    from nirdml.evaluation import singular_values

    spread = class_spread(inp.embeddings, inp.labels)
    sv = singular_values(inp.embeddings, device=dev).numpy()
    figures["spectrum.png"] = plots.spectrum_plot(sv, metrics["rho_spectrum"])
    figures["spread.png"] = plots.spread_plot(spread.intra, spread.inter, spread.pi_ratio)
    return spread


def _map(
    inp: AnalysisInput,
    map_method: str,
    map_points: int,
    map_classes: int,
    seed: int,
    figures: dict[str, bytes],
) -> tuple[int, str]:
    """The 2-D map figure of a seeded subset: (points shown, method used)."""
    labels, n = inp.labels, inp.embeddings.shape[0]
    subset, highlight = map_subset(labels, map_points, map_classes, seed)
    xy, method = project_2d(inp.embeddings[subset].numpy(), map_method, seed)
    figures["map.png"] = plots.map_plot(
        xy,
        labels[subset],
        highlight,
        inp.class_names,
        method,
        f"{len(subset):,} of {n:,} embeddings",
    )
    return len(subset), method


def _flow(
    inp: AnalysisInput,
    flow_classes: list[int] | None,
    temperature: float,
    seed: int,
    figures: dict[str, bytes],
) -> tuple[FlowSamples | None, str | None]:
    """NIR flow samples and their figure (a NIR checkpoint with its training data), or a
    note saying why there are none."""
    if inp.run is None or not is_nir(inp.run.loss):
        return None, None
    if inp.train_data is None:
        return None, f"Flow samples skipped: {inp.train_data_error}."
    flow = draw_flow_samples(
        inp.run.model,
        inp.run.loss,
        inp.train_data,
        classes=flow_classes,
        temperature=temperature,
        seed=seed,
        batch_size=inp.run.config.eval.batch_size,
    )
    figures["flow_samples.png"] = plots.flow_plot(flow.real, flow.samples, flow.proxies, flow.names)
    return flow, None


def write_report(result: AnalysisResult, out_dir: str | Path) -> AnalysisReport:
    """Write the PNGs, ``report.json`` (with the stage timings) and ``report.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        name: atomic_write(out / name, lambda f, b=png: f.write(b))
        for name, png in result.figures.items()
    }
    numbers = report_numbers(result)
    result.clock.lap("write")
    numbers["timings_s"] = result.clock.timings
    numbers["seconds"] = result.clock.total()
    files["report.json"] = atomic_write_json(out / "report.json", json_safe(numbers))
    files["report.html"] = atomic_write_text(out / "report.html", render_html(result))
    return AnalysisReport(out, files["report.html"], files, numbers)


def _retrieval_grids(
    inp: AnalysisInput,
    scores: QueryScores,
    k: int,
    num_queries: int,
    seed: int,
    device: Any,
    figures: dict[str, bytes],
) -> dict[str, list[RetrievalRow]]:
    """Grids of random queries (one per class) and of the worst queries, into ``figures``."""

    def note(i: int) -> str:
        hit = int(scores.first_hit[i])
        where = (
            f"first same-class item at rank {hit}"
            if hit
            else f"no same-class item in the first {scores.window}"
        )
        return (
            f"{scores.metric} {scores.ap[i]:.3f}, {where} (sim "
            f"{scores.nearest_positive[i]:.3f}), {int(scores.num_relevant[i])} in gallery"
        )

    random_q = pick_queries(inp.labels, num_queries, seed)
    worst_q = scores.worst(num_queries)
    grids = {}
    for name, queries, title in (
        ("retrieval_random.png", random_q, f"{len(random_q)} random queries (one per class)"),
        ("retrieval_worst.png", worst_q, f"the {len(worst_q)} worst queries by {scores.metric}"),
    ):
        rows = retrieval_rows(
            inp.embeddings,
            inp.labels,
            queries,
            k,
            notes={i: note(i) for i in queries},
            device=device,
        )
        figures[name], _ = render_retrieval_grid(
            rows, inp.images, inp.class_names, title=f"{title}, top {k}"
        )
        grids[name] = rows
    return grids


def nir_alarm(run: Any) -> dict[str, Any] | None:
    """The training run's inertness alarm per epoch (from the checkpoint's history): the
    tangent gradient ratio NIR / proxy on the embeddings, the NIR term, NLL mean/min/max,
    and whether the epoch was inert; None for runs without NIR or without the alarm."""
    history = [r for r in run.state.get("history", []) if "train/nir_grad_ratio" in r]
    if not history:
        return None
    n = run.config.loss.nir
    epochs = [
        {"epoch": r["epoch"], **{name: r.get(key) for key, name in ALARM_COLUMNS}} for r in history
    ]
    return {
        "objective": n.objective,
        "threshold": n.alarm_threshold,
        "inert_epochs": [e["epoch"] for e in epochs if e["inert"]],
        "epochs": epochs,
    }


def _training_curve(run: Any) -> bytes | None:
    """The selection metric per evaluated epoch (test, and val if any), from the history."""
    history = list(run.state.get("history", []))
    select = run.config.eval.select_metric
    curves = []
    for split in ("test", "val"):
        key = f"{split}/{select}"
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ep, val = zip(*pts, strict=True)
            curves.append(plots.Curve(split, np.asarray(ep), np.asarray([val], dtype=float)))
    if not curves:
        return None
    return plots.curves_plot(
        curves, select, f"{select} per epoch during training ({run.config.name})"
    )
