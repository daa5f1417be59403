#!/usr/bin/env python
"""Fetch a real dataset into the on-disk layout dflsplit reads, verifying every download.

    python download_dataset.py mnist   --root data/mnist    # data/mnist/MNIST/raw/*-ubyte.gz
    python download_dataset.py cifar10 --root data/cifar10  # data/cifar10/cifar-10-batches-py/...
    python download_dataset.py femnist --root data/femnist  # data/femnist/{train,test}/*.json

Then set `dataset: {name: NAME, root: DIR}` in the config (the same DIR as --root).

Each file is streamed to a temporary file beside its destination, checked, and only then
renamed into place; a file that is already there and checks out is not downloaded again.
Offline, the script names the URL that failed and the path to put the file at by hand;
run it again and it verifies and unpacks that file without a download.

* cifar10: cifar-10-python.tar.gz from the CIFAR-10 site, MD5 as published there (and in
  torchvision); the extracted batches are checked against torchvision's per-file MD5s.
* mnist: the four idx .gz files from torchvision's mirror list, with torchvision's MD5s;
  dflsplit reads them compressed, so nothing is unpacked.
* femnist: NIST Special Database 19 (by_class.zip, by_write.zip, the files LEAF's
  get_data.sh downloads), converted here into LEAF's per-writer JSON as LEAF's FEMNIST
  scripts do (see FEMNIST_HELP below for what is the same and what differs).
  NIST publishes no checksum and no size for these two zips, and none could be computed
  here (no internet), so none is invented: the script checks that the transfer is complete
  (Content-Length), then the CRC-32 of every member of each zip, and prints the SHA-256 of
  what it got so it can be recorded.

`--url-base URL` (or $DFLSPLIT_DATASET_URL_BASE) fetches every file as URL/<file name>
instead, e.g. from a mirror or a local copy served over HTTP.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import sys
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.error import URLError
from urllib.request import urlopen

DOWNLOADABLE = ("mnist", "cifar10", "femnist")
URL_BASE_ENV = "DFLSPLIT_DATASET_URL_BASE"
TIMEOUT_S = 60  # per connection attempt and per read
CHUNK = 1 << 20

# MD5 of every file this script downloads or unpacks; None where no checksum is published.
# Sources: torchvision/datasets/mnist.py and cifar.py (torchvision 0.29.1, the version this
# project pins); the archive's MD5 is also on https://www.cs.toronto.edu/~kriz/cifar.html.
MD5: dict[str, str | None] = {
    # MNIST
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    # CIFAR-10: the archive, and the files it holds
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    # NIST SD19 (FEMNIST's source): NIST publishes no checksum or size for these files.
    "by_class.zip": None,
    "by_write.zip": None,
}

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
NIST_BASE = "https://s3.amazonaws.com/nist-srd/SD19/"  # what LEAF's get_data.sh fetches
NIST_FILES = ("by_class.zip", "by_write.zip")
NIST_FOLDER = "raw_data"

CHECKSUM_HELP = """\
Checksums: cifar10 and mnist files are checked against the MD5s torchvision lists (the
CIFAR-10 archive's is also on its web page); cifar10's unpacked batches too. NIST
publishes no checksum for femnist's source zips (see below).
"""

FEMNIST_HELP = """\
femnist: LEAF's FEMNIST built from NIST SD19. The zips go to ROOT/raw_data/; the result is
ROOT/train/*.json and ROOT/test/*.json in LEAF's format ({"users", "num_samples",
"user_data": {writer: {"x": [[784 floats in 0..1]], "y": [labels 0..61]}}}), named as LEAF
names them (all_data_<i>_niid_<fraction>_keep_<k>_{train,test}_<train fraction>.json).
The same as LEAF's scripts (preprocess.sh -s niid --sf F -k K -t sample --tf T): writers are
the by_write folders; an image's class is that of the by_class image (hsf_* folders only)
with the same MD5 of its PNG bytes; 100 writers per file; images converted to greyscale,
shrunk to 28x28 with PIL's thumbnail (LANCZOS) and divided by 255; labels 0-9 digits,
10-35 upper case, 36-61 lower case; per file, non-IID sampling of a fraction of the
samples by whole writers (random.Random(seed), the same sequence of draws as LEAF's
sample.py), removal of writers with fewer than K samples, and a per-writer split of each
writer's samples into train and test (split_data.py --by_sample: max(1, int(T*n)) train,
writers with fewer than 2 samples dropped). Different from LEAF: writers and images are
taken in sorted path order (LEAF: os.listdir order, which depends on the file system), so
the files hold the same writers and images but not always in the same order or the same
random draws as a given LEAF run; LEAF's group_by_writer.py counts the first image of
every writer after the first twice, here every image is counted once; a by_write image
with no by_class twin is skipped and counted (LEAF stops with a KeyError); one --seed (not
the current time) drives both the sampling and the split; pixel values can differ in the
last bits with the Pillow version (LEAF used Image.ANTIALIAS, removed in Pillow 10; its
thumbnail() has used a reducing gap since Pillow 7). NIST publishes no checksum or size
for by_class.zip and by_write.zip: the transfer's completeness (Content-Length) and every
member's CRC-32 are checked, and the SHA-256 of each zip is printed and written to
ROOT/conversion.json.
"""


class DownloadError(Exception):
    """A file could not be fetched or did not verify; the message says what to do."""


class ChecksumError(DownloadError):
    """A file's checksum is not the published one."""


@dataclass(frozen=True)
class Source:
    """One remote file: its name, where to put it, and the URLs to try in order."""

    name: str
    dest: Path
    urls: tuple[str, ...]

    @property
    def md5(self) -> str | None:
        return MD5[self.name]


# --- verification -----------------------------------------------------------------------

def file_digests(path: Path) -> tuple[str, str]:
    """(MD5, SHA-256) of a file's bytes."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def check_zip(path: Path) -> str | None:
    """None if every member's CRC-32 matches, else what is wrong."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a readable zip file ({e})"
    return None if bad is None else f"member {bad} fails its CRC-32"


def verify(path: Path, name: str, md5: str | None = None) -> str | None:
    """None when the file at `path` is `name` as published, else why not. `md5` is the
    file's MD5 when already computed."""
    expected = MD5[name]
    if expected is not None:
        actual = md5 or file_digests(path)[0]
        if actual != expected:
            return f"MD5 {actual}, expected {expected}"
    if name.endswith(".zip"):
        return check_zip(path)
    return None


def checksum_note(name: str) -> str:
    md5 = MD5[name]
    return f"MD5 {md5}" if md5 else "no checksum is published: the zip's CRC-32s"


# --- download ---------------------------------------------------------------------------

def _partial_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")


def _progress(total: int | None, label: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of dflsplit
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not sys.stderr.isatty())


def _download(url: str, tmp: Path, label: str) -> tuple[str, str, int]:
    """Stream `url` into `tmp`; (MD5, SHA-256, bytes). Raises OSError-like errors when the
    transfer fails or ends before its Content-Length."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with urlopen(url, timeout=TIMEOUT_S) as resp, open(tmp, "wb") as out:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _progress(total, label)
        try:
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                md5.update(block)
                sha.update(block)
                size += len(block)
                if bar is not None:
                    bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
        out.flush()
        os.fsync(out.fileno())
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)
    return md5.hexdigest(), sha.hexdigest(), size


def fetch(src: Source, log: Callable[[str], None] = print) -> Path:
    """Put `src` at `src.dest`, verified: keep a file already there that verifies, else
    download it (trying each URL in turn) to a temporary file, verify, rename into place.

    Raises ChecksumError (naming the file, expected and actual checksum; nothing is left in
    place) or DownloadError (every URL failed)."""
    dest = src.dest
    if dest.is_file():
        problem = verify(dest, src.name)
        if problem is None:
            log(f"{dest}: present and verified ({checksum_note(src.name)})")
            return dest
        log(f"{dest}: present but {problem}; downloading it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, BaseException]] = []
    for url in src.urls:
        tmp = _partial_path(dest)
        try:
            log(f"downloading {url}")
            try:
                md5, sha, size = _download(url, tmp, src.name)
            except (URLError, OSError, http.client.HTTPException, ValueError) as e:
                failures.append((url, e))
                continue
            problem = verify(tmp, src.name, md5)
            if problem is not None:
                raise ChecksumError(
                    f"error: {src.name} downloaded from {url} does not verify: {problem}. "
                    f"The file was discarded; nothing was written to {dest}."
                )
            os.replace(tmp, dest)
            log(f"{dest}: {size} bytes, verified ({checksum_note(src.name)}); SHA-256 {sha}")
            return dest
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(_failed_message(src, failures))


def _reason(e: BaseException) -> str:
    if isinstance(e, URLError) and not hasattr(e, "code"):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return f"{type(e).__name__}: {e}"


def _failed_message(src: Source, failures: Sequence[tuple[str, BaseException]]) -> str:
    tried = "; ".join(f"{url} ({_reason(e)})" for url, e in failures)
    return f"could not download {src.name}: {tried}."


def _offline_help(name: str, root: Path, pending: Sequence[Source], error: DownloadError) -> str:
    where = "; ".join(f"{s.dest.resolve()} (from {' or '.join(s.urls)})" for s in pending)
    return (
        f"error: {error} If this machine is offline, download "
        f"{'that file' if len(pending) == 1 else 'these files'} elsewhere and put "
        f"{'it' if len(pending) == 1 else 'each'} at: {where}. Then run "
        f"`python download_dataset.py {name} --root {root}` again: it verifies "
        f"{'the file' if len(pending) == 1 else 'the files'} and "
        f"{'converts' if name == 'femnist' else 'unpacks'} "
        f"{'it' if len(pending) == 1 else 'them'} without downloading."
    )


def fetch_all(name: str, root: Path, sources: Sequence[Source], log: Callable[[str], None] = print) -> None:
    """Fetch `sources` in order; on a failed download, a DownloadError whose message says
    where to put every file still missing."""
    for i, src in enumerate(sources):
        try:
            fetch(src, log)
        except ChecksumError:
            raise
        except DownloadError as e:
            pending = [s for s in sources[i:] if not (s.dest.is_file() and verify(s.dest, s.name) is None)]
            raise DownloadError(_offline_help(name, root, pending, e)) from None


def _urls(name: str, defaults: Iterable[str], url_base: str | None) -> tuple[str, ...]:
    if url_base:
        return (url_base.rstrip("/") + "/" + name,)
    return tuple(defaults)


# --- CIFAR-10 -----------------------------------------------------------------------------

def _cifar10_ready(folder: Path) -> bool:
    return all((folder / n).is_file() and verify(folder / n, n) is None for n in CIFAR10_FILES)


def get_cifar10(root: Path, url_base: str | None, log: Callable[[str], None] = print) -> None:
    """cifar-10-python.tar.gz into ROOT, unpacked to ROOT/cifar-10-batches-py/ (files checked)."""
    folder = root / CIFAR10_FOLDER
    if _cifar10_ready(folder):
        log(f"{folder}: present and verified (MD5 of every batch)")
        return
    archive = Source("cifar-10-python.tar.gz", root / "cifar-10-python.tar.gz",
                     _urls("cifar-10-python.tar.gz", [CIFAR10_URL], url_base))
    fetch_all("cifar10", root, [archive], log)
    unpack_cifar10(archive.dest, root, log)


def unpack_cifar10(archive: Path, root: Path, log: Callable[[str], None] = print) -> None:
    """Extract the archive's cifar-10-batches-py/ files into ROOT: each into a temporary
    folder first, checked against its MD5, then renamed into place."""
    folder = root / CIFAR10_FOLDER
    staging = root / f".{CIFAR10_FOLDER}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parts[:1] == (CIFAR10_FOLDER,) and len(Path(m.name).parts) == 2]
            missing = set(CIFAR10_FILES) - {Path(m.name).name for m in members}
            if missing:
                raise DownloadError(f"error: {archive} lacks {CIFAR10_FOLDER}/{', '.join(sorted(missing))}")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            tar.extractall(staging, members=members, **safe)
        for m in members:
            name = Path(m.name).name
            problem = verify(staging / m.name, name) if name in MD5 else None
            if problem is not None:
                raise ChecksumError(f"error: {archive} holds {m.name} with {problem}; nothing was written to {folder}")
        folder.mkdir(exist_ok=True)
        for m in members:
            os.replace(staging / m.name, folder / Path(m.name).name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{folder}: unpacked and verified")


# --- MNIST --------------------------------------------------------------------------------

def get_mnist(root: Path, url_base: str | None, log: Callable[[str], None] = print) -> None:
    """The four idx .gz files into ROOT/MNIST/raw/ (dflsplit reads them compressed)."""
    raw = root / "MNIST" / "raw"
    sources = [Source(n, raw / n, _urls(n, [m + n for m in MNIST_MIRRORS], url_base)) for n in MNIST_FILES]
    fetch_all("mnist", root, sources, log)


# --- FEMNIST (LEAF's conversion of NIST SD19) ---------------------------------------------

@dataclass(frozen=True)
class LeafOptions:
    """LEAF's preprocess.sh options: --sf, -k, --tf, and the seed of --smplseed/--spltseed."""

    fraction: float = 1.0
    min_samples: int = 0
    train_fraction: float = 0.9
    seed: int = 0
    writers_per_file: int = 100  # LEAF's MAX_WRITERS in data_to_json.py


def leaf_label(hex_class: str) -> int:
    """LEAF's label of an SD19 class folder (the character's ASCII code in hex): digits
    0-9, upper case 10-35, lower case 36-61."""
    code = int(hex_class, 16)
    if ord("0") <= code <= ord("9"):
        return code - ord("0")
    if ord("A") <= code <= ord("Z"):
        return code - ord("A") + 10
    if ord("a") <= code <= ord("z"):
        return code - ord("a") + 36
    raise ValueError(f"SD19 class folder {hex_class!r} is not a digit or letter")


def _parts_below(name: str, top: str) -> tuple[str, ...] | None:
    parts = tuple(p for p in name.split("/") if p)
    return parts[parts.index(top) + 1:] if top in parts else None


def nist_classes(by_class: zipfile.ZipFile, log: Callable[[str], None] = print) -> dict[str, str]:
    """MD5 of an image's PNG bytes -> its class folder, for the by_class/<class>/hsf_*/ images
    (LEAF's get_file_dirs.py, get_hashes.py: two-character class folders, 'hsf' subfolders
    that are not '.mit' files). The first image with given bytes, in path order, wins."""
    table: dict[str, str] = {}
    names = sorted(i.filename for i in by_class.infolist() if not i.is_dir())
    for k, name in enumerate(names):
        parts = _parts_below(name, "by_class")
        if parts is None or len(parts) != 3:
            continue
        cls, sub, _ = parts
        if len(cls) != 2 or "hsf" not in sub or "mit" in sub:
            continue
        table.setdefault(hashlib.md5(by_class.read(name)).hexdigest(), cls)
        if k % 100000 == 0:
            log(f"by_class: hashed {k} of {len(names)} files")
    return table


def nist_writers(by_write: zipfile.ZipFile, classes: dict[str, str],
                 log: Callable[[str], None] = print) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(writer, [(image path in by_write.zip, class folder)])] from
    by_write/<hsf part>/<writer>/<field>/<image>, in path order (LEAF's match_hashes.py,
    group_by_writer.py). Images with no by_class twin are skipped and counted."""
    writers: dict[str, list[tuple[str, str]]] = {}
    unmatched = 0
    names = sorted(i.filename for i in by_write.infolist() if not i.is_dir())
    for k, name in enumerate(names):
        parts = _parts_below(name, "by_write")
        if parts is None or len(parts) != 4:
            continue
        cls = classes.get(hashlib.md5(by_write.read(name)).hexdigest())
        if cls is None:
            unmatched += 1
            continue
        writers.setdefault(parts[1], []).append((name, cls))
        if k % 100000 == 0:
            log(f"by_write: matched {k} of {len(names)} files")
    if unmatched:
        log(f"by_write: {unmatched} images have no identical image in by_class and were skipped")
    return list(writers.items())


def leaf_image(png: bytes):
    """LEAF's vector of one SD19 PNG (784 float64): greyscale, thumbnail to 28x28 (LANCZOS), /255."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        gray = img.convert("L")
        gray.thumbnail((28, 28), Image.Resampling.LANCZOS)
        arr = np.asarray(gray, dtype=np.float64)
    if arr.shape != (28, 28):
        raise DownloadError(f"error: an SD19 image became {arr.shape[1]}x{arr.shape[0]}, not 28x28 (is it square?)")
    return arr.reshape(-1) / 255


def leaf_sample_niid(users: list[str], data: dict[str, dict], fraction: float,
                     rng: random.Random) -> tuple[list[str], list[int], dict[str, dict]]:
    """LEAF's non-IID sampling of one file (sample.py): shuffle the writers, take whole
    writers until `fraction` of the file's samples are taken, the last one cut short (its
    first samples, in a random order). `data[user]` is {"x": array n×784, "y": [n labels]}."""
    users = list(users)
    wanted = int(fraction * sum(len(data[u]["y"]) for u in users))
    rng.shuffle(users)
    taken, counts, out = 0, [], {}
    i = 0
    while taken < wanted:
        user = users[i]
        d = data[user]
        n = len(d["y"])
        if taken + n > wanted:
            n = wanted - taken
            order = rng.sample(range(n), n)
            d = {"x": d["x"][order], "y": [d["y"][j] for j in order]}
        counts.append(n)
        out[user] = d
        taken += n
        i += 1
    return users[:i], counts, out


def leaf_split_by_sample(users: list[str], data: dict[str, dict], train_fraction: float,
                         rng: random.Random) -> tuple[dict, dict]:
    """LEAF's split_data.py --by_sample for one file: each writer with at least two samples
    keeps max(1, int(train_fraction*n)) random ones for training (1 of 2) and the rest for
    test, both in their original order; the others are dropped."""
    kept, train, test = [], {}, {}
    for user in users:
        d = data[user]
        n = len(d["y"])
        if n < 2:
            continue
        n_train = 1 if n == 2 else max(1, int(train_fraction * n))
        chosen = set(rng.sample(range(n), n_train))  # 1 <= n_train < n: train and test both non-empty
        kept.append(user)
        for split, rows in ((train, [j for j in range(n) if j in chosen]), (test, [j for j in range(n) if j not in chosen])):
            split[user] = {"x": d["x"][rows], "y": [d["y"][j] for j in rows]}
    as_doc = lambda split: {"users": kept, "num_samples": [len(split[u]["y"]) for u in kept], "user_data": split}
    return as_doc(train), as_doc(test)


def _frac_label(value: float) -> str:
    return str(value)[2:]  # LEAF's file-name label: 0.05 -> "05", 1.0 -> "0", 0.9 -> "9"


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def write_leaf_json(path: Path, doc: dict) -> None:
    """`doc` as json.dump writes it, one writer at a time (its x array becomes lists of
    floats only while it is written), so a file of 100 writers never sits in memory as
    Python floats."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(f'{{"users": {json.dumps(doc["users"])}, "num_samples": {json.dumps(doc["num_samples"])}, "user_data": {{')
        for i, user in enumerate(doc["users"]):
            d = doc["user_data"][user]
            f.write(f'{", " if i else ""}{json.dumps(user)}: {{"x": {json.dumps(d["x"].tolist())}, "y": {json.dumps(d["y"])}}}')
        f.write("}}")
    os.replace(tmp, path)


