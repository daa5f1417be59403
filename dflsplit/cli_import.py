"""``dflsplit import-decentralizepy``: a decentralizepy ``config.ini`` as a dflsplit YAML config.

decentralizepy configures a run in two places: the ``config.ini`` (sections DATASET,
OPTIMIZER_PARAMS, TRAIN_PARAMS, COMMUNICATION, SHARING, sometimes NODE), whose classes it
builds from package-path strings, and the launch script's command line (graph file,
iterations, machines, processes per machine, test_after). This command maps what has an
equivalent here; the command-line values can be given as options with decentralizepy's
names. Every key without an equivalent gives one warning that names its section and key
and says why; nothing is invented (dflsplit's default stays where nothing maps).

The pitfall: decentralizepy's ``TRAIN_PARAMS.rounds`` is the number of local steps (or
epochs, with ``full_epochs``) per communication round, i.e. ``training.local_steps``;
dflsplit's ``run.rounds`` is decentralizepy's ``--iterations``.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

#: decentralizepy dataset class → dflsplit dataset
DATASETS = {"CIFAR10": "cifar10", "Femnist": "femnist"}
#: decentralizepy model class → (dflsplit model, a warning when the networks differ)
MODELS = {
    "LeNet": ("lenet", None),
    "CNN": ("cnn", "dflsplit's cnn is a smaller network than decentralizepy's CNN (same role, other layers)"),
}
#: decentralizepy partition_niid → dflsplit dataset.partition (CIFAR10; absent means 'simple')
PARTITIONS = {False: "iid", "iid": "iid", "simple": "contiguous", "dirichlet": "dirichlet",
              "kshard": "shard", True: "shard"}
#: torch.optim class → dflsplit optimizer, and its keys that map one to one
OPTIMIZERS = {"SGD": ("sgd", ("lr", "momentum", "nesterov", "weight_decay")),
              "Adam": ("adam", ("lr", "eps", "weight_decay"))}
#: sharing class → (dflsplit sharing, graph.mixing, keys that map one to one)
SHARINGS = {
    "Sharing": ("full", "metropolis_hastings", ()),
    "PlainAverageSharing": ("full", "uniform", ()),
    "PartialModel": ("topk", "metropolis_hastings", ("alpha",)),
    "TopK": ("topk", "metropolis_hastings", ("alpha",)),
    "TopKParams": ("topk", "metropolis_hastings", ("alpha",)),
    "SubSampling": ("subsample", "metropolis_hastings", ("alpha",)),
}
#: keys with no equivalent, and why (the rest get a generic reason)
UNSUPPORTED = {
    "validation_source": "dflsplit has no validation set (nodes report test and train metrics)",
    "validation_size": "dflsplit has no validation set (nodes report test and train metrics)",
    "sizes": "dflsplit splits the data by dataset.partition, not by a list of per-node fractions",
    "only_local": "dflsplit always partitions among all nodes of the run",
    "images_dir": "only decentralizepy's Celeba reads it, which has no equivalent",
    "shuffle": "dflsplit always samples mini-batches in a fresh random order each pass",
    "accumulation": "dflsplit's topk always selects by change since last sent, with error feedback",
    "accumulate_averaging_changes": "dflsplit's topk always selects by change since last sent, with error feedback",
    "save_accumulated": "a decentralizepy logging option",
    "save_shared": "a decentralizepy logging option",
    "dict_ordered": "dflsplit always orders tensors by the model's state dict",
    "metadata_cap": "dflsplit's topk and subsample always send the alpha fraction",
    "layerwise": "dflsplit's subsample draws one mask over the whole model",
    "pickle": "dflsplit never pickles what goes on the wire",
    "compress": "dflsplit's topk always compresses its indices; values are sent as they are",
    "compression_package": "dflsplit has no pluggable compression",
    "compression_class": "dflsplit has no pluggable compression",
    "float_precision": "dflsplit sends values at the model's precision (sharing 'quantize' quantises)",
    "recv_timeout": "dflsplit's receive deadline is communication.timeout (seconds per round), not a poll timeout",
    "graph_degree": "it belongs to the node class the launch script picks (Epidemic Learning: node.name: "
                    "epidemic with node.peers)",
    "dampening": "dflsplit's sgd has no dampening",
    "amsgrad": "dflsplit's adam has no amsgrad",
}
SECTIONS = ("DATASET", "OPTIMIZER_PARAMS", "TRAIN_PARAMS", "COMMUNICATION", "SHARING", "NODE")


class DecentralizepyConfigError(ValueError):
    """The file cannot be imported (missing, not an ini file, not a decentralizepy config);
    the message names the file."""


@dataclass
class Imported:
    """A dflsplit config dict, the warnings (one per key without an equivalent) and notes."""

    config: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_value(text: str) -> Any:
    """A config.ini value as decentralizepy reads it: '' (unset), true/false, a number, a
    Python literal list, else the text."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)  # numbers and lists; literal_eval never runs code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def read_ini(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Section → key → value of a decentralizepy config.ini (inline ``;`` comments allowed)."""
    path = Path(path)
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None, strict=True)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=str(path))
    except FileNotFoundError:
        raise DecentralizepyConfigError(f"{path}: file not found") from None
    except (configparser.Error, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())
        raise DecentralizepyConfigError(f"{path}: not a valid config.ini: {detail}") from None
    sections = {s: {k: parse_value(v) for k, v in parser.items(s)} for s in parser.sections()}
    if not any(s in sections for s in SECTIONS):
        raise DecentralizepyConfigError(f"{path}: not a decentralizepy config: none of the sections "
                                        f"{', '.join(SECTIONS)} (found {', '.join(sections) or 'no section'})")
    return sections


