"""The importable library API: run a node, use the overlay, talk to a running node.

In a trio program::

    from p2pdeploy import api

    async with api.open_node(("0.0.0.0", 7400), data_dir="state", bootstrap=[("seed.example", 7400)]) as node:
        await node.wait_joined()
        key = api.key_for("greeting")
        replicas = await node.put(key, b"hello", ttl_s=3600)
        value = await node.get(key)                  # bytes, or None when no node holds it
        closest = await node.lookup(key)             # [Contact(node_id, (host, port)), ...], closest first

Signed, mutable records: ``key, item = api.sign_record(identity, b"name", b"value", sequence)``,
then ``await node.put_item(key, item)`` and ``await node.get_item(key, latest=True)``.

To act on a node started by ``p2pdeploy join`` (another process) use its control socket::

    reply = await api.control_request("state", api.GetRequest(api.key_for("greeting")))

Overlay parameters are a :class:`KademliaConfig` (``open_node(..., kademlia=KademliaConfig(k=8))``).
"""

from __future__ import annotations

from p2pdeploy.overlay.identity import Identity, key_id
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import Item, record_key, sign_record
from p2pdeploy.runtime.control import (
    ControlError,
    ControlRequestRefused,
    GetReply,
    GetRequest,
    LookupReply,
    LookupRequest,
    NoNodeRunning,
    PutReply,
    PutRequest,
    StatusReply,
    StatusRequest,
    control_request,
    open_control,
)
from p2pdeploy.runtime.node import (
    NodeNotRunning,
    NoOverlay,
    PingTimeout,
    RuntimeConfig,
    RuntimeNode,
    open_node,
)


def key_for(name: str | bytes) -> int:
    """The overlay key of a name: the first 160 bits of SHA-256 of its (UTF-8) bytes.

    The same key the CLI uses for ``p2pdeploy put NAME``.
    """
    return key_id(name.encode() if isinstance(name, str) else bytes(name))


__all__ = [
    "Contact",
    "ControlError",
    "ControlRequestRefused",
    "GetReply",
    "GetRequest",
    "Identity",
    "Item",
    "KademliaConfig",
    "LookupReply",
    "LookupRequest",
    "NoNodeRunning",
    "NoOverlay",
    "NodeNotRunning",
    "PingTimeout",
    "PutReply",
    "PutRequest",
    "RuntimeConfig",
    "RuntimeNode",
    "StatusReply",
    "StatusRequest",
    "control_request",
    "key_for",
    "key_id",
    "open_control",
    "open_node",
    "record_key",
    "sign_record",
]
