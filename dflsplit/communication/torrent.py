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
Payloads smaller than ``small_payload_bytes`` travel inline on the control plane, as
with ``tcp``. Nothing of a retired key remains on disk, and nothing at all after
`close` (a spool left by a killed process is swept by the next node that starts).

Latency on a LAN (see `lan_settings`): libtorrent opens outgoing connections from a
once-per-second timer, except for a torrent's "connect boost" when it is resumed; a
receiver therefore adds the torrent paused, with its peers, and resumes it as soon as
it is checked, so the connections start at once. "Finished" means every piece passed
its hash, not that every write reached the file, so a receiver reads the file only
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
import hashlib
import itertools
import logging
import mmap
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import libtorrent as lt
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from ..registry import key
from .base import TRANSPORTS, BindError, CommError, Message
from .codec import CodecError, decode, encode, tensor_bytes
from .control import DATA, ZmqTransport, wire_round
from .torrent_sockets import set_nodelay

log = logging.getLogger(__name__)

TORRENT = b"TORRENT"
SPOOL_PREFIX = "dflsplit-"
MIN_PIECE = 16 << 10
MAX_PIECE = 4 << 20
PIECES_PER_PAYLOAD = 512
PARALLEL_HASH_BYTES = 8 << 20
MAX_VERIFY_RETRIES = 3
MAX_RESTARTS = 3
FINGERPRINT = b"-DF"

_ALERTS = (
    lt.alert.category_t.status_notification
    | lt.alert.category_t.error_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.performance_warning
    | lt.alert.category_t.connect_notification
)
NODELAY_RESCANS = (0.003, 0.03)  # seconds after a connection, to catch outgoing ones once connected


def lan_settings(cfg, host: str, port: int, uid: int) -> dict[str, Any]:
    """libtorrent session settings for node `uid` listening on `host:port` (see module doc).

    `cfg` is a `CommunicationConfig`: its rate limits become the session's, and
    DHT, local peer discovery, UPnP and NAT-PMP follow its switches (all off by default).
    """
    bind = f"[{host}]" if ":" in host else host
    settings = {
        "listen_interfaces": f"{bind}:{port}",
        "max_retry_port_bind": 0,
        "listen_system_port_fallback": False,
        "enable_dht": cfg.dht,
        "enable_lsd": cfg.lsd,
        "enable_upnp": cfg.upnp,
        "enable_natpmp": cfg.natpmp,
        "alert_mask": _ALERTS,
        "peer_fingerprint": f"-DF{uid:06d}-",
        "user_agent": "dflsplit",
        # every node of a machine has the same address
        "allow_multiple_connections_per_ip": True,
        # TCP only, plaintext: no uTP congestion control or DH handshake on a LAN
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "out_enc_policy": int(lt.enc_policy.disabled),
        "in_enc_policy": int(lt.enc_policy.enabled),
        # unchoke every interested peer at once instead of every 15 s
        "unchoke_slots_limit": -1,
        "choking_algorithm": 0,
        # connections: boost at resume (see module doc), quick retries and timeouts
        "torrent_connect_boost": 255,
        "connection_speed": 200,
        "min_reconnect_time": 1,
        "peer_connect_timeout": 3,
        "handshake_timeout": 5,
        "request_timeout": 5,
        "piece_timeout": 5,
        "peer_timeout": 30,
        # the tick paces the rate limiter: a rate-limited send waited ~8 ticks (160 ms at
        # 20 ms) however small; unlimited, the tick costs only idle CPU (1.2 % at 5 ms)
        "tick_interval": 10 if (cfg.upload_limit or cfg.download_limit) else 50,
        # keep the send buffer full from the first byte
        "send_buffer_watermark": 4 << 20,
        "send_buffer_low_watermark": 1 << 20,
        "send_buffer_watermark_factor": 150,
        # a HAVE to a seed is never answered with data, so its ACK is delayed (~40 ms) and
        # Nagle's algorithm holds the next requests behind it
        "send_redundant_have": False,
        "aio_threads": 4,
        "hashing_threads": 2,
        # keep seed-to-seed connections, so per-peer counters last until a key retires;
        # only downloaders connect (a seed reconnecting at the same moment as the
        # downloader made both connections drop as duplicates, again every second)
        "close_redundant_connections": False,
        "seeding_outgoing_connections": False,
        "upload_rate_limit": int(cfg.upload_limit),
        "download_rate_limit": int(cfg.download_limit),
        "rate_limit_ip_overhead": False,
        "connections_limit": 2000,
    }
    if not (cfg.dht or cfg.trackers):
        # LAN: a short request queue per peer. libtorrent sizes it from the rate and grows
        # it in slow start, so a receiver queued seconds of requests at the rate-limited
        # publisher, which then held pieces that co-receivers could have served at once
        # (1 -> 8 swarm under upload caps: 3.3 s -> 1.5 s). 16 blocks = 256 KiB in flight.
        settings.update(max_out_request_queue=16, max_allowed_in_request_queue=16, request_queue_time=1)
    return settings


