"""The receiving side of the `torrent` transport: one state machine per announced torrent.

A received torrent (`Incoming`) is in one `RxState` at a time and moves only by the
`TRANSITIONS` table; a pair (state, event) missing from the table is a bug and raises
`IllegalTransition`. Every transition is made on the transport's alert thread: libtorrent's
alerts arrive there, and the other threads only post events to it (the control thread an
announcement, the verify worker its verdict, the caller a retirement). The `Receiver`
turns alerts into events and performs the action of each state it enters:

=============  ==================================================================
state          entered by / action on entry
=============  ==================================================================
ANNOUNCED      a TORRENT frame parsed (`torrent_wire`); nothing on disk yet
REFUSED        larger than `payload_limit(key)`: counted, the refusal delivered at
               once (`reject`); never added to the session, nothing written
CHECKING       added to the session paused, with the publisher and co-receivers as
               peers (first time); added again unpaused (restart); re-checked against
               the piece hashes (bad pieces on disk)
DOWNLOADING    first time: stripe priorities, then resume (the connect boost);
               later: connect the peers again (a check or restart dropped them)
FLUSHING       every piece passed its hash: flush the writes queued behind them
VERIFYING      the worker re-checks the file against the piece hashes and decodes it
RESTARTING     the publisher was banned (for pieces co-receivers spoiled): remove the
               torrent, keep the file, add it again once removed (bounded)
DELIVERED      message delivered; the torrent keeps seeding until retired
FAILED         an error delivered (torrent or file error, bad file after retries,
               not safetensors, wrong key); kept until retired
RETIRED        older than ``retention_rounds``: removed from the session and the disk
=============  ==================================================================

`close` needs no transition: it destroys the session and removes the whole spool.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libtorrent as lt
from safetensors import SafetensorError, safe_open

from .base import CommError, Message
from .torrent_settings import peer_uid
from .torrent_wire import Announcement

if TYPE_CHECKING:  # pragma: no cover
    from .torrent import TorrentTransport

log = logging.getLogger(__name__)

MAX_VERIFY_RETRIES = 3
MAX_RESTARTS = 3
BAN_REASONS = ("peer banned", "too many corrupt pieces")


class RxState(enum.Enum):
    ANNOUNCED = "announced"
    REFUSED = "refused"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    FLUSHING = "flushing"
    VERIFYING = "verifying"
    RESTARTING = "restarting"
    DELIVERED = "delivered"
    FAILED = "failed"
    RETIRED = "retired"


class RxEvent(enum.Enum):
    ACCEPT = "accept"  # within the size limit: add it
    OVERSIZED = "oversized"  # larger than the receiver accepts
    ADD_FAILED = "add failed"  # the spool or libtorrent refused it
    CHECKED_INCOMPLETE = "checked, pieces missing"  # torrent_checked_alert
    CHECKED_COMPLETE = "checked, complete"  # torrent_checked_alert
    FINISHED = "finished"  # torrent_finished_alert, or state_changed_alert to seeding
    FLUSHED = "flushed"  # cache_flushed_alert
    VERIFIED = "verified"  # worker: file good and decoded
    PIECES_BAD = "pieces bad on disk"  # worker: fetch them again
    VERIFY_FAILED = "verify failed"  # worker: unreadable, not safetensors, wrong key; or bad too often
    PUBLISHER_BANNED = "publisher banned"  # peer_disconnected_alert naming the publisher
    REMOVED = "removed"  # torrent_removed_alert (restart)
    ERROR = "error"  # torrent_error_alert, file_error_alert
    RETIRE = "retire"  # retention or close


S, E = RxState, RxEvent
TERMINAL = (S.REFUSED, S.FAILED, S.RETIRED)

TRANSITIONS: dict[tuple[RxState, RxEvent], RxState] = {
    (S.ANNOUNCED, E.ACCEPT): S.CHECKING,
    (S.ANNOUNCED, E.OVERSIZED): S.REFUSED,
    (S.CHECKING, E.ADD_FAILED): S.FAILED,
    (S.CHECKING, E.CHECKED_INCOMPLETE): S.DOWNLOADING,
    (S.CHECKING, E.CHECKED_COMPLETE): S.FLUSHING,
    (S.CHECKING, E.FINISHED): S.FLUSHING,
    (S.CHECKING, E.PUBLISHER_BANNED): S.RESTARTING,
    (S.DOWNLOADING, E.FINISHED): S.FLUSHING,
    (S.DOWNLOADING, E.CHECKED_COMPLETE): S.FLUSHING,
    (S.DOWNLOADING, E.PUBLISHER_BANNED): S.RESTARTING,
    (S.FLUSHING, E.FLUSHED): S.VERIFYING,
    (S.VERIFYING, E.VERIFIED): S.DELIVERED,
    (S.VERIFYING, E.PIECES_BAD): S.CHECKING,
    (S.VERIFYING, E.VERIFY_FAILED): S.FAILED,
    (S.RESTARTING, E.REMOVED): S.CHECKING,
}
for _s in (S.CHECKING, S.DOWNLOADING, S.FLUSHING, S.VERIFYING):
    TRANSITIONS[(_s, E.ERROR)] = S.FAILED
for _s in S:
    if _s is not S.REFUSED:
        TRANSITIONS[(_s, E.RETIRE)] = S.RETIRED
# alerts that repeat what the state already knows: libtorrent posts "finished" and
# "state changed to seeding" for one completion, and flushes (releases) the files of a
# torrent that finished by itself, so two "flushed" follow a completion, and only the
# first one seen while FLUSHING matters (a flush waits for every write queued before it);
# a late ban changes nothing once the file is complete
for _s, _events in {
    S.CHECKING: (E.FLUSHED,),
    S.DOWNLOADING: (E.CHECKED_INCOMPLETE, E.FLUSHED),
    S.FLUSHING: (E.FINISHED, E.CHECKED_COMPLETE, E.PUBLISHER_BANNED),
    S.VERIFYING: (E.FINISHED, E.CHECKED_COMPLETE, E.PUBLISHER_BANNED, E.FLUSHED),
    S.RESTARTING: (E.FLUSHED,),
    S.DELIVERED: (E.FINISHED, E.CHECKED_COMPLETE, E.PUBLISHER_BANNED, E.ERROR, E.FLUSHED),
    S.FAILED: tuple(e for e in E if e is not E.RETIRE),  # nothing matters any more
    S.RETIRED: tuple(E),  # a late verdict or alert of a torrent already gone
}.items():
    for _e in _events:
        TRANSITIONS[(_s, _e)] = _s
del _s, _e, _events


class IllegalTransition(CommError):
    """An event that cannot happen in a state: a bug in the transport, not a peer's fault."""


