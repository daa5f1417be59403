"""Linear mapping of node ids to machines, ranks and addresses.

uid = machine_id × procs_per_machine + rank. Machine ids map to hosts through an
``ip.json``-style file (``{"0": "127.0.0.1", "1": "10.0.0.2"}``), as in decentralizepy.
Each node owns `PORTS_PER_NODE` consecutive ports from `base_port`, so two runs can
share a host by choosing different base ports.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Mapping as TMapping

PORTS_PER_NODE = 2  # control plane (ZeroMQ), data plane (libtorrent)


class MappingError(ValueError):
    """A problem with the ip file or the process layout."""


class LinearMapping:
    """Names of the nodes of a run: uid ↔ (machine, rank) ↔ host and ports."""

    def __init__(self, machines: int, procs_per_machine: int, hosts: TMapping[int, str], base_port: int,
                 nodes_per_process: int = 1):
        self.machines = machines
        self.procs_per_machine = procs_per_machine
        self.nodes_per_process = max(1, nodes_per_process)
        self.hosts = dict(hosts)
        self.base_port = base_port
        missing = [m for m in range(machines) if m not in self.hosts]
        if missing:
            raise MappingError(
                f"no host for machine(s) {missing}; the ip mapping holds {self._listing()}"
            )
        if base_port + PORTS_PER_NODE * self.num_nodes + 1 > 65535:
            raise MappingError(
                f"base_port {base_port} leaves too few ports for {self.num_nodes} nodes "
                f"({PORTS_PER_NODE} each, and one for the run's coordinator)"
            )

    def _listing(self) -> str:
        return ", ".join(f"{m}: {h}" for m, h in sorted(self.hosts.items())) or "nothing"

    @classmethod
    def from_config(cls, cfg) -> "LinearMapping":
        """Build from a Config's `run` section: hosts from `run.hosts`, else `run.ip_file`,
        else every machine on 127.0.0.1 (one machine only)."""
        r = cfg.run
        source = "run.hosts"
        if r.hosts is not None:
            hosts = dict(r.hosts)
        elif r.ip_file is None:
            if r.machines != 1:
                raise MappingError(
                    f"{cfg.path or '<config>'}: section 'run': key 'ip_file' is required when "
                    f"machines > 1 (got machines={r.machines})"
                )
            hosts = {0: "127.0.0.1"}
        else:
            hosts = read_ip_file(cfg.resolve(r.ip_file))
            source = str(r.ip_file)
        mapping = cls(r.machines, r.procs_per_machine, hosts, r.base_port, r.nodes_per_process)
        if r.machine_id not in mapping.hosts:
            raise MappingError(
                f"{source}: this machine (machine_id {r.machine_id}) is not in it; it holds {mapping._listing()}"
            )
        return mapping

    @property
    def num_nodes(self) -> int:
        return self.machines * self.procs_per_machine

    def uid(self, machine: int, rank: int) -> int:
        if not (0 <= machine < self.machines and 0 <= rank < self.procs_per_machine):
            raise MappingError(f"(machine {machine}, rank {rank}) is outside the run's layout")
        return machine * self.procs_per_machine + rank

    def machine_rank(self, uid: int) -> tuple[int, int]:
        self._check(uid)
        return divmod(uid, self.procs_per_machine)

    def local_uids(self, machine: int) -> list[int]:
        return [self.uid(machine, r) for r in range(self.procs_per_machine)]

    def leader(self, uid: int) -> int:
        """The first node of the OS process that hosts node `uid` (``run.nodes_per_process``
        consecutive nodes of a machine share a process)."""
        machine, rank = self.machine_rank(uid)
        return self.uid(machine, rank - rank % self.nodes_per_process)

    def process_groups(self, uids) -> list[list[int]]:
        """`uids` (of one machine) grouped by the process that hosts them."""
        groups: dict[int, list[int]] = {}
        for u in sorted(uids):
            groups.setdefault(self.leader(u), []).append(u)
        return list(groups.values())

    def host(self, uid: int) -> str:
        return self.hosts[self.machine_rank(uid)[0]]

    def control_port(self, uid: int) -> int:
        self._check(uid)
        return self.base_port + PORTS_PER_NODE * uid

    def data_port(self, uid: int) -> int:
        self._check(uid)
        return self.base_port + PORTS_PER_NODE * uid + 1

    def control_address(self, uid: int) -> str:
        return f"tcp://{self.host(uid)}:{self.control_port(uid)}"

    def ports(self, uid: int) -> list[int]:
        return [self.control_port(uid), self.data_port(uid)]

    @property
    def coordinator_port(self) -> int:
        """The port of the run's coordinator (machine 0's launcher): the one after the nodes'."""
        return self.base_port + PORTS_PER_NODE * self.num_nodes

    @property
    def coordinator_address(self) -> str:
        return f"tcp://{self.hosts[0]}:{self.coordinator_port}"

    def resolve_hosts(self, source: str = "the ip file") -> dict[int, str]:
        """Machine id → an IP address of its host; MappingError naming the machine, the host
        and the resolver's error for a host that does not resolve."""
        out = {}
        for m in range(self.machines):
            host = self.hosts[m]
            try:
                out[m] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
            except (socket.gaierror, UnicodeError) as e:
                raise MappingError(f"{source}: machine {m}'s host {host!r} does not resolve ({e})") from None
        return out

    def _check(self, uid: int) -> None:
        if not 0 <= uid < self.num_nodes:
            raise MappingError(f"node {uid} is not in this run (0..{self.num_nodes - 1})")

    def check_ports_free(self, uid: int) -> None:
        """Raise MappingError naming the node and port if one of its ports is taken."""
        for port in self.ports(uid):
            if not ports_free(self.host(uid), [port]):
                raise MappingError(
                    f"node {uid}: port {port} on {self.host(uid)} is already in use; "
                    f"choose another run.base_port"
                )


def ports_free(host: str, ports) -> bool:
    """Whether every port in `ports` can be bound on `host` right now."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_base_port(nodes: int, start: int, stop: int = 32768, host: str = "127.0.0.1") -> int:
    """The first base port in [start, stop) whose `nodes` nodes' ports are all free on `host`.

    The default `stop` keeps runs below Linux's ephemeral port range (32768-60999), where
    an outgoing connection may take a port between this check and the node's bind.
    """
    count = PORTS_PER_NODE * nodes
    for base in range(start, stop - count + 1, count):
        if ports_free(host, range(base, base + count)):
            return base
    raise MappingError(f"no {count} consecutive free ports on {host} in {start}..{stop - 1}")


def read_ip_file(path: str | Path) -> dict[int, str]:
    """Read a decentralizepy-style ip.json: machine id (string) → host."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MappingError(f"{path}: ip file not found") from None
    except json.JSONDecodeError as e:
        raise MappingError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MappingError(f'{path}: expected a JSON object like {{"0": "127.0.0.1"}}')
    hosts = {}
    for k, v in data.items():
        try:
            hosts[int(k)] = str(v)
        except ValueError:
            raise MappingError(f"{path}: machine id {k!r} is not an integer") from None
    return hosts
