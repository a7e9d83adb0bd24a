"""Analysis reports, retrieval grids and search on a real (digits) run and hand-made cases."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from nirdml.analysis import (
    analyze,
    class_spread,
    embed_gallery,
    query_scores,
    render_retrieval_grid,
    retrieval_rows,
    search,
)
from nirdml.analysis.images import dataset_images, find_normalize, tensor_to_rgb
from nirdml.analysis.retrieval_grid import CORRECT_RGB, QUERY_RGB, UNKNOWN_RGB, WRONG_RGB
from nirdml.analysis.search import embed_images, search_grid
from nirdml.cli import main
from nirdml.evaluation import evaluate, pi_ratio
from nirdml.training.artifacts import embed_folder, load_trained
from nirdml.training.config import load_config
from nirdml.training.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-epoch digits run with NIR (a real checkpoint with a flow)."""
    overrides = ["epochs=2", "eval.every=1", "log.progress=false", "data.val_classes=0"]
    cfg = load_config("digits-nir", overrides)  # all 5 training digits (no validation carve)
    return train(cfg, tmp_path_factory.mktemp("runs") / "digits-nir").out_dir


@pytest.fixture(scope="module")
def gallery(digits_run, tmp_path_factory):
    """40 digits test images as PNG files in class folders (8 per digit)."""
    from nirdml.data import load_dataset

    test = load_dataset("digits").test
    root = tmp_path_factory.mktemp("gallery")
    for c in range(test.num_classes):
        folder = root / f"digit{test.class_names[c]}"
        folder.mkdir()
        for j, i in enumerate(np.flatnonzero(test.labels == c)[:8]):
            raw = test.with_transform(None)[int(i)][0][0].numpy()  # 8x8 in [0, 1]
            Image.fromarray((raw * 255).round().astype(np.uint8)).save(folder / f"{j}.png")
    return root


def _images_in_html(html: str) -> dict[str, bytes]:
    found = {}
    for m in re.finditer(r'<img src="data:image/png;base64,([^"]+)" data-file="([^"]+)"', html):
        found[m.group(2)] = base64.b64decode(m.group(1))
    return found


def test_report_embeds_every_image_and_matches_training_metrics(digits_run, tmp_path):
    rng_state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    report = analyze(digits_run, tmp_path / "report", k=6, num_queries=5)
    assert torch.equal(rng_state, torch.random.get_rng_state()), "analyze touched torch's RNG"
    assert np.array_equal(np_state, np.random.get_state()[1]), "analyze touched numpy's RNG"

    expected = {
        "spectrum.png",
        "spread.png",
        "map.png",
        "retrieval_random.png",
        "retrieval_worst.png",
        "flow_samples.png",  # a NIR run
        "training.png",  # the checkpoint has a history
    }
    html = report.html.read_text()
    embedded = _images_in_html(html)
    assert set(embedded) == expected
    for name in expected:
        on_disk = (tmp_path / "report" / name).read_bytes()
        assert embedded[name] == on_disk, f"{name}: embedded copy differs from the file"
        assert on_disk[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(on_disk)) as img:
            img.load()
            assert img.format == "PNG" and img.width > 100 and img.height > 100
        assert f'href="{name}"' in html
    # No other local reference that could break when the page is moved.
    srcs = re.findall(r'src="([^"]+)"', html)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)

    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    # Same checkpoint, same test split: the report's metrics are the training evaluation's.
    last = load_trained(digits_run).state["history"][-1]
    for key in ("recall@1", "recall@2", "map@r", "nmi"):
        assert numbers["metrics"][key] == pytest.approx(last[f"test/{key}"], abs=1e-6), key
    assert numbers["items"] == 896 and numbers["classes"] == 5
    assert numbers["map"]["method"] in ("tsne", "umap")
    assert len(numbers["flow"]) == 5  # digits has 5 training classes; all are shown
    for st in numbers["flow"]:
        assert st["n_samples"] == 60 and math.isfinite(st["nll_real"])
    worst = numbers["retrieval"]["retrieval_worst.png"]
    assert len(worst) == 5 and all(len(w["neighbours"]) == 6 for w in worst)


