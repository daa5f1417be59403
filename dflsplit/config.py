"""Experiment configuration: YAML with one section per layer, validated into dataclasses.

Every key is checked on load. An unknown key is an error that names the file, the
section, the key, the valid keys and the closest match; a value of the wrong type
names the expected type; a missing required key is named.

>>> cfg = load_config("eval/configs/default.yaml")          # doctest: +SKIP
>>> cfg = load_config(path, overrides=["run.rounds=5"])     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .registry import bounds_text, key, out_of_bounds


class ConfigError(ValueError):
    """A configuration problem; the message names the file, section/key and what was expected."""


class Section:
    """A config section: its common keys are dataclass fields; the keys of the chosen
    implementation (``name``) live in `options`, an instance of that implementation's
    keys dataclass (see ``dflsplit.registry.key``), and read as attributes of the section:
    ``cfg.sharing.alpha`` is ``cfg.sharing.options.alpha``."""

    SECTION: str = ""

    @property
    def options(self) -> Any:
        """The chosen implementation's keys (its defaults when the loader did not set them)."""
        opts = self.__dict__.get("_options")
        if opts is None or self.__dict__.get("_options_for") != self.name:
            keys_cls = implementation_keys(self.SECTION, self.name)
            opts = keys_cls() if keys_cls is not None else None
            self.__dict__["_options"], self.__dict__["_options_for"] = opts, self.name
        return opts

    def set_options(self, options: Any) -> None:
        self.__dict__["_options"], self.__dict__["_options_for"] = options, self.name

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("options", "SECTION"):
            raise AttributeError(name)
        opts = self.options
        if opts is not None and name in {f.name for f in dataclasses.fields(opts)}:
            return getattr(opts, name)
        impl = getattr(self, "name", "?")
        raise AttributeError(f"section {self.SECTION!r}: {self.SECTION} {impl!r} has no key {name!r}")


