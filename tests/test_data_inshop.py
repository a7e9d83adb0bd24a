"""In-Shop Clothes Retrieval: a tiny fixture in the official layout (list_eval_partition.txt
+ img/), the train / query / gallery splits, and a query/gallery run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nirdml.data import DatasetLayoutError, load_dataset
from nirdml.errors import ManualDownloadError, NirdmlError
from test_data_datasets import class_id_of

# item number -> (category folder, evaluation status of its images)
TRAIN_ITEMS = {1: "WOMEN/Dresses", 2: "WOMEN/Dresses", 3: "MEN/Denim", 4: "MEN/Denim"}
TRAIN_ITEMS |= {5: "WOMEN/Skirts", 6: "MEN/Tees_Tanks"}
TEST_ITEMS = {11: "WOMEN/Dresses", 12: "MEN/Denim", 13: "MEN/Denim", 14: "WOMEN/Skirts"}
VIEWS = ("1_front", "2_side", "3_back", "4_full", "7_additional")


def write_view(path: Path, item: int, view: int) -> None:
    """Grey level = item number (read back by class_id_of at the centre), plus a corner
    patch that differs per view, so the images of one item are not identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (16, 12), (item, item, item))
    img.paste((60 * view + 20,) * 3, (0, 0, 6, 6))
    img.save(path, quality=100)


def item_id(n: int) -> str:
    return f"id_{n:08d}"


def make_inshop(root: Path, official_folders: bool = False) -> list[tuple[str, str, str]]:
    """Images encode their item number (grey level); each test item has 2 query and 3
    gallery images. ``official_folders``: Eval/list_eval_partition.txt and Img/img/."""
    rows = []
    images = root / "Img" if official_folders else root
    for n, cat in {**TRAIN_ITEMS, **TEST_ITEMS}.items():
        for k, view in enumerate(VIEWS[: 3 if n in TRAIN_ITEMS else 5]):
            name = f"img/{cat}/{item_id(n)}/{k + 1:02d}_{view}.jpg"
            write_view(images / name, n, k)
            status = "train" if n in TRAIN_ITEMS else ("query" if k < 2 else "gallery")
            rows.append((name, item_id(n), status))
    table = (
        root / "Eval" / "list_eval_partition.txt"
        if official_folders
        else root / ("list_eval_partition.txt")
    )
    table.parent.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    table.write_text("\n".join(lines + [" ".join(r) for r in rows]) + "\n")
    return rows


def image_ids(ds) -> list[int]:
    return [class_id_of(ds.storage.load(int(i))) for i in ds.index]


@pytest.mark.parametrize("official_folders", [False, True])
def test_official_layout_train_query_gallery(tmp_path: Path, official_folders: bool) -> None:
    make_inshop(tmp_path, official_folders)
    s = load_dataset("in_shop", tmp_path, transform_preset="none")  # an alias
    assert s.val is None and s.train.num_classes == 6 and len(s.train) == 18
    assert s.train.is_query is None  # training items: no roles
    assert s.train.class_names[0] == "WOMEN/Dresses/id_00000001"
    test = s.test
    assert test.num_classes == 4 and len(test) == 20
    assert int(test.is_query.sum()) == 8 and int(test.is_gallery.sum()) == 12
    assert not (test.is_query & test.is_gallery).any()
    for ds in (s.train, test):  # each image's label is its item
        assert [int(ds.class_names[y][-8:]) for y in ds.labels] == image_ids(ds)
    first_two_views = [("01_1_front" in p or "02_2_side" in p) for p in test.paths]
    assert first_two_views == test.is_query.tolist()
    assert "8 queries, 12 gallery" in test.describe()


def test_validation_is_carved_from_training_items(tmp_path: Path) -> None:
    make_inshop(tmp_path)
    s = load_dataset("inshop", tmp_path, val_classes=2, seed=1, transform_preset="none")
    assert s.train.num_classes == 4 and s.val.num_classes == 2
    assert s.val.is_query is None and s.test.is_query is not None
    assert not set(s.val.class_names) & set(s.train.class_names)


