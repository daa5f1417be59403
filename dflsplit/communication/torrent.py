"""The `torrent` transport: tensor payloads swarm over BitTorrent (libtorrent).

``publish(key, tensors, to)`` encodes the tensors with safetensors into this node's
spool (a per-node folder on tmpfs when available), hashes them into a v1 torrent that
this node seeds, and sends each receiver, over the ZeroMQ control plane, a TORRENT
frame with the torrent's metadata and the other receivers. A receiver adds the
torrent, connects to the publisher and the co-receivers, and they swarm: a piece one
receiver holds is served to the others, so the publisher's upload is not multiplied by
the number of receivers. On completion the receiver re-checks the file against the
piece hashes, decodes it and delivers the message; it keeps seeding until the key is
older than ``retention_rounds`` rounds (`advance`), then removes torrent and file.
A torrent larger than the receiver accepts (`Transport.payload_limit`) is refused on
its announcement, before any piece is fetched. A payload travels as a torrent only when
`communication.paths` finds swarming faster (``communication.path: auto``), else inline
on the control plane, as with ``tcp``. Nothing of
a retired key remains on disk, and nothing at all after `close` (a spool left by a
killed process is swept by the next node that starts).

Modules, one concern each:

* `torrent_settings`: the session's LAN settings, peer filters, peer ids, piece size;
* `torrent_spool`: the spool folder, its stale sweep, whole-file writes;
* `torrent_sender`: spool, hash and seed a payload;
* `torrent_wire`: the TORRENT frame, built and checked;
* `torrent_receiver`: the state machine of a received torrent, and its verify worker;
* `torrent_sockets`: TCP_NODELAY on libtorrent's sockets;
* this module: the transport tying them, and its alert thread.

The data plane (`DataPlane`: the libtorrent session, its spool and its alert thread) is
one per process, shared by the transports of the nodes the process hosts
(``run.nodes_per_process``); it listens on each of their data ports, so the mapping of
nodes to addresses does not change. A torrent that several nodes of one process receive
is downloaded once and delivered to each; one that a node of the process published is
read from the spool, never downloaded. With one node per process (the default) the
plane is the node's own. Its peer id names the process's first node; libtorrent's rate
limits are per session, so with several nodes in a process they apply to the process
(each node's limit times their number).

Threads: one alert thread per data plane owns the session's torrents. It waits on a pipe
that libtorrent writes to when alerts are queued (``set_alert_fd``) and that other
threads write to when they post it work; every state change of a torrent happens there.
The control-plane threads parse announcements and post them; the verify worker
re-checks and decodes completed files and posts its verdict; the callers' `publish` and
`advance` run their session changes there and wait for them. An exception on the alert
thread or the worker fails every transport of the plane (`Transport.fail`): the nodes'
waiting `receive` raises `TransportFailed` with the cause instead of timing out.

Latency on a LAN (see `torrent_settings.lan_settings`): libtorrent opens outgoing
connections from a once-per-second timer, except for a torrent's "connect boost" when it
is resumed; a receiver therefore adds the torrent paused, with its peers, and resumes it
as soon as it is checked, so the connections start at once. "Finished" means every piece
passed its hash, not that every write reached the file, so a receiver reads the file only
after the flush queued behind those writes. Other defaults that cost time on a LAN are
changed: the unchoke round (15 s; here every interested peer is unchoked at once), the
send-buffer watermark (which starts at 10 KiB), handshake encryption, uTP, the
one-connection-per-IP rule (every node of a machine shares its address) and the tick
that paces the rate limiter. libtorrent does not set TCP_NODELAY, and Nagle's algorithm
with delayed ACKs stalled the tail of a transfer by 40 ms now and then: see
`torrent_sockets`.

Swarming: receiver k of m asks for every m-th piece (offset k) first, and each peer gets
at most 16 outstanding block requests, so the receivers fetch different pieces from the
publisher and take the rest from each other instead of queueing seconds of requests at
the publisher (one to eight receivers under 20 MB/s upload caps: 3.3 s -> 1.5 s).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import select
import socket
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import libtorrent as lt
import torch

from ..registry import key
from .base import TRANSPORTS, BindError, CommError, Message, TransportFailed
from .codec import encode, tensor_bytes
from .control import DATA, ZmqTransport
from .paths import DEFAULT_MODEL
from .torrent_receiver import (
    MAX_RESTARTS, MAX_VERIFY_RETRIES, Incoming, IllegalTransition, Receiver, RxEvent, RxState, bad_pieces,
    next_state, verify_payload,
)
from .torrent_sender import Outgoing, encode_payload, make_torrent, piece_hashes, seed_params, spool_payload
from .torrent_settings import (
    FINGERPRINT, MAX_PIECE, MIN_PIECE, PIECES_PER_PAYLOAD, lan_settings, only_from, peer_uid, piece_size,
    rate_limited_everywhere,
)
from .torrent_sockets import set_nodelay
from .torrent_spool import SPOOL_PREFIX, Spool, default_spool_parent, sweep_stale_spools
from .torrent_wire import TORRENT, Announcement, MalformedAnnouncement, announcement_body, parse_announcement

__all__ = [
    "DataPlane", "TorrentTransport", "TorrentKeys", "TORRENT", "Announcement", "MalformedAnnouncement", "Incoming",
    "IllegalTransition", "RxEvent", "RxState", "next_state", "bad_pieces", "piece_hashes", "piece_size",
    "lan_settings", "default_spool_parent", "sweep_stale_spools", "SPOOL_PREFIX", "FINGERPRINT", "MIN_PIECE",
    "MAX_PIECE", "PIECES_PER_PAYLOAD", "MAX_VERIFY_RETRIES", "MAX_RESTARTS",
]

log = logging.getLogger(__name__)

NODELAY_RESCANS = (0.003, 0.03)  # seconds after a connection, to catch outgoing ones once connected
CALL_TIMEOUT = 30.0  # seconds a caller waits for the alert thread to run its session change
SEED_TIMEOUT = 5.0  # seconds publish waits for its torrent to seed before announcing it
DROPPED_ANNOUNCEMENTS_KEPT = 256  # (key, sender) of malformed announcements, named in timeouts

Torrent = Union[Incoming, Outgoing]

_LIVE: "weakref.WeakSet[DataPlane]" = weakref.WeakSet()


@atexit.register
def _close_data_planes_at_exit() -> None:
    """Stop the sessions of planes never closed, before the interpreter tears down
    (a libtorrent session destroyed under a running alert thread aborts the process)."""
    for plane in list(_LIVE):
        try:
            plane.shutdown()
        except Exception:  # pragma: no cover - best effort at exit
            pass


@dataclass
class TorrentKeys:
    """Keys of transport `torrent`."""

    path: Literal["auto", "torrent", "inline"] = key(
        "auto", "how payloads travel: auto (per payload, whichever a model of its size, receivers and link rates "
                "says is faster: see communication.paths), or always torrent, or always inline")
    link_rate: float = key(125e6, "with path auto: bytes/s assumed for a link to another machine with no "
                                  "upload_limit (1 Gbit/s)", gt=0)
    retention_rounds: int = key(2, "rounds a received torrent keeps seeding", ge=0)
    lazy_start: bool = key(True, "start a process's libtorrent session only when a torrent is first published or "
                                 "announced (a run whose payloads all travel inline never starts one)")
    spool_dir: Optional[str] = key(None, "spool folder (default: /dev/shm when writable, else the temp dir)")
    dht: bool = key(False, "libtorrent's DHT")
    lsd: bool = key(False, "local service discovery")
    upnp: bool = key(False, "UPnP port mapping")
    natpmp: bool = key(False, "NAT-PMP port mapping")
    trackers: list[str] = key(doc="tracker URLs added to every torrent", factory=list)


class DataPlane:
    """One libtorrent session, its spool and its alert thread, shared by the torrent
    transports of the nodes `uids` of one process (see the module doc).

    Transports `join` it when they start (the first starts it) and `leave` it when they
    close (the last shuts it down). Its public counters: `hash_failures` (pieces that
    failed their hash on arrival), `verify_failures` (completed files that failed the
    re-check).
    """

    def __init__(self, cfg, mapping, uids: Sequence[int]):
        self.cfg, self.mapping = cfg, mapping
        self.uids = sorted(uids)
        self.local = set(self.uids)
        self.leader = self.uids[0]
        self.name = f"node {self.leader}" if len(self.uids) == 1 else f"nodes {self.uids[0]}-{self.uids[-1]}"
        self.members: dict[int, TorrentTransport] = {}
        self.session: lt.session | None = None
        self.spool: Path | None = None
        self._spool: Spool | None = None
        self.hash_failures = 0
        self.verify_failures = 0
        self.failure: BaseException | None = None
        # the session's torrents; changed on the alert thread only, read under the lock
        self._by_hash: dict[str, Torrent] = {}
        self._by_handle: dict[lt.torrent_handle, Torrent] = {}
        self._lock = threading.Lock()
        self._members_lock = threading.Lock()
        self._receiver = Receiver(self)
        # work posted to the alert thread
        self._jobs: "queue.SimpleQueue[tuple[Callable[[], Any], Future | None, str]]" = queue.SimpleQueue()
        self._jobs_lock = threading.Lock()
        self._accepting = False
        self._started = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._stop = threading.Event()
        self._alert_thread: threading.Thread | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._hashers: ThreadPoolExecutor | None = None
        self._ledger: dict[int | str, list[int]] = {}  # peer (process leader) → [up, down], retired torrents
        self._node_bytes: dict[int, list[int]] = {}  # member uid → [payload up, payload down], retired torrents
        self._stats: dict[str, int] = {}
        self._stats_time = 0.0
        self._stats_event = threading.Event()
        self._machine_ips: dict[int, list[str]] = {}
        self._data_ports = {mapping.data_port(u) for u in range(mapping.num_nodes)}
        self._hosts: set[str] = set()
        self._settled_sockets: set[str] = set()

    # lifecycle -----------------------------------------------------------------
    def join(self, transport: "TorrentTransport") -> None:
        """A member's transport starts. The plane itself starts when first needed
        (`ensure_started`: a torrent to publish or one announced), so a run whose payloads all
        travel inline never starts a libtorrent session."""
        if transport.uid not in self.local:
            raise CommError(f"node {transport.uid} is not one of the data plane's nodes ({self.name})")
        with self._members_lock:
            if self.failure is not None:
                raise self.failure
            first = not self.members and not self._started
            self.members[transport.uid] = transport
        if first:  # spools that killed processes left behind go now, whether this plane starts or not
            sweep_stale_spools(default_spool_parent(self.cfg.spool_dir))
        if not self.cfg.lazy_start:
            self.ensure_started()

    def ensure_started(self) -> None:
        """Start the session, its spool and its alert thread, once (CommError / BindError
        naming the node when it cannot)."""
        with self._members_lock:
            if self.failure is not None:
                raise self.failure
            if not self._started:
                self._start()
                self._started = True

    def leave(self, transport: "TorrentTransport") -> None:
        """A member's transport closed: the last one shuts the plane down."""
        with self._members_lock:
            self.members.pop(transport.uid, None)
            last = not self.members
        if last:
            self.shutdown()

    def _start(self) -> None:
        self._resolve_hosts()
        parent = default_spool_parent(self.cfg.spool_dir)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._spool = Spool(parent, self.leader)
        except OSError as e:
            raise CommError(f"{self.name}: cannot create spool folder in {parent} "
                            f"(communication.spool_dir): {e}") from None
        self.spool = self._spool.root
        try:
            self._start_session()
            self._workers = ThreadPoolExecutor(1, thread_name_prefix=f"torrent-verify-{self.leader}")
            self._hashers = ThreadPoolExecutor(2, thread_name_prefix=f"torrent-hash-{self.leader}")
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self.session.set_alert_fd(self._wake_w)  # libtorrent writes a byte when alerts are queued
            self._accepting = True
            self._alert_thread = threading.Thread(target=self._alert_loop, name=f"torrent-{self.leader}",
                                                  daemon=True)
            self._alert_thread.start()
            _LIVE.add(self)
        except BaseException:
            self.shutdown()
            raise

    def _resolve_hosts(self) -> None:
        """The addresses of every machine of the run (CommError naming one that does not resolve)."""
        for machine, host in sorted(self.mapping.hosts.items()):
            try:
                found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as e:
                raise CommError(f"{self.name}: cannot resolve host {host!r} of machine {machine} "
                                f"(run.hosts or run.ip_file): {e}") from None
            self._machine_ips[machine] = list(dict.fromkeys(ai[4][0] for ai in found))
        self._hosts = {ip for ips in self._machine_ips.values() for ip in ips}

    def _start_session(self) -> None:
        host = self.address(self.leader)
        ports = [self.mapping.data_port(u) for u in self.uids]
        settings = lan_settings(self.cfg, host, ports[0], self.leader)
        bind = f"[{host}]" if ":" in host else host
        settings["listen_interfaces"] = ",".join(f"{bind}:{port}" for port in ports)
        # libtorrent's rate limits are the session's: the process carries its nodes' links
        settings["upload_rate_limit"] = int(self.cfg.upload_limit) * len(self.uids)
        settings["download_rate_limit"] = int(self.cfg.download_limit) * len(self.uids)
        self.session = lt.session(settings)
        listening: set[int] = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(listening) < len(ports):
            self.session.wait_for_alert(100)
            for a in self.session.pop_alerts():
                if isinstance(a, lt.listen_failed_alert):
                    port = getattr(a, "port", None)
                    who = self.uids[ports.index(port)] if port in ports else self.leader
                    raise BindError(f"node {who}: cannot bind data port {port if port else ports[0]} on {host} "
                                    f"({a.message()}); choose another run.base_port")
                if isinstance(a, lt.listen_succeeded_alert) and a.socket_type == lt.socket_type_t.tcp:
                    listening.add(a.port)
        if len(listening) < len(ports):
            raise BindError(f"{self.name}: libtorrent did not start listening on {host}:{ports} within 10 s")
        self.session.set_peer_class_filter(rate_limited_everywhere())  # limits apply to LAN peers too
        self.session.set_ip_filter(only_from(self._hosts))  # only the run's hosts may connect

    def shutdown(self) -> None:
        if self._alert_thread is not None and self._alert_thread.is_alive():
            self._data_plane_stats()  # final counters
        self._stop.set()
        self._wake()
        if self._alert_thread is not None:
            self._alert_thread.join(timeout=5)
        self._refuse_jobs()
        for pool in (self._workers, self._hashers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.session is not None:
            with self._lock:
                torrents = list(self._by_hash.values())
                self._by_hash.clear()
                self._by_handle.clear()
            for t in torrents:
                self._fold_bytes(t)
            ses, self.session = self.session, None
            ses.pause()
            del ses  # the destructor stops libtorrent's threads and closes every file
        for fd in (self._wake_r, self._wake_w):  # only now: libtorrent wrote to it until here
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        _LIVE.discard(self)

    def fail(self, cause: BaseException, where: str) -> None:
        """The plane broke: every member transport fails with the cause."""
        with self._members_lock:
            members = list(self.members.values())
        if self.failure is None:
            self.failure = TransportFailed(f"{self.name}: {where} failed: {type(cause).__name__}: {cause}")
        for t in members:
            t.fail(cause, where)

    # the alert thread -----------------------------------------------------------
    def _alert_loop(self) -> None:
        rescans: list[float] = []
        try:
            while not self._stop.is_set():
                wait = 0.1 if not rescans else max(0.0, min(0.1, rescans[0] - time.monotonic()))
                select.select([self._wake_r], [], [], wait)
                self._drain_wake()
                connected = False
                for a in self.session.pop_alerts():
                    connected |= isinstance(a, lt.peer_connect_alert)
                    self._guarded(lambda: self._on_alert(a), f"torrent alert handler ({type(a).__name__})")
                self._run_jobs()
                now = time.monotonic()
                if connected:
                    rescans = [now + d for d in NODELAY_RESCANS]
                if connected or (rescans and now >= rescans[0]):
                    rescans = [r for r in rescans if r > now]
                    self._nodelay()
        except Exception as e:
            self.fail(e, "torrent alert thread")
        finally:
            self._refuse_jobs()

    def _guarded(self, fn: Callable[[], Any], where: str) -> None:
        """Run `fn`; an exception fails the members (the loop goes on serving seeds)."""
        try:
            fn()
        except Exception as e:
            self.fail(e, where)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"\1")
        except (BlockingIOError, OSError):  # full: the thread is woken anyway
            pass

    def post(self, fn: Callable[[], Any], where: str) -> bool:
        """Run `fn` on the alert thread, later; False when the plane is not running."""
        with self._jobs_lock:
            if not self._accepting:
                return False
            self._jobs.put((fn, None, where))
            self._wake()
        return True

    def call(self, fn: Callable[[], Any], where: str, timeout: float = CALL_TIMEOUT) -> Any:
        """Run `fn` on the alert thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._alert_thread:
            return fn()
        fut: Future = Future()
        with self._jobs_lock:
            if not self._accepting:
                raise self.failure or CommError(f"{self.name}: {where}: the torrent data plane is not running")
            self._jobs.put((fn, fut, where))
            self._wake()
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise CommError(f"{self.name}: {where}: the torrent alert thread did not answer "
                            f"within {timeout:g} s") from None

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, fut, where = self._jobs.get_nowait()
            except queue.Empty:
                return
            if fut is None:
                self._guarded(fn, where)
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # the caller gets it
                    fut.set_exception(e)

    def _refuse_jobs(self) -> None:
        """No more work: fail the calls still waiting."""
        with self._jobs_lock:
            self._accepting = False
        while True:
            try:
                _, fut, where = self._jobs.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(self.failure or CommError(f"{self.name}: {where}: the transport closed"))

    def _nodelay(self) -> None:
        """TCP_NODELAY on this plane's BitTorrent connections (see `torrent_sockets`)."""
        mine = {self.mapping.data_port(u) for u in self.uids}
        try:
            set_nodelay(lambda local, peer: local[1] in mine or (
                peer[1] in self._data_ports and peer[0] in self._hosts), self._settled_sockets)
        except Exception:  # best effort: only latency depends on it
            log.debug("%s: could not set TCP_NODELAY", self.name, exc_info=True)

    def _on_alert(self, a) -> None:
        if isinstance(a, lt.session_stats_alert):
            self._stats, self._stats_time = dict(a.values), time.monotonic()
            self._stats_event.set()
        elif isinstance(a, lt.hash_failed_alert):
            self.hash_failures += 1
            log.info("%s: %s", self.name, a.message())
        elif isinstance(a, lt.torrent_removed_alert):
            t = self._by_hash.get(str(a.info_hashes.v1))
            if isinstance(t, Incoming) and t.handle is None:  # removed to restart it
                self._receiver.on_removed(t)
        elif isinstance(a, (lt.torrent_deleted_alert, lt.torrent_delete_failed_alert)):
            pass
        elif getattr(a, "handle", None) is None:
            if isinstance(a, (lt.listen_failed_alert, lt.performance_alert)):
                log.warning("%s: %s", self.name, a.message())
        else:
            t = self._by_handle.get(a.handle)
            if isinstance(t, Incoming):
                self._receiver.on_alert(t, a)
            elif isinstance(t, Outgoing):
                if isinstance(a, (lt.torrent_checked_alert, lt.torrent_finished_alert, lt.state_changed_alert)):
                    t.ready.set()
                elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
                    log.warning("%s: seeding %r: %s", self.name, t.key, a.message())

    # the torrents (alert thread) ---------------------------------------------------
    # `Receiver` calls these; they run on the alert thread.
    def leader_of(self, uid: int) -> int:
        """The first node of `uid`'s process: the node its libtorrent peer id names."""
        return self.mapping.leader(uid) if hasattr(self.mapping, "leader") else uid

    def lookup(self, info_hash: str) -> Torrent | None:
        return self._by_hash.get(info_hash)

    def known(self, info_hash: str) -> bool:
        return info_hash in self._by_hash

    def register(self, t: Torrent) -> None:
        with self._lock:
            self._by_hash[t.info_hash] = t

    def new_incoming_folder(self) -> Path:
        return self._spool.new_folder("in")[0]

    def add_to_session(self, t: Torrent, params: lt.add_torrent_params) -> None:
        """Add `t`'s torrent to the session (RuntimeError when libtorrent refuses it)."""
        handle = self.session.add_torrent(params)
        with self._lock:
            t.handle = handle
            self._by_handle[handle] = t

    def remove_from_session(self, t: Torrent) -> None:
        """Remove `t`'s torrent from the session, keeping its file and its registration."""
        self._fold_bytes(t)
        with self._lock:
            self._by_handle.pop(t.handle, None)
            handle, t.handle = t.handle, None
        self.session.remove_torrent(handle)

    def forget(self, t: Torrent) -> None:
        """Remove `t` from the registry, the session and the disk."""
        self._fold_bytes(t)
        with self._lock:
            self._by_hash.pop(t.info_hash, None)
            self._by_handle.pop(t.handle, None)
            handle, t.handle = t.handle, None
        if handle is not None and self.session is not None:
            self.session.remove_torrent(handle, lt.session.delete_files)
        if t.folder is not None:
            Spool.remove(t.folder)

    def verify_in_background(self, t: Incoming) -> None:
        """Re-check and decode `t`'s file on the worker; its verdict comes back as an event."""
        path, info, key_ = t.path, t.info, t.key

        def work():
            try:
                verdict = verify_payload(path, info, key_)
            except Exception as e:
                self.fail(e, "torrent verify worker")
                return
            self.post(lambda: self._receiver.on_verdict(t, verdict), "torrent verdict handler")

        try:
            self._workers.submit(work)
        except RuntimeError:  # shutting down
            pass

    def deliver_local(self, t: Outgoing, consumer: "TorrentTransport", ann: Announcement) -> None:
        """Node `consumer` of this process is a receiver of `t`, which a node of this process
        published: decode the spooled file on the worker and deliver it, no download."""
        def work():
            try:
                verdict = verify_payload(t.path, t.info, t.key)
            except Exception as e:
                self.fail(e, "torrent verify worker")
                return
            if verdict.tensors is None:  # our own file spoiled on disk: a bug or a disk fault
                consumer.deliver(Message(ann.sender, ann.key, ann.header, round=ann.round,
                                         error=f"node {consumer.uid}: {ann.key!r} from node {ann.sender} "
                                               f"(same process) {verdict.error or 'fails its hashes'}"))
            else:
                consumer.deliver(Message(ann.sender, ann.key, ann.header, verdict.tensors, t.info.total_size(),
                                         round=ann.round))

        try:
            self._workers.submit(work)
        except RuntimeError:  # shutting down
            pass

    # publishing (caller threads, then the alert thread) ------------------------------
    def seed(self, publisher: int, key: str, blob: bytes, to: Sequence[int], round_: int) -> tuple[Outgoing, bytes]:
        """Spool `blob` (a payload file of node `publisher`), make its torrent and seed it;
        returns it and the bencoded .torrent."""
        self.ensure_started()
        try:
            folder, path = spool_payload(self._spool, publisher, blob)
        except OSError as e:
            raise CommError(f"node {publisher}: cannot spool {key!r} ({len(blob)} bytes) in {self.spool}: "
                            f"{e}") from None
        info, meta = make_torrent(path, blob, private=not (self.cfg.dht or self.cfg.lsd),
                                  trackers=self.cfg.trackers, pool=self._hashers)
        t = Outgoing(key, publisher, folder, path, info, round_, list(to))
        self.call(lambda: self._add_outgoing(t), f"publishing {key!r}")
        return t, meta

    def _add_outgoing(self, t: Outgoing) -> None:
        if self.known(t.info_hash):
            Spool.remove(t.folder)
            raise CommError(f"node {t.sender}: torrent {t.info_hash} for {t.key!r} is already in the session")
        self.register(t)
        try:
            self.add_to_session(t, seed_params(t.info, t.folder))
        except RuntimeError as e:
            self.forget(t)
            raise CommError(f"node {t.sender}: libtorrent refused the torrent for {t.key!r}: {e}") from None

    def accept(self, ann: Announcement, consumer: "TorrentTransport") -> bool:
        """An announcement for node `consumer`, to be handled on the alert thread."""
        with self._members_lock:
            closing = consumer.uid not in self.members
        if closing:
            return False
        self.ensure_started()
        return self.post(lambda: self._receiver.accept(ann, consumer), "torrent announcement handler")

    # retention ---------------------------------------------------------------------
    def retire(self, member: "TorrentTransport", round_: int) -> None:
        """`retire_before` on the alert thread; nothing to do while the plane has not finished
        starting (another thread may be starting it for an announcement: it holds no torrent
        of `member` older than now) or after it shut down."""
        if self._started and self.session is not None:
            self.call(lambda: self.retire_before(member, round_), "retiring old torrents")

    def retire_before(self, member: "TorrentTransport", round_: int) -> None:
        """Node `member` entered `round_`: let go of the torrents it published or received
        more than ``retention_rounds`` rounds ago (a received one once every node of the
        process it was for is past it). On the alert thread."""
        keep = self.cfg.retention_rounds
        for t in list(self._by_hash.values()):
            if isinstance(t, Outgoing):
                if t.sender == member.uid and round_ - t.round > keep:
                    self.forget(t)
            elif member.uid in t.rounds and round_ - t.rounds[member.uid] > keep:
                del t.rounds[member.uid]
                t.consumers = [c for c in t.consumers if c.uid != member.uid]
                if not t.rounds:
                    self._receiver.retire(t)

    # inspection ------------------------------------------------------------------
    def address(self, uid: int) -> str:
        """The IP address of node `uid` (its machine's first; hosts are resolved at start)."""
        return self._machine_ips[self.mapping.machine_rank(uid)[0]][0]

    def endpoint(self, uid: int) -> tuple[str, int]:
        """Where node `uid`'s BitTorrent session listens."""
        return self.address(uid), self.mapping.data_port(uid)

    def _who(self, p) -> int | str:
        uid = peer_uid(p.pid.to_bytes(), self.mapping.num_nodes)
        if uid is not None:
            return uid
        ip, port = p.ip
        return f"{ip}:{port}"

    @staticmethod
    def _owner(t: Torrent) -> int | None:
        """The member a torrent's bytes count for: its publisher, or its first receiver here."""
        if isinstance(t, Outgoing):
            return t.sender
        return t.consumers[0].uid if t.consumers else None

    def _fold_bytes(self, t: Torrent) -> None:
        for who, (up, down) in self._torrent_peer_bytes(t).items():
            acc = self._ledger.setdefault(who, [0, 0])
            acc[0] += up
            acc[1] += down
        owner = self._owner(t)
        if owner is not None and t.handle is not None and t.handle.is_valid():
            st = t.handle.status()
            acc = self._node_bytes.setdefault(owner, [0, 0])
            acc[0] += st.total_payload_upload
            acc[1] += st.total_payload_download

    def _torrent_peer_bytes(self, t: Torrent) -> dict[int | str, tuple[int, int]]:
        out: dict[int | str, tuple[int, int]] = {}
        handle = t.handle
        if handle is None or not handle.is_valid():
            return out
        for p in handle.get_peer_info():
            who = self._who(p)
            up, down = out.get(who, (0, 0))
            out[who] = (up + p.total_upload, down + p.total_download)
        return out

    def peer_bytes(self) -> dict[int | str, tuple[int, int]]:
        """Data-plane payload bytes per peer, (uploaded to, downloaded from), over the plane's
        life: peers are the processes' first node ids (from their peer id), or "ip:port" for
        an unknown client. Bytes of a connection that closed before its key retired are not
        counted."""
        with self._lock:
            totals = {k: list(v) for k, v in self._ledger.items()}
            live = list(self._by_hash.values())
        for t in live:
            for who, (up, down) in self._torrent_peer_bytes(t).items():
                acc = totals.setdefault(who, [0, 0])
                acc[0] += up
                acc[1] += down
        return {k: (v[0], v[1]) for k, v in totals.items()}

    def member_payload_bytes(self, uid: int) -> tuple[int, int]:
        """(uploaded, downloaded) payload bytes of the torrents node `uid` published or first
        received here (with one node per process: libtorrent's session counters)."""
        if len(self.uids) == 1:
            stats = self._data_plane_stats()
            return stats.get("net.sent_payload_bytes", 0), stats.get("net.recv_payload_bytes", 0)
        with self._lock:
            up, down = self._node_bytes.get(uid, [0, 0])
            live = [t for t in self._by_hash.values() if self._owner(t) == uid]
        for t in live:
            handle = t.handle
            if handle is not None and handle.is_valid():
                st = handle.status()
                up, down = up + st.total_payload_upload, down + st.total_payload_download
        return up, down

    def member_bytes(self, uid: int) -> tuple[int, int]:
        """(sent, received) bytes of node `uid` on the data plane, protocol included (with
        several nodes per process: its payload bytes plus its share of the protocol)."""
        stats = self._data_plane_stats()
        sent, received = stats.get("net.sent_bytes", 0), stats.get("net.recv_bytes", 0)
        if len(self.uids) == 1:
            return sent, received
        up, down = self.member_payload_bytes(uid)
        psent, preceived = stats.get("net.sent_payload_bytes", 0), stats.get("net.recv_payload_bytes", 0)
        share = (up + down) / max(1, psent + preceived)
        return up + int(share * (sent - psent)), down + int(share * (received - preceived))

    def find(self, key: str, sender: int, member: int) -> Torrent | None:
        """The torrent `key` from `sender` that node `member` published or receives."""
        with self._lock:
            for t in self._by_hash.values():
                if t.key == key and t.sender == sender and (
                        t.sender == member if isinstance(t, Outgoing) else member in t.rounds):
                    return t
        return None

    def _data_plane_stats(self) -> dict[str, int]:
        """libtorrent's session counters, at most 50 ms old while the session runs."""
        alive = self._alert_thread is not None and self._alert_thread.is_alive()
        if self.session is not None and alive and time.monotonic() - self._stats_time > 0.05:
            self._stats_event.clear()
            self.session.post_session_stats()
            self._stats_event.wait(1.0)
        return self._stats


