"""`split`: split learning across peers, driven by a stage configuration.

Every node is a client (client c = node uid c-1) and the owner of its data. The model is
cut into its P partitions; the stage configuration (``split.stages`` or
``split.stages_file``, see ``dflsplit.mappings.stages``) says which client runs each
partition of each owner's pipeline. A client keeps one *replica* (a copy of the
partition, all built from the same seed, and its own optimizer) per (owner, partition)
it runs.

One training step: each owner draws a batch and splits it into ``split.micro_batches``
micro-batches; each micro-batch flows forward through the owner's partitions (the
activations travel to the next partition's runner), the owner computes the loss on its
own labels, and gradients flow back along the same edges. Each runner keeps the autograd
graph of its forward and backpropagates through it (with ``split.checkpoint`` it keeps
only the partition's input and recomputes the inside, ``torch.utils.checkpoint``);
gradients accumulate over the micro-batches and each replica takes one optimizer step
per batch. Labels and raw inputs never leave their owner.

Replica synchronisation at the end of every ``split.sync_every`` steps (or epochs): the
replicas of a partition are averaged, weighted by the samples each trained on since the
last synchronisation. ``fedavg``: all replicas of the partition (every runner ends with
identical weights: each runner sends the weighted mean of its own replicas to the other
runners once, and all combine the same shares in the same order); ``gossip``: with the
runners that are neighbours in the peer graph; ``none``. Replicas on one client are
averaged locally, without the network. With ``split.mode: relay`` the owners train one
after another, a turn lasting one synchronisation period, and the synchronisation (weights:
samples, so only the trained replicas count) passes the weights on: Bloom's sequential
relay. A server holding the middle of every pipeline is a stage configuration in which
one client runs those partitions for all owners (``eval/configs/split/server5.yaml``).

The schedule of a step is data (`split_schedule.SplitPlan`); this node executes it: it
runs the ready action of lowest priority (row order), and when none is ready it waits
for any split message (each wait bounded by ``communication.timeout``).

Evaluation: each owner assembles its model from the replicas it uses (the runners send
theirs) and tests it. With ``split.save_model`` each node writes that model at the end to
``split_model_<uid>.safetensors`` in the run folder.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..communication import PeerTimeout
from ..communication.base import PayloadMismatch, check_payload
from ..communication.codec import describe
from ..graphs import Graph
from ..mappings.stages import client_to_uid, mapping_from_config, uid_to_client
from ..models import MODELS
from ..sharing import weighted_average
from ..training import BatchSampler, build_optimizer
from .base import NODES, Node
from .split_schedule import Action, DataflowQueue, SplitPlan, Token, describe_blocked

PREFIX = "split/x/"
EVAL_PREFIX = "split/eval/"


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


def batch_sampler(cfg, uid: int, num_samples: int) -> BatchSampler:
    """The batches owner `uid` draws (seeded as `local_sgd` seeds node `uid`)."""
    return BatchSampler(num_samples, cfg.training.batch_size, torch.Generator().manual_seed(cfg.run.seed * 100003 + uid))


def steps_per_epoch(cfg, dataset=None) -> int:
    """Steps for every owner to pass over its shard once: max over owners of ceil(n / batch)."""
    from ..datasets import build_dataset

    dataset = dataset if dataset is not None else build_dataset(cfg)
    sizes = [len(ix) for ix in dataset.partition_train(cfg.num_nodes)]
    b = cfg.training.batch_size
    return max(math.ceil(n / min(b, n)) for n in sizes if n > 0)


def split_timeline(cfg, dataset=None) -> tuple[int, int]:
    """(steps per round, steps between synchronisations) of a config."""
    t, sp = cfg.training, cfg.split
    epoch = None
    if t.local_steps is None or sp.sync_unit == "epochs":
        epoch = steps_per_epoch(cfg, dataset)
    steps = t.local_steps if t.local_steps is not None else max(1, math.ceil(t.local_epochs * epoch))
    period = sp.sync_every if sp.sync_unit == "steps" else sp.sync_every * epoch
    return steps, period


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict (what synchronisation averages)."""
    return {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}


class Replica:
    """Owner `owner`'s copy of partition `partition`, with its optimizer and the samples
    it trained on since the last synchronisation."""

    def __init__(self, owner: int, partition: int, module: nn.Module, optimizer_cfg):
        self.owner, self.partition = owner, partition
        self.module = module.train()
        self.optimizer = build_optimizer(optimizer_cfg, module.parameters())
        self.samples = 0