@dataclass
class RunConfig:
    """Experiment-wide settings and the process mapping (uid = machine_id × procs_per_machine + rank)."""

    name: str = key("run", "name of the run: the prefix of its results folder")
    seed: int = key(1, "seed of partitions, initial weights, batch sampling and generated graphs")
    rounds: int = key(20, "communication rounds", gt=0)
    out_dir: str = key("runs", "folder under which each run's results folder is made")
    machines: int = key(1, "machines in the run", gt=0)
    procs_per_machine: int = key(16, "nodes per machine", gt=0)
    nodes_per_process: int = key(1, "nodes one OS process hosts (threads sharing a libtorrent session, a ZeroMQ "
                                    "context and the imported libraries); results do not depend on it", ge=1)
    machine_id: int = key(0, "this machine's id, 0..machines-1", ge=0)
    ip_file: Optional[str] = key(None, "JSON file of machine id -> host (decentralizepy's ip.json); needed when "
                                       "machines > 1 unless hosts is set")
    hosts: Optional[dict[int, str]] = key(None, "machine id -> host, instead of ip_file (set from SLURM's node list)")
    base_port: int = key(21000, "first port; node uid listens on base_port + 2·uid (+1); the run's coordinator on "
                                "machine 0 uses the port after the nodes' ports", ge=1024, le=65000)
    start_timeout: float = key(
        120.0, "seconds for the start barrier: every machine joins and every node completes its handshakes", gt=0)
    on_peer_failure: Literal["fail", "skip"] = key(
        "fail", "a peer's message that does not come by the round's deadline: fail the node, or skip: go on "
                "with what arrived (weights renormalised)")
    silent_rounds: int = key(2, "with skip: rounds a neighbour may miss before it is dropped from the view "
                                "(until it rejoins)", ge=1)
    checkpoint_every: int = key(0, "rounds between checkpoints of each node (0: none; the last round is always "
                                   "checkpointed when set); --resume continues from them", ge=0)
    crash: dict[int, int] = key(doc="failure injection: node uid -> round at whose start it kills itself (SIGKILL)",
                                factory=dict)
    absent: dict[int, list[int]] = key(doc="failure injection: node uid -> [first, last] rounds it sits out, as a "
                                           "node killed and resumed would", factory=dict)
    device: Literal["auto", "cpu", "cuda"] = key("auto", "torch device; auto: cuda when available, else cpu")
    threads_per_proc: int = key(0, "torch threads per node (0: cores / procs_per_machine)", ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = key("INFO", "level of the node logs (node_<uid>.log)")
    progress: bool = key(True, "show a progress bar over rounds")


@dataclass
class DatasetConfig(Section):
    """Which data, where it lives, and how it is split among nodes."""

    SECTION = "dataset"
    name: str = key("digits", "which dataset")
    root: Optional[str] = key(None, "folder holding the dataset's files (digits and synthetic need none)")
    partition: Literal["iid", "dirichlet", "shard", "contiguous"] = key(
        "iid", "how the training set is split among nodes (deterministic for run.seed)")
    alpha: float = key(0.5, "Dirichlet concentration (partition: dirichlet)", gt=0)
    shards_per_node: int = key(2, "label shards per node (partition: shard)", ge=1)
    test: Literal["global", "local"] = key(
        "global", "global: every node tests on the whole test set; local: on its own share of it")
    test_fraction: float = key(0.2, "share of a dataset without a test split held out for testing", gt=0, lt=1)
    max_test: Optional[int] = key(None, "at most this many test samples per node", ge=1)


@dataclass
class ModelConfig(Section):
    """Network architecture; input shape and class count come from the dataset."""

    SECTION = "model"
    name: str = key("cnn", "which network")


@dataclass
class OptimizerConfig(Section):
    """The local optimizer of each node."""

    SECTION = "optimizer"
    name: str = key("sgd", "which optimizer")
    lr: float = key(0.05, "learning rate", gt=0)
    weight_decay: float = key(0.0, "L2 penalty", ge=0)


@dataclass
class TrainingConfig(Section):
    """Local optimisation: either `local_steps` mini-batches or `local_epochs` passes per round.

    `eval_batch_size`: batches of 64 keep a small CNN's activations in cache (LeNet on
    32×32 images evaluated ~20% faster than with 200, and with less memory).
    """

    SECTION = "training"
    name: str = key("local_sgd", "local training algorithm")
    batch_size: int = key(32, "mini-batch size", gt=0)
    local_steps: Optional[int] = key(10, "mini-batches per round", gt=0)
    local_epochs: Optional[float] = key(None, "passes over the shard per round", gt=0)
    eval_batch_size: int = key(64, "evaluation batch size", gt=0)


@dataclass
class SharingConfig(Section):
    """What of the model is sent and how received models are combined."""

    SECTION = "sharing"
    name: str = key("full", "what of the model is sent each round")
    aggregator: typing.Union[str, list[str]] = key(
        "mixing", "an aggregator, or a list of pre-aggregators ending in one, e.g. [nnm, trimmed_mean]")

    @property
    def aggregation_keys(self) -> dict[str, Any]:
        """The keys of the aggregation chain's rules (e.g. f, m), with their defaults."""
        keys = self.__dict__.get("_aggregation_keys")
        if keys is None or self.__dict__.get("_aggregation_for") != self.aggregator:
            keys = {name: f.default for name, (f, _, _) in aggregation_fields(self.aggregator).items()
                    if f.default is not dataclasses.MISSING}
            self.set_aggregation_keys(keys)
        return keys

    def set_aggregation_keys(self, keys: dict[str, Any]) -> None:
        self.__dict__["_aggregation_keys"], self.__dict__["_aggregation_for"] = keys, self.aggregator


def aggregation_fields(chain: Any) -> dict[str, tuple[dataclasses.Field, Any, str]]:
    """key → (field, type, rule) over the rules of an aggregation chain (the first rule that
    declares a key defines it). Raises KeyError for an unknown rule."""
    from .sharing.aggregators import AGGREGATORS, PRE_AGGREGATORS, split_chain

    pre, last = split_chain(chain)
    out: dict[str, tuple[dataclasses.Field, Any, str]] = {}
    for registry, name in [*((PRE_AGGREGATORS, p) for p in pre), (AGGREGATORS, last)]:
        cls = registry.keys_of(name)
        if cls is None:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (f, hints[f.name], f"{registry.kind} {name!r}"))
    return out


