"""`split`: split learning across peers, driven by a stage configuration.

Every node is a client (client c = node uid c-1) and the owner of its data. The model is
cut into its P partitions; the stage configuration (``split.stages`` or
``split.stages_file``, see ``dflsplit.mappings.stages``), or PiPar's device/server layout
generated from ``split.server`` and ``split.split``, says which client runs each partition
of each owner's pipeline. A client keeps one *replica* (a copy of the partition, all built
from the same seed, with its own optimizer) per (owner, partition) it runs.

One training step: each owner draws a batch (the Training layer's sampler: every sample
of the shard once per pass) and splits it into ``split.micro_batches`` micro-batches;
each micro-batch flows forward through the owner's partitions (the activations travel to
the next partition's runner), the owner computes the loss on its own labels, and
gradients flow back along the same edges. Each runner keeps the autograd graph of its
forward and backpropagates through it (with ``split.checkpoint`` it keeps only the
partition's input and recomputes the inside, ``torch.utils.checkpoint``); gradients
accumulate over the micro-batches and each replica takes one optimizer step per batch
(optimizers from the Training layer). Labels and raw inputs never leave their owner.

The order of a step is data: ``split.schedule`` (``gpipe``, ``1f1b``) makes every client's
ordered list of actions (`split_schedule.PipelineSchedule`, dry-run at launch), and this
node executes its list: with ``split.order: relaxed`` any action whose inputs are there,
the list's order as priority; with ``strict`` in order. Sends and receives run in the
background: a sender thread publishes (encoding, rate limits, torrents), a receiver thread
takes and checks the arriving messages, so the forward of micro-batch k+1 runs while k
is on the wire. A payload is released as soon as the action that needs it ran. With
``split.workers`` > 1 the executor hands compute actions to that many threads
(`Workers`): actions of different owners run at once (a server's devices), an owner's one
at a time, a replica share or sync alone (`split_schedule.may_start`); their outputs are
made on the executor's thread when they finish, and an error on a worker ends the node.
With ``split.preempt`` (relaxed order) a client whose passes feed a peer runs its
backwards that no peer waits for (a device's, down to partition 1) on one more thread,
so that a pass a peer waits for (the head, the next forward) never waits behind one.
A node in ``split.slowdown`` emulates a slower processor (a device slower than the
server, as PiPar's): each forward, backward and update lasts its factor times the
pass's work here (its thread's CPU time with one torch thread, else its wall time; the
least of any pass of its kind, replica and size so far, so that this machine's load is
not magnified), the added wait holding none of the cores the nodes share
(`SlowerProcessor`); it is one processor, on which a background backward pauses while
another pass runs.

Replica synchronisation at the end of every ``split.sync_every`` steps (or epochs; in
device/server mode ``split.aggregation_frequency``, and through the server: each device
sends its share to it and gets the average back): the replicas of a partition are
combined by Sharing's aggregator (``sharing.aggregator``, so robust rules apply), weighted
by the samples each trained on since the last synchronisation. ``fedavg``: all replicas
of the partition (every runner ends with identical weights: each runner sends the
weighted mean of its own replicas to the other runners once, and all combine the same
shares in the same order); ``gossip``: with the runners that are neighbours in the peer
graph; ``none``. Replicas on one client are averaged locally, without the network. With
``split.mode: relay`` the owners train one after another, a turn lasting one
synchronisation period (Bloom's sequential relay).

Metrics: every round record has the executor's time per activity (data loading,
forward, backward, optimizer update, replica sync, sends, receives, idle; while workers
compute, the time is shared equally among their actions' activities) and their sum,
the sender's upload time, the transfer time of what arrived, the time a slower
processor added (``slowdown_seconds``, counted in its passes), the live activations' peak,
and what the node still holds (payloads, spool, mailbox); at the end each node adds its
row to ``results.csv`` in its machine's results folder (PiPar's columns and more).

Evaluation: each owner assembles its model from the replicas it uses (the runners send
theirs) and tests it. With ``split.save_model`` each node writes that model at the end to
``split_model_<uid>.safetensors`` in the run folder.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import itertools
import json
import math
import os
import queue
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Hashable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..communication import CommError, PayloadRejected, PeerTimeout
from ..communication.base import PayloadMismatch, check_payload
from ..communication.codec import describe
from ..graphs import Graph
from ..mappings.stages import client_to_uid, mapping_from_config, uid_to_client
from ..models import MODELS
from ..sharing import weighted_average
from ..training import BatchSampler, build_optimizer
from .base import NODES, Node
from .split_schedule import (
    SCHEDULES, Action, DataflowQueue, PipelineSchedule, SplitPlan, Token, describe_blocked, may_start,
    micro_sizes,
)

PREFIX = "split/x/"
EVAL_PREFIX = "split/eval/"

#: compute-thread activity of each action kind
ACTIVITY = {"fwd": "forward", "bwd": "backward", "step": "update", "share": "sync", "sync": "sync",
            "send": "send", "recv": "receive"}
COMPUTE = ("data_load", "forward", "backward", "update", "sync")
#: the actions a slower processor (``split.slowdown``) stretches: the passes and updates the profiler times
SLOWED = ("fwd", "bwd", "step")
COMMUNICATION = ("send", "receive")
ACTIVITIES = COMPUTE + COMMUNICATION + ("idle",)

#: columns of results.csv (one row per node): PiPar's device and server columns and more
RESULT_COLUMNS = (
    "node", "role", "rounds", "steps", "samples", "data_load_s", "forward_s", "backward_s", "update_s", "sync_s",
    "send_s", "receive_s", "idle_s", "compute_s", "comm_wait_s", "train_s", "accounted_pct", "upload_s",
    "download_s", "eval_s", "total_s", "mb_sent", "mb_received", "mb_communicated", "peak_activations",
    "test_loss", "test_acc", "held_end", "mailbox_end", "spool_end_bytes",
)


def payload_parts(value: torch.Tensor, chunk_bytes: int) -> list[torch.Tensor]:
    """`value` cut along its first dimension (whole samples) into parts of about
    `chunk_bytes` bytes (one sample each where a sample is larger); itself alone when
    `chunk_bytes` is 0 or it fits."""
    size = value.numel() * value.element_size()
    if not chunk_bytes or size <= chunk_bytes or value.ndim == 0 or value.shape[0] < 2:
        return [value]
    return list(torch.tensor_split(value, min(value.shape[0], -(-size // chunk_bytes))))


class PartAssembler:
    """Puts payloads sent in parts (`payload_parts`) back together: part `i` of `k` of a
    token, in any order; the whole tensor (the parts concatenated in order) once all `k`
    arrived, with its transfer time (the first part sent to the last one arrived). A part
    that contradicts the token's others (another count, one already here, another feature
    shape) is refused with ValueError and changes nothing."""

    def __init__(self):
        self._pending: dict[Token, tuple[int, dict[int, torch.Tensor], list[float]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, tok: Token, i: int, k: int, x: torch.Tensor, sent: float,
            arrived: float) -> Optional[tuple[torch.Tensor, float]]:
        if not 0 <= i < k:
            raise ValueError(f"part {i} of {k}: expected 0 <= part < count")
        count, parts, times = self._pending.get(tok, (k, {}, [sent, arrived]))
        if count != k:
            raise ValueError(f"part {i} of {k}: the payload's other parts came as parts of {count}")
        if i in parts:
            raise ValueError(f"part {i} of {k} arrived twice")
        if parts and tuple(x.shape[1:]) != tuple(next(iter(parts.values())).shape[1:]):
            raise ValueError(f"part {i} of {k}: a shape unlike the payload's other parts")
        parts[i] = x
        times[0], times[1] = min(times[0], sent), max(times[1], arrived)
        if len(parts) < k:
            self._pending[tok] = (count, parts, times)
            return None
        self._pending.pop(tok, None)
        return torch.cat([parts[j] for j in range(k)]), max(0.0, times[1] - times[0])


class SplitError(RuntimeError):
    """A split-learning run cannot go on; the message says which node and why."""


class SplitTimeout(SplitError, TimeoutError):
    """Nothing arrived in time; the message lists what the node was waiting for and from whom."""


def model_partitions(cfg) -> int:
    """P of the configured model: declared by the model, else ``model.partitions`` (default 1)."""
    declared = MODELS.get(cfg.model.name).num_partitions
    return declared if declared is not None else (getattr(cfg.model, "partitions", None) or 1)


def stage_mapping(cfg):
    """The validated `StageMapping` of a config (one row per node, 2P stages)."""
    return mapping_from_config(cfg, partitions=model_partitions(cfg))


def data_shard_of(cfg, uid: int) -> tuple[int, int] | None:
    """(index, count) of node `uid`'s training shard; None for a device/server run's server."""
    server = cfg.split.server
    if server is None:
        return uid, cfg.num_nodes
    if uid == server:
        return None
    return uid - (uid > server), cfg.num_nodes - 1


def trainers_of(cfg) -> list[int]:
    """The clients (1-based) that hold data and train."""
    return [uid_to_client(u) for u in range(cfg.num_nodes) if data_shard_of(cfg, u) is not None]


def batch_sampler(cfg, uid: int, num_samples: int) -> BatchSampler:
    """The batches owner `uid` draws: what the Training layer's `make_sampler(drop_last=False)`
    of node `uid` draws (seeded as `local_sgd` seeds node `uid`), every sample once per pass."""
    generator = torch.Generator().manual_seed(cfg.run.seed * 100003 + uid)
    return BatchSampler(num_samples, cfg.training.batch_size, generator, drop_last=False)


def sync_settings(cfg) -> tuple[str, int, str]:
    """(sync, every, unit) of a config: ``split.sync``, ``sync_every``, ``sync_unit``, or in
    device/server mode ``split.aggregation_frequency`` when set (-1: each epoch, 0: never).
    In device/server mode fedavg goes through the server (``star``), as in PiPar: each
    device uploads its share once and downloads the average once."""
    sp = cfg.split
    k = sp.aggregation_frequency
    sync, every, unit = sp.sync, sp.sync_every, sp.sync_unit
    if sp.server is not None and k is not None:
        if k == 0:
            sync, every, unit = "none", 1, "steps"
        else:
            sync, every, unit = ("fedavg", 1, "epochs") if k == -1 else ("fedavg", k, "steps")
    if sp.server is not None and sync == "fedavg":
        sync = "star"
    return sync, every, unit


def steps_per_epoch(cfg, dataset=None) -> int:
    """Steps for every owner to pass over its shard once: max over owners of ceil(n / batch)."""
    from ..datasets import build_dataset

    dataset = dataset if dataset is not None else build_dataset(cfg)
    b = cfg.training.batch_size
    sizes = []
    for u in range(cfg.num_nodes):
        shard = data_shard_of(cfg, u)
        if shard is not None:
            sizes.append(len(dataset.partition_train(shard[1])[shard[0]]))
    return max(math.ceil(n / min(b, n)) for n in sizes if n > 0)


def split_timeline(cfg, dataset=None) -> tuple[int, int]:
    """(steps per round, steps between synchronisations) of a config."""
    t = cfg.training
    _, every, unit = sync_settings(cfg)
    epoch = None
    if t.local_steps is None or unit == "epochs":
        epoch = steps_per_epoch(cfg, dataset)
    steps = t.local_steps if t.local_steps is not None else max(1, math.ceil(t.local_epochs * epoch))
    period = every if unit == "steps" else every * epoch
    return steps, period


def build_schedule(cfg, stages, period: int) -> PipelineSchedule:
    """The run's `PipelineSchedule`: one plan per client with the configured schedule,
    micro-batches, order and sync."""
    sync, _, _ = sync_settings(cfg)
    sp = cfg.split
    trainers = trainers_of(cfg)
    hub = uid_to_client(sp.server) if sp.server is not None else None
    plans = {c: SplitPlan(stages, c, sp.micro_batches, sync, period, relay=sp.mode == "relay", schedule=sp.schedule,
                          strict=sp.order == "strict", trainers=trainers, hub=hub, preempt=sp.preempt)
             for c in range(1, stages.num_clients + 1)}
    return PipelineSchedule(plans)


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict (what synchronisation averages)."""
    return {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}


