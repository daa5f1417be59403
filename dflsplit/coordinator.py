"""The machines of a run agree on it: the start barrier and the end-of-run summary.

One launcher process runs on every machine (`dflsplit run`, started by ``eval/run.sh``).
Machine 0's launcher binds the run's coordinator port (after every node's two ports, on
machine 0's host); the others connect to it. Frames are ``[kind, JSON object]``:

* ``JOIN`` (machine → 0): machine id, host, config hash, session. Machine 0 refuses a
  config hash other than its own (``REFUSE``, with the reason) and a second machine
  claiming a taken id.
* ``WELCOME`` (0 → all): once every machine joined, the run id (every machine names its
  folder after it and stamps it on its nodes' handshakes).
* ``STATUS`` (0 → all, every few seconds while waiting): who is up and who is ready, so
  every machine prints the same lines, e.g. ``waiting for machine 1 (127.0.0.2): 1 of 2
  machines up, 14 s``.
* ``BEAT`` (machine → 0, every second until the run starts): a machine that falls silent
  during the barrier is named at once instead of at the deadline.
* ``READY`` (machine → 0): every node of the machine completed its handshakes.
* ``START`` (0 → all): every machine is ready: the nodes begin round 0.
* ``ABORT`` (0 → all) / ``FAILED`` (machine → 0): the run cannot go on; the reason
  names the machine and what failed, and every machine exits non-zero.
* ``DONE`` (machine → 0): its nodes' round records, from which machine 0 writes the
  summary of every node of the run.

Every wait is bounded by ``run.start_timeout`` (the barrier) or ``communication.timeout``
(the gathering at the end). With one machine nothing is bound: the run id is made here.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional

import zmq

log = logging.getLogger("dflsplit.coordinator")

BEAT_EVERY = 1.0
SILENT_AFTER = 6.0  # seconds without a BEAT before machine 0 calls a joined machine gone
STATUS_EVERY = 5.0
MAX_FRAME = 1 << 30


class BarrierFailed(RuntimeError):
    """The start barrier did not complete; the message names the missing machines and hosts."""


class RunAborted(RuntimeError):
    """Another machine of the run failed, or machine 0 aborted the run; the message says why."""


def new_run_id() -> str:
    """A run id: the start time and 6 random hex digits (two runs started in one second differ)."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class _Machine:
    host: str
    joined: bool = False
    ready: bool = False
    session: str = ""
    rid: bytes = b""
    last_beat: float = 0.0
    done: Optional[dict] = None


