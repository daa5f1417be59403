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
    p.add_argument("--machine-id", help="this machine's id (overrides run.machine_id), or 'auto': the machine of "
                   "the ip file whose host is this one (the default when the run has several machines; under "
                   "SLURM, SLURM_NODEID)")
    p.add_argument("--ip-file", help="JSON file of machine id -> host (sets run.ip_file, and run.machines to its "
                   "number of entries unless the config or --set gives run.machines)")
    p.add_argument("--out", help="the run folder (default: <run.out_dir>/<run.name>-<run id>); this machine "
                   "writes into its machine_<id>/ subfolder")
    p.add_argument("--overwrite", action="store_true", help="replace this machine's results in an existing run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its nodes' checkpoints (run.checkpoint_every): every machine "
                   "restarted (they meet at the start barrier again), or with --nodes only those nodes, which "
                   "rejoin the run that goes on without them")
    p.add_argument("--nodes", help="with --resume: the uids of this machine's nodes to restart, e.g. 3,7")
    p.add_argument("--no-slurm", action="store_true",
                   help="ignore SLURM_JOB_NODELIST / SLURM_NODEID (by default they give the machines and this id)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)


def run_overrides(args, environ=None) -> list[str]:
    """The `--set` overrides of `dflsplit run` with the machine options folded in: the ip
    file, the machine count it implies, SLURM's hosts and node id, the machine id (given,
    or found among the ip file's hosts), and DEBUG logging for -v."""
    import os

    import yaml

    from .config import ConfigError, load_config
    from .mappings import read_ip_file
    from .mappings.hosts import local_machine_id, slurm_hosts

    environ = os.environ if environ is None else environ
    overrides = list(args.overrides)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    try:
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        data = {}  # load_config reports it
    in_file = {f"{sec}.{k}" for sec, body in data.items() if isinstance(body, dict) for k in body} \
        if isinstance(data, dict) else set()
    machines_given = "run.machines" in given or "run.machines" in in_file
    hosts = None
    if args.ip_file:
        path = os.path.abspath(args.ip_file)
        hosts = read_ip_file(path)
        overrides.append(f"run.ip_file={path}")
    slurm = None if args.no_slurm or args.ip_file or "run.hosts" in given else slurm_hosts(environ)
    if slurm is not None:
        hosts, slurm_id = slurm
        overrides.append("run.hosts=" + yaml.safe_dump(hosts, default_flow_style=True).strip())
    if hosts is not None and not machines_given:
        overrides.append(f"run.machines={len(hosts)}")
    machine = args.machine_id
    if machine is None and slurm is not None:
        machine = str(slurm_id)
    if machine is None:
        cfg = load_config(args.config, overrides, unset=args.unset) if hosts is None else None
        several = (cfg.run.machines > 1) if cfg is not None else len(hosts) > 1
        if several and "run.machine_id" not in given and "run.machine_id" not in in_file:
            machine = "auto"
    if machine == "auto":
        if hosts is None:
            cfg = load_config(args.config, overrides, unset=args.unset)
            if cfg.run.ip_file is None and cfg.run.hosts is None:
                raise ConfigError("--machine-id auto needs an ip file (--ip-file or run.ip_file) or run.hosts")
            from .mappings import LinearMapping

            hosts = LinearMapping.from_config(cfg).hosts
        machine = str(local_machine_id(hosts, args.ip_file or "the run's hosts"))
    if machine is not None:
        try:
            overrides.append(f"run.machine_id={int(machine)}")
        except ValueError:
            raise ConfigError(f"--machine-id: expected a number or 'auto', got {machine!r}") from None
    if getattr(args, "verbose", False):
        overrides.append("run.log_level=DEBUG")
    return overrides


def _cmd_run(args) -> int:
    from .config import load_config
    from .launch import run_experiment

    cfg = load_config(args.config, run_overrides(args), unset=args.unset)
    nodes = None
    if args.nodes:
        try:
            nodes = [int(u) for u in args.nodes.split(",") if u.strip()]
        except ValueError:
            raise ValueError(f"--nodes: expected uids separated by commas, e.g. 3,7; got {args.nodes!r}") from None
    summary = run_experiment(cfg, args.out, progress=False if args.no_progress else None,
                             overwrite=args.overwrite, resume=args.resume, nodes=nodes)
    if summary.get("rejoined"):
        print(f"{summary['name']}: node(s) {summary['rejoined']} rejoined run {summary['run_id']} and finished; "
              f"results: {summary['machine_dir']}")
        return 0
    n = summary["nodes"]
    where = "" if summary["machines"] == 1 else (
        f" (machine {summary['machine_id']} of {summary['machines']})" if summary["machine_id"] else
        f" on {summary['machines']} machines")
    print(
        f"{summary['name']}: {n} nodes{where}, {summary['rounds']} rounds in {summary['wall_seconds']:.1f} s; "
        f"test accuracy mean {summary['test_acc_mean']:.4f} ± {summary['test_acc_std']:.4f} (std over nodes)"
    )
    print(f"results: {summary['run_dir']}  (plot with: dflsplit plot {summary['run_dir']})")
    if summary.get("failed_nodes"):
        print(f"{len(summary['failed_nodes'])} node(s) failed and the others went on: "
              f"{', '.join(summary['failed_nodes'])} (run.on_peer_failure: skip)")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge copies of one run's folders from several machines into one",
        description="Copy every machine_<id>/ folder found in RUN... into OUT (default: the first RUN) and "
        "write OUT/summary.json covering every node, as machine 0 does at the end of a run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or machine_<id> folders) of one run")
    p.add_argument("--out", help="where to merge (default: the first RUN)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from .results import merge_runs

    summary = merge_runs(args.runs, args.out)
    missing = f"; machines missing: {summary['machines_missing']}" if summary["machines_missing"] else ""
    print(f"{summary['run_dir']}: {summary['nodes']} nodes of {summary['machines']} machines{missing}; "
          f"test accuracy mean {summary['test_acc_mean']:.4f} ± {summary['test_acc_std']:.4f}")
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

    p = sub.add_parser("plot", help="compare runs: accuracy and loss as PNG and CSV",
                       description="Plot accuracy and loss of one or more runs against round, bytes per "
                       "node and wall time (mean ± std over nodes, one curve per run), with the CSV "
                       "behind each figure and each run's metrics.csv.")
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


def _add_profile(sub) -> None:
    from .cli_profile import add_profile_arguments, run_profile

    p = sub.add_parser("profile", help="measure a split-learning run and choose its split and micro-batches",
                       description="Measure each partition's forward and backward time, the bytes at each cut and "
                       "the links, simulate one epoch per candidate (device/server split x micro-batches) and print "
                       "the table and the choice (what split: auto and micro_batches: auto pick at launch).")
    add_profile_arguments(p)
    p.set_defaults(func=run_profile)


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
    for add in (_add_run, _add_check, _add_merge, _add_generate_graph, _add_plot, _add_stages, _add_profile, _add_keys,
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
    except KeyboardInterrupt:
        print(f"dflsplit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        from .launch import RunInterrupted

        if isinstance(e, RunInterrupted):
            print(f"dflsplit {args.command}: {e}", file=sys.stderr)
            return 130
        print(f"dflsplit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
