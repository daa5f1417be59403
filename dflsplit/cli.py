"""The `dflsplit` command: run experiments, generate graphs, plot results, check stage configs."""

from __future__ import annotations

import argparse
import logging
import sys

from . import cli_import, installed_version, reference


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run this machine's nodes of an experiment",
        description="Run the nodes of CONFIG that belong to this machine (run.machine_id), one process "
        "per node, and print the mean and spread of the nodes' final test accuracy.",
    )
    p.add_argument("config", help="YAML config (see eval/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set run.rounds=5; repeatable")
    p.add_argument("--unset", action="append", default=[], metavar="SECTION.KEY",
                   help="remove a key of the file, e.g. one only the implementation you replace takes; repeatable")
    p.add_argument("--machine-id", type=int, help="this machine's id (overrides run.machine_id)")
    p.add_argument("--out", help="results folder (default: <run.out_dir>/<run.name>-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from .config import load_config
    from .launch import run_experiment

    overrides = list(args.overrides)
    if args.machine_id is not None:
        overrides.append(f"run.machine_id={args.machine_id}")
    cfg = load_config(args.config, overrides, unset=args.unset)
    summary = run_experiment(cfg, args.out, progress=False if args.no_progress else None)
    n = summary["nodes"]
    print(
        f"{summary['name']}: {n} nodes, {summary['rounds']} rounds in {summary['wall_seconds']:.1f} s; "
        f"test accuracy mean {summary['test_acc_mean']:.4f} ± {summary['test_acc_std']:.4f} (std over nodes)"
    )
    print(f"results: {summary['run_dir']}  (plot with: dflsplit plot {summary['run_dir']})")
    return 0


def _add_check(sub) -> None:
    p = sub.add_parser("check-config", help="validate a config and print it with every default filled in",
                       description="Validate CONFIG (every key against the implementation that takes it, and "
                       "the topology it asks for) and print the full configuration.")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--unset", action="append", default=[], metavar="SECTION.KEY", help="remove a key of the file")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args) -> int:
    import yaml

    from .config import load_config

    from .node import NODES

    cfg = load_config(args.config, args.overrides, unset=args.unset)
    NODES.get(cfg.node.name).topology(cfg)  # a graph the run cannot have is a config error too
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _add_plot(sub) -> None:
    from .plot import add_plot_arguments, run_plot

    p = sub.add_parser("plot", help="turn a run folder into CSV and PNG",
                       description="Write <RUN_DIR>/metrics.csv and PNG plots of accuracy and loss "
                       "against round and against bytes (mean ± std over nodes).")
    add_plot_arguments(p)
    p.set_defaults(func=run_plot)


def _add_generate_graph(sub) -> None:
    from .cli_graph import add_generate_graph_arguments, run_generate_graph

    p = sub.add_parser("generate-graph", help="write a topology file (.edges or .adj)",
                       description="Generate a topology and write it in decentralizepy's .edges or .adj format.")
    add_generate_graph_arguments(p)
    p.set_defaults(func=run_generate_graph)


def _add_stages(sub) -> None:
    from .cli_stages import add_stages_arguments, run_stages

    p = sub.add_parser("stages", help="check a split-learning stage configuration and show its edges",
                       description="Validate a stage configuration (.py, .env or dflsplit .yaml) and print "
                       "its runner matrix, edges and replicas, or every violation.")
    add_stages_arguments(p)
    p.set_defaults(func=run_stages)


def _add_keys(sub) -> None:
    p = sub.add_parser(
        "keys", help="write CURVE key pairs that authenticate and encrypt the control plane",
        description="Write node_<uid>.key (public) and node_<uid>.key_secret for nodes 0..N-1 into "
        "FOLDER, then set communication.curve_keys: FOLDER. Every machine needs all public keys "
        "and the secret keys of its own nodes.",
    )
    p.add_argument("folder")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes in the run")
    p.add_argument("--overwrite", action="store_true", help="replace existing keys")
    p.set_defaults(func=_cmd_keys)


def _cmd_keys(args) -> int:
    from .communication.keys import write_keys

    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    written = write_keys(args.folder, args.nodes, overwrite=args.overwrite)
    print(f"wrote {len(written) // 2} key pairs to {args.folder}; set communication.curve_keys: {args.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflsplit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"dflsplit {installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_run, _add_check, _add_generate_graph, _add_plot, _add_stages, _add_keys,
                reference.add_parser, cli_import.add_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"dflsplit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
