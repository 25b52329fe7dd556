"""The failure detector on real ``p2pdeploy join`` processes, on loopback defaults.

Eight processes, each with its data directory, joined through the first; the overlay has its
detector watch every other node (``--kademlia watch_sync_interval_s=1`` so they start watching
soon). A node paused (SIGSTOP) for 2 s is never declared dead; a killed one (SIGKILL) is
declared dead by every live node. In a network namespace of its own whose loopback drops 10 %
of the packets, no live node is declared dead. Verdicts are read through each node's control
socket (``status``). The lossy community forms on a clean network before its loopback starts
dropping packets (joining through a lossy network is not what is tested here). Times go to ``benchmarks/bench_detector.py``; here only behaviour is
asserted, with generous bounds. Every process and namespace is gone when a test ends.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from p2pdeploy.overlay.swim import DetectorConfig
from p2pdeploy.runtime.detector_trials import (
    NamespaceUnavailable,
    dead_ids,
    network_namespace,
    pause_and_watch,
    start_community,
    statuses,
    time_to_verdicts,
    wait_all_watching,
    watch_for_false_deaths,
)
from p2pdeploy.runtime.localnet import open_local_processes

NODES = 8
EXTRA_ARGS = ["--kademlia", "watch_sync_interval_s=1"]
#: Starting eight interpreters on a loaded two-core machine takes long; watching starts within seconds then.
WATCH_BOUND_S = 120.0
#: The longest suspicion on loopback defaults is 9 s; this bound is generous for a loaded machine.
VERDICT_BOUND_S = 30.0
PAUSE_S = 2.0
LOSS = 0.10
LOSSY_NODES = 10
LOSSY_WATCH_S = 60.0


@pytest.mark.slow
async def test_a_paused_node_is_never_declared_dead_and_a_killed_one_is_by_every_live_node(tmp_path):
    async with open_local_processes() as local:
        nodes = await start_community(local, tmp_path, NODES, extra_args=EXTRA_ARGS)
        await wait_all_watching(nodes, NODES - 1, WATCH_BOUND_S)

        paused, others = nodes[5], [node for node in nodes if node is not nodes[5]]
        watch_s = DetectorConfig().suspicion_max_s + 2 * DetectorConfig().protocol_period_s
        outcome = await pause_and_watch(paused, others, PAUSE_S, watch_s)
        assert outcome.declared_dead_by == set(), outcome
        assert outcome.counted_deaths == set(), outcome
        assert outcome.still_suspecting == set(), outcome
        assert paused.returncode is None, paused.transcript()
        [paused_status] = (await statuses([paused])).values()
        assert paused_status is not None and paused_status.detector is not None
        assert paused_status.detector.dead == [], paused_status.detector  # it holds no one dead either

        victim, watchers = nodes[3], [node for node in nodes if node is not nodes[3]]
        verdicts = await time_to_verdicts(victim, watchers, VERDICT_BOUND_S)
        assert set(verdicts) == {node.name for node in watchers}, verdicts
        # only the killed node is dead: the paused one is alive in every view
        paused_id = int(paused.node_id_hex, 16)
        for name, status in (await statuses(watchers)).items():
            assert paused_id not in dead_ids(status), name
            assert status.detector.counters["peers_declared_dead"] == 1, (name, status.detector.counters)
        for node in watchers:
            assert node.returncode is None, node.transcript()


@pytest.mark.slow
async def test_no_live_node_is_declared_dead_with_ten_percent_loss(tmp_path):
    with ExitStack() as stack:
        try:
            namespace = stack.enter_context(network_namespace())
        except NamespaceUnavailable as exc:
            pytest.skip(f"no network namespace here: {exc}")
        async with open_local_processes() as local:
            # The community forms on a clean network; then its loopback starts losing packets.
            nodes = await start_community(
                local, tmp_path, LOSSY_NODES, extra_args=EXTRA_ARGS, command_prefix=namespace.command_prefix
            )
            await wait_all_watching(nodes, LOSSY_NODES - 1, WATCH_BOUND_S)
            try:
                namespace.add_loss(LOSS)
            except NamespaceUnavailable as exc:
                pytest.skip(f"no packet loss in a network namespace here: {exc}")
            wrongly = await watch_for_false_deaths(nodes, LOSSY_WATCH_S)
            assert wrongly == {node.name: set() for node in nodes}, wrongly
            for name, status in (await statuses(nodes)).items():
                assert status is not None and status.detector.counters["peers_declared_dead"] == 0, name
                assert status.counters["udp_received"] > 0, name
            for node in nodes:
                assert node.returncode is None, node.transcript()
