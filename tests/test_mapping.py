import json

import pytest

from dflsplit.config import load_config
from dflsplit.mappings import LinearMapping, MappingError, read_ip_file


def test_uid_machine_rank_and_ports():
    m = LinearMapping(3, 4, {0: "127.0.0.1", 1: "127.0.0.2", 2: "127.0.0.3"}, 30000)
    assert m.num_nodes == 12
    assert m.uid(2, 1) == 9 and m.machine_rank(9) == (2, 1)
    assert m.host(9) == "127.0.0.3" and m.local_uids(1) == [4, 5, 6, 7]
    ports = [p for u in range(12) for p in m.ports(u)]
    assert len(set(ports)) == len(ports) and min(ports) == 30000
    assert m.control_address(5) == f"tcp://127.0.0.2:{m.control_port(5)}"
    with pytest.raises(MappingError, match="node 12 is not in this run"):
        m.host(12)


def test_two_runs_share_a_host_with_different_base_ports():
    a = LinearMapping(1, 16, {0: "127.0.0.1"}, 21000)
    b = LinearMapping(1, 16, {0: "127.0.0.1"}, 21000 + 2 * 16)
    assert not {p for u in range(16) for p in a.ports(u)} & {p for u in range(16) for p in b.ports(u)}


def test_ip_file_and_config(tmp_path):
    ip = tmp_path / "ip.json"
    ip.write_text(json.dumps({"0": "127.0.0.1", "1": "127.0.0.2"}))
    assert read_ip_file(ip) == {0: "127.0.0.1", 1: "127.0.0.2"}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("run:\n  machines: 2\n  procs_per_machine: 2\n  machine_id: 1\n  ip_file: ip.json\n")
    m = LinearMapping.from_config(load_config(cfg_path))
    assert m.host(3) == "127.0.0.2"


def test_ip_file_without_this_machine_lists_addresses(tmp_path):
    ip = tmp_path / "ip.json"
    ip.write_text(json.dumps({"0": "127.0.0.1", "1": "127.0.0.2"}))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("run:\n  machines: 3\n  machine_id: 2\n  ip_file: ip.json\n")
    with pytest.raises(MappingError, match=r"no host for machine\(s\) \[2\].*0: 127.0.0.1, 1: 127.0.0.2"):
        LinearMapping.from_config(load_config(cfg_path))


def test_bad_ip_files(tmp_path):
    p = tmp_path / "ip.json"
    p.write_text("[1, 2]")
    with pytest.raises(MappingError, match="expected a JSON object"):
        read_ip_file(p)
    p.write_text('{"zero": "127.0.0.1"}')
    with pytest.raises(MappingError, match="machine id 'zero' is not an integer"):
        read_ip_file(p)
    with pytest.raises(MappingError, match="ip file not found"):
        read_ip_file(tmp_path / "none.json")


def test_several_machines_need_an_ip_file():
    with pytest.raises(MappingError, match="'ip_file' is required when machines > 1"):
        LinearMapping.from_config(load_config(None, ["run.machines=2"]))
