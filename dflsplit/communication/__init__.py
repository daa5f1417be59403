"""Communication layer: moving headers and tensors between nodes.

`build_transport(uid, mapping, cfg)` returns the transport named by ``cfg.name``
(a `CommunicationConfig`): ``tcp`` (inline on ZeroMQ) or ``torrent`` (BitTorrent).
"""

from .base import TRANSPORTS, CommError, Message, PayloadMismatch, PeerTimeout, Transport
from .codec import CodecError, decode, encode
from . import tcp, torrent  # noqa: F401  (register "tcp" and "torrent")


def build_transport(uid: int, mapping, cfg) -> Transport:
    """The transport `cfg.name` for node `uid` (not yet started)."""
    return TRANSPORTS.get(cfg.name)(uid, mapping, cfg)


__all__ = [
    "TRANSPORTS", "CommError", "Message", "PayloadMismatch", "PeerTimeout", "Transport",
    "CodecError", "decode", "encode", "build_transport",
]
