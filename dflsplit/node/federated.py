"""`federated`: a server and clients (FedAvg, McMahan et al. 2017, and the server optimizers
of Reddi et al. 2021: FedAvgM, FedAdam, FedYogi, FedAdagrad).

Each round the server samples clients (`fraction` or `clients_per_round` of them, drawn
from the run seed and the round, so every client knows whether it is sampled without
being told), publishes the global model once to all of them (over the torrent transport
the sampled clients swarm on it), and waits for their models. It averages them weighted
by each client's training-sample count (through Sharing's aggregator registry), and its
server optimizer turns that average into the next global model. A client that is not
sampled idles the round. Clients train with the configured Training (``fedprox`` adds
its proximal term). The server holds no training data and evaluates the global model.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..communication import PayloadRejected
from ..graphs import Graph
from ..registry import key
from ..sharing.base import mixing_seed, shared_state
from ..sharing.server_optimizers import SERVER_OPTIMIZERS, build_server_optimizer
from .base import NODES, Node


@dataclass
class FederatedKeys:
    """Keys of node `federated`."""

    server: int = key(0, "uid of the server node (it may be alone on a machine)", ge=0)
    fraction: Optional[float] = key(None, "share of the clients sampled each round (default: all)", gt=0, le=1)
    clients_per_round: Optional[int] = key(None, "clients sampled each round (instead of fraction)", ge=1)
    server_optimizer: str = key("fedavg", "fedavg, fedavgm, fedadam, fedyogi or fedadagrad")
    server_lr: Optional[float] = key(None, "server learning rate η (default: fedavg 1, fedavgm 1 − momentum, fedadagrad 0.1, fedadam and fedyogi 0.01)", gt=0)
    server_momentum: float = key(0.9, "fedavgm's server momentum β", ge=0, lt=1)
    beta1: float = key(0.9, "first-moment decay of the adaptive optimizers", ge=0, lt=1)
    beta2: float = key(0.99, "second-moment decay of fedadam and fedyogi", ge=0, lt=1)
    tau: float = key(1e-3, "adaptivity τ of the adaptive optimizers", gt=0)


def clients_of(cfg) -> list[int]:
    return [u for u in range(cfg.num_nodes) if u != cfg.node.server]


def sampled_clients(cfg, round_: int) -> list[int]:
    """The clients of `round_`, sorted (the same on every node)."""
    clients = clients_of(cfg)
    k = len(clients)
    if cfg.node.clients_per_round is not None:
        k = cfg.node.clients_per_round
    elif cfg.node.fraction is not None:
        k = max(1, math.ceil(cfg.node.fraction * len(clients)))
    return sorted(random.Random(mixing_seed(cfg.run.seed, round_, 0xFED)).sample(clients, k))


def sample_weights(samples: dict[int, int]) -> dict[int, float]:
    """Aggregation weights proportional to each client's training-sample count."""
    total = sum(samples.values())
    return {c: n / total for c, n in samples.items()}


def federated_average(models: dict[int, dict[str, torch.Tensor]], samples: dict[int, int], aggregate_fn):
    """The clients' models combined by `aggregate_fn` (an AGGREGATORS entry) with weights
    proportional to their sample counts, clients in sorted order."""
    weights = sample_weights(samples)
    clients = sorted(models)
    return aggregate_fn([models[c] for c in clients], [weights[c] for c in clients])


