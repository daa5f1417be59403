"""Which path a payload takes: inline on the control plane, or a torrent its receivers swarm on.

Inline, the publisher uploads one copy per receiver. As a torrent it uploads about one
copy and the receivers pass pieces on to each other, at a fixed cost (spooling, hashing,
announcing, connecting) plus a per-receiver one. Swarming therefore wins when the
publisher's upload is the bottleneck and the receivers have upload to spare: one payload
for many receivers, large enough to pay the fixed cost. The model:

    inline  = k·S / U  + a
    torrent = T0 + k·r + S / H + max(C·S / U, k·S / M)

for a payload of S bytes to k receivers, U the publisher's upload rate (``upload_limit``;
with no cap: the direct path's rate B, or ``link_rate`` when a receiver is on another
machine), H the spool-and-hash rate, C the swarm's overhead over one copy at U, and M the
rate at which one machine moves bytes between its own processes (every node's copy
crosses it when they share a machine). A download cap D bounds both from below by S / D. When the receivers publish payloads of
their own at the same time (every node of a gossip round on a regular graph), their
uploads are busy: swarming cannot help and the payload goes inline.
The constants are calibrated by ``python eval/bench/comm.py --rows paths`` on this
machine kind (`CALIBRATION` says when); ``communication.path`` forces either path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathModel:
    """Constants of the path model (seconds, bytes per second)."""

    inline_latency: float = 0.0012  # a
    torrent_fixed: float = 0.030  # T0
    torrent_per_receiver: float = 0.0106  # r
    hash_rate: float = 1e12  # H: not a bottleneck at these sizes (the fit sends it to infinity)
    swarm_overhead: float = 1.89  # C
    direct_rate: float = 347e6  # B: the control plane's rate, one sender, no cap, one machine
    machine_rate: float = 243e6  # M: bytes per second a machine moves between its processes

    def inline_seconds(self, nbytes: int, receivers: int, upload: float, download: float) -> float:
        return max(receivers * nbytes / upload, nbytes / download) + self.inline_latency

    def torrent_seconds(self, nbytes: int, receivers: int, upload: float, download: float,
                        local: bool) -> float:
        swarm = self.swarm_overhead * nbytes / upload
        if local:
            swarm = max(swarm, receivers * nbytes / self.machine_rate)
        return (self.torrent_fixed + receivers * self.torrent_per_receiver + nbytes / self.hash_rate
                + max(swarm, nbytes / download))

    def choose(self, nbytes: int, receivers: int, upload_limit: float = 0, download_limit: float = 0,
               remote: bool = False, link_rate: float = 125e6, concurrent: bool = False) -> str:
        """'inline' or 'torrent' for a payload of `nbytes` to `receivers` nodes, with the
        configured caps (0: none), whether a receiver is on another machine, and whether the
        receivers publish payloads of their own at the same time (`concurrent`, e.g. every
        node of a gossip round: their uploads have nothing to spare)."""
        if receivers <= 1 or concurrent:
            return "inline"  # nobody to swarm with, or no upload to swarm with
        open_rate = link_rate if remote else self.direct_rate
        upload = upload_limit or open_rate
        download = download_limit or open_rate
        inline = self.inline_seconds(nbytes, receivers, upload, download)
        torrent = self.torrent_seconds(nbytes, receivers, upload_limit or (link_rate if remote else self.machine_rate),
                                       download, local=not remote)
        return "torrent" if torrent < inline else "inline"


#: the calibration the defaults come from
CALIBRATION = ("fitted by `python eval/bench/comm.py --rows paths --calibrate` on 2026-12-02 (vm, 2 CPUs; "
               "eval/bench/results/comm_paths_calibration.txt); the fit leaves T0 unidentified (0: r absorbs it), set to "
               "30 ms, between a 64 KiB torrent to one receiver uncapped (6 ms) and under a 10 MB/s cap (77 ms)")
DEFAULT_MODEL = PathModel()
