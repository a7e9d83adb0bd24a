"""``analyze``: one self-contained HTML report of an embedding space.

The report holds the metric table, the structure metrics (singular value spectrum and rho,
pi ratio, G2, per-class spread), a 2-D map coloured by class, retrieval grids of random and
of the worst queries, and for NIR models flow samples next to real embeddings. Every
figure is written as a PNG into the output folder AND embedded in ``report.html`` as a
data URI, so the page opens anywhere on its own; ``report.json`` has every number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.analysis import html as H
from nirdml.analysis import plots
from nirdml.analysis._json import json_safe
from nirdml.analysis.flow_samples import FlowSamples, draw_flow_samples, is_nir
from nirdml.analysis.inputs import AnalysisInput, load_input
from nirdml.analysis.projection import project_2d
from nirdml.analysis.retrieval_grid import (
    pick_queries,
    query_scores,
    render_retrieval_grid,
    retrieval_rows,
)
from nirdml.analysis.spread import class_spread
from nirdml.runtime import atomic_write, atomic_write_json, atomic_write_text, resolve_device

STRUCTURE = ("rho_spectrum", "pi_ratio", "uniformity_g2")


@dataclass
class AnalysisReport:
    """What :func:`analyze` wrote: the page, the PNGs (name -> path) and every number."""

    out_dir: Path
    html: Path
    files: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)


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
    from nirdml.evaluation import DEFAULT_METRICS
    from nirdml.training.trainer import eval_metrics

    if inp.run is not None and not dataset_overridden:
        names = eval_metrics(inp.run.config)
    else:
        names = list(DEFAULT_METRICS.get(inp.dataset or "folder", DEFAULT_METRICS["folder"]))
    for extra in ("map@r", "r_precision"):
        if extra not in names:
            names.append(extra)
    return [m for m in names if m not in STRUCTURE] + list(STRUCTURE)


def _num_clusters(inp: AnalysisInput, dataset_overridden: bool) -> int | None:
    run = inp.run
    if (
        run is not None
        and not dataset_overridden
        and run.config.eval.num_clusters == "train_classes"
    ):
        return int(run.state["num_classes"])
    return None


def analyze(
    source: str | Path,
    out_dir: str | Path,
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
) -> AnalysisReport:
    """Analyse a checkpoint or an embeddings file and write ``out_dir/report.html``.

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
    from nirdml.evaluation import evaluate, singular_values

    watch = _Stopwatch()
    if k < 1 or num_queries < 1:
        raise ValueError(f"k and num_queries must be >= 1, got k={k}, num_queries={num_queries}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another -o folder")
    dev = resolve_device(device)
    inp = load_input(source, dataset=dataset, root=root, split=split, device=str(dev))
    if flow_classes and (inp.run is None or not is_nir(inp.run.loss)):
        raise ValueError(
            "flow classes were given but the input is not a NIR checkpoint (no flow to sample)"
        )
    watch.lap("load_and_embed")
    overridden = dataset is not None or root is not None
    emb, labels = inp.embeddings, inp.labels
    n = emb.shape[0]
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    if len(counts) < 2 or counts.max() < 2:
        raise ValueError(
            f"{inp.source}: {n} items in {len(counts)} class(es); the analysis needs at least 2 "
            "classes and a class with 2 or more items"
        )
    k = min(k, n - 1)
    figures: dict[str, bytes] = {}

    metrics = evaluate(
        emb,
        labels,
        _metric_names(inp, overridden),
        num_clusters=_num_clusters(inp, overridden),
        seed=seed,
        device=dev,
    )
    watch.lap("metrics")

    spread = class_spread(emb, labels)
    sv = singular_values(emb, device=dev).numpy()
    figures["spectrum.png"] = plots.spectrum_plot(sv, metrics["rho_spectrum"])
    figures["spread.png"] = plots.spread_plot(spread.intra, spread.inter, spread.pi_ratio)
    watch.lap("structure")

    subset, highlight = map_subset(labels, map_points, map_classes, seed)
    xy, method = project_2d(emb[subset].numpy(), map_method, seed)
    figures["map.png"] = plots.map_plot(
        xy,
        labels[subset],
        highlight,
        inp.class_names,
        method,
        f"{len(subset):,} of {n:,} embeddings",
    )
    watch.lap("map")

    scores = query_scores(emb, labels, device=dev)
    grids = _retrieval_grids(inp, scores, k, num_queries, seed, dev, figures)
    watch.lap("retrieval")

    flow: FlowSamples | None = None
    flow_note = None
    if inp.run is not None and is_nir(inp.run.loss):
        if inp.train_data is None:
            flow_note = f"Flow samples skipped: {inp.train_data_error}."
        else:
            flow = draw_flow_samples(
                inp.run.model,
                inp.run.loss,
                inp.train_data,
                classes=flow_classes,
                temperature=flow_temperature,
                seed=seed,
                batch_size=inp.run.config.eval.batch_size,
            )
            figures["flow_samples.png"] = plots.flow_plot(
                flow.real, flow.samples, flow.proxies, flow.names
            )
    watch.lap("flow")

    if inp.run is not None:
        curve = _training_curve(inp.run)
        if curve is not None:
            figures["training.png"] = curve

    out.mkdir(parents=True, exist_ok=True)
    files = {
        name: atomic_write(out / name, lambda f, b=png: f.write(b)) for name, png in figures.items()
    }
    numbers = _numbers(inp, metrics, spread, method, len(subset), scores, grids, flow, seed)
    numbers["nir_alarm"] = nir_alarm(inp.run) if inp.run is not None else None
    watch.lap("write")
    numbers["timings_s"] = watch.timings
    numbers["seconds"] = watch.total()
    files["report.json"] = atomic_write_json(out / "report.json", json_safe(numbers))
    page = _render_html(
        inp, metrics, spread, figures, method, subset, scores, grids, flow, flow_note, k
    )
    if numbers["nir_alarm"] is not None:
        page = page.replace("</nav>", '<a href="#nir_alarm">NIR alarm</a></nav>', 1)
        marker = '<p class="meta">Written by nirdml analyze.'
        page = page.replace(marker, _alarm_html(numbers["nir_alarm"]) + marker, 1)
    files["report.html"] = atomic_write_text(out / "report.html", page)
    return AnalysisReport(out, files["report.html"], files, numbers)


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