def convert_nist_to_leaf(raw: Path, root: Path, opts: LeafOptions, log: Callable[[str], None] = print) -> dict:
    """Write ROOT/train/*.json and ROOT/test/*.json from RAW/by_class.zip and RAW/by_write.zip
    (see FEMNIST_HELP); both folders appear at once when all files are written. Returns
    counts."""
    import numpy as np

    with zipfile.ZipFile(raw / "by_class.zip") as zc:
        classes = nist_classes(zc, log)
    staging = {s: root / f".{s}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp" for s in ("train", "test")}
    for d in staging.values():
        d.mkdir(parents=True)
    sample_rng, split_rng = random.Random(opts.seed), random.Random(opts.seed)
    counts = {"writers": 0, "train_samples": 0, "test_samples": 0, "files": 0}
    try:
        with zipfile.ZipFile(raw / "by_write.zip") as zw:
            writers = nist_writers(zw, classes, log)
            if not writers:
                raise DownloadError(f"error: {raw / 'by_write.zip'}: no by_write/<part>/<writer>/<field>/<image> "
                                    f"image matches an image of {raw / 'by_class.zip'}")
            step = opts.writers_per_file
            for index, start in enumerate(range(0, len(writers), step)):
                chunk = writers[start:start + step]
                users = [w for w, _ in chunk]
                data = {w: {"x": np.stack([leaf_image(zw.read(p)) for p, _ in imgs]), "y": [leaf_label(c) for _, c in imgs]}
                        for w, imgs in chunk}
                users, counts_k, data = leaf_sample_niid(users, data, opts.fraction, sample_rng)
                users = [u for u, n in zip(users, counts_k) if n >= opts.min_samples]
                train, test = leaf_split_by_sample(users, data, opts.train_fraction, split_rng)
                stem = f"all_data_{index}_niid_{_frac_label(opts.fraction)}_keep_{opts.min_samples}"
                for split, doc in (("train", train), ("test", test)):
                    write_leaf_json(staging[split] / f"{stem}_{split}_{_frac_label(opts.train_fraction)}.json", doc)
                counts["writers"] += len(train["users"])
                counts["train_samples"] += sum(train["num_samples"])
                counts["test_samples"] += sum(test["num_samples"])
                counts["files"] += 1
                log(f"femnist: wrote file {index + 1} of {-(-len(writers) // step)}")
        for split, d in staging.items():
            target = root / split
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            os.replace(d, target)
    finally:
        for d in staging.values():
            shutil.rmtree(d, ignore_errors=True)
    return counts


