"""Wire formats of the compressed sharings: topk, subsample, quantize."""

import dataclasses
import math
import zlib
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from torch import nn

from dflsplit.communication import codec
from dflsplit.communication.base import Message, PayloadMismatch, check_payload
from dflsplit.config import load_config
from dflsplit.models import build_model
from dflsplit.sharing.base import SHARINGS, count_for, flatten, shared_state
from dflsplit.sharing.compression import Quantize, Subsample, TopK, pack_indices, unpack_indices


def cfg(seed=1, **sharing):
    return NS(run=NS(seed=seed), sharing=NS(aggregator="mixing", **sharing))


def small(seed):
    """Conv + BatchNorm + Linear: 5242 float coordinates, and an int buffer that stays local."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))


def digits_cnn(seed=0):
    return build_model(NS(name="cnn"), (1, 8, 8), 10, seed=seed)


def perturb(model, seed, scale=0.05):
    """A stand-in for a round of training: every parameter moves a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def own_of(model):
    return {k: v.clone() for k, v in shared_state(model).items()}


def roundtrip(share, sender, round_, model, own):
    """encode → wire bytes → check_payload → decode, as the transport does it."""
    p = share.encode(model, round_)
    header, tensors = codec.decode(codec.encode(p.header, p.tensors))
    check_payload(Message(sender, "model", header, tensors), share.expect(sender, round_, own))
    return p, share.decode(sender, round_, tensors, header, own)


# top-k ------------------------------------------------------------------------------
def test_topk_round_trip_sends_largest_and_fills_from_own():
    sender, receiver = small(0), small(1)
    own = own_of(receiver)
    share = TopK(cfg(alpha=0.1), uid=0)
    p, dec = roundtrip(share, 0, 0, sender, own)
    x, o, y = flatten(shared_state(sender)), flatten(own), flatten(dec)
    d, k = x.numel(), count_for(0.1, x.numel())
    assert (d, k) == (5242, 525) and p.tensors["values"].shape == (k,)
    idx = torch.from_numpy(unpack_indices(p.tensors["indices"].numpy().tobytes(), p.header["raw"], k, d))
    sent = torch.zeros(d, dtype=torch.bool)
    sent[idx] = True
    assert torch.equal(y[sent], x[sent]) and torch.equal(y[~sent], o[~sent])
    # reference starts at zeros: round 0 sends the k largest-magnitude weights
    assert x[sent].abs().min() >= x[~sent].abs().max()
    assert list(dec) == list(own) and "1.num_batches_tracked" not in dec
    assert all(dec[n].shape == own[n].shape and dec[n].dtype == own[n].dtype for n in own)


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_topk_receiver_view_tracks_reference_and_alpha_one_is_full(alpha):
    sender = small(0)
    share, full = TopK(cfg(alpha=alpha), uid=0), SHARINGS.get("full")(cfg(), uid=0)
    view = {k: torch.zeros_like(v) for k, v in own_of(small(1)).items()}  # what reference starts at
    for r in range(6):
        perturb(sender, r)
        before = share.reference.clone() if share.reference is not None else torch.zeros(5242)
        x = flatten(shared_state(sender))
        p, view = roundtrip(share, 0, r, sender, view)
        # a receiver that decodes onto its previous result holds the sender's reference exactly
        assert torch.equal(flatten(view), share.reference)
        if alpha < 1:  # what was sent is the top-k of the change since last sent
            changed, gap = flatten(view) != before, (x - before).abs()
            assert gap[changed].min() >= gap[~changed].max()
        else:
            dense = full.decode(0, r, full.encode(sender, r).tensors, {}, view)
            assert all(torch.equal(view[n], dense[n]) for n in dense)
            assert torch.equal(flatten(view), x)


def test_topk_error_feedback_sends_small_steady_change():
    model = nn.Linear(20, 10)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    share = TopK(cfg(alpha=0.1), uid=0)
    d, k, c = 210, 21, 7
    share.encode(model, 0)
    g = torch.Generator().manual_seed(0)
    view, first = own_of(model), None
    for r in range(1, 16):
        with torch.no_grad():
            flat = torch.cat([model.weight.view(-1), model.bias.view(-1)])
            fresh = torch.randperm(d - 1, generator=g)[:k]
            fresh += fresh >= c  # k coordinates other than c jump by 1 ...
            bump = torch.zeros(d)
            bump[fresh] = 1.0
            bump[c] = 0.1  # ... while c creeps by 0.1, never the largest change of a round
            model.weight += bump[:200].view(10, 20)
            model.bias += bump[200:]
        p = share.encode(model, r)
        view = share.decode(0, r, p.tensors, p.header, view)
        if first is None and flatten(view)[c] != 0:
            first = r
            assert torch.isclose(flatten(view)[c], torch.tensor(0.1 * r))
    # unsent change accumulates: |x_c - reference_c| = 0.1·r overtakes the jumps of 1 at r ≈ 10
    assert first in (10, 11)


