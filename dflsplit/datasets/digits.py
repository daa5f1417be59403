"""scikit-learn's bundled handwritten digits: 1797 images of 8×8, 10 classes, no download.

Pixels (0..16) are scaled to [0, 1] and shaped 1×8×8. The train/test split is
stratified, `dataset.test_fraction` of the images go to the test set, and it depends
only on the seed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ..config import DatasetConfig
from .base import DATASETS, Dataset, as_index_array, to_tensors


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


@DATASETS.register("digits")
class Digits(Dataset):
    name = "digits"

    def __init__(self, cfg: DatasetConfig, root: Path | None, seed: int):
        super().__init__(cfg, root, seed)
        if not 0.0 < cfg.test_fraction < 1.0:
            raise ValueError(f"dataset.test_fraction must be in (0, 1), got {cfg.test_fraction}")
        from sklearn.model_selection import train_test_split

        x, y = _digits()
        self._x, self._y = x, y
        train, test = train_test_split(
            np.arange(len(y)), test_size=cfg.test_fraction, stratify=y, random_state=self.seed % 2**32
        )
        self._train, self._test = np.sort(train), np.sort(test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def num_classes(self) -> int:
        return 10

    def train_labels(self) -> np.ndarray:
        return self._y[self._train]

    def load_train(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._train[as_index_array(indices, len(self._train), "digits train")]
        return to_tensors(self._x[idx], self._y[idx])

    def test_labels(self) -> np.ndarray:
        return self._y[self._test]

    def load_test(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._test if indices is None else self._test[as_index_array(indices, len(self._test), "digits test")]
        return to_tensors(self._x[idx], self._y[idx])
