"""The parts of the `torrent` transport that need no network: the receive state machine,
its driver against a recording host, the TORRENT frame checks, the spool."""

from __future__ import annotations

import hashlib
import os

import libtorrent as lt
import pytest
import torch

from dflsplit.communication.base import Message
from dflsplit.communication.codec import encode
from dflsplit.communication.torrent_receiver import (
    MAX_RESTARTS, TERMINAL, TRANSITIONS, IllegalTransition, Receiver, RxEvent, RxState, Verdict,
    next_state, verify_payload,
)
from dflsplit.communication.torrent_sender import encode_payload, make_torrent
from dflsplit.communication import torrent_spool
from dflsplit.communication.torrent_spool import Spool, default_spool_parent, write_atomic
from dflsplit.communication.torrent_wire import MalformedAnnouncement, announcement_body, parse_announcement

S, E = RxState, RxEvent
HAPPY = [E.ACCEPT, E.CHECKED_INCOMPLETE, E.FINISHED]


# --- the table ---------------------------------------------------------------------------


@pytest.mark.parametrize("events, final", [
    ([E.OVERSIZED], S.REFUSED),
    ([E.ACCEPT], S.CHECKING),
    ([E.ACCEPT, E.ADD_FAILED], S.FAILED),
    ([E.ACCEPT, E.CHECKED_INCOMPLETE], S.DOWNLOADING),
    (HAPPY, S.FLUSHING),
    (HAPPY + [E.FINISHED, E.CHECKED_COMPLETE], S.FLUSHING),  # "finished" and "seeding" of one completion
    (HAPPY + [E.FLUSHED], S.VERIFYING),
    (HAPPY + [E.FLUSHED, E.FLUSHED], S.VERIFYING),  # libtorrent's own flush, then ours
    (HAPPY + [E.FLUSHED, E.VERIFIED], S.DELIVERED),
    (HAPPY + [E.FLUSHED, E.VERIFIED, E.FLUSHED, E.FINISHED, E.PUBLISHER_BANNED, E.ERROR], S.DELIVERED),
    ([E.ACCEPT, E.CHECKED_COMPLETE, E.FLUSHED, E.VERIFIED], S.DELIVERED),
    ([E.ACCEPT, E.FINISHED, E.CHECKED_COMPLETE, E.FLUSHED], S.VERIFYING),
    # bad pieces on disk: checked again, fetched again
    (HAPPY + [E.FLUSHED, E.PIECES_BAD], S.CHECKING),
    (HAPPY + [E.FLUSHED, E.PIECES_BAD, E.FLUSHED, E.CHECKED_INCOMPLETE, E.FINISHED, E.FLUSHED, E.VERIFIED],
     S.DELIVERED),
    (HAPPY + [E.FLUSHED, E.VERIFY_FAILED], S.FAILED),
    # the publisher banned: removed and added again
    ([E.ACCEPT, E.CHECKED_INCOMPLETE, E.PUBLISHER_BANNED], S.RESTARTING),
    ([E.ACCEPT, E.CHECKED_INCOMPLETE, E.PUBLISHER_BANNED, E.REMOVED], S.CHECKING),
    ([E.ACCEPT, E.CHECKED_INCOMPLETE, E.PUBLISHER_BANNED, E.REMOVED, E.CHECKED_INCOMPLETE, E.FINISHED,
      E.FLUSHED, E.VERIFIED], S.DELIVERED),
    (HAPPY + [E.PUBLISHER_BANNED], S.FLUSHING),  # complete already: a ban changes nothing
    # errors
    ([E.ACCEPT, E.CHECKED_INCOMPLETE, E.ERROR], S.FAILED),
    ([E.ACCEPT, E.CHECKED_INCOMPLETE, E.ERROR, E.FINISHED, E.FLUSHED, E.VERIFIED], S.FAILED),
    # retirement from anywhere; late events of a retired torrent change nothing
    ([E.ACCEPT, E.RETIRE], S.RETIRED),
    ([E.ACCEPT, E.CHECKED_INCOMPLETE, E.PUBLISHER_BANNED, E.RETIRE, E.REMOVED], S.RETIRED),
    (HAPPY + [E.FLUSHED, E.RETIRE, E.VERIFIED], S.RETIRED),
    (HAPPY + [E.FLUSHED, E.VERIFIED, E.RETIRE], S.RETIRED),
])
def test_event_sequences_end_in_their_state(events, final):
    state = S.ANNOUNCED
    for e in events:
        state = next_state(state, e)
    assert state is final