def test_index_codec_round_trips_large_gaps():
    rng = np.random.default_rng(0)
    d = 1 << 40
    idx = np.unique(np.concatenate([[0, 1, 2, 127, 128, 16383, 16384], rng.integers(0, d, 500), [d - 1]]))
    data, raw = pack_indices(idx)
    assert np.array_equal(unpack_indices(data, raw, idx.size, d), idx)
    assert raw == sum(max(1, math.ceil(int(g).bit_length() / 7)) for g in np.diff(idx, prepend=0))


# subsample --------------------------------------------------------------------------
def test_subsample_mask_is_shared_and_varies_with_round_sender_and_seed():
    sender_model, own = small(0), own_of(small(1))
    sender, receiver = Subsample(cfg(alpha=0.1), uid=3), Subsample(cfg(alpha=0.1), uid=5)
    d, k = 5242, count_for(0.1, 5242)
    p = sender.encode(sender_model, 4)
    assert list(p.tensors) == ["values"] and p.tensors["values"].shape == (k,) and p.header == {}
    dec = receiver.decode(3, 4, p.tensors, p.header, own)
    mask = receiver.mask(3, 4, d)
    assert torch.equal(mask, sender.mask(3, 4, d)) and mask.unique().numel() == k and torch.all(mask[1:] > mask[:-1])
    x, o, y = flatten(shared_state(sender_model)), flatten(own), flatten(dec)
    hit = torch.zeros(d, dtype=torch.bool)
    hit[mask] = True
    assert torch.equal(y[hit], x[hit]) and torch.equal(y[~hit], o[~hit])
    others = [receiver.mask(3, 5, d), receiver.mask(4, 4, d), Subsample(cfg(seed=2, alpha=0.1), 5).mask(3, 4, d)]
    for m in others:
        overlap = np.intersect1d(m.numpy(), mask.numpy()).size
        assert overlap < 2 * k * 0.1 + 20  # independent masks overlap in about α·k coordinates


# quantize ---------------------------------------------------------------------------
def steps(x, q):
    """Per coordinate: the quantisation step scale/s of its bucket, computed independently."""
    d, b = x.numel(), q.bucket
    v = torch.nn.functional.pad(x, (0, -d % b)).view(-1, b)
    scale = v.abs().amax(1) if q.norm == "linf" else v.norm(dim=1)
    return torch.repeat_interleave(scale / q.s, b)[:d]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_quantize_is_unbiased_and_on_the_two_nearest_levels(norm):
    model, own = small(0), own_of(small(1))
    q = Quantize(cfg(levels=4, bucket_size=512, norm=norm), uid=2)
    x = flatten(shared_state(model))
    step = steps(x, q)
    n, total = 300, torch.zeros_like(x, dtype=torch.float64)
    for r in range(n):
        _, dec = roundtrip(q, 2, r, model, own)
        y = flatten(dec)
        lv = y / step
        assert torch.allclose(lv, lv.round(), atol=1e-4)  # on the grid of levels
        assert torch.all((y - x).abs() <= step * (1 + 1e-5))  # one of the two levels around x
        assert torch.all((torch.sign(y) == torch.sign(x)) | (y == 0))
        total += y
    # Hoeffding: each decode lies in an interval of width `step` around x, so
    # P(|mean − x| ≥ 4·step/√n) ≤ 2·exp(−32) per coordinate
    assert torch.all((total / n - x).abs() <= 4 * step / math.sqrt(n))
    assert abs((total / n - x).sum()) <= 4 * step.norm() / math.sqrt(n)


def test_quantize_is_deterministic_per_round_and_node():
    model = small(0)
    a, b = (Quantize(cfg(levels=16, bucket_size=512, norm="linf"), uid) for uid in (0, 1))
    p0 = a.encode(model, 0)
    assert torch.equal(p0.tensors["levels"], a.encode(model, 0).tensors["levels"])
    assert not torch.equal(p0.tensors["levels"], a.encode(model, 1).tensors["levels"])
    assert not torch.equal(p0.tensors["levels"], b.encode(model, 0).tensors["levels"])


