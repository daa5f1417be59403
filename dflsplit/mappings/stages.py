"""Split-learning stage configurations: load, validate, and turn into edges.

A stage configuration (the format of Deeplopito) is a list with one row per client;
row i (client i, **1-based**) lists, in order, the tasks client i runs. Task ``'o_s'`` is
stage s of owner o's pipeline. With P partitions there are 2P stages: stage s <= P is
the forward of partition s, stage s > P the backward of partition 2P+1-s, so forward s
pairs with backward 2P+1-s. The pattern repeats for every (micro-)batch.

The rules a valid configuration satisfies (``RULES``), each reported with the row, the
task and the rule's number and text:

1. labels are owner_stage, owners in 1..N, stages in 1..2P;
2. every (owner, stage) appears exactly once;
3. a forward stage and its backward pair run on the same client;
4. an owner runs its own first and last partition (stages 1, P, P+1, 2P);
5. 2P matches the model's partition count;
6. the row orders and the data dependencies together cannot deadlock.

Rule 6 is checked on a directed graph whose nodes are tasks and whose edges are the
data dependencies (o, s-1) -> (o, s) plus, with ``strict_order=True``, the order of
consecutive tasks in each row. A cycle is a deadlock of clients that run their rows
strictly in order. A runtime that runs any task whose input has arrived (row order only
as a priority) never deadlocks, because data dependencies alone are chains; validation
is strict by default so that a configuration is safe for both. Batches do not add
cycles: every edge between two batches goes from the earlier to the later one.

``StageMapping`` speaks 1-based client ids, as the format does; the rest of dflsplit
uses 0-based node uids: convert with ``client_to_uid`` / ``uid_to_client``.

>>> m = StageMapping([["1_1", "1_2", "1_3", "1_4"], ["2_1", "2_2", "2_3", "2_4"]])
>>> m.P, m.runners, m.peer_graph()
(2, {1: [1, 1], 2: [2, 2]}, [])
"""

from __future__ import annotations

import ast
import collections
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import networkx as nx
import yaml

RULES: dict[int, str] = {
    1: "labels are owner_stage, owners in 1..N, stages in 1..2P",
    2: "every (owner, stage) appears exactly once",
    3: "a forward stage and its backward pair run on the same client",
    4: "an owner runs its own first and last partition (stages 1, P, P+1, 2P)",
    5: "2P matches the model's partition count",
    6: "the row orders and the data dependencies together cannot deadlock",
}

#: Variable names that hold a stage configuration in Python and .env files.
STAGE_VARIABLES = ("STAGES_CLIENTS", "SIMULATION_STAGES_CLIENTS")

_LABEL = re.compile(r"^\s*(\d+)_(\d+)\s*$")

Task = tuple[int, int]
Rows = list[list[str]]


def client_to_uid(client: int) -> int:
    """The 0-based node uid of 1-based client ``client``."""
    return client - 1


def uid_to_client(uid: int) -> int:
    """The 1-based client id of 0-based node uid ``uid``."""
    return uid + 1


