"""`dflsplit import-decentralizepy`: decentralizepy config.ini files (in the layout its own
tutorial and eval configs use) become dflsplit configs that load and carry their values;
keys without an equivalent give warnings; broken files give errors naming the file."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from dflsplit import cli
from dflsplit.cli_import import import_decentralizepy, parse_value, read_ini, DecentralizepyConfigError
from dflsplit.config import load_config

CIFAR_TUTORIAL = """\
[DATASET]
dataset_package = decentralizepy.datasets.CIFAR10
dataset_class = CIFAR10
model_class = LeNet
; the folder that holds cifar-10-batches-py
train_dir = ../eval/data/
test_dir = ../eval/data/
; fractions per node, empty: equal shares
sizes =
random_seed = 90
partition_niid = False
shards = 4
validation_source = Test
validation_size = 0.1

[OPTIMIZER_PARAMS]
optimizer_package = torch.optim
optimizer_class = SGD
lr = 0.01

[TRAIN_PARAMS]
training_package = decentralizepy.training.Training
training_class = Training
rounds = 3
full_epochs = False
batch_size = 8
shuffle = True
loss_package = torch.nn
loss_class = CrossEntropyLoss

[COMMUNICATION]
comm_package = decentralizepy.communication.TCP
comm_class = TCP
addresses_filepath = ip.json

[SHARING]
sharing_package = decentralizepy.sharing.Sharing
sharing_class = Sharing
"""

FEMNIST_PARTIAL = """\
[DATASET]
dataset_package = decentralizepy.datasets.Femnist
dataset_class = Femnist
random_seed = 97
model_class = CNN
train_dir = /data/leaf/femnist/per_user_data/train
test_dir = /data/leaf/femnist/per_user_data/test
sizes =

[OPTIMIZER_PARAMS]
optimizer_package = torch.optim
optimizer_class = Adam
lr = 0.001

# 734463 samples in all
[TRAIN_PARAMS]
training_package = decentralizepy.training.Training
training_class = Training
rounds = 2
full_epochs = True
batch_size = 16
shuffle = True
loss_package = torch.nn
loss_class = CrossEntropyLoss

[COMMUNICATION]
comm_package = decentralizepy.communication.TCP
comm_class = TCP
addresses_filepath = /etc/decpy/ip_addr_6Machines.json
offset = 9000

[SHARING]
sharing_package = decentralizepy.sharing.PartialModel
sharing_class = PartialModel
alpha=0.1
accumulation = True
"""

EPIDEMIC = """\
[DATASET]
dataset_package = decentralizepy.datasets.CIFAR10
dataset_class = CIFAR10
model_class = LeNet
train_dir = /data/cifar
test_dir = /data/cifar
sizes =
random_seed = 90
partition_niid = dirichlet
alpha = 0.1 ; the Dirichlet concentration

[OPTIMIZER_PARAMS]
optimizer_package = torch.optim
optimizer_class = SGD
lr = 0.05 ; gamma

[TRAIN_PARAMS]
training_package = decentralizepy.training.Training
training_class = Training
rounds = 10 ; r
full_epochs = False
batch_size = 5 ; b
shuffle = True
loss_package = torch.nn
loss_class = CrossEntropyLoss

[COMMUNICATION]
comm_package = decentralizepy.communication.TCP
comm_class = TCP
addresses_filepath = ip.json

[SHARING]
sharing_package = decentralizepy.sharing.PlainAverageSharing ; plain average, no Metropolis-Hastings
sharing_class = PlainAverageSharing
compress = False

[NODE]
graph_degree = 7
"""

JWINS_SHARING = """\
[SHARING]
sharing_package = decentralizepy.sharing.JWINS.JWINS
sharing_class = JWINS
alpha_list = [0.1,0.15,0.2,0.25,0.3,0.4,1.0]
wavelet=sym2
level= 4
compress = True
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def edges_file(tmp_path, n=16, name="regular_16.edges"):
    """A ring in decentralizepy's .edges format (first line N, then one edge per line)."""
    return write(tmp_path, name, f"{n}\n" + "".join(f"{i} {(i + 1) % n}\n" for i in range(n)))


def run_import(tmp_path, ini_text, *extra, name="config.ini"):
    ini = write(tmp_path, name, ini_text)
    out = tmp_path / "imported.yaml"
    rc = cli.main(["import-decentralizepy", str(ini), "-o", str(out), *extra])
    return rc, out


