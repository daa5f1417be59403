"""Dataset layer: loading one node's shard and the test set; partitioners.

>>> cfg = load_config(None, ["dataset.name=digits", "run.procs_per_machine=4"])  # doctest: +SKIP
>>> prepare_dataset(cfg)            # once, in the launcher, before forking nodes  # doctest: +SKIP
>>> data = load_node_data(cfg, 2)   # in node 2's process: only its shard       # doctest: +SKIP

Datasets: `digits` (scikit-learn's bundled digits, the default, no download),
`mnist`, `cifar10` (torchvision's on-disk layouts), `femnist` (LEAF JSON), and
`synthetic` (Gaussian blobs generated per index). Fetch real ones with
``python download_dataset.py NAME --root DIR``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config, ConfigError
from . import cifar10, digits, femnist, mnist, synthetic  # noqa: F401  (registration)
from .base import DATASETS, Dataset, DatasetFormatError, DatasetMissingError, NodeData
from .partition import METHODS, label_entropy, partition_indices

__all__ = [
    "DATASETS", "Dataset", "DatasetFormatError", "DatasetMissingError", "NodeData", "METHODS",
    "build_dataset", "label_entropy", "load_node_data", "partition_indices", "prepare_dataset",
    "preload_global_test_set",
]

# The global test set, loaded once by the launcher before it forks the node processes:
# (dataset config, root, seed, indices) → (x, y). The nodes only read it, so they share its
# pages instead of each generating or reading a copy.
_GLOBAL_TEST: dict[tuple, tuple] = {}


def _global_test_key(cfg: Config, indices) -> tuple:
    ids = None if indices is None else tuple(int(i) for i in indices)
    return repr(cfg.dataset), str(cfg.resolve(cfg.dataset.root)), cfg.run.seed, ids


def _dataset_class(cfg: Config) -> type[Dataset]:
    where = f"{cfg.path or '<config>'}: section 'dataset'"
    try:
        cls = DATASETS.get(cfg.dataset.name)
    except KeyError as e:
        raise ConfigError(f"{where}: key 'name': {e.args[0]}") from None
    d = cfg.dataset
    if cls.needs_root and d.root is None:
        raise ConfigError(
            f"{where}: dataset {d.name!r} reads files from disk: set key 'dataset.root' to their folder "
            f"(fetch them with `python download_dataset.py {d.name} --root DIR`)"
        )
    checks = [
        ("alpha", d.alpha > 0, "> 0"),
        ("shards_per_node", d.shards_per_node >= 1, ">= 1"),
        ("test_fraction", 0 < d.test_fraction < 1, "in (0, 1)"),
        ("max_test", d.max_test is None or d.max_test >= 1, ">= 1 or null"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{where}: key {key!r} must be {expected}, got {getattr(d, key)!r}")
    return cls


def build_dataset(cfg: Config) -> Dataset:
    """The dataset named by `cfg.dataset.name`, its root resolved against the config file,
    seeded with `cfg.run.seed`."""
    cls = _dataset_class(cfg)
    return cls(cfg.dataset, cfg.resolve(cfg.dataset.root), cfg.run.seed)


def prepare_dataset(cfg: Config) -> Dataset:
    """One-time preparation (format conversion, caches) before node processes start, and
    the dataset it prepared (the launcher hands it to every node it forks). Idempotent,
    and safe when several processes or machines run it at once."""
    cls = _dataset_class(cfg)
    cls.prepare(cfg.dataset, cfg.resolve(cfg.dataset.root))
    return cls(cfg.dataset, cfg.resolve(cfg.dataset.root), cfg.run.seed)


def preload_global_test_set(cfg: Config, memory_format=None, dataset: Dataset | None = None) -> None:
    """Load the whole test set once in this process (`dataset.test: global`), so that node
    processes forked afterwards share it instead of loading their own copies; it replaces
    the set a previous call kept. Images are stored in `memory_format` (e.g.
    torch.channels_last), the layout the nodes use."""
    if cfg.dataset.test != "global":
        return
    ds = dataset if dataset is not None else build_dataset(cfg)
    indices = ds.test_indices(cfg.num_nodes, 0)
    x, y = ds.load_test(indices)
    if memory_format is not None and x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    _GLOBAL_TEST.clear()  # one run's test set at a time, however many runs this process starts
    _GLOBAL_TEST[_global_test_key(cfg, indices)] = (x, y)


def load_node_data(cfg: Config, uid: int, shard: tuple[int, int] | None | str = "uid",
                   dataset: Dataset | None = None) -> NodeData:
    """Node `uid`'s training shard and its test set (`cfg.dataset.test`: 'global' = the
    whole test set, 'local' = its IID share; at most `max_test` samples either way).

    The shard is part `index` of `cfg.dataset.partition` into `count` parts for
    ``shard=(index, count)``; by default part `uid` of `cfg.num_nodes`; None: no
    training data (a node that does not train, e.g. a federated server).

    Only that shard is read into memory; a whole test set of a file-backed dataset is a
    copy-on-write map of a cache file that all node processes share. `dataset`: the one
    the launcher prepared (built here when None).
    """
    n = cfg.num_nodes
    if not 0 <= uid < n:
        raise ValueError(f"node uid {uid} is out of range: the config has {n} nodes (uids 0..{n - 1})")
    ds = dataset if dataset is not None else build_dataset(cfg)
    if shard == "uid":
        shard = (uid, n)
    if shard is None:
        train_idx = np.zeros(0, dtype=np.int64)
        empty_x, _ = ds.load_train(np.zeros(1, dtype=np.int64))
        train_x, train_y = empty_x[:0], torch.zeros(0, dtype=torch.int64)
    else:
        train_idx = ds.partition_train(shard[1])[shard[0]]
        train_x, train_y = ds.load_train(train_idx)
    test_idx = ds.test_indices(n, uid)
    shared = _GLOBAL_TEST.get(_global_test_key(cfg, test_idx)) if cfg.dataset.test == "global" else None
    test_x, test_y = shared if shared is not None else ds.load_test(test_idx)
    return NodeData(
        train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        input_shape=tuple(ds.input_shape), num_classes=ds.num_classes,
        train_indices=train_idx, test_indices=test_idx,
    )
