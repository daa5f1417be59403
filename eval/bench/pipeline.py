#!/usr/bin/env python3
"""Pipelined split learning (PiPar's device/server mode), every figure measured in this invocation.

Workload: eval/configs/pipeline/vgg4.yaml: 4 devices (nodes 0-3) and a server (node 4);
the small VGG (``model: vgg``, width 32) on CIFAR-shaped synthetic data (3×32×32, 10
classes, 256 training samples per device, batch 32: an epoch is 8 steps); each device
keeps the first ``split`` partitions and the last, the server the ones in between;
replicas averaged through the server each epoch (``aggregation_frequency: -1``); each
device's link capped at 10 Mbit/s up and 25 Mbit/s down (``communication.node_limits``),
the server's uncapped; two compute threads per node (``split.workers: 2``: the server
computes for two devices at once); the default transport.

Rows:

* ``links``: the emulated device link, measured two ways: a probe (two transports on
  loopback with the device's caps, payloads of two sizes each way, rate = size difference
  / time difference, each transfer starting with an idle link), and in the M=4 run
  (payload bytes each device uploaded / the time its sender spent publishing them).
  Target: within ±10 % of the configured rate.
* ``pipeline``: splits 1 and 2, M = 1 against M = 4 (schedule 1f1b, and gpipe beside it;
  1f1b with ``split.micro_sizes: tapered``, micro-batches of 11, 9, 7 and 5 samples; and
  1f1b with ``split.chunk_bytes: 0``, each activation and gradient in one piece instead of
  parts of 64 KiB):
  the epoch's time and the devices' idle time. Targets: M=4 at least 1.5× faster, device
  idle at least 30 % lower. Beside them, each M's floor: the least time an epoch can take
  with any exact schedule (``split_profile.step_floor`` per step, ``sync_floor`` for the
  epoch's replica sync), from the profiler's measurements on this machine (each pass
  alone, the links through their limiters); the ceiling is the measured M=1 epoch over
  M=4's floor: the most pipelining can gain here, which no executor passes; likewise the
  most the devices' idle time can fall (M=4's floor less their busy time in the M=4 run).
  The last ceiling takes M=4's least floor over every cut of the batch into 4
  (``split_profile.least_epoch_floor``): no exact M=4 schedule, whatever its sizes, passes it.
  Also printed: M=1's floor over M=4's (the speed-up if both ran at their floors) and
  the simulator's M=1 over its M=4 (``split_profile.simulate_config``, the planner's model).
* ``ceiling`` (only when asked: ``--rows ceiling``, about 15 minutes): for each VGG width
  of ``--widths`` (a device's compute grows as the width squared, its bytes on the wire as
  the width), splits 1 and 2: the measured M=1 epoch, M=4's floor with even and tapered
  micro-batches and the least over every cut, from a profile of that width, the ceilings
  (their ratios), M=1's floor and simulated epoch with the ratios floor to floor and
  simulation to simulation, the simulated M=4 epoch, and M=4 measured with tapered micro-batches:
  whether a heavier or lighter model lets M=4 reach 1.5x on this machine.
* ``devices``: PiPar's devices are slower than its server; here the devices emulate a
  processor k times slower than this machine's (``split.slowdown``, k of ``--slowdowns``:
  each pass lasts k times the least CPU time a pass of its kind and size took here, the
  added wait holding none of the shared cores), the server runs at this machine's speed.
  Splits 1 and 2, M=1 against M=4 (1f1b, even and tapered sizes), with the floor-to-floor
  and simulated ratios from the profile slowed alike, M=4 even also without
  ``split.preempt`` (the baseline: a device's backwards on its pipeline's thread), and
  this machine's rate on a device's passes (FLOPs from torch's FlopCounterMode over the
  profiled time) to put k in GFLOP/s. Same targets. For each k also federated training
  (``split: -1``, the whole model on each slowed device) measured, and the planner's pick
  (``split_profile.choose`` on the slowed profile, every split × M × sizing): a split is
  worth running only where it trains faster than federated training, the regime PiPar
  targets; the row ends with the verdicts there.
* ``workers``: split 1, M=4 with one compute thread per node (``split.workers: 1``)
  against two, run one after the other: what the server's second worker gives.
* ``sweep``: every split (-1, 1, 2) × M (1, 2, 4, 8, 16) with 1f1b, and a run with
  ``split: auto`` and ``micro_batches: auto`` (the profiler and the simulation choose at
  launch; the choice is read from the run's config.yaml). Target: the automatic (split,
  M) within 10 % of the sweep's best. The sweep's best is the fastest of 15 runs minutes
  apart on a machine whose speed drifts, so the verdict comes from a head-to-head: the
  chosen and the best configuration run alternately, twice each, their mean epochs
  compared (no runs when the choice is the best). The sweep's own figures and the
  automatic run's epoch (against the sweep's run of the same choice: the noise of one
  configuration) are printed beside it.

Method: each run is a plain ``dflsplit run`` (the launcher in this process) of the
workload with the overrides printed, 3 rounds of one epoch each; an epoch's time is the
slowest device's ``train_seconds`` (its round without evaluation), averaged over rounds 1
and 2 (round 0 warms up: connections, first allocations); idle is the devices' mean
``idle_seconds`` over the same rounds (the compute thread waiting with nothing ready).
Nothing samples the nodes while they run. The machine's other load is printed; on a
shared machine absolute times are noisy, the ratios come from runs minutes apart.
Usage::

    python eval/bench/pipeline.py [--rows links,pipeline,workers,sweep,devices,ceiling] [--width 32]
                                  [--samples 256] [--widths 32,48,64] [--slowdowns 4,8,16,32] [--out FILE]

The table goes to eval/bench/results/pipeline.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dflsplit.config import load_config  # noqa: E402
from dflsplit.launch import run_experiment  # noqa: E402
from dflsplit.mappings import free_base_port  # noqa: E402
from dflsplit.results import read_run  # noqa: E402

UP, DOWN = 1_250_000, 3_125_000  # bytes/s: 10 Mbit/s and 25 Mbit/s
DEVICES, SERVER = 4, 4
ROUNDS = 3


def workload(width: int, samples: int) -> dict:
    """eval/configs/pipeline/vgg4.yaml with the given VGG width and samples per device."""
    data = yaml.safe_load((ROOT / "eval" / "configs" / "pipeline" / "vgg4.yaml").read_text())
    data["run"].update(rounds=ROUNDS, progress=False)
    data["dataset"]["num_train"] = samples * DEVICES
    data["model"]["width"] = width
    data["split"].update(split=1, micro_batches=1, schedule="1f1b")
    return data


class Bench:
    def __init__(self, width: int, samples: int, lines: list[str]):
        self.width, self.lines = width, lines
        self.folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        self.path = self.folder / "workload.yaml"
        self.path.write_text(yaml.safe_dump(workload(width, samples)))
        self.port = 24000
        self.runs = 0
        self.steps = -(-samples // 32)
        self.profile = None  # split_profile.Profile of the workload, measured once

    def profiled(self):
        """The workload's config with every micro-batch count and sizing (the planner's
        candidates) and its profile, measured on the first call."""
        from dflsplit.node.split_profile import profile_run

        cfg = load_config(self.path, ["split.micro_batches=auto", "split.micro_sizes=auto"])
        if self.profile is None:
            self.profile = profile_run(cfg)  # every size of every sizing
        return cfg, self.profile

    def run(self, overrides: list[str]) -> dict:
        """One run; its epoch time, the devices' idle, upload rate and the config it ran."""
        self.port = free_base_port(DEVICES + 2, self.port + 40)
        cfg = load_config(self.path, [*overrides, f"run.base_port={self.port}"])
        out = self.folder / f"run{self.runs}"
        self.runs += 1
        t0 = time.time()
        summary = run_experiment(cfg, out, progress=False)
        records = read_run(summary["machine_dir"])
        rounds = range(1, ROUNDS)
        epoch = statistics.fmean(max(records[u][r]["train_seconds"] for u in range(DEVICES)) for r in rounds)
        idle = statistics.fmean(records[u][r]["idle_seconds"] for u in range(DEVICES) for r in rounds)
        sent = [records[u][-1]["payload_bytes_sent"] for u in range(DEVICES)]
        busy = [sum(r["upload_seconds"] for r in records[u]) for u in range(DEVICES)]
        ran = yaml.safe_load((Path(summary["machine_dir"]) / "config.yaml").read_text())["split"]
        return {"epoch": epoch, "idle": idle, "upload_rate": statistics.fmean(s / b for s, b in zip(sent, busy)),
                "split": ran["split"], "micro": ran["micro_batches"], "wall": time.time() - t0,
                "acc": summary.get("test_acc_mean")}


