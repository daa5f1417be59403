"""Dataset layer: real loaders on files written here in the real formats, and partitioners."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dflsplit.config import Config, ConfigError, load_config
from dflsplit.datasets import (
    DATASETS, DatasetFormatError, DatasetMissingError, build_dataset, label_entropy, load_node_data,
    partition_indices, preload_global_test_set, prepare_dataset,
)
from dflsplit.datasets.cifar10 import CIFAR10
from dflsplit.datasets.mnist import MNIST

REPO = Path(__file__).resolve().parents[1]
METHODS = ["iid", "dirichlet", "shard", "contiguous"]


def cfg_for(name: str, root=None, nodes: int = 2, **dataset) -> Config:
    overrides = [f"dataset.name={name}", f"run.procs_per_machine={nodes}"]
    if root is not None:
        overrides.append(f"dataset.root={root}")
    overrides += [f"dataset.{k}={json.dumps(v)}" for k, v in dataset.items()]
    return load_config(None, overrides)


# --- files in the real formats ------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An idx file as in MNIST: magic 0x0000, type 0x08 (ubyte), ndim; big-endian dims; data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


@pytest.fixture(scope="module")
def mnist_arrays():
    rng = np.random.default_rng(0)
    return {
        "train": (rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50).astype(np.uint8)),
        "test": (rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20).astype(np.uint8)),
    }


def write_mnist(root: Path, arrays, compress: bool) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = arrays[split]
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, compress)
    return raw


def cifar_batch(rng, n: int, label: str, real_globals: bool) -> bytes:
    """A CIFAR-10 batch as the real files are: a pickled dict of bytes keys, a uint8
    N×3072 array (channel-major rows), int labels, byte-string file names."""
    entry = {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if not real_globals:
        return pickle.dumps(entry, protocol=5)
    # The real files are protocol-2 pickles naming numpy's array constructor by its old module path.
    return pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(root: Path, n_per_batch: int = 8, n_test: int = 12, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(
            cifar_batch(rng, n_per_batch, f"training batch {i} of 5", real_globals=i % 2 == 1)
        )
    (folder / "test_batch").write_bytes(cifar_batch(rng, n_test, "testing batch 1 of 1", True))
    out = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        entries = [pickle.loads((folder / n).read_bytes(), encoding="bytes") for n in names]  # test-side check only
        out[split] = (np.concatenate([e[b"data"] for e in entries]), np.concatenate([e[b"labels"] for e in entries]))
    return out


def write_femnist(root: Path) -> dict:
    """LEAF's layout: train/*.json and test/*.json, users split over several files."""
    rng = np.random.default_rng(3)
    layout = {"train": [["w0", "w1"], ["w2", "w3", "w4"]], "test": [["w0", "w1", "w2"], ["w3", "w4"]]}
    sizes = {"train": [4, 6, 3, 5, 2], "test": [2, 1, 2, 1, 1]}
    written = {}
    for split, files in layout.items():
        (root / split).mkdir(parents=True)
        xs, ys, us = [], [], []
        for k, users in enumerate(files):
            doc = {"users": users, "num_samples": [], "user_data": {}}
            for u in users:
                n = sizes[split][int(u[1])]
                x = rng.random((n, 784)).round(4)
                y = rng.integers(0, 62, n)
                doc["num_samples"].append(n)
                doc["user_data"][u] = {"x": x.tolist(), "y": y.tolist()}
                xs.append(x)
                ys.append(y)
                us += [int(u[1])] * n
            (root / split / f"all_data_{k}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(doc))
        written[split] = (np.concatenate(xs).astype(np.float32), np.concatenate(ys), np.array(us))
    return written


# --- partitions -----------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_partitions_are_disjoint_complete_and_deterministic(method):
    labels = np.random.default_rng(5).integers(0, 10, 503)
    parts = partition_indices(labels, 7, method, seed=11, alpha=0.3, shards_per_node=3)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and np.array_equal(np.sort(joined), np.arange(len(labels)))
    again = partition_indices(labels, 7, method, seed=11, alpha=0.3, shards_per_node=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 7, method, seed=12, alpha=0.3, shards_per_node=3)
    same = all(np.array_equal(a, b) for a, b in zip(parts, other))
    if method == "contiguous":  # consecutive blocks in dataset order: no randomness to vary
        assert same
        assert all(np.array_equal(p, np.arange(p[0], p[-1] + 1)) for p in parts)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    else:
        assert not same
    if method == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_partition_gives_each_node_few_classes():
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels, 25, "shard", seed=0, shards_per_node=2)  # 50 shards of 20: one class each
    assert all(len(p) == 40 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_dirichlet_skew_follows_alpha_and_never_leaves_a_node_empty():
    labels = np.random.default_rng(1).integers(0, 10, 2000)
    mean_entropy = {
        a: np.mean([label_entropy(labels[p], 10) for p in partition_indices(labels, 20, "dirichlet", 3, alpha=a)])
        for a in (0.1, 100.0)
    }
    assert mean_entropy[0.1] < mean_entropy[100.0] - 1.0
    assert mean_entropy[100.0] > 3.0  # near log2(10) = 3.32: almost uniform
    tight = partition_indices(labels[:70], 64, "dirichlet", seed=0, alpha=0.01)  # redraws fail: fix-up
    assert all(len(p) >= 1 for p in tight)
    assert np.array_equal(np.sort(np.concatenate(tight)), np.arange(70))


def test_label_entropy_values():
    assert label_entropy(np.array([0, 1, 2, 3] * 5), 4) == pytest.approx(2.0)
    assert label_entropy(np.array([7, 7, 7]), 10) == 0.0
    assert label_entropy(np.array([], dtype=np.int64), 10) == 0.0


def test_partition_errors_name_the_values():
    labels = np.zeros(5, dtype=np.int64)
    with pytest.raises(ValueError, match=r"5 samples among num_nodes=8"):
        partition_indices(labels, 8, "iid", 0)
    with pytest.raises(ValueError, match=r"num_nodes\*shards_per_node = 2\*3 = 6 shards"):
        partition_indices(labels, 2, "shard", 0, shards_per_node=3)
    with pytest.raises(ValueError, match=r"unknown method 'random'.*iid, dirichlet, shard, contiguous"):
        partition_indices(labels, 2, "random", 0)


# --- digits and test-set modes --------------------------------------------------------

def test_digits_node_shards_add_up_to_the_training_set():
    from sklearn.datasets import load_digits

    cfg = cfg_for("digits", nodes=4, partition="dirichlet", alpha=0.5)
    nodes = [load_node_data(cfg, uid) for uid in range(4)]
    ds = build_dataset(cfg)
    assert sum(d.num_train for d in nodes) == ds.train_size()
    assert ds.train_size() + ds.test_size() == 1797
    assert ds.test_size() == pytest.approx(0.2 * 1797, abs=1)
    assert np.array_equal(np.sort(np.concatenate([d.train_indices for d in nodes])), np.arange(ds.train_size()))
    d = nodes[1]
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert tuple(d.train_x.shape[1:]) == d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) <= 1.0
    bunch = load_digits()  # each row is one of sklearn's images, scaled by 1/16, with its label
    flat = d.train_x.reshape(len(d.train_x), 64).numpy() * 16
    for row, label in zip(flat[:20], d.train_y[:20].tolist()):
        match = np.flatnonzero(np.abs(bunch.data - row).max(axis=1) < 1e-4)
        assert len(match) >= 1 and label in bunch.target[match]
    other_seed = build_dataset(load_config(None, ["run.seed=2"]))
    assert not np.array_equal(other_seed.test_labels(), ds.test_labels())


