"""Split-learning schedules as data: each client's ordered actions of a step, and the
dataflow queue that runs them.

A step of client c, for a stage mapping and M micro-batches, is a list of actions:

* ``fwd`` / ``bwd`` (o, p, m): forward / backward of owner o's partition p on micro-batch m;
* ``send`` / ``recv`` (o, p, m) of an ``act`` (the input of partition p) or a ``grad`` (the
  gradient of partition p's output) to / from client ``peer``;
* ``step`` (o, p): the optimizer step of replica (o, p), after its M backwards;
* ``share`` (p): this client's share of partition p, to its sync partners;
* ``sync`` (p): replica sync of partition p (combine the shares), closing step t for it;
  with ``star`` sync the hub combines and sends the result back (``avg``).

Each action waits for *tokens* (tuples whose first two items are (kind, step)): ``ver``
(t, o, p) a replica up to date, ``act`` / ``grad`` (t, o, p, m) an input at hand,
``net_act`` / ``net_grad`` the message carrying one arrived, ``fwd`` / ``bwd`` (t, o, p, m)
a pass done, ``stepped``, ``shared``, ``sync`` (t, p, r) client r's share arrived, ``avg``
(t, p) the hub's combined partition arrived.

A schedule class (``SCHEDULES``) shapes the order, as torch.distributed.pipelining does:

* ``gpipe``: all forwards, then all backwards (M activations of a partition alive at once);
* ``1f1b``: a partition's forward of micro-batch m waits for its backward of m - D, where D
  is the pipeline depth from that partition on (the number of consecutive runs of
  partitions on one client from it to the last): at most D micro-batches in flight, so
  fewer activations are alive; backwards go first when both are ready.

`PipelineSchedule` turns the plans of all clients into each client's ordered list of a
step: a symbolic run of every client (each runs one ready action per tick, the
schedule's preference first; messages arrive the next tick) records the order in which
each client ran its actions. That run is the dry run: it proves the step cannot deadlock,
and names what waits for what from whom when it would. The executor (`split.SplitNode`)
runs the lists: with ``order: relaxed`` any action whose tokens are there, the list's
order as priority within a step, except that a backward no other client waits for (a
device's backward chain down to partition 1) yields to the step's other ready actions,
which feed a peer (`SplitPlan.local_only`: a slow device then answers the server first),
and with ``split.preempt`` runs on a background thread of its own, so that a pass a peer
waits for never waits behind it (`SplitPlan.background`, `may_start`); with ``order:
strict`` the list in order, each action waiting for its predecessor. A strict list also
keeps, for every micro-batch, the row order of the stage
configuration, so rule 6 (strict) of the stage validator is exactly the condition
for it to exist. Every dependency between steps goes forwards in time (a replica's sync
at step t before its forwards of step t+1), so steps that complete one by one complete
together.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Literal, Optional, Sequence

from ..registry import Registry

Token = tuple
ActionKind = Literal["fwd", "bwd", "send", "recv", "step", "share", "sync"]
SyncMode = Literal["fedavg", "gossip", "star", "none"]


#: ``split.micro_sizes``: how a batch is cut into micro-batches
MICRO_SIZINGS = ("even", "tapered")
#: tapered sizes fall linearly from the first micro-batch's to this fraction of it
TAPER_LAST = 0.45


def micro_sizes(batch: int, micro: int, sizing: str | Sequence[int] = "even") -> list[int]:
    """The sizes of the `micro` micro-batches a batch of `batch` samples is cut into, in
    order. ``even``: torch.tensor_split's (they differ by at most one). ``tapered``: falling
    linearly to about `TAPER_LAST` of the first (largest remainders rounded up, none empty
    while `batch` >= `micro`), so the last micro-batch's round trip, which nothing else
    hides in an exact step, is short; the batch's gradient is the same. `sizing` may also
    be the sizes themselves (`micro` of them, each >= 1, summing to `batch`): the
    profiler's floors take any cut."""
    if not isinstance(sizing, str):
        sizes = [int(s) for s in sizing]
        if len(sizes) != micro or sum(sizes) != batch or min(sizes, default=0) < 1:
            raise ValueError(f"micro-batch sizes {sizes}: expected {micro} sizes >= 1 summing to the batch {batch}")
        return sizes
    if sizing not in MICRO_SIZINGS:
        raise ValueError(f"micro-batch sizing {sizing!r}: expected one of {', '.join(MICRO_SIZINGS)}")
    if sizing == "even" or micro == 1 or batch < micro:
        q, r = divmod(batch, micro)
        return [q + (i < r) for i in range(micro)]
    weights = [1 - (1 - TAPER_LAST) * i / (micro - 1) for i in range(micro)]
    spare = batch - micro  # one sample each first, the rest by weight
    shares = [spare * w / sum(weights) for w in weights]
    sizes = [1 + int(s) for s in shares]
    by_remainder = sorted(range(micro), key=lambda i: (int(shares[i]) - shares[i], i))
    for i in by_remainder[:batch - sum(sizes)]:
        sizes[i] += 1
    return sizes


