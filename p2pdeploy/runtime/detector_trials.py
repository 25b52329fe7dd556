"""The failure detector on real processes: kill one node, pause one, lose datagrams.

Shared by the real-process tests and ``benchmarks/bench_detector.py``. A community of
``p2pdeploy join`` processes on loopback (:mod:`~p2pdeploy.runtime.localnet`) is watched
through each node's control socket (``status``: its detector's watched count, suspects and
dead, each with since when), so the verdicts are the nodes' own, timed by their clocks.

- :func:`time_to_verdicts`: SIGKILL a node and wait until every other node declares it dead;
  the seconds from the kill to each watcher's verdict.
- :func:`pause_and_watch`: SIGSTOP a node for a while, SIGCONT, and watch every node's view
  until a suspicion would have expired; whoever declared it dead.
- :func:`network_namespace`: a network namespace of its own, whose loopback can be made to drop
  a share of the packets (``tc netem``, or an ``iptables`` statistic rule where the kernel has no
  netem); nodes started with its ``command_prefix`` run there. Needs root; raises
  :class:`NamespaceUnavailable` (saying why) where it cannot be made.

Every wait is bounded; nothing here leaves a process or a namespace behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pdeploy.runtime.control import StatusReply, StatusRequest, control_request
from p2pdeploy.runtime.localnet import JoinProcess, LocalProcesses

#: Seconds between two rounds of status requests.
POLL_INTERVAL_S = 0.25
#: A status request that takes longer than this (a paused or overloaded node) is skipped this round.
STATUS_TIMEOUT_S = 5.0


# -- a community of join processes ------------------------------------------------------------


async def start_community(
    local: LocalProcesses,
    root: Path,
    count: int,
    *,
    extra_args: Sequence[str] = (),
    command_prefix: Sequence[str] = (),
    start_timeout_s: float = 120.0,
) -> list[JoinProcess]:
    """``count`` join processes, data directories ``root/n0 ..``, all joined through the first."""
    first = await local.start_join(root / "n0", name="node 0", extra_args=extra_args, command_prefix=command_prefix)
    seed = await first.wait_listening(start_timeout_s)
    nodes = [first]
    for index in range(1, count):
        nodes.append(
            await local.start_join(
                root / f"n{index}", bootstrap=[seed], name=f"node {index}", extra_args=extra_args,
                command_prefix=command_prefix,
            )
        )  # fmt: skip
    for node in nodes[1:]:
        await node.wait_listening(start_timeout_s)
    return nodes


async def status_of(node: JoinProcess) -> StatusReply | None:
    """The node's status, or None when it does not answer within :data:`STATUS_TIMEOUT_S`."""
    with trio.move_on_after(STATUS_TIMEOUT_S):
        return await control_request(node.data_dir, StatusRequest())
    return None


async def statuses(nodes: Sequence[JoinProcess]) -> dict[str, StatusReply | None]:
    """Every node's status at once, by node name."""
    found: dict[str, StatusReply | None] = {}

    async def one(node: JoinProcess) -> None:
        found[node.name] = await status_of(node)

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, node)
    return found


async def wait_all_watching(
    nodes: Sequence[JoinProcess], watched: int, timeout_s: float, *, calm: bool = True
) -> None:
    """Wait until every node's detector watches at least ``watched`` peers (and, when ``calm``,
    suspects none)."""
    with trio.fail_after(timeout_s):
        while True:
            seen = await statuses(nodes)
            if all(
                s is not None and s.detector is not None and s.detector.watched >= watched
                and not (calm and s.detector.suspects)
                for s in seen.values()
            ):  # fmt: skip
                return
            await trio.sleep(POLL_INTERVAL_S)


def dead_ids(status: StatusReply | None) -> dict[int, float]:
    """The peers a status holds dead: node id -> since when (seconds since the epoch)."""
    if status is None or status.detector is None:
        return {}
    return {peer.node_id: peer.since_unix_s for peer in status.detector.dead}


# -- faults -----------------------------------------------------------------------------------


async def time_to_verdicts(victim: JoinProcess, watchers: Sequence[JoinProcess], timeout_s: float) -> dict[str, float]:
    """SIGKILL ``victim``; wait until every watcher holds it dead (at most ``timeout_s``).

    The seconds from the kill to each watcher's verdict, by watcher name, by the verdict's own
    time (the node's ``since``); a watcher that gave none within the bound is missing."""
    assert victim.node_id_hex is not None, "wait for the victim to listen first"
    victim_id = int(victim.node_id_hex, 16)
    killed_at = time.time()
    await victim.kill()
    verdicts: dict[str, float] = {}
    with trio.move_on_after(timeout_s):
        while len(verdicts) < len(watchers):
            seen = await statuses([w for w in watchers if w.name not in verdicts])
            for name, status in seen.items():
                since = dead_ids(status).get(victim_id)
                if since is not None:
                    verdicts[name] = max(since - killed_at, 0.0)
            if len(verdicts) < len(watchers):
                await trio.sleep(POLL_INTERVAL_S)
    return verdicts


@dataclass
class PauseOutcome:
    #: Watchers that held the paused node dead at some poll, by name.
    declared_dead_by: set[str]
    #: Watchers whose ``peers_declared_dead`` counter rose while watching, by name.
    counted_deaths: set[str]
    #: Watchers that still suspected it when the watch ended.
    still_suspecting: set[str]
    #: Suspicions seen at some poll (a pause may well be suspected; it must not be convicted).
    suspected_by: set[str]


