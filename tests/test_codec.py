import pytest
import torch

from dflsplit.communication.codec import CodecError, decode, encode


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


def test_nothing_is_unpickled():
    import pickle

    payload = pickle.dumps({"w": torch.randn(3)})
    with pytest.raises(CodecError):
        decode(b"DFL1" + len(b"{}").to_bytes(4, "little") + b"{}" + payload)