@dataclass
class CommunicationConfig(Section):
    """Transport and link settings. Rates are bytes per second, 0 = unlimited.

    `curve_keys` is a folder written by `dflsplit keys`; when set, the control plane is
    authenticated and encrypted with CURVE.
    """

    SECTION = "communication"
    name: str = key("torrent", "transport of the tensors")
    timeout: float = key(120.0, "seconds a round waits for its peers' messages (one deadline for all of them)", gt=0)
    hello_timeout: float = key(60.0, "seconds to wait for the peers' HELLO at start", gt=0)
    upload_limit: int = key(0, "upload cap in bytes/s (0: none)", ge=0)
    download_limit: int = key(0, "download cap in bytes/s (0: none)", ge=0)
    curve_keys: Optional[str] = key(None, "folder of CURVE keys (dflsplit keys): authenticate and encrypt the control plane")
    max_message_bytes: int = key(
        256 << 20, "largest control-plane frame, and largest payload under a key whose receiver declared no size",
        ge=1024)
    max_queue: int = key(1000, "messages a node buffers per peer socket, and in its mailbox, before dropping", ge=1)
    node_limits: dict[int, list[int]] = key(
        doc="node uid -> [upload, download] caps in bytes/s for that node (0: none), instead of upload_limit and "
            "download_limit", factory=dict, ge=0)


@dataclass
class NodeConfig(Section):
    """Node algorithm and evaluation schedule."""

    SECTION = "node"
    name: str = key("dpsgd", "node algorithm")
    test_after: int = key(10, "evaluate every this many rounds (and after the last)", gt=0)
    eval_train: bool = key(False, "also evaluate on the node's training shard (train_eval_loss, train_acc)")
    save_model: bool = key(False, "write each node's final model to model_<uid>.safetensors in the run folder")


@dataclass
class GraphConfig:
    """Topology: a generator (`type` + its parameters) or a decentralizepy file (`file`).

    `dynamic: true` draws a fresh random `degree`-regular graph every round from the run
    seed and the round (every node derives the same graph without asking anyone);
    `mixing` names the averaging weights (recomputed per round when the graph changes).
    """

    type: str = key("regular", "topology generator (when no file is given)")
    degree: int = key(4, "degree of a regular graph", ge=1)
    file: Optional[str] = key(None, "decentralizepy .edges or .adj topology file, instead of a generator")
    p: float = key(0.1, "rewiring / edge probability", ge=0, le=1)
    k: int = key(4, "ring neighbours in small_world", ge=2)
    seed: Optional[int] = key(None, "seed of a generated graph (default: run.seed)")
    dynamic: bool = key(False, "a fresh random degree-regular graph every round, from run.seed and the round")
    mixing: str = key("metropolis_hastings", "averaging weights of a node and its neighbours")


