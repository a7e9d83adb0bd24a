"""Using a trained run: rebuild its model from a checkpoint, evaluate it, export embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nirdml.errors import InputError
from nirdml.losses import ProxyCriterion
from nirdml.runtime import atomic_write, resolve_device
from nirdml.training.build import eval_metrics, evaluate_model, load_splits, run_loss
from nirdml.training.checkpoint import load_checkpoint, resolve_checkpoint
from nirdml.training.config import RunConfig, load_config, transform_preset


@dataclass
class TrainedRun:
    """A checkpoint's model (eval mode), loss module (proxies, flow; None when loaded
    without it), config, state and the checkpoint file it came from."""

    model: nn.Module
    loss: ProxyCriterion | None
    config: RunConfig
    state: dict[str, Any]
    path: Path


def load_trained(
    checkpoint: str | Path, device: str | torch.device = "cpu", *, with_loss: bool = True
) -> TrainedRun:
    """Rebuild the model (and with ``with_loss`` the loss: proxies, flow) from a checkpoint
    and load their weights. ``checkpoint``: a .pt file or a run folder
    (:func:`~nirdml.training.checkpoint.resolve_checkpoint`: its best.pt, else last.pt).

    Nothing is downloaded: the model is rebuilt from its stored spec, then loaded. Evaluating,
    embedding and exporting need the model only (``with_loss=False``).
    """
    from nirdml.models import model_from_spec

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    cfg = load_config(state["config"])
    model = model_from_spec(state["model_spec"], state["model"])
    device = torch.device(device) if not isinstance(device, torch.device) else device
    loss = None
    if with_loss:
        loss = run_loss(cfg, int(state["num_classes"]))
        loss.load_state_dict(state["loss"])
        loss = loss.to(device).eval()
    return TrainedRun(model.to(device).eval(), loss, cfg, state, path)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    root: str | None = None,
    metrics: list[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    info: dict[str, Any] | None = None,
    no_relevant: str | None = None,
    average: str | None = None,
) -> dict[str, float]:
    """Metrics of a checkpoint on a split of its dataset (or of another dataset).

    A query/gallery split (In-Shop's test split) is evaluated as such. ``no_relevant`` and
    ``average`` (see ``nirdml.evaluation.evaluate``) default to the run's ``eval`` settings.
    ``info``, when given, is filled with what was evaluated: ``checkpoint`` (the file),
    ``epoch``, ``dataset``, ``split``, ``items`` and ``classes``.
    """
    dev = resolve_device(device)
    run = load_trained(checkpoint, dev, with_loss=False)
    cfg, data, _ = checkpoint_data(run, split, dataset=dataset, root=root)
    if info is not None:
        info.update(
            checkpoint=str(run.path),
            epoch=int(run.state["epoch"]) + 1,
            dataset=cfg.data.name,
            split=split,
            items=len(data),
            classes=int(data.num_classes),
        )
    return evaluate_model(
        run.model,
        data,
        metrics=metrics or eval_metrics(cfg),
        num_clusters=None,
        batch_size=batch_size or cfg.eval.batch_size,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        device=dev,
        seed=cfg.seed,
        no_relevant=no_relevant or cfg.eval.no_relevant,
        average=average or cfg.eval.average,
    )


def test_transform(cfg: RunConfig) -> Any:
    """The run's evaluation transform (its ``data.transform`` preset or the dataset's)."""
    from nirdml.data import build_transforms

    return build_transforms(
        transform_preset(cfg.data),
        train=False,
        image_size=cfg.data.image_size,
    )


def checkpoint_data(
    run: TrainedRun, split: str = "test", *, dataset: str | None = None, root: str | None = None
) -> tuple[RunConfig, Any, Any]:
    """``(config, data, splits)``: the ``split`` a trained run is evaluated or analysed on.

    The run's own dataset, or ``dataset`` (with ``root``) instead, or its own dataset under
    another ``root``; the config returned is the run's, updated accordingly (a copy). The
    train split gets the test transform: embeddings are always taken without augmentation.
    """
    import copy

    cfg = copy.deepcopy(run.config)
    if dataset is not None:
        cfg.data.name = dataset
        cfg.data.root = root
        cfg.data.options = {}
    elif root is not None:
        cfg.data.root = root
    splits = load_splits(cfg)
    data = {"test": splits.test, "val": splits.val, "train": splits.train}.get(split)
    if data is None:
        raise InputError(
            f"split {split!r} is not available (choose test or train; val exists only when the "
            "run used data.val_classes > 0)"
        )
    if split == "train":
        data = data.with_transform(test_transform(cfg))
    return cfg, data, splits


def embed_folder(
    checkpoint: str | Path,
    folder: str | Path,
    out_file: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
) -> Path:
    """Embed every image under ``folder`` and write embeddings, labels and paths.

    ``folder`` holds class sub-folders (labels = class index, names kept) or images directly
    (label -1). ``.npz`` gets arrays ``embeddings``, ``labels``, ``paths``, ``class_names``;
    ``.pt`` gets the same as a weights_only-loadable dict.
    """
    from nirdml.data import file_reader, load_image_folder
    from nirdml.evaluation import compute_embeddings

    dev = resolve_device(device)
    run = load_trained(checkpoint, dev, with_loss=False)
    transform = test_transform(run.config)
    data = load_image_folder(folder, transform=transform, convert=file_reader(run.config.data.name))
    emb, labels = compute_embeddings(
        run.model, data, batch_size=batch_size, device=dev, num_workers=num_workers
    )
    out_file = Path(out_file)
    labels = np.asarray(labels, dtype=np.int64)
    if "." in data.class_names:  # images directly in the folder: unlabelled
        labels = np.where(labels == data.class_names.index("."), -1, labels)
    payload = {
        "embeddings": emb.cpu().numpy().astype(np.float32),
        "labels": labels,
        "paths": np.asarray([str(p) for p in data.paths]),
        "class_names": np.asarray(list(data.class_names)),
    }
    if out_file.suffix == ".pt":
        tensors = {
            "embeddings": torch.from_numpy(payload["embeddings"]),
            "labels": torch.from_numpy(payload["labels"]),
            "paths": [str(p) for p in data.paths],
            "class_names": list(data.class_names),
        }
        atomic_write(out_file, lambda f: torch.save(tensors, f))
    elif out_file.suffix == ".npz":
        atomic_write(out_file, lambda f: np.savez(f, **payload))
    else:
        raise InputError(f"output {out_file} must end in .npz or .pt")
    return out_file