def links(bench: Bench, in_run: dict | None) -> None:
    from dflsplit.node.split_profile import measure_link

    lines = bench.lines
    up, down = measure_link(UP, DOWN)
    lines.append("links: a device's caps, 10 Mbit/s up (1250000 B/s) and 25 Mbit/s down (3125000 B/s)")
    for name, got, cap in (("probe up", up, UP), ("probe down", down, DOWN)):
        off = got / cap - 1
        lines.append(f"  {name:11s} {got:10.0f} B/s  {off:+6.1%} of the cap (target ±10 %: "
                     f"{'met' if abs(off) <= 0.10 else 'NOT met'}); method: slope of two payload sizes on loopback")
    if in_run is not None:
        off = in_run["upload_rate"] / UP - 1
        lines.append(f"  {'in-run up':11s} {in_run['upload_rate']:10.0f} B/s  {off:+6.1%} of the cap (target ±10 %: "
                     f"{'met' if abs(off) <= 0.10 else 'NOT met'}); method: payload bytes a device uploaded / its "
                     f"sender's publishing time, split 1, M=4 run")


def targets(speed: float, idle: float, sep: str) -> str:
    """The issue's verdicts on an M=4 run against M=1: its speed-up and the devices' idle cut."""
    return (f"(target >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'}){sep}device idle {idle:.0%} lower "
            f"(target >= 30 %: {'met' if idle >= 0.30 else 'NOT met'})")


