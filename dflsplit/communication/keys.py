"""CURVE keys for the control plane: one key pair per node, in a folder of certificates.

`write_keys(folder, n)` writes ``node_<uid>.key`` (public) and ``node_<uid>.key_secret``
(public and secret) for nodes 0..n-1 in ZeroMQ's certificate format. Every machine of a
run needs all the public keys and the secret keys of its own nodes. With keys configured
(``communication.curve_keys``), control-plane traffic is encrypted, a node accepts a
connection only from a holder of one of the run's keys, and a frame is accepted only when
the key that authenticated it is the key of the node id it claims.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.auth.thread import ThreadAuthenticator

from .base import CommError

log = logging.getLogger(__name__)


def public_file(folder: str | Path, uid: int) -> Path:
    return Path(folder) / f"node_{uid}.key"


def secret_file(folder: str | Path, uid: int) -> Path:
    return Path(folder) / f"node_{uid}.key_secret"


def write_keys(folder: str | Path, nodes: int, overwrite: bool = False) -> list[Path]:
    """Write a key pair for each of nodes 0..nodes-1 into `folder` (created); returns the files.

    Existing keys are an error unless `overwrite`: replacing them on one machine only
    would lock its nodes out of the run.
    """
    if not zmq.has("curve"):
        raise CommError("this libzmq was built without CURVE support")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for u in range(nodes) for p in (public_file(folder, u), secret_file(folder, u)) if p.exists()]
    if existing and not overwrite:
        raise CommError(f"{existing[0]}: key file exists; pass --overwrite to replace the run's keys")
    written = []
    for uid in range(nodes):
        public, secret = zmq.auth.create_certificates(folder, f"node_{uid}")
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


class CurveKeys:
    """This node's key pair and the public key of every node of the run."""

    def __init__(self, folder: str | Path, uid: int, uids: Iterable[int]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CommError(
                f"{self.folder}: CURVE key folder not found (communication.curve_keys); "
                f"write one with: dflsplit keys {self.folder} --nodes N"
            )
        self.uid = uid
        uids = list(uids)
        missing = [u for u in uids if not public_file(self.folder, u).is_file()]
        if missing:
            listed = ", ".join(public_file(self.folder, u).name for u in missing[:5]) + (", …" if len(missing) > 5 else "")
            raise CommError(
                f"{self.folder}: CURVE public keys missing for node(s) {missing} ({listed}); the run has "
                f"{len(uids)} nodes: write keys for all of them with: dflsplit keys {self.folder} --nodes {len(uids)}"
            )
        self.public: dict[int, bytes] = {u: self._load(public_file(self.folder, u))[0] for u in uids}
        self.public_key, self.secret_key = self._load(secret_file(self.folder, uid))
        if self.secret_key is None:
            raise CommError(f"{secret_file(self.folder, uid)}: holds no secret key")
        if self.public.get(uid, self.public_key) != self.public_key:
            raise CommError(
                f"{secret_file(self.folder, uid)}: its public key differs from {public_file(self.folder, uid)}"
            )
        self.public[uid] = self.public_key
        self._uid_of = {key: u for u, key in self.public.items()}

    @staticmethod
    def _load(path: Path) -> tuple[bytes, bytes | None]:
        if not path.is_file():
            raise CommError(f"{path}: CURVE key file not found (communication.curve_keys)")
        try:
            return zmq.auth.load_certificate(path)
        except (ValueError, OSError) as e:
            raise CommError(f"{path}: not a ZeroMQ certificate: {e}") from None

    def user_id(self, public_key: bytes) -> str:
        """The node id (as text) whose public key (raw 32 bytes or Z85 text) this is, '' for none."""
        if len(public_key) == 32:
            public_key = z85.encode(public_key)
        uid = self._uid_of.get(public_key)
        return "" if uid is None else str(uid)

    def start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """A ZAP handler on `context` that admits exactly the run's public keys and labels
        each connection with the node id its key belongs to (a frame's "User-Id")."""
        keys = self

        class RunAuthenticator(ThreadAuthenticator):
            def curve_user_id(self, client_public_key: bytes) -> str:
                return keys.user_id(client_public_key)

        auth = RunAuthenticator(context, log=log)
        auth.start()
        auth.configure_curve(domain="*", location=self.folder)
        # the folder may hold keys of a larger run: only this run's ids are labelled, and
        # the control plane drops frames whose label is not the id they claim
        return auth

    def secure_server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def secure_client(self, sock: zmq.Socket, peer: int) -> None:
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.public[peer]
