"""Split learning across peers (node `split`): the schedule, its dataflow execution, and
real multi-process runs over tcp compared with a single-process unsplit reference."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from dflsplit.config import load_config
from dflsplit.datasets import load_node_data, prepare_dataset
from dflsplit.launch import RunFailed, run_experiment
from dflsplit.mappings.stages import StageConfigError, StageMapping, device_server_rows
from dflsplit.models import build_model
from dflsplit.node.split import batch_sampler, data_shard_of, split_timeline, stage_mapping, sync_settings
from dflsplit.node.split_schedule import (
    Action,
    DataflowQueue,
    PipelineSchedule,
    ScheduleDeadlock,
    Scheduled,
    SplitPlan,
    dry_run,
    may_start,
)
from dflsplit.sharing import weighted_average
from dflsplit.training import build_optimizer

from stage_examples import ALL_LOCAL, EXAMPLE

REPO = Path(__file__).resolve().parents[1]
SPLIT_CONFIGS = REPO / "eval" / "configs" / "split"

# Client 5 runs partitions 2 and 3 of every owner (Bloom's server), each owner its head and tail.
SERVER = [[f"{o}_1", f"{o}_4", f"{o}_5", f"{o}_8"] for o in range(1, 5)] + [
    [f"{o}_{s}" for o in range(1, 5) for s in (2, 3)] + [f"5_{s}" for s in range(1, 9)]
    + [f"{o}_{s}" for o in range(1, 5) for s in (6, 7)]
]
# Client 1 runs 2's partition 2 and the reverse; each row starts with the task that waits on
# the other client: a strict in-order runner deadlocks, a dataflow runner does not.
SWAP2_OUT_OF_ORDER = [
    ["2_2", "1_1", "1_3", "1_4", "2_5", "1_6"],
    ["1_2", "2_1", "2_3", "2_4", "1_5", "2_6"],
]


# --------------------------------------------------------------------------- schedule (pure)


def test_dataflow_queue_runs_ready_actions_by_priority():
    q = DataflowQueue()
    a = Action("fwd", 0, 1, 1)
    b = Action("fwd", 0, 2, 2)
    c = Action("bwd", 0, 2, 2)
    q.add(Scheduled(c, (("fwd", 0, 2, 2, 0),), (0, 1, 0, 0)))  # highest priority, not ready
    q.add(Scheduled(b, (("act", 0, 2, 2, 0), ("ver", 0, 2, 2)), (0, 1, 1, 0)))
    q.add(Scheduled(a, (), (0, 1, 2, 0)))
    assert len(q) == 3 and q.blocked() == {c: {("fwd", 0, 2, 2, 0)}, b: {("act", 0, 2, 2, 0), ("ver", 0, 2, 2)}}
    assert q.produce(("ver", 0, 2, 2)) and not q.produce(("ver", 0, 2, 2))
    assert q.pop() == a  # b still misses its activation
    assert q.pop() is None
    q.produce(("act", 0, 2, 2, 0))
    q.produce(("fwd", 0, 2, 2, 0))
    assert [q.pop(), q.pop(), q.pop()] == [c, b, None]  # both ready: the lower priority first
    assert len(q) == 0
    q.forget(1)
    assert not q.has(("ver", 0, 2, 2))
    with pytest.raises(ValueError, match="queued twice"):
        q.add(Scheduled(a, (), (0,)))
        q.add(Scheduled(a, (), (0,)))


def test_strict_queue_runs_its_list_in_order():
    q = DataflowQueue(strict=True)
    first, second = Action("fwd", 0, 1, 2), Action("fwd", 0, 1, 1)
    q.add(Scheduled(first, (("act", 0, 1, 2, 0),), (0, 0)))
    q.add(Scheduled(second, (), (0, 1)))
    assert q.pop() is None  # `second` is ready, but `first` comes before it
    q.produce(("act", 0, 1, 2, 0))
    assert [q.pop(), q.pop()] == [first, second]


def test_queue_pops_the_first_ready_action_a_worker_may_start():
    """With several workers (``split.workers``): the ready action of lowest priority whose
    owner has nothing running; sends at any time; a replica sync only alone."""
    q = DataflowQueue()
    f1, f2, b2 = Action("fwd", 0, 1, 2), Action("fwd", 0, 2, 2), Action("bwd", 0, 2, 2, 1)
    send, sync = Action("send", 0, 1, 2, what="act", peer=1), Action("sync", 0, 0, 2)
    for i, a in enumerate((b2, f1, f2, send, sync)):
        q.add(Scheduled(a, (), (i,)))
    running = [Action("fwd", 0, 2, 2, 1)]  # owner 2 computes on one of two workers

    def allowed(a):
        return may_start(a, running, 2)

    assert q.peek(allowed) == f1 and q.pop(allowed) == f1  # b2 comes first, but its owner is busy
    running.append(f1)
    assert q.pop(allowed) == send  # both workers busy: only bookkeeping
    assert q.pop(allowed) is None
    running.clear()
    assert [q.pop(allowed), q.pop(allowed)] == [b2, f2]
    assert not may_start(sync, [f2], 2) and may_start(sync, [send], 2)  # alone, sends aside
    assert not may_start(f1, [sync], 2)
    assert not may_start(send, [f2], 1) and may_start(send, [], 1)  # one worker: one action at a time
    strict = DataflowQueue(strict=True)
    strict.add(Scheduled(b2, (), (0,)))
    strict.add(Scheduled(f1, (), (1,)))
    assert strict.pop(allowed=lambda a: a.owner == 1) is None  # strict: only the list's next action


def test_workers_a_client_uses():
    m = StageMapping(device_server_rows(5, 5, 4, 1), 4)
    server, device = SplitPlan(m, 5, trainers=[1, 2, 3, 4]), SplitPlan(m, 1, trainers=[1, 2, 3, 4])
    assert server.workers(2) == 2 and server.workers(16) == 5  # one per owner it runs partitions of
    assert device.workers(4) == 1  # one pipeline: in order
    assert SplitPlan(m, 5, strict=True).workers(4) == 1


def test_plan_of_worked_example_client_1():
    m = StageMapping(EXAMPLE, 4)
    plan = SplitPlan(m, 1, micro_batches=1, sync="fedavg")
    assert plan.hosted == [(1, 1), (1, 2), (1, 4), (4, 3)]
    assert plan.partners == {1: [2, 3, 4, 5], 2: [2, 3, 4, 5], 3: [2, 3, 4, 5], 4: [2, 3, 4, 5]}
    entries = {e.action: e for e in plan.step(0)}
    fwd3 = entries[Action("fwd", 0, 4, 3)]  # task 4_3: input from client 4, output to client 4
    assert fwd3.requires == (("ver", 0, 4, 3), ("act", 0, 4, 3, 0))
    assert plan.outputs(fwd3.action) == [(("fwd", 0, 4, 3, 0), 1)]
    recv = Action("recv", 0, 4, 3, 0, "act", 4)
    assert entries[recv].requires == (("net_act", 0, 4, 3, 0),)
    assert plan.outputs(recv) == [(("act", 0, 4, 3, 0), 1)]
    send = Action("send", 0, 4, 4, 0, "act", 4)
    assert entries[send].requires == (("fwd", 0, 4, 3, 0),)
    assert plan.outputs(send) == [(("net_act", 0, 4, 4, 0), 4)]
    assert plan.outputs(Action("fwd", 0, 1, 1)) == [(("fwd", 0, 1, 1, 0), 1), (("act", 0, 1, 2, 0), 1)]  # 1_2 is local
    bwd3 = Action("bwd", 0, 4, 3)  # task 4_6
    assert entries[bwd3].requires == (("fwd", 0, 4, 3, 0), ("grad", 0, 4, 3, 0))
    assert plan.outputs(Action("send", 0, 4, 2, 0, "grad", 4)) == [(("net_grad", 0, 4, 2, 0), 4)]
    assert entries[Action("send", 0, 4, 2, 0, "grad", 4)].requires == (("bwd", 0, 4, 3, 0),)
    sync1 = entries[Action("sync", 0, 0, 1)]
    assert set(sync1.requires) == {("ver", 0, 1, 1), ("stepped", 0, 1, 1), ("shared", 0, 1)} | {
        ("sync", 0, 1, r) for r in (2, 3, 4, 5)}
    # every remote input has its receive, every remote output its send
    kinds = [(a.kind, a.what, a.peer) for a in entries if a.kind in ("send", "recv")]
    assert sorted(kinds) == sorted([(kind, what, peer) for kind in ("send", "recv") for what in ("act", "grad")
                                    for peer in (2, 4)])  # 1_2 -> 1_3 on client 2 and back; 4_3 for client 4


def test_gossip_partners_are_peer_graph_neighbours_and_none_has_none():
    m = StageMapping(EXAMPLE, 4)
    for c in range(1, 6):
        gossip = SplitPlan(m, c, sync="gossip")
        for p, partners in gossip.partners.items():
            assert set(partners) <= set(m.neighbors(c))
            assert all(c in SplitPlan(m, r, sync="gossip").partners[p] for r in partners)  # symmetric
        assert all(ps == [] for ps in SplitPlan(m, c, sync="none").partners.values())
    assert SplitPlan(m, 3, sync="gossip").partners == {1: [4, 5], 2: [4, 5], 3: [4, 5], 4: [4, 5]}


def test_sync_timeline_and_relay_turns():
    m = StageMapping(EXAMPLE, 4)
    plan = SplitPlan(m, 1, sync="fedavg", sync_period=3, relay=True)
    assert [plan.syncs_at(t) for t in range(6)] == [False, False, True, False, False, True]
    assert [plan.active(t) for t in (0, 2, 3, 14, 15)] == [[1], [1], [2], [5], [1]]
    assert not SplitPlan(m, 1, sync="none").syncs_at(0)
    assert SplitPlan(m, 1).active(0) == [1, 2, 3, 4, 5]
    # relay: client 1 hosts owner 4's partition 3 but runs none of owner 4's tasks in turn 1
    kinds = {(e.action.kind, e.action.owner) for e in plan.step(0)}
    assert ("fwd", 1) in kinds and ("fwd", 4) not in kinds and ("sync", 0) in kinds


def plans_of(rows, micro=1, schedule="gpipe", strict=False, trainers=None, **kw):
    m = StageMapping(rows, 4, strict_order=strict)
    return {c: SplitPlan(m, c, micro, schedule=schedule, strict=strict, trainers=trainers, **kw)
            for c in range(1, m.num_clients + 1)}


@pytest.mark.parametrize("rows", [EXAMPLE, ALL_LOCAL, SERVER], ids=["example", "all_local", "server"])
@pytest.mark.parametrize("schedule,strict", [("gpipe", False), ("1f1b", False), ("gpipe", True), ("1f1b", True)])
@pytest.mark.parametrize("sync,period,relay,micro", [
    ("fedavg", 1, False, 1), ("fedavg", 2, False, 3), ("gossip", 1, False, 2), ("none", 1, False, 1),
    ("fedavg", 2, True, 2),
])
def test_every_client_completes_every_action(rows, schedule, strict, sync, period, relay, micro):
    plans = plans_of(rows, micro, schedule, strict, sync=sync, sync_period=period, relay=relay)
    steps = 4
    ran = dry_run(plans, steps)
    for c, actions in ran.items():
        assert len(actions) == len(set(actions)) == sum(len(plans[c].step(t)) for t in range(steps))
        # every replica steps once per step in which its owner trains
        steps_done = [(a.step, a.owner, a.partition) for a in actions if a.kind == "step"]
        assert sorted(steps_done) == sorted(
            (t, o, p) for t in range(steps) for o, p in plans[c].hosted if o in plans[c].active(t))
        # a replica's step t+1 forward comes after its step t ends
        pos = {a: i for i, a in enumerate(actions)}
        for a in actions:
            if a.kind == "fwd" and a.step > 0:
                assert pos[Action("sync", a.step - 1, 0, a.partition)] < pos[a]
            if a.kind == "recv":  # a received input is used after it arrived, here
                user = Action("fwd" if a.what == "act" else "bwd", a.step, a.owner, a.partition, a.micro)
                assert pos[a] < pos[user]


def alive_peak(actions, partition=None):
    """The most activations a client holds at once in its list: forwards whose backward has not run."""
    alive = peak = 0
    for a in actions:
        if partition is not None and a.partition != partition:
            continue
        alive += (a.kind == "fwd") - (a.kind == "bwd")
        peak = max(peak, alive)
    return peak


def test_gpipe_runs_all_forwards_first_and_1f1b_bounds_what_is_in_flight():
    local = [[f"1_{s}" for s in range(1, 9)]]
    m = StageMapping(local, 4)
    gpipe = PipelineSchedule({1: SplitPlan(m, 1, 4, schedule="gpipe")})
    kinds = [e.action.kind for e in gpipe.ordered(1, 0) if e.action.kind in ("fwd", "bwd")]
    assert kinds == ["fwd"] * 16 + ["bwd"] * 16
    one = PipelineSchedule({1: SplitPlan(m, 1, 4, schedule="1f1b")})
    labels = [e.action.label(4) for e in one.ordered(1, 0) if e.action.kind in ("fwd", "bwd")]
    assert labels[:8] == ["F 1_1 #0", "F 1_2 #0", "F 1_3 #0", "F 1_4 #0", "B 1_5 #0", "B 1_6 #0", "B 1_7 #0",
                          "B 1_8 #0"]  # one pipeline stage: depth 1, one micro-batch at a time
    # device/server, 8 micro-batches: each device's first partition holds at most its depth (3) in flight
    plans = {c: SplitPlan(StageMapping(SERVER, 4), c, 8, schedule="1f1b") for c in range(1, 6)}
    assert plans[1].depth(1, 1) == 3 and plans[1].depth(1, 4) == 1 and plans[5].depth(1, 2) == 2
    for name, bound in (("1f1b", 3), ("gpipe", 8)):
        sched = PipelineSchedule({c: SplitPlan(StageMapping(SERVER, 4), c, 8, schedule=name) for c in range(1, 6)})
        assert alive_peak([e.action for e in sched.ordered(1, 0)], partition=1) == bound
    assert alive_peak(dry_run(plans, 2)[1], partition=1) == 3


def test_strict_lists_keep_the_row_order_for_every_micro_batch():
    plans = plans_of(EXAMPLE, 3, "1f1b", strict=True)
    sched = PipelineSchedule(plans)
    for c, plan in plans.items():
        row = {task: i for i, task in enumerate(plan.stages.tasks(c))}
        for m in range(3):
            tasks = [(a.owner, a.partition if a.kind == "fwd" else 9 - a.partition)
                     for a in (e.action for e in sched.ordered(c, 0)) if a.kind in ("fwd", "bwd") and a.micro == m]
            assert [row[t] for t in tasks] == sorted(row[t] for t in tasks)


def test_dataflow_runs_rows_a_strict_runner_would_deadlock_on():
    with pytest.raises(StageConfigError, match="rule 6"):
        StageMapping(SWAP2_OUT_OF_ORDER, 3)
    m = StageMapping(SWAP2_OUT_OF_ORDER, 3, strict_order=False)
    plans = {c: SplitPlan(m, c, 2) for c in (1, 2)}
    ran = dry_run(plans, 3)
    first_row_task = [a for a in ran[1] if a.kind in ("fwd", "bwd")][0]
    assert first_row_task == Action("fwd", 0, 1, 1)  # not 2_2, whose input is not there yet
    # the same rows in strict order: the dry run finds the cycle rule 6 reports
    strict = {c: SplitPlan(m, c, 2, strict=True) for c in (1, 2)}
    with pytest.raises(ScheduleDeadlock, match=r"(?s)client 1: receiving the activation into 2_2 "
                       r"\(step 0, micro-batch 0\) "
                       r"from client 2 waits for .*client 2: receiving the activation into 1_2"):
        dry_run(strict, 1)


def test_dry_run_reports_a_missing_sender():
    plans = plans_of(EXAMPLE)
    # client 2 never sends owner 2's activations to client 5, which runs 2_3
    plans[2].outputs = lambda a: [] if a.kind == "send" and a.peer == 5 else SplitPlan.outputs(plans[2], a)
    with pytest.raises(ScheduleDeadlock, match=r"client 5: receiving the activation into 2_3 \(step 0, micro-batch 0\) "
                       r"from client 2 waits for activation into owner 2's partition 3 \(step 0, micro-batch 0\) "
                       r"from client 2"):
        dry_run(plans, 1)


def test_device_server_layout_and_a_server_without_data():
    rows = device_server_rows(5, 5, 4, 1)
    m = StageMapping(rows, 4)  # valid, strict order included
    assert m.runners[1] == [1, 5, 5, 1] and m.runners[5] == [5, 5, 5, 5]
    assert StageMapping(device_server_rows(5, 5, 4, 2), 4).runners[2] == [2, 2, 5, 2]
    assert all(len(set(r)) == 1 for r in StageMapping(device_server_rows(5, 5, 4, -1), 4).runners.values())
    plans = plans_of(rows, 2, trainers=[1, 2, 3, 4])
    assert {a.owner for e in plans[5].step(0) for a in [e.action] if a.kind == "fwd"} == {1, 2, 3, 4}
    ran = dry_run(plans, 2)
    assert not [a for a in ran[5] if a.kind == "fwd" and a.owner == 5]  # the server's own pipeline never runs
    with pytest.raises(StageConfigError, match="split must be -1 or 1..2"):
        device_server_rows(5, 5, 4, 0)


# --------------------------------------------------------------------------- real runs


def split_config(tmp_path, base_port, rows, *overrides, model="mlp"):
    """A 5-client split config on digits written to tmp_path, loaded with overrides."""
    models = {
        "mlp": {"name": "mlp", "hidden": [32, 32, 16], "partitions": 4},
        "cnn": {"name": "cnn"},
    }
    data = {
        "run": {"name": "split-test", "procs_per_machine": len(rows), "rounds": 2, "base_port": base_port,
                "threads_per_proc": 1, "progress": False},
        "dataset": {"name": "digits"},
        "model": models[model],
        "optimizer": {"name": "sgd", "lr": 0.1},
        "training": {"batch_size": 16, "local_steps": 10},
        "node": {"name": "split", "test_after": 10},
        "communication": {"name": "tcp", "timeout": 60},
        "split": {"stages": rows, "sync": "fedavg", "sync_every": 1, "save_model": True},
    }
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


def float_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def reference(cfg, steps):
    """Single process, no split: every owner with data trains the model assembled from its
    replicas on the same batches; replicas are averaged by samples as the config says (a
    device/server run's server holds no data: its replicas only take the average)."""
    torch.manual_seed(0)
    prepare_dataset(cfg)
    stages = stage_mapping(cfg)
    n, P = stages.num_clients, stages.P
    shards = {o: data_shard_of(cfg, o - 1) for o in range(1, n + 1)}
    data = {o: load_node_data(cfg, o - 1, shards[o]) for o in range(1, n + 1)}
    trainers = [o for o in data if shards[o] is not None]
    model = build_model(cfg.model, data[1].input_shape, data[1].num_classes, seed=cfg.run.seed)
    samplers = {o: batch_sampler(cfg, o - 1, len(data[o].train_y)) for o in trainers}
    reps = {(o, p): copy.deepcopy(model[p - 1]) for o in data for p in range(1, P + 1)}
    opts = {k: build_optimizer(cfg.optimizer, r.parameters()) for k, r in reps.items()}
    samples = dict.fromkeys(reps, 0)
    _, period = split_timeline(cfg)
    sync = sync_settings(cfg)[0]
    for t in range(steps):
        owners = [trainers[t // period % len(trainers)]] if cfg.split.mode == "relay" else trainers
        for o in owners:
            idx = samplers[o].next()
            net = nn.Sequential(*(reps[(o, p)] for p in range(1, P + 1)))
            loss = nn.functional.cross_entropy(net(data[o].train_x[idx]), data[o].train_y[idx])
            loss.backward()
            for p in range(1, P + 1):
                opts[(o, p)].step()
                opts[(o, p)].zero_grad()
                samples[(o, p)] += len(idx)
        if sync == "none" or (t + 1) % period:
            continue
        for p in range(1, P + 1):
            if sync in ("fedavg", "star"):
                groups = {o: list(data) for o in data}
            else:  # gossip: owners whose replicas run on the same or a neighbouring runner
                runner = stages.replicas(p)
                groups = {o: [q for q in data if runner[q] == runner[o] or runner[q] in stages.neighbors(runner[o])]
                          for o in data}
            new = {}
            for o, group in groups.items():
                total = sum(samples[(q, p)] for q in group)
                new[o] = weighted_average([float_state(reps[(q, p)]) for q in group],
                                          [samples[(q, p)] / total for q in group])
            for o in data:
                reps[(o, p)].load_state_dict(new[o], strict=False)
        samples = dict.fromkeys(reps, 0)
    return {o: nn.Sequential(*(reps[(o, p)] for p in range(1, P + 1))).state_dict() for o in data}


def assert_matches_reference(cfg, run_dir, steps, tol=1e-5):
    ref = reference(cfg, steps)
    worst = 0.0
    for o, expected in ref.items():
        got = load_file(str(Path(run_dir) / "machine_0" / f"split_model_{o - 1}.safetensors"))
        assert set(got) == set(expected)
        for k, v in expected.items():
            worst = max(worst, (got[k] - v).abs().max().item())
    assert worst <= tol, f"largest difference from the reference: {worst:g}"
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("rows,model,extra", [
    (EXAMPLE, "mlp", []),
    (ALL_LOCAL, "mlp", []),
    (EXAMPLE, "cnn", ["split.micro_batches=3", "split.checkpoint=true"]),
    (SERVER, "mlp", ["split.mode=relay", "split.sync_every=2"]),
    (EXAMPLE, "mlp", ["split.sync=gossip", "split.sync_every=3"]),
], ids=["example", "all_local", "example-cnn-micro3-checkpoint", "server-relay", "example-gossip"])
def test_split_run_equals_unsplit_reference(tmp_path, base_port, rows, model, extra):
    cfg = split_config(tmp_path, base_port, rows, *extra, model=model)
    summary = run_experiment(cfg, tmp_path / "run")
    steps = cfg.run.rounds * cfg.training.local_steps
    assert steps == 20 and summary["nodes"] == len(rows)
    ref = assert_matches_reference(cfg, tmp_path / "run", steps)
    records = {u: [json.loads(x) for x in (tmp_path / "run" / "machine_0" / f"node_{u}.jsonl").read_text().splitlines()]
               for u in range(len(rows))}
    assert all(len(rs) == 2 and rs[-1]["test_acc"] is not None for rs in records.values())
    first = ref[1]
    same = [all(torch.equal(first[k], m[k]) for k in first) for m in ref.values()]
    if cfg.split.sync == "fedavg":  # one model: every owner ends with the same weights
        assert all(same)
        got = [load_file(str(tmp_path / "run" / "machine_0" / f"split_model_{u}.safetensors")) for u in range(len(rows))]
        assert all(torch.equal(g[k], got[0][k]) for g in got for k in g)
    else:
        assert not all(same)
    if cfg.split.mode == "relay":  # one owner trains per turn of 2 steps: 4 of 20 steps each
        assert [sum(r["steps_trained"] for r in records[u]) for u in range(5)] == [4] * 5


def records_of(run_dir, nodes):
    return {u: [json.loads(x) for x in (Path(run_dir) / "machine_0" / f"node_{u}.jsonl").read_text().splitlines()]
            for u in range(nodes)}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_pipelined_run_equals_unsplit_reference(tmp_path, base_port, schedule, micro):
    """M micro-batches in flight, in either schedule, train exactly the unsplit full-batch model."""
    cfg = split_config(tmp_path, base_port, EXAMPLE, f"split.micro_batches={micro}", f"split.schedule={schedule}")
    run_experiment(cfg, tmp_path / "run")
    assert_matches_reference(cfg, tmp_path / "run", 20)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,micro,chunk", [("1f1b", 4, 0), ("gpipe", 8, 0), ("1f1b", 4, 64)])
def test_tapered_micro_batches_and_parts_equal_unsplit_reference(tmp_path, base_port, schedule, micro, chunk):
    """Micro-batches of falling sizes (split.micro_sizes: tapered) train the same model; so do
    activations and gradients sent in parts (split.chunk_bytes: 64, under a sample: a sample a part)."""
    cfg = split_config(tmp_path, base_port, EXAMPLE, f"split.micro_batches={micro}", f"split.schedule={schedule}",
                       "split.micro_sizes=tapered", f"split.chunk_bytes={chunk}", "split.trace=true")
    summary = run_experiment(cfg, tmp_path / "run")
    assert_matches_reference(cfg, tmp_path / "run", 20)
    moved = [e["name"] for u in range(5) for e in json.loads(  # what the uplinks carried and what arrived
        (tmp_path / "run" / "machine_0" / f"trace_{u}.json").read_text())["traceEvents"]
        if e["ph"] == "X" and e["name"].startswith("split/x/")]
    in_parts = [k for k in moved if len(k.split("/")) == 9]  # split/x/kind/t/o/p/m/part/count
    assert bool(in_parts) == bool(chunk) and len(moved) > 100
    with open(Path(summary["machine_dir"]) / "results.csv") as f:
        assert [int(r["held_end"]) for r in csv.DictReader(f)] == [0] * 5  # no payload left in parts


@pytest.mark.slow
def test_run_with_two_workers_equals_unsplit_reference(tmp_path, base_port):
    """Client 1 runs its own partitions and owner 4's partition 3: with 2 workers their
    passes overlap, and the weights still equal the unsplit run's."""
    cfg = split_config(tmp_path, base_port, EXAMPLE, "split.micro_batches=4", "split.schedule=1f1b",
                       "split.workers=2")
    run_experiment(cfg, tmp_path / "run")
    assert_matches_reference(cfg, tmp_path / "run", 20)


@pytest.mark.slow
def test_1f1b_keeps_fewer_activations_alive_than_gpipe_at_8_micro_batches(tmp_path, base_port):
    peaks = {}
    for i, schedule in enumerate(("gpipe", "1f1b")):
        cfg = split_config(tmp_path, base_port + 20 * i, EXAMPLE, "split.micro_batches=8",
                           f"split.schedule={schedule}")
        run_experiment(cfg, tmp_path / schedule)
        assert_matches_reference(cfg, tmp_path / schedule, 20)
        records = records_of(tmp_path / schedule, 5)
        peaks[schedule] = {u: max(r["peak_activations"] for r in rs) for u, rs in records.items()}
    # client 1 holds owner 1's partitions 1, 2 and 4 and owner 4's 3: gpipe keeps all 8 micro-batches of each
    # alive at once; 1f1b at most the pipeline depth from each (3, 3, 1 and 2)
    assert peaks["gpipe"][0] >= 8 * 3
    assert all(peaks["1f1b"][u] < peaks["gpipe"][u] for u in range(5)), peaks
    assert peaks["1f1b"][0] <= 3 + 3 + 1 + 2


@pytest.mark.slow
def test_strict_order_run_equals_unsplit_reference(tmp_path, base_port):
    cfg = split_config(tmp_path, base_port, EXAMPLE, "split.order=strict", "split.schedule=1f1b",
                       "split.micro_batches=2")
    run_experiment(cfg, tmp_path / "run")
    assert_matches_reference(cfg, tmp_path / "run", 20)


def device_server_config(tmp_path, base_port, *overrides):
    """PiPar's device/server mode on digits: 4 devices and a server (node 4), one epoch a round."""
    data = {
        "run": {"name": "pipar-test", "procs_per_machine": 5, "rounds": 2, "base_port": base_port,
                "threads_per_proc": 1, "progress": False},
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [32, 32, 16], "partitions": 4},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "training": {"batch_size": 32, "local_steps": None, "local_epochs": 1},
        "node": {"name": "split", "test_after": 1},
        "communication": {"name": "tcp", "timeout": 60},
        "split": {"server": 4, "split": 1, "micro_batches": 4, "aggregation_frequency": -1, "save_model": True},
    }
    path = tmp_path / "pipar.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_device_server_mode_trains_every_sample_once_per_epoch_and_writes_results_csv(tmp_path, base_port, workers):
    """PiPar's layout trains the unsplit model exactly and accounts for every node's time;
    with 2 workers the server computes for two devices at once."""
    cfg = device_server_config(tmp_path, base_port, "split.trace=true", f"split.workers={workers}")
    summary = run_experiment(cfg, tmp_path / "run")
    epoch = split_timeline(cfg)[0]
    assert epoch == 12  # 1437 digits over 4 devices: 359 or 360 samples, 12 batches of 32 (the last smaller)
    ref = assert_matches_reference(cfg, tmp_path / "run", 2 * epoch)
    first = ref[1]  # aggregated every epoch, through the server: every model ends equal, the server's too
    assert all(torch.allclose(first[k], m[k], atol=1e-6) for m in ref.values() for k in first)
    records = records_of(tmp_path / "run", 5)
    shard = {u: len(load_node_data(cfg, u, data_shard_of(cfg, u)).train_y) for u in range(4)}
    for u in range(4):  # every sample of a device's shard trained exactly once in each epoch
        assert [r["sample_counts"] for r in records[u]] == [[1, 1], [2, 2]]
        assert [r["role"] for r in records[u]] == ["device"] * 2
    assert "sample_counts" not in records[4][0] and records[4][0]["role"] == "server"
    for u, rs in records.items():
        for r in rs:
            assert r["held_payloads"] == 0  # nothing of its steps kept after its use
            parts = r["compute_seconds"] + r["comm_wait_seconds"] + r["idle_seconds"]
            assert abs(parts - r["train_seconds"]) <= 0.05 * r["train_seconds"], r  # the node's time, accounted
            assert r["compute_seconds"] == pytest.approx(sum(r[f"{k}_seconds"] for k in (
                "data_load", "forward", "backward", "update", "sync")))
    with open(Path(summary["machine_dir"]) / "results.csv") as f:
        rows = {int(r["node"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert [rows[u]["role"] for u in range(5)] == ["device"] * 4 + ["server"]
    assert [int(rows[u]["samples"]) for u in range(5)] == [2 * shard[u] for u in range(4)] + [0]
    for u, row in rows.items():
        assert float(row["mb_communicated"]) == pytest.approx(
            (records[u][-1]["bytes_sent"] + records[u][-1]["bytes_received"]) / 1e6, rel=0.05)
        assert float(row["test_acc"]) == pytest.approx(records[u][-1]["test_acc"], abs=1e-6)
        assert float(row["forward_s"]) == pytest.approx(sum(r["forward_seconds"] for r in records[u]), rel=1e-4)
        assert (int(row["held_end"]), int(row["mailbox_end"]), int(row["spool_end_bytes"])) == (0, 0, 0)
    assert float(rows[4]["forward_s"]) > 0 and float(rows[0]["forward_s"]) > 0  # both sides compute
    check_trace(Path(summary["machine_dir"]), epoch, workers)


def check_trace(folder: Path, epoch: int, workers: int = 1, rounds: int = 2) -> dict:
    """split.trace: every node's timeline, merged into trace.json: a compute track per
    thread (a device has two: its pipeline and the background thread of its partition 1
    backwards, split.preempt) that never overlaps itself, with every forward the schedule
    has (`rounds` epochs x `epoch` steps x 4 micro-batches; a device forwards partitions 1 and 4
    of its pipeline, the server partitions 2 and 3 of the four devices'), and each
    device's uplink carrying its activations and its gradients. With several workers the
    server's tracks overlap, never with the same owner's actions; a device's overlap only
    as a partition 1 backward beside an action of partition 4. Returns each device's
    overlapping pairs."""
    merged = json.loads((folder / "trace.json").read_text())["traceEvents"]
    overlaps = {}
    names = {e["pid"]: e["args"]["name"] for e in merged if e["name"] == "process_name"}
    assert names == {u: f"node {u} (client {u + 1}, {'server' if u == 4 else 'device'})" for u in range(5)}
    for u in range(5):
        own = json.loads((folder / f"trace_{u}.json").read_text())["traceEvents"]
        assert [e for e in merged if e["pid"] == u] == own
        tracks = {e["tid"] for e in own if e["name"] == "thread_name" and e["args"]["name"].startswith("compute")}
        assert len(tracks) == (workers if u == 4 else 2)
        spans = sorted((e for e in own if e["ph"] == "X" and e["tid"] in tracks), key=lambda e: e["ts"])
        for tid in tracks:  # a worker computes one action at a time
            mine = [e for e in spans if e["tid"] == tid]
            assert all(a["ts"] + a["dur"] <= b["ts"] + 1 for a, b in zip(mine, mine[1:]))
        at_once = []  # pairs of actions computed at the same time
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if b["ts"] + 1 >= a["ts"] + a["dur"]:
                    break
                at_once.append((a, b))
        if u == 4:
            assert all(a["args"]["owner"] != b["args"]["owner"] for a, b in at_once)  # an owner's: one at a time
            assert bool(at_once) == (workers > 1)
        else:
            for pair in at_once:
                assert sorted((e["args"]["kind"], e["args"]["partition"]) for e in pair)[0] == ("bwd", 1), pair
                assert sorted(e["args"]["partition"] for e in pair) == [1, 4], pair
            overlaps[u] = at_once
        forwards = [e for e in spans if e["args"]["kind"] == "fwd"]
        assert len(forwards) == rounds * epoch * 4 * (2 if u < 4 else 2 * 4)
        if u < 4:
            sent = [e["name"] for e in own if e["ph"] == "X" and e["tid"] == 2]
            assert sum(k.startswith("split/x/act/") for k in sent) == rounds * epoch * 4
            assert sum(k.startswith("split/x/grad/") for k in sent) == rounds * epoch * 4
    return overlaps


def test_a_slower_processor_waits_its_factor_less_one_times_each_pass():
    from dflsplit.node.split import SlowerProcessor

    waits = []
    slow, same = SlowerProcessor(3, sleep=waits.append), SlowerProcessor(sleep=waits.append)
    for took in (0.01, 0.25, 0.0):  # work = wall time: nothing else slowed the pass
        slow.after(took, took)
        same.after(took, took)
    assert waits == pytest.approx([0.02, 0.5]) and slow.waited == pytest.approx(0.52) and same.waited == 0
    slow.after(0.05, 0.02)  # a pass slowed here by other load: it lasts 3x its work, 0.06 s in all
    slow.after(0.07, 0.02)  # slowed past that: nothing added
    assert waits == pytest.approx([0.02, 0.5, 0.01])
    waits.clear()
    for work in (0.02, 0.01, 0.03):  # passes of one key: each lasts 3x the least work so far
        slow.after(work, work, key=("fwd", 1, 1, 8))  # (the third 0.03 s: it took that, nothing added)
    slow.after(0.03, 0.03, key=("fwd", 1, 1, 7))  # another size: its own
    assert waits == pytest.approx([0.04, 0.02, 0.06])


def test_a_background_backward_runs_beside_the_passes_of_other_partitions_only():
    """split.preempt: a device's partition 1 backward runs on a thread of its own beside a
    pass of its partition 4 (or that partition's sync), never beside another action on
    partition 1, and one at a time; the other actions keep their one thread."""
    def background(a):
        return a.kind == "bwd" and a.partition == 1

    b1, b1_next = Action("bwd", 0, 1, 1, 0), Action("bwd", 0, 1, 1, 1)
    head, head_next, f1 = Action("fwd", 0, 1, 4, 1), Action("bwd", 0, 1, 4, 1), Action("fwd", 0, 1, 1, 2)
    sync1, sync4, send = Action("sync", 0, 0, 1), Action("sync", 0, 0, 4), Action("send", 0, 1, 2, what="act", peer=5)
    assert may_start(head, [b1], 1, background) and may_start(b1, [head], 1, background)
    assert not may_start(head, [b1], 1)  # without a background thread: one action at a time
    assert not may_start(f1, [b1], 1, background)  # the same replica: never at once
    assert not may_start(b1_next, [b1], 1, background)  # one background pass at a time
    assert not may_start(head_next, [b1, head], 1, background)  # the pipeline's own thread is busy
    assert may_start(sync4, [b1], 1, background) and may_start(b1, [sync4], 1, background)
    assert not may_start(sync1, [b1], 1, background) and not may_start(b1, [sync1], 1, background)
    assert not may_start(head, [sync4], 1, background) and may_start(send, [b1, head], 1, background)


def test_a_background_pass_pauses_while_a_pass_in_front_of_it_runs():
    """The emulated processor is one: a background pass (3x slower, 0.1 s of work from t=0)
    makes no progress while a pass in front runs (t=0.15 to 0.3), and so ends 0.15 s
    later than alone, at 0.45 s; the time added is each pass's own, not the pause."""
    from dflsplit.node.split import SlowerProcessor

    now, sleeps = [0.0], []
    slow = SlowerProcessor(3, sleep=lambda s: sleeps.append(s) or interrupt(s), clock=lambda: now[0])

    def interrupt(seconds):  # the front pass starts during the background pass's first wait
        start = now[0]
        if len(sleeps) == 1:
            now[0] = 0.15
            front = slow.begin()
            now[0] += 0.05
            slow.after(0.05, 0.05, front)  # waits 0.1 s more, inside this one
        now[0] = max(now[0], start + seconds)

    back = slow.begin(background=True)
    now[0] = 0.1
    slow.after(0.1, 0.1, back)
    assert now[0] == pytest.approx(0.45)
    assert sleeps == pytest.approx([0.2, 0.1, 0.15])  # its own wait, the front's, the pause
    assert slow.waited == pytest.approx(0.2 + 0.1)
    alone = SlowerProcessor(3, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    now[0] = 0.0
    ticket = alone.begin(background=True)
    now[0] = 0.1
    alone.after(0.1, 0.1, ticket)
    assert now[0] == pytest.approx(0.3) and alone.waited == pytest.approx(0.2)


@pytest.mark.slow
def test_emulated_slow_devices_train_the_same_model_and_count_the_added_time(tmp_path, base_port):
    """split.slowdown makes devices 0 and 1 compute 3 times slower: the weights still equal
    the unsplit run's, only they report added time, and it is inside their passes' time
    (a pass whose work took w of a core here lasts 3w; its wall time here is at least w,
    so the wait is at most 2w, two thirds of the pass). Their partition 1 backwards, on
    the background thread (split.preempt), run beside the head's passes."""
    cfg = device_server_config(tmp_path, base_port, "split.slowdown={0: 3, 1: 3}", "run.rounds=1",
                               "split.trace=true")
    summary = run_experiment(cfg, tmp_path / "run")
    assert_matches_reference(cfg, tmp_path / "run", split_timeline(cfg)[0])
    overlaps = check_trace(Path(summary["machine_dir"]), split_timeline(cfg)[0], rounds=1)
    assert overlaps[0] and overlaps[1]
    records = records_of(tmp_path / "run", 5)
    for u, rs in records.items():
        added = rs[0]["slowdown_seconds"]
        passes = sum(rs[0][f"{k}_seconds"] for k in ("data_load", "forward", "backward", "update"))
        if u in (0, 1):
            assert 0 < added and 1.5 * added <= passes, rs[0]
        else:
            assert added == 0, (u, rs[0])


@pytest.mark.slow
def test_auto_split_and_micro_batches_are_chosen_at_launch(tmp_path, base_port):
    cfg = device_server_config(tmp_path, base_port, "split.split=auto", "split.micro_batches=auto",
                               "run.rounds=1", "split.profile_repeats=1")
    summary = run_experiment(cfg, tmp_path / "run")
    chosen = yaml.safe_load((Path(summary["machine_dir"]) / "config.yaml").read_text())["split"]
    assert chosen["split"] in (-1, 1, 2) and chosen["micro_batches"] in (1, 2, 4, 8, 16)
    assert summary["nodes"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("path", ["auto", "torrent"])
def test_per_step_traffic_leaves_spool_and_mailbox_as_they_were(tmp_path, base_port, path):
    """2 MiB activations each way every step: with the default path (one receiver: inline) the
    spool stays empty and the mailbox drains after every round; a forced torrent path keeps
    files for retention_rounds (the check can fail)."""
    rows = [["1_1", "2_2", "1_3", "1_4", "2_5", "1_6"], ["2_1", "1_2", "2_3", "2_4", "1_5", "2_6"]]
    steps = (10, 10) if path == "auto" else (2, 3)
    cfg = split_config(tmp_path, base_port, rows, "model.hidden=[8192, 16]", "model.partitions=3",
                       "training.batch_size=64", f"run.rounds={steps[0]}", f"training.local_steps={steps[1]}",
                       "communication.name=torrent", f"communication.path={path}", "node.test_after=100",
                       "split.sync=none")
    summary = run_experiment(cfg, tmp_path / "run")
    records = records_of(tmp_path / "run", 2)
    with open(Path(summary["machine_dir"]) / "results.csv") as f:
        end = {int(r["node"]): r for r in csv.DictReader(f)}
    for u, rs in records.items():
        assert sum(r["steps_trained"] for r in rs) == steps[0] * steps[1]
        # an activation and a gradient of 2 MiB a step (64 x 8192 floats; the last batch of each pass is smaller)
        assert rs[-1]["payload_bytes_sent"] >= 0.8 * steps[0] * steps[1] * 2 * (2 << 20)
        assert all(r["held_payloads"] == 0 for r in rs)
        assert int(end[u]["held_end"]) == 0 and int(end[u]["mailbox_end"]) == 0  # the mailbox as it started
        spool = [r["spool_bytes"] for r in rs]
        if path == "auto":
            assert spool == [0] * steps[0] and int(end[u]["spool_end_bytes"]) == 0  # the spool as it started
        else:
            assert min(spool) >= 2 << 20  # torrents kept for retention_rounds


@pytest.mark.slow
def test_example_on_digits_reaches_85_percent(tmp_path, base_port):
    cfg = load_config(SPLIT_CONFIGS / "example5.yaml", [
        f"run.base_port={base_port}", "run.threads_per_proc=1", "run.progress=false",
        "run.rounds=4", "training.local_steps=25", "training.batch_size=32", "optimizer.lr=0.1",
        "optimizer.momentum=0.9", "node.test_after=2", "communication.name=tcp",
    ])
    assert cfg.split.stages == EXAMPLE and cfg.model.name == "cnn" and cfg.dataset.name == "digits"
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["test_acc_mean"] >= 0.85, summary["final_test_acc"]


@pytest.mark.slow
def test_a_silent_peer_times_out_naming_what_is_awaited(tmp_path, base_port, monkeypatch):
    """Client 5 (node 4) connects, then stays silent: the others fail after
    communication.timeout, naming the tasks that wait and the client they wait for."""
    import time as time_mod

    from dflsplit.node.split import SplitNode

    run_round = SplitNode.run_round

    def silent(self, round_):
        if self.uid == 4:
            time_mod.sleep(60)
        return run_round(self, round_)

    monkeypatch.setattr(SplitNode, "run_round", silent)  # forked node processes inherit it
    cfg = split_config(tmp_path, base_port, EXAMPLE, "communication.timeout=3")
    with pytest.raises(RunFailed, match=r"(?s)SplitTimeout: node [0-3] \(client [1-4]\): no split message for 3 s "
                       r".*waiting:.*from client 5 \(node 4\)"):
        run_experiment(cfg, tmp_path / "run")


@pytest.mark.slow
def test_an_error_on_a_worker_fails_the_node_with_its_cause(tmp_path, base_port, monkeypatch):
    """A server's backward raises on one of its two workers: the run fails with that error,
    not with a peer's timeout."""
    from dflsplit.node.split import SplitNode

    backward = SplitNode._backward

    def broken(self, a):
        if self.uid == 4 and a.step == 2:
            raise RuntimeError(f"injected into {a.describe(self.P)}")
        return backward(self, a)

    monkeypatch.setattr(SplitNode, "_backward", broken)  # forked node processes inherit it
    cfg = device_server_config(tmp_path, base_port, "split.workers=2", "run.rounds=1", "communication.timeout=30")
    with pytest.raises(RunFailed, match=r"^node 4 failed: RuntimeError: injected into backward [1-4]_[67] \(step 2"):
        run_experiment(cfg, tmp_path / "run")


def server_sends_one_sample_too_many(monkeypatch, what: str) -> None:
    """The server (node 4) sends client 2's `what` ("act" or "grad") of step 1 with one
    sample more than it computed (forked node processes inherit the patch)."""
    from dflsplit.node.split import SplitNode

    send = SplitNode._send

    def longer(self, a):
        tok = (a.what, a.step, a.owner, a.partition, a.micro)
        if self.uid == 4 and a.what == what and a.step == 1 and a.owner == 2:
            self.outbox[tok] = torch.cat([self.outbox[tok], self.outbox[tok][:1]])
        return send(self, a)

    monkeypatch.setattr(SplitNode, "_send", longer)


@pytest.mark.slow
@pytest.mark.parametrize("what,message", [
    # a gradient one sample longer than the activation it answers: not inside autograd
    ("grad", r"^node 1 failed: SplitError: node 1: the gradient of backward 2_8 \(step 1, micro-batch \d\) from "
             r"client 5 \(node 4\) has shape \(9, 32\); the activation sent for it had \(8, 32\)"),
    # an activation for the device's head one sample longer than the micro-batch: not inside the loss
    ("act", r"^node 1 failed: SplitError: node 1: the activation of forward \d_\d+ \(step 1, micro-batch (\d)\) "
            r"from client 5 \(node 4\) has 9 samples; micro-batch \1 of step 1 has 8"),
])
def test_a_payload_one_sample_too_long_fails_its_receiver_naming_the_sender(tmp_path, base_port, monkeypatch,
                                                                            what, message):
    """The server sends client 2 a payload one sample longer than it should be: the device
    fails naming the sender and both sizes."""
    server_sends_one_sample_too_many(monkeypatch, what)
    cfg = device_server_config(tmp_path, base_port, "run.rounds=1", "communication.timeout=30")
    with pytest.raises(RunFailed, match=message):
        run_experiment(cfg, tmp_path / "run")


def test_timeline_in_epochs_follows_the_largest_shard():
    cfg = load_config(None, [
        "run.procs_per_machine=5", "dataset.name=digits", "dataset.partition=dirichlet", "dataset.alpha=0.3",
        "training.local_steps=null", "training.local_epochs=0.5", "training.batch_size=32",
        "split.sync_unit=epochs", "split.sync_every=2",
    ])
    prepare_dataset(cfg)
    sizes = [len(load_node_data(cfg, u).train_y) for u in range(5)]
    assert len(set(sizes)) > 1
    epoch = max(-(-n // 32) for n in sizes)
    assert split_timeline(cfg) == (-(-epoch // 2), 2 * epoch)
    cfg.split.sync_unit, cfg.training.local_steps = "steps", 7
    assert split_timeline(cfg) == (7, 2)


def test_invalid_stage_configuration_fails_before_any_node_starts(tmp_path, base_port):
    cfg = split_config(tmp_path, base_port, EXAMPLE, "model.partitions=3")
    with pytest.raises(StageConfigError, match="rule 5: .*the model has 3 partitions"):
        run_experiment(cfg, tmp_path / "run")
    assert not list((tmp_path / "run").glob("**/node_*"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "eval/configs/split").glob("*.yaml")))
def test_every_split_example_config_learns(tmp_path, base_port, name):
    """The README's `dflsplit run eval/configs/split/<name>.yaml`, on a free port: 90 % on digits."""
    cfg = load_config(REPO / f"eval/configs/split/{name}.yaml", [f"run.base_port={base_port}", "run.progress=false"])
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["test_acc_mean"] >= 0.90, summary
