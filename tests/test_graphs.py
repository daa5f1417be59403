"""Graph layer: the Graph type, its file formats, generators, mixing weights, config and CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from dflsplit.config import ConfigError, load_config
from dflsplit.graphs import (
    GRAPH_TYPES,
    MIXING_WEIGHTS,
    Graph,
    GraphFormatError,
    graph_from_config,
    make_graph,
    metropolis_hastings_weights,
    spectral_gap,
    uniform_weights,
    weights_matrix,
)
from dflsplit.cli_graph import generate_graph_main

REPO = Path(__file__).resolve().parents[1]


def decentralizepy_read(path: Path, kind: str) -> list[set[int]]:
    """The parsing rules of decentralizepy's Graph.read_graph_from_file (edges | adjacency):
    int(first line), then every remaining line is parsed, none may be skipped."""
    with open(path) as f:
        n = int(f.readline().strip())
        adj: list[set[int]] = [set() for _ in range(n)]
        for node, line in enumerate(f.readlines()):
            if kind == "edges":
                x, y = map(int, line.strip().split())
                adj[x].add(y)
                adj[y].add(x)
            else:
                adj[node].update(map(int, line.strip().split()))
    return adj


# --- Graph --------------------------------------------------------------------------


def test_graph_basic_api():
    g = Graph(5, [(3, 1), (0, 1), (1, 0), (4, 2)])
    assert g.n == 5 and len(g.adj) == 5
    assert g.neighbors(1) == [0, 3]
    assert g.degree(1) == 2 and g.degree(2) == 1
    assert g.edges() == [(0, 1), (1, 3), (2, 4)]
    assert g.num_edges() == 3
    assert not g.is_connected()
    g.add_edge(3, 4)
    assert g.is_connected() and g.diameter() == 4
    assert g == Graph(5, [(0, 1), (1, 3), (3, 4), (2, 4)])
    assert g != Graph(5, [(0, 1)])
    assert Graph(1).is_connected() and Graph(1).diameter() == 0


@pytest.mark.parametrize("u, v", [(2, 2), (-1, 0), (0, 5), (1.5, 2)])
def test_add_edge_rejects_self_loops_and_bad_ids(u, v):
    with pytest.raises(ValueError):
        Graph(5).add_edge(u, v)


def test_networkx_round_trip_relabels():
    h = nx.Graph([("b", "c"), ("a", "b")])
    g = Graph.from_networkx(h)
    assert g.n == 3 and g.edges() == [(0, 1), (1, 2)]  # a, b, c -> 0, 1, 2
    grid = Graph.from_networkx(nx.grid_2d_graph(2, 3))
    assert grid.n == 6 and grid.neighbors(0) == [1, 3]  # row-major
    back = Graph.from_networkx(g.to_networkx())
    assert back == g
    isolated = Graph(4, [(0, 1)])
    assert isolated.to_networkx().number_of_nodes() == 4


# --- files ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".edges", ".adj"])
def test_file_round_trip(tmp_path, suffix):
    g = make_graph("small_world", 20, k=4, p=0.3, seed=5)
    g_isolated = Graph(6, [(0, 1), (1, 2), (2, 4)])  # nodes 3 and 5 isolated, 5 is last
    for i, graph in enumerate([g, g_isolated]):
        path = tmp_path / f"g{i}{suffix}"
        graph.write(path)
        assert Graph.read(path) == graph
        kind = "edges" if suffix == ".edges" else "adjacency"
        assert decentralizepy_read(path, kind) == graph.adj


def test_written_formats_are_exact(tmp_path):
    g = Graph(4, [(2, 0), (0, 1), (1, 2)])
    g.write_edges(tmp_path / "g.edges")
    g.write_adj(tmp_path / "g.adj")
    assert (tmp_path / "g.edges").read_text() == "4\n0 1\n0 2\n1 2\n"
    assert (tmp_path / "g.adj").read_text() == "4\n1 2\n0 2\n0 1\n\n"


def test_read_hand_written_edges(tmp_path):
    path = tmp_path / "hand.edges"
    # an edge in both directions, tab separators, CRLF line ends and trailing blank lines
    path.write_bytes(b"5\r\n0 1\r\n1 0\r\n1\t2\r\n3  4\r\n2 3\r\n\r\n\r\n")
    g = Graph.read(path)
    assert g.n == 5
    assert g.edges() == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert g.degrees() == [1, 2, 2, 2, 1]


def test_read_hand_written_adj(tmp_path):
    # decentralizepy's eval/graph.adj (no newline at the end)
    path = tmp_path / "hand.adj"
    path.write_text("6\n1\n0 3 4\n3 5\n1 2 5\n1\n2 3")
    g = Graph.read(path)
    assert g.edges() == [(0, 1), (1, 3), (1, 4), (2, 3), (2, 5), (3, 5)]
    # an asymmetric listing is symmetrised; an empty line is an isolated node
    path2 = tmp_path / "asym.adj"
    path2.write_text("4\n1 2\n\n\n\n\n")
    g2 = Graph.read_adj(path2)
    assert g2.neighbors(1) == [0] and g2.neighbors(2) == [0] and g2.degree(3) == 0


def test_read_unknown_suffix(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("2\n0 1\n")
    with pytest.raises(GraphFormatError, match=r"g\.txt.*\.edges or \.adj"):
        Graph.read(path)
    assert Graph.read_edges(path) == Graph(2, [(0, 1)])  # explicit reader ignores the suffix


@pytest.mark.parametrize(
    "name, text, line, expected",
    [
        ("empty.edges", "", 1, "number of nodes"),
        ("header.edges", "four\n0 1\n", 1, "number of nodes N"),
        ("header2.edges", "4 4\n0 1\n", 1, "only the number of nodes"),
        ("zero.adj", "0\n", 1, "N >= 1"),
        ("range.edges", "4\n0 1\n1 2\n2 4\n", 4, "node id 4 out of range"),
        ("negative.edges", "4\n0 1\n-1 2\n", 3, "out of range"),
        ("token.edges", "4\n0 1\n1 x\n", 3, "expected an integer node id, got 'x'"),
        ("three.edges", "4\n0 1 2\n", 2, "two node ids"),
        ("loop.edges", "4\n0 1\n2 2\n", 3, "self-loop"),
        ("range.adj", "3\n1\n0 7\n1\n", 3, "node id 7 out of range"),
        ("token.adj", "3\n1\n0 2.5\n1\n", 3, "got '2.5'"),
        ("few.adj", "4\n1\n0 2\n1\n", 5, "expected 4 adjacency lines"),
        ("many.adj", "2\n1\n0\n1\n", 4, "expected only 2 adjacency lines"),
        ("self.adj", "2\n0 1\n0\n", 2, "lists itself"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, line, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(GraphFormatError) as info:
        Graph.read(path)
    message = str(info.value)
    assert f"{name}:{line}:" in message
    assert expected in message
    assert info.value.line == line and info.value.path.endswith(name)


def test_example_files_in_repo():
    expect = {
        "ring_8.edges": (8, 2),
        "regular_16_4.edges": (16, 4),
        "regular_16_3.edges": (16, 3),
        "regular_64_3.edges": (64, 3),
        "full_5.edges": (5, 4),
    }
    for name, (n, d) in expect.items():
        g = Graph.read(REPO / "graphs" / name)
        assert g.n == n and set(g.degrees()) == {d} and g.is_connected(), name
    sw = Graph.read(REPO / "graphs" / "small_world_16.adj")
    assert sw.n == 16 and sw.num_edges() == 32 and sw.is_connected()
    assert Graph.read(REPO / "graphs" / "regular_16_4.edges") == make_graph("regular", 16, degree=4, seed=1)


# --- generators ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 8, 17, 64])
def test_ring_full_star(n):
    ring = make_graph("ring", n)
    assert ring.is_connected() and set(ring.degrees()) == {2} and ring.num_edges() == n
    full = make_graph("full", n)
    assert set(full.degrees()) == {n - 1}
    star = make_graph("star", n)
    assert star.degree(0) == n - 1 and set(star.degrees()[1:]) == {1} and star.is_connected()


@pytest.mark.parametrize("n, d", [(4, 2), (10, 2), (16, 3), (16, 4), (64, 3), (30, 5), (12, 7), (10, 9), (100, 6)])
def test_regular_is_connected_and_regular(n, d):
    g = make_graph("regular", n, degree=d, seed=3)
    assert g.n == n and set(g.degrees()) == {d} and g.is_connected()


def test_regular_is_deterministic_for_a_seed():
    a = make_graph("regular", 32, degree=4, seed=7)
    assert a == make_graph("regular", 32, degree=4, seed=7)
    assert a != make_graph("regular", 32, degree=4, seed=8)


@pytest.mark.parametrize(
    "n, d, reason",
    [(15, 3, "odd"), (8, 8, "at most n-1"), (6, 1, "disjoint edges"), (5, 0, "not connected"), (8, -1, "non-negative")],
)
def test_regular_impossible_parameters(n, d, reason):
    with pytest.raises(ValueError, match=reason):
        make_graph("regular", n, degree=d, seed=1)


@pytest.mark.parametrize("n, k, p", [(10, 2, 0.1), (12, 4, 0.0), (16, 4, 0.1), (50, 4, 0.5), (40, 6, 1.0)])
def test_small_world(n, k, p):
    g = make_graph("small_world", n, k=k, p=p, seed=2)
    assert g.is_connected() and g.num_edges() == n * k // 2
    assert g == make_graph("small_world", n, k=k, p=p, seed=2)
    if p == 0.0:
        assert set(g.degrees()) == {k}


def test_small_world_bad_k():
    for k in (3, 0, 10):
        with pytest.raises(ValueError, match="even integer"):
            make_graph("small_world", 10, k=k, p=0.1)


@pytest.mark.parametrize("n, p", [(10, 0.5), (30, 0.3), (100, 0.1)])
def test_erdos_renyi_connected(n, p):
    g = make_graph("erdos_renyi", n, p=p, seed=4)
    assert g.n == n and g.is_connected()
    assert g == make_graph("erdos_renyi", n, p=p, seed=4)


def test_erdos_renyi_too_sparse():
    with pytest.raises(ValueError, match="no connected G"):
        make_graph("erdos_renyi", 200, p=0.001, seed=1)


@pytest.mark.parametrize("n, shape", [(9, (3, 3)), (12, (3, 4)), (16, (4, 4)), (30, (5, 6)), (64, (8, 8))])
def test_torus(n, shape):
    g = make_graph("torus", n)
    rows, cols = shape
    assert set(g.degrees()) == {4} and g.is_connected()
    assert g.diameter() == rows // 2 + cols // 2
    assert g.neighbors(0) == sorted({1, cols - 1, cols, (rows - 1) * cols})


@pytest.mark.parametrize("n", [4, 8, 14, 17])
def test_torus_impossible(n):
    with pytest.raises(ValueError, match="torus needs rows and columns >= 3"):
        make_graph("torus", n)


@pytest.mark.parametrize("n, degree", [(2, 1), (8, 5), (16, 7), (12, 6), (17, 8)])
def test_exponential(n, degree):
    g = make_graph("exponential", n)
    assert set(g.degrees()) == {degree} and g.is_connected()
    hops = [2**j for j in range(n.bit_length()) if 2**j < n]
    assert g.neighbors(0) == sorted({h % n for h in hops} | {-h % n for h in hops})


def test_make_graph_unknown_type_and_bad_n():
    with pytest.raises(ValueError, match="known: .*regular.*ring") as info:
        make_graph("rign", 8)
    assert "did you mean 'ring'" in str(info.value)
    with pytest.raises(ValueError, match=">= 1"):
        make_graph("ring", 0)
    assert set(GRAPH_TYPES.names()) >= {
        "ring", "regular", "full", "star", "small_world", "erdos_renyi", "torus", "exponential"
    }


# --- mixing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "graph",
    [
        make_graph("star", 7),
        make_graph("small_world", 20, k=4, p=0.5, seed=1),
        make_graph("regular", 16, degree=3, seed=1),
        Graph(4, [(0, 1)]),
    ],
    ids=["star", "small_world", "regular", "isolated"],
)
def test_metropolis_hastings_weights(graph):
    w = metropolis_hastings_weights(graph)
    m = weights_matrix(w)
    assert (m >= 0).all()
    assert abs(m.sum(axis=1) - 1).max() < 1e-12
    assert abs(m - m.T).max() < 1e-12
    for i in range(graph.n):
        assert set(w[i]) == set(graph.adj[i]) | {i}
        for j in graph.adj[i]:
            assert w[i][j] == pytest.approx(1 / (1 + max(graph.degree(i), graph.degree(j))))
    if graph.is_connected():
        assert spectral_gap(w) > 0
    assert MIXING_WEIGHTS.get("metropolis_hastings")(graph) == w


def test_metropolis_hastings_on_a_path():
    w = metropolis_hastings_weights(Graph(3, [(0, 1), (1, 2)]))
    assert w[0] == pytest.approx({0: 2 / 3, 1: 1 / 3})
    assert w[1] == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})


def test_uniform_weights():
    g = make_graph("star", 5)
    w = uniform_weights(g)
    assert w[0] == pytest.approx({i: 0.2 for i in range(5)})
    assert w[3] == pytest.approx({0: 0.5, 3: 0.5})
    m = weights_matrix(w)
    assert abs(m.sum(axis=1) - 1).max() < 1e-12 and (m >= 0).all()
    assert MIXING_WEIGHTS.get("uniform")(g) == w


# --- config ----------------------------------------------------------------------------------


def write_config(tmp_path: Path, graph_section: str, procs: int = 8) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"run:\n  procs_per_machine: {procs}\n  seed: 3\ngraph:\n{graph_section}")
    return path


def test_graph_from_config_file_beside_config(tmp_path, monkeypatch):
    make_graph("regular", 8, degree=3, seed=9).write(tmp_path / "topo.adj")
    cfg = load_config(write_config(tmp_path, "  file: topo.adj\n"))
    monkeypatch.chdir(REPO)  # the relative path resolves beside the config, not the cwd
    assert graph_from_config(cfg) == make_graph("regular", 8, degree=3, seed=9)


def test_graph_from_config_file_wrong_n(tmp_path):
    make_graph("ring", 6).write(tmp_path / "ring6.edges")
    cfg = load_config(write_config(tmp_path, "  file: ring6.edges\n"))
    with pytest.raises(ConfigError, match=r"ring6\.edges.*N=6.*8 nodes"):
        graph_from_config(cfg)


def test_graph_from_config_missing_or_malformed_file(tmp_path):
    cfg = load_config(write_config(tmp_path, "  file: nowhere.edges\n"))
    with pytest.raises(ConfigError, match=r"exp\.yaml.*'file'.*nowhere\.edges.*not found"):
        graph_from_config(cfg)
    (tmp_path / "bad.edges").write_text("8\n0 1\n1 9\n")
    cfg = load_config(write_config(tmp_path, "  file: bad.edges\n"))
    with pytest.raises(GraphFormatError, match=r"bad\.edges:3:"):
        graph_from_config(cfg)


def test_graph_from_config_generator(tmp_path):
    cfg = load_config(write_config(tmp_path, "  type: small_world\n  k: 2\n  p: 0.2\n", procs=12))
    assert graph_from_config(cfg) == make_graph("small_world", 12, k=2, p=0.2, seed=3)  # run.seed
    cfg = load_config(write_config(tmp_path, "  type: regular\n  degree: 3\n  seed: 11\n", procs=12))
    g = graph_from_config(cfg)
    assert g == make_graph("regular", 12, degree=3, seed=11) and set(g.degrees()) == {3}


def test_graph_from_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml.*'type'.*known: .*regular"):
        load_config(write_config(tmp_path, "  type: hypercube\n"))  # an unknown type fails at load
    cfg = load_config(write_config(tmp_path, "  type: regular\n  degree: 3\n", procs=7))
    with pytest.raises(ConfigError, match=r"exp\.yaml.*odd"):
        graph_from_config(cfg)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_help_and_write_via_subprocess(tmp_path):
    script = str(REPO / "generate_graph.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0
    assert "--degree" in done.stdout and "small_world" in done.stdout and ".adj" in done.stdout
    out = tmp_path / "sub" / "r.adj"
    done = subprocess.run(
        [sys.executable, script, "--type", "regular", "-n", "10", "--degree", "3", "--seed", "2",
         "-o", str(out), "--print"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "connected: yes" in done.stdout and "diameter:" in done.stdout
    g = Graph.read(out)
    assert g == make_graph("regular", 10, degree=3, seed=2)
    assert decentralizepy_read(out, "adjacency") == g.adj


def test_cli_in_process(tmp_path, capsys):
    out = tmp_path / "t.edges"
    assert generate_graph_main(["--type", "torus", "-n", "12", "-o", str(out)]) == 0
    assert Graph.read(out) == make_graph("torus", 12)
    assert generate_graph_main(["--type", "exponential", "-n", "8"]) == 0
    printed = capsys.readouterr().out
    assert "nodes:     8" in printed and "edges:     20" in printed and "min 5, max 5" in printed
    assert generate_graph_main(["--type", "regular", "-n", "7", "--degree", "3"]) == 1
    assert "odd" in capsys.readouterr().err
    assert generate_graph_main(["-n", "8", "-o", str(tmp_path / "g.txt")]) == 1
    assert ".edges or .adj" in capsys.readouterr().err
    assert not (tmp_path / "g.txt").exists()
    with pytest.raises(SystemExit):
        generate_graph_main(["--type", "nope", "-n", "8"])