class Replica:
    """Owner `owner`'s copy of partition `partition`, with its optimizer and the samples
    it trained on since the last synchronisation."""

    def __init__(self, owner: int, partition: int, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.owner, self.partition = owner, partition
        self.module = module.train()
        self.optimizer = optimizer
        self.samples = 0


class Clock:
    """Seconds per activity of the executor, on one timeline: `charge(activity)` gives the
    time since the last charge to `activity` (or, given several, split equally among them:
    actions running at once on the node's workers), so every moment counts once; time
    taken inside it by `within` goes to that other activity instead."""

    def __init__(self):
        self.seconds: dict[str, float] = dict.fromkeys(ACTIVITIES, 0.0)
        self._last = time.perf_counter()
        self._moved: dict[str, float] = {}

    def charge(self, *activities: str) -> None:
        now = time.perf_counter()
        share = (now - self._last - sum(self._moved.values())) / len(activities)
        for k in activities:
            self.seconds[k] += share
        for k, v in self._moved.items():
            self.seconds[k] += v
        self._moved.clear()
        self._last = now

    @contextmanager
    def within(self, activity: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._moved[activity] = self._moved.get(activity, 0.0) + time.perf_counter() - t0


class Timeline:
    """One node's timeline for ``split.trace``, as Chrome trace events (ui.perfetto.dev,
    chrome://tracing): compute actions on one track, the payloads the uplink carried on a
    second, arrivals (from the sender's time stamp to their receipt) on a third; with
    several workers (``split.workers``) each has its compute track (``compute 2``, ...).
    Times are wall-clock microseconds, so the timelines of one machine's nodes line up."""

    TRACKS = {"compute": 1, "uplink": 2, "arrivals": 3}

    def __init__(self, uid: int, name: str, workers: int = 1):
        self.uid = uid
        self.tracks = dict(self.TRACKS) | {f"compute {k + 1}": 3 + k for k in range(1, workers)}
        self.events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": uid, "args": {"name": name}}]
        self.events += [{"name": "thread_name", "ph": "M", "pid": uid, "tid": tid, "args": {"name": track}}
                        for track, tid in self.tracks.items()]
        self._lock = threading.Lock()

    def span(self, track: str, name: str, start: float, end: float, **args: Any) -> None:
        """A complete event on `track` from `start` to `end` (time.time() seconds)."""
        event = {"name": name, "ph": "X", "pid": self.uid, "tid": self.tracks[track], "ts": start * 1e6,
                 "dur": max(0.0, end - start) * 1e6, "args": args}
        with self._lock:
            self.events.append(event)

    def compute(self, a: Action, partitions: int, worker: int, start: float, end: float) -> None:
        """Action `a`, computed from `start` to `end` by worker `worker`; on worker 0's track
        also what the executor's own thread computes (no worker threads)."""
        track = "compute" if worker == 0 else f"compute {worker + 1}"
        self.span(track, a.label(partitions), start, end, step=a.step, kind=a.kind, owner=a.owner,
                  partition=a.partition)

    def write(self, path: Path) -> None:
        with self._lock:
            path.write_text(json.dumps({"traceEvents": self.events, "displayTimeUnit": "ms"}))


class Workers:
    """A split node's compute threads (``split.workers`` > 1, or ``split.preempt``'s
    background thread): each takes the next action handed to `start`, runs it with `run`,
    and reports to `done` (the node's arrivals queue, so the executor wakes on whichever
    comes first) ``("done", action, worker, start, end)``, or ``("error", exception)``,
    which ends the node with its cause."""

    def __init__(self, count: int, uid: int, run, done: "queue.Queue[tuple]"):
        self._run, self._done = run, done
        self._jobs: "queue.Queue[Optional[Action]]" = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, args=(k,), name=f"split-compute-{uid}-{k}", daemon=True)
                         for k in range(count)]
        for t in self._threads:
            t.start()

    def start(self, action: Action) -> None:
        self._jobs.put(action)

    def _loop(self, worker: int) -> None:
        while (a := self._jobs.get()) is not None:
            began = time.time()
            try:
                self._run(a)
            except BaseException as e:  # noqa: BLE001 - raised on the executor's thread
                self._done.put(("error", e))
                continue
            self._done.put(("done", a, worker, began, time.time()))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=5)


