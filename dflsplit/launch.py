"""Launching the nodes of one machine: one OS process per node, forked from this process.

The launcher builds what every node needs once, before the fork: the mapping (hosts
resolved), the node type's derived objects (`Node.prepare`: the topology, a split run's
stage mapping), the dataset (prepared, partitioned, its global test set loaded) and the
imports (`warm_up`). Forked nodes share those pages copy-on-write: start-up takes
milliseconds per node and memory grows with each node's own data and model. Before the
fork only single-element torch operations run, on one thread, so no thread pool is
inherited.

A run spans one or several machines (`dflsplit.coordinator`): the launchers agree on a
run id at the start barrier, each writes ``<run>/machine_<id>/``, the nodes start round 0
together once every node completed its handshakes, and machine 0 writes the summary of
every node at the end. A run folder that holds results is refused unless resuming or
overwriting.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import Config, dump_config
from .coordinator import BarrierFailed, Coordinator, RunAborted
from .mappings import LinearMapping
from .results import machine_dir, merge_traces, read_json, read_run, summarize, write_json, write_summary

log = logging.getLogger("dflsplit.launch")

#: keys that may differ between the machines of one run (they do not change what is computed)
MACHINE_LOCAL_KEYS = {
    "run": ("machine_id", "out_dir", "progress", "log_level", "threads_per_proc", "device", "ip_file", "hosts",
            "nodes_per_process"),
    "communication": ("spool_dir", "curve_keys"),
    "dataset": ("root",),
    "graph": ("file",),
    "split": ("stages_file",),
}


class RunFailed(RuntimeError):
    """A node process failed, or the run's machines could not agree; the message holds the
    error and where to look."""


class RunInterrupted(RunFailed):
    """The run was stopped (Ctrl-C, or SIGTERM to the launcher); its nodes were stopped too."""


class StartTimeout(RuntimeError):
    """A node's start signal did not come within the start barrier's time."""


@dataclass
class StartSignal:
    """Set by the launcher when the run may begin (every node of every machine completed
    its handshakes); `deadline` (time.monotonic) ends the start barrier; `round` (a shared
    integer) is the first round, after a restart the one every machine agreed on."""

    event: Any
    deadline: float
    round: Any = None

    def first_round(self) -> int:
        return int(self.round.value) if self.round is not None else 0

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def wait(self, uid: int) -> None:
        if not self.event.wait(self.left() + 10):
            raise StartTimeout(f"node {uid}: the run did not start within run.start_timeout "
                               f"(the launcher never gave the start signal)")


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return name


def threads_per_process(cfg: Config) -> int:
    """Torch threads per node so that the machine's node processes share its cores."""
    from .node.base import node_threads

    return node_threads(cfg)


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one: a process hosting many nodes
    holds a few descriptors per node and connection."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the limit
        pass


class FairSemaphore:
    """A semaphore that admits its waiters in the order they came (threading.Semaphore wakes
    any of them: some nodes starved while their neighbours waited for them)."""

    def __init__(self, value: int):
        self._free = value
        self._lock = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()

    def __enter__(self) -> "FairSemaphore":
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return self
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes straight to the next in line
            else:
                self._free += 1


