"""Topology generators, registered by name in ``GRAPH_TYPES`` and built on networkx.

Every generator takes ``(n, *, degree, p, k, seed)`` (ignoring the parameters it does
not use) and returns a connected :class:`Graph`; impossible parameters raise ValueError
saying why. The same seed always gives the same graph.

>>> make_graph("regular", 16, degree=4, seed=1).degrees() == [4] * 16
True
"""

from __future__ import annotations

import math
import random
from typing import Callable, Optional

import networkx as nx

from ..registry import Registry
from .graph import Graph

#: name -> generator ``f(n, *, degree, p, k, seed) -> Graph``
GRAPH_TYPES: Registry[Callable[..., Graph]] = Registry("graph type")

#: attempts made by the randomised generators before giving up on connectivity
MAX_TRIES = 100


def make_graph(
    kind: str,
    n: int,
    *,
    degree: int = 4,
    p: float = 0.1,
    k: int = 4,
    seed: Optional[int] = None,
) -> Graph:
    """Build a connected topology of type ``kind`` on ``n`` nodes.

    Args:
        kind: one of ``GRAPH_TYPES.names()``: ring, regular, full, star, small_world,
            erdos_renyi, torus, exponential.
        n: number of nodes (>= 1).
        degree: degree of ``regular``.
        p: rewiring probability of ``small_world``; edge probability of ``erdos_renyi``.
        k: ring neighbours of each node in ``small_world`` (even).
        seed: makes the random types deterministic; None draws fresh randomness.

    Raises:
        ValueError: unknown ``kind`` (the message lists the known ones) or parameters for
            which no connected graph of that type exists.
    """
    if kind not in GRAPH_TYPES:
        try:
            GRAPH_TYPES.get(kind)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"graph {kind!r}: number of nodes must be an integer >= 1, got {n!r}")
    return GRAPH_TYPES.get(kind)(n, degree=degree, p=p, k=k, seed=seed)


def _seeds(seed: Optional[int]):
    """A deterministic stream of per-attempt seeds derived from ``seed``."""
    rng = random.Random(seed)
    for _ in range(MAX_TRIES):
        yield rng.randrange(2**32)


@GRAPH_TYPES.register("ring")
def ring(n: int, **_) -> Graph:
    """A cycle 0–1–…–(n-1)–0: every node has degree 2 (a single edge when n = 2)."""
    return Graph.from_networkx(nx.cycle_graph(n) if n >= 3 else nx.path_graph(n))


@GRAPH_TYPES.register("full")
def full(n: int, **_) -> Graph:
    """The complete graph: degree n-1."""
    return Graph.from_networkx(nx.complete_graph(n))


@GRAPH_TYPES.register("star")
def star(n: int, **_) -> Graph:
    """Node 0 is the hub linked to every other node; the others have degree 1."""
    return Graph.from_networkx(nx.star_graph(n - 1))


@GRAPH_TYPES.register("regular")
def regular(n: int, *, degree: int = 4, seed: Optional[int] = None, **_) -> Graph:
    """A uniformly random connected ``degree``-regular graph.

    Needs ``degree < n`` and ``n * degree`` even (and degree >= 2 unless n <= 2).
    Degree 2 is a random Hamiltonian cycle; dense graphs (2*degree >= n-1) are built as
    the complement of a sparse random regular graph, which is then always connected.
    """
    d = degree
    why = None
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        why = "the degree must be a non-negative integer"
    elif d >= n:
        why = f"a node has at most n-1 = {n - 1} neighbours"
    elif (n * d) % 2:
        why = "n * degree is odd, but every edge has two ends (n * degree = 2 * #edges)"
    elif d == 0 and n > 1:
        why = "a 0-regular graph on several nodes is not connected"
    elif d == 1 and n > 2:
        why = "a 1-regular graph is a set of disjoint edges, connected only when n = 2"
    if why:
        raise ValueError(f"graph 'regular': no connected {d!r}-regular graph on n={n} nodes: {why}")
    if d == n - 1:
        return full(n)
    for s in _seeds(seed):
        if d == 2:
            order = list(range(n))
            random.Random(s).shuffle(order)
            g = nx.Graph(zip(order, order[1:] + order[:1]))
        elif 2 * d >= n - 1:
            g = nx.complement(nx.random_regular_graph(n - 1 - d, n, seed=s))
        else:
            g = nx.random_regular_graph(d, n, seed=s)
        if g.number_of_nodes() == n and nx.is_connected(g):
            return Graph.from_networkx(g)
    raise ValueError(
        f"graph 'regular': no connected {d}-regular graph on n={n} nodes found in {MAX_TRIES} tries "
        f"(seed={seed}); try a larger degree"
    )


