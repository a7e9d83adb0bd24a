"""The ``nirdml`` command: a thin layer over library calls (each subcommand is one function)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from nirdml import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from nirdml.training.config import check_data_root, load_config

    progress = not args.quiet
    if args.resume and (args.config or args.set):
        print(
            "nirdml train: error: --resume continues a run with its saved config; drop PRESET "
            "and --set.",
            file=sys.stderr,
        )
        return 2
    # The config and its data paths are checked before torch is imported: config errors are
    # quick.
    cfg = None if args.resume else load_config(args.config, args.set)
    if cfg is not None:
        check_data_root(cfg.data)
    from nirdml.errors import NoImprovementWarning
    from nirdml.training.quickstart import compare_table, run_default
    from nirdml.training.trainer import check_new_out, train

    if args.out is not None and args.config is not None:
        check_new_out(args.out)
    with warnings.catch_warnings():  # each run's verdict is printed below, once
        warnings.simplefilter("ignore", NoImprovementWarning)
        if args.resume:
            results = [train(out_dir=args.resume, resume=True, progress=progress)]
        elif args.config is None:
            results = run_default(args.out or "runs", overrides=args.set, progress=progress)
        else:
            results = [train(cfg, args.out, progress=progress)]
    if args.config is None and not args.resume:
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
            return 0
        print()
        print(
            "Embedded default: sklearn digits; train on digits 0-4 (2 of them held out as a "
            "validation split that selects the epoch), retrieve among the unseen 5-9 (test)"
        )
        print(compare_table(results))
        print()
        for r in results:
            found = (r.summary.get("reference") or {}).get("verdict")
            verdict = "" if found is None else f" ({found['message'].split('. ')[0]})"
            print(f"{r.summary['name']}: {r.out_dir}{verdict}")
        return 0
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    for r in results:
        print(summary_line(r.summary, str(r.out_dir)))
    found = (results[-1].summary.get("reference") or {}).get("verdict")
    if found is not None:  # the last line: did training beat the untrained features?
        print(("" if found["beats"] else "WARNING: ") + found["message"])
    return 0


def follow_up(command: str, config: str | None, settings: Sequence[str], *extra: str) -> str:
    """The command line of a follow-up command (``nirdml train PRESET --set ...``) carrying
    the ``--set`` settings this command was given, then ``extra`` settings, which replace a
    given setting of the same key; shell-quoted, ready to paste."""
    import shlex

    keys = {e.split("=", 1)[0].strip() for e in extra}
    kept = [s for s in settings if s.split("=", 1)[0].strip() not in keys]
    words = ["nirdml", command, *([config] if config else [])]
    for setting in [*kept, *extra]:
        words += ["--set", setting]
    return shlex.join(words)


def summary_line(summary: dict, out_dir: str) -> str:
    """One line per run: the TEST metric at the selected epoch, and the split that chose it."""
    best = summary.get("best") or {}
    metric, split = best.get("metric"), best.get("selected_on")
    values = best.get("metrics", {})
    test = values.get(f"test/{metric}", float("nan"))
    chosen = f"selected on {split}"
    if split != "test" and f"{split}/{metric}" in values:
        chosen += f" {metric} {values[f'{split}/{metric}']:.4f}"
    corrupt = (summary.get("corrupt_images") or {}).get("replaced", 0)
    replaced = f"; {corrupt} unreadable image(s) replaced" if corrupt else ""
    return (
        f"{summary['name']}: test {metric} {test:.4f} at epoch {best.get('epoch')} ({chosen}); "
        f"skipped steps {summary['skipped_steps']}{replaced}; outputs in {out_dir}"
    )


def _cmd_features(args: argparse.Namespace) -> int:
    from nirdml.training.config import check_data_root, load_config

    cfg = load_config(args.config, args.set)
    check_data_root(cfg.data)
    from nirdml.training.features import build_feature_cache

    cache = build_feature_cache(
        cfg,
        args.out,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        progress=not args.quiet,
    )
    stats = cache.meta.get("stats", {})
    item = "x".join(str(n) for n in cache.test.shape[1:])
    cut = cache.meta["backbone"].get("cut")
    what = f"activations entering {cut}" if cut else "pooled features"
    print(
        f"feature cache {cache.path}: {cache.train_views.shape[0]} views x "
        f"{cache.train_views.shape[1]:,} train + {cache.test.shape[0]:,} test images, "
        f"{what} {item} ({cache.meta['dtype']}), {cache.nbytes / 2**20:.1f} MiB; "
        f"{stats.get('images_per_s_this_session', 0):.1f} images/s when built. Train on it: "
        + follow_up("train", args.config, args.set, f"data.features={cache.path}")
        + " [--set seed=N ...]"
    )
    return 0


def _checkpoint(path: str) -> str:
    """The checkpoint file a command argument stands for (a run folder: its best.pt, else
    last.pt; :func:`nirdml.training.checkpoint.resolve_checkpoint`)."""
    from nirdml.training.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(path))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nirdml.training.artifacts import evaluate_checkpoint

    info: dict = {}
    metrics = evaluate_checkpoint(
        _checkpoint(args.checkpoint),
        split=args.split,
        dataset=args.dataset,
        root=args.root,
        metrics=args.metrics,
        device=args.device,
        info=info,
        no_relevant=args.no_relevant,
        average=args.average,
    )
    print(
        f"using {info['checkpoint']} (epoch {info['epoch']}); {info['dataset']} split "
        f"{info['split']}: {info['items']:,} items, {info['classes']:,} classes"
    )
    width = max(len(k) for k in metrics) if metrics else 0
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    if args.out:
        from nirdml.runtime import atomic_write_json

        print(f"wrote {atomic_write_json(args.out, metrics)}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from nirdml.training.artifacts import embed_folder

    checkpoint = _checkpoint(args.checkpoint)
    print(f"using {checkpoint}")
    out = embed_folder(
        checkpoint, args.folder, args.out, device=args.device, batch_size=args.batch_size
    )
    print(f"wrote {out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from nirdml.analysis import analyze

    source = _checkpoint(args.source) if Path(args.source).is_dir() else args.source
    if Path(source).is_file():
        print(f"using {source}")
    report = analyze(
        source,
        args.out,
        dataset=args.dataset,
        root=args.root,
        split=args.split,
        k=args.k,
        num_queries=args.queries,
        map_method=args.map,
        flow_classes=args.flow_classes,
        device=args.device,
        seed=args.seed,
    )
    metrics = report.numbers["metrics"]
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"wrote {report.html} ({len(report.files) - 2} figures beside it)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from nirdml.analysis import compare_runs

    result = compare_runs(args.runs, args.out, metric=args.metric, split=args.split)
    print(result.table)
    if args.out:
        print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    else:
        print("(pass -o DIR to also write the curves, compare.png, and an HTML page)")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from nirdml.analysis import search

    checkpoint = _checkpoint(args.checkpoint)
    print(f"using {checkpoint}")
    result = search(
        checkpoint,
        args.gallery,
        args.query,
        k=args.k,
        cache_dir=args.cache_dir,
        grid=args.out,
        device=args.device,
    )
    index = result.gallery
    state = "reused" if index.from_cache else "written"
    print(f"gallery: {len(index.paths):,} images; embeddings cache {state}: {index.cache_file}")
    for query, own, hits in zip(result.queries, result.query_in_gallery, result.hits, strict=True):
        print(
            f"query {query}"
            + (" (a gallery image: left out of its results)" if own is not None else "")
        )
        for hit in hits:
            print(f"{hit.rank:>4}  {hit.similarity:.4f}  {hit.path}")
    if result.grid is not None:
        print(f"wrote {result.grid}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nirdml.export import export_model

    checkpoint = _checkpoint(args.checkpoint)
    print(f"using {checkpoint}")
    result = export_model(checkpoint, args.out, format=args.format, image_size=args.image_size)
    print(
        f"wrote {result.path} ({result.format}; input (N, {result.input_shape[1]}, H, W) "
        f"float32 at {result.size_note()}, output (N, {result.embed_dim}) L2-normalised; "
        f"max |eager - exported| {result.max_abs_diff:.1e})"
    )
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from nirdml.training.config import list_presets, load_config

    for name in list_presets():
        if args.verbose:
            cfg = load_config(name)
            print(f"{name:<40} {cfg.description}")
        else:
            print(name)
    return 0


def _add_out(
    p: argparse.ArgumentParser, help: str, *, required: bool = False, folder: bool = False
) -> None:
    """The output flag every command that writes something shares: ``-o/--out``, a folder
    or a file (``folder``; checked by :func:`check_out` before the command runs). The
    earlier spellings (``--output``, ``--json``, ``--grid``) still parse, hidden."""
    p.set_defaults(out_is_folder=folder)
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("-o", "--out", dest="out", metavar="PATH", help=help)
    for old in ("--output", "--json", "--grid"):
        group.add_argument(old, dest="out", help=argparse.SUPPRESS)


def check_out(args: argparse.Namespace) -> None:
    """An OutputExistsError, before anything is read or written, when ``--out`` names an
    existing file where the command writes a folder, or an existing folder where it writes a
    file."""
    from nirdml.errors import OutputExistsError

    out = getattr(args, "out", None)
    if out is None:
        return
    path = Path(out)
    if args.out_is_folder and path.exists() and not path.is_dir():
        raise OutputExistsError(
            f"--out {out} is a file; pass a folder path (a new folder, or an existing one)"
        )
    if not args.out_is_folder and path.is_dir():
        raise OutputExistsError(f"--out {out} is a folder; pass a file path, e.g. {path / 'x'}")


def _add_device(p: argparse.ArgumentParser, default: str, help: str | None = None) -> None:
    """``--device``; error messages spell the ``device`` setting as this option."""
    p.add_argument("--device", default=default, help=help)
    p.set_defaults(cli_options={"device": "--device {}"})


def _add_set(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. {example}",
    )


def _add_checkpoint(p: argparse.ArgumentParser, name: str = "checkpoint") -> None:
    p.add_argument(
        name,
        help="a .pt checkpoint, or a run folder: its checkpoints/best.pt (the epoch model "
        "selection kept), else last.pt",
    )


def _add_data(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    """Which data a checkpoint is evaluated or analysed on."""
    p.add_argument("--dataset", help="use this dataset instead of the run's")
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--split", default="test", choices=list(splits))


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a run from a preset or YAML file (no argument: the digits default job)",
    )
    p.add_argument("config", nargs="?", help="preset name (see `nirdml presets`) or YAML file")
    _add_set(p, "--set optim.lr=2e-5 --set epochs=20")
    _add_out(p, "output folder (default runs/<name>)", folder=True)
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="extract the frozen-backbone feature cache of a config (for model.frozen=true)",
    )
    p.add_argument("config", help="preset name (see `nirdml presets`) or YAML file")
    _add_set(p, "--set data.root=../shared/data/cars98")
    _add_out(p, "cache folder (default: the config's data.features)", folder=True)
    p.add_argument("--workers", type=int, help="DataLoader workers (default data.num_workers)")
    p.add_argument(
        "--batch-size", type=int, default=16, help="images per forward (16: fastest on a CPU)"
    )
    _add_device(p, "cpu", "device of the backbone (cpu, cuda, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_features)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    from nirdml.evaluation.registry import AVERAGES, NO_RELEVANT_POLICIES

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on its (or another) dataset")
    _add_checkpoint(p)
    _add_data(p, ("test", "val", "train"))
    p.add_argument(
        "--metrics",
        nargs="+",
        help="metric names, e.g. recall@1 map@r nmi mrr precision@5 map@100_hits "
        "r_precision@100 (docs/guide/evaluation.md lists them all)",
    )
    p.add_argument(
        "--no-relevant",
        choices=list(NO_RELEVANT_POLICIES),
        help="queries without a same-class gallery item: left out (skip, PML) or counted 0 "
        "(zero, OML); default: the run's eval.no_relevant",
    )
    p.add_argument(
        "--average",
        choices=list(AVERAGES),
        help="average retrieval metrics over queries, or per class first (classes, PML's "
        "avg_of_avgs); default: the run's eval.average",
    )
    _add_device(p, "auto")
    _add_out(p, "also write the metrics to this JSON file")
    p.set_defaults(func=_cmd_evaluate)


def _embed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="export embeddings (with paths and labels) of an image folder")
    _add_checkpoint(p)
    p.add_argument("folder", help="folder of images, or of (nested) class sub-folders of images")
    _add_out(p, "output .npz or .pt file", required=True)
    _add_device(p, "auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=_cmd_embed)


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="HTML report of a checkpoint's (or exported) embedding space"
    )
    p.add_argument(
        "source",
        help="run folder (its best.pt, else last.pt), .pt checkpoint, or .npz/.pt embeddings file",
    )
    _add_out(p, "output folder for report.html + PNGs", required=True, folder=True)
    _add_data(p, ("test", "val", "train"))
    p.add_argument("-k", type=int, default=8, help="neighbours per query in the grids")
    p.add_argument("--queries", type=int, default=8, help="random and worst queries shown")
    p.add_argument(
        "--map",
        default="auto",
        help="2-D map method: auto (UMAP if installed, else t-SNE), umap, tsne or pca "
        "(nirdml.analysis.projection.METHODS)",
    )
    p.add_argument(
        "--flow-classes",
        type=int,
        nargs="+",
        metavar="CLASS",
        help="training class indices to draw NIR flow samples for",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    _add_device(p, "auto")
    p.set_defaults(func=_cmd_analyze)


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="table and curves of several runs (grouped over seeds)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders from `nirdml train`")
    _add_out(p, "also write compare.png/.md/.json/.html into this folder", folder=True)
    p.add_argument("--metric", help="metric of the curves (default: the runs' select metric)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="split of the curves")
    p.set_defaults(func=_cmd_compare)


def _search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="the gallery images most similar to a query image")
    _add_checkpoint(p)
    p.add_argument(
        "--gallery",
        required=True,
        help="folder of images or of class sub-folders, nested as deep as needed "
        "(e.g. Omniglot's alphabet/character/*.png: one class per character folder)",
    )
    p.add_argument("--query", required=True, nargs="+", metavar="IMAGE", help="query image(s)")
    p.add_argument("-k", type=int, default=10, help="results per query")
    _add_out(p, "also write the results as a PNG grid to this file")
    p.add_argument("--cache-dir", help="gallery embedding cache (default ~/.cache/nirdml/search)")
    _add_device(p, "auto")
    p.set_defaults(func=_cmd_search)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export the embedding model to TorchScript or ONNX (image -> embedding)"
    )
    _add_checkpoint(p)
    p.add_argument("--format", required=True, help="torchscript or onnx (nirdml.export.FORMATS)")
    _add_out(p, "output file (.pt for TorchScript, .onnx)", required=True)
    p.add_argument(
        "--image-size",
        type=int,
        help="example input size (default: the run's test transform's output size)",
    )
    p.set_defaults(func=_cmd_export)


def _presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the shipped presets")
    p.add_argument("-v", "--verbose", action="store_true", help="with descriptions")
    p.set_defaults(func=_cmd_presets)


COMMANDS = (
    _train_parser,
    _features_parser,
    _evaluate_parser,
    _embed_parser,
    _analyze_parser,
    _compare_parser,
    _search_parser,
    _export_parser,
    _presets_parser,
)
"""Each subcommand's parser, in the order ``nirdml --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``nirdml`` argument parser: one sub-parser per command (:data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="nirdml",
        description="Non-isotropy Regularization for proxy-based Deep Metric Learning.",
    )
    parser.add_argument("--version", action="version", version=f"nirdml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


INTERRUPTED = {
    "features": "interrupted; run the same command again: the extraction continues at its "
    "next batch",
}
"""What an interrupted command says beyond "interrupted" (``train`` says it itself)."""


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings on the console as one line each, without the source file and line (the
    display is restored afterwards; recorded warnings, as in tests, are unaffected)."""

    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"warning: {category.__name__}: {' '.join(str(message).split())}\n"

    saved, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nirdml.errors import NirdmlError

    try:
        check_out(args)
        with _one_line_warnings():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a run says how to resume), no trace
        said = " ".join(str(exc).split()) if isinstance(exc, NirdmlError) else ""
        print(
            f"nirdml {args.command}: {said or INTERRUPTED.get(args.command, 'interrupted')}",
            file=sys.stderr,
        )
        return 130
    except NirdmlError as exc:  # deliberate errors, worded for this command's options
        options = getattr(args, "cli_options", {})
        message = exc.cli_message(options, any_setting=hasattr(args, "set"))
    except OSError as exc:  # the file system's
        message = " ".join(str(exc).split())  # one line
    print(f"nirdml {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
