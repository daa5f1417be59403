"""Graph layer: who talks to whom.

* :class:`Graph`: an undirected topology on nodes 0..n-1, read and written in
  decentralizepy's ``.edges`` / ``.adj`` formats (malformed files raise
  :class:`GraphFormatError` naming the file and line).
* :func:`make_graph` and the ``GRAPH_TYPES`` registry: ring, regular, full, star,
  small_world, erdos_renyi, torus, exponential.
* :func:`metropolis_hastings_weights`, :func:`uniform_weights`: mixing weights.
* :func:`graph_from_config`: the topology an experiment config asks for.
"""

from __future__ import annotations

from ..config import Config, ConfigError
from .generators import GRAPH_TYPES, make_graph, torus_shape
from .graph import Graph, GraphFormatError
from .mixing import (
    MIXING_WEIGHTS,
    metropolis_hastings_weights,
    spectral_gap,
    uniform_weights,
    weights_matrix,
)

__all__ = [
    "Graph",
    "GraphFormatError",
    "GRAPH_TYPES",
    "MIXING_WEIGHTS",
    "make_graph",
    "torus_shape",
    "metropolis_hastings_weights",
    "uniform_weights",
    "weights_matrix",
    "spectral_gap",
    "graph_from_config",
]


def graph_from_config(cfg: Config) -> Graph:
    """The topology of an experiment: ``graph.file`` when set, else a generated graph.

    A file (resolved with ``cfg.resolve``) must have ``cfg.num_nodes`` nodes. Otherwise
    ``make_graph(graph.type, num_nodes, degree=, p=, k=, seed=graph.seed or run.seed)``.

    Raises:
        GraphFormatError: the graph file is malformed (names file and line).
        ConfigError: missing file, node-count mismatch, unknown type or impossible
            generator parameters (names the config file and key).
    """
    source = cfg.path or "<config>"
    g = cfg.graph
    if g.file is not None:
        path = cfg.resolve(g.file)
        if not path.is_file():
            raise ConfigError(f"{source}: section 'graph': key 'file': graph file {str(path)!r} not found")
        graph = Graph.read(path)
        if graph.n != cfg.num_nodes:
            raise ConfigError(
                f"{source}: section 'graph': key 'file': graph file {str(path)!r} has N={graph.n} nodes, "
                f"but the run has {cfg.num_nodes} nodes (run.machines={cfg.run.machines} x "
                f"run.procs_per_machine={cfg.run.procs_per_machine})"
            )
        return graph
    if g.type not in GRAPH_TYPES:
        try:
            GRAPH_TYPES.get(g.type)
        except KeyError as e:
            raise ConfigError(f"{source}: section 'graph': key 'type': {e.args[0]}") from None
    try:
        return make_graph(
            g.type,
            cfg.num_nodes,
            degree=g.degree,
            p=g.p,
            k=g.k,
            seed=g.seed if g.seed is not None else cfg.run.seed,
        )
    except ValueError as e:
        raise ConfigError(f"{source}: section 'graph': {e}") from None