@dataclass
class SplitConfig:
    """Split learning: the stage configuration, the pipeline schedule, and how replicas are synchronised.

    The stage configuration is given (`stages` or `stages_file`) or generated: with `server`
    set, PiPar's device/server layout, where every other node is a device that keeps its
    first `split` partitions and the last one (its labels never leave it) and the server
    runs the partitions in between for every device. `mode`: `parallel` (every owner trains
    every step) or `relay` (owners take turns of one sync period); `save_model`: each node
    writes its final model to the run folder.
    """

    stages: Optional[list[list[str]]] = key(None, "the stage configuration: one row of owner_stage tasks per client")
    stages_file: Optional[str] = key(None, "a .py, .env or .yaml file holding stage configurations, instead of stages")
    stages_index: int = key(0, "which configuration of stages_file (0-based; negative counts from the end)")
    server: Optional[int] = key(
        None, "device/server mode (PiPar): the server's node uid; the stage configuration is generated from split")
    split: typing.Union[int, Literal["auto"]] = key(
        1, "device/server mode: partitions each device keeps before the server's (it also keeps the last); -1: the "
           "whole model on the devices (federated training); auto: chosen by the profiler at launch", ge=-1)
    aggregation_frequency: Optional[int] = key(
        None, "device/server mode: replica averaging every k steps (k > 0), each epoch (-1) or never (0); "
              "replaces sync, sync_every and sync_unit", ge=-1)
    sync: Literal["fedavg", "gossip", "none"] = key(
        "fedavg", "replica sync: fedavg among all runners of a partition, gossip among neighbouring runners, or none")
    sync_every: int = key(1, "steps (or epochs) between replica syncs", gt=0)
    sync_unit: Literal["steps", "epochs"] = key("steps", "unit of sync_every")
    micro_batches: typing.Union[int, Literal["auto"]] = key(
        1, "micro-batches per step; auto: chosen by the profiler at launch", gt=0)
    micro_sizes: Literal["even", "tapered", "auto"] = key(
        "even", "how a batch is cut into micro-batches: even (torch.tensor_split's sizes) or tapered (falling "
                "linearly to about 0.45x the first, same gradient: the last micro-batch's round trip, which "
                "nothing hides, is short; for 4 or more micro-batches); auto: chosen by the profiler at launch")
    chunk_bytes: int = key(
        65536, "an activation or gradient larger than this goes in parts of about this many bytes (whole samples), "
               "so a gradient queued behind it waits for one part, not the whole payload; 0: whole payloads", ge=0)
    schedule: str = key("gpipe", "pipeline schedule: gpipe (all forwards, then all backwards) or 1f1b (at most "
                                 "pipeline-depth micro-batches in flight per partition)")
    order: Literal["relaxed", "strict"] = key(
        "relaxed", "relaxed: a client runs any action whose inputs arrived, its schedule's order as priority; "
                   "strict: in its schedule's order, rows in order (rule 6 is checked accordingly)")
    workers: int = key(1, "compute threads of a split node: actions of different owners' pipelines (a server's "
                          "devices) run at once, one thread each; each owner's stay in order (relaxed order)", gt=0)
    preempt: bool = key(
        True, "relaxed order: a client's backwards that no peer waits for (a device's, down to partition 1) run on a "
              "thread of their own, so that a pass a peer waits for never waits behind one (an emulated slower "
              "processor pauses that backward meanwhile)")
    checkpoint: bool = key(False, "keep only a partition's input and recompute its activations in backward")
    mode: Literal["parallel", "relay"] = key(
        "parallel", "parallel: every owner trains every step; relay: owners take turns of one sync period")
    profile_repeats: int = key(3, "with split or micro_batches auto: timings per measurement of the profiler", gt=0)
    slowdown: dict[int, float] = key(
        doc="node uid -> how many times slower than this machine that node computes (emulated: each forward, "
            "backward and update lasts that many times its CPU time here, the least of its kind and size so "
            "far, the added wait off the cores the nodes share), as a device slower than the server; the "
            "profiler plans with it",
        factory=dict, ge=1)
    save_model: bool = key(False, "each node writes its final model to split_model_<uid>.safetensors")
    trace: bool = key(False, "each node writes its timeline (compute actions, uplink, arrivals) to "
                             "trace_<uid>.json, merged into trace.json: Chrome trace events for ui.perfetto.dev")


@dataclass
class AttackConfig(Section):
    """Byzantine nodes and what they do. The nodes in `nodes` run as real peers and apply the
    attack `name` (with its keys) to what they send, or to their own data (`label_flip`).
    An attack sees only what its node legitimately receives (its neighbours' messages),
    unless `omniscient`, where every honest node also sends its model to the Byzantine
    nodes, so they see every honest vector of the round (gossip nodes only)."""

    SECTION = "attack"
    name: str = key("none", "what the Byzantine nodes do (none: no attack)")
    nodes: list[int] = key(doc="uids of the Byzantine nodes", factory=list, ge=0)
    omniscient: bool = key(False, "the attack sees every honest model of the round (gossip nodes only)")


#: section → (module, registry attribute) of the implementations chosen by its `name`
IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "dataset": ("dflsplit.datasets", "DATASETS"),
    "model": ("dflsplit.models", "MODELS"),
    "optimizer": ("dflsplit.training", "OPTIMIZERS"),
    "training": ("dflsplit.training", "TRAININGS"),
    "sharing": ("dflsplit.sharing", "SHARINGS"),
    "communication": ("dflsplit.communication", "TRANSPORTS"),
    "node": ("dflsplit.node", "NODES"),
    "attack": ("dflsplit.sharing.attacks", "ATTACKS"),
}


def registry_of(section: str):
    """The Registry whose names `section`'s `name` key chooses from (imported on first use)."""
    import importlib

    module, attr = IMPLEMENTATIONS[section]
    return getattr(importlib.import_module(module), attr)


