"""download_dataset.py against a real HTTP server on 127.0.0.1 serving files in the real
formats (a CIFAR-10 tar.gz of pickled batches, MNIST idx .gz files, NIST SD19-style zips
of PNGs); the results are read back with dflsplit's own loaders."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from dflsplit.config import DatasetConfig
from dflsplit.datasets.cifar10 import CIFAR10
from dflsplit.datasets.femnist import FEMNIST
from dflsplit.datasets.mnist import MNIST

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("download_dataset", REPO / "download_dataset.py")
dd = importlib.util.module_from_spec(_spec)
sys.modules["download_dataset"] = dd  # dataclasses look their module up there
_spec.loader.exec_module(dd)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- a file server on loopback ----------------------------------------------------------

class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, its URL, the paths requested so far)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def closed_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".part", ".tmp"))]


# --- CIFAR-10 ---------------------------------------------------------------------------

def cifar_tar(n_train: int = 4, n_test: int = 6, seed: int = 0) -> tuple[bytes, dict, dict]:
    """A cifar-10-python.tar.gz as published: cifar-10-batches-py/ with five training batches,
    a test batch, batches.meta and readme.html; protocol-2 pickles of dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    members, labels = {}, {"train": [], "test": []}
    for name in dd.CIFAR10_FILES[:-1]:
        n = n_test if name == "test_batch" else n_train
        y = [int(v) for v in rng.integers(0, 10, n)]
        labels["test" if name == "test_batch" else "train"] += y
        entry = {b"batch_label": name.encode(), b"labels": y,
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        members[name] = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, protocol=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {**members, "readme.html": b"<html></html>"}.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {n: md5(d) for n, d in members.items()}, labels


@pytest.fixture
def cifar(server, monkeypatch):
    folder, url, requests = server
    blob, sums, labels = cifar_tar()
    (folder / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setitem(dd.MD5, "cifar-10-python.tar.gz", md5(blob))
    for name, s in sums.items():
        monkeypatch.setitem(dd.MD5, name, s)
    return folder, url, requests, labels


def test_cifar10_download_verify_unpack_then_the_loader_reads_it(tmp_path, cifar, capsys):
    _, url, requests, labels = cifar
    root = tmp_path / "data"
    assert dd.main(["cifar10", "--root", str(root), "--url-base", url]) == 0
    assert requests == ["/cifar-10-python.tar.gz"]
    ds = CIFAR10(DatasetConfig(name="cifar10", root=str(root)), root, 0)
    assert (ds.train_size(), ds.test_size()) == (20, 6)
    assert ds.train_labels().tolist() == labels["train"] and ds.test_labels().tolist() == labels["test"]
    assert (root / "cifar-10-batches-py" / "readme.html").is_file() and not leftovers(root)
    out = capsys.readouterr().out
    assert "cifar10: 20 training and 6 test samples" in out

    assert dd.main(["cifar10", "--root", str(root), "--url-base", url]) == 0
    assert len(requests) == 1  # verified files are not downloaded again
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"damaged")
    assert dd.main(["cifar10", "--root", str(root), "--url-base", url]) == 0
    assert len(requests) == 1  # the verified archive is unpacked again, not downloaded
    assert CIFAR10(DatasetConfig(name="cifar10", root=str(root)), root, 0).train_labels().tolist() == labels["train"]


def test_a_corrupted_download_is_refused_and_nothing_is_left_in_place(tmp_path, cifar, capsys):
    folder, url, _, _ = cifar
    good = md5((folder / "cifar-10-python.tar.gz").read_bytes())
    blob = bytearray((folder / "cifar-10-python.tar.gz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (folder / "cifar-10-python.tar.gz").write_bytes(bytes(blob))
    root = tmp_path / "data"
    assert dd.main(["cifar10", "--root", str(root), "--url-base", url]) == 1
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and f"{url}/cifar-10-python.tar.gz" in err
    assert f"MD5 {md5(bytes(blob))}, expected {good}" in err
    assert sorted(p.name for p in root.iterdir()) == []  # no archive, no partial file, no batches


def test_a_corrupted_member_of_a_verified_archive_is_refused(tmp_path, cifar, monkeypatch, capsys):
    _, url, _, _ = cifar
    monkeypatch.setitem(dd.MD5, "test_batch", "0" * 32)
    root = tmp_path / "data"
    assert dd.main(["cifar10", "--root", str(root), "--url-base", url]) == 1
    err = capsys.readouterr().err
    assert "cifar-10-batches-py/test_batch with MD5" in err and "expected " + "0" * 32 in err
    assert not (root / "cifar-10-batches-py").exists() and not leftovers(root)


# --- MNIST ------------------------------------------------------------------------------

def idx_gz(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()
    return gzip.compress(blob)


@pytest.fixture
def mnist_files(monkeypatch):
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 30),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (8, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 8)}
    files = {name: idx_gz(a) for name, a in arrays.items()}
    for name, blob in files.items():
        monkeypatch.setitem(dd.MD5, name, md5(blob))
    return files, arrays


def test_mnist_download_gives_the_layout_the_loader_reads(tmp_path, server, mnist_files):
    folder, url, requests = server
    files, arrays = mnist_files
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    root = tmp_path / "data"
    assert dd.main(["mnist", "--root", str(root), "--url-base", url + "/"]) == 0
    assert sorted(requests) == sorted(f"/{n}" for n in files)
    assert sorted(p.name for p in (root / "MNIST" / "raw").glob("*.gz")) == sorted(files)
    ds = MNIST(DatasetConfig(name="mnist", root=str(root)), root, 0)
    assert ds.train_labels().tolist() == arrays["train-labels-idx1-ubyte.gz"].tolist()
    assert ds.test_labels().tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    x, _ = ds.load_test(np.array([3]))
    np.testing.assert_allclose(x[0, 0].numpy(), (arrays["t10k-images-idx3-ubyte.gz"][3] / 255 - 0.1307) / 0.3081,
                               rtol=1e-5, atol=1e-5)


def test_mnist_offline_names_url_and_path_then_accepts_files_put_there(tmp_path, closed_url, mnist_files):
    files, arrays = mnist_files
    root = tmp_path / "data"
    run = subprocess.run([sys.executable, str(REPO / "download_dataset.py"), "mnist", "--root", str(root),
                          "--url-base", closed_url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    err = run.stderr
    assert f"{closed_url}/train-images-idx3-ubyte.gz" in err and "ConnectionRefusedError" in err
    raw = (root / "MNIST" / "raw").resolve()
    for name in files:
        assert str(raw / name) in err
    assert f"python download_dataset.py mnist --root {root}" in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert not leftovers(root)

    for name, blob in files.items():  # by hand, then run again: verified, no download (the port is closed)
        (raw / name).write_bytes(blob)
    assert dd.main(["mnist", "--root", str(root), "--url-base", closed_url]) == 0
    assert MNIST(DatasetConfig(name="mnist", root=str(root)), root, 0).test_labels().tolist() == \
        arrays["t10k-labels-idx1-ubyte.gz"].tolist()


def test_a_file_put_by_hand_that_fails_its_checksum_is_downloaded_again(tmp_path, server, mnist_files, capsys):
    folder, url, requests = server
    files, _ = mnist_files
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in files.items():
        (raw / name).write_bytes(blob if name.startswith("train") else b"truncated")
    assert dd.main(["mnist", "--root", str(tmp_path / "data"), "--url-base", url]) == 0
    assert sorted(requests) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]
    assert f"MD5 {md5(b'truncated')}, expected {dd.MD5['t10k-labels-idx1-ubyte.gz']}" in capsys.readouterr().out
    assert all((raw / n).read_bytes() == b for n, b in files.items())


# --- FEMNIST from NIST SD19 -------------------------------------------------------------

def sd19_png(k: int) -> bytes:
    """A 128x128 greyscale PNG, white in its top 8k rows and black below (mean k/16)."""
    from PIL import Image

    a = np.zeros((128, 128), np.uint8)
    a[: 8 * k] = 255
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, "PNG")
    return buf.getvalue()


# writer -> image numbers k; an image's class is CLASSES[k % 6]. Image 12 has a twin only
# in by_class/<c>/train_<c>/, which LEAF's scripts do not read: it is skipped.
WRITERS = {"f0000_14": [1, 2, 3, 4, 5, 12], "f0001_14": [6, 7, 8], "f0002_14": [9], "f0100_30": [10, 11]}
CLASSES = ["30", "39", "41", "4a", "61", "7a"]  # '0', '9', 'A', 'J', 'a', 'z'
LABELS = {"30": 0, "39": 9, "41": 10, "4a": 19, "61": 36, "7a": 61}


def sd19_zips() -> tuple[bytes, bytes]:
    """by_class.zip and by_write.zip in SD19's layout (folders, .mit files, twin PNGs)."""
    by_class, by_write = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(by_class, "w") as zc, zipfile.ZipFile(by_write, "w") as zw:
        for w, ks in WRITERS.items():
            part = "hsf_0" if w < "f0100" else "hsf_4"
            zw.writestr(f"by_write/{part}/{w}/", b"")
            for i, k in enumerate(ks):
                c = CLASSES[k % 6]
                zw.writestr(f"by_write/{part}/{w}/d{w[1:]}/d{w[1:]}_{i:05d}.png", sd19_png(k))
                sub = f"train_{c}" if k == 12 else part
                zc.writestr(f"by_class/{c}/{sub}/{sub}_{k:05d}.png", sd19_png(k))
        for c in CLASSES:
            zc.writestr(f"by_class/{c}/hsf_0.mit", b"index\n")
    return by_class.getvalue(), by_write.getvalue()


def test_leaf_labels_sampling_split_and_json(tmp_path):
    assert [dd.leaf_label(c) for c in ("30", "39", "41", "5a", "61", "7a")] == [0, 9, 10, 35, 36, 61]
    # x row j of a writer holds j, so rows and labels can be checked to travel together
    data = {u: {"x": np.arange(n, dtype=np.float64)[:, None].repeat(784, 1), "y": list(range(n))}
            for u, n in (("a", 5), ("b", 3), ("c", 2))}
    import random

    users, counts, out = dd.leaf_sample_niid(["a", "b", "c"], data, 1.0, random.Random(0))
    assert sorted(users) == ["a", "b", "c"] and all(out[u]["y"] == data[u]["y"] for u in users)
    users, counts, out = dd.leaf_sample_niid(["a", "b", "c"], data, 0.5, random.Random(3))
    assert sum(counts) == 5 and counts == [len(out[u]["y"]) for u in users]
    for u in users:
        assert set(out[u]["y"]) <= set(data[u]["y"]) and out[u]["x"][:, 0].tolist() == out[u]["y"]
    train, test = dd.leaf_split_by_sample(["a", "b", "c"], data, 0.9, random.Random(0))
    assert train["users"] == test["users"] == ["a", "b", "c"]
    assert train["num_samples"] == [4, 2, 1] and test["num_samples"] == [1, 1, 1]
    for u in "abc":
        assert sorted(train["user_data"][u]["y"] + test["user_data"][u]["y"]) == data[u]["y"]
        assert train["user_data"][u]["y"] == sorted(train["user_data"][u]["y"])  # original order kept
        for split in (train, test):
            assert split["user_data"][u]["x"][:, 0].tolist() == split["user_data"][u]["y"]
    # written one writer at a time, byte for byte what json.dump writes (as LEAF does)
    plain = {**train, "user_data": {u: {"x": (d["x"] / 7).tolist(), "y": d["y"]} for u, d in train["user_data"].items()}}
    dd.write_leaf_json(tmp_path / "f.json", {**train, "user_data": {
        u: {"x": d["x"] / 7, "y": d["y"]} for u, d in train["user_data"].items()}})
    assert (tmp_path / "f.json").read_text() == json.dumps(plain)


def test_femnist_from_sd19_zips_gives_leaf_json_the_loader_reads(tmp_path, server, capsys):
    folder, url, requests = server
    zc, zw = sd19_zips()
    (folder / "by_class.zip").write_bytes(zc)
    (folder / "by_write.zip").write_bytes(zw)
    root = tmp_path / "femnist"
    assert dd.MD5["by_class.zip"] is None  # NIST publishes none
    assert dd.main(["femnist", "--root", str(root), "--url-base", url]) == 0
    assert sorted(requests) == ["/by_class.zip", "/by_write.zip"]
    assert [p.name for p in (root / "train").iterdir()] == ["all_data_0_niid_0_keep_0_train_9.json"]
    assert [p.name for p in (root / "test").iterdir()] == ["all_data_0_niid_0_keep_0_test_9.json"]
    record = json.loads((root / "conversion.json").read_text())
    assert record["source"]["by_write.zip"]["sha256"] == hashlib.sha256(zw).hexdigest()

    ds = FEMNIST(DatasetConfig(name="femnist", root=str(root)), root, 0)
    # f0002_14 has one sample (dropped by the split); image 12 has no hsf twin (skipped)
    assert sorted(ds.users) == ["f0000_14", "f0001_14", "f0100_30"]
    assert (ds.train_size(), ds.test_size()) == (4 + 2 + 1, 1 + 1 + 1)
    seen = {}
    for split, load in (("train", ds.load_train), ("test", ds.load_test)):
        size = ds.train_size() if split == "train" else ds.test_size()
        x, y = load(np.arange(size))
        users = ds.train_users() if split == "train" else ds._user["test"]
        for img, label, u in zip(x.numpy(), y.tolist(), users):
            k = int(round(float(img.mean()) * 16))  # the image's brightness says which one it is
            assert abs(float(img.mean()) - k / 16) < 0.02 and 0 <= img.min() and img.max() <= 1
            assert label == LABELS[CLASSES[k % 6]]
            assert k in WRITERS[ds.users[u]]
            seen[k] = split
    assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]
    assert "femnist: 3 writers, 7 training and 3 test samples" in capsys.readouterr().out

    assert dd.main(["femnist", "--root", str(root), "--url-base", url]) == 0
    assert len(requests) == 2  # already converted: nothing fetched


def test_femnist_corrupt_zip_is_refused_and_offline_names_the_paths(tmp_path, server, closed_url, capsys):
    folder, url, _ = server
    zc, zw = sd19_zips()
    bad = bytearray(zw)
    at = bad.index(b"IDAT") + 8  # inside a stored PNG: only the member's CRC-32 can tell
    bad[at] ^= 0xFF
    (folder / "by_class.zip").write_bytes(zc)
    (folder / "by_write.zip").write_bytes(bytes(bad))
    root = tmp_path / "femnist"
    assert dd.main(["femnist", "--root", str(root), "--url-base", url]) == 1
    err = capsys.readouterr().err
    assert "by_write.zip" in err and "fails its CRC-32" in err
    assert not (root / "raw_data" / "by_write.zip").exists() and not leftovers(root)
    assert not (root / "train").exists()

    assert dd.main(["femnist", "--root", str(root), "--url-base", closed_url]) == 1
    err = capsys.readouterr().err
    assert f"{closed_url}/by_write.zip" in err and str((root / "raw_data" / "by_write.zip").resolve()) in err
    assert "by_class.zip" not in err.split("put it at:")[1]  # already verified, not asked for
    (root / "raw_data" / "by_write.zip").write_bytes(zw)
    assert dd.main(["femnist", "--root", str(root), "--url-base", closed_url]) == 0
    assert FEMNIST(DatasetConfig(name="femnist", root=str(root)), root, 0).train_size() == 7


def test_options_for_femnist_only():
    with pytest.raises(SystemExit):
        dd.parse_args(["mnist", "--root", "x", "--fraction", "0.5"])
    args = dd.parse_args(["femnist", "--root", "x", "--fraction", "0.05", "--min-samples", "10"])
    assert args.leaf == dd.LeafOptions(fraction=0.05, min_samples=10)
    assert dd._frac_label(0.05) == "05" and dd._frac_label(1.0) == "0" and dd._frac_label(0.9) == "9"
