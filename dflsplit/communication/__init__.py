"""Communication layer: moving headers and tensors between nodes.

`build_transport(uid, mapping, cfg)` returns the transport named by ``cfg.name``
(a `CommunicationConfig`): ``tcp`` (inline on ZeroMQ) or ``torrent`` (BitTorrent).
"""

from .base import (
    TRANSPORTS, BindError, CommError, Message, PayloadMismatch, PayloadRejected, PeerGone, PeerTimeout, Transport,
    TransportFailed,
)
from .codec import CodecError, decode, encode
from . import tcp, torrent  # noqa: F401  (register "tcp" and "torrent")


def build_transport(uid: int, mapping, cfg, identity: dict | None = None, shared=None) -> Transport:
    """The transport `cfg.name` for node `uid` (not yet started). `identity` (the run id and
    config hash) must match the peers' for their handshake to succeed; `shared` (a
    `ProcessShared`) the parts the nodes of one process share."""
    transport = TRANSPORTS.get(cfg.name)(uid, mapping, cfg)
    transport.identity = dict(identity or {})
    transport.shared = shared
    if shared is not None and hasattr(transport, "plane"):
        transport.plane = shared.data_plane(cfg, mapping)
    return transport


__all__ = [
    "TRANSPORTS", "BindError", "CommError", "Message", "PayloadMismatch", "PayloadRejected", "PeerGone", "PeerTimeout",
    "Transport", "TransportFailed",
    "CodecError", "decode", "encode", "build_transport",
]