def test_download_says_where_to_get_it_and_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ManualDownloadError, match=r"DeepFashion.*list_eval_partition\.txt"):
        load_dataset("inshop", tmp_path / "new", download=True)
    assert issubclass(ManualDownloadError, NirdmlError)
    assert issubclass(ManualDownloadError, FileNotFoundError)
    with pytest.raises(DatasetLayoutError, match="list_eval_partition.txt"):
        load_dataset("inshop", tmp_path)  # an empty folder: what is expected, what was found
    rows = make_inshop(tmp_path)
    table = tmp_path / "list_eval_partition.txt"
    body = [" ".join(r) for r in rows]
    table.write_text("\n".join(["99", "image_name item_id evaluation_status", *body]) + "\n")
    with pytest.raises(DatasetLayoutError, match="announces 99 rows but holds 38"):
        load_dataset("inshop", tmp_path)
    body[0] = body[0].replace("train", "val")
    table.write_text("\n".join(["38", "image_name item_id evaluation_status", *body]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r":3: expected 'img/\.\.\. id_XXXXXXXX"):
        load_dataset("inshop", tmp_path)


def test_query_gallery_run_end_to_end(tmp_path: Path) -> None:
    """One epoch of the small CNN on the fixture: the test split is evaluated as queries
    against the gallery (the In-Shop R@K set), the validation split as self-retrieval;
    the numbers equal evaluate(..., is_query=, is_gallery=) on the checkpoint's embeddings."""
    from nirdml.evaluation import compute_embeddings, evaluate
    from nirdml.training.artifacts import evaluate_checkpoint, load_trained
    from nirdml.training.config import load_config
    from nirdml.training.trainer import train

    make_inshop(tmp_path / "data")
    cfg = load_config(
        "omniglot",
        [
            "data.name=inshop",
            f"data.root={tmp_path / 'data'}",
            "data.transform=omniglot",
            "data.val_classes=2",
            "data.batch_size=8",
            "data.samples_per_class=2",
            "eval.metrics=null",
            "eval.batch_size=64",
            "epochs=1",
            "log.progress=false",
        ],
    )
    result = train(cfg, tmp_path / "run")
    row = json.loads((result.out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    names = ["recall@1", "recall@10", "recall@20", "recall@30", "recall@40", "map@r"]
    assert [k for k in row if k.startswith("test/")] == [f"test/{n}" for n in names]
    assert all(f"val/{n}" in row for n in names)
    assert row["test/recall@10"] == 1.0  # 12 gallery items: every query's item is among them

    trained = load_trained(result.out_dir / "checkpoints" / "last.pt", torch.device("cpu"))
    test = load_dataset("inshop", tmp_path / "data", transform_preset="omniglot").test
    emb, labels = compute_embeddings(trained.model, test, batch_size=64, device="cpu")
    direct = evaluate(
        emb, labels, names, is_query=test.is_query, is_gallery=test.is_gallery, device="cpu"
    )
    assert direct == pytest.approx({n: row[f"test/{n}"] for n in names}, abs=1e-12)
    # the same numbers through the checkpoint evaluation (`nirdml evaluate`)
    again = evaluate_checkpoint(result.out_dir, metrics=names, device="cpu")
    assert again == pytest.approx(direct, abs=1e-6)
    # self-retrieval over all 20 test images scores differently (R = 4, queries find queries)
    assert evaluate(emb, labels, ["map@r"], device="cpu") != {"map@r": direct["map@r"]}
    assert np.isfinite(list(direct.values())).all()


def test_query_gallery_roles_reach_a_cached_feature_run(tmp_path: Path) -> None:
    """model.frozen: the cached test features keep the split's roles, so the run is scored
    as queries against the gallery, as on images."""
    from nirdml.evaluation import compute_embeddings, evaluate
    from nirdml.training.artifacts import load_trained
    from nirdml.training.config import load_config
    from nirdml.training.features import load_feature_splits
    from nirdml.training.trainer import train

    make_inshop(tmp_path / "data")
    cfg = load_config(
        "omniglot",
        [
            "data.name=inshop",
            f"data.root={tmp_path / 'data'}",
            "data.transform=omniglot",
            "data.val_classes=0",
            "data.batch_size=8",
            "data.feature_views=1",
            f"data.features={tmp_path / 'feats'}",
            "model.frozen=true",
            "eval.metrics=[recall@1,map@r]",
            "epochs=1",
            "log.progress=false",
        ],
    )
    row = train(cfg, tmp_path / "run").history[-1]
    test = load_feature_splits(cfg).test
    assert int(test.is_query.sum()) == 8 and int(test.is_gallery.sum()) == 12
    model = load_trained(tmp_path / "run" / "checkpoints" / "last.pt").model.head_only()
    emb, labels = compute_embeddings(model, test, batch_size=64, device="cpu")
    roles = {"is_query": test.is_query, "is_gallery": test.is_gallery}
    direct = evaluate(emb, labels, ["recall@1", "map@r"], device="cpu", **roles)
    assert direct == pytest.approx({"recall@1": row["test/recall@1"], "map@r": row["test/map@r"]})
