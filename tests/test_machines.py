"""Runs on several machines (two or three launchers on this host, 127.0.0.x each), run folders,
the start barrier, run identity, SLURM and machine ids, Ctrl-C, merge."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dflsplit.communication import CommError, build_transport
from dflsplit.config import section_from_dict
from dflsplit.mappings import LinearMapping, MappingError
from dflsplit.mappings.hosts import expand_hostlist, local_machine_id, slurm_hosts
from dflsplit.results import merge_runs, read_json, read_run

from conftest import in_parallel, next_base_port, term_context

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "eval" / "run.sh"
CONFIG = ROOT / "eval" / "configs" / "default.yaml"
SMALL = ["--set", "run.rounds=2", "--set", "node.test_after=2", "--set", "graph.degree=2", "--no-progress"]


def env_here() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NODEID"):
        env.pop(k, None)
    return env


def dflsplit(*args) -> list[str]:
    return [sys.executable, "-m", "dflsplit.cli", *map(str, args)]


def start(cmd, cwd, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env or env_here(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc, timeout=240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"did not exit in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def ip_file(tmp_path, n) -> Path:
    path = tmp_path / f"ip{n}.json"
    path.write_text(json.dumps({str(m): f"127.0.0.{m + 1}" for m in range(n)}))
    return path


# --- run folders ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_started_together_on_one_host_get_separate_folders(tmp_path):
    procs = [start(dflsplit("run", CONFIG, "--set", "run.procs_per_machine=4", "--set",
                            f"run.base_port={next_base_port(5)}", *SMALL), tmp_path) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, folders
    for folder in folders:
        run = read_run(folder)
        assert sorted(run) == [0, 1, 2, 3]
        assert all([r["round"] for r in rs] == [0, 1] for rs in run.values())  # nothing appended twice
        assert read_json(folder / "summary.json")["nodes"] == 4
    ids = {read_json(f / "machine_0" / "run.json")["run_id"] for f in folders}
    assert len(ids) == 2


def test_out_at_an_existing_run_is_refused_unless_overwrite(tmp_path):
    port = next_base_port(3)
    cmd = dflsplit("run", CONFIG, "--set", "run.procs_per_machine=2", "--set", f"run.base_port={port}",
                   "--out", tmp_path / "run", *SMALL, "--set", "graph.degree=1")
    rc, _, err = finish(start(cmd, tmp_path))
    assert rc == 0, err
    first = (tmp_path / "run" / "machine_0" / "node_0.jsonl").read_text()
    rc, _, err = finish(start(cmd, tmp_path))
    assert rc == 2 and "already holds results" in err and "--overwrite" in err, err
    assert (tmp_path / "run" / "machine_0" / "node_0.jsonl").read_text() == first  # untouched
    rc, _, err = finish(start(cmd + ["--overwrite"], tmp_path))
    assert rc == 0, err
    assert len((tmp_path / "run" / "machine_0" / "node_0.jsonl").read_text().splitlines()) == 2


# --- several machines ------------------------------------------------------------------------


def readme_two_machine_commands() -> list[list[str]]:
    """The README's commands for two machines on this host (lines starting eval/run.sh that
    use the loopback ip file)."""
    text = (ROOT / "README.rst").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("eval/run.sh")
             and "ip_loopback2.json" in ln]
    cmds = [ln.split("#")[0].split() for ln in lines]
    assert len(cmds) == 2, lines
    return cmds


@pytest.mark.slow
def test_the_readme_two_machine_commands_end_with_one_summary_of_all_32_nodes(tmp_path):
    port = next_base_port(33)
    procs = [start([*c, "--set", f"run.base_port={port}", "--set", f"run.out_dir={tmp_path / 'runs'}", *SMALL],
                   ROOT) for c in readme_two_machine_commands()]  # as written, from the repository's root
    results = [finish(p, timeout=400) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    (folder,) = (tmp_path / "runs").iterdir()
    summary = read_json(folder / "summary.json")
    assert summary["nodes"] == 32 and summary["machines"] == 2 and summary["machines_missing"] == []
    assert sorted(map(int, summary["final_test_acc"])) == list(range(32))
    assert sorted(p.name for p in folder.iterdir()) == ["machine_0", "machine_1", "summary.json"]
    ids = {read_json(folder / f"machine_{m}" / "run.json")["run_id"] for m in (0, 1)}
    assert len(ids) == 1
    # merge, offline, from two copies that each hold one machine
    a, b = tmp_path / "copy_a", tmp_path / "copy_b"
    shutil.copytree(folder / "machine_0", a / "machine_0")
    shutil.copytree(folder / "machine_1", b / "machine_1")
    out = subprocess.run(dflsplit("merge", a, b), capture_output=True, text=True, env=env_here())
    assert out.returncode == 0, out.stderr
    merged = read_json(a / "summary.json")
    assert merged["nodes"] == 32 and merged["test_acc_mean"] == pytest.approx(summary["test_acc_mean"])


def test_merge_refuses_folders_of_different_runs(tmp_path):
    for name, rid in (("a", "run-1"), ("b", "run-2")):
        d = tmp_path / name / "machine_0"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"run_id": rid, "machine_id": 0, "machines": 1}))
    with pytest.raises(ValueError, match="different runs: run-1 .* run-2"):
        merge_runs([tmp_path / "a", tmp_path / "b"])


@pytest.mark.slow
def test_barrier_names_the_missing_machine_and_its_host(tmp_path):
    ip = ip_file(tmp_path, 2)
    cmd = [RUN_SH, "-m", "0", "-i", ip, "-p", "2", "-b", next_base_port(5), CONFIG,
           "--set", "run.start_timeout=6", *SMALL]
    rc, _, err = finish(start(list(map(str, cmd)), tmp_path), timeout=120)
    assert rc == 2
    assert "waiting for machine 1 (127.0.0.2): 1 of 2 machines up" in err
    assert re.search(r"start barrier: machine 1 \(127\.0\.0\.2\) did not join within 6 s", err), err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_machine_killed_during_the_barrier_makes_the_others_exit_naming_it(tmp_path):
    """Three machines, two started; machine 1 is killed once it joined: machine 0 names it
    (silent) long before start_timeout, and exits non-zero."""
    ip = ip_file(tmp_path, 3)
    port = next_base_port(7)
    common = ["-i", ip, "-p", "2", "-b", port, CONFIG, "--set", "run.start_timeout=60", *SMALL]
    m0 = start(list(map(str, [RUN_SH, "-m", "0", *common])), tmp_path)
    m1 = start(list(map(str, [RUN_SH, "-m", "1", *common])), tmp_path)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = m0.stderr.readline()
        lines.append(line)
        if "machine 1 (127.0.0.2) joined" in line or not line:
            break
    assert any("joined" in ln for ln in lines), lines
    os.killpg(m1.pid, signal.SIGKILL)
    m1.wait()
    rc, _, err = finish(m0, timeout=70)  # start_timeout + 10
    err = "".join(lines) + err
    assert rc == 2
    assert "machine 1 (127.0.0.2) went silent during the barrier" in err, err


@pytest.mark.slow
def test_a_machine_with_another_config_is_refused_naming_it(tmp_path):
    ip = ip_file(tmp_path, 2)
    port = next_base_port(5)
    common = ["-i", ip, "-p", "2", "-b", port, CONFIG, "--set", "run.start_timeout=8", *SMALL]
    m0 = start(list(map(str, [RUN_SH, "-m", "0", *common])), tmp_path)
    m1 = start(list(map(str, [RUN_SH, "-m", "1", *common, "--set", "optimizer.lr=0.2"])), tmp_path)
    rc1, _, err1 = finish(m1, timeout=120)
    rc0, _, err0 = finish(m0, timeout=120)
    assert rc1 == 2 and "machine 1 (127.0.0.2) runs a different configuration than machine 0" in err1, err1
    assert rc0 == 2 and "machine 1 (127.0.0.2) did not join" in err0, err0


def test_a_node_of_another_run_is_refused_with_a_message_saying_so():
    base = next_base_port(2)
    mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, base)
    cfg = section_from_dict("communication", name="tcp", hello_timeout=10, timeout=5)
    a = build_transport(0, mapping, cfg, {"run": "run-A", "config": "c1"})
    b = build_transport(1, mapping, cfg, {"run": "run-B", "config": "c1"})
    a.start()
    b.start()
    errors = []

    def connect(t, peer):
        try:
            t.connect([peer], timeout=10)
        except CommError as e:
            errors.append(str(e))

    try:
        in_parallel([lambda: connect(a, 1), lambda: connect(b, 0)], timeout=30)
    finally:
        a.close(timeout=0.5)
        b.close(timeout=0.5)
    assert len(errors) == 2, errors
    assert any("node 1 at tcp://127.0.0.1" in e and "refused the handshake" in e and "belongs to run 'run-B'" in e
               for e in errors), errors
    assert a.dropped.counts()["HELLO of another run or configuration"] >= 1


def test_a_stranger_claiming_a_node_id_first_cannot_block_or_replace_it():
    """Before node 1 connects, a stranger opens connections to node 0 claiming to be node 1
    (HELLOs with its id, DATA frames); node 1 still connects, and only its payload arrives."""
    import zmq

    from dflsplit.communication.codec import encode

    base = next_base_port(2)
    mapping = LinearMapping(1, 2, {0: "127.0.0.1"}, base)
    cfg = section_from_dict("communication", name="tcp", hello_timeout=10, timeout=5)
    node0 = build_transport(0, mapping, cfg, {"run": "r", "config": "c"})
    node0.start()
    ctx = zmq.Context()
    socks = []
    try:
        for ident in (b"1", b"\x011234567890abcdef", None):
            s = ctx.socket(zmq.DEALER)
            if ident:
                s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(mapping.control_address(0))
            s.send_multipart([b"HELLO", encode({"uid": 1, "session": "s", "nonce": "n", "run": "r", "config": "c"})])
            s.send_multipart([b"DATA", encode({"key": "model/0", "h": {}, "r": 0}, {"w": torch.full((3,), 666.0)})])
            socks.append(s)
        node1 = build_transport(1, mapping, cfg, {"run": "r", "config": "c"})
        node1.start()
        try:
            in_parallel([lambda: node0.connect([1]), lambda: node1.connect([0])], timeout=30)
            node1.publish("model/0", {"w": torch.ones(3)}, to=[0])
            got = node0.receive("model/0", 1)
            assert torch.equal(got.tensors["w"], torch.ones(3))
        finally:
            in_parallel([lambda: node1.close(timeout=2), lambda: node0.close(timeout=2)], timeout=30)
    finally:
        for s in socks:
            s.close(0)
        term_context(ctx)
    assert node0.dropped.counts()["frame from a connection that is not an authenticated node"] >= 3


# --- machine ids and SLURM ---------------------------------------------------------------------


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],login1", ["node01", "node02", "node03", "node07", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("127.0.0.[1-3]", ["127.0.0.1", "127.0.0.2", "127.0.0.3"]),
])
def test_slurm_host_lists_expand(text, hosts):
    assert expand_hostlist(text) == hosts


def test_slurm_gives_the_hosts_and_this_machine_id():
    assert slurm_hosts({}) is None
    hosts, me = slurm_hosts({"SLURM_JOB_NODELIST": "gpu[1-3]", "SLURM_NODEID": "2"})
    assert hosts == {0: "gpu1", 1: "gpu2", 2: "gpu3"} and me == 2
    with pytest.raises(MappingError, match="SLURM_NODEID 5 is outside the job's 3 nodes"):
        slurm_hosts({"SLURM_JOB_NODELIST": "gpu[1-3]", "SLURM_NODEID": "5"})
    with pytest.raises(MappingError, match="unbalanced"):
        expand_hostlist("gpu[1-3")


def test_machine_id_from_this_hosts_addresses():
    assert local_machine_id({0: "192.0.2.1", 1: "127.0.0.1"}) == 1  # 192.0.2.0/24 is TEST-NET: never local
    with pytest.raises(MappingError, match="none of its hosts .* is this machine"):
        local_machine_id({0: "192.0.2.1"})
    with pytest.raises(MappingError, match=r"machines \[0, 1\] all are this machine"):
        local_machine_id({0: "127.0.0.1", 1: "localhost"})


def test_an_ip_file_host_that_does_not_resolve_fails_before_anything_starts(tmp_path):
    bad = tmp_path / "ip.json"
    bad.write_text(json.dumps({"0": "127.0.0.1", "1": "no-such-host.invalid"}))
    out = subprocess.run(dflsplit("run", CONFIG, "--machine-id", "0", "--ip-file", bad, *SMALL),
                         capture_output=True, text=True, env=env_here(), cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "machine 1's host 'no-such-host.invalid' does not resolve" in out.stderr, out.stderr


@pytest.mark.slow
def test_srun_style_start_takes_hosts_and_ids_from_slurm(tmp_path):
    port = next_base_port(5)
    procs = []
    for node in (0, 1):
        env = env_here()
        env.update(SLURM_JOB_NODELIST="127.0.0.[1-2]", SLURM_NODEID=str(node))
        procs.append(start([str(RUN_SH), "-p", "2", "-b", str(port), str(CONFIG), *SMALL], tmp_path, env))
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    (folder,) = (tmp_path / "runs").iterdir()
    assert read_json(folder / "summary.json")["nodes"] == 4


# --- stopping and logging ----------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_every_node_with_one_line(tmp_path):
    cmd = dflsplit("run", CONFIG, "--set", "run.procs_per_machine=4", "--set", "run.rounds=500", "--set",
                   "graph.degree=2", "--set", f"run.base_port={next_base_port(5)}", "--out", tmp_path / "run",
                   "--no-progress")
    proc = start(cmd, tmp_path)
    launcher = psutil.Process(proc.pid)
    nodes = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if all((tmp_path / f"run/machine_0/node_{u}.jsonl").stat().st_size
               if (tmp_path / f"run/machine_0/node_{u}.jsonl").exists() else 0 for u in range(4)):
            break  # every node is in its rounds
        time.sleep(0.2)
    nodes = launcher.children()
    assert len(nodes) == 4
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    rc, out, err = finish(proc, timeout=60)
    assert rc == 130
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        f"dflsplit run: interrupted: stopped 4 nodes of machine 0; results so far in {tmp_path / 'run/machine_0'}"]
    gone, alive = psutil.wait_procs(nodes, timeout=10)
    assert not alive


@pytest.mark.slow
def test_verbose_logs_handshake_publish_receive_and_start(tmp_path):
    cmd = dflsplit("-v", "run", CONFIG, "--set", "run.procs_per_machine=3", "--set", "graph.degree=2",
                   "--set", f"run.base_port={next_base_port(4)}", "--out", tmp_path / "run", *SMALL)
    rc, _, err = finish(start(cmd, tmp_path))
    assert rc == 0, err
    log = (tmp_path / "run/machine_0/node_0.log").read_text()
    for what in ("DEBUG", "HELLO to node", "authenticated", "start signal", "published", "received"):
        assert what in log, what


@pytest.mark.slow
def test_run_sh_help_examples_run_as_written(tmp_path):
    """Each pair of machine commands in `eval/run.sh --help` (from the repository's root; a base
    port and a results folder of the test's own appended) ends with one summary of every node."""
    text = subprocess.run([str(RUN_SH), "--help"], capture_output=True, text=True, check=True).stdout
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("eval/run.sh ") and "eval/configs" in ln]
    assert len(lines) == 4, text
    for pair, out in ((lines[:2], tmp_path / "positional"), (lines[2:], tmp_path / "flags")):
        port = next_base_port(33)
        procs = [start([*ln.split(), "--set", f"run.base_port={port}", "--set", f"run.out_dir={out}",
                        "--no-progress"], ROOT) for ln in pair]
        results = [finish(p, timeout=400) for p in procs]
        assert all(rc == 0 for rc, _, _ in results), results
        (folder,) = out.iterdir()
        summary = read_json(folder / "summary.json")
        assert summary["machines"] == 2 and summary["machines_missing"] == []
        assert summary["nodes"] == len(read_run(folder)) == (32 if out.name == "positional" else 8)
