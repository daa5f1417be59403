"""Dataset layer: the base class, the node's data record, and the on-disk cache helpers.

A `Dataset` knows the labels of its whole training set (small, needed to partition)
but reads samples only for the indices asked of it, so a node materialises only its
own shard. File-backed datasets keep memmappable `.npy` caches; `prepare()` builds
them once (in the launcher, before node processes start), and every node builds a
missing cache itself under a file lock, so a forgotten `prepare()` costs time, not
correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..config import ConfigError, DatasetConfig
from ..registry import Registry
from .partition import partition_indices

DATASETS: Registry[type["Dataset"]] = Registry("dataset")

CACHE_FOLDER = "dflsplit-cache"
CACHE_VERSION = 1


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not where the config says; the message lists what was expected."""


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what its format promises; names the file."""


@dataclass
class NodeData:
    """What one node holds: its training shard, its test set, and their description.

    `train_x` is float32 N×C×H×W (images) or N×D; labels are int64. `train_indices` are
    the shard's indices into the full training set; `test_indices` those into the test
    set (None when the node holds the whole test set).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    train_indices: np.ndarray
    test_indices: Optional[np.ndarray] = None

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


class Dataset:
    """A training set and a test set, read lazily by index.

    Subclasses set `name`, `needs_root`, and implement `input_shape`, `num_classes`,
    `train_labels`, `load_train`, `test_labels`, `load_test`; they may override
    `prepare` (one-time conversion) and `partition_train`/`partition_test` (natural
    partitions, e.g. FEMNIST's users).
    """

    name: str = ""
    needs_root: bool = False

    def __init__(self, cfg: DatasetConfig, root: Path | None, seed: int):
        if self.needs_root and root is None:
            raise root_missing_error(self.name)
        self.cfg = cfg
        self.root = Path(root) if root is not None else None
        self.seed = int(seed)

    # --- description -------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    # --- training set ------------------------------------------------------------
    def train_labels(self) -> np.ndarray:
        """Labels of the whole training set (int64)."""
        raise NotImplementedError

    def train_size(self) -> int:
        return int(len(self.train_labels()))

    def load_train(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` of the training set as (float32 x, int64 y), in that order."""
        raise NotImplementedError

    # --- test set ----------------------------------------------------------------
    def test_labels(self) -> np.ndarray:
        """Labels of the whole test set (int64)."""
        raise NotImplementedError

    def test_size(self) -> int:
        return int(len(self.test_labels()))

    def load_test(self, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` of the test set (all of it when None) as (float32 x, int64 y)."""
        raise NotImplementedError

    # --- one-time preparation ----------------------------------------------------
    @classmethod
    def prepare(cls, cfg: DatasetConfig, root: Path | None) -> None:
        """Build caches once, before node processes start. Idempotent; safe to run
        concurrently (atomic renames, a file lock); a no-op by default."""

    # --- partitions --------------------------------------------------------------
    def partition_train(self, num_nodes: int) -> list[np.ndarray]:
        """Every node's training indices for `cfg.partition` (index = node uid); computed
        once per node count and kept (the launcher computes it before forking the nodes)."""
        cache = self.__dict__.setdefault("_partitions", {})
        if num_nodes not in cache:
            c = self.cfg
            cache[num_nodes] = partition_indices(
                self.train_labels(), num_nodes, c.partition, self.seed,
                alpha=c.alpha, shards_per_node=c.shards_per_node,
            )
        return cache[num_nodes]

    def test_indices(self, num_nodes: int, uid: int) -> np.ndarray | None:
        """Test indices node `uid` holds: None = the whole test set (cfg.test 'global'),
        else its IID share (cfg.test 'local'); at most `cfg.max_test` of them."""
        n = self.test_size()
        if self.cfg.test == "global":
            idx = None
        else:
            if n < num_nodes:
                raise ValueError(
                    f"dataset.test='local': the {self.name} test set has {n} samples, fewer than "
                    f"the {num_nodes} nodes; use dataset.test='global'"
                )
            idx = self.local_test_partition(num_nodes)[uid]
        return cap_indices(idx, n, self.cfg.max_test, self.seed)

    def local_test_partition(self, num_nodes: int) -> list[np.ndarray]:
        """Test indices of every node for cfg.test='local' (IID by default)."""
        return partition_indices(self.test_labels(), num_nodes, "iid", _subseed(self.seed, 2))


def _subseed(seed: int, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), 0x5EED, stream])


def cap_indices(indices: np.ndarray | None, total: int, cap: int | None, seed: int) -> np.ndarray | None:
    """At most `cap` of `indices` (all `total` when None): a sorted subset, deterministic for `seed`."""
    if cap is None:
        return indices
    if cap < 1:
        raise ValueError(f"dataset.max_test must be >= 1 or null, got {cap}")
    pool = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if len(pool) <= cap:
        return indices
    rng = np.random.default_rng(_subseed(seed, 3))
    return np.sort(rng.choice(pool, size=cap, replace=False))


def root_missing_error(name: str) -> ConfigError:
    return ConfigError(
        f"dataset {name!r} reads files from disk: set key 'dataset.root' to the folder that holds "
        f"them (fetch them with `python download_dataset.py {name} --root DIR`)"
    )


def missing_error(name: str, root: Path, expected: Sequence[Path | str], missing: Sequence[Path | str]) -> DatasetMissingError:
    """The error for absent dataset files: what was expected where, and how to fetch them."""
    exp = "\n  ".join(str(p) for p in expected)
    mis = ", ".join(str(p) for p in missing)
    return DatasetMissingError(
        f"dataset {name!r} not found under dataset.root={str(root)!r}.\n"
        f"Expected files:\n  {exp}\nMissing: {mis}\n"
        f"Fetch it with: python download_dataset.py {name} --root {root}"
    )


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 x, int64 y) tensors; x shares memory with the array when it is float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def as_index_array(indices: np.ndarray | Sequence[int], size: int, what: str) -> np.ndarray:
    """`indices` as int64, checked to lie in 0..size-1."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        raise IndexError(f"{what}: indices must be in 0..{size - 1}, got {idx.min()}..{idx.max()}")
    return idx


def read_rows(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` of a (memmapped) array, reading them in file order."""
    if len(indices) == 0:
        return array[:0].copy()
    order = np.argsort(indices, kind="stable")
    rows = np.asarray(array[indices[order]])
    out = np.empty_like(rows)
    out[order] = rows
    return out


# --- caches ----------------------------------------------------------------------

def fingerprint(sources: Sequence[Path], tag: str) -> str:
    """A short hash of the source files' names, sizes and mtimes (and the cache format)."""
    h = hashlib.sha1(f"{CACHE_VERSION}:{tag}".encode())
    for p in sources:
        st = os.stat(p)
        h.update(f"|{Path(p).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_dir(source_dir: Path, sources: Sequence[Path], tag: str) -> Path:
    """The cache folder for `sources`: `<source_dir>/dflsplit-cache/<fingerprint>`, or,
    when that cannot be created, one under $XDG_CACHE_HOME (~/.cache)/dflsplit."""
    fp = fingerprint(sources, tag)
    beside = Path(source_dir) / CACHE_FOLDER / fp
    try:
        beside.mkdir(parents=True, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    if beside.is_dir() and os.access(beside, os.R_OK):
        return beside
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha1(str(Path(source_dir).resolve()).encode()).hexdigest()[:12]
    fallback = home / "dflsplit" / f"{Path(source_dir).name}-{key}" / fp
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


@contextlib.contextmanager
def file_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder/.lock` (best effort: runs unlocked where locks fail)."""
    try:
        import fcntl

        f = open(Path(folder) / ".lock", "a+")
    except (ImportError, OSError):
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` (.npy) so that readers see all of it or nothing."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))


def open_npy(path: Path, mode: str = "r") -> np.ndarray:
    """A memmap of a cached .npy (`mode` 'c' = copy-on-write, writable without touching the file)."""
    return np.load(path, mmap_mode=mode, allow_pickle=False)


def cached_npy(folder: Path, name: str, build: Callable[[], np.ndarray], mode: str = "r") -> np.ndarray:
    """Memmap `folder/name`, building it first with `build()` (under the folder's lock) if absent."""
    path = Path(folder) / name
    if not path.exists():
        with file_lock(folder):
            if not path.exists():
                save_npy_atomic(path, build())
    return open_npy(path, mode)


def normalized_cache(folder: Path, name: str, raw: np.ndarray,
                     normalize: Callable[[np.ndarray], np.ndarray], chunk: int = 4096) -> np.ndarray:
    """A copy-on-write memmap of `normalize(raw)` saved as float32 `folder/name`.

    Every node process maps the same file, so a whole test set costs the machine's
    memory once rather than once per node.
    """
    path = Path(folder) / name
    if not path.exists():
        with file_lock(folder):
            if not path.exists():
                shape = (len(raw),) + tuple(normalize(raw[:1]).shape[1:])
                with atomic_path(path) as tmp:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                    for s in range(0, len(raw), chunk):
                        out[s : s + chunk] = normalize(np.asarray(raw[s : s + chunk]))
                    out.flush()
                    del out
    return open_npy(path, "c")


class ImageArrayDataset(Dataset):
    """A dataset held as raw image arrays ``_x[split]`` (usually memory-mapped) and labels
    ``_y[split]`` for split in train/test. Rows are normalised by `normalize` as they are
    read; the whole normalised test set is one cache file that all node processes map."""

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _test_cache(self) -> np.ndarray:
        """The normalised test set as a shared cache file (OSError when none can be written)."""
        raise NotImplementedError

    def train_labels(self) -> np.ndarray:
        return self._y["train"]

    def test_labels(self) -> np.ndarray:
        return self._y["test"]

    def load_train(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index_array(indices, len(self._y["train"]), f"{self.name} train")
        return to_tensors(self.normalize(read_rows(self._x["train"], idx)), self._y["train"][idx])

    def load_test(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        if indices is None:
            try:
                x = self._test_cache()
            except OSError:  # no writable cache anywhere: this process keeps its own copy
                x = self.normalize(self._x["test"])
            return torch.from_numpy(x), torch.from_numpy(self._y["test"].copy())
        idx = as_index_array(indices, len(self._y["test"]), f"{self.name} test")
        return to_tensors(self.normalize(read_rows(self._x["test"], idx)), self._y["test"][idx])
