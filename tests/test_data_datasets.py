"""Datasets: tiny fixtures in each official layout, real Omniglot, digits, custom data.

Every fixture image is a flat grey JPEG that encodes its official class id (grey level =
id % 256, exact at quality 100; width = 16 + id // 256), so the tests check that each
item's label belongs to the right class, not only the counts.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from nirdml.data import (
    DatasetLayoutError,
    MissingImageError,
    load_dataset,
)

CUB_IDS = (1, 2, 100, 101, 150, 200)
CARS_IDS = (1, 50, 98, 99, 150, 196)


def write_image(path: Path, class_id: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    v = class_id % 256
    Image.new("RGB", (16 + class_id // 256, 12), (v, v, v)).save(path, quality=100)


def class_id_of(img: Image.Image) -> int:
    r, g, b = img.convert("RGB").getpixel((img.width // 2, img.height // 2))
    assert r == g == b
    return int(r) + 256 * (img.width - 16)


def image_class_ids(ds) -> list[int]:
    return [class_id_of(ds[i][0]) for i in range(len(ds))]


def make_cub(root: Path, ids=CUB_IDS, per_class: int = 3, seed: int = 0) -> Path:
    base = root / "CUB_200_2011"
    rows = []
    for cid in ids:
        folder = f"{cid:03d}.Bird_{cid}"
        for k in range(per_class):
            rel = f"{folder}/Bird_{cid}_{k:04d}_{cid}.jpg"
            write_image(base / "images" / rel, cid)
            rows.append((rel, cid))
    random.Random(seed).shuffle(rows)  # labels must follow class ids, not file order
    (base / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in ids))
    (base / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, (r, _) in enumerate(rows)))
    (base / "image_class_labels.txt").write_text(
        "".join(f"{i + 1} {c}\n" for i, (_, c) in enumerate(rows))
    )
    (base / "train_test_split.txt").write_text(
        "".join(f"{i + 1} {i % 2}\n" for i in range(len(rows)))
    )
    return base


def make_cars(root: Path, ids=CARS_IDS, per_class: int = 2) -> Path:
    recs = []
    n = 0
    for cid in ids:
        for k in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_image(root / rel, cid)
            recs.append((rel, 1, 2, 20, 15, cid, k % 2))
    dtype = [
        (f, "O")
        for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    ]
    ann = np.zeros((1, len(recs)), dtype=dtype)
    for j, r in enumerate(recs):
        for f, v in zip([d[0] for d in dtype], r, strict=True):
            ann[0, j][f] = np.array([[v]], dtype=np.uint8) if f != "relative_im_path" else v
    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Make{i + 1} Model Sedan 20{i % 20:02d}"
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return root


def make_sop(root: Path) -> Path:
    base = root / "Stanford_Online_Products"
    splits = {
        "train": [(1, 1, "bicycle"), (2, 1, "bicycle"), (3, 2, "chair")],
        "test": [(11319, 3, "table"), (11320, 3, "table"), (11321, 1, "bicycle")],
    }
    img_id = 0
    for split, classes in splits.items():
        lines = ["image_id class_id super_class_id path"]
        for cid, sup, name in classes:
            for k in range(2):
                img_id += 1
                rel = f"{name}_final/{100000 + cid}_{k}.JPG"
                write_image(base / rel, cid)
                lines.append(f"{img_id} {cid} {sup} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def make_omniglot_png(root: Path) -> Path:
    """Two alphabets per set; character folders numbered within alphabets, files XXXX_YY.png
    with the global character index, alphabets NOT in index order (as upstream)."""
    layout = {
        "images_background": [("Zeta_script", 1, 2), ("Alpha_script", 3, 1)],
        "images_evaluation": [("Omega", 4, 2)],
    }
    for split, alphabets in layout.items():
        for alphabet, first, count in alphabets:
            for c in range(count):
                for d in range(1, 4):
                    img = Image.new("1", (105, 105), 1)  # white background
                    img.paste(0, (10 * (first + c), 10, 10 * (first + c) + 8, 30))  # ink
                    p = root / split / alphabet / f"character{c + 1:02d}"
                    p.mkdir(parents=True, exist_ok=True)
                    img.save(p / f"{first + c:04d}_{d:02d}.png")
    return root


# ---------------------------------------------------------------------------- CUB200
@pytest.mark.parametrize("layout", ["official", "folders"])
def test_cub_split_by_class_id(tmp_path: Path, layout: str) -> None:
    base = make_cub(tmp_path)
    root = tmp_path
    if layout == "folders":  # only the class-folder tree, no annotation files
        root = tmp_path / "plain"
        (base / "images").rename(root)
    s = load_dataset("cub200", root, transform_preset="none")
    assert (len(s.train), len(s.test), s.val) == (9, 9, None)
    assert s.train.num_classes == 3 and s.test.num_classes == 3
    assert s.train.class_names == ["001.Bird_1", "002.Bird_2", "100.Bird_100"]
    assert s.test.class_names == ["101.Bird_101", "150.Bird_150", "200.Bird_200"]
    for ds, ids in ((s.train, (1, 2, 100)), (s.test, (101, 150, 200))):
        assert ds.labels.dtype == np.int64
        assert sorted(set(ds.labels.tolist())) == [0, 1, 2]
        assert [ids[y] for y in ds.labels] == image_class_ids(ds)


def test_cub_reads_annotations_without_decoding(tmp_path: Path, monkeypatch) -> None:
    make_cub(tmp_path)
    calls = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: calls.append(a))
    load_dataset("cub200", tmp_path)
    assert calls == []


def test_cub_default_transform_and_paths(tmp_path: Path) -> None:
    make_cub(tmp_path)
    s = load_dataset("cub200", tmp_path / "CUB_200_2011")
    x, y = s.test[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and isinstance(y, int)
    assert all(Path(p).is_file() for p in s.train.paths)
    assert "cub200/train: 9 images, 3 classes" in s.train.describe()


# ---------------------------------------------------------------------------- Cars196
def test_cars_official_mat(tmp_path: Path) -> None:
    make_cars(tmp_path)
    s = load_dataset("cars196", tmp_path, transform_preset="none")
    assert (len(s.train), len(s.test)) == (6, 6)
    assert s.train.class_names == [
        "Make1 Model Sedan 2000",
        "Make50 Model Sedan 2009",
        "Make98 Model Sedan 2017",
    ]
    assert s.test.class_names[0] == "Make99 Model Sedan 2018"
    for ds, ids in ((s.train, (1, 50, 98)), (s.test, (99, 150, 196))):
        assert [ids[y] for y in ds.labels] == image_class_ids(ds)


def test_cars_class_folders(tmp_path: Path) -> None:
    # Kaggle copy: names.csv (official order) + train/ and test/ folders of class names.
    names = [f"Brand{i} Car/Van 20{i % 20:02d}" for i in range(1, 197)]
    (tmp_path / "names.csv").write_text("\n".join(names) + "\n")
    for half, cid in (("train", 5), ("test", 5), ("train", 98), ("test", 99), ("train", 196)):
        folder = tmp_path / "car_data" / "car_data" / half / names[cid - 1].replace("/", "-")
        write_image(folder / f"{half}_{cid}.jpg", cid)
    s = load_dataset("cars196", tmp_path, transform_preset="none")
    assert s.train.class_names == [names[4], names[97]]
    assert len(s.train) == 3 and len(s.test) == 2
    for ds, ids in ((s.train, (5, 98)), (s.test, (99, 196))):
        assert [ids[y] for y in ds.labels] == image_class_ids(ds)
    # Id-prefixed folders need no names.csv.
    plain = tmp_path / "plain"
    for cid in (7, 120):
        write_image(plain / f"{cid:03d}.Some Car {cid}" / "a.jpg", cid)
    s = load_dataset("cars196", plain, transform_preset="none")
    assert s.train.class_names == ["007.Some Car 7"] and s.test.class_names == ["120.Some Car 120"]


def test_cars_unknown_folder_names_error(tmp_path: Path) -> None:
    write_image(tmp_path / "Some Car" / "a.jpg", 3)
    with pytest.raises(DatasetLayoutError, match="names.csv"):
        load_dataset("cars196", tmp_path)


def test_cars_download_explains(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot be downloaded automatically"):
        load_dataset("cars196", tmp_path, download=True)


# ---------------------------------------------------------------------------- SOP
def test_sop_official(tmp_path: Path) -> None:
    make_sop(tmp_path)
    s = load_dataset("sop", tmp_path, transform_preset="none")
    assert (len(s.train), len(s.test)) == (6, 6)
    assert s.train.class_names == ["bicycle/1", "bicycle/2", "chair/3"]
    assert s.test.class_names == ["table/11319", "table/11320", "bicycle/11321"]
    for ds, ids in ((s.train, (1, 2, 3)), (s.test, (11319, 11320, 11321))):
        assert [ids[y] for y in ds.labels] == image_class_ids(ds)


# ---------------------------------------------------------------------------- Omniglot
def test_omniglot_png_tree_fixture(tmp_path: Path) -> None:
    make_omniglot_png(tmp_path / "omniglot-py")
    s = load_dataset("omniglot", tmp_path, transform_preset="none")
    # Classes in global character order 1, 2 (Zeta_script), 3 (Alpha_script).
    assert s.train.class_names == [
        "Zeta_script/character01",
        "Zeta_script/character02",
        "Alpha_script/character01",
    ]
    assert (len(s.train), len(s.test), s.test.num_classes) == (9, 6, 2)
    img, y = s.train[7]
    assert img.mode == "L" and y == 2
    a = np.asarray(img)
    assert a[20, 10 * 3 + 2] == 255 and a[80, 80] == 0  # ink high, background 0
    x, _ = load_dataset("omniglot", tmp_path).test[0]
    assert x.shape == (1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0


def test_omniglot_real_npz(omniglot_dir: Path) -> None:
    s = load_dataset("omniglot", omniglot_dir, source="npz")
    assert (s.train.num_classes, s.test.num_classes) == (964, 659)
    assert (len(s.train), len(s.test)) == (19_280, 13_180)
    assert (s.train.class_counts() == 20).all() and (s.test.class_counts() == 20).all()
    assert s.train.class_names[0] == "Arcadian/character01"
    x, y = s.train[19_279]
    assert x.shape == (1, 28, 28) and y == 963
    raw = load_dataset("omniglot", omniglot_dir, transform_preset="none").train[0][0]
    assert raw.dtype == torch.uint8 and raw.shape == (1, 105, 105)
    z = np.load(omniglot_dir / "images_background.npz")
    assert torch.equal(raw[0], torch.from_numpy((~z["images"][0, 0]).astype(np.uint8) * 255))


def test_omniglot_real_png_matches_npz(omniglot_dir: Path, tmp_path: Path) -> None:
    for key in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(omniglot_dir / f"{key}.zip") as zf:
            zf.extractall(tmp_path)
    png = load_dataset("omniglot", tmp_path, transform_preset="none")
    npz = load_dataset("omniglot", omniglot_dir, transform_preset="none", source="npz")
    for a, b, n_cls, n_img in (
        (png.train, npz.train, 964, 19_280),
        (png.test, npz.test, 659, 13_180),
    ):
        assert (a.num_classes, len(a)) == (n_cls, n_img)
        assert np.array_equal(a.labels, b.labels) and a.class_names == b.class_names
        for i in (0, 4321 % n_img, n_img - 1):
            assert np.array_equal(np.asarray(a[i][0]), b[i][0][0].numpy())


# ---------------------------------------------------------------------------- digits
def test_digits_default() -> None:
    s = load_dataset("digits")
    assert (len(s.train), len(s.test)) == (901, 896)
    assert s.train.class_names == ["0", "1", "2", "3", "4"]
    assert s.test.class_names == ["5", "6", "7", "8", "9"]
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = load_dataset("digits", transform_preset="none")
    i5 = int(np.flatnonzero(d.target >= 5)[0])
    x, y = raw.test[0]
    assert y == d.target[i5] - 5
    assert torch.allclose(x[0], torch.from_numpy(d.images[i5] / 16).float())
    x, _ = s.train[3]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("digits", "/some/where")


# ---------------------------------------------------------------------------- custom data
def test_folder_rule_and_explicit(tmp_path: Path) -> None:
    for cid, name in enumerate(["cat", "ant", "dog", "bee", "eel"], start=1):
        for k in range(2):
            write_image(tmp_path / name / f"{k}.png", cid)
    (tmp_path / "empty").mkdir()
    s = load_dataset("folder", tmp_path, transform_preset="none")
    assert s.train.class_names == ["ant", "bee", "cat"] and s.test.class_names == ["dog", "eel"]
    assert [("ant", "bee", "cat")[y] for y in s.train.labels] == [
        ["cat", "ant", "dog", "bee", "eel"][c - 1] for c in image_class_ids(s.train)
    ]
    s = load_dataset("folder", tmp_path, test_classes=["ant", "eel"])
    assert s.train.class_names == ["bee", "cat", "dog"] and s.test.class_names == ["ant", "eel"]
    with pytest.raises(ValueError, match="unknown classes"):
        load_dataset("folder", tmp_path, train_classes=["zebra"])
    with pytest.raises(ValueError, match="both train_classes and test_classes"):
        load_dataset("folder", tmp_path, train_classes=["ant"], test_classes=["ant"])


def test_folder_train_test_subfolders(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "a" / "0.jpg", 1)
    write_image(tmp_path / "train" / "b" / "0.jpg", 2)
    write_image(tmp_path / "test" / "c" / "0.jpg", 3)
    s = load_dataset("folder", tmp_path)
    assert s.train.class_names == ["a", "b"] and s.test.class_names == ["c"]
    write_image(tmp_path / "test" / "a" / "1.jpg", 1)
    with pytest.raises(DatasetLayoutError, match="class-disjoint"):
        load_dataset("folder", tmp_path)


def test_csv_with_and_without_split(tmp_path: Path) -> None:
    rows = []
    for cid in (1, 2, 3, 10, 11):
        for k in range(2):
            rel = f"img/{cid}_{k}.jpg"
            write_image(tmp_path / rel, cid)
            rows.append((rel, str(cid)))
    (tmp_path / "plain.csv").write_text("\n".join(f"{p},{c}" for p, c in rows) + "\n")
    s = load_dataset("csv", tmp_path / "plain.csv", transform_preset="none")
    assert s.train.class_names == ["1", "2", "3"] and s.test.class_names == ["10", "11"]
    for ds in (s.train, s.test):
        assert [int(ds.class_names[y]) for y in ds.labels] == image_class_ids(ds)
    split = {"1": "train", "2": "train", "3": "val", "10": "test", "11": "test"}
    text = "path,label,split\n" + "".join(f"{p},{c},{split[c]}\n" for p, c in rows)
    (tmp_path / "split.csv").write_text(text)
    s = load_dataset("csv", tmp_path / "split.csv")
    assert s.train.class_names == ["1", "2"] and s.val.class_names == ["3"]
    assert s.test.class_names == ["10", "11"]
    bad = text + "img/1_0.jpg,1,test\n"
    (tmp_path / "bad.csv").write_text(bad)
    with pytest.raises(DatasetLayoutError, match="more than one split"):
        load_dataset("csv", tmp_path / "bad.csv")


def test_csv_is_query_is_gallery_columns(tmp_path: Path) -> None:
    """Optional role columns make the test split a query/gallery split (In-Shop's
    protocol); other splits ignore them, and evaluation reads the flags."""
    from nirdml.evaluation import evaluate

    lines = ["path,label,split,is_query,is_gallery"]
    for cid in (1, 2, 10, 11):
        for k in range(3):
            rel = f"img/{cid}_{k}.jpg"
            write_image(tmp_path / rel, cid)
            split = "train" if cid < 10 else "test"
            role = {0: "1,0", 1: "0,1", 2: "yes,True"}[k]  # query / gallery / both
            lines.append(f"{rel},{cid},{split},{role}")
    (tmp_path / "roles.csv").write_text("\n".join(lines) + "\n")
    s = load_dataset("csv", tmp_path / "roles.csv", transform_preset="none")
    assert s.train.is_query is None
    assert s.test.is_query.tolist() == [True, False, True] * 2
    assert s.test.is_gallery.tolist() == [False, True, True] * 2
    # items 10 (label 0) and 11 (label 1) on a line; queries: #0, #2 (both), #3, #5 (both)
    #   #0 at 0   -> gallery #2 (label 0): hit      #2 at 2  -> #1 (itself left out): hit
    #   #3 at 0.5 -> gallery #2 (label 0): miss     #5 at 11 -> #4 (itself left out): hit
    x = np.array([[0.0], [5.0], [2.0], [0.5], [10.0], [11.0]])
    roles = {"is_query": s.test.is_query, "is_gallery": s.test.is_gallery}
    assert evaluate(x, s.test.labels, ["recall@1"], **roles) == {"recall@1": 0.75}
    # ignoring the roles (every item queries all others): #0, #2, #3 miss
    assert evaluate(x, s.test.labels, ["recall@1"]) == {"recall@1": 0.5}
    bad = "\n".join(lines[:-1] + [lines[-1].replace("yes,True", "0,no")]) + "\n"
    (tmp_path / "bad.csv").write_text(bad)
    with pytest.raises(DatasetLayoutError, match="is_query=0 and is_gallery=0"):
        load_dataset("csv", tmp_path / "bad.csv")
    (tmp_path / "half.csv").write_text("path,label,is_query\nimg/1_0.jpg,1,1\n")
    with pytest.raises(DatasetLayoutError, match="both is_query and is_gallery"):
        load_dataset("csv", tmp_path / "half.csv")
    (tmp_path / "typo.csv").write_text("path,label,is_qeury\nimg/1_0.jpg,1,1\n")
    with pytest.raises(DatasetLayoutError, match="unknown: \\['is_qeury'\\]"):
        load_dataset("csv", tmp_path / "typo.csv")


# ---------------------------------------------------------------------------- validation carve
def test_validation_carve_is_class_disjoint_and_deterministic(tmp_path: Path) -> None:
    make_cub(tmp_path, ids=tuple(range(1, 11)) + (150,), per_class=2)
    a = load_dataset("cub200", tmp_path, val_classes=0.3, seed=5, transform_preset="none")
    b = load_dataset("cub200", tmp_path, val_classes=3, seed=5, transform_preset="none")
    c = load_dataset("cub200", tmp_path, val_classes=3, seed=6, transform_preset="none")
    assert a.val.class_names == b.val.class_names != c.val.class_names
    assert a.train.num_classes == 7 and a.val.num_classes == 3
    assert not set(a.train.class_names) & set(a.val.class_names)
    assert sorted(a.train.class_names + a.val.class_names) == [
        f"{i:03d}.Bird_{i}" for i in range(1, 11)
    ]
    for ds in (a.train, a.val):
        assert sorted(set(ds.labels.tolist())) == list(range(ds.num_classes))
        ids = [int(ds.class_names[y][:3]) for y in ds.labels]
        assert ids == image_class_ids(ds)
    assert a.test.num_classes == 1
    with pytest.raises(ValueError, match="between 1 and 9"):
        load_dataset("cub200", tmp_path, val_classes=10)
    with pytest.raises(ValueError, match="fraction"):
        load_dataset("cub200", tmp_path, val_classes=1.5)


# ---------------------------------------------------------------------------- bad input
def test_missing_root_and_wrong_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist.*download=True"):
        load_dataset("cub200", tmp_path / "nope")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub200", tmp_path)
    msg = str(e.value)
    assert "CUB_200_2011/images.txt" in msg and "'readme.txt'" in msg and "'stuff/'" in msg
    with pytest.raises(DatasetLayoutError, match="Ebay_train.txt"):
        load_dataset("sop", tmp_path)
    with pytest.raises(DatasetLayoutError, match="images_background"):
        load_dataset("omniglot", tmp_path)
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat"):
        load_dataset("cars196", tmp_path / "stuff")
    with pytest.raises(DatasetLayoutError, match="needs a root"):
        load_dataset("sop")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(TypeError, match="does not take option"):
        load_dataset("cub200", tmp_path, source="npz")


def test_annotation_references_missing_image(tmp_path: Path) -> None:
    base = make_cub(tmp_path)
    victim = next((base / "images" / "101.Bird_101").iterdir())
    victim.unlink()
    with pytest.raises(MissingImageError) as e:
        load_dataset("cub200", tmp_path)
    assert str(victim) in str(e.value) and "skip_corrupt=True" in str(e.value)
    s = load_dataset("cub200", tmp_path, skip_corrupt=True)
    assert len(s.test) == 8 and s.test.missing == [str(victim)] and s.train.missing == []
    assert "1 missing file(s) skipped" in s.test.describe()


def test_damaged_annotation_line(tmp_path: Path) -> None:
    base = make_cub(tmp_path)
    (base / "images.txt").write_text("1\n")
    with pytest.raises(DatasetLayoutError, match=r"images.txt:1: expected 2 fields"):
        load_dataset("cub200", tmp_path)