async def pause_and_watch(
    victim: JoinProcess, watchers: Sequence[JoinProcess], pause_s: float, watch_s: float
) -> PauseOutcome:
    """SIGSTOP ``victim`` for ``pause_s``, SIGCONT, and watch every watcher's view for
    ``watch_s`` more (at least a suspicion's longest life) and until none suspects it (bounded
    by another ``watch_s``)."""
    assert victim.node_id_hex is not None, "wait for the victim to listen first"
    victim_id = int(victim.node_id_hex, 16)
    before = {name: _deaths(s) for name, s in (await statuses(watchers)).items()}
    outcome = PauseOutcome(set(), set(), set(), set())

    def note(seen: dict[str, StatusReply | None]) -> set[str]:
        suspecting = set()
        for name, status in seen.items():
            if victim_id in dead_ids(status):
                outcome.declared_dead_by.add(name)
            if _deaths(status) > before.get(name, 0):
                outcome.counted_deaths.add(name)
            suspects = () if status is None or status.detector is None else status.detector.suspects
            if any(peer.node_id == victim_id for peer in suspects):
                suspecting.add(name)
                outcome.suspected_by.add(name)
        return suspecting

    os.kill(victim.pid, signal.SIGSTOP)
    try:
        resume_at = trio.current_time() + pause_s
        while trio.current_time() < resume_at:
            note(await statuses(watchers))
            await trio.sleep(min(POLL_INTERVAL_S, max(resume_at - trio.current_time(), 0.0)))
    finally:
        if victim.returncode is None:
            os.kill(victim.pid, signal.SIGCONT)
    watch_until = trio.current_time() + watch_s
    give_up_at = watch_until + watch_s
    while True:
        suspecting = note(await statuses(watchers))
        now = trio.current_time()
        if (now >= watch_until and not suspecting) or now >= give_up_at:
            outcome.still_suspecting = suspecting
            return outcome
        await trio.sleep(POLL_INTERVAL_S)


def _deaths(status: StatusReply | None) -> int:
    if status is None or status.detector is None:
        return 0
    return status.detector.counters.get("peers_declared_dead", 0)


async def watch_for_false_deaths(nodes: Sequence[JoinProcess], duration_s: float) -> dict[str, set[int]]:
    """Poll every node for ``duration_s``: the live peers (all of ``nodes``) each held dead at some
    poll, by node name (empty sets when the detector convicted no live node)."""
    ids = {int(node.node_id_hex, 16) for node in nodes if node.node_id_hex is not None}
    wrongly: dict[str, set[int]] = {node.name: set() for node in nodes}
    end = trio.current_time() + duration_s
    while trio.current_time() < end:
        for name, status in (await statuses(nodes)).items():
            wrongly[name] |= set(dead_ids(status)) & ids
        await trio.sleep(max(min(1.0, end - trio.current_time()), 0.0))
    return wrongly


# -- a network namespace with loss --------------------------------------------------------------


class NamespaceUnavailable(Exception):
    """A lossy network namespace cannot be made here (the message says why)."""


@dataclass
class NetworkNamespace:
    name: str
    #: The share of packets its loopback drops, and how (``netem``, ``iptables``; ``none``).
    loss: float = 0.0
    method: str = "none"

    @property
    def command_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def add_loss(self, loss: float) -> str:
        """From now on its loopback drops ``loss`` (0..1) of the packets; how (``netem`` or
        ``iptables``). Raises :class:`NamespaceUnavailable` when neither works here."""
        if not 0.0 < loss < 1.0:
            raise ValueError(f"loss must be in (0, 1) (got {loss})")
        self.method = _add_loss(self.name, loss)
        self.loss = loss
        return self.method


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@contextmanager
def network_namespace() -> Iterator[NetworkNamespace]:
    """A fresh network namespace with its loopback up (:meth:`NetworkNamespace.add_loss` makes
    it lossy). Kill the processes started in it before the block ends; it is deleted then."""
    if os.geteuid() != 0:
        raise NamespaceUnavailable("making a network namespace needs root")
    if shutil.which("ip") is None:
        raise NamespaceUnavailable("the `ip` command (iproute2) is not installed")
    name = f"p2pdeploy-{os.getpid()}-{secrets.token_hex(3)}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        raise NamespaceUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
    try:
        up = _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        if up.returncode != 0:
            raise NamespaceUnavailable(f"cannot bring up loopback in a namespace: {up.stderr.strip()}")
        yield NetworkNamespace(name)
    finally:
        _run("ip", "netns", "delete", name)


def _add_loss(name: str, loss: float) -> str:
    inside = ("ip", "netns", "exec", name)
    reasons = []
    if shutil.which("tc") is not None:
        netem = _run(*inside, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "loss", f"{loss * 100:g}%")
        if netem.returncode == 0:
            return "netem"
        reasons.append(f"tc netem: {netem.stderr.strip()}")
    else:
        reasons.append("tc is not installed")
    # Where the kernel has no netem, the statistic match drops packets at random on their way in.
    for iptables in ("iptables", "iptables-legacy"):
        if shutil.which(iptables) is None:
            reasons.append(f"{iptables} is not installed")
            continue
        rule = _run(*inside, iptables, "-A", "INPUT", "-m", "statistic", "--mode", "random",
                    "--probability", f"{loss:g}", "-j", "DROP")  # fmt: skip
        if rule.returncode == 0:
            return "iptables"
        reasons.append(f"{iptables} statistic: {rule.stderr.strip()}")
    raise NamespaceUnavailable("no way to drop packets in a namespace: " + "; ".join(reasons))
