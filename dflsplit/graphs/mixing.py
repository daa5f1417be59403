"""Mixing (averaging) weights of a topology.

A weight table is a list with one dict per node: ``weights[i][j]`` is how much node i's
average takes from node j, for j = i and each neighbour of i. Every row sums to 1.

>>> from dflsplit.graphs import Graph
>>> metropolis_hastings_weights(Graph(3, [(0, 1), (1, 2)]))[0]
{1: 0.3333333333333333, 0: 0.6666666666666667}
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..registry import Registry
from .graph import Graph

Weights = list[dict[int, float]]

#: name -> ``f(graph) -> Weights``
MIXING_WEIGHTS: Registry[Callable[[Graph], Weights]] = Registry("mixing weights")


@MIXING_WEIGHTS.register("metropolis_hastings")
def metropolis_hastings_weights(graph: Graph) -> Weights:
    """Metropolis–Hastings weights: ``w[i][j] = 1 / (1 + max(deg i, deg j))`` for each
    neighbour j, and ``w[i][i] = 1 - sum`` of those.

    Symmetric and doubly stochastic with non-negative entries, so gossip with them
    converges to the exact average on any connected graph.
    """
    weights: Weights = []
    for i in range(graph.n):
        di = len(graph.adj[i])
        row = {j: 1.0 / (1 + max(di, len(graph.adj[j]))) for j in sorted(graph.adj[i])}
        row[i] = 1.0 - math.fsum(row.values())
        weights.append(row)
    return weights


@MIXING_WEIGHTS.register("uniform")
def uniform_weights(graph: Graph) -> Weights:
    """Equal weights ``1 / (deg i + 1)`` for node i and each of its neighbours.

    Rows sum to 1; the table is symmetric only when the graph is regular.
    """
    weights: Weights = []
    for i in range(graph.n):
        w = 1.0 / (len(graph.adj[i]) + 1)
        row = {j: w for j in sorted(graph.adj[i])}
        row[i] = w
        weights.append(row)
    return weights


def weights_matrix(weights: Weights) -> np.ndarray:
    """The dense n×n matrix of a weight table (zeros where nodes are not linked)."""
    n = len(weights)
    m = np.zeros((n, n))
    for i, row in enumerate(weights):
        for j, w in row.items():
            m[i, j] = w
    return m


def spectral_gap(weights: Weights) -> float:
    """1 − |second largest eigenvalue| of a symmetric weight table: how fast gossip mixes
    (0 for a disconnected graph, 1 for exact averaging in one step)."""
    eig = np.sort(np.abs(np.linalg.eigvalsh(weights_matrix(weights))))[::-1]
    return float(1.0 - eig[1]) if len(eig) > 1 else 1.0
