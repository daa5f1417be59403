"""Node layer: one participant's lifecycle; implementations registered by name."""

from .base import NODES, Node
from . import dpsgd  # noqa: F401  (registers "dpsgd", "epidemic")
from . import federated  # noqa: F401  (registers "federated")
from . import split  # noqa: F401  (registers "split")

__all__ = ["NODES", "Node"]