@TRANSPORTS.register("torrent", keys=TorrentKeys)
class TorrentTransport(ZmqTransport):
    """Headers and small payloads on ZeroMQ; tensor payloads swarmed over BitTorrent.

    The libtorrent side is the process's `DataPlane` (`plane`): set it before `start` to
    share one among the nodes of a process, else the transport makes its own. Extra
    public API: `peer_bytes()` (data-plane bytes per peer), `progress(key, sender)`,
    `spool` (the plane's spool folder), `hash_failures` and `verify_failures`.
    """

    name = "torrent"

    def __init__(self, uid: int, mapping, cfg):
        super().__init__(uid, mapping, cfg)
        self.plane: DataPlane | None = None
        self._dropped_announcements: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._announcements_lock = threading.Lock()

    # lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        if self.plane is None:
            self.plane = DataPlane(self.cfg, self.mapping, [self.uid])
        # the data plane first: the control plane may at once hand it TORRENT frames
        self.plane.join(self)
        try:
            super().start()
        except BaseException:
            self.plane.leave(self)
            raise

    def close(self, timeout: float | None = None) -> None:
        if self._closed or self.control is None:
            return
        super().close(timeout)  # BYE to the peers; seeding goes on until they said BYE too
        self.plane.leave(self)

    # the plane's parts, for inspection ---------------------------------------------------
    session = property(lambda self: self.plane.session if self.plane else None)
    spool = property(lambda self: self.plane.spool if self.plane else None)
    hash_failures = property(lambda self: self.plane.hash_failures if self.plane else 0)
    verify_failures = property(lambda self: self.plane.verify_failures if self.plane else 0)

    def peer_bytes(self) -> dict[int | str, tuple[int, int]]:
        """Data-plane payload bytes per peer process (see `DataPlane.peer_bytes`)."""
        return self.plane.peer_bytes()

    @property
    def current_round(self) -> int:
        """The round this node is in (`advance`)."""
        return self._round

    # sending ---------------------------------------------------------------------
    def publish(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        to: Sequence[int],
        header: Mapping[str, Any] | None = None,
        persistent: bool = False,
        concurrent: bool = False,
    ) -> None:
        to = [p for p in dict.fromkeys(to) if p != self.uid]
        if not to:
            return
        if persistent or self.inline(tensor_bytes(tensors), to, concurrent):
            body = encode(self.wire_head(key, header, **({"r": None} if persistent else {})), tensors)
            for peer in to:
                self.control.send(peer, DATA, body)
            self.count_payload(sent=tensor_bytes(tensors) * len(to))
            self.count_path("inline")
            log.debug("node %d: published %r inline (%d bytes) to %s", self.uid, key, len(body), to)
            return
        t, meta = self.plane.seed(self.uid, key, encode_payload(key, self.uid, tensors), to, self._round)
        body = announcement_body(self.wire_head(key, header), meta, to, t.info.total_size())
        if not t.ready.wait(SEED_TIMEOUT):
            log.warning("node %d: torrent for %r not seeding after %g s; announcing anyway",
                        self.uid, key, SEED_TIMEOUT)
        for peer in to:
            self.control.send(peer, TORRENT, body)
        self.count_path("torrent")
        log.debug("node %d: published %r as a torrent (%d bytes) to %s", self.uid, key, t.info.total_size(), to)

    def inline(self, nbytes: int, to: Sequence[int], concurrent: bool = False) -> bool:
        """Whether a payload of `nbytes` for the nodes `to` travels inline (``communication.path``;
        with ``auto``, what `communication.paths` finds faster for its size, its receivers,
        the configured link rates and whether the receivers publish at the same time)."""
        if self.cfg.path != "auto":
            return self.cfg.path == "inline"
        me = self.mapping.machine_rank(self.uid)[0]
        remote = any(self.mapping.machine_rank(p)[0] != me for p in to)
        return DEFAULT_MODEL.choose(nbytes, len(to), self.cfg.upload_limit, self.cfg.download_limit, remote,
                                    self.cfg.link_rate, concurrent) == "inline"

    # receiving -------------------------------------------------------------------
    def handle_frame(self, sender: int, kind: bytes, body: memoryview) -> None:
        if kind != TORRENT:
            return super().handle_frame(sender, kind, body)
        try:
            ann = parse_announcement(sender, body, self.mapping.num_nodes)
        except MalformedAnnouncement as e:
            self.dropped("malformed TORRENT frame", f"from node {sender}: {e}")
            if e.key is not None:
                with self._announcements_lock:
                    self._dropped_announcements[(e.key, sender)] = str(e)
                    while len(self._dropped_announcements) > DROPPED_ANNOUNCEMENTS_KEPT:
                        self._dropped_announcements.popitem(last=False)
            return
        if not self.plane.accept(ann, self):
            self.dropped("TORRENT frame while closing", f"{ann.key!r} from node {sender}")

    # retention -------------------------------------------------------------------
    def advance(self, round_: int) -> None:
        """Enter `round_`: remove every torrent (and its file) older than `retention_rounds`."""
        super().advance(round_)
        if self.plane is not None and not self._closed:
            self.plane.retire(self, round_)

    # inspection ------------------------------------------------------------------
    def progress(self, key: str, sender: int) -> dict[str, Any] | None:
        """State of the torrent `key` from `sender` (`sender == uid`: one this node published):
        its state, pieces held (list of bool), bytes done and total, connected peers, file
        path, info hash and piece length; None if there is no such torrent in the session
        (never announced, refused, restarting or retired)."""
        t = self.plane.find(key, sender, self.uid) if self.plane else None
        handle = None if t is None else t.handle
        if handle is None or not handle.is_valid():
            return None
        st = handle.status(lt.status_flags_t.query_pieces)
        state = t.state.value if isinstance(t, Incoming) else "seeding"
        return {
            "state": state,
            "pieces": list(st.pieces),
            "done": st.total_wanted_done,
            "total": st.total_wanted,
            "peers": st.num_peers,
            "seeding": st.is_seeding,
            "delivered": state in (RxState.DELIVERED.value, RxState.FAILED.value),
            "path": str(t.path),
            "info_hash": t.info_hash,
            "piece_length": t.info.piece_length(),
        }

    def in_flight(self, key: str, sender: int) -> bool:
        """A torrent announced for `key` by `sender`: its co-receivers may complete it."""
        return self.progress(key, sender) is not None

    def timeout_detail(self, key: str, sender: int) -> str:
        p = self.progress(key, sender)
        if p is None:
            with self._announcements_lock:
                dropped = self._dropped_announcements.get((key, sender))
            if dropped is not None:
                return f"its announcement was dropped: {dropped}"
            return "no torrent announced"
        pct = 100.0 * p["done"] / max(1, p["total"])
        return f"torrent announced, {p['state']}: {pct:.0f}% of {p['total']} bytes, {p['peers']} peer(s) connected"

    @property
    def payload_bytes_sent(self) -> int:
        return super().payload_bytes_sent + (self.plane.member_payload_bytes(self.uid)[0] if self.plane else 0)

    @property
    def payload_bytes_received(self) -> int:
        return super().payload_bytes_received + (self.plane.member_payload_bytes(self.uid)[1] if self.plane else 0)

    @property
    def bytes_sent(self) -> int:
        return super().bytes_sent + (self.plane.member_bytes(self.uid)[0] if self.plane else 0)

    @property
    def bytes_received(self) -> int:
        return super().bytes_received + (self.plane.member_bytes(self.uid)[1] if self.plane else 0)