def computing_nodes(cfg: Config) -> int:
    """How many of a process's nodes compute at once: its share of the machine's cores
    (at least one)."""
    from .node.base import machine_cores

    processes = math.ceil(cfg.run.procs_per_machine / cfg.run.nodes_per_process)
    return max(1, machine_cores() // processes)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks up to 512 MiB instead of unmapping them.

    Every training or evaluation batch allocates activations of a few MiB; by default
    glibc returns each to the kernel and faults it in again next batch, which cost
    ~20 % of a run's CPU time in page faults. Inherited by the forked nodes.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_trim_threshold, 512 << 20)
    mallopt(m_mmap_threshold, 512 << 20)
    # a process hosting many nodes runs many threads; by default glibc gives them up to 8
    # arenas per core, each keeping what it freed (64 nodes: 0.5 GB more)
    mallopt(m_arena_max, 2)


def warm_up(cfg: Config) -> None:
    """Import here, once, what each node would otherwise import for itself (seconds each):
    the optimizer machinery (the dataset's reader was imported when it was prepared)."""
    import torch

    from .training import build_optimizer

    torch.set_num_threads(1)
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    build_optimizer(cfg.optimizer, [param]).step()


def config_hash(cfg: Config, graph, mapping) -> str:
    """A hash of what every machine of a run must agree on: the config without the keys
    that are a machine's own business (paths, logging), plus the topology and the hosts."""
    data = cfg.to_dict()
    for section, keys in MACHINE_LOCAL_KEYS.items():
        for k in keys:
            data.get(section, {}).pop(k, None)
    data["_topology"] = sorted(graph.edges()) if graph is not None else None
    data["_hosts"] = {str(m): h for m, h in sorted(mapping.hosts.items())}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def build_node(cfg: Config, uid: int, run_dir: Path, mapping, prepared: dict[str, Any],
               report: Callable[[dict], None], identity: dict[str, Any] | None = None,
               start: StartSignal | None = None, dataset=None, resume: str | None = None, shared=None,
               compute=None):
    """Build one node's parts (data, model, training, sharing, started transport, results
    writer) and the node; in the process that hosts it. `run_dir` is the folder of this
    machine's results; `prepared` what `Node.prepare` built in the launcher; `shared` the
    communication parts the process's nodes share."""
    import torch

    from .communication import build_transport
    from .datasets import load_node_data
    from .models import build_model
    from .node import NODES
    from .results import ResultsWriter
    from .sharing import SHARINGS
    from .training import TRAININGS

    log = logging.getLogger(f"dflsplit.node.{uid}")
    t0 = time.perf_counter()
    device = pick_device(cfg.run.device)
    node_cls = NODES.get(cfg.node.name)
    data = load_node_data(cfg, uid, node_cls.data_shard(cfg, uid), dataset=dataset)
    log.info("loaded %d training and %d test samples in %.2f s", len(data.train_y), len(data.test_y), time.perf_counter() - t0)
    # Images in channels-last layout: oneDNN's convolutions are ~1.5x faster on CPU that way.
    layout = torch.channels_last if data.train_x.dim() == 4 else torch.contiguous_format
    for name in ("train_x", "test_x"):
        setattr(data, name, getattr(data, name).to(device).contiguous(memory_format=layout))
    for name in ("train_y", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.run.seed)
    model = model.to(device=device, memory_format=layout)
    training = None
    if len(data.train_y):
        training = TRAININGS.get(cfg.training.name)(cfg, model, data.train_x, data.train_y, seed=cfg.run.seed * 100003 + uid)
    sharing = SHARINGS.get(cfg.sharing.name)(cfg, uid)
    transport = build_transport(uid, mapping, cfg.communication, identity, shared)
    results = ResultsWriter(run_dir, uid)
    try:
        transport.start()
    except BaseException:
        results.close()
        raise
    log.info("model, training and %s transport ready after %.2f s", cfg.communication.name, time.perf_counter() - t0)
    context = dict(
        cfg=cfg, uid=uid, mapping=mapping, transport=transport, model=model, data=data,
        training=training, sharing=sharing, device=device, results=results, report=report,
        run_dir=run_dir, start=start, resume=resume, compute=compute, **prepared,
    )
    try:
        return node_cls(context)
    except BaseException:
        transport.close(0.0)
        results.close()
        raise


def run_node(node) -> None:
    """Run a built node to its end, then close its transport and results (a failing node
    does not wait for its peers' BYE)."""
    finished = False
    try:
        node.run()
        finished = True
    finally:
        node.transport.close(None if finished else 1.0)
        node.results.close()


def node_main(cfg: Config, uid: int, run_dir: Path, mapping, prepared: dict[str, Any],
              report: Callable[[dict], None], identity: dict[str, Any] | None = None,
              start: StartSignal | None = None, dataset=None, resume: str | None = None) -> None:
    """Build one node and run it; called in the node's own process."""
    import torch

    torch.set_num_threads(threads_per_process(cfg))
    run_node(build_node(cfg, uid, run_dir, mapping, prepared, report, identity, start, dataset, resume))


class NodeStopped(BaseException):
    """The launcher stopped this node (SIGTERM)."""


def _stop_with_the_launcher() -> None:
    """Linux: SIGTERM to this node process when the launcher dies (even by SIGKILL), so no
    node outlives its launcher."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup has to do
        return
    if os.getppid() == 1:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _stop_node(signum, frame):
    raise NodeStopped(f"stopped by signal {signum}")


def _exit_now(signum, frame):
    """SIGTERM once a node process is ending: exit at once, with no traceback out of
    whatever cleanup it interrupted (its outcome is already reported)."""
    os._exit(3)


_THREAD_UID = re.compile(r"-(\d+)(?:_\d+)?$")


class _NodeRecords(logging.Filter):
    """Let through the records of node `uid`'s threads (named ``...-<uid>``), and, for the
    process's first node, those of threads of no node of the process."""

    def __init__(self, uid: int, local: set[int], first: bool):
        super().__init__()
        self.uid, self.local, self.first = uid, local, first

    def filter(self, record: logging.LogRecord) -> bool:
        m = _THREAD_UID.search(record.threadName or "")
        owner = int(m.group(1)) if m else None
        return owner == self.uid or (self.first and owner not in self.local)


def _child(cfg: Config, uids: list[int], run_dir: Path, mapping, prepared, events, identity, start, dataset,
           resume=None) -> None:
    """The body of a node process: the nodes `uids` (one by default; several with
    ``run.nodes_per_process``, each on its own thread, sharing the communication parts)."""
    import torch

    from .communication.shared import ProcessShared

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops the nodes
    signal.signal(signal.SIGTERM, _stop_node)
    _stop_with_the_launcher()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers = []
    for uid in uids:
        handler = logging.FileHandler(run_dir / f"node_{uid}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if len(uids) > 1:
            handler.addFilter(_NodeRecords(uid, set(uids), uid == uids[0]))
        root.addHandler(handler)
        handlers.append(handler)
    root.setLevel(cfg.run.log_level)
    torch.set_num_threads(threads_per_process(cfg))
    shared = ProcessShared(uids)
    compute = FairSemaphore(computing_nodes(cfg)) if len(uids) > 1 else None
    nodes = {}

    def failed(uid: int, e: BaseException) -> None:
        logging.getLogger(f"dflsplit.node.{uid}").exception("node %d failed", uid)
        events.put({"event": "error", "uid": uid, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})

    def run_one(uid: int) -> bool:
        """Run node `uid`; False when it failed (reported). SIGTERM (NodeStopped) reaches
        only the main thread, and goes on from there."""
        try:
            run_node(nodes[uid])
        except NodeStopped:
            raise
        except BaseException as e:
            failed(uid, e)
            return False
        events.put({"event": "done", "uid": uid, "time": time.time()})
        return True

    status = 0
    try:
        main = threading.current_thread()
        for uid in uids:
            main.name = f"node-{uid}"  # what it logs while building a node goes to that node's log
            try:
                nodes[uid] = build_node(cfg, uid, run_dir, mapping, prepared, events.put, identity, start, dataset,
                                        resume, shared, compute)
            except NodeStopped:
                raise
            except BaseException as e:
                failed(uid, e)
                status = 1
        main.name = "MainThread"
        if len(uids) == 1 and nodes:
            (uid,) = nodes
            if not run_one(uid):
                status = 1
        else:
            threads = [threading.Thread(target=run_one, args=(u,), name=f"node-{u}", daemon=True) for u in nodes]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)  # wakes for SIGTERM
    except NodeStopped:
        for uid in uids:
            logging.getLogger(f"dflsplit.node.{uid}").warning("node %d stopped by the launcher", uid)
        for node in nodes.values():
            try:
                node.transport.close(0.0)
            except Exception:  # best effort: the process ends now
                pass
        for h in handlers:
            h.flush()
        os._exit(3)
    finally:
        signal.signal(signal.SIGTERM, _exit_now)
        shared.close()
        for h in handlers:
            h.flush()
    if status:
        sys.exit(status)


def check_curve_keys(cfg: Config, mapping) -> None:
    """Resolve `communication.curve_keys` beside the config file, and load this machine's
    nodes' keys now, so that a missing key fails the run before any node starts."""
    if not cfg.communication.curve_keys:
        return
    from .communication.keys import CurveKeys

    folder = cfg.resolve(cfg.communication.curve_keys)
    cfg.communication.curve_keys = str(folder)
    for uid in mapping.local_uids(cfg.run.machine_id):
        CurveKeys(folder, uid, range(mapping.num_nodes))


def holds_results(run_dir: Path, machine_id: int) -> list[Path]:
    """The results files in `run_dir` that a new run of machine `machine_id` would mix with:
    its machine folder's node files, flat node files, and (machine 0) the run's summary."""
    mine = sorted(machine_dir(run_dir, machine_id).glob("node_*.jsonl")) + sorted(run_dir.glob("node_*.jsonl"))
    if machine_id == 0 and (run_dir / "summary.json").exists():
        mine.append(run_dir / "summary.json")
    return mine


def make_run_dirs(cfg: Config, out_dir: str | Path | None, run_id: str, overwrite: bool = False,
                  resume: bool = False) -> tuple[Path, Path]:
    """(run folder, this machine's folder in it). The run folder is `out_dir` when given,
    else ``<run.out_dir>/<run.name>-<run id>``. One that already holds this machine's
    results is an error unless `overwrite` (they are removed) or `resume` (kept)."""
    if out_dir is not None:
        run_dir = Path(out_dir)
    else:
        run_dir = Path(cfg.resolve(cfg.run.out_dir) or "runs") / f"{cfg.run.name}-{run_id}"
    mdir = machine_dir(run_dir, cfg.run.machine_id)
    existing = holds_results(run_dir, cfg.run.machine_id) if run_dir.exists() else []
    if resume:
        if not existing:
            raise RunFailed(f"--resume: {run_dir} holds no results of machine {cfg.run.machine_id} to resume")
    elif existing and not overwrite:
        raise RunFailed(f"{run_dir} already holds results ({existing[0].name} and {len(existing) - 1} more); "
                        f"give another --out, --resume to continue that run, or --overwrite to replace it")
    elif existing:
        shutil.rmtree(mdir, ignore_errors=True)
        for p in existing:
            p.unlink(missing_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    return run_dir, mdir


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, SIGTERM to the launcher stops the run as Ctrl-C does."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stderr(line: str) -> None:
    print(f"dflsplit: {line}", file=sys.stderr, flush=True)


def run_experiment(
    cfg: Config,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
    on_event: Callable[[dict], None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    say: Callable[[str], None] | None = None,
    nodes: list[int] | None = None,
) -> dict[str, Any]:
    """Run this machine's nodes of `cfg` to completion and return the summary.

    Node processes are forked from this one. Results go to ``<run>/machine_<id>/`` where
    the run folder is `out_dir`, or ``<run.out_dir>/<run.name>-<run id>``; a folder that
    already holds this machine's results is refused unless `overwrite` or `resume`.
    With several machines the launchers first agree on the run (start barrier, lines
    about who is missing go to `say`, stderr by default). Machine 0 returns (and writes
    to ``<run>/summary.json``) the summary of every node of the run; other machines
    return their own nodes'.

    `resume` continues the run in `out_dir` from its nodes' checkpoints: every node of
    every machine (all restarted, after a start barrier; they agree on the first round),
    or only the nodes in `nodes`, which rejoin the run that goes on without them.

    Raises RunFailed if a node or another machine fails (with ``run.on_peer_failure:
    skip`` a node that dies is reported and the others go on), and RunInterrupted on
    Ctrl-C or SIGTERM.
    """
    from .datasets import prepare_dataset, preload_global_test_set
    from .node import NODES

    say = say or _stderr
    launch = time.time()
    mapping = LinearMapping.from_config(cfg)
    mapping.resolve_hosts(str(cfg.run.ip_file or "run.hosts"))  # a host that does not resolve fails here
    check_curve_keys(cfg, mapping)
    node_cls = NODES.get(cfg.node.name)
    uids = node_cls.local_uids(cfg, mapping)
    if nodes is not None:
        if not resume:
            raise RunFailed("nodes: starting some of a machine's nodes is for --resume (a node rejoining its run)")
        bad = sorted(set(nodes) - set(uids))
        if bad:
            raise RunFailed(f"nodes {bad} are not nodes of machine {cfg.run.machine_id} ({uids[0]}..{uids[-1]})")
        uids = sorted(set(nodes))
    keep_freed_memory()
    raise_open_files_limit()
    import torch

    # before any torch work here (a synthetic dataset's is parallel): a node forked after
    # OpenMP started its threads hangs in its own first parallel region
    torch.set_num_threads(1)
    dataset = prepare_dataset(cfg)
    prepared = node_cls.prepare(cfg, dataset)
    graph = prepared["graph"]
    for shard in {node_cls.data_shard(cfg, u) for u in uids} - {None}:
        dataset.partition_train(shard[1])  # once here, inherited by every node
    warm_up(cfg)
    preload_global_test_set(cfg, torch.channels_last, dataset)  # the layout node_main gives images
    for uid in uids:
        mapping.check_ports_free(uid)
    digest = config_hash(cfg, graph, mapping)
    if resume and nodes is not None:
        return _rejoin(cfg, uids, out_dir, mapping, prepared, digest, dataset, progress, on_event, launch, say)
    start_timeout = cfg.run.start_timeout
    coord = Coordinator(cfg.run.machine_id, {m: mapping.hosts[m] for m in range(mapping.machines)},
                        mapping.coordinator_address, digest, start_timeout, say=say)
    try:
        with _sigterm_as_interrupt():
            resume_id = _resume_run_id(cfg, out_dir) if resume else None
            try:
                run_id = coord.join(resume_id)
            except KeyboardInterrupt:
                raise RunInterrupted(f"machine {cfg.run.machine_id}: interrupted during the start barrier") from None
            except BarrierFailed as e:
                raise RunFailed(str(e)) from None
            run_dir, mdir = make_run_dirs(cfg, out_dir, run_id, overwrite, resume)
            identity = {"run": run_id, "config": digest}
            if not resume:
                info = {"run_id": run_id, "config_hash": digest, "machine_id": cfg.run.machine_id,
                        "machines": mapping.machines, "hosts": {str(m): h for m, h in mapping.hosts.items()},
                        "nodes": sorted(uids), "host": socket.gethostname(), "pid": os.getpid(), "launched": launch}
                write_json(mdir / "run.json", info)
                dump_config(cfg, mdir / "config.yaml")
                graph.write(mdir / "graph.edges")
            log.debug("machine %d: run %s in %s", cfg.run.machine_id, run_id, mdir)
            floor = max((resume_floor(mdir, u) for u in uids), default=0) if resume else 0
            records, timing = _run_nodes(cfg, uids, mdir, mapping, prepared, identity, dataset, coord, progress,
                                         on_event, launch, "restart" if resume else None, floor, say)
            summary = {
                "name": cfg.run.name, "run_id": run_id, "run_dir": str(run_dir), "machine_dir": str(mdir),
                "machine_id": cfg.run.machine_id, "machines": mapping.machines, "rounds": cfg.run.rounds,
                "transport": cfg.communication.name, "launch_time": launch, **timing,
            }
            write_summary(mdir, {**summary, **summarize(records)})
            merge_traces(mdir)
            if cfg.run.machine_id != 0:
                coord.gather(records, 0)
                return {**summary, **summarize(records)}
            everything, missing = coord.gather(records, cfg.communication.timeout)
            if missing:
                say(f"machines {missing} did not report their results; the run's summary covers "
                    f"{len(everything)} nodes (dflsplit merge adds them from copied folders)")
            summary = {**summary, "machines_missing": missing, **summarize(everything)}
            write_summary(run_dir, summary)
            return summary
    finally:
        coord.close()


def resume_floor(mdir: Path, uid: int) -> int:
    """The first round node `uid` can resume at: after its checkpoint and its last record."""
    from .node.checkpoint import folder_of
    from .results import node_file

    head = read_json(folder_of(mdir) / f"node_{uid}.json")
    if "round" not in head:
        raise RunFailed(f"--resume: node {uid} has no checkpoint in {folder_of(mdir)} (set run.checkpoint_every)")
    last = int(head["round"])
    path = node_file(mdir, uid)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line)["round"]))
            except (ValueError, KeyError, TypeError):
                pass
    return last + 1