def piece_size(nbytes: int) -> int:
    """Piece length for a payload: about `PIECES_PER_PAYLOAD` pieces, a power of two in
    [16 KiB, 4 MiB] (small pieces let receivers pass them on sooner)."""
    target = max(MIN_PIECE, nbytes // PIECES_PER_PAYLOAD)
    return min(MAX_PIECE, 1 << (target - 1).bit_length())


def piece_hashes(data: memoryview | bytes, piece: int, pool: ThreadPoolExecutor | None = None) -> list[bytes]:
    """SHA-1 of each `piece`-byte slice of `data` (in `pool` when large; hashlib frees the GIL)."""
    view = memoryview(data)
    chunks = [view[i:i + piece] for i in range(0, len(view), piece)]
    if pool is not None and len(view) >= PARALLEL_HASH_BYTES:
        return list(pool.map(lambda c: hashlib.sha1(c).digest(), chunks))
    return [hashlib.sha1(c).digest() for c in chunks]


def bad_pieces(path: Path, info: lt.torrent_info) -> list[int]:
    """Indexes of the pieces of `path` whose SHA-1 differs from the torrent's."""
    size = info.total_size()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            return list(range(info.num_pieces()))
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


def default_spool_parent(spool_dir: str | None) -> Path:
    """Where node spools go: `spool_dir`, else /dev/shm (tmpfs) when writable, else the temp dir."""
    if spool_dir:
        return Path(spool_dir).expanduser()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def sweep_stale_spools(parent: Path) -> list[Path]:
    """Remove spool folders under `parent` left by dflsplit processes of this user that died."""
    removed = []
    try:
        candidates = list(parent.glob(SPOOL_PREFIX + "*"))
    except OSError:
        return removed
    for d in candidates:
        try:
            pid = int(d.name[len(SPOOL_PREFIX):].split("-", 1)[0])
            if d.stat().st_uid != os.getuid() or not d.is_dir():
                continue
        except (ValueError, OSError):
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


_LIVE: "weakref.WeakSet[TorrentTransport]" = weakref.WeakSet()


@atexit.register
def _close_data_planes_at_exit() -> None:
    """Stop the sessions of transports never closed, before the interpreter tears down
    (a libtorrent session destroyed under a running alert thread aborts the process)."""
    for t in list(_LIVE):
        try:
            t._shutdown_data_plane()
        except Exception:  # pragma: no cover - best effort at exit
            pass


@dataclass
class _Torrent:
    """One torrent of this node's session: published (outgoing) or being received."""

    key: str
    sender: int
    folder: Path
    path: Path
    info: lt.torrent_info
    round: int
    outgoing: bool
    header: dict = field(default_factory=dict)
    peers: list[int] = field(default_factory=list)
    handle: lt.torrent_handle | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    busy: bool = False
    flushing: bool = False
    restarting: bool = False
    restarts: int = 0
    bad_peers: set[int] = field(default_factory=set)
    stripe: tuple[int, int] | None = None
    delivered: bool = False
    verify_failures: int = 0
    added: float = field(default_factory=time.monotonic)
    sent_round: int | None = None  # the publisher's round stamp


@dataclass
class TorrentKeys:
    """Keys of transport `torrent`."""

    small_payload_bytes: int = key(1 << 20, "payloads smaller than this travel inline on the control plane", ge=0)
    retention_rounds: int = key(2, "rounds a received torrent keeps seeding", ge=0)
    spool_dir: Optional[str] = key(None, "spool folder (default: /dev/shm when writable, else the temp dir)")
    dht: bool = key(False, "libtorrent's DHT")
    lsd: bool = key(False, "local service discovery")
    upnp: bool = key(False, "UPnP port mapping")
    natpmp: bool = key(False, "NAT-PMP port mapping")
    trackers: list[str] = key(doc="tracker URLs added to every torrent", factory=list)


@TRANSPORTS.register("torrent", keys=TorrentKeys)
class TorrentTransport(ZmqTransport):
    """Headers and small payloads on ZeroMQ; tensor payloads swarmed over BitTorrent.

    Extra public API: `peer_bytes()` (data-plane bytes per peer), `progress(key, sender)`,
    `spool` (this node's spool folder), `hash_failures` (pieces that failed their hash on
    arrival) and `verify_failures` (completed files that failed the re-check).
    """

    name = "torrent"

    def __init__(self, uid: int, mapping, cfg):
        super().__init__(uid, mapping, cfg)
        self.session: lt.session | None = None
        self.spool: Path | None = None
        self.hash_failures = 0
        self.verify_failures = 0
        self._torrents: dict[lt.torrent_handle, _Torrent] = {}
        self._by_hash: dict[str, _Torrent] = {}
        self._lock = threading.RLock()
        self._round = 0
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._alert_thread: threading.Thread | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._hashers: ThreadPoolExecutor | None = None
        self._ledger: dict[int | str, list[int]] = {}
        self._stats: dict[str, int] = {}
        self._stats_time = 0.0
        self._stats_event = threading.Event()
        self._addresses: dict[int, str] = {}
        self._data_ports = {mapping.data_port(u) for u in range(mapping.num_nodes)}
        self._hosts: set[str] = set()
        self._settled_sockets: set[str] = set()
        self._finalizer = None

    # lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        parent = default_spool_parent(self.cfg.spool_dir)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CommError(f"node {self.uid}: cannot create spool folder {parent} (communication.spool_dir): {e}") from None
        sweep_stale_spools(parent)
        self.spool = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-n{self.uid}-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.spool), True)
        try:
            # the data plane first: the control plane may at once hand it TORRENT frames
            self._start_session()
            self._workers = ThreadPoolExecutor(1, thread_name_prefix=f"torrent-done-{self.uid}")
            self._hashers = ThreadPoolExecutor(2, thread_name_prefix=f"torrent-hash-{self.uid}")
            self._alert_thread = threading.Thread(target=self._alert_loop, name=f"torrent-{self.uid}", daemon=True)
            self._alert_thread.start()
            _LIVE.add(self)
            super().start()
        except BaseException:
            self._shutdown_data_plane()
            if self.control is not None:
                self.control.close()
                self.control = None
            raise

    def _start_session(self) -> None:
        host, port = self._address(self.uid), self.mapping.data_port(self.uid)
        self.session = lt.session(lan_settings(self.cfg, host, port, self.uid))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.session.wait_for_alert(100)
            for a in self.session.pop_alerts():
                if isinstance(a, lt.listen_failed_alert):
                    raise BindError(
                        f"node {self.uid}: cannot bind data port {port} on {host} ({a.message()}); "
                        f"choose another run.base_port"
                    )
                if isinstance(a, lt.listen_succeeded_alert) and a.socket_type == lt.socket_type_t.tcp:
                    break
            else:
                continue
            break
        else:
            raise BindError(f"node {self.uid}: libtorrent did not start listening on {host}:{port} within 10 s")
        # rate limits apply to peers on the LAN too (by default they are in an unlimited class)
        classes = lt.ip_filter()
        everyone = 1 << lt.session.global_peer_class_id
        classes.add_rule("0.0.0.0", "255.255.255.255", everyone)
        classes.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", everyone)
        self.session.set_peer_class_filter(classes)
        # only the run's hosts may connect
        allowed = lt.ip_filter()
        allowed.add_rule("0.0.0.0", "255.255.255.255", 1)
        allowed.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
        for machine in sorted(self.mapping.hosts):
            for ip in self._resolve_all(self.mapping.hosts[machine]):
                allowed.add_rule(ip, ip, 0)
                self._hosts.add(ip)
        self.session.set_ip_filter(allowed)

    def close(self, timeout: float | None = None) -> None:
        if self._closed or self.control is None:
            return
        super().close(timeout)  # BYE to the peers; seeding goes on until they said BYE too
        self._shutdown_data_plane()

    def _shutdown_data_plane(self) -> None:
        if self._alert_thread is not None and self._alert_thread.is_alive():
            self._data_plane_bytes()  # final counters
        self._stop.set()
        if self._alert_thread is not None:
            self._alert_thread.join(timeout=5)
        for pool in (self._workers, self._hashers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self.session is not None:
            with self._lock:
                for t in list(self._torrents.values()):
                    self._fold_peer_bytes(t)
                self._torrents.clear()
                self._by_hash.clear()
            ses, self.session = self.session, None
            ses.pause()
            del ses  # the destructor stops libtorrent's threads and closes every file
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
        if self._finalizer is not None:
            self._finalizer.detach()
        _LIVE.discard(self)

    # names ---------------------------------------------------------------------
    def _address(self, uid: int) -> str:
        if uid not in self._addresses:
            host = self.mapping.host(uid)
            try:
                self._addresses[uid] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
            except socket.gaierror as e:
                raise BindError(f"node {uid}: cannot resolve host {host!r}: {e}") from None
        return self._addresses[uid]

    @staticmethod
    def _resolve_all(host: str) -> set[str]:
        try:
            return {ai[4][0] for ai in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        except socket.gaierror:
            return set()

    def _endpoint(self, uid: int) -> tuple[str, int]:
        return self._address(uid), self.mapping.data_port(uid)

    def _peer_uid(self, pid) -> int | None:
        """The node id in a peer id made with `lan_settings`' fingerprint, if any."""
        raw = pid.to_bytes()
        if raw[:3] == FINGERPRINT and raw[9:10] == b"-" and raw[3:9].isdigit():
            uid = int(raw[3:9])
            if 0 <= uid < self.mapping.num_nodes:
                return uid
        return None

    def _who(self, p) -> int | str:
        uid = self._peer_uid(p.pid)
        if uid is not None:
            return uid
        ip, port = p.ip
        return f"{ip}:{port}"

    # sending ---------------------------------------------------------------------
    def publish(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        to: Sequence[int],
        header: Mapping[str, Any] | None = None,
    ) -> None:
        to = [p for p in dict.fromkeys(to) if p != self.uid]
        if not to:
            return
        if tensor_bytes(tensors) < self.cfg.small_payload_bytes:
            body = encode(self.wire_head(key, header), tensors)
            for peer in to:
                self.control.send(peer, DATA, body)
            self.count_payload(sent=tensor_bytes(tensors) * len(to))
            log.debug("node %d: published %r inline (%d bytes) to %s", self.uid, key, len(body), to)
            return
        t, meta = self._seed(key, tensors)
        t.header, t.peers = dict(header or {}), to
        head = self.wire_head(key, t.header, peers=to, size=t.info.total_size(),
                              addrs={str(p): list(self._endpoint(p)) for p in [self.uid, *to]})
        body = encode(head, {"torrent": torch.frombuffer(bytearray(meta), dtype=torch.uint8)})
        if not t.ready.wait(5):
            log.warning("node %d: torrent for %r not seeding after 5 s; announcing anyway", self.uid, key)
        for peer in to:
            self.control.send(peer, TORRENT, body)
        log.debug("node %d: published %r as a torrent (%d bytes) to %s", self.uid, key, t.info.total_size(), to)

    def _seed(self, key: str, tensors: Mapping[str, torch.Tensor]) -> tuple[_Torrent, bytes]:
        """Spool `tensors`, make their torrent and seed it; returns it and its .torrent bytes."""
        seq = next(self._seq)
        folder = self.spool / "out" / str(seq)
        folder.mkdir(parents=True)
        name = f"n{self.uid}-{seq}.safetensors"
        blob = st_save(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
            metadata={"key": key, "sender": str(self.uid)},
        )
        path = folder / name
        try:
            with open(path, "wb") as f:
                f.write(blob)
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise CommError(f"node {self.uid}: cannot spool {key!r} ({len(blob)} bytes) to {path}: {e}") from None
        piece = piece_size(len(blob))
        ct = lt.create_torrent([lt.create_file_entry(name, len(blob))], piece, lt.create_torrent.v1_only)
        for i, h in enumerate(piece_hashes(blob, piece, self._hashers)):
            ct.set_hash(i, h)
        ct.set_priv(not (self.cfg.dht or self.cfg.lsd))
        for tier, url in enumerate(self.cfg.trackers):
            ct.add_tracker(url, tier)
        ct.set_creator("dflsplit")
        del blob
        meta = lt.bencode(ct.generate())
        info = lt.torrent_info(meta)
        t = _Torrent(key, self.uid, folder, path, info, self._round, outgoing=True)
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(folder)
        params.flags = lt.torrent_flags.no_verify_files | lt.torrent_flags.apply_ip_filter
        params.have_pieces = [True] * info.num_pieces()
        self._add(t, params)
        return t, meta

    def _add(self, t: _Torrent, params: lt.add_torrent_params) -> None:
        ih = str(t.info.info_hashes().v1)
        with self._lock:
            if ih in self._by_hash:
                raise CommError(f"node {self.uid}: torrent {ih} for {t.key!r} is already in the session")
            self._by_hash[ih] = t
        try:
            handle = self.session.add_torrent(params)
        except RuntimeError as e:
            with self._lock:
                self._by_hash.pop(ih, None)
            shutil.rmtree(t.folder, ignore_errors=True)
            raise CommError(f"node {self.uid}: libtorrent refused the torrent for {t.key!r}: {e}") from None
        with self._lock:
            t.handle = handle
            self._torrents[handle] = t

    # receiving -------------------------------------------------------------------
    def handle_frame(self, sender: int, kind: bytes, body: memoryview) -> None:
        if kind != TORRENT:
            return super().handle_frame(sender, kind, body)
        try:
            head, tensors = decode(body)
            key = str(head["key"])
            meta = tensors["torrent"].numpy().tobytes()
        except (CodecError, KeyError, TypeError, ValueError) as e:
            log.warning("node %d: malformed TORRENT frame from node %d: %s", self.uid, sender, e)
            return
        header = head.get("h") or {}
        try:
            info = lt.torrent_info(meta)
            if info.num_files() != 1 or "/" in info.name() or info.name().startswith("."):
                raise ValueError(f"expected one plain file, got {info.num_files()} ({info.name()!r})")
        except (RuntimeError, ValueError) as e:
            self.deliver(Message(sender, key, header, round=wire_round(head), error=(
                f"node {self.uid}: torrent metadata for {key!r} from node {sender} rejected: {e}")))
            return
        peers = [sender]
        for p in head.get("peers") or []:
            if isinstance(p, int) and p not in (self.uid, sender) and 0 <= p < self.mapping.num_nodes:
                peers.append(p)
        folder = self.spool / "in" / str(next(self._seq))
        folder.mkdir(parents=True)
        t = _Torrent(key, sender, folder, folder / info.name(), info, self._round, outgoing=False,
                     header=header, peers=peers, sent_round=wire_round(head))
        receivers = [p for p in head.get("peers") or [] if isinstance(p, int)]
        if self.uid in receivers and len(receivers) > 1:
            t.stripe = (receivers.index(self.uid), len(receivers))
        try:
            self._add(t, self._download_params(t))
        except CommError as e:
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("%s", e)

    def _download_params(self, t: _Torrent, paused: bool = True) -> lt.add_torrent_params:
        params = lt.add_torrent_params()
        params.ti = t.info
        params.save_path = str(t.folder)
        # paused until checked: resuming then gives the connect boost (see module doc);
        # not when part of the file is there, as a paused torrent would not check it
        params.flags = lt.torrent_flags.apply_ip_filter | (lt.torrent_flags.paused if paused else 0)
        params.peers = [self._endpoint(p) for p in t.peers if p not in t.bad_peers]
        return params

    def _restart(self, t: _Torrent) -> None:
        """Remove the torrent of `t` (keeping its file) to add it again once removed: the
        new one checks the pieces on disk and starts with a fresh peer list."""
        with self._lock:
            if t.restarts >= MAX_RESTARTS or self._torrents.pop(t.handle, None) is None:
                return
            t.restarts += 1
            t.restarting = True
        log.warning("node %d: %r: node %d was banned for pieces other peers spoiled; restarting the download",
                    self.uid, t.key, t.sender)
        self.session.remove_torrent(t.handle)

    def _alert_loop(self) -> None:
        ses = self.session
        rescans: list[float] = []
        while not self._stop.is_set():
            wait = 0.1 if not rescans else max(0.0, min(0.1, rescans[0] - time.monotonic()))
            connected = False
            if ses.wait_for_alert(int(wait * 1000)):
                for a in ses.pop_alerts():
                    connected |= isinstance(a, lt.peer_connect_alert)
                    try:
                        self._on_alert(a)
                    except Exception:  # an alert must not kill the loop
                        log.exception("node %d: error handling %s", self.uid, type(a).__name__)
            now = time.monotonic()
            if connected:
                rescans = [now + d for d in NODELAY_RESCANS]
            if connected or (rescans and now >= rescans[0]):
                rescans = [r for r in rescans if r > now]
                self._nodelay()

    def _nodelay(self) -> None:
        """TCP_NODELAY on this node's BitTorrent connections (see `torrent_sockets`)."""
        mine = self.mapping.data_port(self.uid)
        try:
            set_nodelay(lambda local, peer: local[1] == mine or (
                peer[1] in self._data_ports and peer[0] in self._hosts), self._settled_sockets)
        except Exception:  # best effort: only latency depends on it
            log.debug("node %d: could not set TCP_NODELAY", self.uid, exc_info=True)

    def _lookup(self, handle) -> _Torrent | None:
        with self._lock:
            t = self._torrents.get(handle)
            if t is None and handle.is_valid():
                t = self._by_hash.get(str(handle.info_hash()))
            return t

    def _on_alert(self, a) -> None:
        if isinstance(a, lt.session_stats_alert):
            self._stats, self._stats_time = dict(a.values), time.monotonic()
            self._stats_event.set()
            return
        if isinstance(a, lt.hash_failed_alert):
            self.hash_failures += 1
            log.info("node %d: %s", self.uid, a.message())
            return
        if isinstance(a, lt.torrent_removed_alert):
            with self._lock:
                t = self._by_hash.get(str(a.info_hashes.v1))
                if t is None or not t.restarting:
                    return
                t.restarting = False
                del self._by_hash[str(a.info_hashes.v1)]
            self._add(t, self._download_params(t, paused=False))
            return
        if isinstance(a, (lt.torrent_deleted_alert, lt.torrent_delete_failed_alert)):
            return
        handle = getattr(a, "handle", None)
        if handle is None:
            if isinstance(a, (lt.listen_failed_alert, lt.performance_alert)):
                log.warning("node %d: %s", self.uid, a.message())
            return
        t = self._lookup(handle)
        if t is None:
            return
        if isinstance(a, lt.torrent_checked_alert):
            if t.outgoing:
                t.ready.set()
            elif not t.delivered:
                st = handle.status()
                if st.is_seeding:
                    t.flushing = True
                    handle.flush_cache()
                elif st.paused:
                    if t.stripe is not None:
                        # receiver k of m asks for every m-th piece first, so that at the
                        # start the receivers fetch different pieces from the publisher
                        k, m = t.stripe
                        handle.prioritize_pieces([7 if i % m == k else 1 for i in range(t.info.num_pieces())])
                    handle.resume()  # first check done: resuming gives the connect boost
                else:  # checked again (bad file, or restarted): the peers were dropped
                    for p in t.peers:
                        if p not in t.bad_peers:
                            handle.connect_peer(self._endpoint(p))
        elif isinstance(a, (lt.torrent_finished_alert, lt.state_changed_alert)):
            if t.outgoing:
                t.ready.set()
            elif isinstance(a, lt.torrent_finished_alert) or a.state == lt.torrent_status.seeding:
                # "finished" means every piece passed its hash, not that every write reached
                # the file: complete once the flush queued behind those writes is done
                t.flushing = True
                handle.flush_cache()
        elif isinstance(a, lt.cache_flushed_alert):
            if not t.outgoing and t.flushing:
                t.flushing = False
                self._finish(t)
        elif isinstance(a, lt.peer_disconnected_alert):
            # libtorrent bans every peer that sent part of too many pieces failing their
            # hash; the publisher, the one sure source, can be among them
            who = self._peer_uid(a.pid)
            if t.outgoing or t.delivered or who is None:
                return
            if a.error.message() in ("peer banned", "too many corrupt pieces"):
                if who == t.sender:
                    self._restart(t)
                else:
                    t.bad_peers.add(who)
        elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
            log.warning("node %d: torrent %r: %s", self.uid, t.key, a.message())
            if not t.outgoing:
                self._fail(t, f"node {self.uid}: receiving {t.key!r} from node {t.sender} failed: {a.message()}")

    def _finish(self, t: _Torrent) -> None:
        with self._lock:
            if t.busy or t.delivered or self._workers is None:
                return
            t.busy = True
        try:
            self._workers.submit(self._complete, t)
        except RuntimeError:  # shutting down
            pass

    def _complete(self, t: _Torrent) -> None:
        """Re-check the completed file, decode it and deliver (on the worker thread)."""
        try:
            bad = bad_pieces(t.path, t.info)
        except OSError as e:
            self._fail(t, f"node {self.uid}: cannot read {t.key!r} from node {t.sender} at {t.path}: {e}")
            return
        if bad:
            self.verify_failures += 1
            t.verify_failures += 1
            if t.verify_failures > MAX_VERIFY_RETRIES:
                self._fail(t, f"node {self.uid}: {t.key!r} from node {t.sender}: pieces {bad[:8]} fail their hash "
                              f"after {MAX_VERIFY_RETRIES} downloads")
                return
            log.warning("node %d: %r from node %d: pieces %s fail their hash on disk; fetching them again",
                        self.uid, t.key, t.sender, bad[:8])
            with self._lock:
                t.busy = False
            t.handle.force_recheck()
            return
        try:
            with safe_open(str(t.path), framework="pt", backend="pread") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            self._fail(t, f"node {self.uid}: payload {t.key!r} from node {t.sender} is not valid safetensors: {e}")
            return
        if meta.get("key") != t.key:
            self._fail(t, f"node {self.uid}: payload announced as {t.key!r} by node {t.sender} "
                          f"holds key {meta.get('key')!r}")
            return
        with self._lock:
            t.delivered, t.busy = True, False
        self.deliver(Message(t.sender, t.key, t.header, tensors, t.info.total_size(), round=t.sent_round))

    def _fail(self, t: _Torrent, error: str) -> None:
        with self._lock:
            if t.delivered:
                return
            t.delivered, t.busy = True, False
        log.warning("%s", error)
        self.deliver(Message(t.sender, t.key, t.header, error=error, round=t.sent_round))

    # retention -------------------------------------------------------------------
    def advance(self, round_: int) -> None:
        """Enter `round_`: remove every torrent (and its file) older than `retention_rounds`."""
        super().advance(round_)
        with self._lock:
            old = [t for t in self._torrents.values() if round_ - t.round > self.cfg.retention_rounds]
        for t in old:
            self._retire(t)

    def _retire(self, t: _Torrent) -> None:
        with self._lock:
            if self._torrents.pop(t.handle, None) is None:
                return
            self._by_hash.pop(str(t.info.info_hashes().v1), None)
            self._fold_peer_bytes(t)
        if self.session is not None:
            self.session.remove_torrent(t.handle, lt.session.delete_files)
        shutil.rmtree(t.folder, ignore_errors=True)

    # inspection ------------------------------------------------------------------
    def _fold_peer_bytes(self, t: _Torrent) -> None:
        for who, (up, down) in self._torrent_peer_bytes(t).items():
            acc = self._ledger.setdefault(who, [0, 0])
            acc[0] += up
            acc[1] += down

    def _torrent_peer_bytes(self, t: _Torrent) -> dict[int | str, tuple[int, int]]:
        out: dict[int | str, tuple[int, int]] = {}
        if t.handle is None or not t.handle.is_valid():
            return out
        for p in t.handle.get_peer_info():
            who = self._who(p)
            up, down = out.get(who, (0, 0))
            out[who] = (up + p.total_upload, down + p.total_download)
        return out

    def peer_bytes(self) -> dict[int | str, tuple[int, int]]:
        """Data-plane payload bytes per peer, (uploaded to, downloaded from), over this node's
        life: peers are node ids (from their peer id), or "ip:port" for an unknown client.
        Bytes of a connection that closed before its key retired are not counted."""
        with self._lock:
            totals = {k: list(v) for k, v in self._ledger.items()}
            live = list(self._torrents.values())
        for t in live:
            for who, (up, down) in self._torrent_peer_bytes(t).items():
                acc = totals.setdefault(who, [0, 0])
                acc[0] += up
                acc[1] += down
        return {k: (v[0], v[1]) for k, v in totals.items()}

    def progress(self, key: str, sender: int) -> dict[str, Any] | None:
        """State of the torrent `key` from `sender` (`sender == uid`: one this node published):
        pieces held (list of bool), bytes done and total, connected peers, file path, info
        hash and piece length; None if there is no such torrent (never announced, or retired)."""
        with self._lock:
            t = next((t for t in self._torrents.values() if t.key == key and t.sender == sender), None)
        if t is None or t.handle is None:
            return None
        st = t.handle.status(lt.status_flags_t.query_pieces)
        return {
            "pieces": list(st.pieces),
            "done": st.total_wanted_done,
            "total": st.total_wanted,
            "peers": st.num_peers,
            "seeding": st.is_seeding,
            "delivered": t.delivered,
            "path": str(t.path),
            "info_hash": str(t.info.info_hashes().v1),
            "piece_length": t.info.piece_length(),
        }

    def timeout_detail(self, key: str, sender: int) -> str:
        p = self.progress(key, sender)
        if p is None:
            return "no torrent announced" if self.session is not None else ""
        pct = 100.0 * p["done"] / max(1, p["total"])
        return f"torrent announced: {pct:.0f}% of {p['total']} bytes, {p['peers']} peer(s) connected"

    def _data_plane_bytes(self) -> tuple[int, int]:
        if self.session is None:
            return self._stats.get("net.sent_bytes", 0), self._stats.get("net.recv_bytes", 0)
        if time.monotonic() - self._stats_time > 0.05:
            self._stats_event.clear()
            self.session.post_session_stats()
            self._stats_event.wait(1.0)
        return self._stats.get("net.sent_bytes", 0), self._stats.get("net.recv_bytes", 0)

    @property
    def payload_bytes_sent(self) -> int:
        return super().payload_bytes_sent + self._stats.get("net.sent_payload_bytes", 0)

    @property
    def payload_bytes_received(self) -> int:
        return super().payload_bytes_received + self._stats.get("net.recv_payload_bytes", 0)

    @property
    def bytes_sent(self) -> int:
        return super().bytes_sent + self._data_plane_bytes()[0]

    @property
    def bytes_received(self) -> int:
        return super().bytes_received + self._data_plane_bytes()[1]