def next_state(state: RxState, event: RxEvent) -> RxState:
    """The state after `event` in `state` (the same state: the event changes nothing)."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value!r} cannot happen in state {state.value!r}") from None


@dataclass
class Incoming:
    """A torrent announced to nodes of this process: its announcement, state, session handle,
    and the nodes it is for (`consumers`, each with its round when it arrived: retention)."""

    ann: Announcement
    round: int  # the first consumer's round when it arrived
    state: RxState = RxState.ANNOUNCED
    folder: Path | None = None
    handle: lt.torrent_handle | None = None
    resumed: bool = False  # resumed once (the connect boost is spent)
    restarts: int = 0
    verify_failures: int = 0
    bad_peers: set[int] = field(default_factory=set)
    consumers: list = field(default_factory=list)  # the node transports it is delivered to
    rounds: dict[int, int] = field(default_factory=dict)  # consumer uid → its round when it arrived
    tensors: dict[str, Any] | None = None  # once delivered, for a consumer that joins later
    error: str | None = None  # once failed

    key = property(lambda self: self.ann.key)
    sender = property(lambda self: self.ann.sender)
    info = property(lambda self: self.ann.info)
    info_hash = property(lambda self: self.ann.info_hash)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / self.ann.info.name()

    def peers(self, local: int | set[int], leader=lambda uid: uid) -> list[int]:
        """Whom to fetch from: the publisher, then the co-receivers, less the nodes of this
        process (`local`) and the banned (`bad_peers` holds processes: `leader(uid)`)."""
        local = {local} if isinstance(local, int) else set(local)
        others = [p for p in self.ann.receivers if p not in local and p != self.ann.sender]
        return [p for p in [self.ann.sender, *others] if leader(p) not in self.bad_peers]

    def stripe(self, uid: int) -> tuple[int, int] | None:
        """(k, m): node `uid` is receiver k of m, and asks for every m-th piece first."""
        r = self.ann.receivers
        return (r.index(uid), len(r)) if uid in r and len(r) > 1 else None


# --- the verify worker -------------------------------------------------------------------


def bad_pieces(path: Path, info: lt.torrent_info) -> list[int]:
    """Indexes of the pieces of `path` whose SHA-1 differs from the torrent's."""
    size = info.total_size()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            return list(range(info.num_pieces()))
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                piece = info.piece_length()
                return [
                    i for i in range(info.num_pieces())
                    if hashlib.sha1(view[i * piece:(i + 1) * piece]).digest() != info.hash_for_piece(i)
                ]
            finally:
                view.release()


