"""libtorrent settings of the `torrent` transport: the session's LAN settings, the alert
mask, the peer filters, the peer id that names a node, and the piece size of a payload.

Pure functions of the config; the reasons behind each LAN setting are in the module
docstring of `torrent`.
"""

from __future__ import annotations

from typing import Any, Iterable

import libtorrent as lt

FINGERPRINT = b"-DF"  # peer ids are "-DF<uid:06d>-" + 12 random bytes
MIN_PIECE = 16 << 10
MAX_PIECE = 4 << 20
PIECES_PER_PAYLOAD = 512

ALERT_MASK = (
    lt.alert.category_t.status_notification
    | lt.alert.category_t.error_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.performance_warning
    | lt.alert.category_t.connect_notification
)


def lan_settings(cfg, host: str, port: int, uid: int) -> dict[str, Any]:
    """libtorrent session settings for node `uid` listening on `host:port` (see `torrent`).

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
        "alert_mask": ALERT_MASK,
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
        # connections: boost at resume (see `torrent`), quick retries and timeouts
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


def rate_limited_everywhere() -> lt.ip_filter:
    """Peer-class filter that puts every address in the global class, whose limits are the
    session's rate limits (by default LAN and loopback peers are in an unlimited class)."""
    classes = lt.ip_filter()
    everyone = 1 << lt.session.global_peer_class_id
    classes.add_rule("0.0.0.0", "255.255.255.255", everyone)
    classes.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", everyone)
    return classes


def only_from(ips: Iterable[str]) -> lt.ip_filter:
    """IP filter that blocks every address but `ips` (the run's hosts)."""
    allowed = lt.ip_filter()
    allowed.add_rule("0.0.0.0", "255.255.255.255", 1)
    allowed.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
    for ip in ips:
        allowed.add_rule(ip, ip, 0)
    return allowed


def peer_uid(peer_id: bytes, num_nodes: int) -> int | None:
    """The node id in a peer id made with `lan_settings`' fingerprint, if any."""
    if peer_id[:3] == FINGERPRINT and peer_id[9:10] == b"-" and peer_id[3:9].isdigit():
        uid = int(peer_id[3:9])
        if 0 <= uid < num_nodes:
            return uid
    return None


def piece_size(nbytes: int) -> int:
    """Piece length for a payload: about `PIECES_PER_PAYLOAD` pieces, a power of two in
    [16 KiB, 4 MiB] (small pieces let receivers pass them on sooner)."""
    target = max(MIN_PIECE, nbytes // PIECES_PER_PAYLOAD)
    return min(MAX_PIECE, 1 << (target - 1).bit_length())
