"""Profiler and planner of split learning: ``dflsplit profile``, ``split: auto`` and
``micro_batches: auto``.

`profile_run` measures what a pipeline's time is made of:

* each partition's forward, backward and optimizer-update time, for every micro-batch size
  the candidates need (median of ``split.profile_repeats`` timings after a warm-up), in a
  forked process with the torch threads a node of the run gets; the nodes of one machine
  share its processor, so one measurement stands for all of them, scaled by a per-node
  slowdown (``split.slowdown``, which the nodes emulate, or ``dflsplit profile --slowdown
  3=4``; 1 unless given);
* the bytes per sample at each cut (a partition's output, and its gradient on the way
  back) and of each partition's weights (what replica sync moves);
* each node's link: two transports on loopback with that node's caps, timing payloads
  of two sizes each way (the slope is the rate, the fixed cost drops out).

`simulate` runs the run's own schedule (`split_schedule.PipelineSchedule`, the lists the
nodes execute) in time: every client computes with the measured durations, one action at
a time, or with ``split.workers`` several of different owners at once, and with
``split.preempt`` its background backward beside them (`split_schedule.may_start`; on a
slower processor that backward pauses while another pass runs, as `split.SlowerProcessor`
emulates); a payload first holds its sender's uplink, then its
receiver's downlink (what the emulated links do: the sender's token bucket, then the
receiver's), each a queue of its own; a sender's queue lets gradients pass activations,
and both pass replica shares, as the nodes' `split.Sender` does. `choose` simulates one
epoch for every candidate (device/server split x micro-batches 1, 2, 4, 8, 16) and keeps
the shortest. `plan_offloading` uses the same profile to place the middle partitions of N
owners' pipelines on the clients that finish them first (earliest-finish-time list
scheduling), each row ordered by stage so the stage validator accepts it. The
simulation lets at most as many actions compute at once as the machine has cores for
their threads (the nodes of one machine share them); a node's slower processor
(``split.slowdown``) holds one only for the time this machine's would take.

`step_floor` and `sync_floor` bound a device/server step and an epoch's replica sync from
below, for any schedule that keeps the step exact: what the simulation (one schedule) or
a run can approach and never pass; eval/bench/pipeline.py prints them beside its runs.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing as mp
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..mappings.stages import StageMapping, device_server_rows, task_label, uid_to_client, client_to_uid
from .base import machine_cores, node_threads
from .split_schedule import MICRO_SIZINGS, DataflowQueue, PipelineSchedule, may_start, micro_sizes

log = logging.getLogger("dflsplit.profile")

#: micro-batch counts the planner considers
CANDIDATE_MICRO = (1, 2, 4, 8, 16)
#: epochs longer than this many steps are simulated for this many and scaled
MAX_SIMULATED_STEPS = 16
UNLIMITED = float("inf")
PROFILE_TIMEOUT = 600.0  # seconds for the compute measurements


@dataclass
class Link:
    """A node's link in bytes/s: configured caps (0: none) and measured rates."""

    up_cap: int
    down_cap: int
    up: float
    down: float


@dataclass
class Profile:
    """What `profile_run` measured; times in seconds, sizes in bytes."""

    batch: int
    partitions: int
    fwd: dict[int, list[float]]  # micro-batch size -> per partition
    bwd: dict[int, list[float]]
    update: list[float]  # per partition
    out_bytes: list[int]  # per sample, output of partition p (index p-1)
    param_bytes: list[int]  # floating-point state of partition p
    links: dict[int, Link]  # node uid -> its link
    slowdown: dict[int, float] = field(default_factory=dict)  # node uid -> factor (default 1)
    threads: int = 1  # torch threads of a node
    cores: int = 0  # cores the machine's nodes share (0: every node has its own)

    def speed(self, uid: int) -> float:
        return self.slowdown.get(uid, 1.0)

    def pass_time(self, kind: str, partition: int, size: int) -> float:
        """Forward or backward time of `partition` on `size` samples (interpolated between
        the measured sizes, linearly)."""
        table = self.fwd if kind == "fwd" else self.bwd
        sizes = sorted(table)
        if size in table:
            return table[size][partition - 1]
        lo = max([s for s in sizes if s <= size], default=sizes[0])
        hi = min([s for s in sizes if s >= size], default=sizes[-1])
        if lo == hi:
            return table[lo][partition - 1] * size / lo
        a, b = table[lo][partition - 1], table[hi][partition - 1]
        return a + (b - a) * (size - lo) / (hi - lo)


