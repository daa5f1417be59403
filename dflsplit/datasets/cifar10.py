"""CIFAR-10 from torchvision's on-disk layout: `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`.

The batches are Python pickles (dicts with b'data', 10000×3072 uint8, and b'labels').
They are local files the user downloaded, never peer data; still, they are read with
an unpickler that can build nothing but dicts, lists, bytes, numbers and plain numpy
arrays. `prepare()` converts them once into memmappable `.npy` files in
`cifar-10-batches-py/dflsplit-cache/`, so node processes never unpickle 150 MB each.
Images are 3×32×32, normalised per channel with CIFAR-10's mean and std.
"""

from __future__ import annotations

import pickle  # restricted to _BatchUnpickler below: local dataset files only
from pathlib import Path

import numpy as np

from ..config import DatasetConfig
from .base import (
    DATASETS, DatasetFormatError, ImageArrayDataset, cache_dir, file_lock, missing_error,
    normalized_cache, open_npy, save_npy_atomic,
)

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)

_reconstruct = np.ndarray(0).__reduce__()[0]
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call to rebuild a bytes object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only a dict of arrays and lists"
            ) from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 N×3072, labels int64 N) of one CIFAR-10 batch file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DatasetFormatError(f"{path}: not a CIFAR-10 batch ({e})") from None
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DatasetFormatError(f"{path}: expected keys b'data' and b'labels', got {sorted(map(str, entry))}")
    data = entry["data"]
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3072)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFormatError(f"{path}: b'data' must be uint8 N×3072, got {data.dtype} {data.shape}")
    labels = np.asarray(entry["labels"])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{path}: b'labels' must be {len(data)} integers (one per row of b'data'), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(f"{path}: labels must be 0..9, got {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _normalize(raw: np.ndarray) -> np.ndarray:
    return ((np.asarray(raw, dtype=np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


CACHE_FILES = ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy")


@DATASETS.register("cifar10")
class CIFAR10(ImageArrayDataset):
    name = "cifar10"
    needs_root = True

    def __init__(self, cfg: DatasetConfig, root: Path | None, seed: int):
        super().__init__(cfg, root, seed)
        self._cache = self._build_cache(self.root)
        self._x = {s: open_npy(self._cache / f"{s}_x.npy") for s in ("train", "test")}
        self._y = {s: np.asarray(open_npy(self._cache / f"{s}_y.npy")) for s in ("train", "test")}

    @staticmethod
    def _sources(root: Path) -> list[Path]:
        folder = Path(root) / FOLDER
        expected = [folder / n for n in TRAIN_FILES + TEST_FILES]
        missing = [p for p in expected if not p.is_file()]
        if missing:
            raise missing_error("cifar10", root, expected, missing)
        return expected

    @classmethod
    def _build_cache(cls, root: Path) -> Path:
        """The cache folder, converting the pickled batches into `.npy` files if needed."""
        sources = cls._sources(root)
        folder = cache_dir(Path(root) / FOLDER, sources, "cifar10")
        if all((folder / n).exists() for n in CACHE_FILES):
            return folder
        with file_lock(folder):
            for split, names in (("train", TRAIN_FILES), ("test", TEST_FILES)):
                if (folder / f"{split}_x.npy").exists() and (folder / f"{split}_y.npy").exists():
                    continue
                batches = [read_batch(Path(root) / FOLDER / n) for n in names]
                x = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
                y = np.concatenate([b[1] for b in batches])
                save_npy_atomic(folder / f"{split}_y.npy", y)
                save_npy_atomic(folder / f"{split}_x.npy", x)
        return folder

    @classmethod
    def prepare(cls, cfg: DatasetConfig, root: Path | None) -> None:
        """Convert the batches to `.npy` and write the normalised test set, once."""
        CIFAR10(cfg, root, 0)._test_cache()

    normalize = staticmethod(_normalize)

    def _test_cache(self) -> np.ndarray:
        return normalized_cache(self._cache, "test_x_float32.npy", self._x["test"], _normalize)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def num_classes(self) -> int:
        return 10

