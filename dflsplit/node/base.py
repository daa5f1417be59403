"""Node layer: the lifecycle of one participant (connect, rounds, evaluate, results, shutdown)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..registry import Registry
from ..results import ResultsWriter
from ..graphs import graph_from_config
from ..training import evaluate

NODES: Registry[type["Node"]] = Registry("node")


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

    def run(self) -> None:
        t0 = time.perf_counter()
        start = self.ctx.get("start")
        self.connect(max(1.0, start.left()) if start is not None else None)
        self.log.info("connected to %d peers in %.2f s", len(self.peers()), time.perf_counter() - t0)
        self.report({"event": "connected", "uid": self.uid, "time": time.time()})
        if start is not None:
            start.wait(self.uid)  # every node of every machine is connected
            self.log.debug("start signal after %.2f s", time.perf_counter() - t0)
        for r in range(self.cfg.run.rounds):
            self.transport.advance(r)
            t0 = time.perf_counter()
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
            record.update(**metrics, eval_seconds=eval_seconds, **self.traffic(), wall_time=time.time())
            self.results.append(record)
            self.report({"event": "round", "uid": self.uid, **record})
            self.log.debug("round %d: %.3f s, evaluation %.3f s, %d bytes sent", r, record["round_seconds"],
                           eval_seconds, record["bytes_sent"])
            if test_acc is not None:
                self.log.info("round %d: train_loss %.4f test_acc %.4f", r, record.get("train_loss") or float("nan"), test_acc)
        if self.cfg.node.save_model:
            self.save_model()
