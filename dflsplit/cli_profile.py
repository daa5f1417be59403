"""``dflsplit profile``: measure a split-learning run's partitions and links, and choose its
pipeline (device/server split and micro-batches) by simulating it.

    dflsplit profile CONFIG [--set SECTION.KEY=VALUE] [--slowdown UID=FACTOR] [--offload]

Prints each partition's forward, backward and update time per micro-batch size, the bytes
at each cut, each distinct link (configured and measured), then one simulated epoch per
candidate (``split`` x ``micro_batches`` x ``micro_sizes``: the ones the config sets to
``auto``, else its own values) beside its floor (the least time any exact schedule could
take) and the choice, the one with the shortest epoch; ``auto`` in the config makes the
same choice at launch. The simulation slows each node by its ``split.slowdown`` (which the
run emulates); ``--slowdown 3=4`` makes node 3's compute 4 times slower than measured
instead, in the simulation only (nodes of one machine share its measurement).
``--offload`` also prints a stage configuration for the run's clients that places the
middle partitions on the clients that finish them first, checked by the stage validator.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", metavar="CONFIG", help="a dflsplit config of a split-learning run")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a config key (repeatable), e.g. --set split.split=auto")
    parser.add_argument("--slowdown", metavar="UID=FACTOR", action="append", default=[],
                        help="node UID computes FACTOR times slower than measured, in the simulation only "
                             "(repeatable; instead of its split.slowdown)")
    parser.add_argument("--offload", action="store_true",
                        help="print an offloading stage configuration for the run's clients")
    return parser


def _err(msg: str) -> int:
    print(f"dflsplit profile: error: {msg}", file=sys.stderr)
    return 2


def run_profile(args: argparse.Namespace) -> int:
    """Run ``dflsplit profile`` with parsed `args`; returns the exit status."""
    from dflsplit.config import ConfigError, load_config
    from dflsplit.datasets import prepare_dataset
    from dflsplit.mappings.stages import StageConfigError, StageMapping
    from dflsplit.node.split import steps_per_epoch
    from dflsplit.node.split_profile import choose, plan_offloading, profile_run

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _err(str(e))
    if cfg.node.name != "split":
        return _err(f"{args.config}: node.name is {cfg.node.name!r}; profiling is for split learning "
                    f"(node.name: split)")
    slowdown = {}
    for item in args.slowdown:
        try:
            uid, factor = item.split("=", 1)
            slowdown[int(uid)] = float(factor)
        except ValueError:
            return _err(f"--slowdown {item!r}: expected UID=FACTOR, e.g. 3=4")
        if not 0 <= int(uid) < cfg.num_nodes or float(factor) <= 0:
            return _err(f"--slowdown {item!r}: node uid in 0..{cfg.num_nodes - 1} and a factor > 0 expected")
    dataset = prepare_dataset(cfg)
    print(f"profiling {args.config}: model {cfg.model.name!r}, batch {cfg.training.batch_size}, "
          f"{cfg.num_nodes} nodes ...", flush=True)
    profile = profile_run(cfg, dataset, slowdown)
    P = profile.partitions
    print(f"\ncompute (ms; median of {cfg.split.profile_repeats} after a warm-up, {profile.threads} torch "
          f"thread(s), the nodes share {profile.cores} core(s)):")
    print("  samples " + "".join(f"{'F' + str(p):>8}{'B' + str(p):>8}" for p in range(1, P + 1)))
    for n in sorted(profile.fwd):
        cells = "".join(f"{profile.fwd[n][p] * 1e3:8.2f}{profile.bwd[n][p] * 1e3:8.2f}" for p in range(P))
        print(f"  {n:>7} {cells}")
    print("  update  " + "".join(f"{'':8}{u * 1e3:8.3f}" for u in profile.update))
    print("\ncuts (bytes per sample of partition p's output: its activation forward, its gradient back) and "
          "weights (bytes of replica sync):")
    for p in range(1, P + 1):
        print(f"  partition {p}: output {profile.out_bytes[p - 1]:>9} B/sample, "
              f"weights {profile.param_bytes[p - 1]:>10} B")
    print("\nlinks (bytes/s; configured cap, 0 = none; measured on loopback through the rate limiters):")
    seen = {}
    for uid, link in sorted(profile.links.items()):
        seen.setdefault((link.up_cap, link.down_cap), []).append(uid)
    for (up, down), uids in seen.items():
        link = profile.links[uids[0]]
        print(f"  nodes {','.join(map(str, uids)):<12} up cap {up:>10} measured {link.up:14.0f}   "
              f"down cap {down:>10} measured {link.down:14.0f}")
    try:
        epoch = steps_per_epoch(cfg, dataset)
        choice = choose(cfg, profile, epoch)
    except StageConfigError as e:
        return _err(str(e))
    print(f"\nsimulated epoch ({epoch} steps; schedule {cfg.split.schedule}, {cfg.split.order} order, "
          f"{cfg.split.workers} worker(s) per node):")
    print(f"  {'split':>5} {'micro':>5} {'sizes':>7} {'epoch s':>9} {'device idle s':>14} {'floor s':>9}")
    chosen = (choice.split, choice.micro_batches, choice.micro_sizes)
    for row in choice.table:
        split = "-" if row["split"] is None else row["split"]
        mark = "  <- chosen" if (row["split"], row["micro_batches"], row["micro_sizes"]) == chosen else ""
        floor = "-" if row["floor_seconds"] is None else f"{row['floor_seconds']:.2f}"
        print(f"  {split:>5} {row['micro_batches']:>5} {row['micro_sizes']:>7} {row['epoch_seconds']:9.2f} "
              f"{row['device_idle_seconds']:14.2f} {floor:>9}{mark}")
    print("  (floor: the least time any exact schedule could take, device/server splits only)")
    what = f"micro_batches: {choice.micro_batches}, micro_sizes: {choice.micro_sizes}"
    if choice.split is not None:
        what = f"split: {choice.split}, " + what
    print(f"choice: {what}")
    if args.offload:
        rows = plan_offloading(profile, cfg.num_nodes, choice.micro_batches)
        print(f"\noffloading plan for {cfg.num_nodes} clients (earliest finish time; slowdowns "
              f"{profile.slowdown or 'none'}):")
        print("split:\n  stages:")
        for row in rows:
            print("    - [" + ", ".join(f"'{x}'" for x in row) + "]")
        try:
            StageMapping(rows, P, strict_order=True)
        except StageConfigError as e:
            print(f"the stage validator refuses it:\n{e}")
            return 1
        print("the stage validator accepts it (rules 1-6, strict order)")
    return 0


def profile_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dflsplit profile", description=__doc__.split("\n\n")[0])
    add_profile_arguments(parser)
    return run_profile(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(profile_main())
