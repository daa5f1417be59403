"""Learning algorithms end to end: federated server and clients, epidemic learning, dynamic
D-PSGD graphs, and averaging proved through the node (consensus distance)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dflsplit.config import ConfigError, load_config
from dflsplit.datasets import load_node_data
from dflsplit.graphs import MIXING_WEIGHTS
from dflsplit.launch import run_experiment
from dflsplit.node.dpsgd import dynamic_graph, epidemic_targets
from dflsplit.node.federated import FederatedNode, federated_average, sampled_clients
from dflsplit.results import read_run
from dflsplit.sharing import weighted_average

from conftest import next_base_port

ROOT = Path(__file__).resolve().parents[1]


def config(path, base_port, *extra):
    return load_config(ROOT / path, [f"run.base_port={base_port}", "run.progress=false", *extra])


def consensus_distance(run_dir: Path, uids) -> float:
    """Mean Euclidean distance of the nodes' final models to their average."""
    vecs = []
    for u in uids:
        state = load_file(str(run_dir / "machine_0" / f"model_{u}.safetensors"))
        vecs.append(torch.cat([v.reshape(-1).double() for k, v in sorted(state.items()) if v.is_floating_point()]))
    stack = torch.stack(vecs)
    return float((stack - stack.mean(0)).norm(dim=1).mean())


# federated ---------------------------------------------------------------------------
def test_federated_average_weights_by_sample_count_with_unequal_shards():
    cfg = load_config(None, ["node.name=federated", "run.procs_per_machine=6", "dataset.partition=dirichlet",
                             "dataset.alpha=0.3"])
    shards = {u: load_node_data(cfg, u, FederatedNode.data_shard(cfg, u)) for u in range(1, 6)}
    samples = {u: len(d.train_y) for u, d in shards.items()}
    assert len(set(samples.values())) > 1, samples  # the shards really are unequal
    assert sum(samples.values()) == 1437  # every training sample belongs to a client, none to the server
    assert len(load_node_data(cfg, 0, FederatedNode.data_shard(cfg, 0)).train_y) == 0
    models = {u: {"w": torch.full((3,), float(u)), "b": torch.tensor([u * 2.0])} for u in samples}
    out = federated_average(models, samples, weighted_average)
    total = sum(samples.values())
    expected = sum(u * n for u, n in samples.items()) / total
    assert torch.allclose(out["w"], torch.full((3,), expected)) and torch.allclose(out["b"], torch.tensor([2 * expected]))
    # an unweighted mean would differ: the weights matter
    assert abs(expected - np.mean(list(samples))) > 1e-3


def test_client_sampling_is_deterministic_and_sized():
    cfg = load_config(None, ["node.name=federated", "run.procs_per_machine=11", "node.fraction=0.5", "node.server=3"])
    rounds = [sampled_clients(cfg, r) for r in range(20)]
    assert all(len(c) == 5 and 3 not in c and c == sorted(c) for c in rounds)
    assert rounds == [sampled_clients(cfg, r) for r in range(20)]
    assert len({tuple(c) for c in rounds}) > 10
    cfg = load_config(None, ["node.name=federated", "run.procs_per_machine=11", "node.clients_per_round=3"])
    assert all(len(sampled_clients(cfg, r)) == 3 for r in range(5))


