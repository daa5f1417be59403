"""Compressed sharings: `topk`, `subsample` and `quantize`.

All three work on the flattened float32 vector of the shared state (`flatten`) and decode
to dense tensors like the receiver's `own`; a coordinate a payload does not carry is taken
from `own` (the receiver's current model, decentralizepy's PartialModel convention).

* ``topk`` — the k = ⌈alpha·d⌉ coordinates that changed most since they were last sent
  (error feedback), as ``values`` float32 [k] and ``indices`` uint8 [n]: the sorted
  indices delta-encoded (first index, then the gaps), each gap an LEB128 varint (7 bits a
  byte, high bit = more bytes follow), the byte stream zlib-compressed; header
  ``{"raw": n}`` = the length of the varint stream before compression.
* ``subsample`` — k coordinates drawn from a seed both ends know
  (``mixing_seed(run.seed, sender, round)``), so only ``values`` float32 [k] travel.
* ``quantize`` — QSGD stochastic quantisation per bucket: ``scales`` float32 [buckets]
  and ``levels`` uint8 [⌈d·b/8⌉], the signed level q ∈ [−s, s] of each coordinate stored
  as q + s in b = bitlen(2s) bits (6 bits for s = 16), packed little-endian bit order.

Malformed payloads raise `PayloadMismatch` (via `Sharing.mismatch`) naming the problem.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from ..registry import key
from .base import SHARINGS, Payload, Sharing, Spec, count_for, flatten, mixing_seed, numel, shared_state, unflatten

_MAX_VARINT = 9  # 9 × 7 = 63 bits: every index of an int64-addressable model


# helpers ----------------------------------------------------------------------------
def _tensor(fail: Callable[[str], Exception], tensors: Mapping[str, torch.Tensor], name: str,
            dtype: torch.dtype, length: int | None) -> torch.Tensor:
    """`tensors[name]`, checked to be a 1-D tensor of `dtype` (and `length`, unless None);
    `fail(what)` makes the error (``partial(self.mismatch, sender, round_)``)."""
    t = tensors.get(name)
    if t is None:
        raise fail(f"missing tensor {name!r}")
    if t.dtype != dtype or t.dim() != 1 or (length is not None and t.numel() != length):
        want = f"[{length if length is not None else 'n'}] {str(dtype).removeprefix('torch.')}"
        raise fail(f"tensor {name!r} is {list(t.shape)} {str(t.dtype).removeprefix('torch.')}, expected {want}")
    return t.detach().to("cpu")


def _finite(fail: Callable[[str], Exception], t: torch.Tensor, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(t)
    if bad.any():
        raise fail(f"{int(bad.sum())} non-finite value(s) in {name!r}")
    return t


def _fill(own: Mapping[str, torch.Tensor], idx: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """`own` with the flat coordinates `idx` replaced by `values`."""
    vec = flatten(own).clone()
    vec[idx] = values
    return unflatten(vec, own)


def pack_indices(idx: np.ndarray) -> tuple[bytes, int]:
    """Sorted indices → (zlib of their LEB128 gap varints, length of the varint stream)."""
    gaps = np.diff(np.asarray(idx, dtype=np.uint64), prepend=np.uint64(0))
    nbytes = np.ones(gaps.size, np.int64)
    for j in range(1, _MAX_VARINT):
        nbytes += (gaps >> np.uint64(7 * j)) > 0
    shifts = np.arange(_MAX_VARINT, dtype=np.uint64) * np.uint64(7)
    groups = ((gaps[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    pos = np.arange(_MAX_VARINT)[None, :]
    groups[pos < (nbytes - 1)[:, None]] |= 0x80
    raw = groups[pos < nbytes[:, None]].tobytes()
    return zlib.compress(raw, 9), len(raw)


def unpack_indices(data: bytes, raw: int, k: int, d: int) -> np.ndarray:
    """Inverse of `pack_indices`, checked: k strictly increasing indices below d (ValueError naming the problem)."""
    z = zlib.decompressobj()
    try:
        stream = z.decompress(data, raw + 1)
    except zlib.error as e:
        raise ValueError(f"indices are not valid zlib data ({e})") from None
    if not z.eof or z.unused_data or len(stream) != raw:
        raise ValueError(f"indices do not decompress to exactly {raw} bytes (truncated or padded)")
    b = np.frombuffer(stream, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if b.size and ends[-1] != b.size - 1:
        raise ValueError("index stream ends inside a varint (truncated)")
    if ends.size != k:
        raise ValueError(f"{ends.size} indices, expected {k}")
    if k == 0:
        return np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT:
        raise ValueError(f"an index varint is longer than {_MAX_VARINT} bytes")
    pos = np.arange(b.size) - np.repeat(starts, lengths)
    gaps = np.add.reduceat((b & 0x7F).astype(np.uint64) << (pos.astype(np.uint64) * np.uint64(7)), starts)
    if (gaps >= np.uint64(d)).any():
        raise ValueError(f"index out of range (model has {d} coordinates)")
    if (gaps[1:] == 0).any():
        raise ValueError("repeated index (indices must be strictly increasing)")
    idx = np.cumsum(gaps.astype(np.int64))
    if idx[-1] >= d:
        raise ValueError(f"index {int(idx[-1])} out of range (model has {d} coordinates)")
    return idx


# top-k ------------------------------------------------------------------------------
@dataclass
class TopKKeys:
    alpha: float = key(0.1, "fraction of coordinates sent each round (those that changed most)", gt=0, le=1)


@SHARINGS.register("topk", keys=TopKKeys)
class TopK(Sharing):
    """Top-k of |x − reference| with error feedback.

    `reference` holds each coordinate's value as last sent; it starts at zeros (the model
    at the first encode counts as never sent), so round 0 sends the k largest-magnitude
    weights and a change that is not sent keeps accumulating until it is among the top k.
    A receiver that decodes every payload onto the previous result holds `reference` exactly.
    """

    def __init__(self, cfg, uid: int):
        super().__init__(cfg, uid)
        self.alpha = cfg.sharing.alpha
        self.reference: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]

    def encode(self, model: nn.Module, round_: int) -> Payload:
        x = flatten(shared_state(model))
        if self.reference is None:
            self.reference = torch.zeros_like(x)
        if self.reference.numel() != x.numel():
            raise ValueError(f"topk: model has {x.numel()} coordinates, the reference {self.reference.numel()}")
        k = count_for(self.alpha, x.numel())
        idx = torch.topk((x - self.reference).abs(), k, sorted=False).indices.sort().values
        values = x[idx]
        self.reference[idx] = values
        data, raw = pack_indices(idx.numpy())
        return Payload({"values": values, "indices": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, {"raw": raw})

    def expect(self, sender: int, round_: int, own: Mapping[str, torch.Tensor]) -> Spec:
        return {"values": ((count_for(self.alpha, numel(own)),), "float32"), "indices": ((None,), "uint8")}

    def decode(self, sender: int, round_: int, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any],
               own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fail, d = partial(self.mismatch, sender, round_), numel(own)
        k = count_for(self.alpha, d)
        values = _finite(fail, _tensor(fail, tensors, "values", torch.float32, k), "values")
        packed = _tensor(fail, tensors, "indices", torch.uint8, None)
        if not isinstance(header, Mapping) or "raw" not in header:
            raise fail("header field 'raw' (length of the index stream) is missing")
        raw = header["raw"]
        if not isinstance(raw, int) or isinstance(raw, bool) or not k <= raw <= _MAX_VARINT * k:
            raise fail(f"header 'raw' must be an integer in [{k}, {_MAX_VARINT * k}], got {raw!r}")
        try:
            idx = unpack_indices(packed.numpy().tobytes(), raw, k, d)
        except ValueError as e:
            raise fail(str(e)) from None
        return _fill(own, torch.from_numpy(idx), values)


# random subsampling -----------------------------------------------------------------
@dataclass
class SubsampleKeys:
    alpha: float = key(0.1, "fraction of coordinates sent each round (a random mask from the shared seed)", gt=0, le=1)


@SHARINGS.register("subsample", keys=SubsampleKeys)
class Subsample(Sharing):
    """k random coordinates per (sender, round); the receiver regenerates the mask from the seed."""

    def __init__(self, cfg, uid: int):
        super().__init__(cfg, uid)
        self.alpha = cfg.sharing.alpha

    def mask(self, sender: int, round_: int, d: int) -> torch.Tensor:
        """The sorted flat indices `sender` sends in `round_` (the same on every node)."""
        g = torch.Generator().manual_seed(mixing_seed(self.cfg.run.seed, sender, round_))
        return torch.randperm(d, generator=g)[:count_for(self.alpha, d)].sort().values

    def encode(self, model: nn.Module, round_: int) -> Payload:
        x = flatten(shared_state(model))
        return Payload({"values": x[self.mask(self.uid, round_, x.numel())]})

    def expect(self, sender: int, round_: int, own: Mapping[str, torch.Tensor]) -> Spec:
        return {"values": ((count_for(self.alpha, numel(own)),), "float32")}

    def decode(self, sender: int, round_: int, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any],
               own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fail, d = partial(self.mismatch, sender, round_), numel(own)
        values = _tensor(fail, tensors, "values", torch.float32, count_for(self.alpha, d))
        return _fill(own, self.mask(sender, round_, d), _finite(fail, values, "values"))


# QSGD quantisation ------------------------------------------------------------------
@dataclass
class QuantizeKeys:
    levels: int = key(16, "quantisation levels s per sign; each coordinate takes bitlen(2s) bits", ge=1, le=127)
    bucket_size: int = key(512, "coordinates sharing one scale", ge=1)
    norm: Literal["linf", "l2"] = key("linf", "bucket scale: 'linf' (max-abs, low variance) or 'l2' (QSGD's norm)")


@SHARINGS.register("quantize", keys=QuantizeKeys)
class Quantize(Sharing):
    """Unbiased stochastic quantisation of the model values (Alistarh et al., 2017).

    Per bucket v: scale = ‖v‖ (max-abs or l2), level ξ = ⌊|v|/scale·s + u⌋ with
    u ~ U[0, 1) seeded by ``mixing_seed(run.seed, uid, round, 1)``; the receiver gets
    sign·scale·ξ/s, whose expectation is v. The error per coordinate is at most scale/s;
    with 'linf' that is max|v|/s, with 'l2' ‖v‖₂/s, which for s = 16 and buckets of 512
    is larger than the weights themselves (hence the 'linf' default).
    """

    def __init__(self, cfg, uid: int):
        super().__init__(cfg, uid)
        self.s, self.bucket, self.norm = cfg.sharing.levels, cfg.sharing.bucket_size, cfg.sharing.norm
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"quantize: norm must be 'linf' or 'l2', got {self.norm!r}")
        self.bits = (2 * self.s).bit_length()

    def _sizes(self, d: int) -> tuple[int, int]:
        """(number of buckets, bytes of packed levels) for d coordinates."""
        return math.ceil(d / self.bucket), math.ceil(d * self.bits / 8)

    def encode(self, model: nn.Module, round_: int) -> Payload:
        x = flatten(shared_state(model))
        d = x.numel()
        buckets = torch.nn.functional.pad(x, (0, self._sizes(d)[0] * self.bucket - d)).view(-1, self.bucket)
        scales = buckets.abs().amax(1) if self.norm == "linf" else buckets.norm(dim=1)
        g = torch.Generator().manual_seed(mixing_seed(self.cfg.run.seed, self.uid, round_, 1))
        u = torch.rand(buckets.shape, generator=g)
        ratio = torch.where(scales[:, None] > 0, buckets.abs() / scales[:, None].clamp_min(1e-38), 0.0)
        level = torch.floor(ratio * self.s + u).clamp_(0, self.s)
        codes = (torch.sign(buckets) * level + self.s).to(torch.uint8).reshape(-1)[:d].numpy()
        bits = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :self.bits]
        packed = np.packbits(bits.reshape(-1), bitorder="little")
        return Payload({"scales": scales, "levels": torch.from_numpy(packed)})

    def expect(self, sender: int, round_: int, own: Mapping[str, torch.Tensor]) -> Spec:
        nb, nl = self._sizes(numel(own))
        return {"scales": ((nb,), "float32"), "levels": ((nl,), "uint8")}

    def decode(self, sender: int, round_: int, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any],
               own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fail, d = partial(self.mismatch, sender, round_), numel(own)
        nb, nl = self._sizes(d)
        scales = _finite(fail, _tensor(fail, tensors, "scales", torch.float32, nb), "scales")
        if (scales < 0).any():
            raise fail(f"{int((scales < 0).sum())} negative value(s) in 'scales'")
        packed = _tensor(fail, tensors, "levels", torch.uint8, nl).numpy()
        bits = np.unpackbits(packed, bitorder="little", count=d * self.bits).reshape(d, self.bits)
        codes = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little")[:, 0].astype(np.int64))
        if (codes > 2 * self.s).any():
            raise fail(f"level code out of range (above {2 * self.s} for {self.s} levels)")
        step = torch.repeat_interleave(scales / self.s, self.bucket)[:d]
        return unflatten((codes - self.s).to(torch.float32) * step, own)


__all__ = ["TopK", "TopKKeys", "Subsample", "SubsampleKeys", "Quantize", "QuantizeKeys", "pack_indices", "unpack_indices"]
