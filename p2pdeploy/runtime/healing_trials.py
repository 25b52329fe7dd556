"""Self-healing on real processes: deploy a service, kill or pause its hosts, time the repair.

Shared by the real-process test (``tests/runtime/test_self_healing.py``) and
``benchmarks/bench_self_healing.py``. A community of ``p2pdeploy join`` processes on loopback
(:mod:`~p2pdeploy.runtime.localnet`), each trusting every member's key (the keys are made
before the nodes start), with default settings otherwise. The service is watched through the
nodes' control sockets: its manager's report (``p2pdeploy status SERVICE``) says which replicas
run, where, and whether they are healthy.

- :func:`start_healing_community`: the community.
- :func:`kill_host`: SIGKILL a node that hosts a replica (not the manager, which
  :func:`kill_manager` takes) and wait until the desired count runs healthy without it; the
  seconds from the kill. The node then starts again from its data directory (a machine that
  comes back), so the community keeps its size.
- :func:`pause_host`: SIGSTOP a host for a while, SIGCONT, and watch: whatever was replaced.

Every wait is bounded; nothing here leaves a process behind: a killed node's replicas are
killed with it (:func:`crash`, as a machine that dies takes them along), and
:func:`stop_community` stops every node with SIGTERM, which stops their replicas.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import trio

from p2pdeploy.collective.deployment_messages import ServiceReport
from p2pdeploy.runtime.control import ServiceStatusRequest, StatusReply, StatusRequest, control_request
from p2pdeploy.runtime.detector_trials import start_community
from p2pdeploy.runtime.keyfile import load_or_create_identity
from p2pdeploy.runtime.localnet import JoinProcess, LocalProcesses

#: Seconds between two looks at the service.
POLL_INTERVAL_S = 0.1
#: A control request that takes longer than this is skipped this round.
REQUEST_TIMEOUT_S = 5.0


@dataclass
class HealingCommunity:
    local: LocalProcesses
    root: Path
    #: The node processes, by index (a restarted node replaces its entry).
    nodes: list[JoinProcess]
    node_ids: list[int]
    extra_args: list[str]

    def index_of(self, node_id: int) -> int:
        return self.node_ids.index(node_id)

    def live(self, *, besides: Sequence[int] = ()) -> list[JoinProcess]:
        return [n for i, n in enumerate(self.nodes) if n.returncode is None and i not in besides]


async def start_healing_community(
    local: LocalProcesses, root: Path, count: int, *, extra_args: Sequence[str] = (), start_timeout_s: float = 120.0
) -> HealingCommunity:
    """``count`` join processes (``root/n0 ..``), each trusting every member's key."""
    identities = [load_or_create_identity(root / f"n{index}")[0] for index in range(count)]
    trust = [arg for identity in identities for arg in ("--trust", identity.public_key.hex())]
    args = [*trust, *extra_args]
    nodes = await start_community(local, root, count, extra_args=args, start_timeout_s=start_timeout_s)
    community = HealingCommunity(local, root, nodes, [identity.node_id for identity in identities], args)
    await wait_acquainted(community, start_timeout_s)
    return community


async def wait_acquainted(community: HealingCommunity, timeout_s: float = 120.0) -> None:
    """Wait until every node's routing table holds every other node. A service deployed before
    that has its record's group, and its bundle's copies, chosen among the few nodes its owner
    knows: a record written on a group of one is lost to management with that node."""
    with trio.fail_after(timeout_s):
        while True:
            statuses = await node_statuses(community)
            if len(statuses) == len(community.nodes) and \
                    all(s.contacts >= len(community.nodes) - 1 for s in statuses):
                return
            await trio.sleep(POLL_INTERVAL_S * 5)


async def report_of(community: HealingCommunity, service: str, *, besides: Sequence[int] = ()) -> ServiceReport | None:
    """The manager's report on ``service``, asked through the first live node not in ``besides``."""
    for node in community.live(besides=besides):
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            reply = await control_request(node.data_dir, ServiceStatusRequest(service))
            if reply.report is not None:
                return reply.report
    return None


def healthy_hosts(report: ServiceReport | None) -> dict[str, int]:
    """Replica id -> host node id of the replicas that run and pass their health check."""
    if report is None:
        return {}
    return {r.replica_id: r.host.node_id for r in report.replicas if r.state == "running" and r.healthy}


async def wait_healthy(
    community: HealingCommunity, service: str, count: int, *, without: Sequence[int] = (), timeout_s: float = 120.0
) -> ServiceReport:
    """Wait until ``count`` replicas of ``service`` run healthy on distinct nodes, none on the
    nodes ``without`` (indexes); the manager's report then."""
    avoid = {community.node_ids[i] for i in without}
    with trio.fail_after(timeout_s):
        while True:
            report = await report_of(community, service, besides=without)
            hosts = healthy_hosts(report)
            if report is not None and len(set(hosts.values()) - avoid) >= count:
                return report
            await trio.sleep(POLL_INTERVAL_S)


