"""The TORRENT frame: how a publisher announces a torrent on the control plane.

Body: a codec message whose JSON head is the publisher's `wire_head` (``key``, ``h`` the
caller's header, ``r`` its round) plus ``peers`` (every receiver of the payload, in the
order that gives each its stripe), ``size`` (bytes of the payload file), and whose one
tensor ``torrent`` (uint8) holds the bencoded .torrent file. `parse_announcement`
checks every field of a frame that came from a peer and raises `MalformedAnnouncement`
for anything else; it never touches the disk or the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import libtorrent as lt
import torch

from .codec import CodecError, decode, encode
from .control import wire_round

TORRENT = b"TORRENT"


class MalformedAnnouncement(ValueError):
    """A TORRENT frame that does not follow the format (the message says what is wrong;
    `key` is the payload key it announced, when that much could be read)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class Announcement:
    """A parsed TORRENT frame: `sender` offers the payload `key` as the torrent `info`."""

    sender: int
    key: str
    header: dict[str, Any]
    info: lt.torrent_info
    size: int  # bytes of the payload file: the announced size, equal to the torrent's
    receivers: list[int] = field(default_factory=list)  # every receiver, as announced
    round: int | None = None  # the publisher's round stamp

    @property
    def info_hash(self) -> str:
        return str(self.info.info_hashes().v1)


def announcement_body(head: Mapping[str, Any], meta: bytes, receivers: list[int], size: int) -> bytes:
    """Encode a TORRENT frame: `head` (from `wire_head`), the receivers, the payload size
    and the bencoded torrent `meta`."""
    full = {**head, "peers": list(receivers), "size": int(size)}
    return encode(full, {"torrent": torch.frombuffer(bytearray(meta), dtype=torch.uint8)})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_announcement(sender: int, body: memoryview | bytes, num_nodes: int) -> Announcement:
    """Check and parse a TORRENT frame from `sender`; raises MalformedAnnouncement."""
    try:
        head, tensors = decode(body)
    except CodecError as e:
        raise MalformedAnnouncement(str(e)) from None
    key = head.get("key")
    if not isinstance(key, str) or not key:
        raise MalformedAnnouncement(f"'key' must be a non-empty string, got {type(key).__name__}")
    where = f"announcement of {key[:64]!r}"
    header = head.get("h", {})
    if not isinstance(header, dict):
        raise MalformedAnnouncement(f"{where}: 'h' must be an object, got {type(header).__name__}", key)
    receivers = head.get("peers")
    if not isinstance(receivers, list) or not all(_is_int(p) and 0 <= p < num_nodes for p in receivers):
        raise MalformedAnnouncement(f"{where}: 'peers' must be a list of node ids in 0..{num_nodes - 1}", key)
    if len(set(receivers)) != len(receivers) or sender in receivers:
        raise MalformedAnnouncement(f"{where}: 'peers' repeats a node or holds the publisher", key)
    size = head.get("size")
    if not _is_int(size) or size < 0:
        raise MalformedAnnouncement(f"{where}: 'size' must be a non-negative integer, got {size!r}", key)
    meta = tensors.get("torrent")
    if set(tensors) != {"torrent"} or meta.dtype != torch.uint8 or meta.dim() != 1:
        raise MalformedAnnouncement(
            f"{where}: expected one 1-d uint8 tensor 'torrent', got {sorted(tensors)}", key)
    try:
        info = lt.torrent_info(meta.numpy().tobytes())
    except RuntimeError as e:
        raise MalformedAnnouncement(f"{where}: torrent metadata rejected: {e}", key) from None
    files = info.layout()
    if info.num_files() != 1:
        raise MalformedAnnouncement(f"{where}: the torrent has {info.num_files()} files, expected one", key)
    name = info.name()
    if (not name or name.startswith(".") or any(c in name for c in "/\\\0") or files.file_path(0) != name
            or files.file_flags(0) & (files.flag_symlink | files.flag_pad_file)):
        raise MalformedAnnouncement(
            f"{where}: the torrent's file {files.file_path(0)!r} is not a plain file name", key)
    if info.total_size() != size:
        raise MalformedAnnouncement(
            f"{where}: announced size {size} bytes differs from the torrent's {info.total_size()} bytes", key)
    return Announcement(sender, key, header, info, size, receivers, wire_round(head))