def _femnist_converted(root: Path) -> bool:
    return all(any((root / s).glob("*.json")) for s in ("train", "test"))


def get_femnist(root: Path, url_base: str | None, opts: LeafOptions, log: Callable[[str], None] = print) -> None:
    """NIST SD19's two zips into ROOT/raw_data/, converted into ROOT/{train,test}/*.json."""
    if _femnist_converted(root):
        log(f"{root}/train and {root}/test already hold JSON files: nothing to do "
            f"(delete both folders to convert again)")
        return
    for s in ("train", "test"):
        if (root / s).exists() and any((root / s).iterdir()):
            raise DownloadError(f"error: {root / s} exists and is not empty; delete {root / 'train'} and "
                                f"{root / 'test'} and run again")
    raw = root / NIST_FOLDER
    sources = [Source(n, raw / n, _urls(n, [NIST_BASE + n], url_base)) for n in NIST_FILES]
    fetch_all("femnist", root, sources, log)
    record = {"source": {s.name: {"sha256": file_digests(s.dest)[1], "urls": list(s.urls)} for s in sources}}
    counts = convert_nist_to_leaf(raw, root, opts, log)
    record.update(leaf_options=opts.__dict__, **counts)
    _write_json(root / "conversion.json", record)
    log(f"femnist: {counts['writers']} writers, {counts['train_samples']} training and "
        f"{counts['test_samples']} test samples in {counts['files']} files per split")


