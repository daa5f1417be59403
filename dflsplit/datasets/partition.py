"""Splitting a training set among nodes: disjoint, complete, deterministic for a seed.

Methods:

* ``iid``: a random permutation cut into near-equal parts;
* ``dirichlet``: label skew; each class is spread over the nodes with proportions
  drawn from Dirichlet(alpha) (small alpha = few classes per node). A node left empty
  after a few redraws receives one sample from the largest node;
* ``shard``: samples sorted by label, cut into ``num_nodes * shards_per_node`` shards,
  each node gets ``shards_per_node`` random shards (McMahan et al.'s pathological non-IID);
* ``contiguous``: consecutive equal blocks in dataset order (the seed is not used).
"""

from __future__ import annotations

import numpy as np

METHODS = ("iid", "dirichlet", "shard", "contiguous")
DIRICHLET_REDRAWS = 10


def partition_indices(
    labels: np.ndarray,
    num_nodes: int,
    method: str,
    seed: int | np.random.SeedSequence,
    alpha: float = 0.5,
    shards_per_node: int = 2,
) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` among `num_nodes` nodes with `method`.

    Returns one sorted int64 array per node; together they hold every index exactly
    once and every node gets at least one. Deterministic for `seed`.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if method not in METHODS:
        raise ValueError(f"dataset.partition: unknown method {method!r}; known: {', '.join(METHODS)}")
    if num_nodes < 1:
        raise ValueError(f"cannot partition among num_nodes={num_nodes}: need at least 1 node")
    if n < num_nodes:
        raise ValueError(
            f"cannot partition {n} samples among num_nodes={num_nodes}: "
            f"every node needs at least one sample"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_nodes)
    elif method == "contiguous":
        parts = np.array_split(np.arange(n), num_nodes)
    elif method == "shard":
        parts = _shard(labels, num_nodes, shards_per_node, rng)
    else:
        parts = _dirichlet(labels, num_nodes, alpha, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _shard(labels: np.ndarray, num_nodes: int, shards_per_node: int, rng: np.random.Generator) -> list[np.ndarray]:
    n = len(labels)
    num_shards = num_nodes * shards_per_node
    if shards_per_node < 1:
        raise ValueError(f"dataset.shards_per_node must be >= 1, got {shards_per_node}")
    if n < num_shards:
        raise ValueError(
            f"cannot cut {n} samples into num_nodes*shards_per_node = {num_nodes}*{shards_per_node} "
            f"= {num_shards} shards: lower dataset.shards_per_node or the number of nodes"
        )
    order = np.lexsort((rng.random(n), labels))  # by label, ties in random order
    shards = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards).reshape(num_nodes, shards_per_node)
    return [np.concatenate([shards[s] for s in row]) for row in owner]


def _dirichlet(labels: np.ndarray, num_nodes: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    if not alpha > 0:
        raise ValueError(f"dataset.alpha must be > 0 for the dirichlet partition, got {alpha}")
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_REDRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = np.floor(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for node, piece in enumerate(np.split(idx, cuts)):
                buckets[node].append(piece)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) > 0:
            return parts
    # Still some empty node: give each one sample from the currently largest node.
    for node in range(num_nodes):
        if len(parts[node]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            take = int(rng.integers(len(parts[donor])))
            parts[node] = parts[donor][take : take + 1]
            parts[donor] = np.delete(parts[donor], take)
    return parts


def label_entropy(labels_of_shard: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (bits) of a shard's label distribution: 0 for one class,
    log2(num_classes) for a uniform mix; 0 for an empty shard."""
    labels_of_shard = np.asarray(labels_of_shard, dtype=np.int64).reshape(-1)
    if len(labels_of_shard) == 0:
        return 0.0
    counts = np.bincount(labels_of_shard, minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