def test_quantize_error_shrinks_with_levels():
    model, own = digits_cnn(), own_of(digits_cnn(1))
    x = flatten(shared_state(model))
    err = {}
    for s in (4, 16, 127):
        q = Quantize(cfg(levels=s, bucket_size=512, norm="linf"), 0)
        _, dec = roundtrip(q, 0, 0, model, own)
        y = flatten(dec)
        assert torch.all((y - x).abs() <= steps(x, q) * (1 + 1e-5))
        err[s] = ((y - x).norm() / x.norm()).item()
    assert err[127] < 0.02 and err[127] < err[16] < err[4]
    # the l2 scale is much coarser for buckets of 512: far larger error at the same levels
    q2 = Quantize(cfg(levels=16, bucket_size=512, norm="l2"), 0)
    assert ((flatten(roundtrip(q2, 0, 0, model, own)[1]) - x).norm() / x.norm()).item() > 2 * err[16]


# bytes ------------------------------------------------------------------------------
def test_payload_bytes_against_full_on_digits_cnn():
    model = digits_cnn()
    full = SHARINGS.get("full")(cfg(), 0).encode(model, 0)
    full_wire = len(codec.encode_tensors(full.tensors))
    assert full.nbytes == 4 * 22602
    share = {"topk": TopK(cfg(alpha=0.1), 0), "subsample": Subsample(cfg(alpha=0.1), 0),
             "quantize": Quantize(cfg(levels=16, bucket_size=512, norm="linf"), 0)}
    limit = {"topk": 0.15, "subsample": 0.11, "quantize": 0.30}
    for r in range(3):
        perturb(model, r, 0.01)
        for name, s in share.items():
            p = s.encode(model, r)
            wire = len(codec.encode(p.header, p.tensors))
            assert p.nbytes <= limit[name] * full.nbytes, (name, p.nbytes / full.nbytes)
            assert wire <= limit[name] * full_wire, (name, wire / full_wire)


# malformed payloads -----------------------------------------------------------------
def _topk_payload():
    model, own = small(0), own_of(small(1))
    share = TopK(cfg(alpha=0.1), 0)
    p = share.encode(model, 0)
    d, k = 5242, p.tensors["values"].numel()
    idx = unpack_indices(p.tensors["indices"].numpy().tobytes(), p.header["raw"], k, d)
    return share, own, p, idx, d


def _packed(idx=None, stream=None):
    """(indices tensor, header) for indices `idx`, or for a raw varint byte stream."""
    if stream is None:
        data, raw = pack_indices(np.asarray(idx))
    else:
        data, raw = zlib.compress(stream), len(stream)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), {"raw": raw}


def _varints(idx):
    data, _ = pack_indices(np.asarray(idx))
    return zlib.decompress(data)


TOPK_BAD = {
    "truncated indices": (lambda p, idx, d: ({**p.tensors, "indices": p.tensors["indices"][:-4]}, p.header),
                          "zlib|truncated"),
    "index out of range": (lambda p, idx, d: (dict(p.tensors, indices=_packed(np.r_[idx[:-1], d])[0]),
                                              _packed(np.r_[idx[:-1], d])[1]), "out of range"),
    "repeated index": (lambda p, idx, d: (dict(p.tensors, indices=_packed(np.r_[idx[0], idx[:-1]])[0]),
                                          _packed(np.r_[idx[0], idx[:-1]])[1]), "repeated index"),
    "too few indices": (lambda p, idx, d: (dict(p.tensors, indices=_packed(stream=_varints(idx[:-2]) + b"\x81\x01")[0]),
                                           _packed(stream=_varints(idx[:-2]) + b"\x81\x01")[1]),
                        r"524 indices, expected 525"),
    "too many indices": (lambda p, idx, d: (dict(p.tensors, indices=_packed(stream=_varints(idx) + b"\x01")[0]),
                                            _packed(stream=_varints(idx) + b"\x01")[1]), r"526 indices, expected 525"),
    "stream ends inside a varint": (lambda p, idx, d: (dict(p.tensors, indices=_packed(
        stream=_varints(idx) + b"\x80")[0]), _packed(stream=_varints(idx) + b"\x80")[1]), "ends inside a varint"),
    "overlong varint": (lambda p, idx, d: (dict(p.tensors, indices=_packed(
        stream=_varints(idx[:-1]) + b"\x81" * 9 + b"\x00")[0]),
        _packed(stream=_varints(idx[:-1]) + b"\x81" * 9 + b"\x00")[1]), "longer than 9 bytes"),
    "raw length off by one": (lambda p, idx, d: (p.tensors, {"raw": p.header["raw"] + 1}), "exactly"),
    "header missing raw": (lambda p, idx, d: (p.tensors, {}), "'raw'.*missing"),
    "header raw is a string": (lambda p, idx, d: (p.tensors, {"raw": str(p.header["raw"])}), "'raw' must be an integer"),
    "header raw is a bool": (lambda p, idx, d: (p.tensors, {"raw": True}), "'raw' must be an integer"),
    "header raw absurd": (lambda p, idx, d: (p.tensors, {"raw": 10 ** 9}), "'raw' must be an integer in"),
    "short values": (lambda p, idx, d: ({**p.tensors, "values": p.tensors["values"][:-1]}, p.header),
                     r"'values' is \[524\] float32, expected \[525\] float32"),
    "float64 values": (lambda p, idx, d: ({**p.tensors, "values": p.tensors["values"].double()}, p.header), "'values'"),
    "NaN values": (lambda p, idx, d: ({**p.tensors, "values": p.tensors["values"].index_fill(0, torch.tensor([3]), math.nan)},
                                      p.header), "1 non-finite value.*'values'"),
    "inf values": (lambda p, idx, d: ({**p.tensors, "values": p.tensors["values"].index_fill(0, torch.tensor([0, 1]), math.inf)},
                                      p.header), "2 non-finite"),
    "missing indices": (lambda p, idx, d: ({"values": p.tensors["values"]}, p.header), "missing tensor 'indices'"),
}