# --- command line -------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download a dataset into the on-disk layout dflsplit reads (dataset.root), "
                    "verifying every file. Offline, it says where to put the files by hand.",
        epilog=CHECKSUM_HELP + "\n" + FEMNIST_HELP + "\ndigits (the default) and synthetic need no download.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=DOWNLOADABLE, help="which dataset")
    parser.add_argument("--root", required=True, type=Path,
                        help="folder to download into; use the same path as dataset.root in the config")
    parser.add_argument("--url-base", default=os.environ.get(URL_BASE_ENV) or None, metavar="URL",
                        help=f"fetch every file as URL/<file name> instead of from the official sources "
                             f"(a mirror); default: ${URL_BASE_ENV}")
    leaf = parser.add_argument_group("femnist (LEAF's preprocess.sh options)")
    leaf.add_argument("--fraction", type=float, default=None,
                      help="fraction of the samples to keep, by whole writers (LEAF --sf; default 1.0)")
    leaf.add_argument("--min-samples", type=int, default=None,
                      help="drop writers with fewer samples (LEAF -k; default 0)")
    leaf.add_argument("--train-fraction", type=float, default=None,
                      help="fraction of each writer's samples for training (LEAF --tf; default 0.9)")
    leaf.add_argument("--seed", type=int, default=None, help="seed of the sampling and the split (default 0)")
    args = parser.parse_args(argv)
    if args.root.exists() and not args.root.is_dir():
        parser.error(f"--root {args.root}: exists and is not a folder")
    given = [k for k in ("fraction", "min_samples", "train_fraction", "seed") if getattr(args, k) is not None]
    if given and args.name != "femnist":
        parser.error(f"--{given[0].replace('_', '-')} applies to femnist only")
    defaults = LeafOptions()
    args.leaf = LeafOptions(**{k: (getattr(args, k) if getattr(args, k) is not None else getattr(defaults, k))
                               for k in ("fraction", "min_samples", "train_fraction", "seed")})
    if not 0 < args.leaf.fraction <= 1 or not 0 < args.leaf.train_fraction < 1:
        parser.error("--fraction must be in (0, 1] and --train-fraction in (0, 1)")
    if args.leaf.min_samples < 0:
        parser.error("--min-samples must be >= 0")
    return args


def download(name: str, root: Path, url_base: str | None = None, leaf: LeafOptions = LeafOptions(),
             log: Callable[[str], None] = print) -> int:
    """Fetch `name` into `root`, then open it with dflsplit's loader; returns an exit status."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        if name == "mnist":
            get_mnist(root, url_base, log)
        elif name == "cifar10":
            get_cifar10(root, url_base, log)
        else:
            get_femnist(root, url_base, leaf, log)
    except DownloadError as e:
        print(str(e), file=sys.stderr)
        return 1

    from dflsplit.config import DatasetConfig
    from dflsplit.datasets import DATASETS

    cls = DATASETS.get(name)
    cfg = DatasetConfig(name=name, root=str(root))
    cls.prepare(cfg, root)
    ds = cls(cfg, root, 0)
    log(f"{name}: {ds.train_size()} training and {ds.test_size()} test samples under {root.resolve()}")
    log(f"set in the config:  dataset: {{name: {name}, root: {root}}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return download(args.name, args.root, args.url_base, args.leaf)


if __name__ == "__main__":
    sys.exit(main())
