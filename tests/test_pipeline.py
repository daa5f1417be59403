"""Pipelined split learning: the sampler's passes, the device/server config checks, the
timed simulation against hand-computed makespans, the planner's choices, the offloading
plan, and the `stages` / `profile` commands."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from dflsplit.config import ConfigError, load_config
from dflsplit.cli_profile import profile_main
from dflsplit.cli_stages import stages_main
from dflsplit.mappings.stages import StageMapping, device_server_rows
from dflsplit.node.split_profile import (
    Link, Profile, choose, cuts, epoch_floor, least_epoch_floor, plan_offloading, simulate, simulate_config,
    step_floor, sync_floor,
)
from dflsplit.node.split_schedule import TAPER_LAST, Action, PipelineSchedule, SplitPlan, micro_sizes
from dflsplit.training import BatchSampler

from stage_examples import ALL_LOCAL

UNLIMITED = float("inf")


def test_sampler_without_drop_last_draws_every_sample_once_per_pass():
    s = BatchSampler(10, 4, torch.Generator().manual_seed(3), drop_last=False)
    assert s.batches_per_pass == 3
    for _ in range(3):
        batches = [s.next() for _ in range(3)]
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(torch.cat(batches).tolist()) == list(range(10))
    kept = BatchSampler(10, 4, torch.Generator().manual_seed(3))  # local SGD's: full batches only
    assert kept.batches_per_pass == 2 and [len(kept.next()) for _ in range(3)] == [4, 4, 4]


def pipar_config(tmp_path, **split):
    data = {"run": {"procs_per_machine": 5}, "model": {"name": "cnn"}, "node": {"name": "split"},
            "training": {"batch_size": 8, "local_steps": 4},
            "split": {"server": 4, "split": 1, **split}}
    path = tmp_path / "pipar.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("split,message", [
    ({"split": 0}, "key 'split': 0 is not a device/server split of model 'cnn' \\(4 partitions\\): "
                   "expected -1 or 1..2"),
    ({"split": 3}, "expected -1 or 1..2 or auto"),
    ({"server": 5}, "key 'server': uid 5 is not a node of the run"),
    ({"stages": [["1_1"]]}, "'server' generates the stage configuration; unset 'stages'"),
    ({"mode": "relay"}, "device/server mode trains every device every step"),
    ({"schedule": "zigzag"}, "unknown schedule 'zigzag'; known: 1f1b, gpipe"),
    ({"server": None, "aggregation_frequency": 2}, "'aggregation_frequency' is for the device/server mode"),
    ({"server": None, "split": "auto", "stages": [["1_1"]]}, "auto is for the device/server mode"),
    ({"slowdown": {0: 0.5}}, "pipar.yaml: section 'split': key 'slowdown': expected node uid \\(0..4\\) -> factor >= 1 "
                             "\\(how many times slower than this machine it computes\\), got 0: 0.5"),
    ({"slowdown": {7: 2}}, "key 'slowdown': expected node uid \\(0..4\\) .*, got 7: 2.0"),
])
def test_device_server_config_errors_name_the_key(tmp_path, split, message):
    with pytest.raises(ConfigError, match=message):
        load_config(pipar_config(tmp_path, **split))


def test_slowdown_is_refused_for_nodes_that_do_not_emulate_it(tmp_path):
    path = tmp_path / "dpsgd.yaml"
    path.write_text(yaml.safe_dump({"run": {"procs_per_machine": 4}, "split": {"slowdown": {1: 4}}}))
    with pytest.raises(ConfigError, match="dpsgd.yaml: section 'split': key 'slowdown' emulates slower "
                                          "split-learning nodes; node 'dpsgd' does not take it"):
        load_config(path)


@pytest.mark.parametrize("key", ["split", "micro_batches", "micro_sizes"])
def test_auto_is_for_one_machine(tmp_path, key):
    with pytest.raises(ConfigError, match="auto is chosen by profiling one machine"):
        load_config(pipar_config(tmp_path, **{key: "auto"}), ["run.machines=2", "run.procs_per_machine=3",
                                                               "run.hosts={0: 127.0.0.1, 1: 127.0.0.2}"])


def test_split_nodes_refuse_checkpoints_they_could_not_resume_from(tmp_path):
    with pytest.raises(ConfigError, match="key 'checkpoint_every': split nodes are not checkpointed"):
        load_config(pipar_config(tmp_path), ["run.checkpoint_every=1"])


def test_split_nodes_take_their_steps_from_local_sgd(tmp_path):
    with pytest.raises(ConfigError, match="training 'fedprox' is for gossip and federated nodes"):
        load_config(pipar_config(tmp_path), ["training.name=fedprox"])


# --------------------------------------------------------------------------- simulation

F = [0.010, 0.040, 0.020]  # forward of partitions 1..3 on a whole batch of 8
B = [0.020, 0.080, 0.030]
U = [0.001, 0.002, 0.003]
OUT = [1000, 500, 40]  # bytes per sample of each partition's output


def linear_profile(links, P=3, batch=8, slowdown=None, cores=0):
    """Times proportional to the samples (so micro-batches add up to the batch)."""
    sizes = [1, 2, 4, 8]
    fwd = {n: [F[p % 3] * (1 + p // 3) * n / batch for p in range(P)] for n in sizes}
    bwd = {n: [B[p % 3] * (1 + p // 3) * n / batch for p in range(P)] for n in sizes}
    return Profile(batch, P, fwd, bwd, [U[p % 3] for p in range(P)], [OUT[p % 3] for p in range(P)],
                   [4000] * P, links, slowdown or {}, 1, cores)


def test_simulated_local_pipeline_is_the_sum_of_its_compute():
    m = StageMapping([["1_1", "1_2", "1_3", "1_4", "1_5", "1_6"]], 3)
    sched = PipelineSchedule({1: SplitPlan(m, 1, 1, sync="none")})
    sim = simulate(sched, linear_profile({}), steps=2)
    assert sim.seconds == pytest.approx(2 * (sum(F) + sum(B) + sum(U)))
    assert sim.idle[1] == pytest.approx(0.0)


def test_simulated_device_server_step_at_one_micro_batch_is_sequential():
    """A device (client 1) and a server (client 2): partition 2 on the server. At M=1 nothing
    overlaps: compute, the device's uplink and downlink, one after the other."""
    up, down = 1e5, 2.5e5
    links = {0: Link(int(up), int(down), up, down), 1: Link(0, 0, UNLIMITED, UNLIMITED)}
    rows = device_server_rows(2, 2, 3, 1)
    m = StageMapping(rows, 3)
    plans = {c: SplitPlan(m, c, 1, sync="none", trainers=[1]) for c in (1, 2)}
    sim = simulate(PipelineSchedule(plans), linear_profile(links), steps=1)
    a1, a2 = OUT[0] * 8, OUT[1] * 8  # device -> server: partition 1's output; back: partition 2's
    # the updates of partitions 3 (device) and 2 (server) run while the gradient travels on
    expected = F[0] + a1 / up + F[1] + a2 / down + F[2] + B[2] + a2 / up + B[1] + a1 / down + B[0] + U[0]
    assert sim.seconds == pytest.approx(expected)
    assert sim.busy[2] == pytest.approx(F[1] + B[1] + U[1])
    # 4 micro-batches overlap the links and the two sides: faster, but no faster than the busiest resource
    plans4 = {c: SplitPlan(m, c, 4, sync="none", trainers=[1]) for c in (1, 2)}
    sim4 = simulate(PipelineSchedule(plans4), linear_profile(links), steps=1)
    assert (a1 + a2) / up < sim4.seconds < sim.seconds