def _rejoin(cfg, uids, out_dir, mapping, prepared, digest, dataset, progress, on_event, launch, say):
    """Restart `uids` from their checkpoints into their run, which goes on without them."""
    if out_dir is None:
        raise RunFailed("--resume needs the run folder (--out RUN_DIR)")
    mdir = machine_dir(out_dir, cfg.run.machine_id)
    info = read_json(mdir / "run.json")
    if not info.get("run_id"):
        raise RunFailed(f"--resume: {mdir / 'run.json'} does not name a run")
    if info.get("config_hash") != digest:
        raise RunFailed(f"--resume: the config differs from the one {out_dir} was run with (config hash "
                        f"{digest[:12]} against {str(info.get('config_hash'))[:12]})")
    for uid in uids:
        resume_floor(mdir, uid)  # fails now, naming the node, when it has no checkpoint
    identity = {"run": info["run_id"], "config": digest}
    with _sigterm_as_interrupt():
        records, timing = _run_nodes(cfg, uids, mdir, mapping, prepared, identity, dataset, None, progress,
                                     on_event, launch, "rejoin", 0, say)
    if timing["failed_nodes"]:
        raise RunFailed("; ".join(f"node {u} failed again: {what}" for u, what in timing["failed_nodes"].items()))
    return {"name": cfg.run.name, "run_id": info["run_id"], "run_dir": str(out_dir), "machine_dir": str(mdir),
            "machine_id": cfg.run.machine_id, "machines": mapping.machines, "rounds": cfg.run.rounds,
            "transport": cfg.communication.name, "launch_time": launch, "rejoined": uids, **timing,
            **summarize(records)}


