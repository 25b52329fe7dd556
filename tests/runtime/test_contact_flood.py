"""A flood of forged senders against a real node: its routing table stays clean and puts reach k nodes.

Four ``p2pdeploy join`` processes on loopback (k = 3). An attacker's socket sends 2,000 Kademlia
probes to one node, each under a random sender id. Without contact verification each of them
would take a place in the routing table and every lookup would wait on them; with it, none gets
in: the node challenges at most a bounded number, nobody answers, and its puts reach the three
other nodes with no request timing out.
"""

from __future__ import annotations

import random

import trio

from p2pdeploy import api, wire
from p2pdeploy.overlay.kademlia import Probe
from p2pdeploy.overlay.storage import Item
from p2pdeploy.runtime.detector_trials import start_community
from p2pdeploy.runtime.localnet import open_local_processes

NODES = 4
FLOOD = 2000
ARGS = ["--kademlia", "k=3", "--kademlia", "rpc_timeout_s=2"]


async def flood(address) -> None:
    forged = random.Random(11)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        for rpc_id in range(1, FLOOD + 1):
            await sock.sendto(wire.encode(Probe(rpc_id, forged.getrandbits(160))), address)


async def test_two_thousand_forged_probes_leave_the_table_clean_and_puts_reach_k_nodes(tmp_path):
    async with open_local_processes() as local:
        nodes = await start_community(local, tmp_path, NODES, extra_args=ARGS)
        for node in nodes:
            await node.wait_for_line(lambda line: line.startswith("overlay joined"))
        target = nodes[1]
        with trio.fail_after(60):
            while (await api.control_request(target.data_dir, api.StatusRequest())).contacts < NODES - 1:
                await trio.sleep(0.1)

        await flood(target.address)
        for index in range(5):
            reply = await api.control_request(target.data_dir, api.PutRequest(api.key_for(f"after-{index}"),
                                                                               Item(b"still works")))
            assert reply.stored >= 3 and reply.refusals == [], reply  # the k closest (and the writer's own copy)
        status = await api.control_request(target.data_dir, api.StatusRequest())
        assert status.contacts == NODES - 1, status.contacts
        for node in nodes:
            assert node.returncode is None, node.transcript()