@dataclass(frozen=True)
class Action:
    """One unit of work of a client: `kind` at `step` for owner `owner` (0 for the
    partition-level ``share`` and ``sync``), partition `partition`, micro-batch `micro`;
    a ``send`` / ``recv`` moves `what` (``act``: the input of `partition`; ``grad``: the
    gradient of `partition`'s output) to / from client `peer`."""

    kind: ActionKind
    step: int
    owner: int
    partition: int
    micro: int = 0
    what: str = ""
    peer: int = 0

    def task(self, num_partitions: int) -> str:
        """The stage task ``o_s`` this action runs or feeds (``''`` for partition-level ones)."""
        o, p = self.owner, self.partition
        if self.kind == "fwd" or (self.kind in ("send", "recv") and self.what == "act"):
            return f"{o}_{p}"
        if self.kind == "bwd" or self.kind in ("send", "recv"):
            return f"{o}_{2 * num_partitions + 1 - p}"
        return ""

    def describe(self, num_partitions: int) -> str:
        """Human-readable, naming the task label ``o_s`` and the step."""
        p, o, t, m = self.partition, self.owner, self.step, self.micro
        at = f"(step {t}, micro-batch {m})"
        if self.kind == "fwd":
            return f"forward {self.task(num_partitions)} {at}"
        if self.kind == "bwd":
            return f"backward {self.task(num_partitions)} {at}"
        if self.kind in ("send", "recv"):
            thing = "activation into" if self.what == "act" else "gradient for"
            verb, way = ("sending", "to") if self.kind == "send" else ("receiving", "from")
            return f"{verb} the {thing} {self.task(num_partitions)} {at} {way} client {self.peer}"
        if self.kind == "step":
            return f"optimizer step of owner {o}'s partition {p} (step {t})"
        if self.kind == "share":
            return f"sending partition {p} to its sync partners (step {t})"
        return f"replica sync of partition {p} (step {t})"

    def label(self, num_partitions: int) -> str:
        """Short form for action tables: ``F 1_2 #0``, ``B 1_7 #0``, ``->2 a1_3 #0`` (send the
        activation into 1_3 to client 2), ``<-2 g1_6 #0``, ``step 1/2``, ``share 2``, ``sync 2``."""
        m = self.micro
        if self.kind in ("fwd", "bwd"):
            return f"{'F' if self.kind == 'fwd' else 'B'} {self.task(num_partitions)} #{m}"
        if self.kind in ("send", "recv"):
            arrow = "->" if self.kind == "send" else "<-"
            return f"{arrow}{self.peer} {self.what[0]}{self.task(num_partitions)} #{m}"
        if self.kind == "step":
            return f"step {self.owner}/{self.partition}"
        return f"{self.kind} {self.partition}"


@dataclass(frozen=True)
class Scheduled:
    """An action with the tokens it waits for and its priority (lower runs first)."""

    action: Action
    requires: tuple[Token, ...]
    priority: tuple


#: action kinds that read or write every replica of a partition: they run with no other action of their client
EXCLUSIVE = ("share", "sync")