# ----------------------------------------------------------------------------- hand-made grid


def _arc(angles):
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


# Unit vectors on an arc: distance grows with the angle difference. Item 6 duplicates item 0
# exactly but has another class: self is excluded by index, the duplicate is a neighbour.
ANGLES = [0.0, 0.1, 0.25, 0.45, 0.7, 1.2, 0.0]
LABELS = [0, 0, 1, 0, 1, 1, 1]


def test_retrieval_rows_hand_checked():
    x, y = _arc(ANGLES), np.asarray(LABELS)
    rows = retrieval_rows(x, y, [0, 2], k=4)
    assert rows[0].neighbours == [6, 1, 2, 3]  # 6: distance 0 (duplicate), then by angle
    assert rows[0].correct == [False, True, False, True]
    assert rows[1].neighbours == [1, 3, 0, 6]  # |0.25-0.1|, |0.45-0.25|, then 0 and 6 tie: index
    assert rows[1].correct == [False, False, False, True]
    assert rows[0].similarities[0] == pytest.approx(1.0)
    assert rows[0].similarities[1] == pytest.approx(math.cos(0.1), abs=1e-6)


def test_grid_frames_are_green_for_correct_and_red_for_wrong():
    x, y = _arc(ANGLES), np.asarray(LABELS)
    rows = retrieval_rows(x, y, [0, 2], k=4)
    colors = {i: (20 * i + 30, 200 - 20 * i, 90) for i in range(len(y))}  # one colour per item

    def images(i):
        return np.full((10, 14, 3), colors[i], dtype=np.uint8)

    png, layout = render_retrieval_grid(rows, images, ["a", "b"], title="hand-made", tile=64)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert img.shape[:2] == (layout.size[1], layout.size[0])

    def edge_pixels(box):
        x0, y0, x1, y1 = box
        mx, my = (x0 + x1) // 2, (y0 + y1) // 2
        return [img[y0 + 1, mx], img[y1 - 1, mx], img[my, x0 + 1], img[my, x1 - 1]]

    for r, row in enumerate(rows):
        assert all(tuple(p) == QUERY_RGB for p in edge_pixels(layout.query_boxes[r]))
        qx0, qy0, qx1, qy1 = layout.query_boxes[r]
        assert tuple(img[(qy0 + qy1) // 2, (qx0 + qx1) // 2]) == colors[row.query]
        for box, j, ok in zip(layout.result_boxes[r], row.neighbours, row.correct, strict=True):
            want = CORRECT_RGB if ok else WRONG_RGB
            assert all(tuple(p) == want for p in edge_pixels(box)), (r, j)
            x0, y0, x1, y1 = box
            assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == colors[j], "wrong image in tile"
    # 3 green and 5 red frames in all, as hand-checked above.
    flat = [c for row in layout.result_colors for c in row]
    assert flat.count(CORRECT_RGB) == 3 and flat.count(WRONG_RGB) == 5


def test_unknown_query_class_gets_grey_frames():
    from nirdml.analysis import RetrievalRow

    row = RetrievalRow(0, -1, [1, 2], [0, 1], [0.9, 0.8], [None, None])
    png, layout = render_retrieval_grid([row], None, ["a", "b"], tile=48)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    for x0, y0, x1, _ in layout.result_boxes[0]:
        assert tuple(img[y0 + 1, (x0 + x1) // 2]) == UNKNOWN_RGB


def test_query_scores_match_evaluation_and_rank_the_worst_first():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((12, 8))
    y = np.repeat(np.arange(12), 6)
    x = (centres[y] + 0.9 * rng.standard_normal((72, 8))).astype(np.float32)
    s = query_scores(x, y)
    assert s.metric == "map@r" and s.window == 5
    assert np.nanmean(s.ap) == pytest.approx(evaluate(x, y, ["map@r"])["map@r"], abs=1e-12)
    worst = s.worst(10)
    rest = np.setdiff1d(np.arange(72), worst)
    assert s.ap[worst].max() <= s.ap[rest].min()
    assert list(s.ap[worst]) == sorted(s.ap[worst])
    # first hit and nearest same-class similarity against a brute-force loop
    x64 = x.astype(np.float64)
    u = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    for q in range(72):
        order = [j for j in np.lexsort((np.arange(72), d[q])) if j != q]
        hits = [y[j] == y[q] for j in order]
        assert s.first_hit[q] == (hits.index(True) + 1 if True in hits[:5] else 0)
        same = [j for j in range(72) if j != q and y[j] == y[q]]
        assert s.nearest_positive[q] == pytest.approx(max(u[same] @ u[q]), abs=1e-9)


def test_class_spread_equals_pi_ratio_and_brute_force():
    rng = np.random.default_rng(0)
    y = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4)  # class 2 is a singleton
    x = rng.standard_normal((len(y), 6))
    s = class_spread(x, y)
    assert s.pi_ratio == pytest.approx(pi_ratio(x, y), rel=1e-12)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for pos, c in enumerate(s.classes):
        m = u[y == c]
        if len(m) < 2:
            assert math.isnan(s.intra[pos])
            continue
        pairs = [1 - m[i] @ m[j] for i in range(len(m)) for j in range(len(m)) if i != j]
        assert s.intra[pos] == pytest.approx(np.mean(pairs), abs=1e-12)
    tight, wide = s.extremes(2)
    assert s.intra[tight[0]] == np.nanmin(s.intra) and s.intra[wide[0]] == np.nanmax(s.intra)


def test_display_images_undo_the_normalisation():
    from nirdml.data import load_dataset

    test = load_dataset("digits").test
    mean, std = find_normalize(test.transform)
    assert mean.tolist() == pytest.approx([0.3053]) and std.tolist() == pytest.approx([0.3760])
    shown = dataset_images(test)(7)
    raw = test.with_transform(None)[7][0][0].numpy()  # pixel / 16 in [0, 1]
    assert shown.shape == (8, 8, 3) and shown.dtype == np.uint8
    assert np.abs(shown[..., 0].astype(float) - raw * 255).max() <= 1.0
    assert (shown[..., 0] == shown[..., 2]).all()
    # Without a Normalize step a float tensor is read as [0, 1].
    t = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]])
    assert tensor_to_rgb(t, None)[..., 0].tolist() == [[0, 128], [255, 255]]