class _Importer:
    def __init__(self, ini: dict[str, dict[str, Any]], source: str):
        self.ini, self.source = ini, source
        self.config: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.done: set[tuple[str, str]] = set()

    def has(self, section: str, key: str) -> bool:
        return key in self.ini.get(section, {})

    def take(self, section: str, key: str, default: Any = None) -> Any:
        """The value of [section] key (`default` when absent), marked as handled."""
        self.done.add((section, key))
        value = self.ini.get(section, {}).get(key, default)
        return default if value == "" else value

    def number(self, section: str, key: str, default: Any = None, kind: type = float) -> Any:
        """[section] key as a `kind` number; an error naming the file, section and key otherwise."""
        value = self.take(section, key, default)
        wrong = isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float))
        if wrong:
            raise DecentralizepyConfigError(f"{self.source}: [{section}] {key}: expected "
                                            f"{'an integer' if kind is int else 'a number'}, got {value!r}")
        return kind(value)

    def warn(self, section: str, key: str, why: str) -> None:
        self.done.add((section, key))
        value = self.ini.get(section, {}).get(key)
        self.warnings.append(f"[{section}] {key} = {value!r}: not imported: {why}")

    def set(self, section: str, key: str, value: Any) -> None:
        self.config.setdefault(section, {})[key] = value

    @staticmethod
    def class_name(value: Any) -> str:
        return str(value).rsplit(".", 1)[-1]

    def run(self) -> Imported:
        for section in SECTIONS[:-1]:
            if section not in self.ini:
                self.notes.append(f"{self.source} has no [{section}] section: dflsplit's defaults stand")
        self.dataset()
        self.optimizer()
        self.training()
        self.communication()
        self.sharing()
        for section, keys in self.ini.items():
            for key in keys:
                if (section, key) not in self.done:
                    why = UNSUPPORTED.get(key, "no equivalent in dflsplit" if section in SECTIONS
                                          else f"decentralizepy reads no section [{section}]")
                    self.warn(section, key, why)
        return Imported(self.config, self.warnings, self.notes)

    def dataset(self) -> None:
        s = "DATASET"
        self.take(s, "dataset_package")
        cls = self.class_name(self.take(s, "dataset_class", ""))
        dataset = DATASETS.get(cls)
        if cls and dataset is None:
            self.warn(s, "dataset_class", f"dflsplit has no dataset like decentralizepy's {cls} "
                      f"(it has: {', '.join(sorted(DATASETS.values()))}); dataset.name stays the default")
        if dataset is not None:
            self.set("dataset", "name", dataset)
        model = self.take(s, "model_class")
        if model is not None:
            name, caveat = MODELS.get(self.class_name(model), (None, None))
            if dataset is None and cls:  # decentralizepy takes the model class from the dataset's module
                self.warn(s, "model_class", f"a network of decentralizepy's {cls}, which was not imported; "
                          "model.name stays the default")
            elif name is None:
                self.warn(s, "model_class", f"dflsplit has no network like decentralizepy's {model}; "
                          "model.name stays the default")
            else:
                self.set("model", "name", name)
                if caveat:
                    self.warnings.append(f"[{s}] model_class = {model!r}: imported as model.name: {name}, but "
                                         f"{caveat}")
        if self.take(s, "random_seed") is not None:
            self.set("run", "seed", self.number(s, "random_seed", kind=int))
        if self.take(s, "test_batch_size") is not None:
            self.set("training", "eval_batch_size", self.number(s, "test_batch_size", kind=int))
        if self.has(s, "sizes") and self.take(s, "sizes") is not None:
            self.warn(s, "sizes", UNSUPPORTED["sizes"])
        if self.take(s, "only_local") is True:
            self.warn(s, "only_local", UNSUPPORTED["only_local"])
        if dataset == "cifar10":
            self._cifar10(s)
        elif dataset == "femnist":
            self._femnist(s)
        elif cls:
            for key in self.ini[s]:
                if (s, key) not in self.done:
                    self.warn(s, key, f"a key of decentralizepy's {cls}, which was not imported")

    def _cifar10(self, s: str) -> None:
        train, test = self.take(s, "train_dir"), self.take(s, "test_dir")
        if train is not None:  # torchvision's root: the folder holding cifar-10-batches-py
            self.set("dataset", "root", str(train))
        if test is not None and train is not None and os.path.normpath(str(test)) != os.path.normpath(str(train)):
            self.warn(s, "test_dir", f"dflsplit reads CIFAR-10's test set from dataset.root ({train}) too")
        method = self.take(s, "partition_niid", "simple")
        partition = PARTITIONS.get(method)
        if partition is None:
            self.warn(s, "partition_niid", f"unknown method {method!r} (decentralizepy knows iid, simple, "
                      "dirichlet, kshard)")
            return
        self.set("dataset", "partition", partition)
        self.notes.append(f"partition_niid = {method!r} is dataset.partition: {partition}; dflsplit draws "
                          "its own partition (same method, other samples per node)")
        if partition == "dirichlet":
            self.set("dataset", "alpha", self.number(s, "alpha", 100))  # decentralizepy's default
        elif self.has(s, "alpha"):
            self.warn(s, "alpha", "the Dirichlet concentration is used only with partition_niid = dirichlet")
        if partition == "shard":
            self.set("dataset", "shards_per_node", self.number(s, "shards", 1, int))  # decentralizepy's default
        elif self.has(s, "shards"):
            self.warn(s, "shards", "shards are used only with partition_niid = kshard")

    def _femnist(self, s: str) -> None:
        # decentralizepy gives each node whole writers (files) of per_user_data/train; dflsplit's femnist
        # reads <root>/train/*.json and <root>/test/*.json and gives whole writers with 'contiguous'.
        self.set("dataset", "partition", "contiguous")
        self.notes.append("Femnist: dataset.partition: contiguous gives each node whole writers, as "
                          "decentralizepy does (other writers per node)")
        train, test = self.take(s, "train_dir"), self.take(s, "test_dir")
        if train is None:
            return
        train_path = Path(str(train))
        if train_path.name != "train":
            self.warn(s, "train_dir", "dflsplit's femnist reads <dataset.root>/train/*.json; this folder is "
                      "not named 'train', so set dataset.root yourself")
            return
        root = train_path.parent
        self.set("dataset", "root", str(root))
        if test is not None and os.path.normpath(str(test)) != os.path.normpath(str(root / "test")):
            self.warn(s, "test_dir", f"dflsplit's femnist reads the test files from <dataset.root>/test "
                      f"({root / 'test'})")
        for key in ("partition_niid", "alpha", "shards"):
            if self.has(s, key):
                self.warn(s, key, "decentralizepy's Femnist takes no such key (it splits by writer)")

    def optimizer(self) -> None:
        s = "OPTIMIZER_PARAMS"
        if s not in self.ini:
            return
        package = str(self.take(s, "optimizer_package", "torch.optim"))
        cls = self.class_name(self.take(s, "optimizer_class", ""))
        name, keys = OPTIMIZERS.get(cls, (None, ()))
        if package != "torch.optim" or name is None:
            self.warn(s, "optimizer_class", f"dflsplit has no optimizer like {package}.{cls} (it has sgd "
                      f"and adam); optimizer.name stays the default")
            for key in self.ini[s]:
                if key not in ("optimizer_package", "optimizer_class", "lr"):
                    self.warn(s, key, f"a key of {cls}, which was not imported")
            if self.has(s, "lr"):
                self.set("optimizer", "lr", self.number(s, "lr"))
            return
        self.set("optimizer", "name", name)
        for key in keys:
            if self.has(s, key):
                self.set("optimizer", key, self.take(s, key) if key == "nesterov" else self.number(s, key))
        if name == "adam" and self.has(s, "betas"):
            betas = self.take(s, "betas")
            if isinstance(betas, (list, tuple)) and len(betas) == 2:
                self.set("optimizer", "beta1", float(betas[0]))
                self.set("optimizer", "beta2", float(betas[1]))
            else:
                self.warn(s, "betas", "expected two numbers, e.g. (0.9, 0.999)")

    def training(self) -> None:
        s = "TRAIN_PARAMS"
        if s not in self.ini:
            return
        self.take(s, "training_package")
        cls = self.class_name(self.take(s, "training_class", "Training"))
        if cls != "Training":
            self.warn(s, "training_class", f"dflsplit has no training like decentralizepy's {cls}; "
                      "training.name stays local_sgd")
        else:
            self.set("training", "name", "local_sgd")
        steps = self.number(s, "rounds", 1, int)  # decentralizepy's default: one step (or epoch) per round
        if self.take(s, "full_epochs", False):
            self.set("training", "local_epochs", float(steps))
            self.set("training", "local_steps", None)
            unit = "local_epochs"
        else:
            self.set("training", "local_steps", steps)
            unit = "local_steps"
        self.notes.append(f"[{s}] rounds = {steps} is decentralizepy's local {unit.split('_')[1]} per "
                          f"communication round: training.{unit}: {steps}. dflsplit's run.rounds is "
                          "decentralizepy's --iterations (-is)")
        if self.take(s, "batch_size") is not None:
            self.set("training", "batch_size", self.number(s, "batch_size", kind=int))
        if self.has(s, "shuffle") and self.take(s, "shuffle") is False:
            self.warn(s, "shuffle", UNSUPPORTED["shuffle"])
        self.take(s, "shuffle")
        self.take(s, "loss_package")
        loss = self.class_name(self.take(s, "loss_class", self.take(s, "loss", "CrossEntropyLoss")))
        if loss not in ("CrossEntropyLoss", "cross_entropy"):
            key = "loss_class" if self.has(s, "loss_class") else "loss"
            self.warn(s, key, f"dflsplit trains with cross-entropy only, not {loss}")

    def communication(self) -> None:
        s = "COMMUNICATION"
        if s not in self.ini:
            return
        self.take(s, "comm_package")
        cls = self.class_name(self.take(s, "comm_class", ""))
        if cls == "TCP":  # ZeroMQ sockets, like dflsplit's tcp transport
            self.set("communication", "name", "tcp")
        elif cls:
            self.warn(s, "comm_class", f"dflsplit has no transport like decentralizepy's {cls} (it has tcp "
                      "and torrent); communication.name stays the default")
        ips = self.take(s, "addresses_filepath")
        if ips is not None:
            self.set("run", "ip_file", str(ips))
        if self.has(s, "offset"):
            offset = self.take(s, "offset")
            if isinstance(offset, int) and 1024 <= offset <= 65000:
                self.set("run", "base_port", offset)
            else:
                self.warn(s, "offset", f"run.base_port must be an integer in 1024..65000, got {offset!r}")

    def sharing(self) -> None:
        s = "SHARING"
        if s not in self.ini:
            return
        self.take(s, "sharing_package")
        cls = self.class_name(self.take(s, "sharing_class", ""))
        if cls not in SHARINGS:
            self.warn(s, "sharing_class", f"dflsplit has no sharing like decentralizepy's {cls} (it maps "
                      f"{', '.join(SHARINGS)}); sharing.name stays the default (full)")
            for key in self.ini[s]:
                if (s, key) not in self.done:
                    self.warn(s, key, f"a key of {cls}, which was not imported")
            return
        name, mixing, keys = SHARINGS[cls]
        self.set("sharing", "name", name)
        self.set("graph", "mixing", mixing)
        for key in keys:
            self.set("sharing", key, self.number(s, key, 1.0))  # decentralizepy's default alpha: 1.0
        if self.take(s, "compress", False) is False:
            self.done.add((s, "compress"))  # compress = False is what dflsplit's full does too