def test_tutorial_config_loads_and_carries_its_values(tmp_path, capsys):
    graph = edges_file(tmp_path)
    rc, out = run_import(tmp_path, CIFAR_TUTORIAL, "--graph", str(graph), "--iterations", "7", "--test-after", "2")
    err = capsys.readouterr().err
    assert rc == 0, err
    cfg = load_config(out)
    assert (cfg.dataset.name, cfg.dataset.root, cfg.dataset.partition) == ("cifar10", "../eval/data/", "iid")
    assert cfg.model.name == "lenet"
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("sgd", 0.01)
    assert (cfg.training.name, cfg.training.local_steps, cfg.training.local_epochs) == ("local_sgd", 3, None)
    assert cfg.training.batch_size == 8
    assert (cfg.run.rounds, cfg.run.seed, cfg.run.ip_file) == (7, 90, "ip.json")
    assert (cfg.run.machines, cfg.run.procs_per_machine) == (1, 16)  # N of the graph file
    assert cfg.node.test_after == 2
    assert (cfg.communication.name, cfg.sharing.name, cfg.graph.mixing) == ("tcp", "full", "metropolis_hastings")
    assert cfg.resolve(cfg.graph.file) == graph.resolve()
    # the rounds pitfall is spelled out, and the keys without an equivalent are named
    assert "rounds = 3 is decentralizepy's local steps per communication round" in err
    for section, key_ in (("DATASET", "validation_source"), ("DATASET", "validation_size"), ("DATASET", "shards")):
        assert sum(line.startswith(f"warning: [{section}] {key_} ") for line in err.splitlines()) == 1, err
    assert len([line for line in err.splitlines() if line.startswith("warning:")]) == 3
    assert cli.main(["check-config", str(out)]) == 0


def test_epochs_partial_model_and_femnist_layout(tmp_path, capsys):
    rc, out = run_import(tmp_path, FEMNIST_PARTIAL, "--iterations", "50")
    err = capsys.readouterr().err
    assert rc == 0, err
    cfg = load_config(out)
    assert (cfg.dataset.name, cfg.dataset.root) == ("femnist", "/data/leaf/femnist/per_user_data")
    assert cfg.dataset.partition == "contiguous"  # whole writers per node, as decentralizepy splits FEMNIST
    assert (cfg.training.local_epochs, cfg.training.local_steps) == (2.0, None)
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 0.001)
    assert (cfg.sharing.name, cfg.sharing.alpha) == ("topk", 0.1)
    assert (cfg.run.seed, cfg.run.base_port, cfg.run.rounds) == (97, 9000, 50)
    assert cfg.run.ip_file == "/etc/decpy/ip_addr_6Machines.json"
    assert "warning: [SHARING] accumulation = True: not imported" in err
    assert "warning: [DATASET] model_class = 'CNN'" in err  # dflsplit's cnn is another network
    assert "local epochs per communication round" in err


def test_dirichlet_plain_average_and_inline_comments(tmp_path, capsys):
    rc, out = run_import(tmp_path, EPIDEMIC)
    err = capsys.readouterr().err
    assert rc == 0, err
    cfg = load_config(out)
    assert (cfg.dataset.partition, cfg.dataset.alpha) == ("dirichlet", 0.1)
    assert (cfg.optimizer.lr, cfg.training.local_steps, cfg.training.batch_size) == (0.05, 10, 5)
    assert (cfg.sharing.name, cfg.graph.mixing) == ("full", "uniform")
    assert "warning: [NODE] graph_degree = 7: not imported" in err
    assert "compress" not in err  # compress = False is what dflsplit does too
    assert "run.rounds" in err and "--iterations" in err  # not in the ini: said so, default kept
    assert cfg.run.rounds == load_config(None).run.rounds


@pytest.mark.parametrize("method, expected", [
    ("kshard", {"partition": "shard", "shards_per_node": 4}),
    ("True", {"partition": "shard", "shards_per_node": 4}),
    ("simple", {"partition": "contiguous"}),
    ("iid", {"partition": "iid"}),
])
def test_partition_methods(tmp_path, capsys, method, expected):
    text = CIFAR_TUTORIAL.replace("partition_niid = False", f"partition_niid = {method}")
    imported = import_decentralizepy(write(tmp_path, "c.ini", text))
    assert {k: imported.config["dataset"][k] for k in expected} == expected
    shard_warned = any("[DATASET] shards" in w for w in imported.warnings)
    assert shard_warned == (expected["partition"] != "shard")


def test_no_partition_key_means_decentralizepy_default_simple(tmp_path):
    text = CIFAR_TUTORIAL.replace("partition_niid = False\n", "")
    assert import_decentralizepy(write(tmp_path, "c.ini", text)).config["dataset"]["partition"] == "contiguous"


