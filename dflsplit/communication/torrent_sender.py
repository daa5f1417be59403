"""The publishing side of the `torrent` transport: turn a payload into a seeded torrent.

`spool_payload` encodes the tensors with safetensors (the payload key and the sender in
its metadata) into a fresh folder of the spool; `make_torrent` hashes the file into a v1
torrent (pieces hashed in parallel when large: hashlib releases the GIL);
`seed_params` adds it to a session as a seed without reading the file back. An
`Outgoing` is what the transport keeps of each published torrent until it retires.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import libtorrent as lt
import torch
from safetensors.torch import save as st_save

from .torrent_settings import piece_size
from .torrent_spool import Spool, write_atomic

PARALLEL_HASH_BYTES = 8 << 20


@dataclass
class Outgoing:
    """A torrent this node published and seeds."""

    key: str
    sender: int  # this node
    folder: Path
    path: Path
    info: lt.torrent_info
    round: int  # this node's round when it published (retention)
    receivers: list[int] = field(default_factory=list)
    handle: lt.torrent_handle | None = None
    ready: threading.Event = field(default_factory=threading.Event)  # seeding

    @property
    def info_hash(self) -> str:
        return str(self.info.info_hashes().v1)


def piece_hashes(data: memoryview | bytes, piece: int, pool: ThreadPoolExecutor | None = None) -> list[bytes]:
    """SHA-1 of each `piece`-byte slice of `data` (in `pool` when large; hashlib frees the GIL)."""
    view = memoryview(data)
    chunks = [view[i:i + piece] for i in range(0, len(view), piece)]
    if pool is not None and len(view) >= PARALLEL_HASH_BYTES:
        return list(pool.map(lambda c: hashlib.sha1(c).digest(), chunks))
    return [hashlib.sha1(c).digest() for c in chunks]


def encode_payload(key: str, sender: int, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The payload file: safetensors with the key and the sender in its metadata."""
    return st_save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        metadata={"key": key, "sender": str(sender)},
    )


def spool_payload(spool: Spool, uid: int, blob: bytes) -> tuple[Path, Path]:
    """Write `blob` into a fresh ``out/`` folder of `spool`; returns (folder, file).
    Raises OSError (and leaves no folder) when the spool cannot take it."""
    folder, seq = spool.new_folder("out")
    path = folder / f"n{uid}-{seq}.safetensors"
    try:
        write_atomic(path, blob)
    except OSError:
        spool.remove(folder)
        raise
    return folder, path


def make_torrent(
    path: Path, blob: bytes, *, private: bool, trackers: list[str] = (), pool: ThreadPoolExecutor | None = None
) -> tuple[lt.torrent_info, bytes]:
    """The v1 torrent of the file `path` whose content is `blob`: (info, bencoded .torrent)."""
    piece = piece_size(len(blob))
    ct = lt.create_torrent([lt.create_file_entry(path.name, len(blob))], piece, lt.create_torrent.v1_only)
    for i, h in enumerate(piece_hashes(blob, piece, pool)):
        ct.set_hash(i, h)
    ct.set_priv(private)
    for tier, url in enumerate(trackers):
        ct.add_tracker(url, tier)
    ct.set_creator("dflsplit")
    meta = lt.bencode(ct.generate())
    return lt.torrent_info(meta), meta


def seed_params(info: lt.torrent_info, folder: Path) -> lt.add_torrent_params:
    """Parameters that add `info`, whose file is complete in `folder`, as a seed (no re-check)."""
    params = lt.add_torrent_params()
    params.ti = info
    params.save_path = str(folder)
    params.flags = lt.torrent_flags.no_verify_files | lt.torrent_flags.apply_ip_filter
    params.have_pieces = [True] * info.num_pieces()
    return params
