"""Rendering an :class:`~nirdml.analysis.report.AnalysisResult`: ``report.json``'s numbers
(:func:`report_numbers`) and the self-contained ``report.html`` (:func:`render_html`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nirdml.analysis import html as H
from nirdml.losses.registry import LOSSES

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from nirdml.analysis.report import AnalysisResult
    from nirdml.analysis.retrieval_grid import RetrievalRow

ALARM_COLUMNS = (
    ("train/nir_grad_ratio", "grad_ratio"),
    ("train/nir_grad_ratio_max", "grad_ratio_max"),
    ("train/nir", "nir_term"),
    ("train/nll", "nll_mean"),
    ("train/nll_min", "nll_min"),
    ("train/nll_max", "nll_max"),
    ("train/nir_inert", "inert"),
)
"""The alarm's per-epoch columns: training-history key -> name in report.json."""


def render_html(result: AnalysisResult) -> str:
    """The self-contained report page (every figure embedded as a data URI), section by
    section."""
    title = f"nirdml analysis: {Path(result.inp.source).name}"
    parts = [f"<h1>{H.esc(title)}</h1>"]
    for section in (
        _header,
        _nav,
        _metrics_section,
        _structure_section,
        _map_section,
        _retrieval_section,
        _flow_section,
        _training_section,
        _footer,
    ):
        parts += section(result)
    return H.page(title, "\n".join(parts))


def _header(result: AnalysisResult) -> list[str]:
    """What was analysed: the input, its size and, for a checkpoint, the run."""
    inp = result.inp
    n, d = inp.embeddings.shape
    parts = [
        f'<p class="meta">{H.esc(inp.description)}<br>{n:,} items, '
        f"{len(result.spread.classes):,} classes, {d}-dim embeddings. Every item queries all "
        "other items (self excluded).</p>"
    ]
    if inp.run is not None:
        cfg = inp.run.config
        nir = LOSSES[cfg.loss.name].title
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
    return parts


def _nav(result: AnalysisResult) -> list[str]:
    nav = [
        ("metrics", "Metrics"),
        ("structure", "Structure"),
        ("map", "2-D map"),
        ("retrieval", "Retrieval"),
    ]
    if result.flow is not None or result.flow_note:
        nav.append(("flow", "Flow samples"))
    if "training.png" in result.figures:
        nav.append(("training", "Training"))
    if result.nir_alarm is not None:
        nav.append(("nir_alarm", "NIR alarm"))
    return ["<nav>" + "".join(f'<a href="#{a}">{H.esc(t)}</a>' for a, t in nav) + "</nav>"]


def _metrics_section(result: AnalysisResult) -> list[str]:
    rows = [(name, float(v), _help(name)) for name, v in result.metrics.items()]
    return ['<h2 id="metrics">Metrics</h2>', _metric_table(rows)]


def _structure_section(result: AnalysisResult) -> list[str]:
    """rho, pi ratio, G2, the spectrum and spread figures, the tightest and widest classes."""
    metrics, figures, spread, inp = result.metrics, result.figures, result.spread, result.inp
    parts = ['<h2 id="structure">Structure of the space</h2>']
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
    return parts


def _map_section(result: AnalysisResult) -> list[str]:
    method = result.map_method
    mname = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}[method]
    return [
        '<h2 id="map">2-D map</h2>',
        H.figure(
            "map.png",
            result.figures["map.png"],
            f"{mname} of {result.map_points:,} test embeddings; up to 20 classes in colour, the "
            "others grey."
            + (" (UMAP is used when umap-learn is installed.)" if method == "tsne" else ""),
            "2-D map of the embeddings",
        ),
    ]


def _retrieval_section(result: AnalysisResult) -> list[str]:
    parts = ['<h2 id="retrieval">Retrieval</h2>']
    parts.append(
        f"<p>Each row: the query (blue frame) and its {result.k} nearest other items by "
        "distance, framed <b style='color:#00aa00'>green</b> when they share the query's class "
        "and <b style='color:#dc1e1e'>red</b> otherwise; sim = cosine similarity. "
        f"Worst queries are those with the lowest per-query {H.esc(result.scores.metric)} "
        "(ties: latest first hit).</p>"
    )
    if result.inp.images is None:
        parts.append(
            '<p class="note">The embeddings file has no image paths: tiles show '
            "class names only.</p>"
        )
    for png, caption, alt in (
        ("retrieval_random.png", "Random queries, one per class.", "random queries"),
        ("retrieval_worst.png", "The worst queries.", "worst queries"),
    ):
        parts.append(H.figure(png, result.figures[png], caption, f"retrieval grid, {alt}"))
    return parts