def _retrieval_grids(inp, scores, k, num_queries, seed, device, figures) -> dict[str, list]:
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


ALARM_COLUMNS = (
    ("train/nir_grad_ratio", "grad_ratio"),
    ("train/nir_grad_ratio_max", "grad_ratio_max"),
    ("train/nir", "nir_term"),
    ("train/nll", "nll_mean"),
    ("train/nll_min", "nll_min"),
    ("train/nll_max", "nll_max"),
    ("train/nir_inert", "inert"),
)


def nir_alarm(run) -> dict[str, Any] | None:
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


def _alarm_html(alarm: dict[str, Any]) -> str:
    rows = [
        [e["epoch"], *(e[name] for _, name in ALARM_COLUMNS[:-1]), "INERT" if e["inert"] else ""]
        for e in alarm["epochs"]
    ]
    inert = alarm["inert_epochs"]
    verdict = (
        f"<b>inert</b> in epoch(s) {', '.join(map(str, inert))}: NIR's gradient on the "
        "embeddings stayed below the threshold on every measured batch, so the regulariser "
        "did nothing there (use a bounded objective, e.g. loss.nir.objective=noise_nll_spread)"
        if inert
        else "acting in every epoch"
    )
    return (
        '<h2 id="nir_alarm">NIR inertness alarm</h2>'
        f"<p>Objective <code>{H.esc(alarm['objective'])}</code>; threshold "
        f"{alarm['threshold']:g} on the ratio of NIR's tangent gradient on the embeddings to "
        f"the proxy loss's (one batch per logging interval; geometric mean and max per "
        f"epoch). The regulariser was {verdict}.</p>"
        + H.table(
            [
                "epoch",
                "ratio (geo-mean)",
                "ratio (max)",
                "NIR term",
                "NLL mean",
                "NLL min",
                "NLL max",
                "",
            ],
            rows,
            text=(7,),
        )
    )