def implementation_keys(section: str, name: str) -> Optional[type]:
    """The keys dataclass of implementation `name` of `section` (None: it takes no keys)."""
    registry = registry_of(section)
    return registry.keys_of(name) if name in registry else None


@dataclass
class Config:
    """A whole experiment. `path` is the file it was read from (None when built in code)."""

    run: RunConfig = field(default_factory=RunConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    path: Optional[str] = None

    @property
    def byzantine(self) -> set[int]:
        """The uids of the Byzantine nodes (empty without an attack)."""
        return set(self.attack.nodes) if self.attack.name != "none" else set()

    @property
    def num_nodes(self) -> int:
        return self.run.machines * self.run.procs_per_machine

    def resolve(self, p: Optional[str]) -> Optional[Path]:
        """A path from the config: absolute, else relative to the config file's folder
        when it exists there, else relative to the working directory."""
        if p is None:
            return None
        path = Path(os.path.expanduser(p))
        if path.is_absolute():
            return path
        if self.path is not None:
            beside = Path(self.path).resolve().parent / path
            if beside.exists():
                return beside
        return path.resolve()

    def to_dict(self) -> dict[str, Any]:
        """Every section's keys (implementation keys included) as plain data."""
        return {name: section_to_dict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[f.type]
    for f in dataclasses.fields(Config)
    if f.name != "path"
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        null = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_type_name(a) for a in args) + null
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `where` and the expected type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the most precise
            return _check(value, options[0], where)
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_check(k, kt, where): _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            raise ConfigError(f"{bad}; quote it in YAML to make it a string (unquoted, 1_1 reads as the number 11)")
        raise bad
    raise bad


def _unknown_key(key: str, valid: list[str], where: str,
                 implementations: list[tuple[str, list[str]]] | None = None) -> ConfigError:
    """The error for a key nobody takes; `implementations`: (name, the keys it takes) of each
    implementation or rule that could have taken it."""
    every = valid + [k for _, keys in implementations or [] for k in keys]
    hint = difflib.get_close_matches(key, every, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    if not implementations:
        return ConfigError(f"{where}: unknown key {key!r}{did}; valid keys: {', '.join(valid)}")
    names = " nor ".join(impl for impl, _ in implementations)
    takes = "; ".join(f"{impl} takes {', '.join(own)}" if own else f"{impl} takes no keys of its own"
                      for impl, own in implementations)
    return ConfigError(
        f"{where}: key {key!r} is not taken by {names}{did}; {takes}; the section's common keys: {', '.join(valid)}"
    )


def _check_field(f: dataclasses.Field, tp: Any, value: Any, where: str) -> Any:
    value = _check(value, tp, where)
    if out_of_bounds(f, value):
        raise ConfigError(f"{where} must be {bounds_text(f)}, got {value!r}")
    if isinstance(value, list) and any(out_of_bounds(f, v) for v in value):  # bounds of a list key hold per item
        raise ConfigError(f"{where}: every item must be {bounds_text(f)}, got {value!r}")
    return value


def _build_section(cls: type, data: Any, where: str) -> Any:
    """A section from its mapping: common keys checked against `cls`; for a `Section`, the
    registry name in `name` and the other keys against that implementation's keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, extra = {}, {}
    for key_, value in data.items():
        if key_ in fields:
            kwargs[key_] = _check_field(fields[key_], hints[key_], value, f"{where}: key {key_!r}")
        else:
            extra[str(key_)] = value
    section = cls(**kwargs)
    if not issubclass(cls, Section):
        if extra:
            raise _unknown_key(next(iter(extra)), list(fields), where)
        return section
    try:
        keys_cls = registry_of(cls.SECTION).keys_of(section.name)  # KeyError names the known ones
    except KeyError as e:
        raise ConfigError(f"{where}: key 'name': {e.args[0]}") from None
    own = {f.name: f for f in dataclasses.fields(keys_cls)} if keys_cls is not None else {}
    chain: dict[str, tuple[dataclasses.Field, Any, str]] = {}
    if isinstance(section, SharingConfig):
        try:
            chain = aggregation_fields(section.aggregator)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{where}: key 'aggregator': {e.args[0]}") from None
    label = f"{cls.SECTION} {section.name!r}"
    for key_ in extra:
        if key_ not in own and key_ not in chain:
            candidates = [(label, list(own))]
            if isinstance(section, SharingConfig):
                by_rule: dict[str, list[str]] = {}
                for k, (_, _, rule) in chain.items():
                    by_rule.setdefault(rule, []).append(k)
                candidates += list(by_rule.items()) or [(f"aggregator {section.aggregator!r}", [])]
            raise _unknown_key(key_, list(fields), where, candidates)
    if keys_cls is not None:
        own_hints = typing.get_type_hints(keys_cls)
        section.set_options(keys_cls(**{
            k: _check_field(own[k], own_hints[k], v, f"{where}: key {k!r} ({label})")
            for k, v in extra.items() if k in own
        }))
    if isinstance(section, SharingConfig):
        keys = dict(section.aggregation_keys)
        for k, v in extra.items():
            if k in chain and k not in own:
                f, tp, rule = chain[k]
                keys[k] = _check_field(f, tp, v, f"{where}: key {k!r} ({rule})")
        section.set_aggregation_keys(keys)
    return section


def section_from_dict(section: str, **keys: Any) -> Any:
    """One validated section built in code, e.g. ``section_from_dict("communication",
    name="torrent", path="torrent")``."""
    return _build_section(SECTIONS[section], keys, f"<code>: section {section!r}")


def section_to_dict(section: Any) -> dict[str, Any]:
    """A section's keys as a plain mapping: its common keys, then its implementation's."""
    out = {f.name: dataclasses.asdict(section)[f.name] for f in dataclasses.fields(section)}
    if isinstance(section, Section) and section.options is not None:
        out.update(dataclasses.asdict(section.options))
    if isinstance(section, SharingConfig):
        out.update(section.aggregation_keys)
    return out


def config_from_dict(data: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML document into a Config; `source` names it in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    sections = {}
    for name, body in data.items():
        if name not in SECTIONS:
            raise _unknown_key(str(name), list(SECTIONS), f"{source}: top level")
        sections[name] = _build_section(SECTIONS[name], body, f"{source}: section {name!r}")
    cfg = Config(**sections)
    _validate(cfg, source)
    return cfg


def _validate(cfg: Config, source: str) -> None:
    """Cross-key checks that a type or a bound alone cannot express."""
    t = cfg.training
    if (t.local_steps is None) == (t.local_epochs is None):
        raise ConfigError(
            f"{source}: section 'training': set exactly one of 'local_steps' and 'local_epochs' "
            f"(got local_steps={t.local_steps!r}, local_epochs={t.local_epochs!r})"
        )
    o = cfg.optimizer
    if o.name == "sgd" and o.nesterov and o.momentum == 0:  # torch.optim.SGD would refuse it on every node
        raise ConfigError(
            f"{source}: section 'optimizer': key 'nesterov' (optimizer 'sgd'): Nesterov momentum needs "
            f"momentum > 0, got momentum={o.momentum!r}"
        )
    if not 0 <= cfg.run.machine_id < cfg.run.machines:
        raise ConfigError(
            f"{source}: section 'run': key 'machine_id' must be in 0..{cfg.run.machines - 1}, "
            f"got {cfg.run.machine_id}"
        )
    from .graphs import GRAPH_TYPES, MIXING_WEIGHTS

    for section, key_, registry in (("graph", "mixing", MIXING_WEIGHTS), ("graph", "type", GRAPH_TYPES)):
        try:
            registry.get(getattr(getattr(cfg, section), key_))
        except KeyError as e:
            raise ConfigError(f"{source}: section {section!r}: key {key_!r}: {e.args[0]}") from None
    r = cfg.run
    for key_, uids in (("crash", r.crash), ("absent", r.absent)):
        bad = [u for u in uids if not 0 <= u < cfg.num_nodes]
        if bad:
            raise ConfigError(f"{source}: section 'run': key {key_!r}: uid {bad[0]} is not a node of the run "
                              f"(uids 0..{cfg.num_nodes - 1})")
    for u, span in r.absent.items():
        if len(span) != 2 or not 0 <= span[0] <= span[1] < r.rounds:
            raise ConfigError(f"{source}: section 'run': key 'absent': node {u}: expected [first, last] rounds "
                              f"with 0 <= first <= last < rounds ({r.rounds}), got {span}")
    if (r.crash or r.absent) and r.on_peer_failure != "skip":
        raise ConfigError(f"{source}: section 'run': keys 'crash'/'absent' make nodes miss rounds; set "
                          f"on_peer_failure: skip (got {r.on_peer_failure!r})")
    for u, caps in cfg.communication.node_limits.items():
        if not 0 <= u < cfg.num_nodes or len(caps) != 2 or any(c < 0 for c in caps):
            raise ConfigError(f"{source}: section 'communication': key 'node_limits': expected node uid (0.."
                              f"{cfg.num_nodes - 1}) -> [upload, download] bytes/s >= 0, got {u}: {caps}")
    for u, factor in cfg.split.slowdown.items():
        if not 0 <= u < cfg.num_nodes or not factor >= 1:
            raise ConfigError(f"{source}: section 'split': key 'slowdown': expected node uid (0..{cfg.num_nodes - 1})"
                              f" -> factor >= 1 (how many times slower than this machine it computes), got {u}: "
                              f"{factor}")
    if cfg.split.slowdown and cfg.node.name != "split":
        raise ConfigError(f"{source}: section 'split': key 'slowdown' emulates slower split-learning nodes; node "
                          f"{cfg.node.name!r} does not take it")
    if r.on_peer_failure == "skip" and cfg.node.name == "split":
        raise ConfigError(f"{source}: section 'run': key 'on_peer_failure': a split-learning pipeline cannot go "
                          f"on without a stage; 'skip' is for gossip and federated nodes")
    a = cfg.attack
    bad = [u for u in a.nodes if u >= cfg.num_nodes]
    if bad:
        raise ConfigError(f"{source}: section 'attack': key 'nodes': uid {bad[0]} is not a node of the run "
                          f"(uids 0..{cfg.num_nodes - 1})")
    if len(set(a.nodes)) != len(a.nodes):
        raise ConfigError(f"{source}: section 'attack': key 'nodes': a uid is listed twice: {a.nodes}")
    if a.name != "none" and not a.nodes:
        raise ConfigError(f"{source}: section 'attack': key 'nodes': attack {a.name!r} needs the uids of the "
                          f"Byzantine nodes")
    node_cls = registry_of("node").get(cfg.node.name)
    problem = node_cls.check_config(cfg)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    if a.omniscient and cfg.node.name not in ("dpsgd", "epidemic"):
        raise ConfigError(f"{source}: section 'attack': key 'omniscient': only gossip nodes (dpsgd, epidemic) "
                          f"have omniscient attacks; node {cfg.node.name!r} does not")
    n = node_cls.aggregation_inputs(cfg)
    if n is not None:  # the chain's own checks of n against f, on n placeholder vectors
        import torch

        from .sharing.aggregators import aggregate_vectors

        try:
            aggregate_vectors(cfg.sharing.aggregator, torch.zeros(n, 1), torch.full((n,), 1.0 / n),
                              cfg.sharing.aggregation_keys)
        except ValueError as e:
            raise ConfigError(f"{source}: section 'sharing': key 'aggregator': {e} (the run's aggregations "
                              f"combine as few as {n} vectors)") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse `section.key=value` (value in YAML syntax) into its three parts."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. run.rounds=5")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.split(".", 1)
    return section.strip(), key.strip(), yaml.safe_load(rhs)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                unset: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate a YAML config; `unset` are `section.key` names removed from the
    file (e.g. a key only the implementation being replaced takes), then `overrides`,
    `section.key=value` strings, are applied.

    `path=None` gives the defaults (with overrides applied).
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    for text in unset:
        section, _, key_ = text.partition(".")
        body = data.get(section)
        if not key_ or not isinstance(body, dict) or key_ not in body:
            raise ConfigError(f"{source}: cannot unset {text!r}: the file has no key {key_ or text!r} in section {section!r}")
        del body[key_]
    for text in overrides:
        section, key, value = parse_override(text)
        body = data.setdefault(section, {})
        if body is None:
            body = data[section] = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section!r} is not a mapping")
        body[key] = value
    cfg = config_from_dict(data, source)
    cfg.path = str(path) if path is not None else None
    return cfg


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML (every key, defaults included)."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