def _flow_section(result: AnalysisResult) -> list[str]:
    """NIR flow samples next to the real embeddings (or why there are none)."""
    flow = result.flow
    if flow is None:
        if not result.flow_note:
            return []
        return ['<h2 id="flow">Flow samples</h2>', f'<p class="note">{H.esc(result.flow_note)}</p>']
    d = result.inp.embeddings.shape[1]
    parts = ['<h2 id="flow">Flow samples around class proxies</h2>']
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
            result.figures["flow_samples.png"],
            "Flow samples (x) and real embeddings (dots) per class; the star is the proxy.",
            "flow samples next to real embeddings",
        )
    )
    keys = ("spread_real", "spread_samples", "norm_samples", "cos_real_proxy")
    keys += ("cos_samples_proxy", "nearest_proxy_real", "nearest_proxy_samples")
    keys += ("nll_real", "z_norm_real")
    srows = [
        (nm, int(st["n_real"]), *(st[k] for k in keys))
        for nm, st in zip(flow.names, flow.stats, strict=True)
    ]
    columns = ["class", "real items", "spread real", "spread samples", "|sample|"]
    columns += ["cos(real, proxy)", "cos(samples, proxy)", "nearest proxy: real"]
    columns += ["nearest proxy: samples", "NLL real", "|z| real"]
    parts.append(H.table(columns, srows))
    return parts


def _training_section(result: AnalysisResult) -> list[str]:
    if "training.png" not in result.figures:
        return []
    return [
        '<h2 id="training">Training</h2>',
        H.figure(
            "training.png",
            result.figures["training.png"],
            "The selection metric per evaluated epoch, from the checkpoint's history.",
            "training curve",
        ),
    ]


def _footer(result: AnalysisResult) -> list[str]:
    return [
        ("" if result.nir_alarm is None else _alarm_html(result.nir_alarm))
        + '<p class="meta">Written by nirdml analyze. Every figure is embedded in this '
        "page and also saved as the PNG linked under it; report.json holds the "
        "numbers.</p>"
    ]


def _metric_table(rows: list[tuple[str, float, str]]) -> str:
    body = "".join(
        f'<tr><td class="l">{H.esc(n)}</td><td>{H.fmt(v)}</td><td class="l">{H.esc(h)}</td></tr>'
        for n, v, h in rows
    )
    return (
        '<table><thead><tr><th class="l">metric</th><th>value</th>'
        f'<th class="l">meaning</th></tr></thead><tbody>{body}</tbody></table>'
    )


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


def report_numbers(result: AnalysisResult) -> dict[str, Any]:
    """Every number of the report (``report.json`` without the timings)."""
    inp, spread, scores, flow = result.inp, result.spread, result.scores, result.flow
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
        "seed": result.seed,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "structure": {
            "rho_spectrum": float(result.metrics["rho_spectrum"]),
            "pi_ratio": float(result.metrics["pi_ratio"]),
            "uniformity_g2": float(result.metrics["uniformity_g2"]),
            "mean_class_spread": float(np.nanmean(spread.intra)),
            "mean_centre_distance": float(spread.inter),
            "tightest_classes": [cls(i) for i in tight],
            "widest_classes": [cls(i) for i in wide],
        },
        "map": {"method": result.map_method, "points": int(result.map_points)},
        "query_scores": {
            "metric": scores.metric,
            "mean": float(scores.ap[valid].mean()) if valid.any() else float("nan"),
            "queries_without_hit_in_window": int(((scores.first_hit == 0) & valid).sum()),
            "window": scores.window,
        },
        "retrieval": {
            name: [_row_json(r, inp.paths) for r in rows] for name, rows in result.grids.items()
        },
        "flow": None
        if flow is None
        else [
            {"class": c, "name": nm, **st}
            for c, nm, st in zip(flow.classes, flow.names, flow.stats, strict=True)
        ],
        "nir_alarm": result.nir_alarm,
    }


def _row_json(row: RetrievalRow, paths: list[str] | None) -> dict[str, Any]:
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
