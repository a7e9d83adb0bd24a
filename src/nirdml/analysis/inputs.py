"""What an analysis reads: a checkpoint (embeds its dataset's split) or exported embeddings.

``load_input`` accepts a run folder or ``.pt`` checkpoint written by ``nirdml train``, or an
embeddings file written by ``nirdml embed`` / :func:`nirdml.training.artifacts.embed_folder`
(``.npz`` or ``.pt`` with ``embeddings``, ``labels`` and optionally ``paths`` and
``class_names``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.analysis.images import ImageSource, dataset_images, path_images
from nirdml.errors import InputError, MissingFileError
from nirdml.runtime import resolve_device

SPLITS = ("test", "val", "train")


@dataclass
class AnalysisInput:
    """Embeddings with labels, plus what is known about where they came from.

    ``run`` (a :class:`~nirdml.training.artifacts.TrainedRun`) and ``train_data`` (the
    run's training split with the test transform, for flow samples) exist for checkpoints
    only; ``images`` is None when the items cannot be shown (embeddings without paths).
    """

    embeddings: torch.Tensor
    labels: np.ndarray
    class_names: list[str]
    images: ImageSource | None
    paths: list[str] | None
    kind: str
    source: str
    description: str
    dataset: str | None = None
    split: str | None = None
    run: Any = None
    train_data: Any = None
    train_data_error: str | None = None


def _checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is an nirdml checkpoint (run folder, or .pt with a format key)."""
    if path.is_dir():
        return True
    if path.suffix == ".npz":
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # old zip format without mmap support, or not a torch file
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(
                f"cannot read {path} ({type(exc).__name__}: {exc}); pass a run folder, a .pt "
                "checkpoint from `nirdml train`, or an embeddings .npz/.pt from `nirdml embed`"
            ) from exc
    if isinstance(obj, dict) and "format" in obj and "model" in obj:
        return True
    if isinstance(obj, dict) and "embeddings" in obj:
        return False
    raise InputError(
        f"{path} is neither an nirdml checkpoint nor an embeddings file (keys: "
        f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__}); pass a run "
        "folder, a .pt checkpoint from `nirdml train`, or an embeddings file from `nirdml embed`"
    )


def load_embeddings_file(path: str | Path) -> dict[str, Any]:
    """``embeddings`` (N, D) float32, ``labels`` (N,) int64, ``paths`` (list or None) and
    ``class_names`` (list) from an ``.npz`` or ``.pt`` embeddings file, validated."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"embeddings file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    else:
        data = dict(torch.load(path, map_location="cpu", weights_only=True))
    missing = [k for k in ("embeddings", "labels") if k not in data]
    if missing:
        raise InputError(
            f"{path} lacks {', '.join(missing)}; an embeddings file needs 'embeddings' (N, D) "
            "and 'labels' (N,) (as `nirdml embed` writes them)"
        )
    emb = torch.as_tensor(np.asarray(data["embeddings"]), dtype=torch.float32)
    labels = np.asarray(data["labels"]).astype(np.int64).reshape(-1)
    if emb.dim() != 2 or emb.shape[0] != len(labels):
        raise InputError(
            f"{path}: embeddings {tuple(emb.shape)} and labels ({len(labels)},) do not match; "
            "expected (N, D) and (N,)"
        )
    if len(labels) and labels.min() < 0:
        raise InputError(
            f"{path}: labels must be class indices >= 0; the analysis needs labelled items "
            "(embed a folder of class sub-folders)"
        )
    paths = data.get("paths")
    paths = [str(p) for p in np.asarray(paths).tolist()] if paths is not None else None
    if paths is not None and len(paths) != len(labels):
        raise InputError(f"{path}: {len(paths)} paths for {len(labels)} embeddings")
    n_cls = int(labels.max()) + 1 if len(labels) else 0
    names = data.get("class_names")
    names = [str(c) for c in np.asarray(names).tolist()] if names is not None else []
    if len(names) < n_cls:
        names = names + [str(i) for i in range(len(names), n_cls)]
    return {"embeddings": emb, "labels": labels, "paths": paths, "class_names": names}


def load_input(
    source: str | Path,
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> AnalysisInput:
    """Read ``source`` (checkpoint or embeddings file) into an :class:`AnalysisInput`.

    For a checkpoint, the model embeds ``split`` of its own dataset, or of ``dataset`` /
    ``root`` when given (as ``nirdml evaluate`` does). Embeddings files carry their own
    items, so ``dataset``/``root``/``split`` do not apply to them.
    """
    path = Path(source)
    if not path.exists():
        raise MissingFileError(
            f"{path} does not exist; pass a run folder, a .pt checkpoint or an embeddings file"
        )
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if not _checkpoint_file(path):
        if dataset is not None or root is not None or split != "test":
            raise InputError(
                f"{path} holds exported embeddings, which carry their own items: --dataset, "
                "--root and --split apply to checkpoints only; drop them"
            )
        data = load_embeddings_file(path)
        images = path_images(data["paths"]) if data["paths"] else None
        return AnalysisInput(
            embeddings=data["embeddings"],
            labels=data["labels"],
            class_names=data["class_names"],
            images=images,
            paths=data["paths"],
            kind="embeddings",
            source=str(path),
            description=f"embeddings file {path.name}",
        )
    return _from_checkpoint(path, dataset, root, split, device, batch_size, num_workers)


def _from_checkpoint(
    path: Path,
    dataset: str | None,
    root: str | None,
    split: str,
    device: str,
    batch_size: int | None,
    num_workers: int | None,
) -> AnalysisInput:
    from nirdml.evaluation import compute_embeddings
    from nirdml.training.artifacts import checkpoint_data, load_trained, test_transform
    from nirdml.training.build import load_splits

    dev = resolve_device(device)
    run = load_trained(path, dev)
    own_cfg = run.config
    cfg, data, splits = checkpoint_data(run, split, dataset=dataset, root=root)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    emb, labels = compute_embeddings(
        run.model,
        data,
        batch_size=batch_size or cfg.eval.batch_size,
        device=dev,
        num_workers=workers,
    )
    train_data, train_error = None, None
    try:
        own_splits = splits if dataset is None and root is None else load_splits(own_cfg)
        train_data = own_splits.train.with_transform(test_transform(own_cfg))
        if train_data.num_classes != int(run.state["num_classes"]):
            train_error = (
                f"the training split now has {train_data.num_classes} classes but the model "
                f"was trained on {run.state['num_classes']}"
            )
            train_data = None
    except (FileNotFoundError, ValueError) as exc:
        train_error = f"the run's training data could not be loaded ({exc})"
    epoch = run.state.get("epoch")
    desc = (
        f"checkpoint {run.path} (epoch {int(epoch) + 1 if epoch is not None else '?'}), "
        f"{data.describe()}"
    )
    return AnalysisInput(
        embeddings=emb,
        labels=labels.numpy().astype(np.int64),
        class_names=list(data.class_names),
        images=dataset_images(data),
        paths=data.paths,
        kind="checkpoint",
        source=str(path),
        description=desc,
        dataset=cfg.data.name,
        split=split,
        run=run,
        train_data=train_data,
        train_data_error=train_error,
    )
