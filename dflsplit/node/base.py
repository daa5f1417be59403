"""Node layer: the lifecycle of one participant (connect, rounds, evaluate, results, shutdown)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..registry import Registry
from ..results import ResultsWriter
from ..graphs import graph_from_config
from ..training import evaluate

NODES: Registry[type["Node"]] = Registry("node")


def machine_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def node_threads(cfg) -> int:
    """Torch threads a node process gets: ``run.threads_per_proc``, else its share of the
    machine's cores among the machine's node processes (at least one)."""
    return cfg.run.threads_per_proc or max(1, machine_cores() // cfg.run.procs_per_machine)


class PeerView:
    """The peers a node still waits for (``run.on_peer_failure: skip``).

    A peer whose message did not come is *silent* that round; after `silent_rounds` silent
    rounds in a row it is dropped: not sent to, not waited for. A peer that announces it
    takes part again from round R (after a restart) is pending until R, then active with a
    clean record. Everything here depends only on what arrived, never on timing, so runs
    that lose the same messages take the same decisions.
    """

    def __init__(self, silent_rounds: int):
        self.silent_rounds = silent_rounds
        self.silent: dict[int, int] = {}
        self.dropped: set[int] = set()
        self.pending: dict[int, int] = {}  # peer → round it rejoins at

    def rejoins(self, peer: int, round_: int) -> None:
        self.pending[peer] = round_

    def begin_round(self, round_: int) -> None:
        for peer, at in list(self.pending.items()):
            if at <= round_:
                del self.pending[peer]
                self.dropped.discard(peer)
                self.silent.pop(peer, None)

    def active(self, peers: list[int]) -> list[int]:
        """`peers` without the dropped and the pending ones, in their order."""
        return [p for p in peers if p not in self.dropped and p not in self.pending]

    def heard(self, peer: int) -> None:
        self.silent.pop(peer, None)

    def missed(self, peer: int) -> bool:
        """`peer` was silent this round; True when that drops it."""
        self.silent[peer] = self.silent.get(peer, 0) + 1
        if self.silent[peer] >= self.silent_rounds and peer not in self.dropped:
            self.dropped.add(peer)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"silent": dict(self.silent), "dropped": sorted(self.dropped), "pending": dict(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.silent = {int(k): int(v) for k, v in state["silent"].items()}
        self.dropped = {int(p) for p in state["dropped"]}
        self.pending = {int(k): int(v) for k, v in state["pending"].items()}


class Node:
    """One participant. Subclasses implement `run_round`; `run` drives the lifecycle.

    `context` carries what the launcher built for this node: cfg, uid, mapping, graph,
    transport, model, data (NodeData), training, sharing, device, results writer, and
    `report(event: dict)` to tell the launcher about progress.
    """

    def __init__(self, context: dict[str, Any]):
        self.ctx = context
        self.cfg = context["cfg"]
        self.uid: int = context["uid"]
        self.transport = context["transport"]
        self.model: torch.nn.Module = context["model"]
        self.data = context["data"]
        self.results: ResultsWriter = context["results"]
        self.report: Callable[[dict[str, Any]], None] = context.get("report", lambda e: None)
        self.log = logging.getLogger(f"dflsplit.node.{self.uid}")
        self.byzantine = self.uid in self.cfg.byzantine
        self.view = PeerView(self.cfg.run.silent_rounds)
        # held while computing: a process hosting many nodes computes with as many at once
        # as it has cores, so their working memory does not add up (waiting holds nothing)
        self.compute = context.get("compute") or contextlib.nullcontext()
        self.catch_up = 0  # rounds the peers have to run before this node's next round (after sitting out)
        if self.byzantine:
            self._poison_data()

    # Byzantine behaviour -------------------------------------------------------------
    def _poison_data(self) -> None:
        from ..sharing.attacks import DATA_ATTACKS, flip_labels

        if self.cfg.attack.name in DATA_ATTACKS and len(self.data.train_y):
            self.data.train_y.copy_(flip_labels(self.data.train_y, self.data.num_classes))
            self.log.info("node %d is Byzantine: %s on its own training labels", self.uid, self.cfg.attack.name)

    @property
    def attacks_messages(self) -> bool:
        """True when this node is Byzantine with an attack on what it sends."""
        from ..sharing.attacks import DATA_ATTACKS

        return self.byzantine and self.cfg.attack.name not in DATA_ATTACKS

    def craft(self, own: dict[str, torch.Tensor], honest: list[dict[str, torch.Tensor]], n: int, f: int,
              round_: int) -> dict[str, torch.Tensor]:
        """The attack's vector from this node's own tensors and the honest ones it holds,
        shaped like `own`; `n` vectors take part in the aggregation, `f` of them Byzantine."""
        from ..sharing.aggregators import stack_models
        from ..sharing.attacks import craft
        from ..sharing.base import mixing_seed, unflatten

        names = list(own)
        own_row = stack_models([own], names)[0]
        rows = stack_models(honest, names) if honest else own_row.new_zeros((0, own_row.numel()))
        rng = torch.Generator().manual_seed(mixing_seed(self.cfg.run.seed, self.uid, round_, 0xBAD))
        a = self.cfg.attack
        vector = craft(a.name, own_row, rows, rng, n, f, dataclasses.asdict(a.options) if a.options else {})
        return unflatten(vector, own)

    @classmethod
    def topology(cls, cfg):
        """The peer graph of a run of this node type."""
        return graph_from_config(cfg)

    @classmethod
    def prepare(cls, cfg, dataset=None) -> dict[str, Any]:
        """What every node of a run derives from the config, built once by the launcher and
        handed to each node in its context: ``graph`` (the peer graph) at least. `dataset`:
        the prepared dataset, when the derivation needs it."""
        return {"graph": cls.topology(cfg)}

    @classmethod
    def local_uids(cls, cfg, mapping) -> list[int]:
        """The node ids this machine runs."""
        return mapping.local_uids(cfg.run.machine_id)

    @classmethod
    def data_shard(cls, cfg, uid: int) -> tuple[int, int] | None:
        """(index, count): node `uid` trains on shard `index` of the training set cut into
        `count`; None: it holds no training data (e.g. a federated server)."""
        return uid, cfg.num_nodes

    @classmethod
    def aggregation_inputs(cls, cfg) -> int | None:
        """The fewest vectors one of this run's aggregations combines (own included), when the
        config fixes it: the loader checks the aggregator's f against it. None: unknown."""
        return None

    @classmethod
    def check_config(cls, cfg) -> str | None:
        """A cross-key problem of a config for this node type ('section ...: key ...: what'),
        or None; run by the config loader."""
        return None

    def peers(self) -> list[int]:
        """Nodes this one exchanges with (handshake targets)."""
        return self.ctx["graph"].neighbors(self.uid)

    def connect(self, timeout: float | None = None) -> None:
        """Handshake with every peer within `timeout` s; a PeerTimeout names the missing peers'
        machines and hosts."""
        from ..communication import PeerTimeout

        try:
            self.transport.connect(self.peers(), timeout)
        except PeerTimeout as e:
            mapping = self.ctx.get("mapping")
            peers = e.peer if isinstance(e.peer, (list, tuple)) else [e.peer]
            if mapping is None or not peers:
                raise
            machines = sorted({mapping.machine_rank(p)[0] for p in peers})
            where = ", ".join(f"machine {m} ({mapping.hosts[m]})" for m in machines)
            raise PeerTimeout(peers, "HELLO", e.timeout, self.uid, detail=f"on {where}") from None

    def run_round(self, round_: int) -> dict[str, Any]:
        """One round; returns the round's record fields (train_loss at least)."""
        raise NotImplementedError

    def should_test(self, round_: int) -> bool:
        last = round_ == self.cfg.run.rounds - 1
        return last or (round_ + 1) % self.cfg.node.test_after == 0

    def prepare_eval(self) -> None:
        """Make `self.model` the model to evaluate (a split node assembles it from replicas)."""

    def test(self) -> dict[str, float]:
        """Evaluate on the test set (test_loss, test_acc), and on the node's training shard
        too (train_eval_loss, train_acc) when `node.eval_train` is set."""
        self.prepare_eval()
        batch = self.cfg.training.eval_batch_size
        with self.compute:
            out = dict(zip(("test_loss", "test_acc"), evaluate(self.model, self.data.test_x, self.data.test_y, batch)))
            if self.cfg.node.eval_train:
                train = evaluate(self.model, self.data.train_x, self.data.train_y, batch)
                out.update(zip(("train_eval_loss", "train_acc"), train))
        return out

    def traffic(self) -> dict[str, int]:
        """Bytes so far, all (`bytes_*`) and split into tensor data (`payload_bytes_*`) and the
        rest (`metadata_bytes_*`: headers, framing, torrent metadata and protocol)."""
        t = self.transport
        sent, received = t.bytes_sent, t.bytes_received
        psent, preceived = t.payload_bytes_sent, t.payload_bytes_received
        return dict(
            bytes_sent=sent, bytes_received=received,
            payload_bytes_sent=psent, payload_bytes_received=preceived,
            metadata_bytes_sent=max(0, sent - psent), metadata_bytes_received=max(0, received - preceived),
        )

    def save_model(self, stem: str = "model") -> None:
        """Write `self.model` to ``<stem>_<uid>.safetensors`` in the run folder (`node.save_model`
        at the end: the model the last round evaluated, as the last round always tests)."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(Path(self.ctx.get("run_dir", ".")) / f"{stem}_{self.uid}.safetensors"))

    # state, checkpoints and failures ------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything this node needs to go on from where it is: model, training (optimizer,
        sampler, RNG), sharing state (e.g. top-k's reference) and the torch RNG. Subclasses
        add theirs (`node_state`)."""
        training = self.ctx.get("training")
        return {
            "model": self.model.state_dict(),
            "training": training.state_dict() if training is not None else {},
            "sharing": self.ctx["sharing"].state_dict(),
            "node": self.node_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of `state`."""
        self.model.load_state_dict(state["model"])
        training = self.ctx.get("training")
        if training is not None and state["training"]:
            training.load_state_dict(state["training"])
        self.ctx["sharing"].load_state_dict(state["sharing"])
        self.load_node_state(state["node"])
        torch.set_rng_state(state["torch_rng"])

    def node_state(self) -> dict[str, Any]:
        """The node type's own state for checkpoints (e.g. a server optimizer's moments);
        subclasses extend (the view of live peers is the base's)."""
        return {"view": self.view.state_dict()}

    def load_node_state(self, state: dict[str, Any]) -> None:
        """Inverse of `node_state`."""
        self.view.load_state_dict(state["view"])

    def restore(self) -> int:
        """Load this node's last checkpoint (`--resume`) and repair its results file; the
        first round it may run: after both the checkpoint and the last record written."""
        from .checkpoint import read_checkpoint, repair_results
        from ..results import node_file

        run_dir = self.ctx["run_dir"]
        found = read_checkpoint(run_dir, self.uid)
        last_record = repair_results(node_file(run_dir, self.uid))
        if found is None:
            raise RuntimeError(f"node {self.uid}: --resume, but {run_dir}/checkpoints holds no checkpoint of it "
                               f"(set run.checkpoint_every)")
        round_, state, record = found
        self.load_state(state)
        if last_record is None or last_record < round_:  # killed between checkpoint and record
            self.results.append(record)
            last_record = round_
        first = max(round_, last_record) + 1
        self.log.info("resumed from the checkpoint of round %d; results file ends at round %d", round_, last_record)
        return first

    def checkpoint(self, round_: int, record: dict[str, Any]) -> None:
        from .checkpoint import write_checkpoint

        write_checkpoint(self.ctx["run_dir"], self.uid, round_, self.state(), record)

    def round_deadline(self) -> float:
        """When this round's receives give up (time.monotonic): ``communication.timeout`` from
        now, plus as many more as rounds the peers still have to run to reach this node's
        round after it sat out or rejoined."""
        extra, self.catch_up = self.catch_up, 0
        return time.monotonic() + self.cfg.communication.timeout * (1 + extra)

    def gather(self, key: str, senders: list[int], round_: int,
               expect: Callable[[int], Any] | None = None, deadline: float | None = None) -> dict[int, Any]:
        """Receive `key` from each of `senders` (sender → Message) before one deadline
        (`deadline`, time.monotonic; default `round_deadline`). A sender whose message does
        not come fails the node (``run.on_peer_failure: fail``) or is left out (``skip``;
        after ``run.silent_rounds`` such rounds in a row it is dropped from the view until it
        rejoins); one that announces it sits out the round is left out at once. A payload
        refused on arrival (too large, other tensors than `expect` says, non-finite values)
        is left out and counted, whatever the policy: a bad peer must not stop an honest one."""
        from ..communication import PayloadRejected, PeerGone, PeerTimeout

        if deadline is None:
            deadline = self.round_deadline()
        skip = self.cfg.run.on_peer_failure == "skip"
        got: dict[int, Any] = {}
        for j in senders:
            while True:
                left = deadline - time.monotonic()
                try:  # in slices, to hear of a sender that announces it sits out this round
                    got[j] = self.transport.receive(key, j, timeout=max(0.0, min(left, 0.25) if skip else left),
                                                    expect=expect(j) if expect else None)
                    self.view.heard(j)
                except PayloadRejected as e:
                    self.log.warning("round %d: %s", round_, e)
                    self.view.heard(j)
                except PeerTimeout as e:
                    if not skip:
                        raise
                    self.take_announcements()
                    if j in self.view.pending:
                        self.log.info("round %d: node %d sits this round out", round_, j)
                    elif time.monotonic() < deadline and not isinstance(e, PeerGone):
                        continue
                    else:
                        self.log.warning("round %d: going on without node %d: %s", round_, j, e)
                        if self.view.missed(j):
                            self.log.warning("round %d: node %d missed %d rounds in a row: dropped from the view "
                                             "until it rejoins", round_, j, self.cfg.run.silent_rounds)
                break
        return got

    def announce_rejoin(self, round_: int) -> None:
        """Tell the peers this node takes part again from `round_` (after a restart): they
        include it again from that round on."""
        self.transport.publish(f"rejoin/{round_}", {}, to=self.peers(), header={"round": round_}, persistent=True)

    def announce_absence(self, first: int, last: int) -> None:
        """Tell the peers this node sits out rounds `first`..`last`: they do not wait for it."""
        self.transport.publish(f"absent/{first}", {}, to=self.peers(), header={"first": first, "last": last},
                               persistent=True)

    def take_announcements(self) -> None:
        """Note the peers' rejoin and absence announcements that arrived."""
        from ..communication import CommError, PeerTimeout

        for prefix in ("rejoin/", "absent/"):
            while True:
                try:
                    m = self.transport.receive_any(timeout=0, prefix=prefix)
                except PeerTimeout:
                    break
                except CommError as e:
                    self.log.warning("%s", e)
                    continue
                at = m.header.get("round") if prefix == "rejoin/" else m.header.get("last")
                if isinstance(at, int) and not isinstance(at, bool):
                    at += prefix == "absent/"  # back the round after the last one it sits out
                    self.view.rejoins(m.sender, at)
                    self.log.info("node %d takes part again from round %d", m.sender, at)

    def begin_round(self, round_: int) -> None:
        """Take the peers' announcements into account before `run_round`."""
        self.take_announcements()
        self.view.begin_round(round_)

    def run(self) -> None:
        t0 = time.perf_counter()
        run = self.cfg.run
        start = self.ctx.get("start")
        resume = self.ctx.get("resume")  # None, "restart" (every node) or "rejoin" (into a live run)
        first = self.restore() if resume else 0
        if resume:
            self.transport.advance(first)
        self.connect(max(1.0, start.left()) if start is not None else None)
        self.log.info("connected to %d peers in %.2f s", len(self.peers()), time.perf_counter() - t0)
        self.report({"event": "connected", "uid": self.uid, "time": time.time(), "first_round": first})
        if resume == "rejoin":
            peers = self.transport.peer_rounds()
            ahead = [r + max(REJOIN_MIN_ROUNDS, math.ceil(REJOIN_LEAD_SECONDS / pace) if pace > 0 else 0)
                     for r, pace in peers.values()]
            first = max([first, *ahead])
            self.catch_up = first - min((r for r, _ in peers.values()), default=first)
            self.log.info("rejoining at round %d (peers are at rounds %s)", first, sorted(r for r, _ in peers.values()))
            self.transport.advance(first)
            self.announce_rejoin(first)
        elif start is not None:
            start.wait(self.uid)  # every node of every machine is connected
            first = max(first, start.first_round())
            self.log.debug("start signal after %.2f s; first round %d", time.perf_counter() - t0, first)
        absent = run.absent.get(self.uid)
        for r in range(first, run.rounds):
            if run.crash.get(self.uid) == r:
                self.log.warning("round %d: killing itself (run.crash)", r)
                for h in logging.getLogger().handlers:
                    h.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if absent and absent[0] <= r <= absent[1]:
                if r == absent[0]:
                    self.transport.advance(absent[1] + 1)
                    self.announce_absence(absent[0], absent[1])
                    self.catch_up = absent[1] + 1 - absent[0]
                    self.log.info("sitting out rounds %d..%d (run.absent)", absent[0], absent[1])
                continue
            self.transport.advance(r)
            t0 = time.perf_counter()
            self.begin_round(r)
            record = {"round": r, **self.run_round(r)}
            if self.byzantine:
                record["byzantine"] = True
            record["round_seconds"] = time.perf_counter() - t0
            metrics = dict.fromkeys(("test_loss", "test_acc"))
            eval_seconds = 0.0
            if self.should_test(r):
                t1 = time.perf_counter()
                metrics = self.test()
                eval_seconds = time.perf_counter() - t1
            test_acc = metrics["test_acc"]
            record.update(**metrics, eval_seconds=eval_seconds, **self.traffic(), wall_time=time.time(),
                          rejected=self.transport.rejected, dropped=sum(self.transport.dropped.counts().values()),
                          payloads_inline=self.transport.paths["inline"],
                          payloads_torrent=self.transport.paths["torrent"])
            if run.checkpoint_every and ((r + 1) % run.checkpoint_every == 0 or r == run.rounds - 1):
                self.checkpoint(r, record)
            self.results.append(record)
            self.report({"event": "round", "uid": self.uid, **record})
            self.log.debug("round %d: %.3f s, evaluation %.3f s, %d bytes sent", r, record["round_seconds"],
                           eval_seconds, record["bytes_sent"])
            if test_acc is not None:
                self.log.info("round %d: train_loss %.4f test_acc %.4f", r, record.get("train_loss") or float("nan"), test_acc)
        if self.cfg.node.save_model:
            self.save_model()


#: a node restarted into a live run takes part again this far ahead of its peers (at least
#: this many rounds, and this many seconds at their pace), so every peer hears of it in time
REJOIN_MIN_ROUNDS = 2
REJOIN_LEAD_SECONDS = 2.0
