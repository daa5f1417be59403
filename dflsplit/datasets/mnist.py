"""MNIST from torchvision's on-disk layout: `<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`.

Each file may also be gzip-compressed (`.gz`, as downloaded). Uncompressed idx files
are memmapped in place; compressed ones are decompressed once into the cache. Images
are 1×28×28, normalised with MNIST's mean 0.1307 and std 0.3081.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from ..config import DatasetConfig
from .base import (
    DATASETS, DatasetFormatError, ImageArrayDataset, atomic_path, cache_dir, file_lock,
    missing_error, normalized_cache,
)

MEAN, STD = 0.1307, 0.3081
FILES = {
    ("train", "x"): "train-images-idx3-ubyte",
    ("train", "y"): "train-labels-idx1-ubyte",
    ("test", "x"): "t10k-images-idx3-ubyte",
    ("test", "y"): "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Memmap an (uncompressed) idx file, checking its header against its size."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES or head[3] == 0:
            raise DatasetFormatError(
                f"{path}: not an idx file (expected magic 0x0000 <type> <ndim>, got {head.hex() or 'nothing'})"
            )
        ndim = head[3]
        dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DatasetFormatError(f"{path}: idx header announces {ndim} dimensions but the file ends first")
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    dtype = np.dtype(IDX_DTYPES[head[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DatasetFormatError(
            f"{path}: idx header says shape {dims} of {dtype} ({expected} bytes with header), "
            f"but the file has {actual} bytes"
        )
    if int(np.prod(dims)) == 0:
        return np.zeros(dims, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=dims)


def _normalize(raw: np.ndarray) -> np.ndarray:
    x = (np.asarray(raw, dtype=np.float32) / 255.0 - MEAN) / STD
    return x.reshape(len(raw), 1, 28, 28)


@DATASETS.register("mnist")
class MNIST(ImageArrayDataset):
    name = "mnist"
    needs_root = True

    def __init__(self, cfg: DatasetConfig, root: Path | None, seed: int):
        super().__init__(cfg, root, seed)
        self._paths, self._cache = self._locate(self.root, decompress=True)
        self._x = {s: read_idx(self._paths[(s, "x")]) for s in ("train", "test")}
        self._y = {s: np.asarray(read_idx(self._paths[(s, "y")]), dtype=np.int64) for s in ("train", "test")}
        for s in ("train", "test"):
            x, y = self._x[s], self._y[s]
            if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
                raise DatasetFormatError(
                    f"{self._paths[(s, 'x')]}: expected uint8 images of shape N×28×28, got {x.dtype} {x.shape}"
                )
            if y.ndim != 1 or len(y) != len(x):
                raise DatasetFormatError(
                    f"{self._paths[(s, 'y')]}: expected {len(x)} labels (one per image in "
                    f"{self._paths[(s, 'x')].name}), got shape {y.shape}"
                )
            if len(y) and (y.min() < 0 or y.max() > 9):
                raise DatasetFormatError(f"{self._paths[(s, 'y')]}: labels must be 0..9, got {y.min()}..{y.max()}")

    @staticmethod
    def raw_folder(root: Path) -> Path:
        return Path(root) / "MNIST" / "raw"

    @classmethod
    def _locate(cls, root: Path, decompress: bool) -> tuple[dict, Path | None]:
        """Paths of the four idx files (decompressing `.gz`-only ones into the cache)."""
        raw = cls.raw_folder(root)
        found, missing = {}, []
        for key, name in FILES.items():
            plain, gz = raw / name, raw / (name + ".gz")
            if plain.is_file():
                found[key] = plain
            elif gz.is_file():
                found[key] = gz
            else:
                missing.append(plain)
        if missing:
            expected = [f"{raw / n}  (or {n}.gz)" for n in FILES.values()]
            raise missing_error("mnist", root, expected, missing)
        compressed = {k: p for k, p in found.items() if p.suffix == ".gz"}
        sources = sorted(found.values())
        folder = cache_dir(raw, sources, "mnist") if compressed and decompress else None
        for key, gz in compressed.items():
            target = folder / FILES[key]
            if not target.exists():
                with file_lock(folder):
                    if not target.exists():
                        with atomic_path(target) as tmp:
                            try:
                                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                                    shutil.copyfileobj(src, dst, 1 << 20)
                            except (OSError, EOFError) as e:
                                raise DatasetFormatError(f"{gz}: cannot decompress ({e})") from None
            found[key] = target
        return found, folder

    @classmethod
    def prepare(cls, cfg: DatasetConfig, root: Path | None) -> None:
        """Decompress `.gz` files and write the normalised test set, once."""
        MNIST(cfg, root, 0)._test_cache()

    normalize = staticmethod(_normalize)

    def _test_cache(self) -> np.ndarray:
        folder = self._cache or cache_dir(self.raw_folder(self.root), sorted(self._paths.values()), "mnist")
        return normalized_cache(folder, "test_x_float32.npy", self._x["test"], _normalize)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)

    @property
    def num_classes(self) -> int:
        return 10