def _resume_run_id(cfg: Config, out_dir) -> str | None:
    if out_dir is None:
        raise RunFailed("--resume needs the run folder (--out RUN_DIR)")
    return read_json(machine_dir(out_dir, cfg.run.machine_id) / "run.json").get("run_id")


def _run_nodes(cfg, uids, mdir, mapping, prepared, identity, dataset, coord, progress, on_event, launch,
               resume, floor, say) -> tuple[dict[int, list[dict]], dict[str, Any]]:
    """Fork the nodes, drive the start barrier (`coord`; None: a rejoin, no barrier), follow
    progress; (the nodes' records, start-up and wall time) once every node finished or, with
    ``run.on_peer_failure: skip``, died. Raises RunFailed / RunInterrupted."""
    ctx = mp.get_context("fork")
    events = ctx.Queue()
    start = None
    if coord is not None:
        start = StartSignal(ctx.Event(), max(time.monotonic() + 1.0, coord.deadline), ctx.Value("i", floor))
    procs: dict[int, Any] = {}  # node uid → the process hosting it (run.nodes_per_process nodes share one)
    for group in mapping.process_groups(uids):
        proc = ctx.Process(target=_child, args=(cfg, group, mdir, mapping, prepared, events, identity, start, dataset,
                                                resume), name=f"node-{group[0]}", daemon=False)
        for u in group:
            procs[u] = proc
    processes = list(dict.fromkeys(procs.values()))
    for p in processes:
        p.start()
    pids = read_json(mdir / "pids.json")  # node uid → process id, for whoever watches or restarts nodes
    write_json(mdir / "pids.json", {**pids, **{str(u): p.pid for u, p in procs.items()}})
    show = cfg.run.progress if progress is None else progress
    skip = cfg.run.on_peer_failure == "skip"
    bar = None
    rounds_done = {uid: 0 for uid in uids}
    connected: set[int] = set()
    first_round: dict[int, float] = {}
    done: set[int] = set()
    failed: dict[int, str] = {}
    error: str | None = None
    interrupted = False
    started = coord is None
    ready_sent = False

    def node_failed(uid: int, what: str) -> str | None:
        """A node died: the run's error, or None when the run goes on without it."""
        text = f"node {uid} failed: {what}; see {mdir / ('node_%d.log' % uid)}"
        if not skip:
            return text
        failed[uid] = what
        say(f"{text}; the other nodes go on (run.on_peer_failure: skip)")
        connected.add(uid)
        return None

    last_check = time.monotonic()
    try:
        while len(done) + len(failed) < len(uids) and error is None:
            if time.monotonic() - last_check > 0.5:  # a node that died without a word (e.g. SIGKILL)
                last_check = time.monotonic()
                for u, p in procs.items():
                    if u not in done and u not in failed and p.exitcode not in (None, 0):
                        error = node_failed(u, f"process exited with code {p.exitcode}")
                        if error:
                            break
                if error:
                    break
            try:
                if not started:
                    if len(connected) == len(uids) and not ready_sent:
                        coord.ready(floor)
                        ready_sent = True
                        log.debug("machine %d: every node connected in %.2f s", cfg.run.machine_id,
                                  time.time() - launch)
                    started = coord.poll(0.0)
                    if started:
                        start.round.value = coord.first_round
                        start.event.set()
                        log.debug("machine %d: every machine is ready: start at round %d", cfg.run.machine_id,
                                  coord.first_round)
                        if show:
                            from tqdm import tqdm

                            bar = tqdm(total=cfg.run.rounds, desc=f"{cfg.run.name} ({len(uids)} nodes)",
                                       unit="round", file=sys.stderr)
                elif coord is not None and coord.machines > 1:
                    coord.poll(0.0)  # an ABORT from machine 0 ends this machine's run too
                e = events.get(timeout=0.1 if not started else 1.0)
            except queue_mod.Empty:
                last_check = 0.0  # look for dead nodes now
                continue
            except (BarrierFailed, RunAborted) as exc:
                error = str(exc)
                break
            if on_event:
                on_event(e)
            kind = e.get("event")
            if kind == "connected":
                connected.add(e["uid"])
            elif kind == "round":
                rounds_done[e["uid"]] = e["round"] + 1
                first_round.setdefault(e["uid"], e["wall_time"] - e["round_seconds"] - e["eval_seconds"])
                if bar is not None and min(rounds_done.values()) > bar.n:
                    bar.update(min(rounds_done.values()) - bar.n)
            elif kind == "done":
                done.add(e["uid"])
            elif kind == "error" and e["uid"] not in failed:
                error = node_failed(e["uid"], e["error"])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
        if error is not None or interrupted:
            if coord is not None:
                coord.abort(error or f"machine {cfg.run.machine_id} was interrupted")
            for p in processes:
                if p.is_alive():
                    p.terminate()
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        events.close()
    if interrupted:
        raise RunInterrupted(f"interrupted: stopped {len(uids)} nodes of machine {cfg.run.machine_id}; "
                             f"results so far in {mdir}")
    if error is not None:
        raise RunFailed(error)
    records = {u: r for u, r in read_run(mdir).items() if u in procs}
    timing = {
        "startup_seconds": (max(first_round.values()) - launch) if first_round and
        len(first_round) == len(uids) - len(failed) else None,
        "wall_seconds": time.time() - launch,
        "failed_nodes": {str(u): what for u, what in sorted(failed.items())},
    }
    return records, timing
