"""Communication layer: moving headers and tensors between nodes.

`build_transport(uid, mapping, cfg)` returns the transport named by ``cfg.name``
(a `CommunicationConfig`): ``tcp`` (inline on ZeroMQ) or ``torrent`` (BitTorrent).
"""

import copy

from .base import (
    TRANSPORTS, BindError, CommError, Message, PayloadMismatch, PayloadRejected, PeerGone, PeerTimeout, Transport,
    TransportFailed,
)
from .codec import CodecError, decode, encode
from . import tcp, torrent  # noqa: F401  (register "tcp" and "torrent")


def build_transport(uid: int, mapping, cfg, identity: dict | None = None, shared=None) -> Transport:
    """The transport `cfg.name` for node `uid` (not yet started), with the node's own link caps
    when ``cfg.node_limits`` names it. `identity` (the run id and config hash) must match
    the peers' for their handshake to succeed; `shared` (a `ProcessShared`) the parts the
    nodes of one process share (their libtorrent session keeps the section's common caps)."""
    common = cfg
    caps = getattr(cfg, "node_limits", None) or {}
    if uid in caps:  # this node's own link (communication.node_limits)
        cfg = copy.copy(cfg)
        cfg.upload_limit, cfg.download_limit = caps[uid]
    transport = TRANSPORTS.get(cfg.name)(uid, mapping, cfg)
    transport.identity = dict(identity or {})
    transport.shared = shared
    if shared is not None and hasattr(transport, "plane"):
        transport.plane = shared.data_plane(common, mapping)
    return transport


__all__ = [
    "TRANSPORTS", "BindError", "CommError", "Message", "PayloadMismatch", "PayloadRejected", "PeerGone", "PeerTimeout",
    "Transport", "TransportFailed",
    "CodecError", "decode", "encode", "build_transport",
]