def test_subsampling(tmp_path):
    text = CIFAR_TUTORIAL.replace("""sharing_package = decentralizepy.sharing.Sharing
sharing_class = Sharing
""", """sharing_package = decentralizepy.sharing.SubSampling
sharing_class = SubSampling
alpha = 0.5
""")
    imported = import_decentralizepy(write(tmp_path, "c.ini", text))
    assert imported.config["sharing"] == {"name": "subsample", "alpha": 0.5}


def test_unsupported_sharing_and_section_warn_per_key_and_keep_defaults(tmp_path, capsys):
    text = CIFAR_TUTORIAL.split("[SHARING]")[0] + JWINS_SHARING + "\n[EXTRA]\nfoo = 1\n"
    rc, out = run_import(tmp_path, text)
    err = capsys.readouterr().err
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: [SHARING]")]
    assert {line.split()[2] for line in warned} == {"sharing_class", "alpha_list", "wavelet", "level", "compress"}
    assert "warning: [EXTRA] foo = 1: not imported: decentralizepy reads no section [EXTRA]" in err
    doc = yaml.safe_load(out.read_text())
    assert "sharing" not in doc  # nothing invented: dflsplit's default sharing stands
    assert load_config(out).sharing.name == "full"
    assert "# warning: [SHARING] sharing_class = 'JWINS'" in out.read_text()  # the file says so too


def test_prints_yaml_without_out(tmp_path, capsys):
    ini = write(tmp_path, "config.ini", CIFAR_TUTORIAL)
    assert cli.main(["import-decentralizepy", str(ini)]) == 0
    captured = capsys.readouterr()
    doc = yaml.safe_load(captured.out)
    assert doc["training"]["local_steps"] == 3 and doc["model"]["name"] == "lenet"
    assert "warning: [DATASET] validation_size" in captured.err
    assert "warning" not in captured.out.replace("# warning", "")  # stdout holds the YAML only


@pytest.mark.parametrize("text, expected", [
    ("lr = 0.01\n", "no section headers"),
    ("[DATASET]\nrandom_seed = 1\nrandom_seed = 2\n", "random_seed"),
    ("[MODEL]\nname = x\n", "not a decentralizepy config"),
    ("[OPTIMIZER_PARAMS]\noptimizer_package = torch.optim\noptimizer_class = SGD\nlr = fast\n",
     "[OPTIMIZER_PARAMS] lr: expected a number, got 'fast'"),
])
def test_broken_files_are_errors_naming_the_file(tmp_path, capsys, text, expected):
    ini = write(tmp_path, "broken.ini", text)
    assert cli.main(["import-decentralizepy", str(ini), "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert str(ini) in err and expected in err, err
    assert not (tmp_path / "x.yaml").exists()


def test_missing_file_is_an_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "config.ini"
    assert cli.main(["import-decentralizepy", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: file not found" in err


def test_graph_that_machines_do_not_divide(tmp_path):
    graph = edges_file(tmp_path, n=15, name="g.edges")
    with pytest.raises(DecentralizepyConfigError, match="15 nodes, which --machines 2 does not divide"):
        import_decentralizepy(write(tmp_path, "c.ini", CIFAR_TUTORIAL), graph=str(graph), machines=2)
    imported = import_decentralizepy(write(tmp_path, "c.ini", CIFAR_TUTORIAL), graph=str(graph), machines=3)
    assert (imported.config["run"]["machines"], imported.config["run"]["procs_per_machine"]) == (3, 5)


def test_a_value_out_of_range_is_refused_before_writing(tmp_path, capsys):
    rc, out = run_import(tmp_path, CIFAR_TUTORIAL.replace("lr = 0.01", "lr = 0"))
    err = capsys.readouterr().err
    assert rc == 2 and "key 'lr' must be > 0" in err and "nothing written" in err
    assert not out.exists()


def test_values_are_read_as_decentralizepy_reads_them(tmp_path):
    assert [parse_value(v) for v in ("False", "true", "3", "0.5", "[0.1, 0.2]", "dirichlet", "")] == [
        False, True, 3, 0.5, [0.1, 0.2], "dirichlet", ""]
    ini = read_ini(write(tmp_path, "c.ini", textwrap.dedent("""\
        [TRAIN_PARAMS]
        rounds = 10 ; local steps
        # a comment line
        batch_size=5
        """)))
    assert ini == {"TRAIN_PARAMS": {"rounds": 10, "batch_size": 5}}
