"""The spool of the `torrent` transport: the folder where one node keeps the files it seeds.

A node's spool is ``<parent>/dflsplit-<pid>-n<uid>-<random>/``, with one numbered folder
per payload under ``out/`` (published) and ``in/`` (received). The parent is
``communication.spool_dir``, else /dev/shm (tmpfs) when writable, else the temp dir.
Files are written whole or not at all (`write_atomic`), and the spool is removed on
`close`, when the transport object is collected, or, for a process that was killed, by
the next node that starts a spool under the same parent (`sweep_stale_spools`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref
from pathlib import Path

SPOOL_PREFIX = "dflsplit-"


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


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temporary file renamed over it: a reader (or a
    crash) sees the whole file or none. Raises OSError, leaving no temporary file."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class Spool:
    """One node's spool folder (created at construction, after sweeping stale ones)."""

    def __init__(self, parent: Path, uid: int):
        sweep_stale_spools(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-n{uid}-", dir=parent))
        self._seq = itertools.count()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def new_folder(self, direction: str) -> tuple[Path, int]:
        """A fresh empty folder under ``out/`` or ``in/``, and its sequence number."""
        if direction not in ("in", "out"):
            raise ValueError(f"spool direction must be 'in' or 'out', not {direction!r}")
        seq = next(self._seq)
        folder = self.root / direction / str(seq)
        folder.mkdir(parents=True)
        return folder, seq

    @staticmethod
    def remove(folder: Path) -> None:
        """Remove one payload's folder and everything in it."""
        shutil.rmtree(folder, ignore_errors=True)

    def files(self, direction: str = "") -> list[Path]:
        """The files in the spool (under `direction` only, when given)."""
        base = self.root / direction if direction else self.root
        return [p for p in base.rglob("*") if p.is_file()] if base.exists() else []

    def close(self) -> None:
        """Remove the whole spool."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._finalizer.detach()