def may_start(action: Action, running: Collection[Action], workers: int,
              background: Optional[Callable[[Action], bool]] = None) -> bool:
    """Whether a client with `workers` compute threads, running `running`, may start
    `action` now. One thread: nothing else running. Several: sends and receives at any time
    (bookkeeping of the executor's own thread); a replica share or sync alone; any other
    action on a free thread while no action of its owner runs (an owner's passes, loss and
    gradient accumulation stay on one thread at a time, in the schedule's order).
    `background` (``split.preempt``, `SplitPlan.background`): the actions that run on a
    thread of their own beside those, one at a time, never beside an action on the same
    replica (owner, partition) or a share or sync of the same partition."""
    if workers <= 1 and background is None:
        return not running
    if action.kind in ("send", "recv"):
        return True
    computing = [a for a in running if a.kind not in ("send", "recv")]
    behind = background or (lambda a: False)
    back = [a for a in computing if behind(a)]
    front = [a for a in computing if not behind(a)]
    replica = (action.owner, action.partition)
    if behind(action):  # beside passes of other replicas and shares or syncs of other partitions
        return not back and all((a.owner, a.partition) != replica
                                and not (a.kind in EXCLUSIVE and a.partition == action.partition) for a in front)
    if action.kind in EXCLUSIVE:
        return not front and all(a.partition != action.partition for a in back)
    if any(a.kind in EXCLUSIVE for a in front):
        return False
    return (len(front) < workers and all(a.owner != action.owner for a in front)
            and all((a.owner, a.partition) != replica for a in back))


def describe_token(token: Token) -> str:
    """Human-readable description of what a token stands for."""
    kind, t = token[0], token[1]
    if kind in ("act", "net_act"):
        _, _, o, p, m = token
        return f"activation into owner {o}'s partition {p} (step {t}, micro-batch {m})"
    if kind in ("grad", "net_grad"):
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
    if kind == "shared":
        return f"this client's share of partition {token[2]} (step {t})"
    if kind == "avg":
        return f"the averaged partition {token[2]} (step {t})"
    return f"{kind} {token[1:]}"


def describe_blocked(blocked: dict[Action, set[Token]], num_partitions: int, limit: int, source=None) -> list[str]:
    """Lines naming waiting actions (given in priority order) and what they miss, the
    likely root causes first: the earliest step's, then actions that wait only for other
    clients, those waiting for an activation or gradient before those waiting for a sync
    share. ``source(token)`` names the other client a token comes from (None: from here)."""
    rank = {"net_act": 0, "net_grad": 0, "act": 0, "grad": 0, "sync": 1, "avg": 1}

    def key(a: Action) -> tuple[int, bool, int]:
        only_remote = all(source(t) for t in blocked[a]) if source else True
        return (a.step, not only_remote, min(rank.get(t[0], 2) for t in blocked[a]))

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


# --------------------------------------------------------------------------- schedule classes

SCHEDULES: Registry[type["Schedule"]] = Registry("schedule")

# transfers first (they only hand data on), the optimizer step and the replica sync last
_TRANSFER, _BOOKKEEPING = 0, 9


class Schedule:
    """A pipeline schedule: how many micro-batches a partition may hold in flight, and which
    of a client's ready actions it prefers. Subclasses register in ``SCHEDULES``."""

    name = ""

    def in_flight(self, plan: "SplitPlan", owner: int, partition: int) -> Optional[int]:
        """At most this many micro-batches between a forward of (owner, partition) and its
        backward (None: no bound)."""
        return None

    def preference(self, action: Action, position: int) -> tuple:
        """Sort key among a client's ready actions (lower first); `position`: the action's
        task in the client's row."""
        kind = action.kind
        if kind in ("send", "recv"):
            return (_TRANSFER, action.micro, position)
        if kind in ("step", "share", "sync"):
            return (_BOOKKEEPING, position, ("step", "share", "sync").index(kind))
        return self.compute_preference(action, position)

    def compute_preference(self, action: Action, position: int) -> tuple:
        raise NotImplementedError


@SCHEDULES.register("gpipe")
class GPipe(Schedule):
    """All forwards, then all backwards (GPipe): a ready forward goes before any backward."""

    name = "gpipe"

    def compute_preference(self, action: Action, position: int) -> tuple:
        return (1 if action.kind == "fwd" else 2, action.micro, position)


@SCHEDULES.register("1f1b")
class OneFOneB(Schedule):
    """One forward, one backward (PipeDream-flush): at most `depth` micro-batches in flight
    per partition, a ready backward before a ready forward."""

    name = "1f1b"

    def in_flight(self, plan: "SplitPlan", owner: int, partition: int) -> Optional[int]:
        return plan.depth(owner, partition)

    def compute_preference(self, action: Action, position: int) -> tuple:
        return (1 if action.kind == "bwd" else 2, action.micro, position)