def test_local_test_sets_split_the_test_set_and_global_gives_all_of_it():
    local = [load_node_data(cfg_for("digits", nodes=3, test="local"), uid) for uid in range(3)]
    whole = load_node_data(cfg_for("digits", nodes=3, test="global"), 0)
    assert whole.num_test == 360 and whole.test_indices is None
    assert sum(d.num_test for d in local) == whole.num_test
    assert np.array_equal(np.sort(np.concatenate([d.test_indices for d in local])), np.arange(360))
    both = torch.cat([d.test_x for d in local]), torch.cat([d.test_y for d in local])
    order = np.argsort(np.concatenate([d.test_indices for d in local]))
    assert torch.equal(both[0][order], whole.test_x) and torch.equal(both[1][order], whole.test_y)
    capped = [load_node_data(cfg_for("digits", nodes=3, max_test=50), uid) for uid in (0, 2)]
    assert capped[0].num_test == 50 and np.array_equal(capped[0].test_indices, capped[1].test_indices)
    assert torch.equal(capped[0].test_x, whole.test_x[capped[0].test_indices])


def test_a_preloaded_global_test_set_is_shared_by_the_nodes_of_that_config():
    cfg = cfg_for("digits", nodes=3, test="global", max_test=100)
    own = load_node_data(cfg, 1)
    preload_global_test_set(cfg, torch.channels_last)
    shared = [load_node_data(cfg, uid) for uid in range(3)]
    assert shared[0].test_x.data_ptr() == shared[2].test_x.data_ptr()  # one copy, not three
    assert torch.equal(shared[1].test_x, own.test_x) and torch.equal(shared[1].test_y, own.test_y)
    assert shared[0].test_x.is_contiguous(memory_format=torch.channels_last)
    other = load_node_data(cfg_for("digits", nodes=3, test="global", max_test=50), 0)  # another config
    assert other.num_test == 50 and other.test_x.data_ptr() != shared[0].test_x.data_ptr()


