"""The `tcp` transport: every payload travels inline on the ZeroMQ control plane."""

from .base import TRANSPORTS
from .control import ZmqTransport

TRANSPORTS.register("tcp")(ZmqTransport)
