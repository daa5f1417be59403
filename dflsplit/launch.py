"""Launching the nodes of one machine: one OS process per node, forked from this process.

The launcher imports torch once, warms the lazily imported parts every node needs
(`warm_up`), and forks the node processes, so they share the interpreter's and
libraries' pages copy-on-write: start-up takes milliseconds per node and memory grows
with each node's own data and model, not with the import. Before the fork only
single-element torch operations run, on one thread, so no thread pool is inherited.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .config import Config, dump_config
from .mappings import LinearMapping
from .results import final_accuracies, mean_std, read_run, write_summary

log = logging.getLogger("dflsplit.launch")


class RunFailed(RuntimeError):
    """A node process failed; the message holds its error and where its log is."""


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return name


def threads_per_process(cfg: Config) -> int:
    """Torch threads per node so that the machine's node processes share its cores."""
    if cfg.run.threads_per_proc > 0:
        return cfg.run.threads_per_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.run.procs_per_machine)


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
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 512 << 20)
    mallopt(m_mmap_threshold, 512 << 20)


def warm_up(cfg: Config) -> None:
    """Import here, once, what each node would otherwise import for itself (seconds each):
    the dataset's reader (e.g. scikit-learn for digits) and the optimizer machinery."""
    import torch

    from .datasets import build_dataset
    from .training import build_optimizer

    torch.set_num_threads(1)
    build_dataset(cfg)
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    build_optimizer(cfg.optimizer, [param]).step()


def node_main(cfg: Config, uid: int, run_dir: Path, mapping, graph, report: Callable[[dict], None]) -> None:
    """Build one node's parts and run it; called in the node's own process."""
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
    torch.set_num_threads(threads_per_process(cfg))
    device = pick_device(cfg.run.device)
    node_cls = NODES.get(cfg.node.name)
    data = load_node_data(cfg, uid, node_cls.data_shard(cfg, uid))
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
    transport = build_transport(uid, mapping, cfg.communication)
    results = ResultsWriter(run_dir, uid)
    transport.start()
    log.info("model, training and %s transport ready after %.2f s", cfg.communication.name, time.perf_counter() - t0)
    context = dict(
        cfg=cfg, uid=uid, mapping=mapping, graph=graph, transport=transport, model=model, data=data,
        training=training, sharing=sharing, device=device, results=results, report=report,
        run_dir=run_dir,
    )
    try:
        node_cls(context).run()
    finally:
        transport.close()
        results.close()


