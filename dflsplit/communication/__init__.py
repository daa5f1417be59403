"""Communication layer: moving headers and tensors between nodes.

`build_transport(uid, mapping, cfg)` returns the transport named by ``cfg.name``
(a `CommunicationConfig`): ``tcp`` (inline on ZeroMQ) or ``torrent`` (BitTorrent).
"""

from .base import TRANSPORTS, CommError, Message, PayloadMismatch, PeerTimeout, Transport
from .codec import CodecError, decode, encode
from . import tcp  # noqa: F401  (registers "tcp")

try:  # the BitTorrent data plane registers "torrent" when its module exists
    from . import torrent  # noqa: F401
except ImportError as _e:  # pragma: no cover - only when the module is absent
    if "torrent" not in str(_e):
        raise


def build_transport(uid: int, mapping, cfg) -> Transport:
    """The transport `cfg.name` for node `uid` (not yet started)."""
    return TRANSPORTS.get(cfg.name)(uid, mapping, cfg)


__all__ = [
    "TRANSPORTS", "CommError", "Message", "PayloadMismatch", "PeerTimeout", "Transport",
    "CodecError", "decode", "encode", "build_transport",
]