@pytest.mark.parametrize("bad, message", [
    (["node.server=11"], "key 'server': uid 11 is not a node"),
    (["node.fraction=0.5", "node.clients_per_round=2"], "at most one of keys 'fraction' and 'clients_per_round'"),
    (["node.clients_per_round=11"], "11 is more than the 10 clients"),
    (["node.server_optimizer=fedsgd"], "key 'server_optimizer': unknown server optimizer 'fedsgd'"),
    (["sharing.name=topk"], "federated clients send whole models"),
])
def test_federated_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["node.name=federated", "run.procs_per_machine=11", *bad])


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["torrent", "tcp"])
def test_fedavg_ten_clients_half_sampled_reaches_90_percent(tmp_path, base_port, transport):
    cfg = config("eval/configs/federated.yaml", base_port, f"communication.name={transport}", "run.rounds=20")
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["nodes"] == 11 and summary["test_acc_mean"] >= 0.90, summary
    run = read_run(tmp_path / "run")
    server = run[0]
    shard_sizes = {u: len(load_node_data(cfg, u, FederatedNode.data_shard(cfg, u)).train_y) for u in range(1, 11)}
    for r, rec in enumerate(server):
        assert rec["clients"] == sampled_clients(cfg, r) and len(rec["clients"]) == 5
        assert rec["samples"] == [shard_sizes[c] for c in rec["clients"]]
    for u in range(1, 11):  # a client trains exactly in the rounds it was sampled
        sampled = [r for r, rec in enumerate(run[u]) if rec["sampled"]]
        assert sampled == [r for r in range(20) if u in server[r]["clients"]]
        assert all(rec["test_acc"] is None for rec in run[u])
    tested = [rec["test_acc"] for rec in server if rec["test_acc"] is not None]
    assert tested[-1] > tested[0]


@pytest.mark.slow
def test_fedadam_and_fedprox_clients_learn(tmp_path, base_port):
    cfg = config("eval/configs/federated.yaml", base_port, "communication.name=tcp", "run.rounds=20",
                 "node.server_optimizer=fedadam", "training.name=fedprox", "training.mu=0.01")
    assert run_experiment(cfg, tmp_path / "run")["test_acc_mean"] >= 0.85


# epidemic and dynamic graphs ------------------------------------------------------------
def test_epidemic_targets_of_both_variants():
    for r in range(5):
        local = epidemic_targets(16, 3, "local", seed=1, round_=r)
        assert all(len(set(t)) == 3 and i not in t for i, t in enumerate(local))
        oracle = epidemic_targets(16, 3, "oracle", seed=1, round_=r)
        assert all(len(t) == 3 for t in oracle)
        assert all(i in oracle[j] for i, t in enumerate(oracle) for j in t)  # symmetric: s in, s out
    assert epidemic_targets(16, 3, "local", 1, 0) != epidemic_targets(16, 3, "local", 1, 1)
    assert epidemic_targets(16, 3, "local", 1, 4) == epidemic_targets(16, 3, "local", 1, 4)
    in_degrees = {sum(i in t for t in epidemic_targets(16, 3, "local", 1, 0)) for i in range(16)}
    assert len(in_degrees) > 1  # EL-Local: in-degree varies


def test_dynamic_graph_is_fresh_each_round_and_weights_follow_it():
    cfg = load_config(None, ["run.procs_per_machine=12", "graph.dynamic=true", "graph.degree=3", "graph.mixing=uniform"])
    graphs = [dynamic_graph(cfg, r) for r in range(6)]
    assert all(g.is_regular() and g.degree(0) == 3 and g.is_connected() for g in graphs)
    assert len({tuple(g.edges()) for g in graphs}) == 6
    assert dynamic_graph(cfg, 2) == graphs[2]
    weights = MIXING_WEIGHTS.get("uniform")(graphs[1])
    assert set(weights[0]) == {0, *graphs[1].neighbors(0)} and all(w == 0.25 for w in weights[0].values())
    with pytest.raises(ConfigError, match="dynamic graphs are random regular graphs"):
        load_config(None, ["graph.dynamic=true", "graph.type=ring"])
    with pytest.raises(ConfigError, match="key 'mixing': unknown mixing weights 'metropolis'"):
        load_config(None, ["graph.mixing=metropolis"])