@dataclass
class Coordinator:
    """This launcher's part in the agreement of the run's machines (see the module doc).

    `hosts`: machine id → host; `address`: machine 0's coordinator endpoint;
    `say(line)`: where waiting lines go (stderr by default).
    """

    machine_id: int
    hosts: dict[int, str]
    address: str
    config_hash: str
    start_timeout: float
    say: Callable[[str], None] = field(default=lambda line: None)
    run_id: str = ""
    first_round: int = 0
    _ctx: Any = None
    _sock: Any = None
    _machines: dict[int, _Machine] = field(default_factory=dict)
    _started: float = 0.0
    _deadline: float = 0.0
    _last_status: float = 0.0
    _last_beat: float = 0.0
    _start: bool = False
    _session: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def machines(self) -> int:
        return len(self.hosts)

    @property
    def single(self) -> bool:
        return self.machines == 1

    @property
    def deadline(self) -> float:
        """When the start barrier ends (time.monotonic), counted from `join`."""
        return self._deadline

    def describe(self, m: int) -> str:
        return f"machine {m} ({self.hosts[m]})"

    # ---------------------------------------------------------------- sockets
    def _open(self) -> None:
        self._ctx = zmq.Context()
        if self.machine_id == 0:
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._sock.setsockopt(zmq.LINGER, 2000)
            try:
                self._sock.bind(self.address)
            except zmq.ZMQError as e:
                self.close()
                raise BarrierFailed(f"machine 0 cannot bind the run's coordinator port at {self.address} ({e}); "
                                    f"choose another run.base_port, or stop what uses it") from None
        else:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.IDENTITY, b"\x01" + secrets.token_bytes(15))
            self._sock.setsockopt(zmq.LINGER, 5000)
            self._sock.connect(self.address)

    def _send(self, kind: str, body: dict, rid: bytes | None = None) -> None:
        frames = [kind.encode(), json.dumps(body).encode()]
        try:
            if rid is not None:
                self._sock.send_multipart([rid, *frames], flags=zmq.NOBLOCK)
            else:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a peer gone or a full queue: the barrier's timeouts handle it
            log.debug("coordinator: %s not sent: %s", kind, e)

    def _broadcast(self, kind: str, body: dict) -> None:
        for m, info in self._machines.items():
            if m != 0 and info.joined:
                self._send(kind, body, info.rid)

    def _recv(self, timeout: float) -> tuple[bytes | None, str, dict] | None:
        if not self._sock.poll(max(0, int(timeout * 1000))):
            return None
        frames = self._sock.recv_multipart()
        rid = frames.pop(0) if self.machine_id == 0 else None
        if len(frames) != 2:
            return rid, "", {}
        try:
            body = json.loads(frames[1])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return rid, "", {}
        return rid, frames[0].decode(errors="replace"), body if isinstance(body, dict) else {}

    # ---------------------------------------------------------------- start barrier
    def join(self, run_id: str | None = None) -> str:
        """Wait until every machine joined (machine 0) or machine 0 welcomed this one; return
        the run id (machine 0 announces `run_id` when given, e.g. of a run it resumes, else a
        new one). Raises BarrierFailed naming the machines still missing at the deadline."""
        self._started = time.monotonic()
        self._deadline = self._started + self.start_timeout
        self._machines = {m: _Machine(h) for m, h in self.hosts.items()}
        me = self._machines[self.machine_id]
        me.joined, me.session = True, self._session
        if self.single:
            self.run_id = run_id or new_run_id()
            return self.run_id
        self._open()
        if self.machine_id == 0:
            while not all(m.joined for m in self._machines.values()):
                self._serve(self._wait_slice())
                self._check_deadline("did not join")
            self.run_id = run_id or new_run_id()
            self._broadcast("WELCOME", {"run": self.run_id})
            return self.run_id
        join = {"machine": self.machine_id, "host": self.hosts[self.machine_id], "config": self.config_hash,
                "session": self._session}
        self._send("JOIN", join)
        last_join = time.monotonic()
        while not self.run_id:
            got = self._recv(self._wait_slice())
            if got is not None:
                self._on_message_from_0(*got[1:])
            now = time.monotonic()
            if now - last_join >= 2.0:  # machine 0 may have come up after our first JOIN
                self._send("JOIN", join)
                last_join = now
            if not self.run_id:
                self._print_waiting(now, [0])
                if now >= self._deadline:
                    raise BarrierFailed(
                        f"start barrier: machine {self.machine_id} waited {self.start_timeout:g} s "
                        f"(run.start_timeout) for {self.describe(0)}, which never answered")
        return self.run_id

    def ready(self, first_round: int = 0) -> None:
        """Every node of this machine completed its handshakes; `first_round`: the earliest
        round its nodes can start at (after a restart: past their checkpoints). The run
        starts at the latest of all machines' (`first_round` once `poll` said start)."""
        self._machines[self.machine_id].ready = True
        self.first_round = max(self.first_round, first_round)
        if not self.single and self.machine_id != 0:
            self._send("READY", {"machine": self.machine_id, "round": first_round})

    def poll(self, timeout: float = 0.0) -> bool:
        """Handle coordinator traffic for up to `timeout` seconds; True once the run may start.

        Raises BarrierFailed at the barrier's deadline (naming who is missing) or when a
        joined machine fell silent, and RunAborted when machine 0 or another machine aborted."""
        if self.single:
            self._start = self._start or self._machines[0].ready
            return self._start
        end = time.monotonic() + timeout
        while True:
            if self.machine_id == 0:
                self._serve(max(0.0, min(0.05, end - time.monotonic())))
                if not self._start and all(m.ready for m in self._machines.values()):
                    self._start = True
                    self._broadcast("START", {"round": self.first_round})
            else:
                got = self._recv(max(0.0, min(0.05, end - time.monotonic())))
                if got is not None:
                    self._on_message_from_0(*got[1:])
                now = time.monotonic()
                if not self._start and now - self._last_beat >= BEAT_EVERY:
                    self._send("BEAT", {"machine": self.machine_id})
                    self._last_beat = now
            if not self._start:
                self._check_deadline("is not ready")
            if self._start or time.monotonic() >= end:
                return self._start

    def _wait_slice(self) -> float:
        return max(0.0, min(0.25, self._deadline - time.monotonic()))

    def _check_deadline(self, what: str) -> None:
        now = time.monotonic()
        if self.machine_id == 0:
            gone = [m for m, i in self._machines.items()
                    if m != 0 and i.joined and not self._start and now - i.last_beat > SILENT_AFTER]
            if gone:
                reason = (f"start barrier: {', '.join(self.describe(m) for m in gone)} went silent during the "
                          f"barrier (no heartbeat for {SILENT_AFTER:g} s)")
                self.abort(reason)
                raise BarrierFailed(reason)
        missing = self._missing()
        if now >= self._deadline and missing:
            reason = (f"start barrier: {', '.join(self.describe(m) for m in missing)} {what} within "
                      f"{self.start_timeout:g} s (run.start_timeout); "
                      f"{sum(i.joined for i in self._machines.values())} of {self.machines} machines up")
            self.abort(reason)
            raise BarrierFailed(reason)
        self._print_waiting(now, missing)

    def _missing(self) -> list[int]:
        joined = all(i.joined for i in self._machines.values())
        return [m for m, i in sorted(self._machines.items()) if not (i.ready if joined else i.joined)]

    def _print_waiting(self, now: float, missing: list[int]) -> None:
        if not missing or now - self._last_status < STATUS_EVERY or now - self._started < 2.0:
            return
        self._last_status = now
        up = sum(i.joined for i in self._machines.values())
        ready = sum(i.ready for i in self._machines.values())
        for m in missing:
            if self.machine_id != 0 and not self.run_id:
                state = "not answering yet"
            elif up < self.machines:
                state = f"{up} of {self.machines} machines up"
            else:
                state = f"{self.machines} of {self.machines} machines up, {ready} ready"
            self.say(f"waiting for {self.describe(m)}: {state}, {now - self._started:.0f} s")
        if self.machine_id == 0:
            self._broadcast("STATUS", {"up": [m for m, i in self._machines.items() if i.joined],
                                       "ready": [m for m, i in self._machines.items() if i.ready]})

    def _serve(self, timeout: float) -> None:
        """Machine 0: handle one message (if any arrives within `timeout`)."""
        got = self._recv(timeout)
        if got is None:
            return
        rid, kind, body = got
        m = body.get("machine")
        if not isinstance(m, int) or isinstance(m, bool) or m not in self._machines or m == 0:
            log.warning("coordinator: dropped a %r frame from an unknown machine %r", kind[:16], m)
            return
        info = self._machines[m]
        if kind == "JOIN":
            if body.get("config") != self.config_hash:
                self._send("REFUSE", {"reason": f"{self.describe(m)} runs a different configuration than machine 0 "
                                                f"(config hash {str(body.get('config'))[:12]} against "
                                                f"{self.config_hash[:12]}): start every machine with the same "
                                                f"config, graph and ip file"}, rid)
                return
            if info.joined and info.session != body.get("session") and time.monotonic() - info.last_beat < SILENT_AFTER:
                self._send("REFUSE", {"reason": f"{self.describe(m)} has already joined this run (from another "
                                                f"process); check the machine ids given to each machine"}, rid)
                return
            if not info.joined:
                self.say(f"{self.describe(m)} joined")
            info.joined, info.session, info.rid = True, str(body.get("session")), rid
            info.last_beat = time.monotonic()
            if self.run_id:
                self._send("WELCOME", {"run": self.run_id}, rid)
        elif rid != info.rid:
            log.warning("coordinator: dropped a %r frame claiming %s from another connection", kind[:16],
                        self.describe(m))
        elif kind == "BEAT":
            info.last_beat = time.monotonic()
        elif kind == "READY":
            info.ready = True
            info.last_beat = time.monotonic()
            r = body.get("round")
            if isinstance(r, int) and not isinstance(r, bool):
                self.first_round = max(self.first_round, r)
        elif kind == "FAILED":
            reason = f"{self.describe(m)} failed: {str(body.get('reason'))[:2000]}"
            self.abort(reason)
            raise RunAborted(reason)
        elif kind == "DONE":
            info.done = body

    def _on_message_from_0(self, kind: str, body: dict) -> None:
        if kind == "WELCOME" and isinstance(body.get("run"), str):
            self.run_id = body["run"]
            self._last_beat = 0.0
        elif kind == "START":
            self._start = True
            r = body.get("round")
            if isinstance(r, int) and not isinstance(r, bool):
                self.first_round = r
        elif kind == "REFUSE":
            raise BarrierFailed(f"start barrier: machine 0 ({self.hosts[0]}) refused machine {self.machine_id}: "
                                f"{str(body.get('reason'))[:2000]}")
        elif kind == "ABORT":
            raise RunAborted(f"run aborted by machine 0 ({self.hosts[0]}): {str(body.get('reason'))[:2000]}")
        elif kind == "STATUS":
            for key in ("up", "ready"):
                for m in body.get(key) or []:
                    if isinstance(m, int) and m in self._machines:
                        setattr(self._machines[m], "joined" if key == "up" else "ready", True)

    # ---------------------------------------------------------------- failures and the end
    def abort(self, reason: str) -> None:
        """Tell the other machines the run cannot go on (machine 0 broadcasts; others tell 0)."""
        if self.single or self._sock is None:
            return
        if self.machine_id == 0:
            self._broadcast("ABORT", {"reason": reason})
        else:
            self._send("FAILED", {"machine": self.machine_id, "reason": reason})

    def gather(self, records: dict[int, list[dict]], timeout: float) -> tuple[dict[int, list[dict]], list[int]]:
        """End of the run. Machine 0: wait up to `timeout` s for every machine's records and
        return (all records by uid, machines that did not report). Others: send theirs."""
        if self.single:
            return records, []
        if self.machine_id != 0:
            self._send("DONE", {"machine": self.machine_id, "records": {str(u): r for u, r in records.items()}})
            return records, []
        deadline = time.monotonic() + timeout
        others = [m for m in self._machines if m != 0]
        while any(self._machines[m].done is None for m in others) and time.monotonic() < deadline:
            try:
                self._serve(min(0.25, max(0.0, deadline - time.monotonic())))
            except RunAborted as e:
                log.warning("%s", e)
        merged = dict(records)
        missing = []
        for m in others:
            done = self._machines[m].done
            if done is None or not isinstance(done.get("records"), dict):
                missing.append(m)
                continue
            for uid, recs in done["records"].items():
                try:
                    merged[int(uid)] = [r for r in recs if isinstance(r, dict)]
                except (TypeError, ValueError):
                    continue
        return merged, missing

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
