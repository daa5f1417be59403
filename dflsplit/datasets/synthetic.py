"""Synthetic class-conditional Gaussian blobs of any shape, generated on demand.

Sample i of a split is ``mean[y_i] + noise_i`` where the label y_i and the unit
Gaussian noise depend only on (seed, split, i), so a node generates exactly its own
indices and gets the same rows as generating everything would. Class means are smooth
random images (random values on a coarse grid, upsampled), scaled so that two class
means lie about SEPARATION noise standard deviations apart whatever the shape: the
best possible accuracy is about 97-99%, and a learner needs a few thousand samples
to get close, so collaboration between nodes pays off.

Config keys: `image_shape` (e.g. [3, 32, 32], or [D] for vectors), `num_classes`,
`num_train`, `num_test`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DatasetConfig
from ..registry import key
from .base import DATASETS, Dataset, as_index_array

SEPARATION = 6.0  # expected distance between two class means, in units of the noise std
COARSE = 4  # class means are drawn on a COARSE×COARSE grid per channel, then upsampled
_STREAMS = {"train": 1, "test": 2}
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of each element."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, stream: int, indices: np.ndarray) -> np.ndarray:
    """A 64-bit key per (seed, stream, index): the source of that sample's randomness."""
    base = _splitmix64(np.array([(int(seed) & 0xFFFFFFFF) << 8 | stream], dtype=np.uint64))[0]
    return _splitmix64(np.asarray(indices, dtype=np.uint64) ^ base)


@dataclass
class SyntheticKeys:
    """Keys of dataset `synthetic`."""

    image_shape: list[int] = key(doc="shape of one sample, e.g. [3, 32, 32] or [D]", factory=lambda: [3, 32, 32], ge=1)
    num_classes: int = key(10, "number of classes", ge=2)
    num_train: int = key(5000, "training samples", ge=1)
    num_test: int = key(1000, "test samples", ge=1)


@DATASETS.register("synthetic", keys=SyntheticKeys)
class Synthetic(Dataset):
    name = "synthetic"

    def __init__(self, cfg: DatasetConfig, root: Path | None, seed: int):
        super().__init__(cfg, root, seed)
        shape = tuple(int(s) for s in cfg.image_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"dataset.image_shape must be a non-empty list of positive sizes, got {cfg.image_shape}")
        if cfg.num_classes < 2:
            raise ValueError(f"dataset.num_classes must be >= 2 for synthetic data, got {cfg.num_classes}")
        for key in ("num_train", "num_test"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"dataset.{key} must be >= 1, got {getattr(cfg, key)}")
        self._shape = shape
        self._sizes = {"train": cfg.num_train, "test": cfg.num_test}
        self._means = self._class_means()
        self._labels = {s: self._labels_of(s, np.arange(n)) for s, n in self._sizes.items()}

    def _class_means(self) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5E7]))
        k, shape = self.cfg.num_classes, self._shape
        if len(shape) == 3:
            c, h, w = shape
            coarse = torch.from_numpy(rng.standard_normal((k, c, min(h, COARSE), min(w, COARSE)), dtype=np.float32))
            means = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
            means = means / means.flatten(1).std(dim=1).clamp_min(1e-6).view(k, 1, 1, 1)
        else:
            means = torch.from_numpy(rng.standard_normal((k, *shape), dtype=np.float32))
        per_feature = SEPARATION / np.sqrt(2 * int(np.prod(shape)))
        return (per_feature * means).contiguous()

    def _labels_of(self, split: str, indices: np.ndarray) -> np.ndarray:
        keys = sample_keys(self.seed, 2 * _STREAMS[split], indices)
        return (keys % np.uint64(self.cfg.num_classes)).astype(np.int64)

    def _generate(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index_array(indices, self._sizes[split], f"synthetic {split}")
        y = self._labels[split][idx]
        keys = sample_keys(self.seed, 2 * _STREAMS[split] + 1, idx) & np.uint64(0x7FFFFFFFFFFFFFFF)
        x = self._means[torch.from_numpy(y)].clone()  # N×shape, float32
        noise = torch.empty(self._means[0].shape)
        gen = torch.Generator()
        for row, key in zip(x, keys.tolist()):
            gen.manual_seed(key)
            torch.randn(noise.shape, generator=gen, out=noise)
            row.add_(noise)
        return x, torch.from_numpy(y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def train_labels(self) -> np.ndarray:
        return self._labels["train"]

    def test_labels(self) -> np.ndarray:
        return self._labels["test"]

    def load_train(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self._generate("train", indices)

    def load_test(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._generate("test", np.arange(self._sizes["test"]) if indices is None else indices)
