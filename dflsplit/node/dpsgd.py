"""`dpsgd`: decentralized parallel SGD with Metropolis–Hastings mixing (Lian et al., 2017)."""

from __future__ import annotations

from ..communication.codec import describe
from ..graphs import metropolis_hastings_weights
from .base import NODES, Node


@NODES.register("dpsgd")
class DPSGDNode(Node):
    """Each round: local training → send the model to neighbours → receive each neighbour's
    model of this round → Metropolis–Hastings average."""

    def __init__(self, context):
        super().__init__(context)
        graph = self.ctx["graph"]
        self.neighbours = graph.neighbors(self.uid)
        self.weights = metropolis_hastings_weights(graph)[self.uid]
        self.training = self.ctx["training"]
        self.sharing = self.ctx["sharing"]

    def run_round(self, round_: int) -> dict:
        loss = self.training.train()
        own = self.sharing.outgoing(self.model)
        key = f"model/{round_}"
        self.transport.publish(key, own, to=self.neighbours)
        expect = describe(own)
        received = {j: self.transport.receive(key, j, expect=expect).tensors for j in self.neighbours}
        self.sharing.aggregate(self.model, own, received, self.weights, self.uid)
        return {"train_loss": loss}
