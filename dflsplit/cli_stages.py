"""``dflsplit stages``: check a split-learning stage configuration and show what it implies.

    dflsplit stages FILE [--model NAME | --partitions P] [--index K] [--dot OUT]
                         [--import-env OUT.yaml] [--relaxed-order | --strict-order]
                         [--schedule NAME] [--micro-batches M]

FILE is a ``.py`` file (``STAGES_CLIENTS = [...]``, read, never run), a Deeplopito
``.env`` file, or a dflsplit ``.yaml`` config (its ``split.stages``, or the device/server
layout of ``split.server``). Prints the summary (runner matrix, edges, replicas) and the
dry run of the pipeline schedule (a step without and one with replica sync, every client
symbolically), and exits 0; prints every rule violation, or what waits for what when the
dry run deadlocks, and exits 1; exits 2 when FILE cannot be read. With ``--schedule`` it
also prints the action table of each client (the step that syncs). Without
``--model``/``--partitions`` the model comes from the file when it names one (YAML
``model``, .env ``CURRENT_MODEL``), else the partition count is inferred from the
configuration and not checked. A YAML config gives the schedule, micro-batches, order
and sync; the flags override them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dflsplit.mappings.stages import (
    DEEPLOPITO_MODELS,
    StageConfigError,
    StageMapping,
    import_deeplopito_env,
    load_stages,
    read_env,
    stage_config_locations,
    write_config_yaml,
)

#: Partition counts of the built-in models, used until the models layer declares them.
MODEL_PARTITIONS = {"cnn": 4, "lenet": 4, "resnet18": 10}


def model_partitions(name: str) -> int:
    """P of model ``name``: ``dflsplit.models.MODELS.get(name).num_partitions`` when the
    models layer declares it, else ``MODEL_PARTITIONS``; StageConfigError otherwise."""
    try:
        from dflsplit.models import MODELS  # the CLI sits above the layers; imported lazily
    except ImportError:
        MODELS = None
    if MODELS is not None and name in MODELS:
        n = getattr(MODELS.get(name), "num_partitions", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    if name in MODEL_PARTITIONS:
        return MODEL_PARTITIONS[name]
    raise StageConfigError(
        f"model {name!r} has no fixed partition count; give --partitions P "
        f"(models with one: {', '.join(sorted(MODEL_PARTITIONS))})")


def add_stages_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dflsplit stages`` arguments to ``parser``."""
    parser.add_argument("file", metavar="FILE", help="stage configuration: .py, .env or dflsplit .yaml")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME", help="model whose partition count 2P must match (rule 5)")
    which.add_argument("--partitions", metavar="P", type=int, help="the model's partition count P")
    parser.add_argument("--index", metavar="K", type=int, default=None,
                        help="which configuration of a file holding several (0-based; default 0)")
    parser.add_argument("--dot", metavar="OUT", help="write the client graph as Graphviz to OUT")
    parser.add_argument("--import-env", metavar="OUT.yaml", dest="import_env",
                        help="convert a Deeplopito .env FILE into a dflsplit config at OUT.yaml")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--relaxed-order", dest="order", action="store_const", const="relaxed",
                       help="rule 6 for a runtime that runs any ready task (rows are priorities only; a YAML "
                            "config's split.order by default, else strict)")
    order.add_argument("--strict-order", dest="order", action="store_const", const="strict",
                       help="rule 6 for a runtime that runs its rows in order")
    parser.add_argument("--schedule", metavar="NAME", help="print each client's action table for this schedule "
                                                           "(gpipe, 1f1b)")
    parser.add_argument("--micro-batches", metavar="M", type=int, dest="micro_batches",
                        help="micro-batches per step of the dry run and the table (default: the config's, or 1)")
    return parser


def _err(msg: str) -> int:
    print(f"dflsplit stages: error: {msg}", file=sys.stderr)
    return 2


def _env_model(path: Path) -> Optional[str]:
    for key, value, _ in reversed(read_env(path)):
        if key.upper() == "CURRENT_MODEL":
            return DEEPLOPITO_MODELS.get(value.strip().lower(), value.strip().lower())
    return None