@pytest.mark.parametrize("case", sorted(TOPK_BAD))
def test_topk_rejects_malformed(case):
    share, own, p, idx, d = _topk_payload()
    make, message = TOPK_BAD[case]
    tensors, header = make(p, idx, d)
    with pytest.raises(PayloadMismatch, match=message) as e:
        share.decode(0, 0, tensors, header, own)
    assert "round 0 from node 0" in str(e.value)


def _bad_code(t):
    return torch.full_like(t, 0xFF)


@pytest.mark.parametrize("kind,name,change,message", [
    ("subsample", "values", lambda t: t[1:], r"'values' is \[524\]"),
    ("subsample", "values", lambda t: t.half(), "float16"),
    ("subsample", "values", lambda t: t.index_fill(0, torch.tensor([5]), math.nan), "non-finite"),
    ("subsample", "values", None, "missing tensor 'values'"),
    ("quantize", "scales", lambda t: t[:-1], r"'scales' is \[10\]"),
    ("quantize", "scales", lambda t: t.index_fill(0, torch.tensor([2]), math.nan), "non-finite value.*'scales'"),
    ("quantize", "scales", lambda t: -t, "negative value.*'scales'"),
    ("quantize", "levels", lambda t: t[:-1], r"'levels' is \[3931\] uint8, expected \[3932\]"),
    ("quantize", "levels", lambda t: t.to(torch.int32), "int32"),
    ("quantize", "levels", _bad_code, "level code out of range"),
])
def test_subsample_and_quantize_reject_malformed(kind, name, change, message):
    model, own = small(0), own_of(small(1))
    share = Subsample(cfg(alpha=0.1), 0) if kind == "subsample" else Quantize(cfg(levels=16, bucket_size=512, norm="linf"), 0)
    p = share.encode(model, 0)
    tensors = dict(p.tensors)
    if change is None:
        del tensors[name]
    else:
        tensors[name] = change(tensors[name])
    with pytest.raises(PayloadMismatch, match=message):
        share.decode(0, 0, tensors, p.header, own)


def test_transport_check_matches_expect():
    model, own = small(0), own_of(small(1))
    for share in (TopK(cfg(alpha=0.1), 0), Subsample(cfg(alpha=0.3), 0), Quantize(cfg(levels=5, bucket_size=100, norm="l2"), 0)):
        p = share.encode(model, 0)
        check_payload(Message(0, "m", p.header, p.tensors), share.expect(0, 0, own))
        wrong = {k: v[:-1] for k, v in p.tensors.items()}
        if not isinstance(share, TopK):  # topk's index stream has any length; decode checks it
            with pytest.raises(PayloadMismatch):
                check_payload(Message(0, "m", p.header, wrong), share.expect(0, 0, own))


# registration and config ------------------------------------------------------------
def test_registered_with_keys_and_config_loader():
    for name, cls in (("topk", TopK), ("subsample", Subsample), ("quantize", Quantize)):
        assert SHARINGS.get(name) is cls
    defaults = {n: {f.name: f.default for f in dataclasses.fields(SHARINGS.keys_of(n))} for n in ("topk", "subsample", "quantize")}
    assert defaults == {"topk": {"alpha": 0.1}, "subsample": {"alpha": 0.1},
                        "quantize": {"levels": 16, "bucket_size": 512, "norm": "linf"}}
    c = load_config(None, ["sharing.name=quantize", "sharing.levels=7", "sharing.norm=l2"])
    q = Quantize(c, 0)
    assert (q.s, q.bits, q.bucket, q.norm) == (7, 4, 512, "l2")
    assert TopK(load_config(None, ["sharing.name=topk", "sharing.alpha=0.05"]), 0).alpha == 0.05
    with pytest.raises(Exception, match="must be > 0"):
        load_config(None, ["sharing.name=subsample", "sharing.alpha=0"])