def test_uid_and_config_errors():
    with pytest.raises(ValueError, match=r"uid 4 is out of range.*4 nodes"):
        load_node_data(cfg_for("digits", nodes=4), 4)
    with pytest.raises(ConfigError, match=r"dataset.root"):
        build_dataset(cfg_for("mnist"))
    with pytest.raises(ConfigError, match=r"key 'alpha' must be > 0"):
        build_dataset(cfg_for("digits", alpha=0))
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnsit' \(did you mean 'mnist'\?\)"):
        build_dataset(cfg_for("mnsit"))


# --- MNIST ----------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files(tmp_path, mnist_arrays, compress):
    write_mnist(tmp_path, mnist_arrays, compress)
    cfg = cfg_for("mnist", tmp_path, nodes=3, partition="shard")
    prepare_dataset(cfg)
    prepare_dataset(cfg)  # idempotent
    (x_train, y_train), (x_test, y_test) = mnist_arrays["train"], mnist_arrays["test"]
    seen = []
    for uid in range(3):
        d = load_node_data(cfg, uid)
        idx = d.train_indices
        seen.append(idx)
        assert d.train_x.shape == (len(idx), 1, 28, 28) and d.train_x.dtype == torch.float32
        assert d.input_shape == (1, 28, 28) and d.num_classes == 10
        expect = (x_train[idx].astype(np.float32) / 255 - 0.1307) / 0.3081
        np.testing.assert_allclose(d.train_x[:, 0].numpy(), expect, rtol=1e-5, atol=1e-5)
        assert np.array_equal(d.train_y.numpy(), y_train[idx])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(50))
    assert d.test_x.shape == (20, 1, 28, 28) and np.array_equal(d.test_y.numpy(), y_test)
    np.testing.assert_allclose(d.test_x[:, 0].numpy(), (x_test / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    caches = list((tmp_path / "MNIST" / "raw" / "dflsplit-cache").glob("*/*"))
    if compress:
        assert any(p.name == "train-images-idx3-ubyte" for p in caches)
    assert not [p for p in caches if p.name.endswith(".tmp")]


def test_mnist_missing_files_name_the_files_and_the_downloader(tmp_path, mnist_arrays):
    raw = write_mnist(tmp_path, mnist_arrays, compress=False)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetMissingError) as err:
        build_dataset(cfg_for("mnist", tmp_path))
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert str(raw / name) in msg
    assert f"Missing: {raw / 't10k-labels-idx1-ubyte'}" in msg
    assert f"python download_dataset.py mnist --root {tmp_path}" in msg
    with pytest.raises(DatasetMissingError, match=r"cifar-10-batches-py.data_batch_1"):
        build_dataset(cfg_for("cifar10", tmp_path / "nothing"))


def test_mnist_truncated_file_is_reported(tmp_path, mnist_arrays):
    raw = write_mnist(tmp_path, mnist_arrays, compress=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte: idx header says shape \(50, 28, 28\)"):
        MNIST(cfg_for("mnist", tmp_path).dataset, tmp_path, 0)


# --- CIFAR-10 -------------------------------------------------------------------------

def test_cifar10_converts_pickled_batches_once_and_reads_pixels(tmp_path):
    written = write_cifar(tmp_path)
    cfg = cfg_for("cifar10", tmp_path, nodes=4, partition="dirichlet", test="local")
    prepare_dataset(cfg)
    cache = tmp_path / "cifar-10-batches-py" / "dflsplit-cache"
    names = {p.name for p in cache.glob("*/*.npy")}
    assert {"train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy", "test_x_float32.npy"} <= names
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)
    total_train = total_test = 0
    for uid in range(4):
        d = load_node_data(cfg, uid)
        data, labels = written["train"]
        idx = d.train_indices
        assert d.train_x.shape == (len(idx), 3, 32, 32) and d.input_shape == (3, 32, 32)
        expect = (data[idx].reshape(-1, 3, 32, 32) / 255 - mean) / std  # row = R plane, G plane, B plane
        np.testing.assert_allclose(d.train_x.numpy(), expect, rtol=1e-5, atol=1e-5)
        assert np.array_equal(d.train_y.numpy(), labels[idx])
        assert np.array_equal(d.test_y.numpy(), written["test"][1][d.test_indices])
        total_train += d.num_train
        total_test += d.num_test
    assert (total_train, total_test) == (40, 12)
    g = load_node_data(cfg_for("cifar10", tmp_path, nodes=4), 0)
    np.testing.assert_allclose(
        g.test_x.numpy(), (written["test"][0].reshape(-1, 3, 32, 32) / 255 - mean) / std, rtol=1e-5, atol=1e-5
    )
    g.test_x[0].zero_()  # the shared test map is copy-on-write: the cache file is untouched
    assert float(load_node_data(cfg_for("cifar10", tmp_path, nodes=4), 1).test_x[0].abs().sum()) > 0


def _prepare_in_child(root: str) -> None:
    CIFAR10.prepare(cfg_for("cifar10", root).dataset, Path(root))


def test_cifar10_concurrent_prepare_builds_one_valid_cache(tmp_path):
    written = write_cifar(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ds = build_dataset(cfg_for("cifar10", tmp_path))
    x, y = ds.load_train(np.arange(40))
    assert np.array_equal(y.numpy(), written["train"][1])
    assert not list((tmp_path / "cifar-10-batches-py").rglob("*.tmp"))


def test_cifar10_refuses_pickles_that_build_anything_else(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: not a CIFAR-10 batch \(refusing to load pathlib"):
        build_dataset(cfg_for("cifar10", tmp_path))
    assert not marker.exists()


# --- FEMNIST --------------------------------------------------------------------------

def test_femnist_reads_leaf_json_by_sample_and_by_writer(tmp_path):
    written = write_femnist(tmp_path)
    x_all, y_all, user_all = written["train"]
    d = load_node_data(cfg_for("femnist", tmp_path, nodes=3, partition="iid"), 1)
    assert d.train_x.shape == (len(d.train_indices), 1, 28, 28) and d.num_classes == 62
    np.testing.assert_allclose(d.train_x.reshape(-1, 784).numpy(), x_all[d.train_indices], rtol=0, atol=1e-6)
    assert np.array_equal(d.train_y.numpy(), y_all[d.train_indices])
    assert d.num_test == 7 and np.array_equal(d.test_y.numpy(), written["test"][1])
    np.testing.assert_allclose(d.test_x.reshape(-1, 784).numpy(), written["test"][0], atol=1e-6)

    # contiguous: whole writers round-robin (w0, w2, w4 -> node 0; w1, w3 -> node 1); local test = own writers
    cfg = cfg_for("femnist", tmp_path, nodes=2, partition="contiguous", test="local")
    nodes = [load_node_data(cfg, uid) for uid in range(2)]
    for d, writers in zip(nodes, ({0, 2, 4}, {1, 3})):
        assert set(user_all[d.train_indices]) == writers
        assert np.array_equal(d.train_indices, np.flatnonzero(np.isin(user_all, list(writers))))
        assert set(written["test"][2][d.test_indices]) == writers
    with pytest.raises(ValueError, match=r"5 writers with training data < 6 nodes"):
        load_node_data(cfg_for("femnist", tmp_path, nodes=6, partition="contiguous"), 0)


def test_femnist_inconsistent_json_names_file_and_user(tmp_path):
    write_femnist(tmp_path)
    path = sorted((tmp_path / "train").glob("*.json"))[1]
    doc = json.loads(path.read_text())
    doc["user_data"]["w3"]["y"].pop()
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetFormatError, match=rf"{path.name}: user 'w3': 5 images but 4 labels"):
        build_dataset(cfg_for("femnist", tmp_path))
    with pytest.raises(DatasetMissingError, match=r"(?s)train.\*\.json.*download_dataset.py femnist"):
        build_dataset(cfg_for("femnist", tmp_path / "empty"))


# --- synthetic ------------------------------------------------------------------------

def test_synthetic_is_deterministic_per_index_and_learnable():
    cfg = cfg_for("synthetic", nodes=4, num_train=400, num_test=100, image_shape=[3, 16, 16], partition="dirichlet")
    full = build_dataset(cfg)
    x_all, y_all = full.load_train(np.arange(400))
    assert x_all.shape == (400, 3, 16, 16) and x_all.dtype == torch.float32 and y_all.dtype == torch.int64
    assert np.array_equal(y_all.numpy(), full.train_labels())
    for uid in range(4):
        d = load_node_data(cfg, uid)
        assert torch.equal(d.train_x, x_all[d.train_indices]) and torch.equal(d.train_y, y_all[d.train_indices])
    assert torch.equal(build_dataset(cfg).load_test()[0], full.load_test()[0])
    other = build_dataset(cfg_for("synthetic", num_train=400, image_shape=[3, 16, 16]))
    assert other.load_train(np.arange(5))[0].shape == (5, 3, 16, 16)
    reseeded = build_dataset(load_config(None, [
        "dataset.name=synthetic", "dataset.num_train=400", "dataset.image_shape=[3, 16, 16]", "run.seed=9"]))
    assert not torch.equal(reseeded.load_train(np.arange(5))[0], x_all[:5])
    assert not torch.equal(full.load_train(np.arange(5))[0], full.load_test(np.arange(5))[0])

    vec = build_dataset(cfg_for("synthetic", num_train=2000, num_test=500, image_shape=[20], num_classes=5))
    x, y = vec.load_train(np.arange(2000))
    tx, ty = vec.load_test()
    centroids = torch.stack([x[y == c].mean(0) for c in range(5)])
    accuracy = (torch.cdist(tx, centroids).argmin(1) == ty).float().mean().item()
    assert accuracy > 0.85  # chance is 0.2
    assert min(np.bincount(vec.train_labels(), minlength=5)) > 300


# --- download_dataset.py --------------------------------------------------------------

def test_download_script_help_and_argument_checks(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "download_dataset.py"), *a],
                                    capture_output=True, text=True, timeout=60)
    helped = run("--help")
    assert helped.returncode == 0 and "mnist" in helped.stdout and "--root" in helped.stdout
    bad = run("imagenet", "--root", str(tmp_path))
    assert bad.returncode == 2 and "invalid choice: 'imagenet'" in bad.stderr
    assert run("mnist").returncode == 2
    afile = tmp_path / "file"
    afile.write_text("x")
    notdir = run("cifar10", "--root", str(afile))
    assert notdir.returncode == 2 and "is not a folder" in notdir.stderr
    assert "by_write.zip" in helped.stdout and "no checksum" in helped.stdout  # femnist: what it does, said plainly
    leaf_only = run("mnist", "--root", str(tmp_path), "--fraction", "0.1")
    assert leaf_only.returncode == 2 and "--fraction applies to femnist only" in leaf_only.stderr


def test_registry_lists_every_dataset():
    assert DATASETS.names() == ["cifar10", "digits", "femnist", "mnist", "synthetic"]
