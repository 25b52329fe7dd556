"""The trio driver: real sockets, real time and real processes for the sans-I/O core.

A node is one UDP socket and one TCP listener on the same ``(host, port)``
(:mod:`~p2pdeploy.runtime.transport`, framing in :mod:`~p2pdeploy.runtime.framing`), a core
built from :mod:`~p2pdeploy.node`, and the driver loop and async facade of
:mod:`~p2pdeploy.runtime.node`. :mod:`~p2pdeploy.runtime.commands` runs ``p2pdeploy join`` and
``p2pdeploy ping``; :mod:`~p2pdeploy.runtime.localnet` starts local node processes for the demo
and the tests. No protocol decision lives here.
"""

from p2pdeploy.node import CoreContext, default_layers
from p2pdeploy.runtime.node import NodeNotRunning, PingTimeout, RuntimeConfig, RuntimeNode, open_node
from p2pdeploy.runtime.transport import TransportConfig

__all__ = [
    "CoreContext",
    "NodeNotRunning",
    "PingTimeout",
    "RuntimeConfig",
    "RuntimeNode",
    "TransportConfig",
    "default_layers",
    "open_node",
]