def fmt(r: dict) -> str:
    return f"epoch {r['epoch']:6.2f} s, device idle {r['idle']:6.2f} s (run {r['wall']:.0f} s)"


def pipeline(bench: Bench, sweep: dict) -> dict:
    lines = bench.lines
    lines.append("pipeline: M=1 against M=4, schedule 1f1b (the sweep's runs; gpipe at M=4 measured beside them)")
    for split, where in ((1, "each device: partitions 1 and 4; the server: 2 and 3"),
                         (2, "each device: partitions 1, 2 and 4; the server: 3")):
        one = sweep.get((split, 1)) or bench.run([f"split.split={split}", "split.micro_batches=1"])
        four = sweep.get((split, 4)) or bench.run([f"split.split={split}", "split.micro_batches=4"])
        gpipe = bench.run([f"split.split={split}", "split.micro_batches=4", "split.schedule=gpipe"])
        tapered = bench.run([f"split.split={split}", "split.micro_batches=4", "split.micro_sizes=tapered"])
        whole = bench.run([f"split.split={split}", "split.micro_batches=4", "split.chunk_bytes=0"])
        lines.append(f"  split {split} ({where})")
        lines.append(f"    M=1            {fmt(one)}")
        lines.append(f"    M=4            {fmt(four)}")
        lines.append(f"    M=4 (gpipe)    {fmt(gpipe)}")
        lines.append(f"    M=4 (tapered)  {fmt(tapered)}  (micro-batches of 11, 9, 7, 5 samples)")
        lines.append(f"    M=4 (whole)    {fmt(whole)}  (split.chunk_bytes 0: each payload in one piece)")
        for name, run in (("M=4", four), ("M=4 tapered", tapered)):
            speed = one["epoch"] / run["epoch"]
            idle = 1 - run["idle"] / one["idle"]
            lines.append(f"    {name} is {speed:.2f}x faster than M=1 " + targets(speed, idle, "; "))
        floor_lines(bench, split, one, {"even": four, "tapered": tapered})
        if split == 1:
            out = four
    return out