def _child(cfg: Config, uid: int, run_dir: Path, mapping, graph, events) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(run_dir / f"node_{uid}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(cfg.run.log_level)
    try:
        node_main(cfg, uid, run_dir, mapping, graph, events.put)
    except BaseException as e:
        logging.getLogger(f"dflsplit.node.{uid}").exception("node %d failed", uid)
        events.put({"event": "error", "uid": uid, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        handler.flush()
        sys.exit(1)
    events.put({"event": "done", "uid": uid, "time": time.time()})


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


def make_run_dir(cfg: Config, out_dir: str | Path | None) -> Path:
    """`out_dir` as given, else `<run.out_dir>/<run.name>-<timestamp>` (machine id appended when several)."""
    if out_dir is not None:
        path = Path(out_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.resolve(cfg.run.out_dir) or "runs") / f"{cfg.run.name}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_experiment(
    cfg: Config,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Run this machine's nodes of `cfg` to completion and return the run summary.

    Node processes are forked from this one. Results go to `out_dir` (created), or to
    a fresh folder under `run.out_dir`. Raises RunFailed if a node fails.
    """
    from .datasets import preload_global_test_set, prepare_dataset
    from .node import NODES

    launch = time.time()
    mapping = LinearMapping.from_config(cfg)
    check_curve_keys(cfg, mapping)
    node_cls = NODES.get(cfg.node.name)
    graph = node_cls.topology(cfg)
    run_dir = make_run_dir(cfg, out_dir)
    dump_config(cfg, run_dir / "config.yaml")
    graph.write(run_dir / "graph.edges")
    prepare_dataset(cfg)
    keep_freed_memory()
    warm_up(cfg)
    import torch

    preload_global_test_set(cfg, torch.channels_last)  # the layout node_main gives images
    uids = node_cls.local_uids(cfg, mapping)
    for uid in uids:
        mapping.check_ports_free(uid)

    ctx = mp.get_context("fork")
    events = ctx.Queue()
    procs = {uid: ctx.Process(target=_child, args=(cfg, uid, run_dir, mapping, graph, events), name=f"node-{uid}", daemon=False) for uid in uids}
    for p in procs.values():
        p.start()

    show = cfg.run.progress if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.rounds, desc=f"{cfg.run.name} ({len(uids)} nodes)", unit="round", file=sys.stderr)
    rounds_done = {uid: 0 for uid in uids}
    connected: dict[int, float] = {}
    first_round: dict[int, float] = {}
    done: set[int] = set()
    error: dict | None = None
    try:
        while len(done) < len(uids) and error is None:
            try:
                e = events.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [u for u, p in procs.items() if u not in done and p.exitcode not in (None, 0)]
                if dead:
                    error = {"uid": dead[0], "error": f"process exited with code {procs[dead[0]].exitcode}"}
                continue
            if on_event:
                on_event(e)
            kind = e.get("event")
            if kind == "connected":
                connected[e["uid"]] = e["time"]
            elif kind == "round":
                rounds_done[e["uid"]] = e["round"] + 1
                if e["round"] == 0:
                    first_round[e["uid"]] = e["wall_time"] - e["round_seconds"] - e["eval_seconds"]
                if bar is not None and min(rounds_done.values()) > bar.n:
                    bar.update(min(rounds_done.values()) - bar.n)
            elif kind == "done":
                done.add(e["uid"])
            elif kind == "error":
                error = e
    finally:
        if bar is not None:
            bar.close()
        if error is not None:
            for p in procs.values():
                if p.is_alive():
                    p.terminate()
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        events.close()
    if error is not None:
        raise RunFailed(
            f"node {error['uid']} failed: {error['error']}; see {run_dir / ('node_%d.log' % error['uid'])}"
        )

    results = {u: r for u, r in read_run(run_dir).items() if u in procs}
    byzantine = cfg.byzantine
    accs = {u: a for u, a in final_accuracies(results).items() if u not in byzantine}  # honest nodes only
    acc_mean, acc_std = mean_std(accs.values())
    plain = [r["round_seconds"] for rs in results.values() for r in rs if r.get("test_acc") is None]
    with_eval = [r["round_seconds"] + r["eval_seconds"] for rs in results.values() for r in rs if r.get("test_acc") is not None]
    summary = {
        "name": cfg.run.name,
        "run_dir": str(run_dir),
        "machine_id": cfg.run.machine_id,
        "nodes": len(uids),
        "rounds": cfg.run.rounds,
        "transport": cfg.communication.name,
        "launch_time": launch,
        "startup_seconds": (max(first_round.values()) - launch) if len(first_round) == len(uids) else None,
        "wall_seconds": time.time() - launch,
        "median_round_seconds": _median(plain),
        "median_eval_round_seconds": _median(with_eval),
        "test_acc_mean": acc_mean,
        "test_acc_std": acc_std,
        "final_test_acc": {str(u): a for u, a in sorted(accs.items())},
        "byzantine": sorted(byzantine),
        "accuracy_over": "honest nodes" if byzantine else "all nodes",
        "bytes_sent": sum(rs[-1]["bytes_sent"] for rs in results.values() if rs),
        "bytes_received": sum(rs[-1]["bytes_received"] for rs in results.values() if rs),
    }
    write_summary(run_dir, summary)
    return summary


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