@pytest.mark.slow
@pytest.mark.parametrize("node, transport", [
    (["node.name=dpsgd"], "tcp"),
    (["node.name=dpsgd", "graph.dynamic=true", "graph.degree=3"], "torrent"),
    (["node.name=epidemic", "node.peers=2"], "torrent"),
    (["node.name=epidemic", "node.peers=3", "node.variant=oracle"], "tcp"),
])
def test_averaging_through_the_node_shrinks_consensus_distance(tmp_path, base_port, node, transport):
    """The same 8-node run with aggregation switched off (each node keeps its own model)
    ends with models far apart; with averaging, close together."""
    common = ["run.procs_per_machine=8", "run.rounds=12", "node.test_after=12", "node.save_model=true",
              "graph.degree=3", f"communication.name={transport}", *node]
    if node[0] == "node.name=epidemic":
        common = [c for c in common if not c.startswith("graph.")]
    averaged = run_experiment(config("eval/configs/default.yaml", base_port, *common), tmp_path / "avg")
    alone = run_experiment(config("eval/configs/default.yaml", base_port, *common, "sharing.aggregator=none"),
                           tmp_path / "alone")
    d_avg, d_alone = consensus_distance(tmp_path / "avg", range(8)), consensus_distance(tmp_path / "alone", range(8))
    print(f"consensus distance {d_avg:.3f} averaged, {d_alone:.3f} alone; accuracy "
          f"{averaged['test_acc_mean']:.3f}, {alone['test_acc_mean']:.3f}")
    assert d_avg < 0.25 * d_alone, (d_avg, d_alone)
    assert averaged["test_acc_mean"] >= 0.7, averaged  # and it learns
    records = read_run(tmp_path / "avg")
    for r in range(12):  # every model sent was received
        assert sum(rs[r]["peers_out"] for rs in records.values()) == sum(rs[r]["peers_in"] for rs in records.values()) > 0


# compressed sharing ---------------------------------------------------------------------
def _sharing_run(tmp_path, name, rounds, *extra):
    cfg = config("eval/configs/default.yaml", next_base_port(8), "run.procs_per_machine=8", f"run.rounds={rounds}",
                 "node.test_after=10", "communication.name=tcp", f"sharing.name={name}", *extra)
    summary = run_experiment(cfg, tmp_path / f"{name}-{rounds}")
    run = read_run(tmp_path / f"{name}-{rounds}")
    per_round = sum(rs[-1]["bytes_sent"] for rs in run.values()) / rounds  # counted by the transport
    assert all(rs[-1]["payload_bytes_sent"] + rs[-1]["metadata_bytes_sent"] == rs[-1]["bytes_sent"] for rs in run.values())
    return summary["test_acc_mean"], per_round


@pytest.mark.slow
def test_topk_and_quantize_cut_bytes_and_keep_accuracy(tmp_path):
    full_acc, full_bytes = _sharing_run(tmp_path, "full", 20)
    topk_acc, topk_bytes = _sharing_run(tmp_path, "topk", 40, "sharing.alpha=0.1")
    quant_acc, quant_bytes = _sharing_run(tmp_path, "quantize", 20, "sharing.levels=16")
    print(f"full {full_acc:.4f} {full_bytes:.0f} B/round; topk {topk_acc:.4f} {topk_bytes:.0f}; "
          f"quantize {quant_acc:.4f} {quant_bytes:.0f}")
    assert topk_bytes <= 0.15 * full_bytes and topk_acc >= full_acc - 0.03
    assert quant_bytes <= 0.30 * full_bytes and quant_acc >= full_acc - 0.02
    assert full_acc >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize("sharing", [["sharing.name=topk", "sharing.alpha=0.2"], ["sharing.name=subsample"],
                                     ["sharing.name=quantize", "sharing.levels=4"]])
def test_compressed_payloads_as_torrents_give_the_models_of_tcp(tmp_path, sharing):
    """Oracle: the same seed over tcp and with every payload forced through a torrent."""
    accs = {}
    for name in ("tcp", "torrent"):
        cfg = config("eval/configs/default.yaml", next_base_port(4), "run.procs_per_machine=4", "run.rounds=4",
                     "graph.degree=2", "node.test_after=4", f"communication.name={name}", *sharing,
                     *(["communication.path=torrent"] if name == "torrent" else []))
        accs[name] = run_experiment(cfg, tmp_path / name)["final_test_acc"]
    assert accs["tcp"] == accs["torrent"]