def floor_lines(bench: Bench, split: int, one: dict, fours: dict) -> None:
    """The epoch's floor at M=1 and at M=4 with each micro-batch sizing of `fours`
    (`split_profile.step_floor` for each step, then `sync_floor`), from the profiler's
    measurements of this machine, against the measured epochs; and the ceiling it puts on
    M=4's speed-up over the measured M=1."""
    from dflsplit.node.split_profile import epoch_floor, least_epoch_floor, simulate_config, step_floor, sync_floor

    cfg, pr = bench.profiled()
    floors = {}
    for m, sizing, run in ((1, "even", one), *((4, sizing, run) for sizing, run in fours.items())):
        floors[(m, sizing)] = epoch = epoch_floor(cfg, pr, split, m, bench.steps, sizing)
        step = step_floor(pr, split, m, 0, SERVER, devices=DEVICES, workers=cfg.split.workers, sizing=sizing)
        sync = sync_floor(pr, split, m, 0, sizing)
        name = f"M={m}" + (f" {sizing}" if m > 1 else "")
        bench.lines.append(
            f"    floor {name}: epoch {epoch:6.2f} s ({bench.steps} x step {step.seconds:.3f} + sync {sync:.3f}; "
            f"step = fill {step.fill:.3f} + max(uplink {step.up:.3f}, activations {step.acts:.3f} + last round trip "
            f"{step.last_round_trip:.3f}) + tail "
            f"{step.tail:.3f}; server {step.server:.3f}, cores {step.machine:.3f}), measured "
            f"{run['epoch'] / epoch - 1:+.0%} above it")
    sim1 = simulate_config(cfg, pr, split, 1, bench.steps, "even").seconds
    for sizing in fours:
        sim4 = simulate_config(cfg, pr, split, 4, bench.steps, sizing).seconds
        bench.lines.append(
            f"    M=4 {sizing} against M=1 with both at their floors (an executor that reaches every floor): "
            f"{floors[(1, 'even')] / floors[(4, sizing)]:.2f}x; both simulated ({sim1:.2f} s, {sim4:.2f} s): "
            f"{sim1 / sim4:.2f}x")
    for sizing, four in fours.items():
        ceiling = one["epoch"] / floors[(4, sizing)]
        speed = one["epoch"] / four["epoch"]
        idle_cut = 1 - max(0.0, floors[(4, sizing)] - (four["epoch"] - four["idle"])) / one["idle"]
        bench.lines.append(
            f"    ceiling M=4 {sizing}: measured M=1 epoch / its floor = {ceiling:.2f}x, the most an exact M=4 "
            f"schedule with these sizes could gain on this machine; this run's {speed:.2f}x is {speed / ceiling:.0%} "
            f"of it; device idle at most {idle_cut:.0%} lower (the floor less the devices' busy time in its run, "
            f"against M=1's idle)")
    least, sizes = least_epoch_floor(cfg, pr, split, 4, bench.steps)
    bench.lines.append(
        f"    ceiling M=4, any sizes: the least floor over every cut of the batch into 4 is {least:.2f} s (cut "
        f"{', '.join(map(str, sizes))}): measured M=1 epoch / it = {one['epoch'] / least:.2f}x, the most any exact "
        f"M=4 schedule could gain on this machine")


