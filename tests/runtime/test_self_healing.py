"""Self-healing on real processes: ten ``p2pdeploy join`` nodes on loopback, default settings
(each trusting every member's key), running ``examples/hello`` at 3 replicas deployed from one
node. The timings themselves are measured by ``benchmarks/bench_self_healing.py``; here every wait
has a generous bound, and the test checks what happens.

Marked slow, so `make check-slow` runs it and `make test` does not: it failed now and then in
``kill_manager`` (about one run in twenty) when the service was deployed before the nodes' routing
tables held one another. Its owner then knew almost nobody, so the record's quorum group was
chosen among one or two nodes, and no other node could manage the service once the owner (its
manager) died. The community now forms before the deploy (``wait_acquainted``). The defect itself
is open: a quorum write should refuse or wait when it finds fewer nodes than the group size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2pdeploy.files import bundle_from_directory
from p2pdeploy.runtime.control import (
    ControlRequestRefused,
    DeployRequest,
    ScaleRequest,
    StatusRequest,
    UndeployRequest,
    control_request,
)
from p2pdeploy.runtime.healing_trials import (
    healthy_hosts,
    kill_host,
    kill_manager,
    node_statuses,
    pause_host,
    report_of,
    start_healing_community,
    stop_community,
    wait_healthy,
)
from p2pdeploy.runtime.keyfile import load_or_create_identity
from p2pdeploy.runtime.localnet import open_local_processes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
NODES = 10


async def _count(community, service: str, without: int | None = None) -> str:
    """GET /count on a running replica (not on node ``without``): its body."""
    report = await wait_healthy(community, service, 3, without=[without] if without is not None else [])
    host = next(h for h in healthy_hosts(report).values() if without is None or h != community.node_ids[without])
    node = community.nodes[community.index_of(host)]
    status = await control_request(node.data_dir, StatusRequest())
    port = next(r.port for r in status.replicas if r.state == "running" and r.port)
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /count HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data.decode().partition("\r\n\r\n")[2].strip()


@pytest.mark.slow
def test_a_deployed_service_heals_keeps_its_state_and_obeys_only_its_owner(service_root):
    async def main():
        async with open_local_processes() as local:
            community = await start_healing_community(local, service_root, NODES)
            try:
                owner_dir = service_root / "n3"  # deployed from any node: here the fourth
                owner = load_or_create_identity(owner_dir)[0]
                reply = await control_request(owner_dir, DeployRequest.of(bundle_from_directory(EXAMPLE).sign(owner),
                                                                          replicas=3))
                assert reply.ok, reply.reason
                service = reply.service
                report = await wait_healthy(community, service, 3)
                assert len(set(healthy_hosts(report).values())) == 3  # three distinct nodes

                assert (await _count(community, service)).startswith("count 1")
                # a host killed: a replacement runs elsewhere and reads the state the lost one wrote
                victim, _ = await kill_host(community, service, 3)
                counted = await _count(community, service)
                assert counted.startswith("count 2"), counted
                # a host paused 2 s is not replaced
                paused, before, after = await pause_host(community, service, 3, pause_s=2.0, watch_s=15.0)
                assert after == before, f"node {paused}'s pause changed the replicas: {before} -> {after}"
                # the manager killed: the next member of the group manages, the service intact
                old, new, _ = await kill_manager(community, service, 3)
                assert new != old
                report = await wait_healthy(community, service, 3)
                assert report.version == 1 and report.desired == 3
                # only the owner may change it
                with pytest.raises(ControlRequestRefused, match="only the owner"):
                    await control_request(service_root / "n5", UndeployRequest(service))
                with pytest.raises(ControlRequestRefused, match="only the owner"):
                    await control_request(service_root / "n5", ScaleRequest(service, replicas=1))
                assert len(healthy_hosts(await report_of(community, service))) == 3
                # undeploy: every replica stops, every reservation is freed
                reply = await control_request(owner_dir, UndeployRequest("hello"))
                assert reply.ok, reply.reason
                with trio.move_on_after(120):
                    while True:
                        statuses = await node_statuses(community)
                        left = [(r.replica_id, r.state, r.reason) for s in statuses for r in s.replicas]
                        if not left and len(statuses) == NODES:
                            break
                        await trio.sleep(0.2)
                report = await report_of(community, service)
                assert not left and len(statuses) == NODES, (
                    left, len(statuses), report, [{k: v for k, v in s.counters.items() if "Deployment" in k}
                                                  for s in statuses if s.replicas])
            finally:
                # shown only when the test fails: what each node decided and what its replicas did
                for index, node in enumerate(community.nodes):
                    print(f"-- node {index} {community.node_ids[index]:040x}")
                    print("\n".join(line for line in node.stdout_lines
                                    if line.startswith(("service ", "replica ", "peer ", "listening"))))
                await stop_community(community)

    trio.run(main)