@pytest.mark.parametrize("events", [
    [E.CHECKED_INCOMPLETE],  # not in the session yet
    [E.ACCEPT, E.ACCEPT],
    [E.ACCEPT, E.VERIFIED],  # a verdict on a file nobody asked to verify
    [E.ACCEPT, E.CHECKED_INCOMPLETE, E.REMOVED],  # removed without a restart
    HAPPY + [E.FLUSHED, E.VERIFIED, E.VERIFIED],  # delivered twice
    HAPPY + [E.FLUSHED, E.VERIFIED, E.PIECES_BAD],
    [E.OVERSIZED, E.RETIRE],  # never in the session
    [E.OVERSIZED, E.ACCEPT],
])
def test_illegal_transitions_raise(events):
    state = S.ANNOUNCED
    with pytest.raises(IllegalTransition, match="cannot happen in state"):
        for e in events:
            state = next_state(state, e)


def test_every_state_is_reachable_and_every_live_state_can_end():
    moves = {}
    for (s, _), t in TRANSITIONS.items():
        moves.setdefault(s, set()).add(t)
    seen, todo = {S.ANNOUNCED}, [S.ANNOUNCED]
    while todo:
        for t in moves.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    assert seen == set(S)
    for start in set(S) - set(TERMINAL):
        reach, todo = {start}, [start]
        while todo:
            for t in moves.get(todo.pop(), ()):
                if t not in reach:
                    reach.add(t)
                    todo.append(t)
        assert reach & {S.DELIVERED, S.FAILED, S.RETIRED}, start
    for s in TERMINAL:  # nothing leaves a terminal state but retirement
        assert moves.get(s, {s}) <= {s, S.RETIRED}


# --- the driver against a recording host ------------------------------------------------


class FakeStatus:
    def __init__(self, seeding):
        self.is_seeding = seeding


class FakeHandle:
    def __init__(self, log, params):
        self.log, self.params, self.seeding = log, params, False

    def status(self):
        return FakeStatus(self.seeding)

    def __getattr__(self, name):  # resume, flush_cache, force_recheck, connect_peer, prioritize_pieces
        return lambda *a: self.log.append((name, *a))


class FakeMapping:
    num_nodes = 4


class FakeHost:
    """What `Receiver` uses of its transport, recording every call."""

    uid, current_round, mapping, name, local = 1, 0, FakeMapping(), "node 1", {1}

    @staticmethod
    def leader_of(uid):
        return uid

    def lookup(self, ih):
        return self.registered.get(ih)

    def __init__(self, tmp_path, limit=1 << 30):
        self.tmp, self.limit, self.calls, self.delivered = tmp_path, limit, [], []
        self.registered, self.verify_failures, self.handle, self.n = {}, 0, None, 0
        self.dropped = lambda reason, detail="": self.calls.append(("dropped", reason))

    def known(self, ih):
        return ih in self.registered

    def register(self, t):
        self.registered[t.info_hash] = t

    def payload_limit(self, key):
        return self.limit

    def new_incoming_folder(self):
        self.n += 1
        folder = self.tmp / "in" / str(self.n)
        folder.mkdir(parents=True)
        return folder

    def endpoint(self, uid):
        return "127.0.0.1", 7000 + uid

    def add_to_session(self, t, params):
        paused = bool(params.flags & lt.torrent_flags.paused)
        self.calls.append(("add", "paused" if paused else "running", [p[1] - 7000 for p in params.peers]))
        t.handle = self.handle = FakeHandle(self.calls, params)

    def remove_from_session(self, t):
        self.calls.append(("remove",))
        t.handle = None

    def forget(self, t):
        self.calls.append(("forget",))
        self.registered.pop(t.info_hash, None)

    def verify_in_background(self, t):
        self.calls.append(("verify",))

    def deliver(self, m: Message):
        self.delivered.append(m)

    def reject(self, m: Message, reason: str, detail: str):
        self.calls.append(("rejected", reason, detail))
        self.delivered.append(Message(m.sender, m.key, m.header, error=f"{m.key!r}: {reason} ({detail})",
                                      rejected=True, round=m.round))