class SlowerProcessor:
    """Emulates a processor `factor` times slower than this machine's (``split.slowdown``):
    a pass whose work took `work` seconds of a core here (the least of its key so far,
    see `after`) lasts factor x `work`; `after` waits what the pass's `took` seconds (its
    wall time here) leave of that. The wait holds
    no core: each emulated device has its own processor, as the one it stands for would,
    and so the other nodes' load on this machine's cores does not slow it.

    It is one processor: a pass on the background thread (``split.preempt``) makes no
    progress while a pass in front of it runs (priority preemption). It ends once it had
    factor x `work` seconds free of them since it began. Passes bracket their work with
    `begin` and `after` (`abandon` when they fail)."""

    #: seconds between checks of a background pass waiting for the passes in front of it
    POLL = 0.5

    def __init__(self, factor: float = 1.0, sleep=time.sleep, clock=time.monotonic):
        self.factor = float(factor)
        self.waited = 0.0  # seconds added to the passes' own time so far (not their pauses)
        self._sleep, self._clock = sleep, clock
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._back: dict[int, tuple[float, float]] = {}  # background ticket -> (began, `_front_time` then)
        self._front: set[int] = set()  # passes in front that run now
        self._front_total = 0.0  # seconds with a pass in front running, up to `_front_since`
        self._front_since = 0.0
        self._least: dict[Hashable, float] = {}  # pass key -> the least work it took

    def begin(self, background: bool = False) -> int:
        """A pass starts (on the background thread or not); the ticket to give `after`."""
        with self._cond:
            ticket = next(self._tickets)
            if self.factor > 1:
                now = self._clock()
                if background:
                    self._back[ticket] = (now, self._front_time(now))
                else:
                    if not self._front:
                        self._front_since = now
                    self._front.add(ticket)
            return ticket

    def after(self, took: float, work: float, ticket: Optional[int] = None, key: Hashable = None) -> None:
        """The pass of `ticket` did its `work` in `took` seconds: wait out the rest of its
        emulated time (a background pass: until it had factor x `work` seconds free of the
        passes in front of it). With a `key` (the pass's kind, replica and rows) the work is
        the least any pass of that key did so far: the emulated processor's speed does not
        follow this machine's load (other nodes, other tenants), which factor would magnify."""
        if self.factor <= 1:
            return
        if key is not None:
            with self._cond:
                work = self._least[key] = min(self._least.get(key, work), work)
        if ticket is None or ticket not in self._back:
            extra = self.factor * work - took
            if extra > 0:
                with self._cond:
                    self.waited += extra
                self._sleep(extra)
            if ticket is not None:
                self.abandon(ticket)
            return
        with self._cond:
            began, front0 = self._back.pop(ticket)
            need = self.factor * work
            self.waited += max(0.0, need - took)  # its own added time; a pause is the others' passes
            while True:
                now = self._clock()
                left = need - (now - began - (self._front_time(now) - front0))
                if left <= 0:
                    break
                if self._front:  # no progress while a pass in front runs
                    self._cond.wait(self.POLL)
                    continue
                self._cond.release()
                try:
                    self._sleep(left)
                finally:
                    self._cond.acquire()

    def abandon(self, ticket: int) -> None:
        """The pass of `ticket` ended (or failed): it no longer holds the processor."""
        with self._cond:
            self._back.pop(ticket, None)
            if ticket in self._front:
                now = self._clock()
                self._front_total = self._front_time(now)
                self._front_since = now
                self._front.discard(ticket)
                self._cond.notify_all()

    def _front_time(self, now: float) -> float:
        """Seconds so far with at least one pass in front running (caller holds the lock)."""
        return self._front_total + (now - self._front_since if self._front else 0.0)


