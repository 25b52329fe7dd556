"""A signed request captured on the wire is not accepted again after its node restarts.

The node's memory of the nonces it accepted is gone after a restart, while a captured request
is still inside the time window: a real ``p2pdeploy join`` process runs ``examples/hello`` for a
trusted deployer, an eavesdropper keeps the datagram of the deployer's stop, the node restarts
from its data directory and runs the replica again, and the eavesdropper sends the datagram once
more. The node refuses it as a replay and the replica keeps running.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import trio

from p2pdeploy import wire
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.protocol import Refused, RemoteClient, StatusReply
from p2pdeploy.runtime.bundlefile import bundle_from_directory
from p2pdeploy.runtime.localnet import open_local_processes
from p2pdeploy.runtime.node import open_node

from .test_runtime_replicas import wait_until_running

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEPLOYER = Identity.from_seed(b"R" * 32)
BOUND_S = 30.0



def captured_stop(node_id: int, address, replica_id: str) -> bytes:
    """The datagram of the deployer's signed stop, as an eavesdropper on the path keeps it."""
    client = RemoteClient(DEPLOYER, random.Random(7))
    client.stop(address, node_id, replica_id, time.time())
    (_, request), = client.messages_to_send()
    return wire.encode(request)


async def send_datagram(data: bytes, address) -> object:
    """Send ``data`` from a fresh UDP socket and return the node's decoded answer."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(data, address)
        with trio.fail_after(BOUND_S):
            while True:
                answer = wire.decode(await sock.recv(65536), limit_bytes=wire.STREAM_LIMIT_BYTES)
                if isinstance(answer, Refused | StatusReply):
                    return answer


async def test_a_stop_captured_on_the_wire_is_refused_after_the_node_restarts(service_root):
    bundle = bundle_from_directory(EXAMPLES / "hello").sign(DEPLOYER)
    args = ["--cpu", "1", "--trust", DEPLOYER.public_key.hex(), "--replicas-dir", str(service_root / "replicas")]
    async with open_local_processes() as local, open_node(identity=DEPLOYER, layers=client_layers) as deployer:
        node = await local.start_join(service_root / "node", extra_args=args)
        address = await node.wait_listening()
        node_id = int(node.node_id_hex, 16)
        assert isinstance(await deployer.remote_start(address, "hello-1", bundle), StatusReply)
        await wait_until_running(deployer, address, "hello-1")
        stop = captured_stop(node_id, address, "hello-1")
        stopped = await send_datagram(stop, address)
        assert isinstance(stopped, StatusReply) and stopped.state in ("stopping", "stopped"), stopped

        node.terminate()
        assert await node.wait_exit() == 0, node.transcript()
        node = await local.start_join(service_root / "node", extra_args=args)
        address = await node.wait_listening()
        assert int(node.node_id_hex, 16) == node_id
        assert isinstance(await deployer.remote_start(address, "hello-1", bundle), StatusReply)
        await wait_until_running(deployer, address, "hello-1")

        replayed = await send_datagram(stop, address)
        assert isinstance(replayed, Refused) and replayed.check == "replay", replayed
        assert "before this node started" in replayed.reason
        assert (await deployer.remote_query(address, "hello-1")).state == "running"