# ----------------------------------------------------------------------------- search


def test_search_finds_the_same_neighbours_as_brute_force_and_caches(digits_run, gallery, tmp_path):
    cache = tmp_path / "cache"
    query = gallery / "digit7" / "3.png"
    result = search(digits_run, gallery, query, k=5, cache_dir=cache, grid=tmp_path / "g.png")
    assert not result.gallery.from_cache and result.gallery.cache_file.is_file()
    assert len(result.gallery.paths) == 40
    own = result.query_in_gallery[0]
    assert own is not None and result.gallery.paths[own] == str(query.resolve())

    # brute force: embed every file the same way and rank by cosine, the query left out
    run = load_trained(digits_run)
    emb = embed_images(run, result.gallery.paths, "cpu")
    q = embed_images(run, [query], "cpu")[0]
    assert torch.allclose(emb, result.gallery.embeddings, atol=1e-5)
    sims = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(q, dim=0)
    sims[own] = -2
    expected = torch.argsort(-sims, stable=True)[:5].tolist()
    hits = result.hits[0]
    assert [h.index for h in hits] == expected
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert [h.similarity for h in hits] == pytest.approx(sims[expected].tolist(), abs=1e-5)
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC

    again = search(digits_run, gallery, query, k=5, cache_dir=cache)
    assert again.gallery.from_cache
    assert [h.index for h in again.hits[0]] == expected

    # Touching one gallery file changes the key: the cache is rebuilt, not reused.
    f = gallery / "digit5" / "0.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = embed_gallery(digits_run, gallery, cache_dir=cache)
    assert not rebuilt.from_cache and rebuilt.key != result.gallery.key
    assert len(list(cache.glob("gallery-*.npz"))) == 2
    assert not list(cache.glob(".*tmp")), "a temporary file was left behind"