def get_schedule(name: str) -> Schedule:
    """An instance of the schedule registered as `name` (KeyError names the known ones)."""
    return SCHEDULES.get(name)()


# --------------------------------------------------------------------------- one client's plan


class SplitPlan:
    """The actions of one client, derived from a `StageMapping`, the schedule and the sync
    settings.

    ``sync``: ``fedavg`` averages a partition's replicas among all its runners,
    ``gossip`` among runners that are neighbours in the peer graph, ``star`` as fedavg
    but through client ``hub`` (every runner sends its share to the hub, which combines
    them and sends the result back: one upload per runner instead of one per partner),
    ``none`` never.
    ``sync_period``: steps between synchronisations (at steps t with (t+1) % period == 0).
    ``relay``: owners take turns of ``sync_period`` steps; with fedavg weighted by samples
    the trained weights pass on. ``trainers``: the owners that hold data (default: all);
    the others' pipelines never run (a device/server run's server). ``strict``: the list
    keeps the row order for every micro-batch (``order: strict``). ``preempt``: backwards
    no peer waits for run on a background thread (`background`, ``split.preempt``).
    """

    def __init__(
        self,
        stages,
        client: int,
        micro_batches: int = 1,
        sync: SyncMode = "fedavg",
        sync_period: int = 1,
        relay: bool = False,
        schedule: str | Schedule = "gpipe",
        strict: bool = False,
        trainers: Optional[Iterable[int]] = None,
        hub: Optional[int] = None,
        preempt: bool = False,
    ):
        if micro_batches < 1 or sync_period < 1:
            raise ValueError("micro_batches and sync_period must be >= 1")
        if sync == "star" and hub is None:
            raise ValueError("star sync needs its hub client")
        self.hub = hub
        self.stages = stages
        self.client = client
        self.P: int = stages.P
        self.M = micro_batches
        self.sync = sync
        self.sync_period = sync_period
        self.relay = relay
        self.schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
        self.strict = strict
        n = stages.num_clients
        self.trainers: list[int] = sorted(trainers) if trainers is not None else list(range(1, n + 1))
        self.row_pos = {task: i for i, task in enumerate(stages.tasks(client))}
        self.hosted: list[tuple[int, int]] = stages.hosted(client)
        self.local_owners: dict[int, list[int]] = defaultdict(list)
        for o, p in self.hosted:
            self.local_owners[p].append(o)
        self.partitions: list[int] = sorted(self.local_owners)
        self.partners: dict[int, list[int]] = {p: self._partners(p) for p in self.partitions}
        run = [(o, p) for o, p in self.hosted if o in self.trainers]  # the pipelines that run
        self.preempts: bool = preempt and not strict and self._feeds_peer(run) and any(
            self.local_only(Action("bwd", 0, o, p, 0)) for o, p in run)

    def workers(self, requested: int) -> int:
        """Compute threads this client uses of `requested` (``split.workers``): at most one
        per owner whose partitions it runs (see `may_start`), and one in strict order."""
        return 1 if self.strict else max(1, min(requested, len({o for o, _ in self.hosted})))

    def background(self, a: Action) -> bool:
        """Whether `a` runs on this client's background thread (``split.preempt``): a
        backward no peer waits for (`local_only`), on a client whose other passes feed a
        peer, which then never wait behind it (with a slower processor emulated, the
        background pass pauses while they run: `split.SlowerProcessor`)."""
        return self.preempts and self.local_only(a)

    @property
    def background_rule(self) -> Optional[Callable[[Action], bool]]:
        """`background` for `may_start` when this client preempts, else None (one thread
        for every pass)."""
        return self.background if self.preempts else None

    def _feeds_peer(self, hosted: list[tuple[int, int]]) -> bool:
        """Whether a forward or backward of `hosted` sends its result to another client."""
        return any(b.kind == "send" for o, p in hosted for kind in ("fwd", "bwd")
                   for b, _ in self._transfers(Action(kind, 0, o, p, 0)))

    def _partners(self, p: int) -> list[int]:
        runners = set(self.stages.replicas(p).values()) - {self.client}
        if self.sync == "none":
            return []
        if self.sync == "gossip":
            runners &= set(self.stages.neighbors(self.client))
        if self.star(p) and self.client != self.hub:
            return [self.hub]
        return sorted(runners)

    def star(self, p: int) -> bool:
        """Whether partition p syncs through the hub (star sync, the hub one of its runners)."""
        return self.sync == "star" and self.hub in self.stages.replicas(p).values()

    def depth(self, owner: int, partition: int) -> int:
        """Pipeline stages from `partition` of `owner` to the end: runs of consecutive
        partitions on one client, counted from the one holding `partition`."""
        runners = self.stages.runners[owner][partition - 1:]
        return 1 + sum(1 for a, b in zip(runners, runners[1:]) if a != b)

    # timeline ---------------------------------------------------------------------------
    def syncs_at(self, t: int) -> bool:
        """Whether replicas are synchronised at the end of step t."""
        return self.sync != "none" and (t + 1) % self.sync_period == 0

    def active(self, t: int) -> list[int]:
        """Owners that train at step t (every trainer unless ``relay``)."""
        if self.relay:
            return [self.trainers[(t // self.sync_period) % len(self.trainers)]]
        return list(self.trainers)

    def signature(self, t: int) -> tuple:
        """What step t's actions depend on besides t itself: steps of equal signature have
        the same lists."""
        return tuple(self.active(t)), self.syncs_at(t)

    # actions --------------------------------------------------------------------------------
    def step(self, t: int) -> list[Scheduled]:
        """This client's actions of step t with their requirements, in a fixed structural
        order; the priority is the schedule's preference (see `PipelineSchedule`)."""
        P, M, out = self.P, self.M, []
        active = set(self.active(t))
        chain: dict[int, Token] = {}  # strict: micro-batch -> the previous row task's pass
        for (o, s), pos in self.row_pos.items():
            if o not in active:
                continue
            p = self.stages.partition_of(s)
            forward = s <= P
            bound = self.schedule.in_flight(self, o, p) if forward else None
            for m in range(M):
                if forward:
                    a = Action("fwd", t, o, p, m)
                    req = [("ver", t, o, p)] + ([("act", t, o, p, m)] if p > 1 else [])
                    if bound is not None and m >= bound:
                        req.append(("bwd", t, o, p, m - bound))
                else:
                    a = Action("bwd", t, o, p, m)
                    req = [("fwd", t, o, p, m)] + ([("grad", t, o, p, m)] if p < P else [])
                if self.strict and m in chain:
                    req.append(chain[m])
                chain[m] = (a.kind, t, o, p, m)
                out.append(Scheduled(a, tuple(req), self.schedule.preference(a, pos)))
                for b, need in self._transfers(a):
                    out.append(Scheduled(b, need, self.schedule.preference(b, pos)))
            if not forward:
                a = Action("step", t, o, p)
                out.append(Scheduled(a, tuple(("bwd", t, o, p, m) for m in range(M)),
                                     self.schedule.preference(a, pos)))
        sync = self.syncs_at(t)
        for p in self.partitions:
            owners = self.local_owners[p]
            versions = tuple(("ver", t, o, p) for o in owners)
            stepped = tuple(("stepped", t, o, p) for o in owners if o in active)
            last = max((self.row_pos[(o, 2 * P + 1 - p)] for o in owners), default=0)
            req = versions + stepped
            hub = self.star(p) and self.client == self.hub
            if sync and self.partners[p] and not hub:
                a = Action("share", t, 0, p)
                out.append(Scheduled(a, req, self.schedule.preference(a, last)))
                if self.star(p):  # a spoke: the hub's result
                    req += (("shared", t, p), ("avg", t, p))
                else:
                    req += (("shared", t, p),) + tuple(("sync", t, p, r) for r in self.partners[p])
            elif sync and hub:  # the hub: every spoke's share
                req += tuple(("sync", t, p, r) for r in self.partners[p])
            a = Action("sync", t, 0, p)
            out.append(Scheduled(a, req, self.schedule.preference(a, last)))
        return out

    def local_only(self, a: Action) -> bool:
        """Whether `a` is a backward whose result stays on this client through every pass
        that follows it here (a chain that ends at partition 1): no peer waits for it."""
        if a.kind != "bwd":
            return False
        o, p = a.owner, a.partition
        while p > 1:
            if self.stages.runner(o, p - 1) != self.client:
                return False
            p -= 1
        return True

    def _transfers(self, a: Action) -> list[tuple[Action, tuple[Token, ...]]]:
        """The sends a pass feeds and the receives it waits on, with their requirements."""
        t, o, p, m, P, me = a.step, a.owner, a.partition, a.micro, self.P, self.client
        runner = self.stages.runner
        out = []
        if a.kind == "fwd":
            if p > 1 and (src := runner(o, p - 1)) != me:
                out.append((Action("recv", t, o, p, m, "act", src), (("net_act", t, o, p, m),)))
            if p < P and (dst := runner(o, p + 1)) != me:
                out.append((Action("send", t, o, p + 1, m, "act", dst), (("fwd", t, o, p, m),)))
        else:
            if p < P and (src := runner(o, p + 1)) != me:
                out.append((Action("recv", t, o, p, m, "grad", src), (("net_grad", t, o, p, m),)))
            if p > 1 and (dst := runner(o, p - 1)) != me:
                out.append((Action("send", t, o, p - 1, m, "grad", dst), (("bwd", t, o, p, m),)))
        return out

    def outputs(self, action: Action) -> list[tuple[Token, int]]:
        """(token, client) pairs an action yields: where each of its results goes."""
        t, o, p, m, me = action.step, action.owner, action.partition, action.micro, self.client
        runner = self.stages.runner
        kind = action.kind
        if kind == "fwd":
            out = [(("fwd", t, o, p, m), me)]
            if p < self.P and runner(o, p + 1) == me:
                out.append((("act", t, o, p + 1, m), me))
            return out
        if kind == "bwd":
            out = [(("bwd", t, o, p, m), me)]
            if p > 1 and runner(o, p - 1) == me:
                out.append((("grad", t, o, p - 1, m), me))
            return out
        if kind == "send":
            return [((f"net_{action.what}", t, o, p, m), action.peer)]
        if kind == "recv":
            return [((action.what, t, o, p, m), me)]
        if kind == "step":
            return [(("stepped", t, o, p), me)]
        if kind == "share":
            return [(("shared", t, p), me)] + [(("sync", t, p, me), r) for r in self.partners[p]]
        out = [(("ver", t + 1, q, p), me) for q in self.local_owners[p]]
        if self.star(p) and me == self.hub and self.syncs_at(t):
            out += [(("avg", t, p), r) for r in self.partners[p]]
        return out

    def source(self, token: Token) -> Optional[int]:
        """The other client that sends `token` to this one; None when it is made here."""
        kind = token[0]
        if kind == "net_act":
            c = self.stages.runner(token[2], token[3] - 1)
        elif kind == "net_grad":
            c = self.stages.runner(token[2], token[3] + 1)
        elif kind == "sync":
            c = token[3]
        elif kind == "avg":
            c = self.hub
        else:
            return None
        return c if c != self.client else None

    def initial_tokens(self, t: int = 0) -> list[Token]:
        """Tokens available before step t: every hosted replica is up to date."""
        return [("ver", t, o, p) for o, p in self.hosted]


# --------------------------------------------------------------------------- the dataflow queue


class DataflowQueue:
    """Actions waiting for tokens; `pop` returns the ready action of lowest priority.

    ``strict``: `pop` returns an action only when it has the lowest priority of every
    queued one (the list runs in order). A token, once produced, stays available to any
    number of actions until `forget`.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._have: set[Token] = set()
        self._missing: dict[Action, set[Token]] = {}
        self._waiting: dict[Token, list[Action]] = defaultdict(list)
        self._ready: list[tuple[tuple, int, Action]] = []
        self._queued: list[tuple[tuple, int, Action]] = []  # strict: every queued action (lazily pruned)
        self._priority: dict[Action, tuple] = {}
        self._seq = itertools.count()

    def add(self, entry: Scheduled) -> None:
        """Queue an action; it is ready once every token it requires is produced."""
        a = entry.action
        if a in self._priority:
            raise ValueError(f"action {a} is queued twice")
        self._priority[a] = entry.priority
        seq = next(self._seq)
        if self.strict:
            heapq.heappush(self._queued, (entry.priority, seq, a))
        missing = {tok for tok in entry.requires if tok not in self._have}
        if missing:
            self._missing[a] = missing
            for tok in missing:
                self._waiting[tok].append(a)
        else:
            heapq.heappush(self._ready, (entry.priority, seq, a))

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

    def pop(self, allowed: Optional[Callable[[Action], bool]] = None) -> Optional[Action]:
        """The ready action of lowest priority (removed from the queue), or None; with
        `allowed`, the ready action of lowest priority that `allowed` accepts."""
        entry = self._first(allowed)
        if entry is None:
            return None
        if entry is self._ready[0]:
            heapq.heappop(self._ready)
        else:
            self._ready.remove(entry)
            heapq.heapify(self._ready)
        del self._priority[entry[2]]
        return entry[2]

    def peek(self, allowed: Optional[Callable[[Action], bool]] = None) -> Optional[Action]:
        """The action `pop` would return, left in the queue."""
        entry = self._first(allowed)
        return None if entry is None else entry[2]

    def _first(self, allowed) -> Optional[tuple[tuple, int, Action]]:
        if not self._ready:
            return None
        if self.strict:  # only the list's next action may run
            while self._queued[0][2] not in self._priority:
                heapq.heappop(self._queued)
            if self._queued[0][2] != self._ready[0][2]:
                return None
        if allowed is None or allowed(self._ready[0][2]):
            return self._ready[0]
        if self.strict:
            return None
        return next((e for e in sorted(self._ready) if allowed(e[2])), None)

    def __len__(self) -> int:
        """Actions queued and not yet popped (ready or waiting)."""
        return len(self._priority)

    def blocked(self) -> dict[Action, set[Token]]:
        """Each waiting action and the tokens it still misses, in priority order (in strict
        order a ready action behind a waiting one is not listed)."""
        order = sorted(self._missing, key=lambda a: self._priority[a])
        return {a: set(self._missing[a]) for a in order}

    def forget(self, before_step: int) -> None:
        """Drop produced tokens of steps before `before_step` (their actions are done)."""
        self._have = {tok for tok in self._have if tok[1] >= before_step}


# --------------------------------------------------------------------------- lists and dry runs


class ScheduleDeadlock(RuntimeError):
    """The clients' actions wait on each other (the dry run found it before any training)."""


def _deadlock(queues: dict[int, DataflowQueue], plans: dict[int, "SplitPlan"]) -> ScheduleDeadlock:
    lines = []
    for c, q in sorted(queues.items()):
        src = plans[c].source
        name = lambda tok, src=src: f"client {src(tok)}" if src(tok) else None  # noqa: E731
        lines += [f"client {c}: {x}" for x in describe_blocked(q.blocked(), plans[c].P, 3, name)]
    return ScheduleDeadlock("no client can run an action:\n  " + "\n  ".join(lines))


def _run(queues: dict[int, DataflowQueue], plans: dict[int, "SplitPlan"]) -> dict[int, list[Action]]:
    """Run every client's queue symbolically: each client runs one ready action per tick;
    what an action yields is there from the next tick on. Returns the order each client
    ran its actions in; raises ScheduleDeadlock when no client can run anything."""
    ran: dict[int, list[Action]] = {c: [] for c in queues}
    clients = sorted(queues)
    while any(len(q) for q in queues.values()):
        produced: list[tuple[Token, int]] = []
        progressed = False
        for c in clients:
            a = queues[c].pop()
            if a is not None:
                progressed = True
                ran[c].append(a)
                produced += plans[c].outputs(a)
        if not progressed:
            raise _deadlock(queues, plans)
        for tok, dest in produced:
            if dest in queues and not queues[dest].produce(tok):
                raise ScheduleDeadlock(f"client {dest} got {tok} twice")
    return ran


class PipelineSchedule:
    """Every client's ordered list of actions of every step: the schedule as data.

    `plans` holds one `SplitPlan` per client (all with the same stage mapping, schedule and
    settings). The list of a step comes from a symbolic run of that step for all clients
    (see the module docstring), done once per step signature (which owners train, whether
    replicas sync) and cached; ``ordered(client, t)`` gives the entries with priority
    ``(t, local only, position in the list)`` (relaxed order; strict: ``local only`` is
    always False), which is all an executor needs.
    """

    def __init__(self, plans: dict[int, SplitPlan]):
        if not plans:
            raise ValueError("a pipeline schedule needs at least one client's plan")
        self.plans = plans
        first = next(iter(plans.values()))
        self.P, self.M, self.strict = first.P, first.M, first.strict
        self.name = first.schedule.name
        self._orders: dict[tuple, dict[int, list[int]]] = {}

    def signature(self, t: int) -> tuple:
        return next(iter(self.plans.values())).signature(t)

    def order(self, t: int) -> dict[int, list[int]]:
        """client -> the indices of `plan.step(t)`'s entries in list order (dry run of step t)."""
        sig = self.signature(t)
        if sig not in self._orders:
            queues: dict[int, DataflowQueue] = {}
            entries = {}
            for c, plan in self.plans.items():
                q = queues[c] = DataflowQueue()
                entries[c] = plan.step(t)
                for tok in plan.initial_tokens(t):
                    q.produce(tok)
                q.add_all(Scheduled(e.action, e.requires, (e.priority, i)) for i, e in enumerate(entries[c]))
            ran = _run(queues, self.plans)
            index = {c: {e.action: i for i, e in enumerate(entries[c])} for c in entries}
            self._orders[sig] = {c: [index[c][a] for a in ran[c]] for c in ran}
        return self._orders[sig]

    def ordered(self, client: int, t: int) -> list[Scheduled]:
        """Client `client`'s entries of step t in list order, priority (t, local only, position):
        in relaxed order a backward no peer waits for (`SplitPlan.local_only`) goes after the
        step's other ready actions."""
        plan = self.plans[client]
        entries = plan.step(t)
        late = (lambda a: False) if self.strict else plan.local_only
        return [Scheduled(entries[i].action, entries[i].requires, (t, late(entries[i].action), k))
                for k, i in enumerate(self.order(t)[client])]

    def check(self, steps: Iterable[int]) -> int:
        """Dry-run every distinct step of `steps` (raises ScheduleDeadlock); how many there were."""
        seen = set()
        for t in steps:
            sig = self.signature(t)
            if sig not in seen:
                seen.add(sig)
                self.order(t)
        return len(seen)

    def table(self, t: int = 0, width: int = 18) -> str:
        """The action table of step t: one column per client, its actions in list order."""
        lists = {c: [e.action.label(self.P) for e in self.ordered(c, t)] for c in sorted(self.plans)}
        width = max([width] + [len(x) + 1 for xs in lists.values() for x in xs])
        rows = max(len(xs) for xs in lists.values())
        head = "     " + "".join(f"client {c}".ljust(width) for c in lists)
        lines = [head.rstrip()]
        for i in range(rows):
            cells = "".join((xs[i] if i < len(xs) else "").ljust(width) for xs in lists.values())
            lines.append(f"{i + 1:>4} {cells}".rstrip())
        return "\n".join(lines)


def dry_run(plans: dict[int, SplitPlan] | PipelineSchedule, steps: int) -> dict[int, list[Action]]:
    """Run the lists of every client symbolically for `steps` steps, as the executor would
    (in order when the plans are strict, else any ready action by list priority), steps
    chained by their replica versions. Returns the actions each client ran, in order;
    raises ScheduleDeadlock naming what each client waits for when no client can run."""
    sched = plans if isinstance(plans, PipelineSchedule) else PipelineSchedule(plans)
    queues = {c: DataflowQueue(strict=sched.strict) for c in sched.plans}
    for c, plan in sched.plans.items():
        for tok in plan.initial_tokens():
            queues[c].produce(tok)
        for t in range(steps):
            queues[c].add_all(sched.ordered(c, t))
    return _run(queues, sched.plans)


__all__ = [
    "MICRO_SIZINGS", "SCHEDULES", "TAPER_LAST", "Action", "DataflowQueue", "GPipe", "OneFOneB", "PipelineSchedule",
    "Schedule", "ScheduleDeadlock", "Scheduled", "SplitPlan", "describe_blocked", "describe_token", "dry_run",
    "get_schedule", "micro_sizes",
]
