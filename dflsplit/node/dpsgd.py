"""Gossip nodes: `dpsgd` (decentralized parallel SGD, Lian et al. 2017) on a static or a
per-round random graph, and `epidemic` (Epidemic Learning, de Vos et al., NeurIPS 2023).

Both run the same round: local training → encode the model (Sharing) → one publish to
this round's receivers → receive and decode each expected sender's payload → aggregate.
Every node derives the round's communication pattern from the run seed and the round,
so no node asks anyone who its neighbours are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import networkx as nx

from ..graphs import Graph, MIXING_WEIGHTS, make_graph
from ..registry import key
from ..sharing.base import mixing_seed, shared_state
from .base import NODES, Node


def dynamic_graph(cfg, round_: int) -> Graph:
    """Round `round_`'s random connected `graph.degree`-regular graph, drawn from
    (`graph.seed` or `run.seed`, round): every node computes the same graph."""
    g = cfg.graph
    base = g.seed if g.seed is not None else cfg.run.seed
    return make_graph("regular", cfg.num_nodes, degree=g.degree, seed=mixing_seed(base, round_, 0xD1))


class GossipNode(Node):
    """A node that trains locally and averages with the peers of each round."""

    def __init__(self, context):
        super().__init__(context)
        self.training = self.ctx["training"]
        self.sharing = self.ctx["sharing"]

    def pattern(self, round_: int) -> tuple[list[int], list[int], dict[int, float]]:
        """(send to, receive from, weights by node id incl. this one) for `round_`."""
        raise NotImplementedError

    def run_round(self, round_: int) -> dict:
        with self.compute:
            loss = self.training.train()
        send_to, receive_from, weights = self.pattern(round_)
        expected = len(receive_from)
        send_to, receive_from = self.view.active(send_to), self.view.active(receive_from)
        got = self.exchange(round_, send_to, receive_from, weights)
        return {"train_loss": loss, "peers_out": len(send_to), "peers_in": got,
                **({"peers_missing": expected - got} if got < expected else {})}

    def exchange(self, round_: int, send_to: list[int], receive_from: list[int], weights: dict[int, float]) -> int:
        """Publish this node's payload of `round_` to `send_to`, decode the payloads of
        `receive_from` that arrive before the round's deadline, and aggregate them with the
        own model under `weights` (renormalised over what arrived when some did not);
        returns how many arrived.

        A Byzantine node that attacks its messages first takes the honest payloads it is
        entitled to (its honest senders; every honest node's when the attack is
        omniscient), crafts its vector from them, and then publishes it. Honest nodes
        publish before they receive, so nobody waits on a Byzantine node to send first.
        """
        from ..communication import PayloadRejected

        key_ = f"model/{round_}"
        byz = self.cfg.byzantine
        omniscient = self.cfg.attack.omniscient
        if omniscient and not self.byzantine:  # the Byzantine nodes see every honest vector
            send_to = sorted(set(send_to) | (byz - {self.uid}))
        own = shared_state(self.model)  # views: read before the aggregate is loaded
        if self.attacks_messages:  # the crafted vector goes through the model; keep a copy of its own
            own = {k: v.clone() for k, v in own.items()}
        received: dict[int, dict] = {}
        deadline = self.round_deadline()  # one for every receive of the round

        def take(senders: list[int]) -> None:
            messages = self.gather(key_, senders, round_, lambda j: self.sharing.expect(j, round_, own), deadline)
            for j, m in messages.items():
                try:
                    received[j] = self.sharing.decode(j, round_, m.tensors, m.header, own)
                except PayloadRejected as e:
                    self.transport.rejections("payload that does not decode", str(e))
                    self.log.warning("round %d: %s", round_, e)

        if not self.attacks_messages:
            with self.compute:
                payload = self.sharing.encode(self.model, round_)
            if send_to:
                self.transport.publish(key_, payload.tensors, to=send_to, header=payload.header, concurrent=True)
        else:
            if omniscient:
                honest = [u for u in range(self.cfg.num_nodes) if u not in byz]
            else:
                honest = [j for j in receive_from if j not in byz]
            take(honest)
            f = len((set(receive_from) | {self.uid}) & byz)
            crafted = self.craft(own, [received[j] for j in honest if j in received], len(receive_from) + 1, f,
                                 round_)
            self.model.load_state_dict(crafted, strict=False)
            payload = self.sharing.encode(self.model, round_)
            self.model.load_state_dict(own, strict=False)
            if send_to:
                self.transport.publish(key_, payload.tensors, to=send_to, header=payload.header, concurrent=True)
        take([j for j in receive_from if j not in received])
        arrived = {j: received[j] for j in receive_from if j in received}
        complete = len(arrived) == len(weights) - 1  # weights: this node and every neighbour of the round
        if not complete:  # a neighbour is missing or out of the view: renormalise over what arrived
            total = weights[self.uid] + sum(weights[j] for j in arrived)
            weights = {i: weights[i] / total for i in (self.uid, *arrived)}
        try:
            with self.compute:
                self.sharing.aggregate(self.model, own, arrived, weights, self.uid)
        except ValueError as e:  # e.g. a robust rule that needs more vectors than arrived
            if complete:
                raise
            self.log.warning("round %d: %d of %d models arrived, too few to aggregate (%s): keeping its own",
                             round_, len(arrived), len(receive_from), e)
        return len(arrived)


@NODES.register("dpsgd")
class DPSGDNode(GossipNode):
    """Each round: local training → send the model to the neighbours → receive each
    neighbour's model of this round → average with `graph.mixing` weights.

    With ``graph.dynamic: true`` the graph is a fresh random connected
    ``graph.degree``-regular graph every round, drawn from (run seed, round), and the
    weights are recomputed for it.
    """

    def __init__(self, context):
        super().__init__(context)
        self.static = self.ctx["graph"]
        self.weigh = MIXING_WEIGHTS.get(self.cfg.graph.mixing)
        self._static_weights = None if self.cfg.graph.dynamic else self.weigh(self.static)[self.uid]

    @classmethod
    def check_config(cls, cfg):
        g = cfg.graph
        if g.dynamic and g.file is not None:
            return "section 'graph': key 'dynamic': a dynamic graph is generated each round; remove key 'file'"
        if g.dynamic and g.type != "regular":
            return f"section 'graph': key 'dynamic': dynamic graphs are random regular graphs; set type: regular (got {g.type!r})"
        return None

    @classmethod
    def aggregation_inputs(cls, cfg):
        if cfg.graph.dynamic:
            return cfg.graph.degree + 1
        try:
            return min(cls.topology(cfg).degrees()) + 1
        except Exception:  # an impossible graph is reported where it is built
            return None

    def peers(self) -> list[int]:
        if self.cfg.graph.dynamic:  # any node may be a neighbour in some round
            return [u for u in range(self.cfg.num_nodes) if u != self.uid]
        peers = set(super().peers())
        if self.cfg.attack.omniscient:  # every honest node also sends its model to the Byzantine ones
            byz = self.cfg.byzantine
            peers |= set(range(self.cfg.num_nodes)) - byz if self.byzantine else byz
        return sorted(peers - {self.uid})

    def graph_of(self, round_: int) -> Graph:
        """The topology of `round_` (the same on every node)."""
        return dynamic_graph(self.cfg, round_) if self.cfg.graph.dynamic else self.static

    def pattern(self, round_):
        graph = self.graph_of(round_)
        neighbours = graph.neighbors(self.uid)
        weights = self._static_weights if self._static_weights is not None else self.weigh(graph)[self.uid]
        return neighbours, neighbours, weights


@dataclass
class EpidemicKeys:
    """Keys of node `epidemic`."""

    peers: int = key(3, "s: peers each node sends its model to every round", ge=1)
    variant: Literal["local", "oracle"] = key(
        "local", "local: each node draws its own s peers (EL-Local); oracle: a fresh s-regular graph (EL-Oracle)")


def epidemic_targets(n: int, s: int, variant: str, seed: int, round_: int) -> list[list[int]]:
    """targets[i]: the nodes node i sends to in `round_` (the same result on every node).

    EL-Local: each node draws s distinct other nodes uniformly. EL-Oracle: the edges of a
    random s-regular graph on n nodes (not necessarily connected), so every node also
    receives from exactly s nodes.
    """
    if variant == "oracle":
        g = nx.random_regular_graph(s, n, seed=mixing_seed(seed, round_, 0xE0) % (2**32))
        return [sorted(g.neighbors(i)) for i in range(n)]
    out = []
    for i in range(n):
        rng = random.Random(mixing_seed(seed, round_, i, 0xE1))
        # position p of the other nodes (0..n-1 without i) is node p, or p + 1 from i on
        out.append(sorted(p + (p >= i) for p in rng.sample(range(n - 1), s)))
    return out


@NODES.register("epidemic", keys=EpidemicKeys)
class EpidemicNode(GossipNode):
    """Epidemic Learning: each round every node trains, sends its model to s random peers,
    and replaces its model by the plain average of its own and every model that arrived."""

    @classmethod
    def check_config(cls, cfg):
        n, s = cfg.num_nodes, cfg.node.peers
        if s >= n:
            return f"section 'node': key 'peers': epidemic with {n} nodes sends to at most {n - 1} peers, got {s}"
        if cfg.node.variant == "oracle" and (n * s) % 2:
            return (f"section 'node': key 'peers': EL-Oracle needs an s-regular graph on {n} nodes, "
                    f"but n·s = {n * s} is odd")
        return None

    @classmethod
    def aggregation_inputs(cls, cfg):
        return cfg.node.peers + 1 if cfg.node.variant == "oracle" else None  # EL-Local: in-degree varies

    @classmethod
    def topology(cls, cfg):
        """Every pair of nodes may exchange in some round: the complete graph."""
        return make_graph("full", cfg.num_nodes)

    def peers(self) -> list[int]:
        return [u for u in range(self.cfg.num_nodes) if u != self.uid]

    def pattern(self, round_):
        targets = epidemic_targets(self.cfg.num_nodes, self.cfg.node.peers, self.cfg.node.variant,
                                   self.cfg.run.seed, round_)
        senders = [j for j, t in enumerate(targets) if self.uid in t]
        w = 1.0 / (1 + len(senders))
        return targets[self.uid], senders, {self.uid: w, **{j: w for j in senders}}
