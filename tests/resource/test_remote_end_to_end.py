"""A deployer drives a real replica over the remote protocol: start, status, logs, stop.

The node's core (a ReplicaHost wrapped by RemoteControl) runs on the local trio driver with the
real executor; the deployer's RemoteClient is linked to it in memory, every message crossing
the wire codec. Signed timestamps are wall time, so both sides get the wall-clock offset.
"""

import random
import time
from pathlib import Path

import trio

from p2pdeploy import wire
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.supervisor import ReplicaState
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.protocol import (
    LogsReply,
    Refused,
    RemoteClient,
    RemoteControl,
    RequestAnswered,
    StatusReply,
)
from p2pdeploy.runtime.bundlefile import bundle_from_directory
from p2pdeploy.runtime.exec_local import open_local_replicas
from p2pdeploy.runtime.probe import probe_machine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NODE = Identity.from_seed(b"N" * 32)
DEPLOYER = Identity.from_seed(b"D" * 32)


def crossed(msg):
    decoded = wire.decode(wire.encode(msg), limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert not isinstance(decoded, wire.DecodeError), decoded
    return decoded



async def test_a_deployer_starts_watches_reads_and_stops_a_replica_over_the_remote_protocol(service_root):
    client = RemoteClient(DEPLOYER, random.Random(), wall_clock_offset_s=time.time() - trio.current_time())
    answers = []

    def to_client(dst, msg):
        client.receive(dst_of_node, crossed(msg), trio.current_time())
        while (event := client.next_event()) is not None:
            answers.append(event)

    dst_of_node = "node"
    contribution = Contribution(cpu_cores=2, memory_bytes=1024**3, trusted_keys=frozenset({DEPLOYER.public_key}))

    def layers(host):
        return [RemoteControl(NODE.node_id, host, machine=probe_machine(service_root), owner_keys=frozenset({NODE.public_key}))]

    async with open_local_replicas(service_root, contribution, layers=layers, send=to_client) as local:

        def ask(call):
            request_id = call(client, trio.current_time())
            for dst, msg in client.messages_to_send():
                assert dst == dst_of_node
                local.receive("client", crossed(msg))
            (answer,) = [a for a in answers if a.request_id == request_id]
            assert isinstance(answer, RequestAnswered)
            return answer.reply

        bundle = bundle_from_directory(EXAMPLES / "hello").sign(DEPLOYER)
        reply = ask(lambda c, now: c.start(dst_of_node, NODE.node_id, "hello-1", bundle, now))
        assert isinstance(reply, StatusReply) and reply.state == "installing"

        await local.wait_for_state("hello-1", ReplicaState.RUNNING)
        status = ask(lambda c, now: c.query(dst_of_node, NODE.node_id, "hello-1", now))
        assert (status.state, status.reason, status.healthy, status.run) == ("running", "healthy", True, 1)

        stream = await trio.open_tcp_stream("127.0.0.1", status.port)
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        while await stream.receive_some(4096):
            pass
        logs = ask(lambda c, now: c.fetch_logs(dst_of_node, NODE.node_id, "hello-1", now, max_bytes=4096))
        assert isinstance(logs, LogsReply) and b"hello: listening on 127.0.0.1:" in logs.data and b'"GET / HTTP/1.0" 200' in logs.data

        stranger = bundle_from_directory(EXAMPLES / "hello").sign(Identity.from_seed(b"X" * 32))
        refused = ask(lambda c, now: c.start(dst_of_node, NODE.node_id, "hello-2", stranger, now))
        assert isinstance(refused, Refused) and refused.check == "bundle"

        stopping = ask(lambda c, now: c.stop(dst_of_node, NODE.node_id, "hello-1", now))
        assert stopping.state == "stopping"
        await local.wait_for_state("hello-1", ReplicaState.STOPPED)
        final = ask(lambda c, now: c.query(dst_of_node, NODE.node_id, "hello-1", now))
        assert (final.state, final.reason) == ("stopped", "stopped by TERM (exited with code 0)")
        assert local.executor.pids("hello-1") == set()
