"""Training on a GPU: received tensors land on the model's device (run where CUDA exists)."""

import pytest
import torch

from dflsplit.config import load_config
from dflsplit.launch import run_experiment
from dflsplit.results import read_run

from conftest import next_base_port
from test_failures import CONFIG


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("sharing", ["full", "topk"])
def test_four_node_dpsgd_trains_on_cuda(tmp_path, sharing):
    extra = ["sharing.alpha=0.3"] if sharing == "topk" else []
    cfg = load_config(CONFIG, ["run.device=cuda", "run.procs_per_machine=4", "graph.degree=3", "run.rounds=10",
                               "node.test_after=5", "run.progress=false", f"sharing.name={sharing}",
                               f"run.base_port={next_base_port(5)}", *extra])
    summary = run_experiment(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert all(len(rs) == 10 for rs in run.values())
    assert summary["test_acc_mean"] > 0.6, summary