@dataclass
class Verdict:
    """What the worker found in a completed file: bad pieces, the tensors, or an error."""

    bad: list[int] = field(default_factory=list)
    tensors: dict[str, Any] | None = None
    error: str | None = None


def verify_payload(path: Path, info: lt.torrent_info, key: str) -> Verdict:
    """Re-check `path` against the piece hashes of `info`, then decode it as safetensors
    whose metadata names `key`. Runs on the worker; reads only, never unpickles."""
    try:
        bad = bad_pieces(path, info)
    except OSError as e:
        return Verdict(error=f"cannot be read at {path}: {e}")
    if bad:
        return Verdict(bad=bad)
    try:
        with safe_open(str(path), framework="pt", backend="pread") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        return Verdict(error=f"is not valid safetensors: {e}")
    if meta.get("key") != key:
        return Verdict(error=f"holds key {meta.get('key')!r}")
    return Verdict(tensors=tensors)


# --- the machine's driver, on the alert thread ------------------------------------------


class Receiver:
    """Drives every `Incoming` of one data plane; call only on its alert thread.

    Of the data plane (`host`) it uses: `name` (for messages), `local` (the uids of its
    nodes), `leader_of(uid)`, `lookup(info_hash)`, `register(t)`, `new_incoming_folder()`,
    `add_to_session(t, params)`, `remove_from_session(t)` (keeping the file), `forget(t)`
    (out of the registry, the session and the disk), `endpoint(uid)`,
    `verify_in_background(t)`, `deliver_local(t, consumer)` (a torrent a node of this process
    published) and the counter `verify_failures`. Of each consumer (a node's transport):
    `uid`, `current_round`, `payload_limit(key)`, `deliver`, `reject` (count a refused
    payload and deliver the refusal) and `dropped`.
    """

    def __init__(self, host):
        self.host = host

    # events in -----------------------------------------------------------------
    def accept(self, ann: Announcement, consumer=None) -> None:
        """A parsed announcement for node `consumer` (default: the host itself): refuse it
        (too large), add it, or attach the node to the same torrent already here."""
        host = self.host
        consumer = host if consumer is None else consumer
        t = host.lookup(ann.info_hash)
        limit = consumer.payload_limit(ann.key)
        if ann.size > limit:
            if t is None:
                self.fire(Incoming(ann, consumer.current_round, consumers=[consumer]), E.OVERSIZED, limit=limit)
            else:
                self._refuse(consumer, ann, limit)
            return
        if t is None:
            t = Incoming(ann, consumer.current_round, consumers=[consumer],
                         rounds={consumer.uid: consumer.current_round})
            host.register(t)
            self.fire(t, E.ACCEPT)
        elif not isinstance(t, Incoming):  # published by a node of this process: read its file
            host.deliver_local(t, consumer, ann)
        elif consumer in t.consumers:
            consumer.dropped("torrent announced twice", f"{ann.key!r} from node {ann.sender}")
        else:  # another node of this process receives the same torrent: one download for both
            t.consumers.append(consumer)
            t.rounds[consumer.uid] = consumer.current_round
            if t.state is S.DELIVERED:
                consumer.deliver(self._message(t))
                self.release(t)
            elif t.state is S.FAILED:
                consumer.deliver(Message(t.sender, t.key, t.ann.header, error=t.error, round=t.ann.round))

    @staticmethod
    def _refuse(consumer, ann: Announcement, limit: int) -> None:
        consumer.reject(Message(ann.sender, ann.key, ann.header, round=ann.round),
                        "torrent larger than expected", f"{ann.size} bytes, at most {limit}")

    @staticmethod
    def _message(t: Incoming) -> Message:
        return Message(t.sender, t.key, t.ann.header, t.tensors, t.info.total_size(), round=t.ann.round)

    def on_alert(self, t: Incoming, a) -> None:
        """An alert of `t`'s current handle: the event it means, if any."""
        if isinstance(a, lt.torrent_checked_alert):
            done = a.handle.status().is_seeding
            self.fire(t, E.CHECKED_COMPLETE if done else E.CHECKED_INCOMPLETE)
        elif isinstance(a, lt.torrent_finished_alert) or (
                isinstance(a, lt.state_changed_alert) and a.state == lt.torrent_status.seeding):
            # "finished" means every piece passed its hash, not that every write reached the file
            self.fire(t, E.FINISHED)
        elif isinstance(a, lt.cache_flushed_alert):
            self.fire(t, E.FLUSHED)
        elif isinstance(a, lt.peer_disconnected_alert) and a.error.message() in BAN_REASONS:
            # libtorrent bans every peer that sent part of too many pieces failing their
            # hash; the publisher, the one sure source, can be among them
            self.on_banned(t, peer_uid(a.pid.to_bytes(), self.host.mapping.num_nodes))  # a process leader
        elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
            log.warning("%s: torrent %r from node %d: %s", self.host.name, t.key, t.sender, a.message())
            self.fire(t, E.ERROR, error=f"receiving {t.key!r} from node {t.sender} failed: {a.message()}")

    def on_banned(self, t: Incoming, who: int | None) -> None:
        """libtorrent banned the process of node `who` (its leader; None: not of the run) from
        `t`'s swarm: the publisher's ban restarts the download (bounded); a co-receiver's
        process is left out."""
        if who is not None and who == self.host.leader_of(t.sender):
            if t.restarts < MAX_RESTARTS:
                self.fire(t, E.PUBLISHER_BANNED)
        elif who is not None:
            t.bad_peers.add(who)

    def on_removed(self, t: Incoming) -> None:
        """The session removed `t`'s torrent (asked for by a restart)."""
        self.fire(t, E.REMOVED)

    def on_verdict(self, t: Incoming, v: Verdict) -> None:
        """The worker's verdict on `t`'s completed file."""
        if v.error is not None:
            self.fire(t, E.VERIFY_FAILED, error=f"payload {t.key!r} from node {t.sender} {v.error}")
        elif v.bad:
            if t.state is S.VERIFYING:
                self.host.verify_failures += 1
                t.verify_failures += 1
            if t.verify_failures > MAX_VERIFY_RETRIES:
                self.fire(t, E.VERIFY_FAILED, error=(
                    f"{t.key!r} from node {t.sender}: pieces {v.bad[:8]} fail their hash after "
                    f"{MAX_VERIFY_RETRIES} downloads"))
            else:
                self.fire(t, E.PIECES_BAD, bad=v.bad)
        else:
            self.fire(t, E.VERIFIED, tensors=v.tensors)

    def retire(self, t: Incoming) -> None:
        self.fire(t, E.RETIRE)

    # the machine ----------------------------------------------------------------
    def fire(self, t: Incoming, event: RxEvent, **data: Any) -> None:
        """Move `t` by `event` and run the action of the state it enters (none when the
        event leaves it where it is). Raises IllegalTransition, naming key and sender."""
        old = t.state
        try:
            new = next_state(old, event)
        except IllegalTransition as e:
            raise IllegalTransition(f"{self.host.name}: torrent {t.key!r} from node {t.sender}: {e}") from None
        if new is old:
            return
        t.state = new
        log.debug("%s: %r from node %d: %s --%s--> %s",
                  self.host.name, t.key, t.sender, old.value, event.value, new.value)
        getattr(self, f"_enter_{new.name.lower()}")(t, old, **data)

    def _enter_refused(self, t: Incoming, old: RxState, limit: int) -> None:
        self._refuse(t.consumers[0], t.ann, limit)

    def _enter_checking(self, t: Incoming, old: RxState, bad: list[int] = ()) -> None:
        host = self.host
        if old is S.VERIFYING:  # bad pieces on disk: check them all again, fetch the bad ones
            log.warning("%s: %r from node %d: pieces %s fail their hash on disk; fetching them again",
                        host.name, t.key, t.sender, list(bad[:8]))
            t.handle.force_recheck()
            return
        if old is S.ANNOUNCED:
            try:
                t.folder = host.new_incoming_folder()
            except OSError as e:
                self.fire(t, E.ADD_FAILED, error=f"cannot make a spool folder for {t.key!r} "
                                                 f"from node {t.sender}: {e}")
                return
        # paused until checked: resuming then gives the connect boost; not on a restart,
        # when part of the file is there, as a paused torrent would not check it
        params = lt.add_torrent_params()
        params.ti = t.info
        params.save_path = str(t.folder)
        params.flags = lt.torrent_flags.apply_ip_filter | (lt.torrent_flags.paused if not t.resumed else 0)
        params.peers = [host.endpoint(p) for p in t.peers(host.local, host.leader_of)]
        try:
            host.add_to_session(t, params)
        except RuntimeError as e:
            self.fire(t, E.ADD_FAILED, error=f"libtorrent refused the torrent for {t.key!r} "
                                             f"from node {t.sender}: {e}")

    def _enter_downloading(self, t: Incoming, old: RxState) -> None:
        if not t.resumed:
            self._resume(t)
        else:  # checked again (bad file) or restarted: its peers were dropped
            for p in t.peers(self.host.local, self.host.leader_of):
                t.handle.connect_peer(self.host.endpoint(p))

    def _resume(self, t: Incoming) -> None:
        stripe = t.stripe(t.consumers[0].uid)
        if stripe is not None:
            # receiver k of m asks for every m-th piece first, so that at the start the
            # receivers fetch different pieces from the publisher
            k, m = stripe
            t.handle.prioritize_pieces([7 if i % m == k else 1 for i in range(t.info.num_pieces())])
        t.handle.resume()  # first check done: resuming gives the connect boost
        t.resumed = True

    def _enter_flushing(self, t: Incoming, old: RxState) -> None:
        if not t.resumed:  # complete at its first check: seed it to the co-receivers
            self._resume(t)
        t.handle.flush_cache()

    def _enter_verifying(self, t: Incoming, old: RxState) -> None:
        self.host.verify_in_background(t)

    def _enter_restarting(self, t: Incoming, old: RxState) -> None:
        log.warning("%s: %r: node %d was banned for pieces other peers spoiled; restarting the download",
                    self.host.name, t.key, t.sender)
        t.restarts += 1
        self.host.remove_from_session(t)  # keeps the file; on_removed adds it again

    def _enter_delivered(self, t: Incoming, old: RxState, tensors: dict) -> None:
        t.tensors = tensors
        for consumer in t.consumers:
            consumer.deliver(self._message(t))
        self.release(t)

    def release(self, t: Incoming) -> None:
        """Let go of `t`'s tensors once every node of this process it was announced to has them."""
        if t.tensors is not None and set(t.ann.receivers) & set(self.host.local) <= set(t.rounds):
            t.tensors = None

    def _enter_failed(self, t: Incoming, old: RxState, error: str) -> None:
        t.error = f"{self.host.name}: {error}"
        log.warning("%s", t.error)
        for consumer in t.consumers:
            consumer.deliver(Message(t.sender, t.key, t.ann.header, error=t.error, round=t.ann.round))

    def _enter_retired(self, t: Incoming, old: RxState) -> None:
        self.host.forget(t)