def run_stages(args: argparse.Namespace) -> int:
    """Run ``dflsplit stages`` with parsed ``args``; returns the exit status."""
    path = Path(args.file)
    suffix = path.suffix.lower()
    is_yaml = suffix in (".yaml", ".yml")
    index = 0 if args.index is None else args.index
    model, partitions, imported, cfg = args.model, args.partitions, None, None
    order = getattr(args, "order", None)
    try:
        if args.import_env:
            if is_yaml or suffix == ".py":
                return _err(f"--import-env reads a Deeplopito .env file, not {path}")
            from dflsplit.config import ConfigError, config_from_dict

            imported = import_deeplopito_env(path, index)
            try:
                config_from_dict(imported, source=f"{args.import_env} (imported from {path})")
            except ConfigError as e:
                return _err(str(e))
        if is_yaml and isinstance(_yaml_top(path), dict):
            from dflsplit.config import ConfigError, load_config
            from dflsplit.mappings.stages import stages_from_config

            if args.index is not None:
                return _err("--index chooses among configurations of a .py or .env file; "
                            "in a YAML config use split.stages_index")
            try:
                cfg = load_config(path)
            except ConfigError as e:
                return _err(str(e))
            if model is None and partitions is None:
                partitions = getattr(cfg.model, "partitions", None)
                if partitions is None and _has_partitions(cfg.model.name):
                    model = cfg.model.name
            if model is not None:
                partitions = model_partitions(model)
            if cfg.split.server is not None and cfg.split.split == "auto":
                print("note: split.split is auto: the profiler chooses it at launch (dflsplit profile CONFIG "
                      "shows its choice); checking split=1")
                cfg.split.split = 1
            rows, source = stages_from_config(cfg, partitions)
            if len(rows) != cfg.num_nodes:
                return _err(f"{source}: {len(rows)} rows but the run has {cfg.num_nodes} nodes "
                            "(run.machines x run.procs_per_machine); one row per node expected")
            order = order or cfg.split.order
        else:
            rows = load_stages(path, index)
            where = stage_config_locations(path)
            source = where[index]
            if len(where) > 1:
                print(f"note: {path} holds {len(where)} stage configurations "
                      f"({', '.join(where)}); checking index {index} (--index K chooses)")
            if model is None and partitions is None and not is_yaml and suffix != ".py":
                env_model = _env_model(path)
                if env_model is not None and _has_partitions(env_model):
                    model = env_model
        if model is not None:
            partitions = model_partitions(model)
        if partitions is not None:
            by = f"model {model!r}" if model is not None else "the given partition count"
            print(f"checking against {by}: P={partitions} partitions ({2 * partitions} stages)")
        else:
            print("note: no model given (--model NAME or --partitions P): the partition count is "
                  "inferred from the configuration, not checked against a model")
        order = order or "strict"
        mapping = StageMapping(rows, partitions, None, strict_order=order == "strict", source=source)
    except StageConfigError as e:
        if e.errors:
            print(e)
            if imported is not None:
                print(f"{args.import_env} not written: fix the stage configuration first")
            return 1
        return _err(str(e))
    print(mapping.summary())
    status = _dry_run(mapping, cfg, args, order)
    if status:
        return status
    if imported is not None:
        write_config_yaml(imported, args.import_env)
        print(f"wrote {args.import_env} (imported from {path})")
    if args.dot:
        Path(args.dot).write_text(mapping.to_dot())
        print(f"wrote {args.dot}")
    return 0


def _dry_run(mapping: StageMapping, cfg, args: argparse.Namespace, order: str) -> int:
    """Dry-run the schedule (two steps: without and with replica sync); print the table
    with --schedule. 0, or 1 when it deadlocks, 2 for a bad option."""
    from dflsplit.node.split_schedule import SCHEDULES, PipelineSchedule, ScheduleDeadlock, SplitPlan, dry_run

    name = args.schedule or (cfg.split.schedule if cfg is not None else "gpipe")
    if name not in SCHEDULES:
        return _err(f"--schedule: unknown schedule {name!r}; known: {', '.join(SCHEDULES.names())}")
    micro = args.micro_batches
    if micro is None:
        micro = cfg.split.micro_batches if cfg is not None else 1
        if micro == "auto":
            print("note: split.micro_batches is auto: the profiler chooses it at launch; showing 4")
            micro = 4
    if micro < 1:
        return _err(f"--micro-batches: expected a positive integer, got {micro}")
    sync, trainers, hub = "fedavg", None, None
    if cfg is not None:
        from dflsplit.node.split import sync_settings, trainers_of

        sync, trainers = sync_settings(cfg)[0], trainers_of(cfg)
        hub = cfg.split.server + 1 if cfg.split.server is not None else None
    plans = {c: SplitPlan(mapping, c, micro, sync, 2, schedule=name, strict=order == "strict", trainers=trainers,
                          hub=hub)
             for c in range(1, mapping.num_clients + 1)}
    schedule = PipelineSchedule(plans)
    try:
        ran = dry_run(schedule, 2)
    except ScheduleDeadlock as e:
        print(f"dry run of schedule {name!r} ({micro} micro-batches, {order} order): {e}")
        return 1
    per_client = ", ".join(f"{c}: {len(a)}" for c, a in sorted(ran.items()))
    print(f"dry run: schedule {name!r}, {micro} micro-batch{'es' if micro != 1 else ''}, {order} order, sync "
          f"{sync}: 2 steps complete on every client (actions per client {per_client})")
    if args.schedule:
        print("action table of step 1 (the step that syncs replicas; F forward, B backward, ->c / <-c send to / "
              "receive from client c an activation (a) or gradient (g) of task o_s, #m micro-batch):")
        print(schedule.table(1))
    return 0


def _yaml_top(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # the loader reports it with its file name


def _has_partitions(name: str) -> bool:
    try:
        model_partitions(name)
    except StageConfigError:
        return False
    return True


def stages_main(argv: Optional[list[str]] = None) -> int:
    """Entry point: ``python -m dflsplit.cli_stages FILE ...``."""
    parser = argparse.ArgumentParser(prog="dflsplit stages", description=__doc__.split("\n\n")[0])
    add_stages_arguments(parser)
    return run_stages(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(stages_main())
