import io
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from dflsplit.communication import CommError, PayloadRejected
from dflsplit.communication.codec import CodecError, decode, decode_tensors, encode
from dflsplit.communication.control import DATA


def test_round_trip_dtypes_shapes_and_empty():
    tensors = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(5, dtype=torch.float64),
        "bf16": torch.randn(2, 2).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(10),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(0, 5),
        "noncontig": torch.randn(4, 6).t(),
    }
    header, out = decode(encode({"key": "k", "n": [1, 2]}, tensors))
    assert header == {"key": "k", "n": [1, 2]}
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.equal(out[k], v)


def test_no_tensors():
    assert decode(encode({"a": 1})) == ({"a": 1}, {})


@pytest.mark.parametrize("cut", [0, 3, 7, 10, -1, -20])
def test_truncated_frames_are_rejected(cut):
    data = encode({"key": "x"}, {"w": torch.randn(16)})
    with pytest.raises(CodecError):
        decode(data[:cut])


def test_malformed_frames_are_rejected():
    data = bytearray(encode({"key": "x"}, {"w": torch.randn(16)}))
    with pytest.raises(CodecError, match="bad magic"):
        decode(b"XXXX" + bytes(data[4:]))
    bad_json = bytearray(data)
    bad_json[8] = ord("[")  # header no longer a JSON object / valid JSON
    with pytest.raises(CodecError, match="malformed header"):
        decode(bytes(bad_json))
    with pytest.raises(CodecError, match="malformed tensor payload"):
        decode(bytes(data[:20]) + b"\xff" * 8 + bytes(data[28:]))
    with pytest.raises(CodecError):
        decode(b"")


class Trap:
    """Unpickling this creates the file `path`: the visible side effect of a pickle run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def pickles(path: Path) -> dict[str, bytes]:
    """A plain pickle and a torch.save archive, each of which creates `path` when loaded."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3), "trap": Trap(path)}, buf)
    return {"pickle": pickle.dumps({"w": torch.zeros(3), "trap": Trap(path)}), "torch.save": buf.getvalue()}


def test_the_trap_springs_when_unpickled(tmp_path):
    """The control of the tests below: loading these payloads does create the file."""
    sprung = tmp_path / "sprung"
    blobs = pickles(sprung)
    pickle.loads(blobs["pickle"])
    assert sprung.exists()
    sprung.unlink()
    torch.load(io.BytesIO(blobs["torch.save"]), weights_only=False)
    assert sprung.exists()


def test_nothing_is_unpickled_by_the_codec(tmp_path):
    sprung = tmp_path / "sprung"
    for kind, blob in pickles(sprung).items():
        with pytest.raises(CodecError):
            decode(b"DFL1" + len(b"{}").to_bytes(4, "little") + b"{}" + blob)
        with pytest.raises(CodecError):
            decode(blob)
        with pytest.raises(CodecError):
            decode_tensors(blob)
    assert not sprung.exists()


def test_nothing_is_unpickled_from_a_data_frame(tmp_path, base_port):
    from test_transport_tcp import close_all, connect_full, start_all

    sprung = tmp_path / "sprung"
    _, ts = start_all(2, base_port)
    try:
        connect_full(ts)
        for kind, blob in pickles(sprung).items():
            head = json.dumps({"key": f"trap/{kind}", "h": {}}).encode()
            ts[0].control.send(1, DATA, b"DFL1" + len(head).to_bytes(4, "little") + head + blob)
            ts[0].control.send(1, DATA, blob)  # not even a codec message
        ts[0].publish("ok", {"x": torch.ones(2)}, to=[1])  # after the traps on the same socket
        assert ts[1].receive("ok", 0).key == "ok"
        for kind in pickles(sprung):
            with pytest.raises(PayloadRejected, match=rf"'trap/{re.escape(kind)}' from node 0 rejected: malformed"):
                ts[1].receive(f"trap/{kind}", 0)
        assert len(ts[1].mailbox) == 0
    finally:
        close_all(ts)
    assert not sprung.exists()


def test_nothing_is_unpickled_from_a_torrent_payload(tmp_path):
    from dflsplit.communication.torrent_wire import TORRENT, announcement_body
    from test_torrent import cluster

    sprung = tmp_path / "sprung"
    with cluster(2) as ts:
        for kind, blob in pickles(sprung).items():
            key = f"trap/{kind}"
            t, meta = ts[0].plane.seed(0, key, blob, [1], 0)  # the payload file is the pickle
            ts[0].control.send(1, TORRENT, announcement_body(ts[0].wire_head(key, {}), meta, [1], len(blob)))
            with pytest.raises(CommError, match=rf"payload '{key}' from node 0 is not valid safetensors"):
                ts[1].receive(key, 0)
            assert ts[1].progress(key, 0)["seeding"]  # it was downloaded whole, then refused
    assert not sprung.exists()
