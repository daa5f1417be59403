"""Split-learning schedules as data, and the dataflow queue that runs them.

In the manner of ``torch.distributed.pipelining``, what a client does in one training step
is data: a list of `Scheduled` entries, each an `Action`, the tokens it requires and its
priority (`SplitPlan.step`). An executor (the `split` node) adds them to a
`DataflowQueue`, runs the ready action of lowest priority, and produces the tokens the
action yields (`SplitPlan.outputs`), locally or by sending them to another client. The
partitions know nothing of the schedule.

Ids follow the stage format: clients, owners and partitions are 1-based.

Actions of step t on a client (M micro-batches m = 0..M-1):

* ``fwd`` (o, p, m): forward of owner o's partition p. Requires ``ver`` (t, o, p) (the
  replica is up to date) and, for p > 1, ``act`` (t, o, p, m) (its input).
* ``bwd`` (o, p, m): backward of partition p. Requires ``fwd`` (t, o, p, m) (its autograd
  graph) and, for p < P, ``grad`` (t, o, p, m) (gradient of its output).
* ``step`` (o, p): optimizer step of replica (o, p) after every micro-batch's ``bwd``.
* ``send`` (p): send this client's share of partition p to its sync partners.
* ``end`` (p): close step t for every replica of p here (average them with the received
  shares when the step synchronises); yields ``ver`` (t+1, o, p).

Tokens are tuples whose first two items are (kind, step). Row order is the priority:
``(t, 1, row position, m)`` for row tasks; ``(t, 0, ...)`` for the bookkeeping actions, which
unblock others. Data dependencies form chains within one step and every edge between
steps goes forwards in time, so running any ready action never deadlocks, whatever the
row orders (``dry_run`` executes the schedules of all clients symbolically).
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

Token = tuple
ActionKind = Literal["fwd", "bwd", "step", "send", "end"]
SyncMode = Literal["fedavg", "gossip", "none"]


@dataclass(frozen=True)
class Action:
    """One unit of work of a client: `kind` at `step` for owner `owner` (0 for the
    partition-level ``send`` and ``end``), partition `partition`, micro-batch `micro`."""

    kind: ActionKind
    step: int
    owner: int
    partition: int
    micro: int = 0

    def describe(self, num_partitions: int) -> str:
        """Human-readable, naming the task label ``o_s`` for row tasks."""
        p, o, t = self.partition, self.owner, self.step
        if self.kind == "fwd":
            return f"forward {o}_{p} (step {t}, micro-batch {self.micro})"
        if self.kind == "bwd":
            return f"backward {o}_{2 * num_partitions + 1 - p} (step {t}, micro-batch {self.micro})"
        if self.kind == "step":
            return f"optimizer step of owner {o}'s partition {p} (step {t})"
        if self.kind == "send":
            return f"sending partition {p} to its sync partners (step {t})"
        return f"end of step {t} for partition {p}"


@dataclass(frozen=True)
class Scheduled:
    """An action with the tokens it waits for and its priority (lower runs first)."""

    action: Action
    requires: tuple[Token, ...]
    priority: tuple[int, ...]


def describe_token(token: Token) -> str:
    """Human-readable description of what a token stands for."""
    kind, t = token[0], token[1]
    if kind == "act":
        _, _, o, p, m = token
        return f"activation into owner {o}'s partition {p} (step {t}, micro-batch {m})"
    if kind == "grad":
        _, _, o, p, m = token
        return f"gradient of owner {o}'s partition {p} output (step {t}, micro-batch {m})"
    if kind == "sync":
        _, _, p, r = token
        return f"client {r}'s share of partition {p} (step {t})"
    if kind == "ver":
        return f"owner {token[2]}'s partition {token[3]} up to date for step {t}"
    if kind in ("fwd", "bwd"):
        _, _, o, p, m = token
        what = "forward" if kind == "fwd" else "backward"
        return f"{what} of owner {o}'s partition {p} (step {t}, micro-batch {m})"
    if kind == "stepped":
        return f"optimizer step of owner {token[2]}'s partition {token[3]} (step {t})"
    return f"{kind} {token[1:]}"


def describe_blocked(blocked: dict[Action, set[Token]], num_partitions: int, limit: int, source=None) -> list[str]:
    """Lines naming waiting actions (given in priority order) and what they miss, the
    likely root causes first: actions that wait only for other clients, those waiting
    for an activation or gradient before those waiting for a sync share.
    ``source(token)`` names the other client a token comes from (None: from here)."""
    rank = {"act": 0, "grad": 0, "sync": 1}

    def key(a: Action) -> tuple[bool, int]:
        only_remote = all(source(t) for t in blocked[a]) if source else True
        return (not only_remote, min(rank.get(t[0], 2) for t in blocked[a]))

    order = sorted(blocked, key=key)
    lines = []
    for a in order[:limit]:
        needs = []
        for tok in sorted(blocked[a], key=repr):
            src = source(tok) if source else None
            needs.append(describe_token(tok) + (f" from {src}" if src else ""))
        lines.append(f"{a.describe(num_partitions)} waits for " + ", ".join(needs))
    if len(order) > limit:
        lines.append(f"... and {len(order) - limit} more")
    return lines


class SplitPlan:
    """The schedule of one client, derived from a `StageMapping` and the sync settings.

    ``sync``: ``fedavg`` averages a partition's replicas among all its runners,
    ``gossip`` among runners that are neighbours in the peer graph, ``none`` never.
    ``sync_period``: steps between synchronisations (at steps t with (t+1) % period == 0).
    ``relay``: owners take turns of ``sync_period`` steps (owner ``(t // period) % N + 1``
    trains at step t); with fedavg weighted by samples the trained weights pass on.
    """

    def __init__(
        self,
        stages,
        client: int,
        micro_batches: int = 1,
        sync: SyncMode = "fedavg",
        sync_period: int = 1,
        relay: bool = False,
    ):
        if micro_batches < 1 or sync_period < 1:
            raise ValueError("micro_batches and sync_period must be >= 1")
        self.stages = stages
        self.client = client
        self.P: int = stages.P
        self.M = micro_batches
        self.sync = sync
        self.sync_period = sync_period
        self.relay = relay
        self.row_pos = {task: i for i, task in enumerate(stages.tasks(client))}
        self.hosted: list[tuple[int, int]] = stages.hosted(client)
        self.local_owners: dict[int, list[int]] = defaultdict(list)
        for o, p in self.hosted:
            self.local_owners[p].append(o)
        self.partitions: list[int] = sorted(self.local_owners)
        self.partners: dict[int, list[int]] = {p: self._partners(p) for p in self.partitions}

    def _partners(self, p: int) -> list[int]:
        runners = set(self.stages.replicas(p).values()) - {self.client}
        if self.sync == "none":
            return []
        if self.sync == "gossip":
            runners &= set(self.stages.neighbors(self.client))
        return sorted(runners)

    # timeline ---------------------------------------------------------------------------
    def syncs_at(self, t: int) -> bool:
        """Whether replicas are synchronised at the end of step t."""
        return self.sync != "none" and (t + 1) % self.sync_period == 0

    def active(self, t: int) -> list[int]:
        """Owners that train at step t (all of them unless ``relay``)."""
        n = self.stages.num_clients
        if self.relay:
            return [(t // self.sync_period) % n + 1]
        return list(range(1, n + 1))

    # schedule -----------------------------------------------------------------------------
    def step(self, t: int) -> list[Scheduled]:
        """This client's actions of step t, with requirements and priorities."""
        P, M, out = self.P, self.M, []
        active = set(self.active(t))
        for (o, s), pos in self.row_pos.items():
            if o not in active:
                continue
            p = self.stages.partition_of(s)
            if s <= P:
                for m in range(M):
                    req = (("ver", t, o, p),) + ((("act", t, o, p, m),) if p > 1 else ())
                    out.append(Scheduled(Action("fwd", t, o, p, m), req, (t, 1, pos, m)))
            else:
                for m in range(M):
                    req = (("fwd", t, o, p, m),) + ((("grad", t, o, p, m),) if p < P else ())
                    out.append(Scheduled(Action("bwd", t, o, p, m), req, (t, 1, pos, m)))
                req = tuple(("bwd", t, o, p, m) for m in range(M))
                out.append(Scheduled(Action("step", t, o, p), req, (t, 0, pos, M)))
        sync = self.syncs_at(t)
        for p in self.partitions:
            owners = self.local_owners[p]
            versions = tuple(("ver", t, o, p) for o in owners)
            stepped = tuple(("stepped", t, o, p) for o in owners if o in active)
            last = max((self.row_pos[(o, 2 * P + 1 - p)] for o in owners), default=0)
            req = versions + stepped
            if sync and self.partners[p]:
                out.append(Scheduled(Action("send", t, 0, p), req, (t, 0, last, M + 1)))
                req += (("sent", t, p),) + tuple(("sync", t, p, r) for r in self.partners[p])
            out.append(Scheduled(Action("end", t, 0, p), req, (t, 0, last, M + 2)))
        return out

    def outputs(self, action: Action) -> list[tuple[Token, int]]:
        """(token, client) pairs an action yields: where each of its results must go."""
        t, o, p, m, me = action.step, action.owner, action.partition, action.micro, self.client
        if action.kind == "fwd":
            out = [(("fwd", t, o, p, m), me)]
            if p < self.P:
                out.append((("act", t, o, p + 1, m), self.stages.runner(o, p + 1)))
            return out
        if action.kind == "bwd":
            out = [(("bwd", t, o, p, m), me)]
            if p > 1:
                out.append((("grad", t, o, p - 1, m), self.stages.runner(o, p - 1)))
            return out
        if action.kind == "step":
            return [(("stepped", t, o, p), me)]
        if action.kind == "send":
            return [(("sent", t, p), me)] + [(("sync", t, p, me), r) for r in self.partners[p]]
        return [(("ver", t + 1, q, p), me) for q in self.local_owners[p]]

    def source(self, token: Token) -> Optional[int]:
        """The other client that sends `token` to this one; None when it is made here."""
        kind = token[0]
        if kind == "act":
            c = self.stages.runner(token[2], token[3] - 1)
        elif kind == "grad":
            c = self.stages.runner(token[2], token[3] + 1)
        elif kind == "sync":
            c = token[3]
        else:
            return None
        return c if c != self.client else None

    def initial_tokens(self, t: int = 0) -> list[Token]:
        """Tokens available before step t: every hosted replica is up to date."""
        return [("ver", t, o, p) for o, p in self.hosted]


class DataflowQueue:
    """Actions waiting for tokens; `pop` returns the ready action of lowest priority.

    A token, once produced, stays available to any number of actions until `forget`.
    """

    def __init__(self):
        self._have: set[Token] = set()
        self._missing: dict[Action, set[Token]] = {}
        self._waiting: dict[Token, list[Action]] = defaultdict(list)
        self._ready: list[tuple[tuple[int, ...], int, Action]] = []
        self._priority: dict[Action, tuple[int, ...]] = {}
        self._seq = itertools.count()

    def add(self, entry: Scheduled) -> None:
        """Queue an action; it is ready once every token it requires is produced."""
        a = entry.action
        if a in self._priority:
            raise ValueError(f"action {a} is queued twice")
        self._priority[a] = entry.priority
        missing = {tok for tok in entry.requires if tok not in self._have}
        if missing:
            self._missing[a] = missing
            for tok in missing:
                self._waiting[tok].append(a)
        else:
            heapq.heappush(self._ready, (entry.priority, next(self._seq), a))

    def add_all(self, entries: Iterable[Scheduled]) -> None:
        for e in entries:
            self.add(e)

    def produce(self, token: Token) -> bool:
        """Make `token` available; False when it already was (a duplicate)."""
        if token in self._have:
            return False
        self._have.add(token)
        for a in self._waiting.pop(token, ()):
            missing = self._missing[a]
            missing.discard(token)
            if not missing:
                del self._missing[a]
                heapq.heappush(self._ready, (self._priority[a], next(self._seq), a))
        return True

    def has(self, token: Token) -> bool:
        return token in self._have

    def pop(self) -> Optional[Action]:
        """The ready action of lowest priority (removed from the queue), or None."""
        if not self._ready:
            return None
        _, _, a = heapq.heappop(self._ready)
        del self._priority[a]
        return a

    def __len__(self) -> int:
        """Actions queued and not yet popped (ready or waiting)."""
        return len(self._priority)

    def blocked(self) -> dict[Action, set[Token]]:
        """Each waiting action and the tokens it still misses, in priority order."""
        order = sorted(self._missing, key=lambda a: self._priority[a])
        return {a: set(self._missing[a]) for a in order}

    def forget(self, before_step: int) -> None:
        """Drop produced tokens of steps before `before_step` (their actions are done)."""
        self._have = {tok for tok in self._have if tok[1] >= before_step}


class ScheduleDeadlock(RuntimeError):
    """`dry_run` found clients waiting on each other (cannot happen for valid schedules)."""


def dry_run(plans: dict[int, SplitPlan], steps: int) -> dict[int, list[Action]]:
    """Execute the schedules of every client symbolically for `steps` steps.

    Clients take turns running one ready action each; results reach their destination at
    once. Returns the actions each client ran, in order; raises ScheduleDeadlock naming
    what each client waits for when no client can run anything.
    """
    queues = {c: DataflowQueue() for c in plans}
    for c, plan in plans.items():
        for tok in plan.initial_tokens():
            queues[c].produce(tok)
        for t in range(steps):
            queues[c].add_all(plan.step(t))
    ran: dict[int, list[Action]] = {c: [] for c in plans}
    while any(len(q) for q in queues.values()):
        progressed = False
        for c in sorted(plans):
            a = queues[c].pop()
            if a is None:
                continue
            progressed = True
            ran[c].append(a)
            for tok, dest in plans[c].outputs(a):
                if not queues[dest].produce(tok):
                    raise ScheduleDeadlock(f"client {dest} got {tok} twice")
        if not progressed:
            lines = []
            for c, q in sorted(queues.items()):
                src = plans[c].source
                name = lambda tok, src=src: f"client {src(tok)}" if src(tok) else None  # noqa: E731
                lines += [f"client {c}: {x}" for x in describe_blocked(q.blocked(), plans[c].P, 3, name)]
            raise ScheduleDeadlock("no client can run an action:\n  " + "\n  ".join(lines))
    return ran