@GRAPH_TYPES.register("small_world")
def small_world(n: int, *, k: int = 4, p: float = 0.1, seed: Optional[int] = None, **_) -> Graph:
    """A connected Watts–Strogatz graph: a ring where each node links to its ``k`` nearest
    neighbours (k/2 per side), each edge rewired with probability ``p``. Mean degree is k."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2 or k >= n:
        raise ValueError(
            f"graph 'small_world': k (ring neighbours per node) must be an even integer in 2..n-1 "
            f"= 2..{n - 1}, got k={k!r}"
        )
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"graph 'small_world': rewiring probability p must be in [0, 1], got p={p!r}")
    try:
        g = nx.connected_watts_strogatz_graph(n, k, p, tries=MAX_TRIES, seed=random.Random(seed))
    except nx.NetworkXError as e:
        raise ValueError(
            f"graph 'small_world': no connected graph with n={n}, k={k}, p={p} in {MAX_TRIES} tries ({e}); "
            f"lower p or raise k"
        ) from None
    return Graph.from_networkx(g)


@GRAPH_TYPES.register("erdos_renyi")
def erdos_renyi(n: int, *, p: float = 0.1, seed: Optional[int] = None, **_) -> Graph:
    """A connected G(n, p) random graph: each edge present with probability ``p``
    (redrawn until connected, at most MAX_TRIES times)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"graph 'erdos_renyi': edge probability p must be in (0, 1], got p={p!r}")
    for s in _seeds(seed):
        g = nx.gnp_random_graph(n, p, seed=s)
        if nx.is_connected(g):
            return Graph.from_networkx(g)
    threshold = math.log(n) / n if n > 1 else 0.0
    raise ValueError(
        f"graph 'erdos_renyi': no connected G(n={n}, p={p}) found in {MAX_TRIES} tries; "
        f"connectivity needs p well above ln(n)/n = {threshold:.3g}"
    )


def _squarest_rows(n: int) -> int:
    return max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)


def torus_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols = n, as square as possible; ValueError unless both >= 3."""
    rows = _squarest_rows(n)
    if rows < 3:
        near = sorted(
            (m for m in range(9, n + 20) if _squarest_rows(m) >= 3), key=lambda m: (abs(m - n), m)
        )[:4]
        raise ValueError(
            f"graph 'torus': n={n} factors at best as {rows}x{n // rows}; a 2-D torus needs rows and "
            f"columns >= 3 (nearby valid n: {', '.join(map(str, sorted(near)))})"
        )
    return rows, n // rows


@GRAPH_TYPES.register("torus")
def torus(n: int, **_) -> Graph:
    """A rows×cols 2-D torus (grid with wrap-around), as square as n allows: degree 4.
    Node r*cols + c sits at row r, column c."""
    rows, cols = torus_shape(n)
    return Graph.from_networkx(nx.grid_2d_graph(rows, cols, periodic=True))


@GRAPH_TYPES.register("exponential")
def exponential(n: int, **_) -> Graph:
    """The static exponential graph: node i links to i ± 2^j (mod n) for every 2^j < n.

    A circulant graph, so every node has the same degree, about 2*log2(n)
    (2*log2(n) - 1 when n is a power of two).
    """
    offsets = [2**j for j in range(max(n - 1, 1).bit_length()) if 2**j < n]
    return Graph.from_networkx(nx.circulant_graph(n, offsets))