# --------------------------------------------------------------------------- measuring


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure_compute(cfg, x: torch.Tensor, y: torch.Tensor, num_classes: int, sizes: Sequence[int],
                    repeats: int) -> dict[str, Any]:
    """Forward, backward and update time of each partition for each micro-batch size, and
    the bytes at each cut; in this process, with its torch threads."""
    from ..models import build_model
    from ..training import build_optimizer

    layout = torch.channels_last if x.dim() == 4 else torch.contiguous_format
    model = build_model(cfg.model, tuple(x.shape[1:]), num_classes, seed=cfg.run.seed)
    model = model.to(memory_format=layout).train()
    parts = list(model.children())
    P = len(parts)
    fwd: dict[int, list[float]] = {}
    bwd: dict[int, list[float]] = {}
    for n in sizes:
        xs, ys = x[:n].contiguous(memory_format=layout), y[:n]
        f_times, b_times = [[] for _ in parts], [[] for _ in parts]
        for rep in range(repeats + 1):
            inputs, outs = [], []
            h = xs
            for p, part in enumerate(parts):
                h = h.detach().requires_grad_(p > 0)
                t0 = time.perf_counter()
                out = part(h)
                if p == P - 1:
                    out = nn.functional.cross_entropy(out, ys, reduction="sum") / n
                f_times[p].append(time.perf_counter() - t0)
                inputs.append(h)
                outs.append(out)
                h = out
            grad = None
            for p in range(P - 1, -1, -1):
                t0 = time.perf_counter()
                outs[p].backward(grad)
                b_times[p].append(time.perf_counter() - t0)
                grad = inputs[p].grad
        fwd[n] = [statistics.median(ts[1:]) for ts in f_times]
        bwd[n] = [statistics.median(ts[1:]) for ts in b_times]
    update = []
    for part in parts:
        opt = build_optimizer(cfg.optimizer, part.parameters())
        update.append(_time(opt.step, repeats))
    with torch.no_grad():
        h, out_bytes = x[:1].contiguous(memory_format=layout), []
        for part in parts:
            h = part(h)
            out_bytes.append(h[0].numel() * h.element_size())
    param_bytes = [sum(v.numel() * v.element_size() for v in part.state_dict().values() if v.is_floating_point())
                   for part in parts]
    return {"fwd": fwd, "bwd": bwd, "update": update, "out_bytes": out_bytes, "param_bytes": param_bytes}