def task_label(owner: int, stage: int) -> str:
    """``'o_s'`` for (owner, stage)."""
    return f"{owner}_{stage}"


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (``row``, 1-based, or ``where`` when not in a row), which task, why."""

    rule: int
    row: Optional[int]
    task: str
    detail: str
    where: Optional[str] = None
    cycle: tuple[tuple[str, int], ...] = field(default=())

    def __str__(self) -> str:
        loc = self.where if self.row is None else f"row {self.row}"
        return f"{loc}, task {self.task!r}: rule {self.rule}: {RULES[self.rule]}; {self.detail}"


class StageConfigError(ValueError):
    """An invalid or unreadable stage configuration.

    ``errors`` holds every rule violation found (a list of ``Violation``); it is empty for
    problems that are not rule violations (an unreadable file, an index out of range).
    """

    def __init__(self, message: str, errors: Sequence[Violation] = ()):
        self.errors: list[Violation] = list(errors)
        super().__init__(message)

    @classmethod
    def from_violations(cls, errors: Sequence[Violation], source: Optional[str] = None) -> "StageConfigError":
        where = f"{source}: " if source else ""
        n = len(errors)
        head = f"{where}invalid stage configuration ({n} violation{'s' if n != 1 else ''}):"
        return cls("\n".join([head] + [f"  {e}" for e in errors]), errors)


def parse_task(label: Any) -> Task:
    """``'o_s'`` -> (owner, stage) with positive integers; otherwise StageConfigError (rule 1)."""
    if isinstance(label, str):
        m = _LABEL.match(label)
        if m:
            owner, stage = int(m.group(1)), int(m.group(2))
            if owner >= 1 and stage >= 1:
                return owner, stage
    raise StageConfigError(f"task {label!r}: rule 1: {RULES[1]}; {_label_hint(label)}")


def _label_hint(label: Any) -> str:
    hint = "expected a string 'owner_stage' of positive integers, e.g. '3_2'"
    if isinstance(label, int) and not isinstance(label, bool):
        hint += (f"; got the number {label} (in YAML, quote the labels: unquoted 1_1 "
                 "is read as the number 11)")
    return hint


# --------------------------------------------------------------------------- validation


def _check_rows(rows: Any, source: Optional[str]) -> None:
    where = f"{source}: " if source else ""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise StageConfigError(
            f"{where}a stage configuration is a non-empty list of rows (one list of task "
            f"labels per client), got {rows!r}")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, (list, tuple)):
            raise StageConfigError(
                f"{where}row {i}: expected a list of task labels such as ['1_1', '1_2'], got {row!r}")


def _infer_stages(parsed: list[list[Optional[Task]]], n: int) -> int:
    """2P as the most common highest stage among owners 1..N (ties: the larger)."""
    top: dict[int, int] = {}
    for row in parsed:
        for t in row:
            if t is not None and t[0] <= n:
                top[t[0]] = max(top.get(t[0], 0), t[1])
    if not top:
        return 0
    counts = collections.Counter(top.values())
    return max(counts, key=lambda s: (counts[s], s))


def find_violations(
    rows: Sequence[Sequence[Any]],
    partitions: Optional[int] = None,
    pairing: Optional[dict] = None,
    strict_order: bool = True,
) -> list[Violation]:
    """Every rule violation of ``rows`` (empty list: valid). See ``validate``."""
    _check_rows(rows, None)
    n = len(rows)
    errors: list[Violation] = []
    parsed: list[list[Optional[Task]]] = []
    for row in rows:
        out = []
        for label in row:
            try:
                out.append(parse_task(label))
            except StageConfigError:
                out.append(None)
        parsed.append(out)

    two_p = _infer_stages(parsed, n)

    # Rule 1: format and ranges.
    valid: list[list[Optional[Task]]] = []
    for r, (row, prow) in enumerate(zip(rows, parsed), 1):
        keep = []
        for label, t in zip(row, prow):
            if t is None:
                errors.append(Violation(1, r, str(label), _label_hint(label)))
            elif t[0] > n:
                miss = " (is a row missing?)" if t[0] == n + 1 else ""
                errors.append(Violation(1, r, label, f"owner {t[0]} is not in 1..{n}: the "
                                        f"configuration has {n} rows{miss}"))
                t = None
            elif two_p and t[1] > two_p:
                errors.append(Violation(1, r, label, f"stage {t[1]} is not in 1..{two_p} "
                                        f"(the configuration has {two_p} stages)"))
                t = None
            keep.append(t)
        valid.append(keep)
    if two_p == 0:
        return errors or [Violation(1, 1, "", "no row holds a task")]

    # Rule 5: stage count (even, and 2 x the model's partitions).
    top_row, top_label = next(
        (r, rows[r - 1][i]) for r, prow in enumerate(valid, 1) for i, t in enumerate(prow)
        if t is not None and t[1] == two_p)
    if two_p % 2:
        errors.append(Violation(5, top_row, top_label, f"the configuration has {two_p} stages, an "
                                "odd number; P partitions make 2P stages"))
        return _sorted(errors)
    if partitions is not None and 2 * partitions != two_p:
        errors.append(Violation(5, top_row, top_label, f"the configuration has {two_p} stages "
                                f"(P={two_p // 2}) but the model has {partitions} partitions "
                                f"({2 * partitions} stages expected)"))
    p = two_p // 2

    # Rule 2: each task exactly once.
    rows_of: dict[Task, list[int]] = {}
    for r, prow in enumerate(valid, 1):
        for t in prow:
            if t is not None:
                rows_of.setdefault(t, []).append(r)
    for t, rs in rows_of.items():
        if len(rs) > 1:
            listed = ", ".join(map(str, rs))
            for r in dict.fromkeys(rs):
                errors.append(Violation(2, r, task_label(*t), f"task {task_label(*t)} appears "
                                        f"{len(rs)} times (rows {listed})"))
    # Rules 3 and 4 look only at tasks that appear once.
    where = {t: rs[0] for t, rs in rows_of.items() if len(rs) == 1}
    missing = False
    for o in range(1, n + 1):
        for s in range(1, two_p + 1):
            if (o, s) not in rows_of:
                missing = True
                pair = (o, two_p + 1 - s)
                if pair in where:
                    r, why = where[pair], f"expected in row {where[pair]}, beside its pair {task_label(*pair)}"
                else:
                    r, why = o, f"nor is its pair {task_label(*pair)}; reported at owner {o}'s row"
                errors.append(Violation(2, r, task_label(o, s), f"task {task_label(o, s)} is in no "
                                        f"row ({why})"))

    # Rule 3: forward and backward of a partition on one client.
    for o in range(1, n + 1):
        for s in range(1, p + 1):
            f, b = (o, s), (o, two_p + 1 - s)
            if f in where and b in where and where[f] != where[b]:
                errors.append(Violation(3, where[b], task_label(*b), f"backward {task_label(*b)} of "
                                        f"partition {s} runs on client {where[b]} but its forward "
                                        f"{task_label(*f)} on client {where[f]}"))
    if pairing is not None:
        errors.extend(_pairing_violations(pairing, p))

    # Rule 4: the owner runs its first and last partition.
    for o in range(1, n + 1):
        for s in sorted({1, p, p + 1, two_p}):
            if (o, s) in where and where[(o, s)] != o:
                what = "forward" if s <= p else "backward"
                part = s if s <= p else two_p + 1 - s
                errors.append(Violation(4, where[(o, s)], task_label(o, s), f"{what} of partition "
                                        f"{part} runs on client {where[(o, s)]}, expected the owner, "
                                        f"client {o}"))

    # Rule 6: no deadlock (only meaningful when every task is present once).
    if not missing and not any(e.rule in (1, 2) for e in errors):
        errors.extend(_deadlocks(valid, n, two_p, strict_order))
    return _sorted(errors)


def _sorted(errors: list[Violation]) -> list[Violation]:
    return sorted(errors, key=lambda e: (e.rule, e.row if e.row is not None else 0))


def _pairing_violations(pairing: dict, p: int) -> list[Violation]:
    out = []
    for k, v in pairing.items():
        try:
            a, b = int(k), int(v)
        except (TypeError, ValueError):
            out.append(Violation(3, None, f"{k}->{v}", "pairing entries are stage numbers, e.g. "
                                 f"{{'1': '{2 * p}'}}", where="pairing"))
            continue
        fwd, bwd = min(a, b), max(a, b)
        if not 1 <= fwd <= p or bwd != 2 * p + 1 - fwd:
            expect = 2 * p + 1 - a if 1 <= a <= 2 * p else None
            exp = f"stage {a} pairs with {expect}" if expect else f"stage {a} is not in 1..{2 * p}"
            out.append(Violation(3, None, f"{k}->{v}", f"with P={p}, forward s pairs with backward "
                                 f"2P+1-s: {exp}, not {b}", where="pairing"))
    return out


def _deadlocks(valid: list[list[Optional[Task]]], n: int, two_p: int, strict: bool) -> list[Violation]:
    g = nx.DiGraph()
    row_of = {}
    for r, prow in enumerate(valid, 1):
        for t in prow:
            row_of[t] = r
            g.add_node(t)
        if strict:
            nx.add_path(g, prow)
    for o in range(1, n + 1):
        nx.add_path(g, [(o, s) for s in range(1, two_p + 1)])
    out = []
    for comp in nx.strongly_connected_components(g):
        if len(comp) < 2:
            continue
        cyc = [u for u, _ in nx.find_cycle(g.subgraph(comp))]
        first = min(cyc, key=lambda t: (row_of[t], t))
        i = cyc.index(first)
        cyc = cyc[i:] + cyc[:i]
        chain = " -> ".join(f"{task_label(*t)} (row {row_of[t]})" for t in cyc + [cyc[0]])
        out.append(Violation(6, row_of[first], task_label(*first),
                             f"clients running their rows in order wait on each other in a cycle "
                             f"(a -> b: a must finish before b): {chain}",
                             cycle=tuple((task_label(*t), row_of[t]) for t in cyc)))
    return out


def validate(
    rows: Sequence[Sequence[Any]],
    partitions: Optional[int] = None,
    pairing: Optional[dict] = None,
    strict_order: bool = True,
    source: Optional[str] = None,
) -> None:
    """Raise StageConfigError listing every violation of the six rules; return None when valid.

    ``partitions``: the model's P (rule 5), inferred from the configuration when None.
    ``pairing``: an explicit forward -> backward stage map (``{"1": "8", ...}``) checked
    against the derived pairing 2P+1-s. ``strict_order``: see the module docstring.
    ``source`` (a file name) prefixes the message.
    """
    _check_rows(rows, source)
    errors = find_violations(rows, partitions, pairing, strict_order)
    if errors:
        raise StageConfigError.from_violations(errors, source)


# --------------------------------------------------------------------------- the mapping


class StageMapping:
    """A validated stage configuration and what it implies: runners, edges, replicas.

    Client ids are 1-based, as in the stage format (``client_to_uid`` gives node uids).
    Raises StageConfigError listing every violation when ``rows`` is invalid.

    >>> m = StageMapping([["1_1", "2_2", "1_3", "1_4", "2_5", "1_6"],
    ...                   ["2_1", "1_2", "2_3", "2_4", "1_5", "2_6"]])
    >>> m.runners
    {1: [1, 2, 1], 2: [2, 1, 2]}
    >>> m.activation_edges()
    {(1, 2): [(1, 1), (2, 2)], (2, 1): [(1, 2), (2, 1)]}
    >>> m.peer_graph(), m.hosted(1)
    ([(1, 2)], [(1, 1), (1, 3), (2, 2)])
    """

    def __init__(
        self,
        rows: Sequence[Sequence[Any]],
        partitions: Optional[int] = None,
        pairing: Optional[dict] = None,
        strict_order: bool = True,
        source: Optional[str] = None,
    ):
        validate(rows, partitions, pairing, strict_order, source)
        self.source = source
        self.rows: list[list[Task]] = [[parse_task(x) for x in row] for row in rows]
        self.num_clients: int = len(self.rows)
        self.num_stages: int = max(s for row in self.rows for _, s in row)
        self.P: int = self.num_stages // 2
        self._client = {t: c for c, row in enumerate(self.rows, 1) for t in row}
        self.runners: dict[int, list[int]] = {
            o: [self._client[(o, p)] for p in range(1, self.P + 1)]
            for o in range(1, self.num_clients + 1)
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike, index: int = 0, partitions: Optional[int] = None,
                  pairing: Optional[dict] = None, strict_order: bool = True) -> "StageMapping":
        """Load configuration ``index`` of ``path`` (see ``load_stages``) and validate it."""
        rows, where = _select(_configs_in_file(Path(path)), Path(path), index)
        return cls(rows, partitions, pairing, strict_order, source=where)

    # stages
    def is_forward(self, stage: int) -> bool:
        """Stage s <= P is a forward."""
        self._check_stage(stage)
        return stage <= self.P

    def partition_of(self, stage: int) -> int:
        """The partition a stage runs: s for a forward, 2P+1-s for a backward."""
        self._check_stage(stage)
        return stage if stage <= self.P else self.num_stages + 1 - stage

    def pair(self, stage: int) -> int:
        """The stage paired with ``stage`` (forward <-> backward): 2P+1-s."""
        self._check_stage(stage)
        return self.num_stages + 1 - stage

    def _check_stage(self, stage: int) -> None:
        if not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage {stage} is not in 1..{self.num_stages}")

    def _check_client(self, client: int) -> None:
        if not 1 <= client <= self.num_clients:
            raise ValueError(f"client {client} is not in 1..{self.num_clients} (clients are 1-based)")

    # who runs what
    def runner(self, owner: int, partition: int) -> int:
        """The client that runs partition ``partition`` (1..P) of ``owner``'s pipeline."""
        self._check_client(owner)
        if not 1 <= partition <= self.P:
            raise ValueError(f"partition {partition} is not in 1..{self.P}")
        return self.runners[owner][partition - 1]

    def client_of(self, owner: int, stage: int) -> int:
        """The client whose row holds task (owner, stage)."""
        self._check_client(owner)
        self._check_stage(stage)
        return self._client[(owner, stage)]

    def tasks(self, client: int) -> list[Task]:
        """Client ``client``'s tasks as (owner, stage), in row order."""
        self._check_client(client)
        return list(self.rows[client - 1])

    def hosted(self, client: int) -> list[tuple[int, int]]:
        """(owner, partition) replicas hosted by ``client``, sorted."""
        self._check_client(client)
        return sorted((o, p) for o, ps in self.runners.items() for p, c in enumerate(ps, 1) if c == client)

    def replicas(self, partition: int) -> dict[int, int]:
        """owner -> client that hosts owner's replica of ``partition``."""
        return {o: self.runner(o, partition) for o in self.runners}

    # edges
    def activation_edges(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """(src, dst) -> [(owner, partition)] whose output crosses from src to dst.

        The output of partition p of owner o goes from runner(o, p) to runner(o, p+1) when
        they differ. The last partition runs on the owner (rule 4), so the loss is local.
        """
        edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for o, ps in self.runners.items():
            for p in range(1, self.P):
                src, dst = ps[p - 1], ps[p]
                if src != dst:
                    edges.setdefault((src, dst), []).append((o, p))
        return {k: sorted(v) for k, v in sorted(edges.items())}

    def gradient_edges(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """The activation edges reversed: (dst, src) -> [(owner, p)], the gradient with
        respect to partition p's output travelling back from runner(o, p+1) to runner(o, p)."""
        return dict(sorted(((d, s), v) for (s, d), v in self.activation_edges().items()))

    def peer_graph(self) -> list[tuple[int, int]]:
        """Undirected client edges (u, v), u < v, sorted: pairs that exchange tensors."""
        return sorted({(min(s, d), max(s, d)) for s, d in self.activation_edges()})

    def neighbors(self, client: int) -> list[int]:
        """Clients ``client`` exchanges activations or gradients with, sorted."""
        self._check_client(client)
        return sorted({v for u, v in self.peer_graph() if u == client}
                      | {u for u, v in self.peer_graph() if v == client})

    def to_networkx(self) -> nx.Graph:
        """The peer graph as an undirected networkx graph on clients 1..N."""
        g = nx.Graph()
        g.add_nodes_from(range(1, self.num_clients + 1))
        g.add_edges_from(self.peer_graph())
        return g

    # reports
    def summary(self) -> str:
        """A human-readable report: sizes, runner matrix, edges, hosted replicas."""
        w = len(str(self.num_clients))
        lines = [f"stage configuration{f' {self.source}' if self.source else ''}: "
                 f"{self.num_clients} clients, {self.P} partitions ({self.num_stages} stages)",
                 f"runners (client of partition 1..{self.P}, per owner):"]
        for o, ps in self.runners.items():
            lines.append(f"  owner {o:>{w}}: " + " ".join(f"{c:>{w}}" for c in ps))
        for name, edges in (("activation", self.activation_edges()), ("gradient", self.gradient_edges())):
            lines.append(f"{name} edges (src -> dst: owner/partition):" + ("" if edges else " none"))
            for (s, d), items in edges.items():
                lines.append(f"  {s:>{w}} -> {d:>{w}}: " + " ".join(f"{o}/{p}" for o, p in items))
        peers = self.peer_graph()
        lines.append("peer graph: " + (" ".join(f"{u}-{v}" for u, v in peers) if peers else "no edges"))
        lines.append("replicas hosted (owner/partition):")
        for c in range(1, self.num_clients + 1):
            lines.append(f"  client {c:>{w}}: " + " ".join(f"{o}/{p}" for o, p in self.hosted(c)))
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz source: clients as nodes, activation edges solid and gradient edges
        dashed, each labelled with the (owner,partition) outputs it carries."""
        out = ["digraph stages {", "  rankdir=LR;", "  node [shape=box];"]
        for c in range(1, self.num_clients + 1):
            hosted = " ".join(f"({o},{p})" for o, p in self.hosted(c))
            out.append(f'  c{c} [label="client {c}\\n{hosted}"];')
        for style, edges in (("solid", self.activation_edges()), ("dashed", self.gradient_edges())):
            for (s, d), items in edges.items():
                label = " ".join(f"({o},{p})" for o, p in items)
                out.append(f'  c{s} -> c{d} [style={style}, label="{label}"];')
        out.append("}")
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        return f"StageMapping(num_clients={self.num_clients}, P={self.P})"


# --------------------------------------------------------------------------- loaders


def _literal(text: str, where: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise StageConfigError(f"{where}: not a Python/JSON literal ({e.__class__.__name__}: {e}); "
                               "expected a list of rows like [['1_1', '1_2'], ['2_1', '2_2']]") from None


def _python_configs(path: Path) -> list[tuple[str, Any]]:
    """Literal values assigned to a stage variable in a Python file, never executing it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise StageConfigError(f"{path}:{e.lineno}: not valid Python: {e.msg}") from None
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if any(n in STAGE_VARIABLES for n in names):
            where = f"{path}:{node.lineno}"
            try:
                found.append((node.lineno, where, ast.literal_eval(value)))
            except ValueError:
                raise StageConfigError(
                    f"{where}: {names[0]} is not a literal list (the file is read, never run, so "
                    "only literal lists of task labels are accepted)") from None
    return [(w, v) for _, w, v in sorted(found, key=lambda x: x[0])]


def read_env(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """(key, raw value, line) for every ``KEY=value`` line of a .env file, in order.

    Blank lines and lines starting with ``#`` are skipped; ``export`` is allowed; matching
    outer quotes are removed; a value that opens ``[`` continues on the next lines until
    its brackets balance.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise StageConfigError(f"{path}: cannot read: {e.strerror}") from None
    out = []
    i = 0
    while i < len(lines):
        line, start = lines[i].strip(), i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        if "=" not in line:
            raise StageConfigError(f"{path}:{start}: expected KEY=value, got {line!r}")
        key, value = (x.strip() for x in line.split("=", 1))
        if value.startswith("["):
            while value.count("[") > value.count("]") and i < len(lines):
                value += " " + lines[i].strip()
                i += 1
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out.append((key, value, start))
    return out


def _env_literal(value: str, where: str) -> Any:
    if "#" in value:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = value[: value.rindex("#")].rstrip()
    v = _literal(value, where)
    return _literal(v, where) if isinstance(v, str) else v


def _env_configs(path: Path) -> list[tuple[str, Any]]:
    return [(f"{path}:{line}", _env_literal(value, f"{path}:{line}: {key}"))
            for key, value, line in read_env(path) if key in STAGE_VARIABLES]


def _yaml_configs(path: Path) -> list[tuple[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StageConfigError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, list):
        return [(str(path), data)]
    if isinstance(data, dict):  # a dflsplit config: its split section (the rest is not this layer's)
        split = data.get("split") if isinstance(data.get("split"), dict) else {}
        if split.get("stages") is not None:
            return [(f"{path}: split.stages", split["stages"])]
        if isinstance(split.get("stages_file"), str):
            inner = Path(os.path.expanduser(split["stages_file"]))
            inner = inner if inner.is_absolute() else path.parent / inner
            index = split.get("stages_index", 0)
            if not isinstance(index, int) or inner.resolve() == path.resolve():
                raise StageConfigError(f"{path}: section 'split': key 'stages_index' must be an integer and "
                                       f"'stages_file' another file")
            return [_select(_configs_in_file(inner), inner, index)[::-1]]
        raise StageConfigError(f"{path}: a config without 'split.stages' or 'split.stages_file'; a stage "
                               f"configuration file holds a list of rows or a config with split.stages")
    raise StageConfigError(f"{path}: expected a list of rows or a dflsplit config with split.stages")


def _configs_in_file(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise StageConfigError(f"{path}: stage configuration file not found")
    suffix = path.suffix.lower()
    if suffix == ".py":
        found = _python_configs(path)
    elif suffix in (".yaml", ".yml", ".json"):
        found = _yaml_configs(path)
    else:
        found = _env_configs(path)
    if not found:
        raise StageConfigError(f"{path}: no stage configuration found (expected an assignment "
                               f"{' or '.join(STAGE_VARIABLES)} = [[...], ...])")
    for where, rows in found:
        _check_rows(rows, where)
    return found


def _select(found: list[tuple[str, Any]], path: Path, index: int) -> tuple[Rows, str]:
    if not -len(found) <= index < len(found):
        raise StageConfigError(
            f"{path}: stage configuration index {index} is out of range: the file holds "
            f"{len(found)} ({', '.join(w for w, _ in found)}); valid indices are "
            f"0..{len(found) - 1}")
    where, rows = found[index]
    return [list(r) for r in rows], where


def list_stage_configs(path: str | os.PathLike) -> list[Rows]:
    """Every stage configuration in a file, in file order.

    ``.py``: literal values of ``STAGES_CLIENTS = [...]`` assignments (read with ``ast``;
    the file is never executed). ``.yaml``/``.yml``/``.json``: a list of rows, or a
    dflsplit config's ``split.stages`` (or ``split.stages_file``). Anything else is read
    as a ``.env`` file: each uncommented ``STAGES_CLIENTS=[...]`` line is one (Deeplopito
    itself, through python-dotenv, uses the last one). ``SIMULATION_STAGES_CLIENTS``
    is accepted as a name too.
    """
    return [[list(r) for r in rows] for _, rows in _configs_in_file(Path(path))]


def stage_config_locations(path: str | os.PathLike) -> list[str]:
    """``file:line`` of each configuration ``list_stage_configs`` returns."""
    return [w for w, _ in _configs_in_file(Path(path))]


def load_stages(source: Any, index: int = 0) -> Rows:
    """Stage rows from a list of rows (e.g. a YAML config's ``split.stages``) or a file path.

    For a file holding several configurations, ``index`` chooses one (0-based; negative
    counts from the end). Rows are returned as lists of labels, not yet validated.
    """
    if isinstance(source, (str, os.PathLike)):
        return _select(_configs_in_file(Path(source)), Path(source), index)[0]
    _check_rows(source, None)
    return [list(r) for r in source]


def device_server_rows(num_clients: int, server: int, partitions: int, split: int) -> Rows:
    """The stage configuration of PiPar's device/server layout (clients 1-based).

    Every client but `server` is a device that runs partitions 1..`split` and the last one
    P of its own pipeline (the loss, so its labels never leave it); `server` runs
    partitions ``split+1 .. P-1`` of every device's pipeline, and its own pipeline whole
    (it trains only if it holds data). ``split = -1`` (or ``split >= P-1``): every device
    runs its whole model, federated training. Each row lists its tasks by stage, then
    owner, which no row order and data dependency can deadlock (rule 6, strict).

    >>> rows = device_server_rows(3, 3, 3, 1)
    >>> rows[0], rows[2]
    (['1_1', '1_3', '1_4', '1_6'], ['3_1', '1_2', '2_2', '3_2', '3_3', '3_4', '1_5', '2_5', '3_5', '3_6'])
    """
    P = partitions
    if not 1 <= server <= num_clients:
        raise StageConfigError(f"device/server layout: server client {server} is not in 1..{num_clients}")
    if P < 1 or not (split == -1 or 1 <= split):
        raise StageConfigError(f"device/server layout: split must be -1 or 1..{max(1, P - 2)}, got {split} "
                               f"(P={P})")
    local = split == -1 or split >= P - 1
    rows: list[list[Task]] = [[] for _ in range(num_clients)]
    for o in range(1, num_clients + 1):
        for stage in range(1, 2 * P + 1):
            p = stage if stage <= P else 2 * P + 1 - stage
            on_server = o != server and not local and split < p < P
            rows[(server if on_server else o) - 1].append((o, stage))
    return [[task_label(o, st) for o, st in sorted(row, key=lambda t: (t[1], t[0]))] for row in rows]


def stages_from_config(cfg: Any, partitions: Optional[int] = None) -> tuple[Rows, str]:
    """(rows, where) from a ``dflsplit.config.Config``: ``split.stages``, configuration
    ``split.stages_index`` of ``split.stages_file`` (relative to the config file), or, with
    ``split.server`` set, the device/server layout of ``split.split`` for a model of
    `partitions` partitions (``device_server_rows``)."""
    src = cfg.path or "<config>"
    sp = cfg.split
    if sp.server is not None:
        if sp.stages is not None or sp.stages_file is not None:
            raise StageConfigError(f"{src}: section 'split': 'server' generates the stage configuration; unset "
                                   f"'stages' and 'stages_file'")
        if partitions is None:
            raise StageConfigError(f"{src}: section 'split': the device/server layout needs the model's partition "
                                   f"count (model.partitions)")
        if sp.split == "auto":
            raise StageConfigError(f"{src}: section 'split': key 'split' is 'auto': the profiler chooses it at launch "
                                   f"(dflsplit profile CONFIG shows its choice)")
        rows = device_server_rows(cfg.num_nodes, uid_to_client(sp.server), partitions, sp.split)
        return rows, f"{src}: split.server={sp.server}, split.split={sp.split} (device/server layout)"
    if sp.stages is not None and sp.stages_file is not None:
        raise StageConfigError(f"{src}: section 'split': set only one of 'stages' and 'stages_file'")
    if sp.stages is not None:
        return load_stages(sp.stages), f"{src}: split.stages"
    if sp.stages_file is not None:
        path = cfg.resolve(sp.stages_file)
        return _select(_configs_in_file(path), path, sp.stages_index)
    raise StageConfigError(f"{src}: section 'split': set 'stages' (a list of rows), 'stages_file', or 'server' "
                           f"(the device/server layout)")


def mapping_from_config(cfg: Any, partitions: Optional[int] = None,
                        strict_order: Optional[bool] = None) -> StageMapping:
    """The StageMapping of a Config; checks one row per node (run.machines x procs_per_machine).

    ``partitions`` defaults to ``model.partitions`` (None: inferred from the configuration).
    Rule 6 is checked as ``split.order`` says (``strict_order`` overrides it).
    """
    if partitions is None:
        partitions = getattr(cfg.model, "partitions", None)
    rows, where = stages_from_config(cfg, partitions)
    if len(rows) != cfg.num_nodes:
        raise StageConfigError(
            f"{where}: the stage configuration has {len(rows)} rows but the run has "
            f"{cfg.num_nodes} nodes (run.machines x run.procs_per_machine); one row per node expected")
    if strict_order is None:
        strict_order = cfg.split.order == "strict"
    return StageMapping(rows, partitions, None, strict_order, source=where)


# --------------------------------------------------------------------------- Deeplopito import

DEEPLOPITO_MODELS = {"cnn": "cnn", "lenet": "lenet", "mlp": "mlp", "resnet18": "resnet18",
                     "resnet-18": "resnet18", "resnet_18": "resnet18"}
DEEPLOPITO_DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "cifar-10": "cifar10",
                       "cifar_10": "cifar10", "digits": "digits", "femnist": "femnist"}


def import_deeplopito_env(path: str | os.PathLike, index: int = 0) -> dict[str, Any]:
    """A dflsplit config dict from a Deeplopito ``.env`` file.

    Reads CURRENT_MODEL, CURRENT_DATASET, BATCH_SIZE, NUM_CLIENTS, TRAINING_NUM_ROUNDS,
    TRAINING_NUM_EPOCHS and STAGES_CLIENTS (``SIMULATION_`` prefixed names are accepted
    for the last two). A repeated scalar key takes its last value, as python-dotenv
    does; of several STAGES_CLIENTS lines ``index`` chooses one (0: the first).
    """
    path = Path(path)
    found = _configs_in_file(path)
    rows, where = _select(found, path, index)
    values: dict[str, tuple[str, int]] = {}
    for key, value, line in read_env(path):
        values[key.upper()] = (value, line)

    def get(*keys: str) -> tuple[str, str]:
        for k in keys:
            if k in values:
                value, line = values[k]
                return value, f"{path}:{line}: {k}"
        raise StageConfigError(f"{path}: missing key {keys[0]} (needed to import a Deeplopito .env)")

    def integer(*keys: str) -> int:
        value, at = get(*keys)
        try:
            v = int(value)
        except ValueError:
            raise StageConfigError(f"{at}: expected a positive integer, got {value!r}") from None
        if v <= 0:
            raise StageConfigError(f"{at}: expected a positive integer, got {v}")
        return v

    def name(key: str, table: dict[str, str]) -> str:
        value, at = get(key)
        try:
            return table[value.strip().lower()]
        except KeyError:
            raise StageConfigError(f"{at}: unknown name {value!r}; known: "
                                   f"{', '.join(sorted(table))} (case-insensitive)") from None

    model = name("CURRENT_MODEL", DEEPLOPITO_MODELS)
    dataset = name("CURRENT_DATASET", DEEPLOPITO_DATASETS)
    clients = integer("NUM_CLIENTS", "SIMULATION_NUM_CLIENTS")
    if clients != len(rows):
        raise StageConfigError(f"{where}: STAGES_CLIENTS has {len(rows)} rows but NUM_CLIENTS is "
                               f"{clients}; one row per client expected")
    return {
        "run": {"procs_per_machine": clients, "rounds": integer("TRAINING_NUM_ROUNDS")},
        "dataset": {"name": dataset},
        "model": {"name": model},
        "training": {"batch_size": integer("BATCH_SIZE"),
                     "local_epochs": float(integer("TRAINING_NUM_EPOCHS")), "local_steps": None},
        "node": {"name": "split"},
        "split": {"stages": rows},
    }


class _FlowRowsDumper(yaml.SafeDumper):
    """Writes lists of scalars inline (one stage row per line)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, (list, dict)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowRowsDumper.add_representer(list, _represent_list)


def write_config_yaml(config: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a config dict as YAML, each stage row on one line (labels quoted)."""
    with open(path, "w") as f:
        yaml.dump(config, f, Dumper=_FlowRowsDumper, sort_keys=False, width=200)


__all__ = [
    "RULES", "STAGE_VARIABLES", "StageConfigError", "StageMapping", "Violation", "client_to_uid",
    "device_server_rows", "find_violations", "import_deeplopito_env", "list_stage_configs", "load_stages",
    "mapping_from_config", "parse_task", "read_env", "stage_config_locations", "stages_from_config",
    "task_label", "uid_to_client", "validate", "write_config_yaml",
]
