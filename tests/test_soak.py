"""A small soak (eval/bench/soak.py's engine): nodes killed with SIGKILL and restarted with
--resume while the run goes on; memory per node stays flat, nothing is left behind."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "bench"))

from soak import Soak  # noqa: E402


@pytest.mark.slow
def test_soak_kills_and_restarts_leave_nothing_behind(tmp_path):
    soak = Soak(nodes=10, rounds=80, kill=0.2, seed=3, out=tmp_path / "run").run(say=lambda line: None)
    assert len(soak.kills) == 2
    assert all(rc == 0 for rc in soak.returncodes), soak.returncodes
    growth = soak.growth()
    assert growth and max(growth) < 0.10, growth  # memory per node after round 10
    assert soak.leftover_spools == 0 and soak.leftover_processes == []