def _compute_child(conn, cfg, x, y, num_classes, sizes, repeats, threads) -> None:
    try:
        torch.set_num_threads(threads)
        conn.send(("ok", measure_compute(cfg, x, y, num_classes, sizes, repeats)))
    except BaseException as e:  # noqa: BLE001 - reported in the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def measure_compute_apart(cfg, x, y, num_classes, sizes, repeats, threads) -> dict[str, Any]:
    """measure_compute with `threads` torch threads in a spawned process. Spawned, not
    forked: a child forked after the caller's OpenMP started its threads hangs in its first
    parallel region; and the caller (a launcher about to fork its nodes) starts none."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_compute_child, args=(child, cfg, x, y, num_classes, sizes, repeats, threads),
                       daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(PROFILE_TIMEOUT):
            proc.kill()
            raise RuntimeError(f"profiling the model failed: no result within {PROFILE_TIMEOUT:.0f} s")
        status, result = parent.recv()
    except EOFError:
        status, result = "error", f"the profiling process died (exit code {proc.exitcode})"
    finally:
        proc.join(10)
    if status != "ok":
        raise RuntimeError(f"profiling the model failed: {result}")
    return result


def measure_link(up_cap: int, down_cap: int, seconds: float = 0.25) -> tuple[float, float]:
    """(upload, download) rate in bytes/s of a node with these caps, measured: two tcp
    transports on loopback, the other side uncapped, payloads of two sizes each way;
    rate = size difference / time difference."""
    from ..communication import build_transport
    from ..config import section_from_dict
    from ..mappings import LinearMapping, free_base_port

    port = free_base_port(2, 29000)
    mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, port)
    me = build_transport(0, mapping, section_from_dict("communication", name="tcp", upload_limit=up_cap,
                                                       download_limit=down_cap, timeout=60))
    other = build_transport(1, mapping, section_from_dict("communication", name="tcp", timeout=60))
    me.start()
    other.start()
    try:
        t = threading.Thread(target=other.connect, args=([0],))
        t.start()
        me.connect([1])
        t.join()
        rates = []
        for src, dst, cap in ((me, other, up_cap), (other, me, down_cap)):
            small, large = ((cap * seconds * 0.2, cap * seconds) if cap else (1 << 20, 16 << 20))
            times = {}
            for i, n in enumerate((int(small), int(large))):
                payload = {"x": torch.zeros(max(1, n // 4), dtype=torch.float32)}
                key = f"probe/{id(src)}/{i}"
                time.sleep(0.1)  # an idle link each time
                t0 = time.perf_counter()
                src.publish(key, payload, to=[dst.uid])
                dst.receive(key, src.uid, timeout=60)
                times[n] = time.perf_counter() - t0
            (n1, t1), (n2, t2) = sorted(times.items())
            rates.append((n2 - n1) / max(t2 - t1, 1e-9))
        return rates[0], rates[1]
    finally:
        # each waits for the other's BYE: close both at once
        closers = [threading.Thread(target=tr.close, args=(5.0,)) for tr in (me, other)]
        for c in closers:
            c.start()
        for c in closers:
            c.join()


def node_caps(cfg, uid: int) -> tuple[int, int]:
    """(upload, download) caps of node `uid` (communication.node_limits, else the common ones)."""
    c = cfg.communication
    caps = c.node_limits.get(uid)
    return (caps[0], caps[1]) if caps else (c.upload_limit, c.download_limit)


def candidate_micro(cfg) -> list[int]:
    m = cfg.split.micro_batches
    if m != "auto":
        return [m]
    return [k for k in CANDIDATE_MICRO if k <= cfg.training.batch_size]


def candidate_sizings(cfg, micro: int) -> list[str]:
    """The micro-batch sizings the planner tries with `micro` micro-batches (one at M=1,
    where they agree)."""
    if cfg.split.micro_sizes != "auto":
        return [cfg.split.micro_sizes]
    return list(MICRO_SIZINGS) if micro > 1 else ["even"]


def candidate_splits(cfg, partitions: int) -> list[Optional[int]]:
    sp = cfg.split
    if sp.server is None:
        return [None]
    if sp.split != "auto":
        return [sp.split]
    return [-1] + list(range(1, partitions - 1))


def profile_run(cfg, dataset=None, slowdown: Optional[dict[int, float]] = None) -> Profile:
    """Measure compute (in a spawned process, the nodes' thread count), cut sizes and every
    distinct link of the run; the nodes' slowdowns are ``split.slowdown``'s, updated with
    `slowdown`'s."""
    from ..datasets import build_dataset
    from .split import model_partitions

    dataset = dataset if dataset is not None else build_dataset(cfg)
    slowdown = dict(cfg.split.slowdown) | dict(slowdown or {})
    b = cfg.training.batch_size
    sizes = sorted({s for m in candidate_micro(cfg) for sizing in {"even", *candidate_sizings(cfg, m)}
                    for s in micro_sizes(b, m, sizing)} | {b})
    idx = dataset.partition_train(1)[0][:b]
    x, y = dataset.load_train(idx)
    while len(y) < b:  # a tiny training set: repeat it
        x, y = torch.cat([x, x]), torch.cat([y, y])
    x, y = x[:b], y[:b]
    threads = node_threads(cfg)
    result = measure_compute_apart(cfg, x, y, dataset.num_classes, sizes, cfg.split.profile_repeats, threads)
    links: dict[int, Link] = {}
    measured: dict[tuple[int, int], tuple[float, float]] = {}
    for uid in range(cfg.num_nodes):
        caps = node_caps(cfg, uid)
        if caps not in measured:
            measured[caps] = measure_link(*caps)
        links[uid] = Link(caps[0], caps[1], *measured[caps])
    P = model_partitions(cfg)
    return Profile(b, P, result["fwd"], result["bwd"], result["update"], result["out_bytes"], result["param_bytes"],
                   links, slowdown, threads, machine_cores())


# --------------------------------------------------------------------------- simulating


@dataclass
class Simulated:
    """A simulated run of some steps: its makespan and each client's busy and idle time."""

    seconds: float
    busy: dict[int, float]
    idle: dict[int, float]


def _duration(profile: Profile, sizes: list[int], a, uid: int) -> float:
    if a.kind in ("fwd", "bwd"):
        return profile.pass_time(a.kind, a.partition, sizes[a.micro]) * profile.speed(uid)
    if a.kind == "step":
        return profile.update[a.partition - 1] * profile.speed(uid)
    return 0.0


def _parts(token, n: int, sizes: list[int], chunk_bytes: int) -> list[float]:
    """The bytes of each part a payload of `n` bytes goes in (`split.payload_parts`'s cut)."""
    if token[0] not in ("net_act", "net_grad") or not chunk_bytes or n <= chunk_bytes:
        return [n]
    rows = sizes[token[4]]
    if rows < 2:
        return [n]
    k = min(rows, -(-n // chunk_bytes))
    q, r = divmod(rows, k)
    return [n / rows * (q + (i < r)) for i in range(k)]


def _payload_bytes(profile: Profile, token, sizes: list[int]) -> int:
    kind = token[0]
    if kind in ("net_act", "net_grad"):
        _, _, o, p, m = token
        cut = p - 1 if kind == "net_act" else p  # the output whose activation or gradient travels
        return profile.out_bytes[cut - 1] * sizes[m]
    if kind in ("sync", "avg"):
        return profile.param_bytes[token[2] - 1]
    return 0


#: a sender's order (lower first), as `split.Sender`'s: gradients, activations, replica shares
SEND_PRIORITY = {"net_grad": 0, "net_act": 1}


def simulate(schedule: PipelineSchedule, profile: Profile, steps: int, workers: int = 1,
             sizing: str | Sequence[int] = "even", chunk_bytes: int = 0) -> Simulated:
    """Run `steps` steps of `schedule` in time with `profile`'s durations and links, each
    client with the compute threads it takes of `workers` (``split.workers``; see the
    module docstring), micro-batches cut by `sizing` (``split.micro_sizes``), activations
    and gradients sent in parts of `chunk_bytes` (``split.chunk_bytes``; 0: whole): a
    payload arrives with its last part."""
    plans = schedule.plans
    clients = sorted(plans)
    uid = {c: client_to_uid(c) for c in clients}
    queues = {c: DataflowQueue(strict=schedule.strict) for c in clients}
    for c, plan in plans.items():
        for tok in plan.initial_tokens():
            queues[c].produce(tok)
        for t in range(steps):
            queues[c].add_all(schedule.ordered(c, t))
    uplink: dict[int, list] = {c: [] for c in clients}  # payloads waiting for the sender's uplink
    sending = dict.fromkeys(clients, False)
    down_free = dict.fromkeys(clients, 0.0)
    busy = dict.fromkeys(clients, 0.0)
    waiting_since = dict.fromkeys(clients, 0.0)  # who waits longest for a core goes first
    threads = {c: plans[c].workers(workers) for c in clients}
    background = {c: plans[c].background_rule for c in clients}
    # an emulated processor is one: a background pass pauses while a pass in front runs
    front_until = dict.fromkeys(clients, 0.0)  # until when a pass in front runs
    owed: dict = {}  # a running background pass -> seconds it was paused, not yet added to its end
    running: dict[int, list] = {c: [] for c in clients}
    held = dict.fromkeys(clients, 0)  # a client's actions holding a core; busy counts its time with any
    busy_since = dict.fromkeys(clients, 0.0)
    computing = 0  # actions holding a core
    slots = max(1, profile.cores // max(1, profile.threads)) if profile.cores else len(clients)
    events: list = []
    seq = 0
    now = 0.0

    def rate(c: int, way: str) -> float:
        link = profile.links.get(uid[c])
        r = (link.up if way == "up" else link.down) if link else UNLIMITED
        return r if r > 0 else UNLIMITED

    def send_next(c: int) -> None:
        nonlocal seq
        if sending[c] or not uplink[c]:
            return
        _, _, dest, tok, n = heapq.heappop(uplink[c])
        sending[c] = True
        heapq.heappush(events, (now + n / rate(c, "up"), seq, "uplinked", (c, dest, tok, n)))
        seq += 1

    while True:
        for c in sorted(clients, key=lambda c: (waiting_since[c], c)):
            def allowed(a, c=c):
                return may_start(a, running[c], threads[c], background[c])
            while (a := queues[c].peek(allowed)) is not None:
                d = _duration(profile, micro_sizes(profile.batch, plans[c].M, sizing), a, uid[c])
                if d > 0 and computing >= slots:
                    break
                queues[c].pop(allowed)
                core = d / profile.speed(uid[c])  # a slower processor holds a core for this machine's time only
                if d > 0:
                    computing += 1
                    held[c] += 1
                    if held[c] == 1:
                        busy_since[c] = now
                    if core < d:
                        heapq.heappush(events, (now + core, seq, "released", None))
                        seq += 1
                if d > 0 and background[c] is not None and profile.speed(uid[c]) > 1:
                    if background[c](a):
                        owed[a] = max(0.0, front_until[c] - now)
                    else:
                        paused = now + d - max(now, front_until[c])
                        front_until[c] = max(front_until[c], now + d)
                        for b in running[c]:
                            if b in owed:
                                owed[b] += paused
                running[c].append(a)
                heapq.heappush(events, (now + d, seq, "done", (c, a, d > 0, core >= d)))
                seq += 1
        if not events:
            if any(len(q) for q in queues.values()):
                raise RuntimeError("the simulated schedule stalled (the dry run should have caught it)")
            break
        now, _, kind, data = heapq.heappop(events)
        if kind == "released":
            computing -= 1
        elif kind == "done":
            c, a, compute, core = data
            if owed.get(a, 0.0) > 0:  # paused meanwhile: it ends that much later
                heapq.heappush(events, (now + owed[a], seq, "done", data))
                seq += 1
                owed[a] = 0.0
                continue
            owed.pop(a, None)
            running[c].remove(a)
            if compute:
                computing -= core
                held[c] -= 1
                if held[c] == 0:
                    busy[c] += now - busy_since[c]
            waiting_since[c] = now
            for tok, dest in plans[c].outputs(a):
                if dest == c:
                    queues[c].produce(tok)
                    continue
                sizes = micro_sizes(profile.batch, plans[c].M, sizing)
                parts = _parts(tok, _payload_bytes(profile, tok, sizes), sizes, chunk_bytes)
                for i, n in enumerate(parts):  # the token travels with its last part
                    heapq.heappush(uplink[c], (SEND_PRIORITY.get(tok[0], 2), seq, dest,
                                               tok if i == len(parts) - 1 else None, n))
                    seq += 1
                send_next(c)
        elif kind == "uplinked":
            c, dest, tok, n = data
            sending[c] = False
            send_next(c)
            start = max(now, down_free[dest])
            down_free[dest] = start + n / rate(dest, "down")
            if tok is not None:
                heapq.heappush(events, (down_free[dest], seq, "arrived", (dest, tok)))
                seq += 1
        else:
            dest, tok = data
            queues[dest].produce(tok)
    return Simulated(now, busy, {c: now - busy[c] for c in clients})


@dataclass
class StepFloor:
    """A lower bound on one device's step in PiPar's device/server layout, for any schedule
    that keeps the step exact (partition 1's forwards of step t+1 wait for its update of
    step t); seconds, from a `Profile`. ``seconds`` is the largest of the bounds."""

    fill: float  # partitions 1..split forward of the first micro-batch: nothing to send before it
    up: float  # every activation and head gradient of the step on the device's uplink
    acts: float  # the activations alone on it
    last_round_trip: float  # the last activation sent, then its way back to a gradient sent
    tail: float  # after the last gradient sent: server backward, gradient down, device backward, update
    uplink: float  # fill + max(up, acts + last_round_trip) + tail
    compute: float  # the device's own passes and updates
    server: float  # the server's passes for every device, on its workers
    machine: float  # every node's passes on the cores they share (0: every node has its own)
    seconds: float


def step_floor(profile: Profile, split: int, micro: int, device: int, server: int, devices: int = 1,
               workers: int = 1, sizing: str | Sequence[int] = "even") -> StepFloor:
    """The least time a step of `device` (node uid) can take with `micro` micro-batches (cut
    by `sizing`, ``split.micro_sizes``) when
    it keeps partitions 1..`split` and the last, and `server` (node uid) the ones between
    for `devices` devices like it, on `workers` compute threads (``split.workers``).

    Every activation (partition `split`'s output) and every gradient of the head's input
    leaves on the device's uplink (measured rate), one after the other; nothing can leave
    before the first micro-batch's forward (``fill``); a gradient leaves after its own
    micro-batch's activation went up, the server's forward, the download and the head; and
    after the last gradient left, the server's backward, the gradient's download, the
    device's backward and partition 1's update remain (``tail``). So a step takes at least
    fill + max(all the uplink's bytes, the activations' bytes + the last micro-batch's
    round trip and gradient) + tail; and at least the device's own compute. Durations are
    the smallest micro-batch's (a lower bound for every one). At one micro-batch nothing
    overlaps and the bound is the step's sequential time. On average over an epoch a step
    also takes at least the server's passes for every device spread over its workers, and,
    when the nodes share the machine's cores (``profile.cores``), every node's passes at
    this machine's speed (a slower processor's extra time holds no core) spread over them
    (perfect scaling: a lower bound)."""
    P = profile.partitions
    if not 1 <= split <= P - 2:
        raise ValueError(f"split {split}: a device/server layout with partitions 1..{split} and {P} on the device "
                         f"and a server partition between (1 <= split <= {P - 2})")
    sizes = micro_sizes(profile.batch, micro, sizing)
    n = min(sizes)
    dev, srv = profile.speed(device), profile.speed(server)
    link = profile.links[device]

    def passes(kind: str, parts, size: int) -> float:
        return sum(profile.pass_time(kind, p, size) for p in parts)

    mine, theirs = range(1, split + 1), range(split + 1, P)
    act, head_in = profile.out_bytes[split - 1], profile.out_bytes[P - 2]  # bytes per sample
    fill = passes("fwd", mine, n) * dev
    up = sum(sizes) * (act + head_in) / link.up
    round_trip = (passes("fwd", theirs, n) * srv + n * head_in / link.down
                  + (profile.pass_time("fwd", P, n) + profile.pass_time("bwd", P, n)) * dev)
    last_round_trip = round_trip + n * head_in / link.up
    tail = passes("bwd", theirs, n) * srv + n * act / link.down + passes("bwd", mine, n) * dev \
        + profile.update[0] * dev
    acts = sum(sizes) * act / link.up
    uplink = fill + max(up, acts + last_round_trip) + tail
    compute = dev * (sum(passes("fwd", [*mine, P], s) + passes("bwd", [*mine, P], s) for s in sizes)
                     + sum(profile.update[p - 1] for p in (*mine, P)))
    served = devices * srv * (sum(passes("fwd", theirs, s) + passes("bwd", theirs, s) for s in sizes)
                              + sum(profile.update[p - 1] for p in theirs))
    server_floor = served / min(max(1, workers), devices)
    machine = (devices * compute / dev + served / srv) * profile.threads / profile.cores if profile.cores else 0.0
    return StepFloor(fill, up, acts, last_round_trip, tail, uplink, compute, server_floor, machine,
                     max(uplink, compute, server_floor, machine))


def sync_floor(profile: Profile, split: int, micro: int, device: int, sizing: str | Sequence[int] = "even") -> float:
    """The least time an epoch's replica sync through the server (device/server mode's
    fedavg) adds after the epoch's last step floor (`step_floor`), for a device that keeps
    partitions 1..`split` and the last. Partitions 1..`split` are final only in the step's
    tail, once the last gradient came down: their shares go up the device's link one after
    the other, and each one's average comes down its downlink after it, one after the other:
    a two-machine flow shop, whose shortest makespan Johnson's rule gives. The head's share
    may go during the tail (not counted), and so may the others' while the device's backward
    of the tail runs (subtracted): a lower bound."""
    link = profile.links[device]
    jobs = [(profile.param_bytes[p - 1] / link.up, profile.param_bytes[p - 1] / link.down)
            for p in range(1, split + 1)]
    order = sorted((j for j in jobs if j[0] < j[1]), key=lambda j: j[0]) \
        + sorted((j for j in jobs if j[0] >= j[1]), key=lambda j: -j[1])
    up_done = makespan = 0.0
    for up, down in order:
        up_done += up
        makespan = max(makespan, up_done) + down
    n = min(micro_sizes(profile.batch, micro, sizing))
    overlap = (sum(profile.pass_time("bwd", p, n) for p in range(1, split + 1)) + profile.update[0]) \
        * profile.speed(device)
    return max(0.0, makespan - overlap)


def layout_mapping(cfg, partitions: int, split: Optional[int]) -> StageMapping:
    """The run's stage mapping, with device/server `split` when given."""
    from .split import stage_mapping

    if split is None:
        return stage_mapping(cfg)
    rows = device_server_rows(cfg.num_nodes, uid_to_client(cfg.split.server), partitions, split)
    return StageMapping(rows, partitions, strict_order=cfg.split.order == "strict")


def _sizing(cfg, sizing: Optional[str | Sequence[int]]) -> str | Sequence[int]:
    sizing = sizing or cfg.split.micro_sizes
    if isinstance(sizing, str) and sizing not in MICRO_SIZINGS:
        raise ValueError(f"micro-batch sizing {sizing!r}: expected one of {', '.join(MICRO_SIZINGS)} (auto is "
                         f"resolved by the planner)")
    return sizing


def simulate_config(cfg, profile: Profile, split: Optional[int], micro: int, epoch_steps: int,
                    sizing: Optional[str | Sequence[int]] = None) -> Simulated:
    """One epoch of the run with device/server `split` and `micro` micro-batches cut by
    `sizing` (default: the config's ``split.micro_sizes``); at most MAX_SIMULATED_STEPS
    steps simulated, scaled to the epoch."""
    import copy

    from .split import build_schedule

    trial = copy.deepcopy(cfg)
    trial.split.micro_batches = micro
    if split is not None:
        trial.split.split = split
    stages = layout_mapping(trial, profile.partitions, split)
    period = _period(trial, epoch_steps)
    steps = min(epoch_steps, MAX_SIMULATED_STEPS)
    sim = simulate(build_schedule(trial, stages, period), profile, steps, trial.split.workers,
                   _sizing(cfg, sizing), trial.split.chunk_bytes)
    scale = epoch_steps / steps
    return Simulated(sim.seconds * scale, {c: v * scale for c, v in sim.busy.items()},
                     {c: v * scale for c, v in sim.idle.items()})


def epoch_floor(cfg, profile: Profile, split: Optional[int], micro: int, epoch_steps: int,
                sizing: Optional[str | Sequence[int]] = None) -> Optional[float]:
    """The least time an epoch of the run can take with device/server `split` and `micro`
    micro-batches cut by `sizing` (default: the config's), for any exact schedule: the
    slowest device's `step_floor` for each step, plus `sync_floor` for each replica sync
    through the server (amortised over the epoch).
    None when there is no device/server split (``split`` None or -1)."""
    from .split import sync_settings

    if split is None or not 1 <= split <= profile.partitions - 2:
        return None
    sync, every, unit = sync_settings(cfg)
    syncs = 0.0 if sync != "star" else (1 / every if unit == "epochs" else epoch_steps / every)
    server = cfg.split.server
    devices = [u for u in range(cfg.num_nodes) if u != server]
    sizing = _sizing(cfg, sizing)
    return max(epoch_steps * step_floor(profile, split, micro, u, server, len(devices), cfg.split.workers,
                                        sizing).seconds
               + syncs * sync_floor(profile, split, micro, u, sizing) for u in devices)


def cuts(batch: int, micro: int) -> list[tuple[int, ...]]:
    """Every way to cut `batch` samples into `micro` non-empty micro-batches, each multiset
    of sizes once (largest first)."""
    def falling(left: int, parts: int, most: int):
        if parts == 1:
            if 1 <= left <= most:
                yield (left,)
            return
        for first in range(min(most, left - parts + 1), 0, -1):
            if first * parts < left:
                break
            for rest in falling(left - first, parts - 1, first):
                yield (first, *rest)
    return list(falling(batch, micro, batch))


def least_epoch_floor(cfg, profile: Profile, split: int, micro: int,
                      epoch_steps: int) -> tuple[float, tuple[int, ...]]:
    """The least `epoch_floor` of `micro` micro-batches over every cut of the batch (`cuts`;
    a floor does not depend on the micro-batches' order), and that cut: no exact schedule
    with `micro` micro-batches of any sizes finishes an epoch sooner."""
    return min((epoch_floor(cfg, profile, split, micro, epoch_steps, sizes), sizes)
               for sizes in cuts(profile.batch, micro))


def _period(cfg, epoch_steps: int) -> int:
    from .split import sync_settings

    _, every, unit = sync_settings(cfg)
    return every * epoch_steps if unit == "epochs" else every


@dataclass
class Choice:
    """The planner's pick and every candidate's simulated epoch."""

    split: Optional[int]
    micro_batches: int
    micro_sizes: str
    table: list[dict[str, Any]]


def choose(cfg, profile: Profile, epoch_steps: int) -> Choice:
    """Simulate one epoch for every candidate (split, M, micro-batch sizing) and keep the
    shortest (ties: fewer micro-batches, even sizes); each row also has the epoch's floor
    (`epoch_floor`, None without a device/server split)."""
    table = []
    devices = [u for u in range(cfg.num_nodes) if u != cfg.split.server]
    for split in candidate_splits(cfg, profile.partitions):
        for m in candidate_micro(cfg):
            for sizing in candidate_sizings(cfg, m):
                sim = simulate_config(cfg, profile, split, m, epoch_steps, sizing)
                dev_idle = statistics.fmean(sim.idle[uid_to_client(u)] for u in devices) if devices else 0.0
                table.append({"split": split, "micro_batches": m, "micro_sizes": sizing, "epoch_seconds": sim.seconds,
                              "device_idle_seconds": dev_idle,
                              "floor_seconds": epoch_floor(cfg, profile, split, m, epoch_steps, sizing)})
    best = min(table, key=lambda r: (round(r["epoch_seconds"], 9), r["micro_batches"], r["micro_sizes"] != "even"))
    return Choice(best["split"], best["micro_batches"], best["micro_sizes"], table)


def resolve_auto(cfg, dataset=None) -> Choice:
    """Profile the run and write the planner's choice into ``cfg.split`` (``split``,
    ``micro_batches`` and ``micro_sizes`` that were ``auto``)."""
    from .split import steps_per_epoch

    profile = profile_run(cfg, dataset)
    choice = choose(cfg, profile, steps_per_epoch(cfg, dataset))
    sp = cfg.split
    if sp.split == "auto":
        sp.split = choice.split
    if sp.micro_batches == "auto":
        sp.micro_batches = choice.micro_batches
    if sp.micro_sizes == "auto":
        sp.micro_sizes = choice.micro_sizes
    best = min(r["epoch_seconds"] for r in choice.table)
    line = (f"split profiler: split {sp.split}, micro_batches {sp.micro_batches}, micro_sizes {sp.micro_sizes} "
            f"(simulated epoch {best:.2f} s of "
            f"{len(choice.table)} candidates; dflsplit profile CONFIG prints the table)")
    log.info("%s", line)
    print(f"dflsplit: {line}", file=sys.stderr, flush=True)
    return choice


# --------------------------------------------------------------------------- offloading


def plan_offloading(profile: Profile, num_clients: int, micro_batches: int = 1) -> list[list[str]]:
    """A stage configuration for `num_clients` owners: every owner keeps its first and
    last partition (rule 4), the middle ones go, partition by partition, to the client
    that would finish them first (earliest-finish-time list scheduling): that client's
    load so far plus the partition's forward and backward on the batch at its speed, plus
    the transfers from and to the previous partition's client at their link rates. Rows
    list their tasks by stage, then owner, so no order deadlocks (rule 6)."""
    P, b = profile.partitions, profile.batch
    clients = list(range(1, num_clients + 1))

    def work(p: int, c: int) -> float:
        return (profile.pass_time("fwd", p, b) + profile.pass_time("bwd", p, b)) * profile.speed(client_to_uid(c))

    def link(c: int) -> Link:
        return profile.links.get(client_to_uid(c)) or Link(0, 0, UNLIMITED, UNLIMITED)

    def transfer(src: int, dst: int, p: int) -> float:
        if src == dst:
            return 0.0
        n = profile.out_bytes[p - 2] * b  # the input of partition p, and its gradient back
        return n / link(src).up + n / link(dst).down + n / link(dst).up + n / link(src).down

    runner = {(o, p): o for o in clients for p in (1, P)}
    load = {c: work(1, c) + (work(P, c) if P > 1 else 0.0) for c in clients}
    for p in range(2, P):
        for o in sorted(clients, key=lambda c: -load[c]):  # the most loaded owners place theirs first
            prev = runner[(o, p - 1)]
            finish = {c: load[c] + work(p, c) + transfer(prev, c, p) for c in clients}
            best = min(clients, key=lambda c: (round(finish[c], 12), c != o, c))
            runner[(o, p)] = best
            load[best] += work(p, best)
    rows: list[list[tuple[int, int]]] = [[] for _ in clients]
    for (o, p), c in runner.items():
        rows[c - 1] += [(o, p), (o, 2 * P + 1 - p)] if P > 1 else [(o, 1), (o, 2)]
    return [[task_label(o, s) for o, s in sorted(set(row), key=lambda t: (t[1], t[0]))] for row in rows]


__all__ = [
    "CANDIDATE_MICRO", "Choice", "Link", "Profile", "Simulated", "choose", "measure_compute", "measure_link",
    "micro_sizes", "plan_offloading", "profile_run", "resolve_auto", "simulate", "simulate_config",
]