def test_step_floor_is_the_sequential_step_at_one_micro_batch_and_bounds_every_simulated_step():
    """`step_floor` against the simulation, which runs one exact schedule: equal where nothing
    overlaps (one device, M=1), never above it for 4 devices, splits 1 and 2, M up to 8, one or
    two server workers, links that make the uplink or the round trips the longer."""
    one = {0: Link(1, 1, 1e5, 2.5e5), 1: Link(0, 0, UNLIMITED, UNLIMITED)}
    m = StageMapping(device_server_rows(2, 2, 3, 1), 3)
    sim = simulate(PipelineSchedule({c: SplitPlan(m, c, 1, sync="none", trainers=[1]) for c in (1, 2)}),
                   linear_profile(one), steps=1)
    floor = step_floor(linear_profile(one), 1, 1, device=0, server=1)
    assert floor.seconds == pytest.approx(sim.seconds)
    assert floor.uplink > floor.compute and floor.fill == pytest.approx(F[0])
    checked, tight = 0, []
    for up, cores in itertools.product((2e3, 2e4, 2e5), (0, 2)):
        links = {u: Link(1, 1, up, 2.5 * up) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
        profile = linear_profile(links, P=4, cores=cores)
        for split, micro, workers in itertools.product((1, 2), (1, 2, 4, 8), (1, 2)):
            mapping = StageMapping(device_server_rows(5, 5, 4, split), 4)
            sched = PipelineSchedule({c: SplitPlan(mapping, c, micro, sync="none", trainers=[1, 2, 3, 4])
                                      for c in range(1, 6)})
            floor = step_floor(profile, split, micro, device=0, server=4, devices=4, workers=workers).seconds
            simulated = simulate(sched, profile, steps=2, workers=workers).seconds / 2
            assert simulated >= floor * (1 - 1e-9)
            tight.append(simulated / floor)
            checked += 1
    assert checked == 96
    assert sorted(tight)[len(tight) // 2] < 1.2  # a bound close to what a schedule achieves, not a trivial one
    with pytest.raises(ValueError, match="split 3: .*1 <= split <= 2"):
        step_floor(profile, 3, 4, device=0, server=4)



def test_micro_batch_sizes_even_and_tapered():
    for batch, micro in itertools.product((1, 3, 7, 8, 32, 33, 100), (1, 2, 3, 4, 8)):
        even = micro_sizes(batch, micro)
        assert even == [len(c) for c in torch.tensor_split(torch.arange(batch), micro)]
        tapered = micro_sizes(batch, micro, "tapered")
        assert sum(tapered) == batch and len(tapered) == micro
        assert tapered == sorted(tapered, reverse=True)
        assert batch < micro or min(tapered) >= 1
    assert micro_sizes(32, 4, "tapered") == [11, 9, 7, 5]
    sizes = micro_sizes(10_000, 4, "tapered")
    assert sizes[-1] / sizes[0] == pytest.approx(TAPER_LAST, abs=1e-3)
    assert all(a - b == pytest.approx(sizes[0] - sizes[1], abs=2) for a, b in itertools.pairwise(sizes))
    with pytest.raises(ValueError, match="sizing 'uneven': expected one of even, tapered"):
        micro_sizes(32, 4, "uneven")

    assert micro_sizes(32, 4, (13, 10, 8, 1)) == [13, 10, 8, 1]
    for sizes, why in (((13, 10, 9), "expected 4 sizes"), ((13, 10, 8, 2), "summing to the batch 32"),
                       ((22, 10, 0, 0), ">= 1")):
        with pytest.raises(ValueError, match=f"micro-batch sizes .*{why}"):
            micro_sizes(32, 4, sizes)


def test_the_least_floor_over_every_cut_of_the_batch_bounds_every_cut(tmp_path):
    """`cuts` against every ordered way to cut a batch; `least_epoch_floor` (one cut per
    multiset) against the floor of every ordered cut: the order does not change a floor;
    and the simulated epoch of the least cut, of even and of tapered stays above it."""
    for batch, micro in itertools.product((1, 4, 7, 12), (1, 2, 3, 4)):
        ordered = [c for c in itertools.product(range(1, batch + 1), repeat=micro) if sum(c) == batch]
        assert sorted(cuts(batch, micro)) == sorted({tuple(sorted(c, reverse=True)) for c in ordered})
    cfg = load_config(pipar_config(tmp_path, micro_batches=3, aggregation_frequency=1))
    links = {u: Link(1, 1, 2e4, 5e4) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    profile = linear_profile(links, P=4, batch=8)
    for split in (1, 2):
        least, sizes = least_epoch_floor(cfg, profile, split, 3, 2)
        every = {c: epoch_floor(cfg, profile, split, 3, 2, c)
                 for c in itertools.product(range(1, 7), repeat=3) if sum(c) == 8}
        assert least == pytest.approx(min(every.values())) and every[sizes] == least
        assert least < max(every.values())  # the cut matters
        for sizing in (sizes, "even", "tapered"):
            assert simulate_config(cfg, profile, split, 3, 2, sizing).seconds >= least * (1 - 1e-9)

def test_tapered_micro_batches_shorten_an_uplink_bound_step_and_stay_above_its_floor():
    """Four devices whose uplink carries most of a step: with 4 or 8 micro-batches, the last
    ones smaller, less of the step waits on the last one's round trip (at 2, the first
    micro-batch's round trip, 22 of 32 samples, is longer than the second's upload, 10 of them,
    which hides it: slower). The simulation of every case stays above `step_floor` for the
    same sizes."""
    faster = {}
    for up, split, micro, workers in itertools.product((2e3, 2e4), (1, 2), (2, 4, 8), (1, 2)):
        links = {u: Link(1, 1, up, 2.5 * up) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
        profile = linear_profile(links, P=4, batch=32)
        mapping = StageMapping(device_server_rows(5, 5, 4, split), 4)
        sched = PipelineSchedule({c: SplitPlan(mapping, c, micro, sync="none", trainers=[1, 2, 3, 4])
                                  for c in range(1, 6)})
        step = {sizing: simulate(sched, profile, steps=2, workers=workers, sizing=sizing).seconds / 2
                for sizing in ("even", "tapered")}
        floor = step_floor(profile, split, micro, device=0, server=4, devices=4, workers=workers, sizing="tapered")
        assert step["tapered"] >= floor.seconds * (1 - 1e-9)
        faster.setdefault(micro, []).append(step["tapered"] < step["even"])
    assert all(faster[4]) and all(faster[8]) and not any(faster[2])

def test_an_epoch_with_sync_through_the_server_takes_at_least_its_step_floors_and_sync_floor():
    """Replicas averaged through the server every 2 steps: the simulated 2 steps with their
    sync against 2 step floors + `sync_floor`, for splits 1 and 2 and M up to 8, weights
    heavy enough that the sync is a good part of the epoch; and `sync_floor`'s flow shop
    (Johnson's rule) against the best of every order of the shares."""
    links = {u: Link(1, 1, 2e4, 5e4) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    base = linear_profile(links, P=4)
    profile = Profile(base.batch, 4, base.fwd, base.bwd, base.update, base.out_bytes, [4000, 30000, 8000, 500],
                      links)
    ratios = []
    for split, micro in itertools.product((1, 2), (1, 2, 4, 8)):
        mapping = StageMapping(device_server_rows(5, 5, 4, split), 4)
        sched = PipelineSchedule({c: SplitPlan(mapping, c, micro, sync="star", sync_period=2, hub=5,
                                               trainers=[1, 2, 3, 4]) for c in range(1, 6)})
        simulated = simulate(sched, profile, steps=2, workers=2).seconds
        sync = sync_floor(profile, split, micro, device=0)
        floor = 2 * step_floor(profile, split, micro, 0, 4, devices=4, workers=2).seconds + sync
        assert sync > 0.1 * floor and simulated >= floor * (1 - 1e-9)
        ratios.append(simulated / floor)
    assert min(ratios) < 1.2
    # the shares' flow shop (up, then down) against every order of partitions 1-3's shares,
    # with the downlink slower than the uplink and faster
    weights = [4000, 30000, 8000, 500, 700]
    for up, down in ((2e4, 1e4), (1e4, 2.5e4)):
        profile = linear_profile({0: Link(1, 1, up, down)}, P=5)
        profile.param_bytes = weights

        def makespan(order, up=up, down=down):
            sent = done = 0.0
            for p in order:
                sent += weights[p - 1] / up
                done = max(done, sent) + weights[p - 1] / down
            return done

        overlap = sum(profile.bwd[8][p] for p in range(3)) + profile.update[0]  # the tail's backward
        best = min(makespan(order) for order in itertools.permutations((1, 2, 3)))
        assert sync_floor(profile, 3, 1, device=0) == pytest.approx(best - overlap)


def test_cores_shared_by_the_nodes_slow_the_simulation_down():
    m = StageMapping(ALL_LOCAL, 4)
    plans = {c: SplitPlan(m, c, 1, sync="none") for c in range(1, 6)}
    free = simulate(PipelineSchedule(plans), linear_profile({}, P=4), steps=1).seconds
    shared = simulate(PipelineSchedule(plans), linear_profile({}, P=4, cores=1), steps=1).seconds
    assert shared == pytest.approx(5 * free)  # five pipelines, one core


def test_simulated_server_workers_compute_for_several_devices_at_once():
    """A server ten times slower than its 4 devices bounds the step; with 2 workers it runs
    two devices' passes at once and the step takes about half as long. A device runs one
    pipeline: a second worker changes nothing for it."""
    links = {u: Link(0, 0, UNLIMITED, UNLIMITED) for u in range(5)}
    profile = linear_profile(links, P=4, slowdown={4: 10.0})
    m = StageMapping(device_server_rows(5, 5, 4, 1), 4)
    sched = PipelineSchedule({c: SplitPlan(m, c, 4, sync="none", trainers=[1, 2, 3, 4]) for c in range(1, 6)})
    one, two = (simulate(sched, profile, steps=2, workers=w) for w in (1, 2))
    server_work = 2 * 4 * 10 * sum(F[p % 3] * (1 + p // 3) + B[p % 3] * (1 + p // 3) for p in (1, 2)) \
        + 2 * 4 * 10 * (U[1] + U[2])  # 2 steps x 4 devices x partitions 2 and 3, 10x slower
    assert one.busy[5] == pytest.approx(server_work)  # one worker: its work, one action after another
    assert server_work / 2 <= two.busy[5] < 0.6 * server_work  # two: in half the time, never less
    assert two.seconds < 0.6 * one.seconds
    alone = PipelineSchedule({c: SplitPlan(m, c, 4, sync="none", trainers=[1]) for c in range(1, 6)})
    assert simulate(alone, profile, 2, workers=2).seconds == pytest.approx(simulate(alone, profile, 2).seconds)


def test_slower_processors_hold_a_shared_core_only_for_this_machines_time():
    """Two pipelines whose clients compute 4 times slower (split.slowdown, emulated by
    waiting off the cores) on one shared core: the emulated time overlaps, so together
    they take far less than one after the other, and no less than one alone; the
    machine's bound in the step floor is the same as without the slowdown."""
    m = StageMapping([["1_1", "1_2", "1_3", "1_4", "1_5", "1_6"], ["2_1", "2_2", "2_3", "2_4", "2_5", "2_6"]], 3)
    sched = PipelineSchedule({c: SplitPlan(m, c, 1, sync="none") for c in (1, 2)})
    alone = simulate(PipelineSchedule({1: SplitPlan(m, 1, 1, sync="none", trainers=[1])}),
                     linear_profile({}, slowdown={0: 4.0}), steps=2).seconds
    assert alone == pytest.approx(4 * 2 * (sum(F) + sum(B) + sum(U)))
    both = simulate(sched, linear_profile({}, slowdown={0: 4.0, 1: 4.0}, cores=1), steps=2)
    assert alone <= both.seconds < 0.6 * 2 * alone
    assert both.busy[1] == pytest.approx(alone) and both.busy[2] == pytest.approx(alone)
    links = {u: Link(1, 1, 1e5, 2.5e5) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    floors = [step_floor(linear_profile(links, P=4, slowdown=slow, cores=2), 1, 4, 0, 4, 4, 2)
              for slow in ({}, {u: 8.0 for u in range(4)})]
    assert floors[1].machine == pytest.approx(floors[0].machine)
    assert floors[1].compute == pytest.approx(8 * floors[0].compute)


def test_a_slow_device_answers_the_server_before_its_own_backward():
    """In relaxed order a backward that no other client waits for (a device's chain down to
    partition 1) yields to the step's passes that feed a peer: with devices 4 times slower
    than the server, the head's passes (whose gradient the server waits for) go first and
    the simulated step is shorter than with the dry run's order alone."""
    links = {u: Link(1, 1, 2e4, 5e4) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    profile = linear_profile(links, P=4, slowdown={u: 4.0 for u in range(4)})
    m = StageMapping(device_server_rows(5, 5, 4, 2), 4)
    plans = {c: SplitPlan(m, c, 4, sync="none", schedule="1f1b", trainers=[1, 2, 3, 4]) for c in range(1, 6)}
    device, server = plans[1], plans[5]
    assert [device.local_only(Action("bwd", 0, 1, p, 0)) for p in (1, 2, 4)] == [True, True, False]
    assert not device.local_only(Action("fwd", 0, 1, 1, 0))
    assert not any(server.local_only(Action("bwd", 0, o, 3, 0)) for o in range(1, 5))
    first = simulate(PipelineSchedule(plans), profile, steps=2).seconds

    class DryRunOrder(SplitPlan):
        def local_only(self, a):
            return False

    listed = simulate(PipelineSchedule({c: DryRunOrder(m, c, 4, sync="none", schedule="1f1b",
                                                       trainers=[1, 2, 3, 4]) for c in range(1, 6)}),
                      profile, steps=2).seconds
    assert first < 0.97 * listed
    strict = {c: SplitPlan(m, c, 4, sync="none", schedule="1f1b", trainers=[1, 2, 3, 4], strict=True)
              for c in range(1, 6)}
    assert {e.priority[1] for c in strict for e in PipelineSchedule(strict).ordered(c, 0)} == {False}


def test_a_slow_devices_background_backward_lets_the_head_go_first_on_its_one_processor():
    """split.preempt: with devices 4 times slower (split 1, M=4), a device's partition 1
    backwards run on a background thread that pauses while the head's passes run, so the
    server gets its gradients sooner and the simulated step is shorter; the device is still
    one processor (its busy time is its work: no two passes progress at once) and the step
    floor still holds. Strict order, the server and a client whose passes feed no peer
    keep one thread."""
    links = {u: Link(1, 1, 1e4, 2.5e4) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    profile = linear_profile(links, P=4, slowdown={u: 4.0 for u in range(4)})
    m = StageMapping(device_server_rows(5, 5, 4, 1), 4)

    def schedule(preempt, **kw):
        return PipelineSchedule({c: SplitPlan(m, c, 4, sync="none", schedule="1f1b", trainers=[1, 2, 3, 4],
                                              preempt=preempt, **kw) for c in range(1, 6)})

    on, off = (simulate(schedule(p), profile, steps=2) for p in (True, False))
    assert on.seconds < 0.97 * off.seconds
    work = 2 * 4 * (F[0] + B[0] + U[0] + 2 * (F[0] + B[0]) + U[0])  # 2 steps of partitions 1 and 4, 4x slower
    assert on.busy[1] == pytest.approx(work) and off.busy[1] == pytest.approx(work)
    assert on.seconds / 2 >= step_floor(profile, 1, 4, device=0, server=4, devices=4).seconds
    plans = schedule(True).plans
    assert [plans[c].preempts for c in range(1, 6)] == [True] * 4 + [False]
    assert [plans[1].background(Action("bwd", 0, 1, p, 0)) for p in (1, 4)] == [True, False]
    assert not plans[1].background(Action("fwd", 0, 1, 1, 0))
    assert not any(schedule(True, strict=True).plans[c].preempts for c in range(1, 6))
    alone = StageMapping([["1_1", "1_2", "1_3", "1_4", "1_5", "1_6"]], 3)
    assert not SplitPlan(alone, 1, 4, sync="none", preempt=True).preempts


def test_planner_keeps_the_shortest_simulated_epoch(tmp_path):
    cfg = load_config(pipar_config(tmp_path, split="auto", micro_batches="auto", aggregation_frequency=0))
    slow = {u: Link(1, 1, 1e4, 1e4) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    choice = choose(cfg, linear_profile(slow, P=4), epoch_steps=4)
    assert {(r["split"], r["micro_batches"]) for r in choice.table} == {
        (s, m) for s in (-1, 1, 2) for m in (1, 2, 4, 8)}
    best = min(r["epoch_seconds"] for r in choice.table)
    chosen = next(r for r in choice.table if (r["split"], r["micro_batches"]) == (choice.split, choice.micro_batches))
    assert chosen["epoch_seconds"] == pytest.approx(best)
    assert choice.micro_batches == min(r["micro_batches"] for r in choice.table  # ties: fewer micro-batches
                                       if r["epoch_seconds"] == pytest.approx(best))
    assert choice.split == -1  # slow links, no averaging: train the whole model on the devices
    fast = {u: Link(0, 0, 1e9, 1e9) for u in range(5)}
    slow_devices = {u: 20.0 for u in range(4)}
    choice = choose(cfg, linear_profile(fast, P=4, slowdown=slow_devices), epoch_steps=4)
    assert choice.split in (1, 2) and choice.micro_batches > 1  # slow devices, fast links: offload, pipeline


def test_planner_tries_both_micro_batch_sizings_when_auto(tmp_path):
    cfg = load_config(pipar_config(tmp_path, micro_batches="auto", micro_sizes="auto", aggregation_frequency=0))
    links = {u: Link(1, 1, 2e4, 5e4) for u in range(4)} | {4: Link(0, 0, UNLIMITED, UNLIMITED)}
    choice = choose(cfg, linear_profile(links, P=4, batch=32), epoch_steps=2)
    epochs = {(r["micro_batches"], r["micro_sizes"]): r["epoch_seconds"] for r in choice.table}
    assert set(epochs) == {(1, "even")} | {(m, s) for m in (2, 4, 8) for s in ("even", "tapered")}
    assert epochs[(4, "tapered")] < epochs[(4, "even")] and epochs[(2, "tapered")] > epochs[(2, "even")]
    assert epochs[(choice.micro_batches, choice.micro_sizes)] == min(epochs.values())
    assert choice.micro_sizes == "tapered"
    with pytest.raises(ValueError, match="sizing 'auto': expected one of even, tapered \\(auto is resolved"):
        epoch_floor(cfg, linear_profile(links, P=4, batch=32), 1, 4, 2)


def test_offloading_plan_moves_the_middle_off_a_slow_client_and_passes_the_validator():
    links = {u: Link(0, 0, 1e9, 1e9) for u in range(5)}
    assert plan_offloading(linear_profile(links, P=4), 5) == ALL_LOCAL  # equal clients keep their own
    rows = plan_offloading(linear_profile(links, P=4, slowdown={2: 10.0}), 5)
    m = StageMapping(rows, 4, strict_order=True)
    assert m.runners[3][0] == m.runners[3][3] == 3  # rule 4: client 3 keeps its first and last partition
    assert 3 not in m.runners[3][1:3]  # its middle partitions went to faster clients
    assert all(3 not in m.runners[o][1:3] for o in m.runners)  # and nobody else's came to it


# --------------------------------------------------------------------------- the commands


def test_stages_command_dry_runs_and_prints_the_action_table(tmp_path, capsys):
    path = pipar_config(tmp_path, micro_batches=2)
    assert stages_main([str(path), "--schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert ("dry run: schedule '1f1b', 2 micro-batches, relaxed order, sync star: 2 steps complete on every "
            "client") in out
    table = out.split("action table of step 1")[1]
    head = next(line for line in table.splitlines() if line.strip().startswith("client 1"))
    assert head.split() == ["client", "1", "client", "2", "client", "3", "client", "4", "client", "5"]
    assert "F 1_1 #0" in table and "->5 a1_2 #0" in table and "<-1 a1_2 #0" in table and "sync 1" in table
    # rows a strict runner deadlocks on: rule 6 under --strict-order, fine under --relaxed-order
    swap = tmp_path / "swap.py"
    swap.write_text("STAGES_CLIENTS = [['2_2', '1_1', '1_3', '1_4', '2_5', '1_6'], "
                    "['1_2', '2_1', '2_3', '2_4', '1_5', '2_6']]\n")
    assert stages_main([str(swap), "--partitions", "3"]) == 1
    assert stages_main([str(swap), "--partitions", "3", "--relaxed-order", "--schedule", "gpipe"]) == 0


def test_profile_command_measures_and_chooses(tmp_path, capsys):
    data = {"run": {"procs_per_machine": 3, "threads_per_proc": 1}, "model": {"name": "mlp", "hidden": [16, 16],
            "partitions": 3}, "node": {"name": "split"}, "training": {"batch_size": 8, "local_steps": 2},
            "communication": {"node_limits": {0: [2000000, 4000000], 1: [2000000, 4000000]}},
            "split": {"server": 2, "split": "auto", "micro_batches": "auto", "micro_sizes": "auto",
                      "profile_repeats": 1, "slowdown": {1: 4}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    assert profile_main([str(path), "--offload"]) == 0
    out = capsys.readouterr().out
    assert "nodes 0,1" in out and "up cap    2000000" in out and "nodes 2" in out
    sims = out.split("simulated epoch")[1].split("choice:")[0]
    table = [line.split() for line in sims.splitlines() if line.strip() and line.split()[0] in ("-1", "1")]
    assert {tuple(r[:3]) for r in table} == {(s, "1", "even") for s in ("-1", "1")} | {
        (s, m, sizes) for s in ("-1", "1") for m in ("2", "4", "8") for sizes in ("even", "tapered")}
    for split, _, _, epoch, _, floor, *_ in table:  # the floor: below what the simulated schedule takes
        assert floor == "-" if split == "-1" else 0 < float(floor) <= float(epoch)
    assert sum("<- chosen" in line for line in out.splitlines()) == 1 and "choice: split: " in out
    assert ", micro_sizes: " in out.split("choice: ")[1].splitlines()[0]
    assert "the stage validator accepts it (rules 1-6, strict order)" in out
    assert "(earliest finish time; slowdowns {1: 4.0})" in out  # split.slowdown: what the run emulates


class HeldTransport:
    """A transport whose `publish` holds until `release` is set; it records (key, receivers,
    header names) of each payload in the order they went out."""

    def __init__(self):
        import threading

        self.release, self.entered, self.published = threading.Event(), threading.Event(), []

    def publish(self, key, tensors, to, header):
        self.entered.set()
        assert self.release.wait(30)
        self.published.append((key, to, sorted(header)))


def test_sends_never_block_the_compute_thread():
    """The sender publishes in its own thread: `publish` returns while the transport is still
    busy with an earlier payload (here: held until released), and order is kept."""
    from dflsplit.node.split import Sender

    transport = HeldTransport()
    sender = Sender(transport, uid=0)
    sender.publish("a", {"x": torch.zeros(1)}, [1])
    assert transport.entered.wait(30)  # the sender thread is inside the transport's publish ...
    sender.publish("b", {"x": torch.zeros(1)}, [2], {"samples": 3})  # ... and this returns at once
    assert transport.published == [] and sender._jobs.unfinished_tasks == 2
    transport.release.set()
    sender.flush(30)
    assert transport.published == [("a", [1], ["sent"]), ("b", [2], ["samples", "sent"])]
    sender.close()


def test_a_gradient_passes_activations_queued_before_it():
    """The sender's queue goes by priority, in order within one: while the link carries an
    activation, a gradient queued after two more activations goes next (the peer's backward
    waits on it), then the activations in their order, then a replica share."""
    from dflsplit.node.split import Sender

    transport = HeldTransport()
    sender = Sender(transport, uid=0)
    x = {"x": torch.zeros(1)}
    sender.publish("act0", x, [1], priority=Sender.ACTIVATION)
    assert transport.entered.wait(30)  # act0 is on the link
    sender.publish("share", x, [1])
    sender.publish("act1", x, [1], priority=Sender.ACTIVATION)
    sender.publish("act2", x, [1], priority=Sender.ACTIVATION)
    sender.publish("grad0", x, [1], priority=Sender.GRADIENT)
    transport.release.set()
    sender.flush(30)
    assert [key for key, _, _ in transport.published] == ["act0", "grad0", "act1", "act2", "share"]
    sender.close()


def test_simulated_uplink_lets_gradients_pass(monkeypatch):
    """The simulation's uplink orders payloads as the sender does. A device keeping
    partitions 1 and 3 (its loss) sends four activations up a slow link and, for each
    micro-batch, partition 3's gradient: in a first-in-first-out queue the first gradient
    waits behind the activations queued before it, and the server's backwards with it."""
    from dflsplit.node import split_profile as sp

    up = 1e5
    links = {0: Link(int(up), 0, up, UNLIMITED), 1: Link(0, 0, UNLIMITED, UNLIMITED)}
    m = StageMapping(device_server_rows(2, 2, 3, 1), 3)
    plans = {c: SplitPlan(m, c, 4, sync="none", trainers=[1], schedule="gpipe") for c in (1, 2)}
    by_priority = simulate(PipelineSchedule(plans), linear_profile(links), steps=2).seconds
    # 1f1b: in parts of one sample (1000 B) a gradient waits behind one part of an activation, not all of it
    one_f = PipelineSchedule({c: SplitPlan(m, c, 4, sync="none", trainers=[1], schedule="1f1b") for c in (1, 2)})
    whole = simulate(one_f, linear_profile(links), steps=2).seconds
    assert simulate(one_f, linear_profile(links), steps=2, chunk_bytes=1000).seconds < whole
    assert simulate(one_f, linear_profile(links), steps=2, chunk_bytes=2000).seconds == pytest.approx(whole)  # fits
    monkeypatch.setattr(sp, "SEND_PRIORITY", {})  # every payload alike: first in, first out
    in_order = simulate(PipelineSchedule(plans), linear_profile(links), steps=2).seconds
    assert by_priority < in_order


def test_payloads_go_in_parts_of_whole_samples_and_come_back_whole():
    from dflsplit.node.split import PartAssembler, payload_parts

    x = torch.arange(11 * 6, dtype=torch.float32).reshape(11, 2, 3)  # 24 B a sample
    assert payload_parts(x, 0) == [x] and payload_parts(x, x.nbytes)[0] is x
    for chunk, count in ((100, 3), (48, 6), (24, 11), (1, 11)):
        parts = payload_parts(x, chunk)
        assert len(parts) == count and torch.equal(torch.cat(parts), x)
        assert max(p.nbytes for p in parts) <= max(chunk, 24) * 1.5  # about the chunk, whole samples
    parts = payload_parts(x, 48)
    assembler = PartAssembler()
    order = [3, 0, 5, 1, 4]
    for n, i in enumerate(order):  # any order; nothing whole before the last part
        assert assembler.add(("net_act", 0, 1, 2, 0), i, 6, parts[i], sent=10.0 + n, arrived=11.0 + n) is None
    tok = ("net_act", 0, 1, 2, 0)
    with pytest.raises(ValueError, match="part 1 of 6 arrived twice"):
        assembler.add(tok, 1, 6, parts[1], 0.0, 0.0)
    with pytest.raises(ValueError, match="part 2 of 5: the payload's other parts came as parts of 6"):
        assembler.add(tok, 2, 5, parts[2], 0.0, 0.0)
    with pytest.raises(ValueError, match="part 6 of 6: expected 0 <= part < count"):
        assembler.add(tok, 6, 6, parts[2], 0.0, 0.0)
    with pytest.raises(ValueError, match="part 2 of 6: a shape unlike"):
        assembler.add(tok, 2, 6, parts[2].reshape(2, 3, 2), 0.0, 0.0)
    assert len(assembler) == 1
    whole, seconds = assembler.add(tok, 2, 6, parts[2], sent=9.0, arrived=12.0)
    assert torch.equal(whole, x) and seconds == pytest.approx(15.0 - 9.0)  # first sent .. last arrived
    assert len(assembler) == 0


THREADED = {"run": {"procs_per_machine": 2, "threads_per_proc": 2, "rounds": 1, "progress": False},
            "model": {"name": "vgg", "width": 8},
            "dataset": {"name": "synthetic", "image_shape": [3, 32, 32], "num_train": 1024, "num_test": 64},
            "node": {"name": "split"}, "training": {"batch_size": 16, "local_steps": 2},
            "split": {"server": 1, "split": 1, "micro_batches": "auto", "profile_repeats": 1}}


@pytest.mark.parametrize("command", ["profile", "run"])
def test_several_threads_per_node(tmp_path, command):
    """With threads_per_proc > 1 the profiler and a run finish: OpenMP's thread pool is never
    started before a fork (the synthetic dataset's generation started it, and the profiling
    child and every node then hung in their first parallel region)."""
    import subprocess
    import sys

    path = tmp_path / "threads.yaml"
    path.write_text(yaml.safe_dump(THREADED))
    extra = ["--out", str(tmp_path / "run")] if command == "run" else []
    out = subprocess.run([sys.executable, "-m", "dflsplit.cli", command, str(path), *extra], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    if command == "profile":
        assert "2 torch thread(s)" in out.stdout and "choice: split: 1, micro_batches: " in out.stdout
    else:
        assert "2 nodes, 1 rounds" in out.stderr + out.stdout
