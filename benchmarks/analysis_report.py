"""Timings of `nirdml analyze` and `nirdml search` on a trained Omniglot run.

1. ``analyze(RUN)``: per-stage wall time (the report's own ``timings_s``) and the CPU time
   of the whole call.
2. ``search``: a gallery of Omniglot evaluation PNGs (all 659 characters x 20 drawings,
   13,180 files, unpacked from the shared data's ``images_evaluation.zip`` into class
   folders ``<Alphabet>__<characterNN>``), queried cold (embeds and caches the gallery)
   and warm (reads the cache).

Results go to ``benchmarks/results/analysis_report.md`` with the machine and its load.
Run (a few minutes; longer under load):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/analysis_report.py RUN_DIR \
        --zip ../shared/data/omniglot/images_evaluation.zip
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from machine import cpu_name  # benchmarks/machine.py


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _machine() -> str:
    cpu = cpu_name()
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}, CPU only"
    )


def _unpack(zip_path: Path, dest: Path) -> int:
    n = 0
    with zipfile.ZipFile(zip_path) as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".png"):
                continue
            folder = dest / f"{parts[1]}__{parts[2]}"
            folder.mkdir(exist_ok=True)
            (folder / parts[3]).write_bytes(z.read(name))
            n += 1
    return n


def main() -> None:
    from nirdml.analysis import analyze, search
    from nirdml.runtime import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained Omniglot run folder")
    ap.add_argument("--zip", required=True, help="images_evaluation.zip of Omniglot")
    ap.add_argument("--out", default="benchmarks/results/analysis_report.md")
    args = ap.parse_args()

    lines = ["# Analysis and search timings", ""]
    lines.append(f"Machine: {_machine()}. Load average before: {os.getloadavg()[0]:.1f}.")
    lines.append("")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cpu0, t0 = _cpu(), time.perf_counter()
        report = analyze(args.run, tmp / "report")
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        n = report.numbers
        lines += [
            f"## `analyze` on {n['description']}",
            "",
            f"{n['items']:,} items, {n['classes']} classes, {n['dim']}-dim; 2-D map: "
            f"{n['map']['method']} of {n['map']['points']:,} points.",
            "",
            "| stage | wall (s) |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} |" for k, v in n["timings_s"].items()]
        lines += [f"| **total** | **{wall:.1f}** (CPU {cpu:.1f} s) |", ""]

        gallery = tmp / "gallery"
        gallery.mkdir()
        count = _unpack(Path(args.zip), gallery)
        query = sorted(sorted(gallery.iterdir())[100].iterdir())[0]
        rows = []
        for label in ("cold (embed + write cache)", "warm (cache hit)"):
            cpu0, t0 = _cpu(), time.perf_counter()
            res = search(args.run, gallery, query, k=10, cache_dir=tmp / "cache")
            rows.append((label, time.perf_counter() - t0, _cpu() - cpu0, res.gallery.from_cache))
        lines += [
            f"## `search`: {count:,} Omniglot evaluation PNGs, k = 10",
            "",
            "| call | wall (s) | CPU (s) | from cache |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a} | {b:.1f} | {c:.1f} | {d} |" for a, b, c, d in rows]
        same = sum(h.class_name == query.parent.name for h in res.hits[0])
        lines += ["", f"Query {query.parent.name}/{query.name}: {same} of 10 results of its class."]
    lines += ["", f"Load average after: {os.getloadavg()[0]:.1f}.", ""]
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