async def restart(community: HealingCommunity, index: int, timeout_s: float = 120.0) -> None:
    """Start node ``index`` again from its data directory, through a live member."""
    live = community.live(besides=[index])
    seed = await live[0].wait_listening(timeout_s)
    node = await community.local.start_join(community.root / f"n{index}", bootstrap=[seed], name=f"node {index}",
                                            extra_args=community.extra_args)
    await node.wait_listening(timeout_s)
    community.nodes[index] = node


def kill_orphans(directory: Path) -> int:
    """SIGKILL every process working under ``directory`` (a killed node's replicas, which run in
    sessions of their own and outlive it, as they would not outlive a machine that died); how
    many process groups."""
    root = os.fspath(directory.resolve())
    groups = set()
    for process in psutil.process_iter(["pid", "cwd"]):
        cwd = process.info.get("cwd")
        if cwd and (cwd == root or cwd.startswith(root + os.sep)):
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(process.info["pid"]))
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    return len(groups)


async def crash(node: JoinProcess) -> None:
    """The machine of ``node`` dies: SIGKILL the node, and its replicas' processes with it."""
    await node.kill()
    kill_orphans(node.data_dir)


async def kill_host(community: HealingCommunity, service: str, count: int, *, victim: int | None = None,
                    timeout_s: float = 120.0) -> tuple[int, float]:
    """SIGKILL a node hosting a replica (not the manager), wait for ``count`` healthy replicas
    without it, and start it again; ``(the victim's index, seconds from the kill to the repair)``."""
    report = await wait_healthy(community, service, count, timeout_s=timeout_s)
    manager = report.manager.node_id if report.manager is not None else None
    hosts = [community.index_of(h) for h in sorted(set(healthy_hosts(report).values())) if h != manager]
    index = victim if victim is not None else hosts[0]
    node = community.nodes[index]
    started = time.monotonic()
    await crash(node)
    await wait_healthy(community, service, count, without=[index], timeout_s=timeout_s)
    repaired = time.monotonic() - started
    await restart(community, index, timeout_s)
    return index, repaired


async def kill_manager(community: HealingCommunity, service: str, count: int,
                       timeout_s: float = 120.0) -> tuple[int, int, float]:
    """SIGKILL the service's manager; ``(its index, the new manager's index, seconds until the
    new one reports the service with ``count`` healthy replicas)``."""
    report = await wait_healthy(community, service, count, timeout_s=timeout_s)
    assert report.manager is not None
    index = community.index_of(report.manager.node_id)
    started = time.monotonic()
    await crash(community.nodes[index])
    with trio.fail_after(timeout_s):
        while True:
            now = await wait_healthy(community, service, count, without=[index], timeout_s=timeout_s)
            if now.manager is not None and now.manager.node_id != community.node_ids[index]:
                break
            await trio.sleep(POLL_INTERVAL_S)
    moved = time.monotonic() - started
    successor = community.index_of(now.manager.node_id)
    await restart(community, index, timeout_s)
    return index, successor, moved


async def pause_host(community: HealingCommunity, service: str, count: int, *, pause_s: float = 2.0,
                     watch_s: float = 20.0) -> tuple[int, dict[str, int], dict[str, int]]:
    """SIGSTOP a host (not the manager) for ``pause_s``, SIGCONT, then watch ``watch_s``;
    ``(its index, the healthy replicas before, those at the end)``."""
    report = await wait_healthy(community, service, count)
    manager = report.manager.node_id if report.manager is not None else None
    before = healthy_hosts(report)
    index = community.index_of(next(h for h in sorted(set(before.values())) if h != manager))
    pid = community.nodes[index].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await trio.sleep(pause_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    await trio.sleep(watch_s)
    after = healthy_hosts(await report_of(community, service))
    return index, before, after


async def node_statuses(community: HealingCommunity) -> list[StatusReply]:
    """Every live node's own status (its replicas, its contribution)."""
    found: list[StatusReply] = []
    for node in community.live():
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            found.append(await control_request(node.data_dir, StatusRequest()))
    return found


async def stop_community(community: HealingCommunity, timeout_s: float = 60.0) -> None:
    """SIGTERM every node (each stops its replicas first) and wait for them to exit."""
    for node in community.live():
        node.terminate()
    for node in community.nodes:
        if node.returncode is None:
            try:
                await node.wait_exit(timeout_s)
            except Exception:
                await node.kill()
