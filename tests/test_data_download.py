"""Downloads (offline): resume with Range, checksum, atomic extraction, end-to-end fetch."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from nirdml.data import download, load_dataset
from nirdml.data.download import Archive, ChecksumError, download_file, extract_archive
from test_data_datasets import make_cub, make_omniglot_png, make_sop


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, status: int, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.status = status
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def getcode(self) -> int:
        return self.status

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection dropped")
        if self.fail_after is not None:
            n = min(n, self.fail_after - self.tell())
        return super().read(n)


class FakeServer:
    """An opener serving fixed bytes; honours Range unless told not to; can drop once."""

    def __init__(self, data: bytes, honour_range: bool = True, drop_at: int | None = None):
        self.data, self.honour_range, self.drop_at = data, honour_range, drop_at
        self.ranges: list[str | None] = []

    def __call__(self, request, timeout: float = 0) -> FakeResponse:
        rng = request.get_header("Range")
        self.ranges.append(rng)
        drop, self.drop_at = self.drop_at, None
        if rng and self.honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(self.data):
                raise urllib.error.HTTPError(
                    request.full_url, 416, "Range Not Satisfiable", {}, None
                )
            return FakeResponse(self.data[start:], 206)
        return FakeResponse(self.data, 200, fail_after=drop)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_resume_after_dropped_connection(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    server = FakeServer(data, drop_at=120_000)
    dest = tmp_path / "a.zip"
    with pytest.raises(ConnectionResetError):
        download_file(
            "http://x/a.zip", dest, md5(data), opener=server, chunk_size=10_000, progress=False
        )
    assert not dest.exists() and (tmp_path / "a.zip.part").stat().st_size == 120_000
    download_file(
        "http://x/a.zip", dest, md5(data), opener=server, chunk_size=10_000, progress=False
    )
    assert dest.read_bytes() == data and not (tmp_path / "a.zip.part").exists()
    assert server.ranges == [None, "bytes=120000-"]
    # Already there with the right checksum: nothing is fetched.
    download_file("http://x/a.zip", dest, md5(data), opener=server, progress=False)
    assert len(server.ranges) == 2


def test_complete_partial_file_is_finished_without_data(tmp_path: Path) -> None:
    data = os.urandom(5_000)
    (tmp_path / "d.bin.part").write_bytes(data)  # stopped after the last byte, before rename
    server = FakeServer(data)
    download_file("http://x/d.bin", tmp_path / "d.bin", md5(data), opener=server, progress=False)
    assert (tmp_path / "d.bin").read_bytes() == data and server.ranges == ["bytes=5000-"]


def test_server_ignoring_range_restarts(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    (tmp_path / "b.bin.part").write_bytes(data[:1000] + b"stale")
    server = FakeServer(data, honour_range=False)
    download_file("http://x/b.bin", tmp_path / "b.bin", md5(data), opener=server, progress=False)
    assert (tmp_path / "b.bin").read_bytes() == data


def test_checksum_mismatch_removes_partial(tmp_path: Path) -> None:
    data = b"hello" * 1000
    with pytest.raises(ChecksumError, match=f"md5 {md5(data)}, expected 0+") as e:
        download_file(
            "http://x/c", tmp_path / "c", "0" * 32, opener=FakeServer(data), progress=False
        )
    assert "re-download" in str(e.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.part").exists()


def test_file_url_download(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(10_000))
    out = download_file(
        src.as_uri(), tmp_path / "out" / "dst.bin", md5(src.read_bytes()), progress=False
    )
    assert out.read_bytes() == src.read_bytes()


def make_zip(path: Path, folder: Path, arc_root: str | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, (arc_root or folder.name) + "/" + str(f.relative_to(folder)))


def test_extract_is_atomic_and_safe(tmp_path: Path) -> None:
    content = tmp_path / "content" / "top"
    (content / "sub").mkdir(parents=True)
    (content / "sub" / "f.txt").write_text("x")
    make_zip(tmp_path / "ok.zip", content)
    out = tmp_path / "out"
    assert extract_archive(tmp_path / "ok.zip", out, "top") == out / "top"
    assert (out / "top" / "sub" / "f.txt").read_text() == "x"
    # An archive without the expected folder fails and leaves nothing behind.
    with pytest.raises(ValueError, match="does not contain the folder 'other'"):
        extract_archive(tmp_path / "ok.zip", out, "other")
    assert sorted(p.name for p in out.iterdir()) == ["top"]
    # Path traversal is refused.
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="outside"):
        extract_archive(tmp_path / "evil.zip", out, "evil")
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["top"]


def test_fetch_and_load_omniglot_cub_sop(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    # Omniglot: two zips in the upstream layout.
    make_omniglot_png(src / "omni")
    archives = []
    for key in ("images_background", "images_evaluation"):
        make_zip(src / f"{key}.zip", src / "omni" / key)
        archives.append(
            Archive(
                (src / f"{key}.zip").as_uri(),
                md5((src / f"{key}.zip").read_bytes()),
                f"{key}.zip",
                key,
            )
        )
    # CUB: a .tgz holding CUB_200_2011/ (and attributes.txt beside it, as the real one).
    make_cub(src / "cub")
    (src / "cub" / "attributes.txt").write_text("1 has_bill_shape::dagger\n")
    with tarfile.open(src / "CUB_200_2011.tgz", "w:gz") as tf:
        tf.add(src / "cub" / "CUB_200_2011", "CUB_200_2011")
        tf.add(src / "cub" / "attributes.txt", "attributes.txt")
    cub = Archive(
        "http://unused/CUB_200_2011.tgz",
        md5((src / "CUB_200_2011.tgz").read_bytes()),
        "CUB_200_2011.tgz",
        "CUB_200_2011",
    )
    # SOP: a zip served from an overridden URL (a mirror).
    make_sop(src / "sop")
    make_zip(src / "Stanford_Online_Products.zip", src / "sop" / "Stanford_Online_Products")
    sop = Archive(
        "ftp://unused/Stanford_Online_Products.zip",
        md5((src / "Stanford_Online_Products.zip").read_bytes()),
        "Stanford_Online_Products.zip",
        "Stanford_Online_Products",
    )
    monkeypatch.setattr(
        download, "SOURCES", {"omniglot": tuple(archives), "cub200": (cub,), "sop": (sop,)}
    )

    root = tmp_path / "data"
    s = load_dataset("omniglot", root, download=True, source="png")
    assert (s.train.num_classes, s.test.num_classes, len(s.train)) == (3, 2, 9)
    assert sorted(p.name for p in root.iterdir()) == [
        "images_background",
        "images_background.zip",
        "images_evaluation",
        "images_evaluation.zip",
    ]
    s = load_dataset(
        "cub200",
        root,
        download=True,
        urls={"CUB_200_2011.tgz": (src / "CUB_200_2011.tgz").as_uri()},
    )
    assert (len(s.train), len(s.test)) == (9, 9)
    s = load_dataset(
        "sop",
        root,
        download=True,
        urls={"Stanford_Online_Products.zip": (src / "Stanford_Online_Products.zip").as_uri()},
    )
    assert (s.train.num_classes, s.test.num_classes) == (3, 3)
    # Second call: already extracted, nothing is fetched (the URL would fail).
    load_dataset(
        "sop", root, download=True, urls={"Stanford_Online_Products.zip": "http://0.0.0.0:9/x"}
    )
    assert not list(root.glob(".*extract*"))
    with pytest.raises(ValueError, match="unknown archives"):
        load_dataset("sop", root, download=True, urls={"sop.zip": "http://x"})
    with pytest.raises(TypeError, match="only apply with download=True"):
        load_dataset("sop", root, urls={"Stanford_Online_Products.zip": "http://x"})


def test_published_sources() -> None:
    # The md5s match torchvision's Omniglot (checked in its source) and the CUB/SOP records.
    md5s = {a.filename: a.md5 for archives in download.SOURCES.values() for a in archives}
    assert md5s == {
        "CUB_200_2011.tgz": "97eceeb196236b17998738112f37df78",
        "Stanford_Online_Products.zip": "7f73d41a2f44250d4779881525aea32e",
        "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    }
    tv = pytest.importorskip("torchvision.datasets")
    assert tv.Omniglot.zips_md5 == {
        "images_background": md5s["images_background.zip"],
        "images_evaluation": md5s["images_evaluation.zip"],
    }