@NODES.register("federated", keys=FederatedKeys)
class FederatedNode(Node):
    """The server or a client of a federated run, by uid (`node.server`)."""

    def __init__(self, context):
        super().__init__(context)
        self.training = self.ctx.get("training")
        self.sharing = self.ctx["sharing"]
        self.is_server = self.uid == self.cfg.node.server
        if self.is_server:
            k = self.cfg.node
            self.optimizer = build_server_optimizer(
                k.server_optimizer, lr=k.server_lr, momentum=k.server_momentum, beta1=k.beta1, beta2=k.beta2, tau=k.tau)

    @classmethod
    def check_config(cls, cfg):
        k, n = cfg.node, cfg.num_nodes
        if n < 2:
            return (f"section 'run': key 'procs_per_machine': federated learning needs a server and at least one "
                    f"client, the run has {n} node(s) (machines × procs_per_machine)")
        if k.server >= n:
            return f"section 'node': key 'server': uid {k.server} is not a node of the run (uids 0..{n - 1})"
        if k.fraction is not None and k.clients_per_round is not None:
            return "section 'node': set at most one of keys 'fraction' and 'clients_per_round'"
        if k.clients_per_round is not None and k.clients_per_round > n - 1:
            return f"section 'node': key 'clients_per_round': {k.clients_per_round} is more than the {n - 1} clients"
        try:
            SERVER_OPTIMIZERS.get(k.server_optimizer)
        except KeyError as e:
            return f"section 'node': key 'server_optimizer': {e.args[0]}"
        if k.server in cfg.byzantine:
            return f"section 'attack': key 'nodes': the server (uid {k.server}) cannot be Byzantine here"
        if cfg.attack.omniscient:
            return "section 'attack': key 'omniscient': federated clients see only the global model; set it to false"
        if cfg.sharing.name != "full":
            return (f"section 'sharing': key 'name': federated clients send whole models; "
                    f"sharing {cfg.sharing.name!r} is for gossip nodes (use 'full')")
        return None

    @classmethod
    def aggregation_inputs(cls, cfg):
        return len(sampled_clients(cfg, 0))

    @classmethod
    def topology(cls, cfg):
        """A star: the server and each client."""
        return Graph(cfg.num_nodes, [(cfg.node.server, c) for c in clients_of(cfg)])

    @classmethod
    def data_shard(cls, cfg, uid):
        if uid == cfg.node.server:
            return None
        return clients_of(cfg).index(uid), cfg.num_nodes - 1

    def should_test(self, round_: int) -> bool:
        return self.is_server and super().should_test(round_)

    def run_round(self, round_: int) -> dict:
        clients = sampled_clients(self.cfg, round_)
        return self.serve(round_, clients) if self.is_server else self.participate(round_, clients)

    def node_state(self) -> dict:
        state = super().node_state()
        if self.is_server:
            state["server_optimizer"] = self.optimizer.state
        return state

    def load_node_state(self, state: dict) -> None:
        super().load_node_state(state)
        if self.is_server:
            self.optimizer.state = state["server_optimizer"]

    def serve(self, round_: int, clients: list[int]) -> dict:
        own = shared_state(self.model)
        global_ = {k: v.clone() for k, v in own.items()}
        payload = self.sharing.encode(self.model, round_)
        published = time.time()
        active = self.view.active(clients)
        if active:
            self.transport.publish(f"global/{round_}", payload.tensors, to=active, header={"published": published})
        messages = self.gather(f"update/{round_}", active, round_, lambda c: self.sharing.expect(c, round_, own))
        models, samples = {}, {}
        for c, m in messages.items():
            n = m.header.get("samples")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                self.transport.rejections("update without a valid sample count", f"client {c}: samples={n!r}")
                self.log.warning("round %d: client %d sent samples=%r, expected an int >= 1: left out", round_, c, n)
                continue
            try:
                models[c] = self.sharing.decode(c, round_, m.tensors, m.header, own)
            except PayloadRejected as e:
                self.transport.rejections("payload that does not decode", str(e))
                continue
            samples[c] = n
        if models:
            average = federated_average(models, samples, self.sharing.aggregate_fn)
            self.model.load_state_dict(self.optimizer.step(global_, average), strict=False)
        arrived = sorted(models)
        record = {"train_loss": None, "clients": arrived, "samples": [samples[c] for c in arrived]}
        if len(arrived) < len(clients):
            record["clients_missing"] = sorted(set(clients) - set(arrived))
        return record

    def participate(self, round_: int, clients: list[int]) -> dict:
        if self.uid not in clients:
            return {"train_loss": None, "sampled": False}
        own = shared_state(self.model)
        server = self.cfg.node.server
        got = self.gather(f"global/{round_}", self.view.active([server]), round_,
                          lambda s: self.sharing.expect(s, round_, own))
        if server not in got:  # the server is gone (on_peer_failure: skip): nothing to train on
            return {"train_loss": None, "sampled": True, "missed": True}
        m = got[server]
        published = m.header.get("published")
        broadcast = time.time() - published if isinstance(published, (int, float)) else None
        with torch.no_grad():
            self.model.load_state_dict(self.sharing.decode(server, round_, m.tensors, m.header, own), strict=False)
        with self.compute:
            loss = self.training.train()
        if self.attacks_messages:  # it knows its own honest model, not the other clients'
            trained = {k: v.clone() for k, v in shared_state(self.model).items()}
            f = len(set(clients) & self.cfg.byzantine)
            self.model.load_state_dict(self.craft(trained, [trained], len(clients), f, round_), strict=False)
        update = self.sharing.encode(self.model, round_)
        self.transport.publish(f"update/{round_}", update.tensors, to=[server],
                               header={**update.header, "samples": int(len(self.data.train_y))})
        return {"train_loss": loss, "sampled": True, "broadcast_seconds": broadcast}
