"""End-to-end D-PSGD: real node processes, real ZeroMQ sockets on loopback, real digits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dflsplit.config import load_config
from dflsplit.graphs import Graph
from dflsplit.launch import RunFailed, run_experiment
from dflsplit.plot import plot_run
from dflsplit.results import ROUND_FIELDS, read_run

ROOT = Path(__file__).resolve().parents[1]


def dpsgd_config(base_port, *extra):
    return load_config(
        ROOT / "eval/configs/default.yaml",
        [f"run.base_port={base_port}", "run.procs_per_machine=8", "run.rounds=20", "run.progress=false",
         "graph.degree=4", "node.test_after=5", *extra],
    )


@pytest.mark.slow
def test_eight_node_dpsgd_on_digits_reaches_85_percent(tmp_path, base_port):
    cfg = dpsgd_config(base_port, "communication.name=tcp", "node.eval_train=true")
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["nodes"] == 8 and summary["test_acc_mean"] >= 0.85, summary

    run = read_run(tmp_path / "run")
    assert sorted(run) == list(range(8))
    for uid, records in run.items():
        assert [r["round"] for r in records] == list(range(20))
        assert set(ROUND_FIELDS) <= set(records[0])
        tested = [r for r in records if r["test_acc"] is not None]
        assert [r["round"] for r in tested] == [4, 9, 14, 19]
        assert tested[-1]["test_acc"] > tested[0]["test_acc"] - 0.05
        # node.eval_train: the node's own shard is evaluated in the same rounds
        assert [r["round"] for r in records if r.get("train_acc") is not None] == [4, 9, 14, 19]
        assert tested[-1]["train_acc"] >= 0.85 and tested[-1]["train_eval_loss"] > 0
        # bytes grow every round: four neighbours' models in, four out
        assert records[-1]["bytes_sent"] > records[0]["bytes_sent"] > 0
        assert records[-1]["bytes_received"] > 0
    # neighbours agree more with each other than at the start: models are being averaged
    summary_file = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary_file["test_acc_mean"] == summary["test_acc_mean"]
    assert Graph.read(tmp_path / "run/machine_0/graph.edges").n == 8
    assert load_config(tmp_path / "run/machine_0/config.yaml").run.rounds == 20
    assert (tmp_path / "run/machine_0/node_0.log").read_text().count("connected to 4 peers") == 1

    written = plot_run(tmp_path / "run")
    figures = {f"{m}{axis}.{ext}" for m in ("test_acc", "test_loss", "train_loss", "train_acc")
               for axis in ("", "_vs_bytes", "_vs_time") for ext in ("png", "csv")}
    assert {p.name for p in written} == {"metrics.csv"} | figures
    csv = (tmp_path / "run/metrics.csv").read_text().splitlines()
    assert csv[0].startswith("round,nodes,train_loss_mean") and len(csv) == 21


def test_a_failing_node_fails_the_run_with_its_error(tmp_path, base_port):
    cfg = dpsgd_config(base_port, "run.procs_per_machine=4", "graph.degree=2", "model.name=mlp",
                       "model.partitions=5")  # mlp with one hidden layer has 2 layers: every node fails
    with pytest.raises(RunFailed, match=r"node \d failed: ValueError: model 'mlp' .* model.partitions=5"):
        run_experiment(cfg, tmp_path / "run")


def test_cli_help_for_every_subcommand():
    for sub in ([], ["run"], ["check-config"], ["generate-graph"], ["plot"], ["stages"]):
        out = subprocess.run([sys.executable, "-m", "dflsplit.cli", *sub, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: dflsplit" in out.stdout, out.stderr


def test_cli_config_error_is_reported_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  roundz: 3\n")
    out = subprocess.run([sys.executable, "-m", "dflsplit.cli", "run", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown key 'roundz' (did you mean 'rounds'?)" in out.stderr and "Traceback" not in out.stderr


def test_cli_check_config_prints_every_key():
    out = subprocess.run([sys.executable, "-m", "dflsplit.cli", "check-config", str(ROOT / "eval/configs/default.yaml"),
                          "--set", "run.rounds=3"], capture_output=True, text=True)
    assert out.returncode == 0 and "rounds: 3" in out.stdout and "eval_batch_size:" in out.stdout


def test_run_sh_usage():
    out = subprocess.run(["bash", str(ROOT / "eval/run.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "MACHINE_ID" in out.stderr
