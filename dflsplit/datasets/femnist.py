"""FEMNIST from LEAF's per-user JSON files: `<root>/train/*.json` and `<root>/test/*.json`.

Each file holds ``{"users": [...], "num_samples": [...], "user_data": {user: {"x":
[[784 floats]], "y": [ints]}}}`` (what LEAF's `preprocess.sh` writes). 62 classes
(digits, upper- and lower-case letters), images 1×28×28 with LEAF's values kept as
they are. The JSON is converted once into `.npy` files in `<root>/dflsplit-cache/`.

Partitions: with ``dataset.partition: contiguous`` whole *writers* are assigned to
nodes round-robin (user j, in file order, goes to node j mod N) — LEAF's natural
non-IID split — and ``dataset.test: local`` then gives a node the test samples of its
own writers. Every other method treats FEMNIST as a pool of samples.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import DatasetConfig
from .base import (
    DATASETS, Dataset, DatasetFormatError, _tmp_name, as_index_array, atomic_path, cache_dir, cap_indices,
    file_lock, missing_error, open_npy, root_missing_error, read_rows, save_npy_atomic, to_tensors,
)

NUM_CLASSES = 62
PIXELS = 28 * 28
SPLITS = ("train", "test")
CACHE_FILES = ("users.json",) + tuple(f"{s}_{k}.npy" for s in SPLITS for k in ("x", "y", "user"))


def read_leaf_json(path: Path, users: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float32 N×784, y int64, user int32) of one LEAF file; `users` maps names to
    ids and grows with the names first seen here."""
    path = Path(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "users" not in doc or "user_data" not in doc:
        raise DatasetFormatError(f"{path}: expected a LEAF object with keys 'users', 'num_samples', 'user_data'")
    counts = doc.get("num_samples")
    if counts is not None and len(counts) != len(doc["users"]):
        raise DatasetFormatError(
            f"{path}: 'num_samples' has {len(counts)} entries for {len(doc['users'])} 'users'"
        )
    xs, ys, us = [], [], []
    for j, user in enumerate(doc["users"]):
        data = doc["user_data"].get(user)
        if data is None:
            raise DatasetFormatError(f"{path}: user {user!r} is listed in 'users' but has no 'user_data'")
        x = np.asarray(data.get("x", []), dtype=np.float32)
        y = np.asarray(data.get("y", []), dtype=np.int64)
        if x.size == 0:
            x = x.reshape(0, PIXELS)
        if x.ndim != 2 or x.shape[1] != PIXELS:
            raise DatasetFormatError(f"{path}: user {user!r}: each x must be {PIXELS} floats, got shape {x.shape}")
        if y.shape != (len(x),):
            raise DatasetFormatError(f"{path}: user {user!r}: {len(x)} images but {y.size} labels")
        if counts is not None and counts[j] != len(y):
            raise DatasetFormatError(f"{path}: user {user!r}: num_samples says {counts[j]}, user_data has {len(y)}")
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DatasetFormatError(
                f"{path}: user {user!r}: labels must be 0..{NUM_CLASSES - 1}, got {y.min()}..{y.max()}"
            )
        xs.append(x)
        ys.append(y)
        us.append(np.full(len(y), users.setdefault(user, len(users)), dtype=np.int32))
    if not xs:
        return np.zeros((0, PIXELS), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(us)


def _convert(root: Path, sources: dict[str, list[Path]], folder: Path) -> None:
    """Write the cache: each JSON file is parsed once and held in memory alone."""
    users: dict[str, int] = {}
    for split in SPLITS:
        chunks, ys, us = [], [], []
        try:
            for path in sources[split]:
                x, y, u = read_leaf_json(path, users)
                chunk = _tmp_name(folder / f"{split}_chunk.npy")
                with open(chunk, "wb") as f:
                    np.save(f, x)
                chunks.append(chunk)
                ys.append(y)
                us.append(u)
            total = sum(len(y) for y in ys)
            with atomic_path(folder / f"{split}_x.npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, PIXELS))
                pos = 0
                for chunk in chunks:
                    part = np.load(chunk, mmap_mode="r")
                    out[pos : pos + len(part)] = part
                    pos += len(part)
                out.flush()
                del out
        finally:
            for chunk in chunks:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(chunk)
        save_npy_atomic(folder / f"{split}_y.npy", np.concatenate(ys))
        save_npy_atomic(folder / f"{split}_user.npy", np.concatenate(us))
    with atomic_path(folder / "users.json") as tmp:
        Path(tmp).write_text(json.dumps(list(users)))


@DATASETS.register("femnist")
class FEMNIST(Dataset):
    name = "femnist"
    needs_root = True

    def __init__(self, cfg: DatasetConfig, root: Path | None, seed: int):
        super().__init__(cfg, root, seed)
        self._cache = self._build_cache(self.root)
        self._x = {s: open_npy(self._cache / f"{s}_x.npy") for s in SPLITS}
        self._y = {s: np.asarray(open_npy(self._cache / f"{s}_y.npy")) for s in SPLITS}
        self._user = {s: np.asarray(open_npy(self._cache / f"{s}_user.npy")) for s in SPLITS}
        self.users: list[str] = json.loads((self._cache / "users.json").read_text())

    @staticmethod
    def _sources(root: Path) -> dict[str, list[Path]]:
        found = {s: sorted((Path(root) / s).glob("*.json")) for s in SPLITS}
        missing = [Path(root) / s / "*.json" for s in SPLITS if not found[s]]
        if missing:
            expected = [Path(root) / s / "*.json" for s in SPLITS]
            raise missing_error("femnist", root, expected, missing)
        return found

    @classmethod
    def _build_cache(cls, root: Path) -> Path:
        sources = cls._sources(root)
        folder = cache_dir(Path(root), sources["train"] + sources["test"], "femnist")
        if not all((folder / n).exists() for n in CACHE_FILES):
            with file_lock(folder):
                if not all((folder / n).exists() for n in CACHE_FILES):
                    _convert(Path(root), sources, folder)
        return folder

    @classmethod
    def prepare(cls, cfg: DatasetConfig, root: Path | None) -> None:
        """Convert the JSON files to `.npy`, once."""
        if root is None:
            raise root_missing_error(cls.name)
        cls._build_cache(root)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def train_labels(self) -> np.ndarray:
        return self._y["train"]

    def test_labels(self) -> np.ndarray:
        return self._y["test"]

    def train_users(self) -> np.ndarray:
        """The writer id (index into `self.users`) of every training sample."""
        return self._user["train"]

    def load_train(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index_array(indices, len(self._y["train"]), "femnist train")
        return to_tensors(_images(read_rows(self._x["train"], idx)), self._y["train"][idx])

    def load_test(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        if indices is None:  # copy-on-write map of the float32 cache: shared by all node processes
            x = open_npy(self._cache / "test_x.npy", "c").reshape(-1, 1, 28, 28)
            return torch.from_numpy(x), torch.from_numpy(self._y["test"].copy())
        idx = as_index_array(indices, len(self._y["test"]), "femnist test")
        return to_tensors(_images(read_rows(self._x["test"], idx)), self._y["test"][idx])

    # --- natural partition: whole writers per node -------------------------------
    def _users_of_nodes(self, num_nodes: int) -> list[np.ndarray]:
        writers = np.unique(self._user["train"])  # ids are in file order
        if len(writers) < num_nodes:
            raise ValueError(
                f"femnist with dataset.partition='contiguous' assigns whole writers to nodes: "
                f"{len(writers)} writers with training data < {num_nodes} nodes"
            )
        return [writers[k::num_nodes] for k in range(num_nodes)]

    def partition_train(self, num_nodes: int) -> list[np.ndarray]:
        if self.cfg.partition != "contiguous":
            return super().partition_train(num_nodes)
        users = self._user["train"]
        return [np.flatnonzero(np.isin(users, mine)).astype(np.int64) for mine in self._users_of_nodes(num_nodes)]

    def test_indices(self, num_nodes: int, uid: int) -> np.ndarray | None:
        if self.cfg.partition != "contiguous" or self.cfg.test != "local":
            return super().test_indices(num_nodes, uid)
        mine = self._users_of_nodes(num_nodes)[uid]
        idx = np.flatnonzero(np.isin(self._user["test"], mine)).astype(np.int64)
        return cap_indices(idx, self.test_size(), self.cfg.max_test, self.seed)


def _images(raw: np.ndarray) -> np.ndarray:
    return np.asarray(raw, dtype=np.float32).reshape(len(raw), 1, 28, 28)
