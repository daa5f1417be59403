"""Wire format of a message: a JSON header plus named tensors encoded with safetensors.

Layout of one encoded message (all integers little-endian)::

    b"DFL1" | u32 header length | header (UTF-8 JSON object) | safetensors bytes

Decoding never unpickles anything; a truncated or malformed buffer raises CodecError.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

MAGIC = b"DFL1"
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 1 << 20


class CodecError(ValueError):
    """A buffer that is not a valid encoded message."""


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Encode named tensors with safetensors (tensors are made contiguous CPU copies)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def decode_tensors(data: bytes | memoryview) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes; raises CodecError when they are malformed."""
    try:
        return st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CodecError(f"malformed tensor payload: {e}") from None


def encode(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Encode a JSON-serialisable header and optional named tensors into one buffer."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(head)) + head + encode_tensors(tensors or {})


def decode_header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """Return (header, offset of the tensor payload) of an encoded message."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise CodecError(f"truncated message: {len(view)} bytes, need at least {_PREFIX.size}")
    magic, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    end = _PREFIX.size + hlen
    if hlen > MAX_HEADER_BYTES or end > len(view):
        raise CodecError(f"truncated message: header of {hlen} bytes does not fit in {len(view)}")
    try:
        header = json.loads(bytes(view[_PREFIX.size:end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"malformed header: {e}") from None
    if not isinstance(header, dict):
        raise CodecError("malformed header: not a JSON object")
    return header, end


def decode(data: bytes | memoryview) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of `encode`: (header, tensors). Raises CodecError on any malformed input."""
    header, offset = decode_header(data)
    return header, decode_tensors(memoryview(data)[offset:])


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in `tensors`."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def describe(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (shape, dtype name): what a receiver expects of a payload."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