@NODES.register("split")
class SplitNode(Node):
    """Runs its row of the stage configuration; see the module docstring."""

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
        self.plan = SplitPlan(self.stages, self.client, sp.micro_batches, sp.sync, period, relay=sp.mode == "relay")
        self.replicas = {
            (o, p): Replica(o, p, copy.deepcopy(parts[p - 1]), cfg.optimizer) for o, p in self.plan.hosted
        }
        self.sampler = batch_sampler(cfg, self.uid, len(self.data.train_y))
        if sp.micro_batches > self.sampler.batch_size:
            raise SplitError(
                f"{cfg.path or '<config>'}: section 'split': key 'micro_batches' is {sp.micro_batches}, more than "
                f"node {self.uid}'s batch of {self.sampler.batch_size} samples")
        self.shapes, self.dtype = self._feature_shapes()
        self.sync_expect = {p: describe(float_state(parts[p - 1])) for p in self.plan.partitions}
        self.loss_fn = nn.CrossEntropyLoss()
        self.queue = DataflowQueue()
        for tok in self.plan.initial_tokens():
            self.queue.produce(tok)
        self.inbox: dict[Token, Any] = {}
        self.saved: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.shares: dict[tuple[int, int], tuple[dict[str, torch.Tensor], int]] = {}
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.losses: dict[int, float] = {}
        self.round = 0
        self.first_step = 0

    # the launcher's hooks ----------------------------------------------------------------
    @classmethod
    def topology(cls, cfg, stages=None) -> Graph:
        """The peer graph of the stage configuration (clients that exchange activations), in uids."""
        m = stages if stages is not None else stage_mapping(cfg)
        return Graph(cfg.num_nodes, [(client_to_uid(u), client_to_uid(v)) for u, v in m.peer_graph()])

    @classmethod
    def prepare(cls, cfg, dataset=None) -> dict[str, Any]:
        """The stage mapping (parsed and validated once), its peer graph and the timeline."""
        m = stage_mapping(cfg)
        return {"graph": cls.topology(cfg, m), "stages": m, "timeline": split_timeline(cfg, dataset)}

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

    # one round ---------------------------------------------------------------------------------
    def run_round(self, round_: int) -> dict:
        self.round = round_
        S = self.steps_per_round
        self.first_step = t0 = round_ * S
        steps = range(t0, t0 + S)
        for t in steps:
            if self.client in self.plan.active(t):
                self.batches[t] = list(torch.tensor_split(self.sampler.next(), self.plan.M))
                self.losses[t] = 0.0
        for t in steps:
            self.queue.add_all(self.plan.step(t))
        timeout = self.cfg.communication.timeout
        deadline = time.monotonic() + timeout
        while len(self.queue):
            action = self.queue.pop()
            if action is not None:
                self._run(action)
            elif not self._wait(deadline):
                continue
            deadline = time.monotonic() + timeout
        self.queue.forget(t0 + S)
        self.batches.clear()
        losses = [self.losses.pop(t) for t in steps if t in self.losses]
        record = {"steps_trained": len(losses)}
        if losses:  # an owner waiting for its turn (relay) has no training loss this round
            record["train_loss"] = sum(losses) / len(losses)
        return record

    def _run(self, a: Action) -> None:
        """Run one action and route what it yields (`SplitPlan.outputs`): tokens for this
        client go to the queue (payloads to the inbox), the others are published. Handlers
        return {token: payload}, a payload being a tensor (activation, gradient) or
        (tensors, header) (a synchronisation share)."""
        handler = {"fwd": self._forward, "bwd": self._backward, "step": self._step, "send": self._send, "end": self._end}
        payloads = handler[a.kind](a) or {}
        remote: dict[Token, list[int]] = defaultdict(list)
        for tok, dest in self.plan.outputs(a):
            if dest == self.client:
                if tok in payloads:
                    self.inbox[tok] = payloads[tok]
                self.queue.produce(tok)
            else:
                remote[tok].append(client_to_uid(dest))
        for tok, to in remote.items():
            value = payloads[tok]
            tensors, header = ({"x": value}, {}) if isinstance(value, torch.Tensor) else value
            self.transport.publish(PREFIX + "/".join(map(str, tok)), tensors, to=to, header=header)

    # actions -------------------------------------------------------------------------------------
    def _forward(self, a: Action) -> dict:
        t, o, p, m = a.step, a.owner, a.partition, a.micro
        rep = self.replicas[(o, p)]
        if p == 1:
            x = self.data.train_x[self.batches[t][m]]
        else:
            x = self.inbox.pop(("act", t, o, p, m)).requires_grad_(True)
        rep.samples += x.shape[0]
        out = activation_checkpoint(rep.module, x, use_reentrant=False) if self.cfg.split.checkpoint else rep.module(x)
        if p < self.P:
            self.saved[(t, o, p, m)] = (x, out)
            return {("act", t, o, p + 1, m): out.detach()}
        idx, batch = self.batches[t][m], sum(len(b) for b in self.batches[t])
        loss = self.loss_fn(out, self.data.train_y[idx]) * (len(idx) / batch)
        self.losses[t] += loss.item()
        self.saved[(t, o, p, m)] = (x, loss)
        return {}

    def _backward(self, a: Action) -> dict:
        t, o, p, m = a.step, a.owner, a.partition, a.micro
        x, out = self.saved.pop((t, o, p, m))
        if p == self.P:
            out.backward()
        else:
            out.backward(self.inbox.pop(("grad", t, o, p, m)))
        if p == 1:
            return {}
        g = x.grad if x.grad is not None else torch.zeros_like(x)
        return {("grad", t, o, p - 1, m): g}

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

    def _send(self, a: Action) -> dict:
        share, n = self._share(a.partition)
        self.shares[(a.step, a.partition)] = (share, n)
        if self.attacks_messages:  # a Byzantine runner: its replica update is the attack's (it keeps its own)
            partners = self.plan.partners[a.partition]
            f = len(({client_to_uid(r) for r in partners} | {self.uid}) & self.cfg.byzantine)
            share = self.craft(share, [share], len(partners) + 1, f, a.step)
        return {("sync", a.step, a.partition, self.client): (share, {"samples": n})}

    def _end(self, a: Action) -> None:
        t, p = a.step, a.partition
        reps = [self.replicas[(o, p)] for o in self.plan.local_owners[p]]
        if not self.plan.syncs_at(t):
            return
        partners = self.plan.partners[p]
        if not partners and len(reps) == 1:
            reps[0].samples = 0
            return
        own = self.shares.pop((t, p), None) or self._share(p)
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
        for rep in reps:
            rep.module.load_state_dict(new, strict=False)
            rep.samples = 0

    # receiving -------------------------------------------------------------------------------------
    def _wait(self, deadline: float) -> bool:
        """Take one split message (waiting until `deadline` at most) and make its token
        available; False when the message was dropped (wrong sender, step, shape, duplicate)."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise PeerTimeout([], PREFIX + "*", self.cfg.communication.timeout, self.uid)
            msg = self.transport.receive_any(timeout=left, prefix=PREFIX)
        except PeerTimeout:
            raise SplitTimeout(self._blocked_report()) from None
        try:
            tok, payload = self._accept(msg)
        except (ValueError, PayloadMismatch) as e:
            self.log.warning("node %d: dropped %r from node %d: %s", self.uid, msg.key, msg.sender, e)
            return False
        if self.queue.has(tok) or tok in self.inbox:
            self.log.warning("node %d: dropped a duplicate %r from node %d", self.uid, msg.key, msg.sender)
            return False
        self.inbox[tok] = payload
        self.queue.produce(tok)
        return True

    def _accept(self, msg) -> tuple[Token, Any]:
        """Check a message against the schedule (right sender, step, shapes); (token, payload)."""
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
        if kind in ("act", "grad") and len(ints) == 4:
            t, o, p, mb = ints
            lo, hi = (2, P) if kind == "act" else (1, P - 1)
            if not (1 <= o <= m.num_clients and lo <= p <= hi and 0 <= mb < self.plan.M):
                raise ValueError("owner, partition or micro-batch out of range")
            src = m.runner(o, p - 1) if kind == "act" else m.runner(o, p + 1)
            if m.runner(o, p) != self.client or src != sender:
                raise ValueError(f"expected from client {src} to client {m.runner(o, p)}")
            x = msg.tensors.get("x")
            shape = self.shapes[p - 1] if kind == "act" else self.shapes[p]
            if set(msg.tensors) != {"x"} or x.dtype != self.dtype or tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
                raise ValueError(f"expected one tensor 'x' of shape (batch, {', '.join(map(str, shape))}) and dtype {self.dtype}")
            return (kind, *ints), x.to(self.device)
        if kind == "sync" and len(ints) == 3:
            t, p, r = ints
            if r != sender or r not in self.plan.partners.get(p, ()):
                raise ValueError(f"client {sender} does not synchronise partition {p} with client {self.client}")
            check_payload(msg, self.sync_expect[p])
            n = msg.header.get("samples")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError("header 'samples' must be an integer >= 0")
            return (kind, *ints), ({k: v.to(self.device) for k, v in msg.tensors.items()}, n)
        raise ValueError("unknown kind of split message")

    def _blocked_report(self) -> str:
        """What this node waits for, and from which client, for a timeout's message."""
        lines = describe_blocked(self.queue.blocked(), self.P, 6, self._source)
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
                self.transport.publish(f"{EVAL_PREFIX}{r}/{o}/{p}", rep.module.state_dict(), to=[client_to_uid(o)])
        for p, part in enumerate(self.model.children(), 1):
            runner = self.stages.runner(me, p)
            if runner == me:
                state = self.replicas[(me, p)].module.state_dict()
            else:
                msg = self.transport.receive(f"{EVAL_PREFIX}{r}/{me}/{p}", client_to_uid(runner), expect=describe(part.state_dict()))
                state = msg.tensors
            part.load_state_dict(state)

    def run(self) -> None:
        super().run()
        if self.cfg.split.save_model:
            self.save_model("split_model")
