"""Mapping layer: uid ↔ (machine, rank) ↔ address, and split stage configurations → edges."""

from .linear import PORTS_PER_NODE, LinearMapping, MappingError, free_base_port, ports_free, read_ip_file

__all__ = ["PORTS_PER_NODE", "LinearMapping", "MappingError", "free_base_port", "ports_free", "read_ip_file"]
