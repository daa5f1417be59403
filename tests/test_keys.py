"""CURVE keys on the control plane: encrypted, and only the run's nodes get through."""

import subprocess
import sys

import pytest
import torch
import zmq
import zmq.auth

from dflsplit.communication import CommError, PeerTimeout, build_transport
from dflsplit.communication.codec import encode
from dflsplit.communication.keys import CurveKeys, secret_file, write_keys
from dflsplit.config import load_config, section_from_dict
from dflsplit.launch import run_experiment
from dflsplit.mappings import LinearMapping

from conftest import in_parallel, next_base_port, term_context


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    write_keys(folder, 3)
    return folder


def start(n, base, keys, nodes=None, **kw):
    """Nodes 0..n-1 of a run of `nodes` (default n), started and connected."""
    mapping = LinearMapping(1, nodes or n, {0: "127.0.0.1"}, base)
    cfg = section_from_dict("communication", timeout=5, hello_timeout=5, curve_keys=str(keys), **kw)
    ts = [build_transport(u, mapping, cfg) for u in range(n)]
    for t in ts:
        t.start()
    try:
        in_parallel([lambda t=t: t.connect([u for u in range(n) if u != t.uid]) for t in ts], timeout=20)
    except Exception:
        close(ts)
        raise
    return mapping, ts


def close(ts):
    in_parallel([lambda t=t: t.close(timeout=5) for t in ts], timeout=20)


def send_raw(ctx, address, identity, server_key, client_pair=None):
    """A DATA frame from a hand-made DEALER: plain, or with a CURVE key pair. A DEALER whose
    handshake the node refused may have no connection left to queue on; its send then gives
    up after 5 s (the frame not getting through is what the caller checks)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 1000)
    s.setsockopt(zmq.SNDTIMEO, 5000)
    if client_pair is not None:
        s.curve_publickey, s.curve_secretkey = client_pair
        s.curve_serverkey = server_key
    s.connect(address)
    try:
        s.send_multipart([b"DATA", encode({"key": "evil", "h": {}}, {"x": torch.ones(1)})])
    except zmq.Again:
        pass
    return s


@pytest.mark.parametrize("name", ["tcp", "torrent"])
def test_tensors_travel_between_key_holders(keys, name):
    _, ts = start(2, next_base_port(2), keys, name=name, **({"path": "torrent"} if name == "torrent" else {}))
    try:
        x = torch.randn(300, 301)  # a torrent: its metadata goes on the encrypted control plane
        ts[0].publish("model/0", {"w": x}, to=[1])
        assert torch.equal(ts[1].receive("model/0", 0).tensors["w"], x)
    finally:
        close(ts)


def test_only_the_run_keys_and_the_matching_id_get_through(keys, tmp_path):
    mapping, ts = start(2, next_base_port(3), keys, nodes=3, name="tcp")
    ctx = zmq.Context()
    strangers = tmp_path / "strangers"
    write_keys(strangers, 1)
    stranger = zmq.auth.load_certificate(secret_file(strangers, 0))
    node2 = zmq.auth.load_certificate(secret_file(keys, 2))
    server_key = zmq.auth.load_certificate(secret_file(keys, 1))[0]
    address = mapping.control_address(1)
    socks = []
    try:
        socks.append(send_raw(ctx, address, b"0", server_key))  # no encryption at all
        socks.append(send_raw(ctx, address, b"0", server_key, stranger))  # a key outside the run
        socks.append(send_raw(ctx, address, b"0", server_key, node2))  # node 2's key, claiming to be 0
        ts[0].publish("ok", {"x": torch.zeros(2)}, to=[1])
        assert ts[1].receive("ok", 0).sender == 0
        with pytest.raises(PeerTimeout):
            ts[1].receive_any(timeout=1.0, prefix="evil")
        assert ts[1].dropped.counts()["frame from a connection that is not an authenticated node"] >= 1
        # a HELLO with node 2's key claiming to be node 0 is dropped before it is answered
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.SNDTIMEO, 5000)
        s.curve_publickey, s.curve_secretkey = node2
        s.curve_serverkey = server_key
        s.connect(address)
        s.send_multipart([b"HELLO", encode({"uid": 0, "session": "x", "nonce": "y", "run": "", "config": ""})])
        socks.append(s)
        # node 2's key is good for node 2's own id: node 2 joins and its payload gets through
        node_2 = build_transport(2, mapping, ts[0].cfg)
        node_2.start()
        try:
            in_parallel([lambda: node_2.connect([1]), lambda: ts[1].connect([2])], timeout=20)
            node_2.publish("fine", {"x": torch.ones(3)}, to=[1])
            assert ts[1].receive("fine", 2, timeout=5).sender == 2
            assert ts[1].dropped.counts()["frame whose CURVE key is not its node's"] >= 1
        finally:
            in_parallel([lambda: node_2.close(timeout=5)], timeout=20)
    finally:
        for s in socks:
            s.close(0)
        term_context(ctx)
        close(ts)


def test_missing_keys_are_errors_naming_the_file(keys, tmp_path):
    with pytest.raises(CommError, match=r"nowhere: CURVE key folder not found .* dflsplit keys"):
        CurveKeys(tmp_path / "nowhere", 0, range(3))
    secret_file(keys, 1).unlink()
    with pytest.raises(CommError, match=r"node_1\.key_secret: CURVE key file not found"):
        CurveKeys(keys, 1, range(3))
    with pytest.raises(CommError, match=r"keys missing for node\(s\) \[3, 4, 5\] \(node_3\.key, node_4\.key, "
                       r"node_5\.key\).* dflsplit keys .* --nodes 6"):
        CurveKeys(keys, 0, range(6))


def test_keys_cli_writes_pairs_and_refuses_to_overwrite(tmp_path):
    def keys_cli(*args):
        return subprocess.run([sys.executable, "-m", "dflsplit.cli", "keys", *args], capture_output=True, text=True)

    out = keys_cli(str(tmp_path / "k"), "--nodes", "3")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        f"node_{u}.key{s}" for u in range(3) for s in ("", "_secret")
    ]
    assert oct(secret_file(tmp_path / "k", 0).stat().st_mode & 0o777) == "0o600"
    again = keys_cli(str(tmp_path / "k"), "--nodes", "3")
    assert again.returncode == 2 and "node_0.key: key file exists; pass --overwrite" in again.stderr


def test_a_run_with_keys_beside_its_config(tmp_path):
    write_keys(tmp_path / "keys", 4)
    config = tmp_path / "run.yaml"
    config.write_text(
        "run: {procs_per_machine: 4, rounds: 4, progress: false, base_port: %d}\n"
        "model: {name: mlp}\ngraph: {degree: 2}\nnode: {test_after: 4}\noptimizer: {lr: 0.1, momentum: 0.9}\n"
        "training: {local_steps: 20}\ncommunication: {curve_keys: keys}\n" % next_base_port(4)
    )
    summary = run_experiment(load_config(config), tmp_path / "run")
    assert summary["nodes"] == 4 and summary["test_acc_mean"] > 0.8, summary
    assert load_config(tmp_path / "run/machine_0/config.yaml").communication.curve_keys == str(tmp_path / "keys")

    secret_file(tmp_path / "keys", 3).unlink()
    with pytest.raises(CommError, match="node_3.key_secret: CURVE key file not found"):
        run_experiment(load_config(config), tmp_path / "run2")
