"""An undirected topology on nodes 0..n-1, and its decentralizepy-compatible file formats.

Two text formats, chosen by file suffix:

* ``.edges``: first line N, then one ``u v`` pair per line (0-indexed). An edge listed once
  is undirected; an edge listed in both directions is the same edge.
* ``.adj``: first line N, then exactly N lines; line i+1 lists node i's neighbours separated
  by whitespace (an empty line is an isolated node). Lists are symmetrised on reading.

Blank lines after the data are ignored. Files written here are read unchanged by
decentralizepy's ``Graph.read_graph_from_file`` and vice versa.

>>> g = Graph(3, [(0, 1), (1, 2)])
>>> g.neighbors(1), g.degree(0), g.edges()
([0, 2], 1, [(0, 1), (1, 2)])
"""

from __future__ import annotations

import operator
import os
from collections import deque
from pathlib import Path
from typing import Iterable, Optional, Union

import networkx as nx

PathLike = Union[str, os.PathLike]

#: file suffix -> format name
SUFFIXES = {".edges": "edges", ".adj": "adj"}


class GraphFormatError(ValueError):
    """A malformed graph file. The message reads ``FILE:LINE: what was expected``."""

    def __init__(self, path: PathLike, line: Optional[int], message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class Graph:
    """An undirected simple graph on nodes ``0..n-1`` stored as adjacency sets.

    Attributes:
        n: number of nodes.
        adj: ``adj[i]`` is the set of neighbours of node ``i``.
    """

    __hash__ = None  # mutable

    def __init__(self, n: int, edges: Iterable[tuple[int, int]] = ()):
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"number of nodes must be >= 0, got {n}")
        self.n = n
        self.adj: list[set[int]] = [set() for _ in range(n)]
        for u, v in edges:
            self.add_edge(u, v)

    # --- structure -------------------------------------------------------------------

    def _check_node(self, i: int) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise ValueError(f"node id must be an integer, got {i!r}") from None
        if not 0 <= i < self.n:
            raise ValueError(f"node id {i} out of range 0..{self.n - 1}")
        return i

    def add_edge(self, u: int, v: int) -> None:
        """Add the undirected edge u–v (adding an existing edge is a no-op).

        Raises ValueError for a self-loop or an id outside ``0..n-1``.
        """
        u, v = self._check_node(u), self._check_node(v)
        if u == v:
            raise ValueError(f"self-loop on node {u} is not allowed")
        self.adj[u].add(v)
        self.adj[v].add(u)

    def has_edge(self, u: int, v: int) -> bool:
        return 0 <= u < self.n and v in self.adj[u]

    def neighbors(self, i: int) -> list[int]:
        """Neighbours of node ``i``, sorted."""
        return sorted(self.adj[self._check_node(i)])

    def degree(self, i: int) -> int:
        return len(self.adj[self._check_node(i)])

    def degrees(self) -> list[int]:
        """Degree of every node, in node order."""
        return [len(a) for a in self.adj]

    def edges(self) -> list[tuple[int, int]]:
        """Every edge once as ``(u, v)`` with ``u < v``, sorted."""
        return [(u, v) for u in range(self.n) for v in sorted(self.adj[u]) if u < v]

    def num_edges(self) -> int:
        return sum(len(a) for a in self.adj) // 2

    def is_connected(self) -> bool:
        """True when every node reaches every other (a graph with 0 or 1 node is connected)."""
        if self.n <= 1:
            return True
        seen = {0}
        todo = deque([0])
        while todo:
            for v in self.adj[todo.popleft()]:
                if v not in seen:
                    seen.add(v)
                    todo.append(v)
        return len(seen) == self.n

    def is_regular(self) -> bool:
        return len(set(self.degrees())) <= 1

    def diameter(self) -> Optional[int]:
        """Longest shortest path; None when the graph is disconnected or empty."""
        if self.n == 0 or not self.is_connected():
            return None
        return nx.diameter(self.to_networkx()) if self.n > 1 else 0

    # --- networkx --------------------------------------------------------------------

    def to_networkx(self) -> nx.Graph:
        """A ``networkx.Graph`` with nodes ``0..n-1`` (isolated nodes included)."""
        g = nx.Graph()
        g.add_nodes_from(range(self.n))
        g.add_edges_from(self.edges())
        return g

    @classmethod
    def from_networkx(cls, g: nx.Graph) -> "Graph":
        """Convert a networkx graph; nodes are relabelled 0..n-1 in sorted order
        (insertion order when the labels do not sort). Directed edges become undirected."""
        nodes = list(g.nodes)
        try:
            nodes = sorted(nodes)
        except TypeError:
            pass
        index = {node: i for i, node in enumerate(nodes)}
        return cls(len(nodes), ((index[u], index[v]) for u, v in g.edges()))

    # --- comparison / display ----------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return self.n == other.n and self.adj == other.adj

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Graph(n={self.n}, edges={self.num_edges()})"

    def copy(self) -> "Graph":
        return Graph(self.n, self.edges())

    # --- files -------------------------------------------------------------------------

    @staticmethod
    def format_of(path: PathLike) -> str:
        """``'edges'`` or ``'adj'`` from the file suffix; GraphFormatError otherwise."""
        fmt = SUFFIXES.get(Path(path).suffix.lower())
        if fmt is None:
            raise GraphFormatError(
                path, None, f"unknown graph file suffix {Path(path).suffix!r}; expected .edges or .adj"
            )
        return fmt

    @classmethod
    def read(cls, path: PathLike) -> "Graph":
        """Read a ``.edges`` or ``.adj`` file (format chosen by suffix)."""
        if cls.format_of(path) == "edges":
            return cls.read_edges(path)
        return cls.read_adj(path)

    def write(self, path: PathLike) -> None:
        """Write a ``.edges`` or ``.adj`` file (format chosen by suffix)."""
        if self.format_of(path) == "edges":
            self.write_edges(path)
        else:
            self.write_adj(path)

    @classmethod
    def read_edges(cls, path: PathLike) -> "Graph":
        """Read the edge-list format: N, then one ``u v`` per line."""
        n, body = _read_header(path)
        g = cls(n)
        for lineno, text in body:
            tokens = text.split()
            if not tokens:
                continue
            if len(tokens) != 2:
                raise GraphFormatError(
                    path, lineno, f"expected two node ids 'u v', got {len(tokens)} token(s): {text.strip()!r}"
                )
            u, v = (_parse_id(path, lineno, t, n) for t in tokens)
            if u == v:
                raise GraphFormatError(path, lineno, f"self-loop {u} {v}: an edge needs two distinct nodes")
            g.add_edge(u, v)
        return g

    @classmethod
    def read_adj(cls, path: PathLike) -> "Graph":
        """Read the adjacency format: N, then line i+1 lists node i's neighbours."""
        n, body = _read_header(path)
        while body and not body[-1][1].strip():  # trailing blank lines beyond the N rows
            if len(body) <= n:
                break
            body.pop()
        if len(body) < n:
            raise GraphFormatError(
                path,
                len(body) + 2,
                f"expected {n} adjacency lines after the header (one per node), "
                f"the file ends after {len(body)}",
            )
        if len(body) > n:
            raise GraphFormatError(
                path,
                n + 2,
                f"expected only {n} adjacency lines after the header (one per node), "
                f"found {len(body)}; extra line: {body[n][1].strip()!r}",
            )
        g = cls(n)
        for node, (lineno, text) in enumerate(body):
            for token in text.split():
                v = _parse_id(path, lineno, token, n)
                if v == node:
                    raise GraphFormatError(path, lineno, f"node {node} lists itself as a neighbour")
                g.add_edge(node, v)
        return g

    def write_edges(self, path: PathLike) -> None:
        """Write N then each edge once as ``u v`` (u < v)."""
        lines = [str(self.n)] + [f"{u} {v}" for u, v in self.edges()]
        Path(path).write_text("\n".join(lines) + "\n")

    def write_adj(self, path: PathLike) -> None:
        """Write N then one line of sorted neighbours per node."""
        lines = [str(self.n)] + [" ".join(map(str, sorted(a))) for a in self.adj]
        Path(path).write_text("\n".join(lines) + "\n")


def _read_header(path: PathLike) -> tuple[int, list[tuple[int, str]]]:
    """The node count from line 1 and the remaining (1-based line number, text) pairs."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise GraphFormatError(path, 1, "expected the number of nodes N on the first line, found an empty line")
    tokens = lines[0].split()
    if len(tokens) != 1:
        raise GraphFormatError(
            path, 1, f"expected only the number of nodes N on the first line, got {lines[0].strip()!r}"
        )
    try:
        n = int(tokens[0])
    except ValueError:
        raise GraphFormatError(
            path, 1, f"expected the number of nodes N (an integer) on the first line, got {tokens[0]!r}"
        ) from None
    if n < 1:
        raise GraphFormatError(path, 1, f"expected a number of nodes N >= 1, got {n}")
    return n, [(i + 2, text) for i, text in enumerate(lines[1:])]


def _parse_id(path: PathLike, lineno: int, token: str, n: int) -> int:
    try:
        v = int(token)
    except ValueError:
        raise GraphFormatError(path, lineno, f"expected an integer node id, got {token!r}") from None
    if not 0 <= v < n:
        raise GraphFormatError(path, lineno, f"node id {v} out of range: the header says N={n}, so ids are 0..{n - 1}")
    return v
