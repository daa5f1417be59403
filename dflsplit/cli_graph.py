"""``generate-graph``: write a topology file (.edges / .adj) or summarise a generated graph.

Standalone: ``python generate_graph.py --type regular -n 16 --degree 4 -o graphs/r16.edges``.
Embedded as a subcommand: ``add_generate_graph_arguments(sub_parser)`` then
``run_generate_graph(args)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

from .graphs.generators import GRAPH_TYPES, make_graph
from .graphs.graph import SUFFIXES, Graph

DESCRIPTION = """\
Generate a connected topology and write it in decentralizepy's formats:
  .edges  first line N, then one 'u v' edge per line (0-indexed)
  .adj    first line N, then line i+1 lists node i's neighbours
The format follows the output file's suffix. Without -o, a summary is printed."""

EPILOG = """\
graph types and the options they use:
  ring          cycle, degree 2
  regular       random connected graph, every node of degree --degree
                (needs degree < n and n*degree even)
  full          complete graph, degree n-1
  star          node 0 linked to all others
  small_world   connected Watts-Strogatz: ring of --k neighbours, rewired with prob. --p
  erdos_renyi   connected G(n, --p)
  torus         2-D torus, rows x cols = n as square as possible (both >= 3), degree 4
  exponential   node i linked to i +- 2^j mod n

examples:
  %(prog)s --type regular -n 16 --degree 4 -o graphs/regular_16_4.edges
  %(prog)s --type small_world -n 32 --k 4 --p 0.2 --seed 3 -o sw.adj --print
  %(prog)s --type torus -n 16 --print"""


def add_generate_graph_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the generate-graph options to ``parser`` (a top-level or sub-command parser)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--type", default="regular", choices=GRAPH_TYPES.names(), metavar="TYPE",
        help=f"graph type: {', '.join(GRAPH_TYPES.names())} (default: %(default)s)",
    )
    parser.add_argument("-n", "--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument(
        "--degree", type=int, default=4, help="node degree for 'regular' (default: %(default)s)"
    )
    parser.add_argument(
        "--p", type=float, default=0.1,
        help="rewiring probability ('small_world') or edge probability ('erdos_renyi') "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--k", type=int, default=4, help="ring neighbours per node for 'small_world', even (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=1,
        help="random seed; the same seed gives the same graph (default: %(default)s, "
        "the default run.seed of a config)",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE",
        help="write the graph to FILE; its suffix (.edges or .adj) picks the format",
    )
    parser.add_argument(
        "--print", action="store_true", dest="print_summary",
        help="print a summary: nodes, edges, degrees, connectivity, diameter",
    )
    return parser


def summary(graph: Graph, kind: str = "") -> str:
    """A few lines describing ``graph``."""
    degrees = graph.degrees() or [0]
    diameter = graph.diameter()
    lines = [
        f"type:      {kind}" if kind else None,
        f"nodes:     {graph.n}",
        f"edges:     {graph.num_edges()}",
        f"degree:    min {min(degrees)}, max {max(degrees)}, mean {sum(degrees) / len(degrees):.2f}",
        f"connected: {'yes' if graph.is_connected() else 'no'}",
        f"diameter:  {diameter if diameter is not None else 'infinite (disconnected)'}",
    ]
    return "\n".join(line for line in lines if line is not None)


def run_generate_graph(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Run generate-graph with parsed ``args``; return the exit status (0 ok, 1 error)."""
    out = out or sys.stdout
    if args.output is not None and Path(args.output).suffix.lower() not in SUFFIXES:
        print(
            f"error: output file {args.output!r}: suffix must be .edges or .adj, "
            f"got {Path(args.output).suffix or 'none'!r}",
            file=sys.stderr,
        )
        return 1
    try:
        graph = make_graph(
            args.type, args.nodes, degree=args.degree, p=args.p, k=args.k, seed=args.seed
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.output is not None:
        path = Path(args.output)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            graph.write(path)
        except OSError as e:
            print(f"error: cannot write {str(path)!r}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {path} ({graph.n} nodes, {graph.num_edges()} edges)", file=out)
    if args.print_summary or args.output is None:
        print(summary(graph, args.type), file=out)
    return 0


def generate_graph_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``generate_graph.py``; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = argparse.ArgumentParser(prog="generate_graph.py")
    add_generate_graph_arguments(parser)
    return run_generate_graph(parser.parse_args(argv))
