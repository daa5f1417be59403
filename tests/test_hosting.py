"""Many nodes per process (``run.nodes_per_process``): threads sharing a ZeroMQ context and a
libtorrent session, with results identical to one node per process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dflsplit.config import load_config
from dflsplit.launch import run_experiment
from dflsplit.mappings import LinearMapping
from dflsplit.results import read_json, read_run

from conftest import next_base_port

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("round", "train_loss", "test_loss", "test_acc", "peers_in")


def test_process_groups_of_a_machine():
    m = LinearMapping(2, 6, {0: "127.0.0.1", 1: "127.0.0.2"}, 20000, nodes_per_process=4)
    assert m.process_groups(m.local_uids(0)) == [[0, 1, 2, 3], [4, 5]]
    assert m.process_groups(m.local_uids(1)) == [[6, 7, 8, 9], [10, 11]]
    assert [m.leader(u) for u in (0, 3, 4, 5, 9, 11)] == [0, 0, 4, 4, 6, 10]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "torrent"])
def test_eight_nodes_in_two_processes_equal_eight_processes(tmp_path, transport):
    extra = ["communication.name=tcp"] if transport == "tcp" else ["communication.path=torrent"]
    runs = {}
    for npp in (1, 4):
        cfg = load_config(ROOT / "eval/configs/default.yaml", [
            "run.procs_per_machine=8", "graph.degree=3", "run.rounds=6", "node.test_after=2", "run.progress=false",
            "node.save_model=true", f"run.nodes_per_process={npp}", f"run.base_port={next_base_port(9)}", *extra])
        out = tmp_path / f"npp{npp}"
        run_experiment(cfg, out)
        runs[npp] = out
    pids = read_json(runs[4] / "machine_0/pids.json")
    assert len(set(pids.values())) == 2 and pids["0"] == pids["3"] != pids["4"]
    one, many = read_run(runs[1]), read_run(runs[4])
    for uid in range(8):
        assert [tuple(r.get(k) for k in FIELDS) for r in one[uid]] == \
               [tuple(r.get(k) for k in FIELDS) for r in many[uid]], uid
        a = load_file(str(runs[1] / "machine_0" / f"model_{uid}.safetensors"))
        b = load_file(str(runs[4] / "machine_0" / f"model_{uid}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), uid
        log = (runs[4] / "machine_0" / f"node_{uid}.log").read_text()
        assert f"dflsplit.node.{uid}:" in log and not any(f"dflsplit.node.{u}:" in log for u in range(8) if u != uid)
    if transport == "torrent":  # models went as torrents between the processes (one download per process)
        assert sum(rs[-1]["payload_bytes_received"] for rs in many.values()) > 0