def announcement(tmp_path, size=100_000, receivers=(1, 2, 3), key="model/0"):
    blob = encode_payload(key, 0, {"w": torch.zeros(size // 4)})
    path = tmp_path / "n0-0.safetensors"
    path.write_bytes(blob)
    info, meta = make_torrent(path, blob, private=True)
    body = announcement_body({"key": key, "h": {"a": 1}, "r": 5}, meta, list(receivers), len(blob))
    return parse_announcement(0, body, 4), blob


def test_driver_runs_each_states_action(tmp_path):
    host = FakeHost(tmp_path)
    rx = Receiver(host)
    ann, _ = announcement(tmp_path)
    rx.accept(ann)
    (t,) = host.registered.values()
    assert t.state is S.CHECKING and host.calls == [("add", "paused", [0, 2, 3])]
    rx.fire(t, E.CHECKED_INCOMPLETE)  # first check: stripe, then resume (the connect boost)
    assert [c[0] for c in host.calls[1:]] == ["prioritize_pieces", "resume"]
    prio = host.calls[1][1]
    assert prio[:3] == [7, 1, 1] and prio[3] == 7  # receiver 0 of 3: pieces 0, 3, 6, ... first
    rx.fire(t, E.FINISHED)
    rx.fire(t, E.FINISHED)  # the same completion again: one flush
    assert [c[0] for c in host.calls[3:]] == ["flush_cache"]
    rx.fire(t, E.FLUSHED)
    assert host.calls[-1] == ("verify",)
    rx.on_verdict(t, Verdict(bad=[2]))  # bad on disk: re-check, then connect the peers again
    assert host.calls[-1] == ("force_recheck",) and host.verify_failures == 1
    rx.fire(t, E.CHECKED_INCOMPLETE)
    assert [c[0] for c in host.calls[-3:]] == ["connect_peer"] * 3
    rx.fire(t, E.FINISHED)
    rx.fire(t, E.FLUSHED)
    rx.on_verdict(t, Verdict(tensors={"w": torch.ones(2)}))
    (m,) = host.delivered
    assert (m.sender, m.key, m.header, m.round, m.error) == (0, "model/0", {"a": 1}, 5, None)
    rx.retire(t)
    assert host.calls[-1] == ("forget",) and not host.registered


def test_driver_restarts_when_the_publisher_is_banned_then_gives_up(tmp_path):
    host = FakeHost(tmp_path)
    rx = Receiver(host)
    ann, _ = announcement(tmp_path)
    rx.accept(ann)
    (t,) = host.registered.values()
    rx.fire(t, E.CHECKED_INCOMPLETE)
    for i in range(MAX_RESTARTS):
        rx.on_banned(t, 0)
        assert t.state is S.RESTARTING and host.calls[-1] == ("remove",)
        rx.on_removed(t)
        assert host.calls[-1] == ("add", "running", [0, 2, 3])  # unpaused: it checks the file kept
        rx.fire(t, E.CHECKED_INCOMPLETE)
    rx.on_banned(t, 0)
    assert t.state is S.DOWNLOADING and t.restarts == MAX_RESTARTS  # bounded
    # a co-receiver banned: no restart, it is left out of the peers
    rx.on_banned(t, 2)
    assert t.bad_peers == {2} and t.peers(1) == [0, 3]
    rx.on_banned(t, None)  # not a node of the run: nothing to do
    assert t.state is S.DOWNLOADING


def test_driver_refuses_an_oversized_torrent_without_adding_it(tmp_path):
    host = FakeHost(tmp_path, limit=1000)
    ann, blob = announcement(tmp_path)
    Receiver(host).accept(ann)
    assert not host.registered and not (tmp_path / "in").exists()
    assert host.calls == [("rejected", "torrent larger than expected", f"{len(blob)} bytes, at most 1000")]
    (m,) = host.delivered
    assert (m.sender, m.key, m.header, m.round, m.rejected) == (0, "model/0", {"a": 1}, 5, True)


def test_driver_drops_a_second_announcement_of_one_torrent(tmp_path):
    host = FakeHost(tmp_path)
    rx = Receiver(host)
    ann, _ = announcement(tmp_path)
    rx.accept(ann)
    rx.accept(ann)
    assert host.calls[-1] == ("dropped", "torrent announced twice") and len(host.registered) == 1


def test_verify_payload_reads_only_safetensors_of_the_announced_key(tmp_path):
    blob = encode_payload("k", 0, {"w": torch.arange(10.0)})
    path = tmp_path / "f"
    path.write_bytes(blob)
    info, _ = make_torrent(path, blob, private=True)
    v = verify_payload(path, info, "k")
    assert v.error is None and not v.bad and torch.equal(v.tensors["w"], torch.arange(10.0))
    assert verify_payload(path, info, "other").error == "holds key 'k'"
    path.write_bytes(b"\0" * len(blob))
    assert verify_payload(path, info, "k").bad == [0]
    path.unlink()
    assert "cannot be read" in verify_payload(path, info, "k").error


# --- the TORRENT frame -------------------------------------------------------------------


def torrent_bytes(name=b"n0-0.safetensors", length=100, files=None):
    info = {b"name": name, b"piece length": 16384, b"pieces": hashlib.sha1(b"a" * length).digest()}
    if files:
        info[b"files"] = files
    else:
        info[b"length"] = length
    return lt.bencode({b"info": info})


def frame(head=None, meta=None, tensors=None):
    head = {"key": "model/0", "h": {}, "r": 0, "peers": [1], "size": 100, **(head or {})}
    meta = torrent_bytes() if meta is None else meta
    if tensors is None:
        tensors = {"torrent": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}
    return encode(head, tensors)


MALFORMED = {
    "not a codec message": (b"junk and more junk", "bad magic"),
    "key not a string": (frame({"key": 7}), "'key' must be a non-empty string"),
    "header not an object": (frame({"h": [1]}), "'h' must be an object"),
    "peers not ids": (frame({"peers": "1"}), "'peers' must be a list of node ids"),
    "peer outside the run": (frame({"peers": [9]}), "'peers' must be a list of node ids"),
    "publisher among peers": (frame({"peers": [0, 1]}), "holds the publisher"),
    "size missing": (frame({"size": None}), "'size' must be a non-negative integer"),
    "size not an int": (frame({"size": "100"}), "'size' must be a non-negative integer"),
    "size negative": (frame({"size": -1}), "'size' must be a non-negative integer"),
    "size disagrees": (frame({"size": 99}), "announced size 99 bytes differs from the torrent's 100"),
    "metadata not bencoded": (frame(meta=bytes(range(50))), "torrent metadata rejected"),
    "metadata as floats": (frame(tensors={"torrent": torch.zeros(5)}), "expected one 1-d uint8 tensor"),
    "extra tensor": (frame(tensors={"torrent": torch.zeros(5, dtype=torch.uint8), "x": torch.zeros(1)}),
                     "expected one 1-d uint8 tensor"),
    "several files": (frame(meta=torrent_bytes(name=b"d", files=[{b"length": 50, b"path": [b"a"]},
                                                                 {b"length": 50, b"path": [b"b"]}])),
                      "the torrent has 2 files"),
    "file in a folder": (frame(meta=torrent_bytes(name=b"d", files=[{b"length": 100, b"path": [b"..", b"b"]}])),
                         "is not a plain file name"),
    "hidden or parent name": (frame(meta=torrent_bytes(name=b"../evil")), "is not a plain file name"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_announcements_are_refused_with_a_reason(case):
    body, reason = MALFORMED[case]
    with pytest.raises(MalformedAnnouncement, match=reason):
        parse_announcement(0, body, 4)


def test_a_wellformed_announcement_parses():
    ann = parse_announcement(0, frame({"h": {"x": 1}, "r": 3, "peers": [1, 2]}), 4)
    assert (ann.sender, ann.key, ann.header, ann.round, ann.receivers, ann.size) == (0, "model/0", {"x": 1}, 3,
                                                                                       [1, 2], 100)


# --- the spool ---------------------------------------------------------------------------


def test_spool_parent_falls_back_to_the_temp_dir_when_shm_is_not_writable(monkeypatch, tmp_path):
    assert default_spool_parent(str(tmp_path)) == tmp_path
    monkeypatch.setattr(torrent_spool.os, "access", lambda path, mode: False)
    monkeypatch.setattr(torrent_spool.tempfile, "gettempdir", lambda: str(tmp_path))
    assert default_spool_parent(None) == tmp_path


def test_spool_folders_and_atomic_writes(tmp_path):
    spool = Spool(tmp_path, 3)
    assert spool.root.parent == tmp_path and spool.root.name.startswith(f"dflsplit-{os.getpid()}-n3-")
    folder, seq = spool.new_folder("out")
    write_atomic(folder / "f", b"abc")
    assert (folder / "f").read_bytes() == b"abc" and spool.files() == [folder / "f"]
    with pytest.raises(OSError):
        write_atomic(folder / "missing" / "f", b"abc")
    assert spool.files() == [folder / "f"]  # no temporary file left
    with pytest.raises(ValueError):
        spool.new_folder("sideways")
    spool.close()
    assert not spool.root.exists()