def test_search_cli_prints_ranked_paths(digits_run, gallery, tmp_path, capsys):
    outside = tmp_path / "query.png"
    Image.open(gallery / "digit9" / "0.png").save(outside)
    code = main(
        [
            "search",
            str(digits_run),
            "--gallery",
            str(gallery),
            "--query",
            str(outside),
            "-k",
            "3",
            "--cache-dir",
            str(tmp_path / "c"),
            "--grid",
            str(tmp_path / "grid.png"),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = [ln for ln in out.splitlines() if re.match(r"\s+\d+\s+-?\d\.\d{4}\s+/", ln)]
    assert len(lines) == 3
    # the identical file in the gallery is the best match (the query itself is outside it)
    assert lines[0].split()[2] == str((gallery / "digit9" / "0.png").resolve())
    assert float(lines[0].split()[1]) == pytest.approx(1.0, abs=1e-5)
    assert "cache written" in out


def test_search_in_an_unlabelled_folder_leaves_the_class_unknown(digits_run, gallery, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for j, f in enumerate(sorted((gallery / "digit6").iterdir())[:5]):
        (flat / f"{j}.png").write_bytes(f.read_bytes())
    result = search(
        digits_run, flat, flat / "0.png", k=3, cache_dir=tmp_path / "c", grid=tmp_path / "g.png"
    )
    assert result.query_in_gallery[0] == 0 and [h.rank for h in result.hits[0]] == [1, 2, 3]
    assert all(h.path != str((flat / "0.png").resolve()) for h in result.hits[0])
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    png, layout = search_grid(result)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert layout.result_colors == [[UNKNOWN_RGB] * 3]
    for x0, y0, x1, _ in layout.result_boxes[0]:
        assert tuple(img[y0 + 1, (x0 + x1) // 2]) == UNKNOWN_RGB


def test_analyze_an_exported_embeddings_file_through_the_cli(digits_run, gallery, tmp_path):
    npz = embed_folder(digits_run, gallery, tmp_path / "emb.npz", device="cpu")
    out = tmp_path / "rep"
    assert main(["analyze", str(npz), "-o", str(out), "--map", "pca", "-k", "4"]) == 0
    html = (out / "report.html").read_text()
    embedded = _images_in_html(html)
    assert set(embedded) == {
        "spectrum.png",
        "spread.png",
        "map.png",
        "retrieval_random.png",
        "retrieval_worst.png",
    }
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["kind"] == "embeddings" and numbers["items"] == 40
    assert numbers["map"]["method"] == "pca"
    row = numbers["retrieval"]["retrieval_random.png"][0]
    assert row["query_path"].endswith(".png") and len(row["neighbour_paths"]) == 4
    data = np.load(npz)
    assert numbers["metrics"]["recall@1"] == pytest.approx(
        evaluate(data["embeddings"], data["labels"], ["recall@1"])["recall@1"]
    )


def test_bad_inputs_name_the_fix(digits_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder"):
        analyze(tmp_path / "missing", tmp_path / "o")
    npz = tmp_path / "e.npz"
    np.savez(npz, embeddings=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="labels"):
        analyze(npz, tmp_path / "o")
    np.savez(npz, embeddings=np.eye(4, dtype=np.float32), labels=np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="checkpoints only"):
        analyze(npz, tmp_path / "o", dataset="digits")
    with pytest.raises(ValueError, match="not a NIR checkpoint"):
        analyze(npz, tmp_path / "o", flow_classes=[0], map_method="pca")
    with pytest.raises(ValueError, match="2-D map method"):
        analyze(npz, tmp_path / "o", map_method="mds")
    assert main(["analyze", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o")]) == 2


# ----------------------------------------------------------------------------- flow samples


def _small_nir(base):
    from nirdml.losses import NIRLoss
    from nirdml.models import build_model

    model = build_model("small_cnn", 16, in_channels=1, seed=0).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        loss = NIRLoss(base).eval()
    return model, loss


def test_flow_samples_are_the_flows_own_draws_around_the_proxy():
    from nirdml.analysis import draw_flow_samples
    from nirdml.data import build_transforms, load_dataset
    from nirdml.losses import ProxyAnchorLoss

    train = load_dataset("digits").train.with_transform(build_transforms("digits", train=False))
    model, loss = _small_nir(ProxyAnchorLoss(5, 16, generator=torch.Generator().manual_seed(0)))
    fs = draw_flow_samples(model, loss, train, classes=[2, 4], num_samples=7, max_real=9, seed=5)
    assert fs.classes == [2, 4] and fs.names == ["2", "4"]
    assert [r.shape for r in fs.real] == [(9, 16), (9, 16)]
    proxy = torch.nn.functional.normalize(loss.proxies[2].detach(), dim=0)
    with torch.no_grad():
        own = loss.flow.sample(proxy, 7, generator=torch.Generator().manual_seed(5))
    assert np.allclose(fs.samples[0], own.numpy(), atol=1e-5)
    assert np.allclose(fs.proxies[0], proxy.numpy(), atol=1e-6)
    again = draw_flow_samples(model, loss, train, classes=[2, 4], num_samples=7, max_real=9, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(fs.samples, again.samples, strict=True))
    # the real embeddings' NLL matches the flow's own nll()
    real = torch.from_numpy(fs.real[1])
    cond = torch.nn.functional.normalize(loss.proxies[4].detach(), dim=0).expand(9, -1)
    with torch.no_grad():
        assert fs.stats[1]["nll_real"] == pytest.approx(
            float(loss.flow.nll(real, cond).mean()), abs=1e-4
        )


def test_flow_samples_for_soft_triple_use_the_per_sample_condition():
    from nirdml.analysis import draw_flow_samples
    from nirdml.data import build_transforms, load_dataset
    from nirdml.losses import SoftTripleLoss

    train = load_dataset("digits").train.with_transform(build_transforms("digits", train=False))
    model, loss = _small_nir(SoftTripleLoss(5, 16, centers_per_class=3))
    fs = draw_flow_samples(model, loss, train, num_classes=2, num_samples=11, max_real=4, seed=0)
    assert len(fs.classes) == 2 and fs.samples[0].shape == (11, 16)
    assert all(math.isfinite(v) for st in fs.stats for v in st.values())
    with pytest.raises(ValueError, match="not training classes"):
        draw_flow_samples(model, loss, train, classes=[7])
    with pytest.raises(ValueError, match="NIR model"):
        draw_flow_samples(model, loss.base_loss, train)


def test_report_shows_the_nir_alarm_per_epoch(digits_run, tmp_path):
    report = analyze(digits_run, tmp_path / "report", k=4, num_queries=2)
    alarm = json.loads((tmp_path / "report" / "report.json").read_text())["nir_alarm"]
    history = [json.loads(x) for x in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in alarm["epochs"]] == [1, 2]
    assert alarm["threshold"] == 1e-6 and alarm["objective"] == "exp_nll"
    for e, row in zip(alarm["epochs"], history, strict=True):
        assert e["grad_ratio"] == row["train/nir_grad_ratio"] > 0
        assert e["nll_min"] <= e["nll_max"] and math.isfinite(e["nll_mean"])
    html = report.html.read_text()
    assert 'id="nir_alarm"' in html and "NIR inertness alarm" in html


def test_flow_plot_draws_classes_with_a_single_real_embedding():
    """One real embedding in all (a class with one image): its PCA plane has no direction;
    the plot still draws (the missing axis is flat) instead of failing in the projection."""
    from nirdml.analysis.plots import _principal_plane, flow_plot

    rng = np.random.default_rng(0)
    png = flow_plot(
        [rng.normal(size=(1, 8))], [rng.normal(size=(5, 8))], rng.normal(size=(1, 8)), ["a"]
    )
    assert png.startswith(b"\x89PNG")
    points = rng.normal(size=(4, 8))
    centre, axes = _principal_plane(points)
    assert axes.shape == (8, 2) and np.allclose(axes.T @ axes, np.eye(2))
    assert _principal_plane(points[:1])[1].shape == (8, 2)
