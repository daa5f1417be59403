"""Which machine is this? Machine ids from the host's own addresses or from SLURM.

* `local_machine_id(hosts)`: the one machine of an ip file whose host is this machine
  (its name, or an address of one of its interfaces).
* `slurm_hosts(env)`: the machines of a SLURM job (``SLURM_JOB_NODELIST``, in SLURM's
  compressed form, e.g. ``node[01-03,07],login1``) and this one's id (``SLURM_NODEID``).
"""

from __future__ import annotations

import itertools
import re
import socket
from typing import Mapping

from .linear import MappingError


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list as a list: ``a[1-3,5],b`` → a1 a2 a3 a5 b; zero
    padding is kept (``n[08-10]`` → n08 n09 n10) and several bracket groups in one name
    multiply (``r[1-2]n[1-2]`` → r1n1 r1n2 r2n1 r2n2)."""
    names, depth, current = [], 0, ""
    for ch in text.strip():
        if ch == "," and depth == 0:
            names.append(current)
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise MappingError(f"host list {text!r}: unbalanced ']'")
        current += ch
    if depth:
        raise MappingError(f"host list {text!r}: unbalanced '['")
    names.append(current)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        parts = re.split(r"(\[[^\]]*\])", name)
        choices = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_range(part[1:-1], text))
            elif part:
                choices.append([part])
        out += ["".join(p) for p in itertools.product(*choices)]
    return out


def _expand_range(body: str, text: str) -> list[str]:
    items = []
    for piece in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if not m:
            raise MappingError(f"host list {text!r}: cannot read range {piece!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise MappingError(f"host list {text!r}: range {piece!r} runs backwards")
        width = len(lo)
        items += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return items


def slurm_hosts(env: Mapping[str, str]) -> tuple[dict[int, str], int] | None:
    """(machine id → host, this machine's id) of a SLURM job, or None outside SLURM.

    One machine per node of the job, in SLURM's order; this machine is ``SLURM_NODEID``.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    hosts = expand_hostlist(nodelist)
    try:
        me = int(env.get("SLURM_NODEID", ""))
    except ValueError:
        raise MappingError(f"SLURM_JOB_NODELIST is set ({nodelist!r}) but SLURM_NODEID is not a number: "
                           f"{env.get('SLURM_NODEID')!r}") from None
    if not 0 <= me < len(hosts):
        raise MappingError(f"SLURM_NODEID {me} is outside the job's {len(hosts)} nodes ({nodelist!r})")
    return dict(enumerate(hosts)), me


def local_addresses() -> set[str]:
    """The IP addresses of this machine's interfaces (and its host names)."""
    found = {socket.gethostname(), socket.getfqdn(), "localhost"}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(a.address.split("%")[0])
    except (ImportError, OSError):
        pass
    return found


def local_machine_id(hosts: Mapping[int, str], source: str = "the ip file") -> int:
    """The id of the one machine in `hosts` that is this machine (by name or address).

    Raises MappingError when none is, or several are (e.g. 127.0.0.1 and 127.0.0.2 on one
    host): then the id must be given."""
    mine = local_addresses()
    matches = []
    for m, host in sorted(hosts.items()):
        addresses = {host}
        try:
            addresses |= {ai[4][0] for ai in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        except (socket.gaierror, UnicodeError):
            pass
        if addresses & mine:
            matches.append(m)
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(f"{m}: {h}" for m, h in sorted(hosts.items()))
    if not matches:
        raise MappingError(f"{source}: none of its hosts ({listing}) is this machine "
                           f"({socket.gethostname()}); give the machine id (--machine-id N)")
    raise MappingError(f"{source}: machines {matches} all are this machine ({listing}); "
                       f"give the machine id (--machine-id N)")