def _training_curve(run) -> bytes | None:
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


def _row_json(row, paths: list[str] | None) -> dict[str, Any]:
    d = {
        "query": row.query,
        "label": row.label,
        "neighbours": row.neighbours,
        "neighbour_labels": row.neighbour_labels,
        "similarities": [round(s, 6) for s in row.similarities],
        "correct": row.correct,
    }
    if paths:
        d["query_path"] = paths[row.query]
        d["neighbour_paths"] = [paths[j] for j in row.neighbours]
    return d


def _numbers(inp, metrics, spread, method, map_n, scores, grids, flow, seed) -> dict[str, Any]:
    tight, wide = spread.extremes(10)

    def cls(i: int) -> dict[str, Any]:
        c = int(spread.classes[i])
        return {
            "label": c,
            "name": inp.class_names[c] if c < len(inp.class_names) else str(c),
            "items": int(spread.counts[i]),
            "spread": float(spread.intra[i]),
        }

    valid = ~np.isnan(scores.ap)
    return {
        "source": inp.source,
        "kind": inp.kind,
        "description": inp.description,
        "dataset": inp.dataset,
        "split": inp.split,
        "items": int(inp.embeddings.shape[0]),
        "dim": int(inp.embeddings.shape[1]),
        "classes": int(len(spread.classes)),
        "seed": seed,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "structure": {
            "rho_spectrum": float(metrics["rho_spectrum"]),
            "pi_ratio": float(metrics["pi_ratio"]),
            "uniformity_g2": float(metrics["uniformity_g2"]),
            "mean_class_spread": float(np.nanmean(spread.intra)),
            "mean_centre_distance": float(spread.inter),
            "tightest_classes": [cls(i) for i in tight],
            "widest_classes": [cls(i) for i in wide],
        },
        "map": {"method": method, "points": int(map_n)},
        "query_scores": {
            "metric": scores.metric,
            "mean": float(scores.ap[valid].mean()) if valid.any() else float("nan"),
            "queries_without_hit_in_window": int(((scores.first_hit == 0) & valid).sum()),
            "window": scores.window,
        },
        "retrieval": {
            name: [_row_json(r, inp.paths) for r in rows] for name, rows in grids.items()
        },
        "flow": None
        if flow is None
        else [
            {"class": c, "name": nm, **st}
            for c, nm, st in zip(flow.classes, flow.names, flow.stats, strict=True)
        ],
    }


METRIC_HELP = {
    "recall@": "fraction of queries with a same-class item among their k nearest others",
    "map@r": "MAP@R (Musgrave et al. 2020)",
    "r_precision": "R-Precision (Musgrave et al. 2020)",
    "map@1000_authors": "the NIR authors' mAP@1000 (divided by the class size incl. the query)",
    "map@1000": "AP truncated at 1000, divided by min(1000, R)",
    "nmi": "NMI of k-means clusters vs classes",
    "ami": "adjusted mutual information",
    "f1": "pairwise F1 of k-means clusters",
    "rho_spectrum": "KL(uniform || normalised singular values); lower = more directions used",
    "pi_ratio": "mean intra-class distance / mean distance between class centres",
    "uniformity_g2": "mean exp(-2 ||a - b||^2) over pairs; lower = more uniform",
}


def _help(name: str) -> str:
    if name.startswith("recall@"):
        return METRIC_HELP["recall@"]
    return METRIC_HELP.get(name, "")


