"""Reference row: retrieval on the raw frozen features (no training), val and test splits.

    python benchmarks/raw_features.py PRESET --root DATA --cache CACHE [--seeds 0 1 ..] [--json OUT]

The pooled backbone features of a feature cache (``nirdml features``), L2-normalised, cosine
retrieval, every image a query: the number a trained head has to beat. The validation
split is carved per seed, as the training runs carve it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nirdml import load_config  # noqa: E402
from nirdml.evaluation import evaluate  # noqa: E402
from nirdml.training.features import load_feature_splits  # noqa: E402

METRICS = ["recall@1", "map@r"]


def raw_metrics(preset: str, root: str, cache: str, seed: int) -> dict[str, dict[str, float]]:
    """Test and (seed's validation carve) metrics of the raw cached features."""
    cfg = load_config(preset, [f"data.root={root}", f"data.features={cache}", f"seed={seed}"])
    splits = load_feature_splits(cfg)
    out = {}
    for split in ("val", "test"):
        data = getattr(splits, split)
        if data is None:
            continue
        feats = data.array[data.rows].astype("float32")
        x = torch.nn.functional.normalize(torch.from_numpy(feats), dim=-1)
        out[split] = evaluate(x, torch.from_numpy(data.labels), METRICS, seed=0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("--root", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {str(s): raw_metrics(args.preset, args.root, args.cache, s) for s in args.seeds}
    print(json.dumps(out, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