def import_decentralizepy(path: str | os.PathLike, *, graph: Optional[str] = None,
                          iterations: Optional[int] = None, machines: Optional[int] = None,
                          procs_per_machine: Optional[int] = None, test_after: Optional[int] = None,
                          graph_base: Optional[Path] = None) -> Imported:
    """Import a decentralizepy config.ini. The keyword arguments are what decentralizepy takes
    on its launch script's command line (-gf, -is, -ms, -ps, -ta). `graph` is written
    relative to `graph_base` (the output file's folder) when given."""
    source = str(path)
    imported = _Importer(read_ini(path), source).run()
    cfg = imported.config
    relative = [f"{s}.{k}" for s, k in (("dataset", "root"), ("run", "ip_file"))
                if k in cfg.get(s, {}) and not os.path.isabs(os.path.expanduser(cfg[s][k]))]
    if relative:
        imported.notes.append(f"{' and '.join(relative)}: relative paths copied as written; decentralizepy "
                              "resolved them from its working directory, dflsplit looks beside the YAML file, "
                              "then in the working directory")
    if iterations is not None:
        cfg.setdefault("run", {})["rounds"] = iterations
    else:
        imported.notes.append("run.rounds (communication rounds, decentralizepy's --iterations) is not in a "
                              "config.ini: dflsplit's default stands; give it with --iterations N")
    if machines is not None:
        cfg.setdefault("run", {})["machines"] = machines
    if test_after is not None:
        cfg.setdefault("node", {})["test_after"] = test_after
    nodes = None
    if graph is not None:
        nodes = _graph_nodes(graph)
        suffix = Path(graph).suffix.lower()
        if suffix in (".edges", ".adj"):
            where = os.path.relpath(os.path.abspath(graph), graph_base) if graph_base is not None else graph
            cfg.setdefault("graph", {})["file"] = where
        else:
            imported.warnings.append(f"--graph {graph}: not imported: dflsplit reads topology files ending in "
                                     f".edges or .adj (decentralizepy's edges format is .edges); rename it and "
                                     f"set graph.file")
    else:
        imported.notes.append("the graph is not in a config.ini (decentralizepy's -gf): dflsplit's generated "
                              "graph stands; give the file with --graph FILE")
    m = machines or 1
    if procs_per_machine is not None:
        if nodes is not None and procs_per_machine * m != nodes:
            raise DecentralizepyConfigError(f"--graph {graph} has {nodes} nodes, but --machines {m} x "
                                            f"--procs-per-machine {procs_per_machine} = {procs_per_machine * m}")
        cfg.setdefault("run", {})["procs_per_machine"] = procs_per_machine
    elif nodes is not None:
        if nodes % m:
            raise DecentralizepyConfigError(f"--graph {graph} has {nodes} nodes, which --machines {m} does not "
                                            "divide")
        cfg.setdefault("run", {})["procs_per_machine"] = nodes // m
    return imported