def ceiling_row(widths: list[int], samples: int, lines: list[str]) -> None:
    """For each VGG width (compute grows as its square, the bytes at a cut as the width):
    the measured M=1 epoch at splits 1 and 2 against M=4's floor with even and tapered
    micro-batches, from a profile of that width, the simulated M=4 epochs, and the measured
    M=4 epoch with tapered micro-batches."""
    from dflsplit.node.split_profile import epoch_floor, least_epoch_floor, profile_run, simulate_config

    lines.append("ceiling: the VGG's width (compute per byte on the wire) against the most an exact M=4 schedule "
                 "can gain over the measured M=1 (its floor), the simulated M=4, and M=4 measured (1f1b, tapered)")
    for width in widths:
        bench = Bench(width, samples, [])
        cfg = load_config(bench.path, ["split.micro_batches=auto", "split.micro_sizes=auto"])
        profile = profile_run(cfg)
        for split in (1, 2):
            one = bench.run([f"split.split={split}", "split.micro_batches=1"])
            floor1 = epoch_floor(cfg, profile, split, 1, bench.steps, "even")
            sim1 = simulate_config(cfg, profile, split, 1, bench.steps, "even").seconds
            parts = []
            for sizing in ("even", "tapered"):
                floor = epoch_floor(cfg, profile, split, 4, bench.steps, sizing)
                sim = simulate_config(cfg, profile, split, 4, bench.steps, sizing).seconds
                parts.append(f"{sizing} floor {floor:5.2f} s -> ceiling {one['epoch'] / floor:.2f}x (floor to floor "
                             f"{floor1 / floor:.2f}x), simulated {sim:5.2f} s ({one['epoch'] / sim:.2f}x; simulated "
                             f"M=1 over it {sim1 / sim:.2f}x)")
            least, sizes = least_epoch_floor(cfg, profile, split, 4, bench.steps)
            parts.append(f"any sizes: floor {least:5.2f} s (cut {', '.join(map(str, sizes))}) -> ceiling "
                         f"{one['epoch'] / least:.2f}x")
            four = bench.run([f"split.split={split}", "split.micro_batches=4", "split.micro_sizes=tapered"])
            speed, idle = one["epoch"] / four["epoch"], 1 - four["idle"] / one["idle"]
            lines.append(f"  width {width:>2} split {split}: M=1 measured {one['epoch']:5.2f} s (floor "
                         f"{floor1:5.2f} s, simulated {sim1:5.2f} s); M=4 "
                         + "; ".join(parts) + f"; M=4 tapered measured {four['epoch']:5.2f} s: {speed:.2f}x "
                         f"(target >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'}), device idle {idle:.0%} lower")
            print(lines[-1], flush=True)


