"""Byzantine robustness end to end: attackers run as real peers (gossip, federated, split
replica sync); robust aggregators keep the honest nodes near the honest run's accuracy."""

from pathlib import Path

import pytest

from dflsplit.config import ConfigError, load_config
from dflsplit.launch import run_experiment
from dflsplit.plot import honest_run, plot_run
from dflsplit.results import read_run

from conftest import next_base_port

ROOT = Path(__file__).resolve().parents[1]
GOSSIP = ["run.procs_per_machine=10", "graph.type=full", "run.rounds=30", "node.test_after=10",
          "communication.name=tcp", "run.progress=false"]
ATTACKERS = ["attack.nodes=[3, 7]"]


def run(tmp_path, label, config, *overrides):
    cfg = load_config(ROOT / config, [f"run.base_port={next_base_port(11)}", "run.progress=false", *overrides])
    return run_experiment(cfg, tmp_path / label)


@pytest.fixture(scope="module")
def honest_gossip(tmp_path_factory):
    return run(tmp_path_factory.mktemp("honest"), "run", "eval/configs/default.yaml", *GOSSIP)["test_acc_mean"]


@pytest.mark.slow
@pytest.mark.parametrize("attack", [["attack.name=sign_flip", "attack.scale=4"], ["attack.name=alie", "attack.z=10"]])
def test_gossip_attack_breaks_the_mean_not_trimmed_mean_or_multikrum(tmp_path, honest_gossip, attack):
    def acc(aggregator, *keys):
        s = run(tmp_path, aggregator, "eval/configs/default.yaml", *GOSSIP, *ATTACKERS, *attack,
                f"sharing.aggregator={aggregator}", *keys)
        assert s["byzantine"] == [3, 7] and sorted(map(int, s["final_test_acc"])) == [0, 1, 2, 4, 5, 6, 8, 9]
        return s["test_acc_mean"]

    mean = acc("mean")
    trimmed = acc("trimmed_mean", "sharing.f=2")
    multikrum = acc("multikrum", "sharing.f=2")
    print(f"honest {honest_gossip:.4f}; under {attack[0]}: mean {mean:.4f}, trimmed_mean {trimmed:.4f}, "
          f"multikrum {multikrum:.4f}")
    assert mean <= honest_gossip - 0.10
    assert trimmed >= honest_gossip - 0.03 and multikrum >= honest_gossip - 0.03


@pytest.mark.slow
def test_federated_multikrum_resists_two_of_ten_byzantine_clients(tmp_path):
    common = ["run.rounds=20", "node.fraction=1.0", "communication.name=tcp"]
    honest = run(tmp_path, "honest", "eval/configs/federated.yaml", *common)["test_acc_mean"]
    attack = [*common, "attack.name=sign_flip", "attack.nodes=[2, 5]"]
    mean = run(tmp_path, "mean", "eval/configs/federated.yaml", *attack, "sharing.aggregator=mean")["test_acc_mean"]
    krum = run(tmp_path, "krum", "eval/configs/federated.yaml", *attack, "sharing.aggregator=multikrum",
               "sharing.f=2")["test_acc_mean"]
    print(f"federated: honest {honest:.4f}, mean {mean:.4f}, multikrum {krum:.4f}")
    assert krum >= honest - 0.03 and mean <= honest - 0.10


@pytest.mark.slow
def test_split_replica_sync_resists_a_sign_flipped_runner(tmp_path):
    """Client 1 of the server-mode stage configuration sends its heads and tails sign-flipped
    to the replica sync; MeaMed keeps the other clients' accuracy, the mean does not."""
    config = "eval/configs/split/server5.yaml"
    honest = run(tmp_path, "honest", config)["test_acc_mean"]
    attack = ["attack.name=sign_flip", "attack.nodes=[0]"]
    mean = run(tmp_path, "mean", config, *attack, "sharing.aggregator=mean")
    median = run(tmp_path, "meamed", config, *attack, "sharing.aggregator=meamed", "sharing.f=1")
    print(f"split: honest {honest:.4f}, mean {mean['test_acc_mean']:.4f}, meamed {median['test_acc_mean']:.4f}")
    assert median["byzantine"] == [0] and "0" not in median["final_test_acc"]
    assert median["test_acc_mean"] >= honest - 0.03 and mean["test_acc_mean"] < honest - 0.03


@pytest.mark.slow
def test_omniscient_attacker_receives_every_honest_model_and_results_say_who_is_byzantine(tmp_path):
    common = ["run.procs_per_machine=8", "graph.type=ring", "run.rounds=3", "node.test_after=3", "communication.name=tcp",
              "attack.name=alie", "attack.nodes=[0]", "sharing.aggregator=median"]
    seen = {}
    for omniscient in (False, True):
        run(tmp_path, f"omniscient-{omniscient}", "eval/configs/default.yaml", *common,
            f"attack.omniscient={str(omniscient).lower()}")
        records = read_run(tmp_path / f"omniscient-{omniscient}")
        seen[omniscient] = records[0][-1]["payload_bytes_received"]
        assert all(r.get("byzantine") for r in records[0]) and not any(r.get("byzantine") for r in records[4])
    # a ring gives node 0 two honest neighbours; omniscient, it also gets the other five's models
    assert seen[True] == pytest.approx(seen[False] * 7 / 2, rel=0.01)
    honest, byzantine = honest_run(tmp_path / "omniscient-True")
    assert byzantine == [0] and sorted(honest) == list(range(1, 8))
    plot_run(tmp_path / "omniscient-True")
    csv = (tmp_path / "omniscient-True/metrics.csv").read_text().splitlines()
    assert csv[1].split(",")[1] == "7"  # nodes per round: the honest ones


@pytest.mark.parametrize("overrides, message", [
    (["attack.name=sign_flip"], "needs the uids of the Byzantine nodes"),
    (["attack.name=sign_flip", "attack.nodes=[16]"], "uid 16 is not a node of the run"),
    (["attack.name=sign_flip", "attack.nodes=[1, 1]"], "listed twice"),
    (["attack.name=sign_flip", "attack.nodes=[1]", "attack.epsilon=0.1"], "key 'epsilon' is not taken by attack 'sign_flip'"),
    (["attack.name=flip", "attack.nodes=[1]"], "unknown attack 'flip'"),
    (["sharing.aggregator=[trimmed_mean, nnm]"], "unknown pre-aggregator 'trimmed_mean'"),
    (["sharing.aggregator=trimmed_mean", "sharing.s=2"], "key 's' is not taken by sharing 'full' nor aggregator 'trimmed_mean'"),
])
def test_attack_and_aggregator_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "eval/configs/default.yaml", overrides)


def test_federated_server_cannot_be_byzantine():
    with pytest.raises(ConfigError, match="the server .* cannot be Byzantine"):
        load_config(ROOT / "eval/configs/federated.yaml", ["attack.name=sign_flip", "attack.nodes=[0]"])