def _graph_nodes(path: str) -> int:
    """N, the first line of a decentralizepy graph file."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except FileNotFoundError:
        raise DecentralizepyConfigError(f"{path}: graph file not found") from None
    if not first.isdigit() or int(first) < 1:
        raise DecentralizepyConfigError(f"{path}:1: expected the number of nodes N on the first line, "
                                        f"got {first!r}")
    return int(first)


SECTION_ORDER = ("run", "dataset", "model", "optimizer", "training", "sharing", "communication", "node", "graph")


def to_yaml(imported: Imported, source: str) -> str:
    """The config as YAML, headed by comments: where it came from, and every warning."""
    import yaml

    ordered = {s: imported.config[s] for s in SECTION_ORDER if s in imported.config}
    ordered.update({s: v for s, v in imported.config.items() if s not in ordered})
    head = [f"# Imported from decentralizepy's {source} by `dflsplit import-decentralizepy`."]
    head += [f"# warning: {w}" for w in imported.warnings]
    head += [f"# note: {n}" for n in imported.notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(ordered, sort_keys=False)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``dflsplit import-decentralizepy`` on the sub-parsers action `sub`."""
    p = sub.add_parser(
        "import-decentralizepy", help="convert a decentralizepy config.ini into a dflsplit config",
        description="Convert a decentralizepy config.ini into a dflsplit YAML config (printed, or written "
        "with -o). Each key without an equivalent gives a warning naming its section and key. "
        "decentralizepy's TRAIN_PARAMS rounds is local steps per round (training.local_steps), not "
        "run.rounds; the options take what decentralizepy's launch script takes on its command line.",
    )
    p.add_argument("ini", metavar="CONFIG.ini", help="decentralizepy config file")
    p.add_argument("-o", "--out", metavar="OUT.yaml", help="write the config here (default: print it)")
    p.add_argument("--graph", metavar="FILE", help="topology file (decentralizepy's -gf); also sets the node count")
    p.add_argument("--iterations", type=int, metavar="N", help="communication rounds: run.rounds "
                   "(decentralizepy's -is)")
    p.add_argument("--machines", type=int, metavar="M", help="run.machines (decentralizepy's -ms)")
    p.add_argument("--procs-per-machine", type=int, metavar="P",
                   help="run.procs_per_machine (decentralizepy's -ps)")
    p.add_argument("--test-after", type=int, metavar="N", help="node.test_after (decentralizepy's -ta)")
    p.set_defaults(func=run_import)
    return p


def run_import(args: argparse.Namespace) -> int:
    from .config import ConfigError, config_from_dict
    from .node import NODES

    base = Path(args.out).resolve().parent if args.out else None
    imported = import_decentralizepy(args.ini, graph=args.graph, iterations=args.iterations,
                                     machines=args.machines, procs_per_machine=args.procs_per_machine,
                                     test_after=args.test_after, graph_base=base)
    label = f"{args.out or '<stdout>'} (imported from {args.ini})"
    try:  # what check-config checks: every key, and the topology
        cfg = config_from_dict(imported.config, source=label)
        cfg.path = args.out
        NODES.get(cfg.node.name).topology(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e} (nothing written)") from None
    for w in imported.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in imported.notes:
        print(f"note: {n}", file=sys.stderr)
    text = to_yaml(imported, args.ini)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out} (imported from {args.ini}; {len(imported.warnings)} warnings)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