def device_gflops(bench: Bench, split: int) -> float:
    """This machine's rate on a device's passes (partitions 1..`split` and the last, forward
    and backward of a batch): their FLOPs (torch's FlopCounterMode) over the profile's times."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dflsplit.models import build_model

    cfg = load_config(bench.path)
    model = build_model(cfg.model, (3, 32, 32), 10, seed=0)
    parts, P, b = list(model.children()), bench.profile.partitions, bench.profile.batch
    x = torch.randn(b, 3, 32, 32)
    with torch.no_grad():
        head_in = x
        for part in parts[:-1]:
            head_in = part(head_in)
    with FlopCounterMode(display=False) as counter:
        out = x
        for part in parts[:split]:
            out = part(out)
        out.sum().backward()
        parts[-1](head_in.clone().requires_grad_(True)).sum().backward()
    seconds = sum(bench.profile.pass_time(k, p, b) for k in ("fwd", "bwd") for p in (*range(1, split + 1), P))
    return counter.get_total_flops() / seconds / 1e9


def devices_row(bench: Bench, factors: list[int]) -> None:
    """Devices slower than the server, as PiPar's are: the devices (nodes 0-3) emulate a
    processor k times slower than this machine's (``split.slowdown``), the server runs at
    this machine's speed; splits 1 and 2, M=1 against M=4 (1f1b, even and tapered sizes),
    with the floors and the simulation from the profile slowed alike."""
    import copy

    from dflsplit.node.split_profile import choose, epoch_floor, simulate_config

    lines = bench.lines
    cfg, _ = bench.profiled()
    serial = copy.deepcopy(cfg)
    serial.split.preempt = False
    rates = {split: device_gflops(bench, split) for split in (1, 2)}
    lines.append("devices: the devices (nodes 0-3) emulate a processor k times slower than this machine's "
                 "(split.slowdown: each pass lasts k times the least CPU time a pass of its kind and size took "
                 "here, the wait holding no core), the server at this machine's speed; M=1 against M=4 (1f1b); "
                 "floor to floor and simulated to simulated from the profile slowed alike; M=4 even also without "
                 "split.preempt (a device's backwards down to partition 1 on the pipeline's thread, not their own)")
    lines.append(f"  this machine on a device's passes (FLOPs of forward and backward of a batch, torch's "
                 f"FlopCounterMode, over the profiled time): split 1 {rates[1]:.1f} GFLOP/s, split 2 "
                 f"{rates[2]:.1f} GFLOP/s, one thread")
    every_candidate = load_config(bench.path, ["split.split=auto", "split.micro_batches=auto",
                                               "split.micro_sizes=auto"])
    verdicts = []
    for k in factors:
        slow = "{" + ", ".join(f"{u}: {k}" for u in range(DEVICES)) + "}"
        profile = copy.deepcopy(bench.profile)
        profile.slowdown = {u: float(k) for u in range(DEVICES)}
        fed = bench.run(["split.split=-1", "split.micro_batches=1", f"split.slowdown={slow}"])
        pick = choose(every_candidate, profile, bench.steps)
        lines.append(f"  k={k:<2} federated (split -1: the whole model on each device) epoch {fed['epoch']:5.2f} s; "
                     f"the planner (simulated, every split x M x sizing) picks split {pick.split}, "
                     f"M={pick.micro_batches} {pick.micro_sizes}")
        print(lines[-1], flush=True)
        for split in (1, 2):
            base = [f"split.split={split}", f"split.slowdown={slow}"]
            one = bench.run([*base, "split.micro_batches=1"])
            floor1 = epoch_floor(cfg, profile, split, 1, bench.steps, "even")
            sim1 = simulate_config(cfg, profile, split, 1, bench.steps, "even").seconds
            parts = []
            for sizing in ("even", "tapered"):
                four = bench.run([*base, "split.micro_batches=4", f"split.micro_sizes={sizing}"])
                floor = epoch_floor(cfg, profile, split, 4, bench.steps, sizing)
                sim = simulate_config(cfg, profile, split, 4, bench.steps, sizing).seconds
                speed, idle = one["epoch"] / four["epoch"], 1 - four["idle"] / one["idle"]
                parts.append(f"M=4 {sizing} {four['epoch']:5.2f} s: {speed:.2f}x " + targets(speed, idle, ", ")
                             + f", floor to floor {floor1 / floor:.2f}x, simulated {sim1 / sim:.2f}x")
                verdicts.append((k, split, sizing, speed, idle, fed["epoch"] / four["epoch"]))
                if sizing == "even":  # the baseline: every pass on the pipeline's one thread
                    off = bench.run([*base, "split.micro_batches=4", "split.preempt=false"])
                    sim_off = simulate_config(serial, profile, split, 4, bench.steps, sizing).seconds
                    parts.append(f"M=4 even without split.preempt {off['epoch']:5.2f} s: "
                                 f"{one['epoch'] / off['epoch']:.2f}x, simulated {sim1 / sim_off:.2f}x")
            lines.append(f"  k={k:<2} (devices at {rates[split] / k:4.1f} GFLOP/s) split {split}: M=1 "
                         f"{one['epoch']:5.2f} s (idle {one['idle']:5.2f} s); " + "; ".join(parts))
            print(lines[-1], flush=True)
    lines.append("  summary: M=4 against M=1 where M=4 also trains faster than federated training at the same k "
                 "(the regime PiPar targets: a split is worth running)")
    for k, split, sizing, speed, idle, over_fed in verdicts:
        if over_fed > 1:
            lines.append(f"    k={k:<2} split {split} M=4 {sizing:7s} {speed:.2f}x " + targets(speed, idle, ", ")
                         + f"; {over_fed:.2f}x faster than federated")
    if not any(v[-1] > 1 for v in verdicts):
        lines.append("    none: federated training was the fastest at every k")


def workers_row(bench: Bench) -> None:
    one = bench.run(["split.split=1", "split.micro_batches=4", "split.workers=1"])
    two = bench.run(["split.split=1", "split.micro_batches=4", "split.workers=2"])
    bench.lines += ["workers: split 1, M=4, one compute thread per node against two (the server computes for two "
                    "devices at once), runs one after the other",
                    f"  workers 1  {fmt(one)}", f"  workers 2  {fmt(two)}",
                    f"  two workers: the epoch {1 - two['epoch'] / one['epoch']:.1%} shorter"]


def sweep_rows(bench: Bench) -> dict:
    lines = bench.lines
    results = {}
    lines.append("sweep: every split x M (1f1b); epoch time and device idle")
    for split in (-1, 1, 2):
        for m in (1, 2, 4, 8, 16):
            r = bench.run([f"split.split={split}", f"split.micro_batches={m}"])
            results[(split, m)] = r
            lines.append(f"  split {split:>2} M={m:<2}  {fmt(r)}")
            print(lines[-1], flush=True)
    best_key = min(results, key=lambda k: results[k]["epoch"])
    best = results[best_key]
    auto = bench.run(["split.split=auto", "split.micro_batches=auto"])
    lines.append(f"  auto: chose split {auto['split']}, M={auto['micro']}; its run: {fmt(auto)}")
    same = results[(auto["split"], auto["micro"])]  # the sweep holds every choice the planner can make
    off = same["epoch"] / best["epoch"] - 1
    lines.append(f"  best of the sweep: split {best_key[0]}, M={best_key[1]}, epoch {best['epoch']:.2f} s; the "
                 f"automatic choice's epoch in the sweep {same['epoch']:.2f} s is {off:+.1%} from it")
    again = auto["epoch"] / same["epoch"] - 1
    lines.append(f"  the automatic run (profiling at launch, then the same split and M) took {again:+.1%} against "
                 f"the sweep's run of that choice: the run-to-run noise of one configuration")
    chosen = (auto["split"], auto["micro"])
    if chosen == best_key:
        lines.append("  verdict: the automatic choice is the sweep's best (target within 10 %: met)")
        return results
    epochs: dict = {chosen: [], best_key: []}
    for _ in range(2):
        for key in (chosen, best_key):
            epochs[key].append(bench.run([f"split.split={key[0]}", f"split.micro_batches={key[1]}"])["epoch"])
    mine, theirs = statistics.fmean(epochs[chosen]), statistics.fmean(epochs[best_key])
    off = mine / theirs - 1
    lines.append(f"  head to head, alternately: chosen (split {chosen[0]}, M={chosen[1]}) "
                 f"{', '.join(f'{e:.2f}' for e in epochs[chosen])} s, sweep's best (split {best_key[0]}, "
                 f"M={best_key[1]}) {', '.join(f'{e:.2f}' for e in epochs[best_key])} s; the choice is {off:+.1%} "
                 f"from the best (target within 10 %: {'met' if off <= 0.10 else 'NOT met'})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="links,pipeline,workers,sweep,devices")
    parser.add_argument("--width", type=int, default=32, help="channels of the VGG's first block")
    parser.add_argument("--samples", type=int, default=256, help="training samples per device (batch 32)")
    parser.add_argument("--widths", default="32,48,64", help="the ceiling row's VGG widths")
    parser.add_argument("--slowdowns", default="4,8,16,32", help="the devices row's factors k (devices k times slower)")
    parser.add_argument("--out", default=str(ROOT / "eval" / "bench" / "results" / "pipeline.txt"))
    args = parser.parse_args()
    rows = args.rows.split(",")
    load = os.getloadavg()
    steps = -(-args.samples // 32)
    lines = [f"# eval/bench/pipeline.py --rows {args.rows} --width {args.width} --samples {args.samples}, "
             f"{datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, {os.cpu_count()} cores, load average at start "
             f"{load[0]:.1f}",
             f"# workload: 4 devices + server, vgg width {args.width} on synthetic 3x32x32 ({args.samples} samples per "
             f"device, batch 32, {steps} steps an epoch), device links {UP} B/s up / {DOWN} B/s down, aggregation "
             f"each epoch"]
    bench = Bench(args.width, args.samples, lines)
    sweep = sweep_rows(bench) if "sweep" in rows else {}
    four = pipeline(bench, sweep) if "pipeline" in rows else None
    if "workers" in rows:
        workers_row(bench)
    if "links" in rows:
        links(bench, four)
    if "devices" in rows:
        devices_row(bench, [int(k) for k in args.slowdowns.split(",")])
    if "ceiling" in rows:
        ceiling_row([int(w) for w in args.widths.split(",")], args.samples, lines)
    lines.append(f"# load average at the end {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