def _render_html(inp, metrics, spread, figures, method, subset, scores, grids, flow, flow_note, k):
    n, d = inp.embeddings.shape
    title = f"nirdml analysis: {Path(inp.source).name}"
    parts = [f"<h1>{H.esc(title)}</h1>"]
    parts.append(
        f'<p class="meta">{H.esc(inp.description)}<br>{n:,} items, {len(spread.classes):,} '
        f"classes, {d}-dim embeddings. Every item queries all other items (self excluded).</p>"
    )
    if inp.run is not None:
        cfg = inp.run.config
        nir = "ProxyAnchor" if cfg.loss.name == "proxy_anchor" else cfg.loss.name
        nir += " + NIR" if cfg.loss.nir.enabled else " (no NIR)"
        best = inp.run.state.get("best") or {}
        parts.append(
            f'<p class="meta">Run <b>{H.esc(cfg.name)}</b>: {H.esc(cfg.model.arch)}, '
            f"{H.esc(nir)}, seed {cfg.seed}, {len(inp.run.state.get('history', []))} of "
            f"{cfg.epochs} epochs trained"
            + (
                f"; best {H.esc(best.get('metric'))} {best.get('value', float('nan')):.4f} "
                f"at epoch {best.get('epoch')} (selected on {H.esc(best.get('selected_on'))})"
                if best
                else ""
            )
            + ".</p>"
        )
    nav = [
        ("metrics", "Metrics"),
        ("structure", "Structure"),
        ("map", "2-D map"),
        ("retrieval", "Retrieval"),
    ]
    if flow is not None or flow_note:
        nav.append(("flow", "Flow samples"))
    if "training.png" in figures:
        nav.append(("training", "Training"))
    parts.append("<nav>" + "".join(f'<a href="#{a}">{H.esc(t)}</a>' for a, t in nav) + "</nav>")

    parts.append('<h2 id="metrics">Metrics</h2>')
    rows = [(name, float(v), _help(name)) for name, v in metrics.items()]
    parts.append(_metric_table(rows))

    parts.append('<h2 id="structure">Structure of the space</h2>')
    parts.append(
        f"<p>rho = <b>{metrics['rho_spectrum']:.4f}</b>, pi ratio = "
        f"<b>{metrics['pi_ratio']:.4f}</b>, G2 = <b>{metrics['uniformity_g2']:.4f}</b>. "
        "Lower rho = a flatter singular-value spectrum (more directions used); higher pi "
        "ratio = classes wider relative to their distance; lower G2 = more uniform. The paper "
        "reports that NIR lowers rho and raises the pi ratio on CUB200 (rho 0.19 to 0.13, pi "
        "0.68 to 0.79); this is a claim about its ResNet50 runs, not a property of every NIR "
        "run: nirdml's Omniglot study measured the opposite for rho and G2 (+ NIR rho 1.87 vs "
        "1.46, G2 0.85 vs 0.38). Compare a baseline and a + NIR run of the same setting "
        "(<code>nirdml analyze</code> on each) to see the direction on your data.</p>"
    )
    parts.append(
        H.figure(
            "spectrum.png",
            figures["spectrum.png"],
            "Singular values of the embedding matrix, normalised to sum 1.",
            "singular value spectrum",
        )
    )
    parts.append(
        H.figure(
            "spread.png",
            figures["spread.png"],
            "Per-class spread: mean cosine distance between the items of a class; "
            "dashed: mean distance between class centres.",
            "per-class spread",
        )
    )
    tight, wide = spread.extremes(5)

    def name(i: int) -> str:
        c = int(spread.classes[i])
        return inp.class_names[c] if c < len(inp.class_names) else str(c)

    ext_rows = [
        (
            name(t),
            int(spread.counts[t]),
            float(spread.intra[t]),
            name(w),
            int(spread.counts[w]),
            float(spread.intra[w]),
        )
        for t, w in zip(tight, wide, strict=False)
    ]
    parts.append("<h3>Tightest and widest classes</h3>")
    parts.append(
        H.table(
            ["tightest class", "items", "spread", "widest class", "items", "spread"],
            ext_rows,
            text=(0, 3),
        )
    )

    parts.append('<h2 id="map">2-D map</h2>')
    mname = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}[method]
    parts.append(
        H.figure(
            "map.png",
            figures["map.png"],
            f"{mname} of {len(subset):,} test embeddings; up to 20 classes in colour, the others "
            "grey." + (" (UMAP is used when umap-learn is installed.)" if method == "tsne" else ""),
            "2-D map of the embeddings",
        )
    )

    parts.append('<h2 id="retrieval">Retrieval</h2>')
    parts.append(
        f"<p>Each row: the query (blue frame) and its {k} nearest other items by distance, "
        "framed <b style='color:#00aa00'>green</b> when they share the query's class and "
        "<b style='color:#dc1e1e'>red</b> otherwise; sim = cosine similarity. "
        f"Worst queries are those with the lowest per-query {H.esc(scores.metric)} "
        "(ties: latest first hit).</p>"
    )
    if inp.images is None:
        parts.append(
            '<p class="note">The embeddings file has no image paths: tiles show '
            "class names only.</p>"
        )
    parts.append(
        H.figure(
            "retrieval_random.png",
            figures["retrieval_random.png"],
            "Random queries, one per class.",
            "retrieval grid, random queries",
        )
    )
    parts.append(
        H.figure(
            "retrieval_worst.png",
            figures["retrieval_worst.png"],
            "The worst queries.",
            "retrieval grid, worst queries",
        )
    )

    if flow is not None:
        parts.append('<h2 id="flow">Flow samples around class proxies</h2>')
        parts.append(
            "<p>The NIR flow maps a Gaussian residual z to an embedding given the class proxy. "
            f"Here {len(flow.classes)} training classes: {int(flow.stats[0]['n_samples'])} "
            "samples x = tau(z | proxy), "
            + (
                "z ~ N(0, I)"
                if flow.temperature == 1.0
                else f"z ~ N(0, {flow.temperature:g}<sup>2</sup> I)"
            )
            + ", next to the class's real training embeddings (test transform). Spread = mean "
            "cosine distance to the set's mean direction; nearest proxy = share whose most "
            "similar proxy (of all training classes) is their own class's; |z| real = mean norm "
            "of the real embeddings mapped back to the flow's base space, to compare with "
            f"sqrt(D) = {math.sqrt(d):.1f} for draws from N(0, I).</p>"
        )
        parts.append(
            H.figure(
                "flow_samples.png",
                figures["flow_samples.png"],
                "Flow samples (x) and real embeddings (dots) per class; the star is the proxy.",
                "flow samples next to real embeddings",
            )
        )
        srows = [
            (
                nm,
                int(st["n_real"]),
                st["spread_real"],
                st["spread_samples"],
                st["norm_samples"],
                st["cos_real_proxy"],
                st["cos_samples_proxy"],
                st["nearest_proxy_real"],
                st["nearest_proxy_samples"],
                st["nll_real"],
                st["z_norm_real"],
            )
            for nm, st in zip(flow.names, flow.stats, strict=True)
        ]
        parts.append(
            H.table(
                [
                    "class",
                    "real items",
                    "spread real",
                    "spread samples",
                    "|sample|",
                    "cos(real, proxy)",
                    "cos(samples, proxy)",
                    "nearest proxy: real",
                    "nearest proxy: samples",
                    "NLL real",
                    "|z| real",
                ],
                srows,
            )
        )
    elif flow_note:
        parts.append('<h2 id="flow">Flow samples</h2>')
        parts.append(f'<p class="note">{H.esc(flow_note)}</p>')

    if "training.png" in figures:
        parts.append('<h2 id="training">Training</h2>')
        parts.append(
            H.figure(
                "training.png",
                figures["training.png"],
                "The selection metric per evaluated epoch, from the checkpoint's history.",
                "training curve",
            )
        )
    parts.append(
        '<p class="meta">Written by nirdml analyze. Every figure is embedded in this '
        "page and also saved as the PNG linked under it; report.json holds the "
        "numbers.</p>"
    )
    return H.page(title, "\n".join(parts))


def _metric_table(rows: list[tuple[str, float, str]]) -> str:
    body = "".join(
        f'<tr><td class="l">{H.esc(n)}</td><td>{H.fmt(v)}</td><td class="l">{H.esc(h)}</td></tr>'
        for n, v, h in rows
    )
    return (
        '<table><thead><tr><th class="l">metric</th><th>value</th>'
        f'<th class="l">meaning</th></tr></thead><tbody>{body}</tbody></table>'
    )