class Sender:
    """Publishes in a background thread so that compute never waits on a send (spooling,
    hashing, rate limits, a torrent to seed). Queued payloads go out by `priority` (lower
    first), in order within one priority: a gradient (``GRADIENT``) passes activations
    queued before it, because the peer's backward and this node's next forward wait on
    it, and replica shares (``SHARE``) go last. `busy` sums the seconds spent publishing
    (the time the node's uplink carried its payloads); an error is raised on the compute
    thread by `check`."""

    GRADIENT, ACTIVATION, SHARE = 0, 1, 2

    def __init__(self, transport, uid: int, timeline: Optional[Timeline] = None):
        self.transport = transport
        self.timeline = timeline
        self.busy = 0.0
        self.error: Optional[BaseException] = None
        self._jobs: "queue.PriorityQueue[tuple]" = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._loop, name=f"split-send-{uid}", daemon=True)
        self._thread.start()

    def publish(self, key: str, tensors: dict[str, torch.Tensor], to: list[int], header: dict | None = None,
                priority: int = SHARE) -> None:
        self.check()
        self._jobs.put((priority, next(self._order), (key, tensors, to, dict(header or {}))))

    def _loop(self) -> None:
        while True:
            _, _, job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    key, tensors, to, header = job
                    t0 = time.perf_counter()
                    header["sent"] = start = time.time()
                    self.transport.publish(key, tensors, to=to, header=header)
                    self.busy += time.perf_counter() - t0
                    if self.timeline is not None:
                        self.timeline.span("uplink", key, start, time.time(), to=to)
            except BaseException as e:  # noqa: BLE001 - raised on the compute thread
                self.error = e
            finally:
                self._jobs.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until everything queued is published."""
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        self.check()
        if self._jobs.unfinished_tasks:
            raise SplitError(f"sends still queued after {timeout:g} s (communication.timeout)")

    def close(self) -> None:
        self._jobs.put((math.inf, next(self._order), None))
        self._thread.join(timeout=5)


@NODES.register("split")
class SplitNode(Node):
    """Runs its client's actions of the pipeline schedule; see the module docstring."""

    def __init__(self, context):
        super().__init__(context)
        cfg, sp = self.cfg, self.cfg.split
        self.stages = context["stages"] if "stages" in context else stage_mapping(cfg)
        self.client = uid_to_client(self.uid)
        self.P = self.stages.P
        parts = list(self.model.children())
        if len(parts) != self.P:
            raise SplitError(f"model {cfg.model.name!r} has {len(parts)} partitions, the stage configuration {self.P}")
        self.device = context.get("device", "cpu")
        self.aggregation = context["sharing"].aggregate_fn  # replica sync across clients (sharing.aggregator)
        self.steps_per_round, period = context["timeline"] if "timeline" in context else split_timeline(cfg)
        self.schedule: PipelineSchedule = context.get("schedule") or build_schedule(cfg, self.stages, period)
        self.plan = self.schedule.plans[self.client]
        self.training = context.get("training")
        make_opt = self.training.make_optimizer if self.training is not None else (
            lambda params: build_optimizer(cfg.optimizer, params))
        self.replicas = {}
        for o, p in self.plan.hosted:
            module = copy.deepcopy(parts[p - 1])
            self.replicas[(o, p)] = Replica(o, p, module, make_opt(module.parameters()))
        self.sampler = self.training.make_sampler(drop_last=False) if self.training is not None else None
        self.trains = self.client in self.plan.trainers
        if self.trains and sp.micro_batches > self.sampler.batch_size:
            raise SplitError(
                f"{cfg.path or '<config>'}: section 'split': key 'micro_batches' is {sp.micro_batches}, more than "
                f"node {self.uid}'s batch of {self.sampler.batch_size} samples")
        self.role = ("server" if self.uid == sp.server else "device") if sp.server is not None else "client"
        self.processor = SlowerProcessor(sp.slowdown.get(self.uid, 1.0))
        self._work_is_cpu = torch.get_num_threads() == 1  # a pass's work is its thread's CPU time (else wall time)
        self.shapes, self.dtype = self._feature_shapes()
        self.sync_expect = {p: describe(float_state(parts[p - 1])) for p in self.plan.partitions}
        self.queue = DataflowQueue(strict=self.plan.strict)
        self.num_workers = self.plan.workers(sp.workers)
        background = self.plan.background_rule
        self.threads = self.num_workers + (background is not None)  # compute threads: workers and background
        self.running: list[Action] = []  # actions the workers compute now
        self.workers: Optional[Workers] = None
        self._may_start = ((lambda a: may_start(a, self.running, self.num_workers, background))
                           if self.threads > 1 else None)
        for tok in self.plan.initial_tokens():
            self.queue.produce(tok)
        self.inbox: dict[Token, Any] = {}
        self.outbox: dict[Token, torch.Tensor] = {}
        self.saved: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.shares: dict[tuple[int, int], tuple[dict[str, torch.Tensor], int]] = {}
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.batch_sizes: dict[int, int] = {}
        self.losses: dict[int, float] = {}
        self.trained = torch.zeros(len(self.data.train_y), dtype=torch.int64)  # times each sample was trained on
        self.round = 0
        self.first_step = 0
        self.clock = Clock()
        self.totals: dict[str, float] = defaultdict(float)
        self.last_test: dict[str, float] = {}
        self.sender: Optional[Sender] = None
        self.arrivals: "queue.Queue[tuple]" = queue.Queue()
        self.parts = PartAssembler()  # payloads arriving in parts (split.chunk_bytes), on the receiving thread
        self._stop = threading.Event()
        self._receiver: Optional[threading.Thread] = None
        self._download = 0.0
        self._upload_seen = 0.0
        self._slowed_seen = 0.0

    # the launcher's hooks ----------------------------------------------------------------
    @classmethod
    def topology(cls, cfg, stages=None) -> Graph:
        """The peer graph of the stage configuration (clients that exchange activations), in uids."""
        m = stages if stages is not None else stage_mapping(cfg)
        return Graph(cfg.num_nodes, [(client_to_uid(u), client_to_uid(v)) for u, v in m.peer_graph()])

    @classmethod
    def prepare(cls, cfg, dataset=None) -> dict[str, Any]:
        """Resolve ``auto`` in ``split``, ``micro_batches`` and ``micro_sizes`` with the profiler
        (the choice is written into the config, so every machine must agree on it), then the stage mapping
        (parsed and validated once), its peer graph, the timeline, and the pipeline schedule,
        dry-run for every distinct step of the run before anything trains."""
        sp = cfg.split
        if "auto" in (sp.split, sp.micro_batches, sp.micro_sizes):
            from .split_profile import resolve_auto

            resolve_auto(cfg, dataset)
        m = stage_mapping(cfg)
        steps, period = split_timeline(cfg, dataset)
        schedule = build_schedule(cfg, m, period)
        schedule.check(range(steps * cfg.run.rounds))
        return {"graph": cls.topology(cfg, m), "stages": m, "timeline": (steps, period), "schedule": schedule}

    @classmethod
    def data_shard(cls, cfg, uid: int) -> tuple[int, int] | None:
        return data_shard_of(cfg, uid)

    @classmethod
    def check_config(cls, cfg) -> str | None:
        sp, n = cfg.split, cfg.num_nodes
        if sp.schedule not in SCHEDULES:
            return (f"section 'split': key 'schedule': unknown schedule {sp.schedule!r}; "
                    f"known: {', '.join(SCHEDULES.names())}")
        if "auto" in (sp.split, sp.micro_batches, sp.micro_sizes) and cfg.run.machines > 1:
            return ("section 'split': keys 'split'/'micro_batches'/'micro_sizes': auto is chosen by profiling one "
                    "machine; with several machines set them (dflsplit profile CONFIG prints the choice)")
        if cfg.run.checkpoint_every:
            return ("section 'run': key 'checkpoint_every': split nodes are not checkpointed (their replicas, "
                    "optimizers and pipelines would restart from scratch on --resume); set it to 0")
        if cfg.training.name != "local_sgd":
            return (f"section 'training': key 'name': split nodes run their own steps (local_sgd's sampler and "
                    f"optimizer); training {cfg.training.name!r} is for gossip and federated nodes")
        if sp.server is None:
            if sp.aggregation_frequency is not None:
                return "section 'split': key 'aggregation_frequency' is for the device/server mode (set 'server')"
            if sp.split == "auto":
                return "section 'split': key 'split': auto is for the device/server mode (set 'server')"
            return None
        if not 0 <= sp.server < n:
            return f"section 'split': key 'server': uid {sp.server} is not a node of the run (uids 0..{n - 1})"
        if n < 2:
            return "section 'split': key 'server': the device/server mode needs the server and at least one device"
        if sp.stages is not None or sp.stages_file is not None:
            return "section 'split': key 'server' generates the stage configuration; unset 'stages' and 'stages_file'"
        if sp.mode != "parallel":
            return "section 'split': key 'mode': the device/server mode trains every device every step (parallel)"
        P = model_partitions(cfg)
        if sp.split != "auto" and not (sp.split == -1 or 1 <= sp.split <= P - 2):
            valid = "-1" + (f" or 1..{P - 2}" if P > 2 else "")
            return (f"section 'split': key 'split': {sp.split} is not a device/server split of model "
                    f"{cfg.model.name!r} ({P} partitions): expected {valid} or auto")
        return None

    def peers(self) -> list[int]:
        """Everyone this node exchanges with: pipeline neighbours, sync partners, and the
        owners and runners it swaps replicas with for evaluation."""
        c, m = self.client, self.stages
        others = set(m.neighbors(c)) | {o for o, _ in self.plan.hosted} | set(m.runners[c])
        for ps in self.plan.partners.values():
            others |= set(ps)
        return sorted(client_to_uid(x) for x in others - {c})

    # shapes --------------------------------------------------------------------------------
    @torch.no_grad()
    def _feature_shapes(self) -> tuple[list[tuple[int, ...]], torch.dtype]:
        """Per-sample shapes of the model's input (index 0) and of each partition's output."""
        was = self.model.training
        self.model.eval()
        x = torch.zeros(1, *self.data.input_shape, device=self.device)
        shapes = [tuple(x.shape[1:])]
        for part in self.model.children():
            x = part(x)
            shapes.append(tuple(x.shape[1:]))
        self.model.train(was)
        return shapes, next(self.model.parameters()).dtype

    # lifecycle ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.timeline = Timeline(self.uid, f"node {self.uid} (client {self.client}, {self.role})",
                                 self.threads) if self.cfg.split.trace else None
        self.sender = Sender(self.transport, self.uid, self.timeline)
        if self.threads > 1:
            self.workers = Workers(self.threads, self.uid, self._compute, self.arrivals)
        self._receiver = threading.Thread(target=self._receive_loop, name=f"split-recv-{self.uid}", daemon=True)
        self._receiver.start()
        try:
            super().run()
            self.sender.flush(self.cfg.communication.timeout)
            self._write_results_csv()
            if self.timeline is not None:
                self.timeline.write(Path(self.ctx.get("run_dir", ".")) / f"trace_{self.uid}.json")
        finally:
            self._stop.set()
            self.sender.close()
            if self.workers is not None:
                self.workers.close()
            self._receiver.join(timeout=5)
        if self.cfg.split.save_model:
            self.save_model("split_model")

    # one round ---------------------------------------------------------------------------------
    def run_round(self, round_: int) -> dict:
        self.round = round_
        S = self.steps_per_round
        self.first_step = t0 = round_ * S
        steps = range(t0, t0 + S)
        self.clock = clock = Clock()
        start = time.perf_counter()
        peak = 0
        for t in steps:
            if self.trains and self.client in self.plan.active(t):
                batch = self.sampler.next()
                sizes = micro_sizes(len(batch), self.plan.M, self.cfg.split.micro_sizes)
                self.batches[t] = list(torch.split(batch, sizes))
                self.batch_sizes[t] = len(batch)
                self.losses[t] = 0.0
        for t in steps:
            self.queue.add_all(self.schedule.ordered(self.client, t))
        clock.charge("data_load")  # the round's batches drawn and its actions queued
        timeout = self.cfg.communication.timeout
        deadline = time.monotonic() + timeout
        while len(self.queue) or self.running:
            self.sender.check()
            self._take_arrivals(None)
            clock.charge("receive")
            peak = max(peak, len(self.saved))
            action = self.queue.pop(self._may_start)
            if action is not None:
                if self.workers is not None and action.kind not in ("send", "recv"):
                    self.running.append(action)  # computed by a worker; `_done` takes its outputs
                    self.workers.start(action)
                else:
                    began = time.time()
                    self._run(action)
                    clock.charge(ACTIVITY[action.kind])
                    if self.timeline is not None and action.kind not in ("send", "recv"):
                        self.timeline.compute(action, self.P, 0, began, time.time())
                deadline = time.monotonic() + timeout
                continue
            computing = [ACTIVITY[a.kind] for a in self.running]
            if self._take_arrivals(deadline):
                deadline = time.monotonic() + timeout
            if computing:  # the node's time while its workers computed goes to what they computed
                clock.charge(*computing)
            else:
                clock.charge("idle")
        wall = time.perf_counter() - start
        self.queue.forget(t0 + S)
        self.batches.clear()
        self.batch_sizes.clear()
        losses = [self.losses.pop(t) for t in steps if t in self.losses]
        record: dict[str, Any] = {"steps_trained": len(losses), "role": self.role}
        if losses:  # an owner waiting for its turn (relay) or a server has no training loss this round
            record["train_loss"] = sum(losses) / len(losses)
        record.update(self._round_metrics(wall, peak))
        return record

    def _round_metrics(self, wall: float, peak: int) -> dict[str, Any]:
        sec = self.clock.seconds
        compute = sum(sec[k] for k in COMPUTE)
        comm = sum(sec[k] for k in COMMUNICATION)
        upload = self.sender.busy - self._upload_seen
        self._upload_seen = self.sender.busy
        slowed = self.processor.waited - self._slowed_seen  # inside compute: the emulated processor's extra time
        self._slowed_seen = self.processor.waited
        out = {f"{k}_seconds": sec[k] for k in ACTIVITIES}
        out.update(compute_seconds=compute, comm_wait_seconds=comm, train_seconds=wall,
                   accounted=(compute + comm + sec["idle"]) / wall if wall > 0 else 1.0,
                   upload_seconds=upload, download_seconds=self._download, slowdown_seconds=slowed,
                   peak_activations=peak,
                   **self.holdings())
        if len(self.trained):
            out["sample_counts"] = [int(self.trained.min()), int(self.trained.max())]
        for k in ACTIVITIES:
            self.totals[k] += sec[k]
        self.totals.update(train=self.totals["train"] + wall, upload=self.totals["upload"] + upload,
                           download=self.totals["download"] + self._download,
                           peak=max(self.totals["peak"], peak))
        self._download = 0.0
        return out

    def holdings(self, suffix: str = "") -> dict[str, int]:
        """What this node still holds: payloads of the steps it ran (inbox, outbox, saved
        activations, shares; 0 after a round: a peer's early payloads of the next round may
        be here, and are not counted; at the end of the run every payload, with those still
        in parts), messages in the transport's mailbox (peers' early messages of the next
        round or the evaluation may be there during a run) and bytes in the transport's
        spool (torrents kept for retention_rounds)."""
        upto = math.inf if suffix else self.first_step + self.steps_per_round
        held = (sum(k[1] < upto for k in (*self.inbox, *self.outbox))  # (kind, step, ...)
                + sum(k[0] < upto for k in (*self.saved, *self.shares)))  # (step, ...)
        return {("held" + suffix if suffix else "held_payloads"): held + (len(self.parts) if suffix else 0),
                ("mailbox" + suffix if suffix else "mailbox_messages"): len(getattr(self.transport, "mailbox", ())),
                ("spool" + suffix + "_bytes" if suffix else "spool_bytes"):
                _folder_bytes(getattr(self.transport, "spool", None))}

    def _run(self, a: Action) -> None:
        """Run one action: its handler, then the tokens it makes here (what goes to another
        client leaves through a send or a share)."""
        if a.kind == "send":
            self._send(a)
        elif a.kind == "recv":
            self._recv(a)
        else:
            self._compute(a)
        self._produce(a)

    def _compute(self, a: Action) -> None:
        """A compute action's handler, with a core of the process (several nodes per
        process), never while waiting; on a worker thread with ``split.workers`` > 1 or a
        background thread (``split.preempt``)."""
        handler = {"fwd": self._forward, "bwd": self._backward, "step": self._step, "share": self._share_out,
                   "sync": self._sync}[a.kind]
        if a.kind not in SLOWED:
            with self.compute:
                handler(a)
            return
        with self.compute:
            ticket = self.processor.begin(self.plan.background(a))
            try:
                t0, cpu0 = time.perf_counter(), time.thread_time()
                rows = handler(a)
                took, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
            except BaseException:
                self.processor.abandon(ticket)
                raise
        self.processor.after(took, cpu if self._work_is_cpu else took, ticket, (a.kind, a.owner, a.partition, rows))

    def _produce(self, a: Action) -> None:
        for tok, dest in self.plan.outputs(a):
            if dest == self.client:
                self.queue.produce(tok)

    def _done(self, a: Action, worker: int, began: float, ended: float) -> None:
        """A worker finished `a`: its tokens are made here, on the executor's thread."""
        self.running.remove(a)
        self._produce(a)
        if self.timeline is not None:
            self.timeline.compute(a, self.P, worker, began, ended)

    def _hand_on(self, token: Token, value: torch.Tensor, dest: int) -> None:
        """A pass's result for the next one: here (inbox) or to send (outbox)."""
        (self.inbox if dest == self.client else self.outbox)[token] = value

    # actions -------------------------------------------------------------------------------------
    def _forward(self, a: Action) -> int:
        """Partition p's forward of micro-batch m (the loss at the last); its rows."""
        t, o, p, m = a.step, a.owner, a.partition, a.micro
        rep = self.replicas[(o, p)]
        if p == 1:
            idx = self.batches[t][m]
            with self.clock.within("data_load") if self.workers is None else nullcontext():  # else: forward's
                x = self.data.train_x[idx]
            self.trained[idx] += 1
        else:
            x = self.inbox.pop(("act", t, o, p, m)).requires_grad_(True)
        rep.samples += x.shape[0]
        out = activation_checkpoint(rep.module, x, use_reentrant=False) if self.cfg.split.checkpoint else rep.module(x)
        if p < self.P:
            self.saved[(t, o, p, m)] = (x, out)
            self._hand_on(("act", t, o, p + 1, m), out.detach(), self.stages.runner(o, p + 1))
            return x.shape[0]
        idx = self.batches[t][m]
        if out.shape[0] != len(idx):
            sender = self._source(("net_act", t, o, p, m)) or "this client"
            raise SplitError(f"node {self.uid}: the activation of {a.describe(self.P)} from {sender} has "
                             f"{x.shape[0]} samples; micro-batch {m} of step {t} has {len(idx)}")
        loss = nn.functional.cross_entropy(out, self.data.train_y[idx], reduction="sum") / self.batch_sizes[t]
        self.losses[t] += loss.item()
        self.saved[(t, o, p, m)] = (x, loss)
        return x.shape[0]

    def _backward(self, a: Action) -> int:
        """Partition p's backward of micro-batch m; its rows."""
        t, o, p, m = a.step, a.owner, a.partition, a.micro
        x, out = self.saved.pop((t, o, p, m))
        if p == self.P:
            out.backward()
        else:
            grad = self.inbox.pop(("grad", t, o, p, m))
            if grad.shape != out.shape:
                sender = self._source(("net_grad", t, o, p, m)) or "this client"
                raise SplitError(f"node {self.uid}: the gradient of {a.describe(self.P)} from {sender} has shape "
                                 f"{tuple(grad.shape)}; the activation sent for it had {tuple(out.shape)}")
            out.backward(grad)
        if p > 1:
            g = x.grad if x.grad is not None else torch.zeros_like(x)
            self._hand_on(("grad", t, o, p - 1, m), g, self.stages.runner(o, p - 1))
        return x.shape[0]

    def _send(self, a: Action) -> None:
        """An activation or gradient to its peer; in parts over ``split.chunk_bytes`` (keys
        ending in /part/count), each queued with the payload's priority."""
        tok = (a.what, a.step, a.owner, a.partition, a.micro)
        key = PREFIX + "/".join(map(str, tok))
        priority = Sender.GRADIENT if a.what == "grad" else Sender.ACTIVATION
        parts = payload_parts(self.outbox.pop(tok), self.cfg.split.chunk_bytes)
        for i, part in enumerate(parts):
            self.sender.publish(key if len(parts) == 1 else f"{key}/{i}/{len(parts)}", {"x": part},
                                [client_to_uid(a.peer)], priority=priority)

    def _recv(self, a: Action) -> None:
        tok = (a.what, a.step, a.owner, a.partition, a.micro)
        self.inbox[tok] = self.inbox.pop((f"net_{a.what}",) + tok[1:]).to(self.device)

    def _step(self, a: Action) -> None:
        rep = self.replicas[(a.owner, a.partition)]
        rep.optimizer.step()
        rep.optimizer.zero_grad(set_to_none=True)

    def _share(self, p: int) -> tuple[dict[str, torch.Tensor], int]:
        """The samples-weighted mean of this client's replicas of `p`, and their samples."""
        reps = [self.replicas[(o, p)] for o in self.plan.local_owners[p]]
        n = sum(r.samples for r in reps)
        weights = [r.samples / n for r in reps] if n else [1 / len(reps)] * len(reps)
        return weighted_average([float_state(r.module) for r in reps], weights), n

    def _share_out(self, a: Action) -> None:
        share, n = self._share(a.partition)
        self.shares[(a.step, a.partition)] = (share, n)
        partners = self.plan.partners[a.partition]
        if self.attacks_messages:  # a Byzantine runner: its replica update is the attack's (it keeps its own)
            f = len(({client_to_uid(r) for r in partners} | {self.uid}) & self.cfg.byzantine)
            share = self.craft(share, [share], len(partners) + 1, f, a.step)
        key = f"{PREFIX}sync/{a.step}/{a.partition}/{self.client}"
        self.sender.publish(key, {k: v.clone() for k, v in share.items()}, [client_to_uid(r) for r in partners],
                            {"samples": n})

    def _sync(self, a: Action) -> None:
        t, p = a.step, a.partition
        reps = [self.replicas[(o, p)] for o in self.plan.local_owners[p]]
        if not self.plan.syncs_at(t):
            return
        partners = self.plan.partners[p]
        if not partners and len(reps) == 1:
            reps[0].samples = 0
            return
        own = self.shares.pop((t, p), None) or self._share(p)
        if self.plan.star(p) and self.client != self.plan.hub:  # a spoke: the hub's average
            new = self.inbox.pop(("avg", t, p))
            for rep in reps:
                rep.module.load_state_dict(new, strict=False)
                rep.samples = 0
            return
        shares = {self.client: own}
        for r in partners:
            shares[r] = self.inbox.pop(("sync", t, p, r))
        if not partners:  # only this client's replicas: their local average is the result
            for rep in reps:
                rep.module.load_state_dict(own[0], strict=False)
                rep.samples = 0
            return
        ids = sorted(shares)
        if self.aggregation.chain != ["mixing"]:  # robust rules may single out row 0: the own share
            ids = [self.client, *sorted(set(shares) - {self.client})]
        # (mixing sums in one order on every client, so that their replicas stay bit-identical)
        total = sum(shares[i][1] for i in ids)
        weights = [shares[i][1] / total for i in ids] if total else [1 / len(ids)] * len(ids)
        new = self.aggregation([shares[i][0] for i in ids], weights)
        if self.plan.star(p):  # the hub: the average goes back to every spoke
            self.sender.publish(f"{PREFIX}avg/{t}/{p}", {k: v.clone() for k, v in new.items()},
                                [client_to_uid(r) for r in partners])
        for rep in reps:
            rep.module.load_state_dict(new, strict=False)
            rep.samples = 0

    # receiving (background) ----------------------------------------------------------------------
    def _receive_loop(self) -> None:
        """Take split messages as they arrive, check them against the schedule, and hand
        them to the compute thread with their transfer time (or the error that ends the node)."""
        while not self._stop.is_set():
            try:
                msg = self.transport.receive_any(timeout=0.2, prefix=PREFIX)
            except PeerTimeout:
                continue
            except PayloadRejected as e:
                self.log.warning("node %d: %s", self.uid, e)
                continue
            except CommError as e:
                if not self._stop.is_set():
                    self.arrivals.put(("error", e))
                return
            arrived = time.time()
            sent = msg.header.get("sent")
            stamped = isinstance(sent, (int, float)) and not isinstance(sent, bool)
            sent = min(sent, arrived) if stamped else arrived
            try:
                tok, payload, part = self._accept(msg)
                if part is not None:
                    whole = self.parts.add(tok, *part, payload, sent, arrived)
            except (ValueError, PayloadMismatch) as e:
                self.log.warning("node %d: dropped %r from node %d: %s", self.uid, msg.key, msg.sender, e)
                continue
            if self.timeline is not None and stamped:
                self.timeline.span("arrivals", msg.key, sent, arrived, sender=msg.sender)
            if part is None:
                self.arrivals.put((tok, payload, arrived - sent))
            elif whole is not None:
                self.arrivals.put((tok, *whole))

    def _take_arrivals(self, deadline: Optional[float]) -> bool:
        """Make the arrived messages' tokens available, and the outputs of what the workers
        finished: those there now (`deadline` None), or at least one, waiting until
        `deadline` (time.monotonic; SplitTimeout past it). True when something arrived."""
        got = False
        while True:
            try:
                if deadline is None or got:
                    item = self.arrivals.get_nowait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SplitTimeout(self._blocked_report())
                    item = self.arrivals.get(timeout=min(left, 0.5))
            except queue.Empty:
                if deadline is None or got:
                    return got
                self.sender.check()
                continue
            if item[0] == "error":
                raise item[1]
            if item[0] == "done":
                self._done(*item[1:])
                got = True
                continue
            tok, payload, latency = item
            if self.queue.has(tok) or tok in self.inbox:
                self.log.warning("node %d: dropped a duplicate %r", self.uid, tok)
                continue
            self.inbox[tok] = payload
            self._download += latency
            self.queue.produce(tok)
            got = True

    def _accept(self, msg) -> tuple[Token, Any, Optional[tuple[int, int]]]:
        """Check a message against the schedule (right sender, step, shapes); (token,
        payload, None), or (token, its part, (part, count)) for a part of one."""
        fields = msg.key[len(PREFIX):].split("/")
        kind, nums = fields[0], fields[1:]
        try:
            ints = tuple(int(x) for x in nums)
        except ValueError:
            raise ValueError("malformed key") from None
        sender = uid_to_client(msg.sender)
        total = self.steps_per_round * self.cfg.run.rounds
        if not ints or not self.first_step <= ints[0] < total:
            raise ValueError(f"step outside {self.first_step}..{total - 1}")
        m, P = self.stages, self.P
        if kind in ("act", "grad") and len(ints) in (4, 6):
            t, o, p, mb = ints[:4]
            part = ints[4:] or None
            if part is not None and not 0 <= part[0] < part[1] <= self.cfg.training.batch_size:
                raise ValueError(f"part {part[0]} of {part[1]}: expected 0 <= part < count <= the batch size "
                                 f"{self.cfg.training.batch_size}")
            lo, hi = (2, P) if kind == "act" else (1, P - 1)
            if not (1 <= o <= m.num_clients and lo <= p <= hi and 0 <= mb < self.plan.M):
                raise ValueError("owner, partition or micro-batch out of range")
            src = m.runner(o, p - 1) if kind == "act" else m.runner(o, p + 1)
            if m.runner(o, p) != self.client or src != sender:
                raise ValueError(f"expected from client {src} to client {m.runner(o, p)}")
            x = msg.tensors.get("x")
            shape = self.shapes[p - 1] if kind == "act" else self.shapes[p]
            if (set(msg.tensors) != {"x"} or x.dtype != self.dtype or tuple(x.shape[1:]) != shape
                    or x.ndim != len(shape) + 1):
                raise ValueError(f"expected one tensor 'x' of shape (batch, {', '.join(map(str, shape))}) "
                                 f"and dtype {self.dtype}")
            if not 1 <= x.shape[0] <= self.cfg.training.batch_size:
                raise ValueError(f"{x.shape[0]} samples: expected 1 to the batch size {self.cfg.training.batch_size}")
            return (f"net_{kind}", t, o, p, mb), x, part
        if kind == "sync" and len(ints) == 3:
            t, p, r = ints
            if r != sender or r not in self.plan.partners.get(p, ()):
                raise ValueError(f"client {sender} does not synchronise partition {p} with client {self.client}")
            check_payload(msg, self.sync_expect[p])
            n = msg.header.get("samples")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError("header 'samples' must be an integer >= 0")
            return (kind, *ints), ({k: v.to(self.device) for k, v in msg.tensors.items()}, n), None
        if kind == "avg" and len(ints) == 2:
            t, p = ints
            if sender != self.plan.hub or not self.plan.star(p) or self.client == self.plan.hub:
                raise ValueError(f"client {sender} is not the hub that averages partition {p} for client {self.client}")
            check_payload(msg, self.sync_expect[p])
            return (kind, *ints), {k: v.to(self.device) for k, v in msg.tensors.items()}, None
        raise ValueError("unknown kind of split message")

    def _blocked_report(self) -> str:
        """What this node waits for, and from which client, for a timeout's message."""
        lines = describe_blocked(self.queue.blocked(), self.P, 6, self._source)
        lines += [f"{a.describe(self.P)}: still computing" for a in self.running]
        return (f"node {self.uid} (client {self.client}): no split message for "
                f"{self.cfg.communication.timeout:g} s (communication.timeout) in round {self.round}; "
                "waiting:\n  " + "\n  ".join(lines))

    def _source(self, tok: Token) -> Optional[str]:
        """'client c (node u)' that sends `tok` here; None for tokens made here."""
        c = self.plan.source(tok)
        return f"client {c} (node {client_to_uid(c)})" if c else None

    # evaluation ---------------------------------------------------------------------------------------
    def prepare_eval(self) -> None:
        """Assemble this owner's model from the replicas it uses (runners send theirs)."""
        r, me = self.round, self.client
        for (o, p), rep in self.replicas.items():
            if o != me:
                state = {k: v.detach().clone() for k, v in rep.module.state_dict().items()}
                self.sender.publish(f"{EVAL_PREFIX}{r}/{o}/{p}", state, [client_to_uid(o)])
        for p, part in enumerate(self.model.children(), 1):
            runner = self.stages.runner(me, p)
            if runner == me:
                state = self.replicas[(me, p)].module.state_dict()
            else:
                msg = self.transport.receive(f"{EVAL_PREFIX}{r}/{me}/{p}", client_to_uid(runner),
                                             expect=describe(part.state_dict()))
                state = msg.tensors
            part.load_state_dict(state)

    def test(self) -> dict[str, float]:
        t0 = time.perf_counter()
        out = super().test()
        self.totals["eval"] += time.perf_counter() - t0
        self.last_test = out
        return out

    # results.csv --------------------------------------------------------------------------------------
    def results_row(self) -> dict[str, Any]:
        """This node's row of results.csv: totals over the run (seconds, MB, accuracy)."""
        tot = self.totals
        traffic = self.traffic()
        sent, received = traffic["bytes_sent"] / 1e6, traffic["bytes_received"] / 1e6
        compute = sum(tot[k] for k in COMPUTE)
        comm = sum(tot[k] for k in COMMUNICATION)
        train = tot["train"]
        row = {
            "node": self.uid, "role": self.role, "rounds": self.cfg.run.rounds,
            "steps": self.steps_per_round * self.cfg.run.rounds, "samples": int(self.trained.sum()),
            **{f"{k}_s": tot[k] for k in ACTIVITIES}, "compute_s": compute, "comm_wait_s": comm, "train_s": train,
            "accounted_pct": 100 * (compute + comm + tot["idle"]) / train if train else 100.0,
            "upload_s": tot["upload"], "download_s": tot["download"], "eval_s": tot["eval"],
            "total_s": train + tot["eval"], "mb_sent": sent, "mb_received": received,
            "mb_communicated": sent + received, "peak_activations": int(tot["peak"]),
            "test_loss": self.last_test.get("test_loss"), "test_acc": self.last_test.get("test_acc"),
            **self.holdings("_end"),
        }
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}

    def _write_results_csv(self) -> None:
        """Append this node's row to results.csv in the machine's results folder (a lock keeps
        the nodes' rows whole; the first writer writes the header)."""
        path = Path(self.ctx.get("run_dir", ".")) / "results.csv"
        with open(path, "a", newline="") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
                if os.fstat(f.fileno()).st_size == 0:  # under the lock: the first writer writes the header
                    writer.writeheader()
                writer.writerow(self.results_row())
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _folder_bytes(folder) -> int:
    """Bytes of the files under `folder` (0 when there is none)."""
    if folder is None or not os.path.isdir(folder):
        return 0
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total
