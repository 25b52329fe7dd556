"""The local control API: requests over the data directory's Unix socket, refusals, and the CLI's errors."""

from __future__ import annotations

import io
import json
import os
import random
import re
import stat
import time
from contextlib import AsyncExitStack

import cbor2
import pytest
import trio
from click.testing import CliRunner
from rich.console import Console

from p2pdeploy import api, wire
from p2pdeploy.cli import main
from p2pdeploy.overlay.kademlia import KademliaConfig, Probe
from p2pdeploy.overlay.storage import Item
from p2pdeploy.overlay.swim import DetectorConfig
from p2pdeploy.runtime.commands import run_blob_get, run_blob_put, run_status
from p2pdeploy.runtime.control import (
    CONTROL_COMMANDS,
    CONTROL_LIMIT_BYTES,
    REQUESTS,
    ControlError,
    ControlRefusal,
    ControlSocket,
    NodeAlreadyRunning,
    NoNodeRunning,
    control_socket_path,
    open_control,
)
from p2pdeploy.runtime.framing import LENGTH_PREFIX, FrameDecoder, frame
from p2pdeploy.runtime.node import RuntimeConfig, open_node

LOOPBACK = ("127.0.0.1", 0)
FAST = KademliaConfig(k=8, rpc_timeout_s=1.0)


async def serve_node(stack: AsyncExitStack, data_dir, *, kademlia: KademliaConfig = FAST, **kwargs):
    """A node with its control socket served from ``data_dir``, as ``p2pdeploy join`` runs it."""
    control = await ControlSocket.bind(data_dir)
    node = await stack.enter_async_context(open_node(LOOPBACK, data_dir=data_dir, kademlia=kademlia, **kwargs))
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)
    await nursery.start(control.serve, node)
    return node, control


async def test_status_put_get_and_lookup_through_the_control_socket(tmp_path):
    async with AsyncExitStack() as stack:
        first, _ = await serve_node(stack, tmp_path / "a")
        second, control = await serve_node(stack, tmp_path / "b", bootstrap=[first.address])
        await second.wait_joined()
        assert stat.S_IMODE(os.stat(control.path).st_mode) == 0o600
        key = api.key_for("greeting")
        async with open_control(tmp_path / "b") as client:
            put = await client.request(api.PutRequest(key, Item(b"hello"), 600.0))
            assert put.stored == 2 and put.refusals == []
            status = await client.request(api.StatusRequest())
            assert (status.node_id, (status.host, status.port)) == (second.node_id, second.address)
            assert (status.contacts, status.stored_items, status.published_items) == (1, 1, 1)
            assert status.counters["control_requests"] == 2 and status.counters["kademlia.requests_sent"] > 0
            found = await client.request(api.LookupRequest(key))
            assert [c.node_id for c in found.contacts] == [first.node_id]
        reply = await api.control_request(tmp_path / "a", api.GetRequest(key))
        assert reply.item == Item(b"hello") and 0 < reply.ttl_s <= 600.0
        missing = await api.control_request(tmp_path / "a", api.GetRequest(api.key_for("nothing")))
        assert missing.item is None
        with pytest.raises(api.ControlRequestRefused, match="ttl_s must be in"):
            await api.control_request(tmp_path / "a", api.PutRequest(key, Item(b"x"), -1.0))


async def test_the_control_socket_refuses_garbage_and_keeps_serving(tmp_path):
    async with AsyncExitStack() as stack:
        node, control = await serve_node(stack, tmp_path)
        attempts = [
            frame(b"\xff\x00 not cbor"),
            frame(cbor2.dumps({"not": "an envelope"})),
            frame(wire.encode(Probe(1, 5))),  # a valid message, but not a control request
            LENGTH_PREFIX.pack(CONTROL_LIMIT_BYTES + 1) + bytes(10),
        ]
        for data in attempts:
            async with await trio.open_unix_socket(os.fspath(control.path)) as stream:
                await stream.send_all(data)
                refusal = await _read_reply(stream)
                assert isinstance(refusal, ControlRefusal), refusal
                assert await stream.receive_some(1024) == b""  # and the connection is closed
        assert node.counters["control_malformed"] == len(attempts)
        # a client that hangs up half-way is harmless too
        async with await trio.open_unix_socket(os.fspath(control.path)) as stream:
            await stream.send_all(LENGTH_PREFIX.pack(100) + b"partial")
        status = await api.control_request(tmp_path, api.StatusRequest())
        assert status.node_id == node.node_id


async def _read_reply(stream):
    decoder = FrameDecoder(CONTROL_LIMIT_BYTES)
    with trio.fail_after(10):
        while (payload := decoder.next_frame()) is None:
            decoder.feed(await stream.receive_some(65536))
    return wire.decode(payload, CONTROL_LIMIT_BYTES)


async def test_one_node_per_data_dir_and_a_killed_nodes_socket_is_replaced(tmp_path):
    async with AsyncExitStack() as stack:
        await serve_node(stack, tmp_path)
        with pytest.raises(NodeAlreadyRunning, match=f"already running with data dir {tmp_path}"):
            await ControlSocket.bind(tmp_path)
    assert not control_socket_path(tmp_path).exists()  # removed when the node stopped

    # a node killed with SIGKILL leaves its socket file; nobody accepts on it
    import socket

    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(os.fspath(control_socket_path(tmp_path)))
    leftover.close()
    with pytest.raises(NoNodeRunning):
        await api.control_request(tmp_path, api.StatusRequest())
    control = await ControlSocket.bind(tmp_path)
    control.close()

    control_socket_path(tmp_path).write_text("not a socket")
    with pytest.raises(ControlError, match="is not a socket"):
        await ControlSocket.bind(tmp_path)


async def test_a_data_dir_too_long_for_a_unix_socket_path_still_works(tmp_path):
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    async with AsyncExitStack() as stack:
        node, control = await serve_node(stack, data_dir)
        assert len(os.fsencode(control.path)) > 108
        status = await api.control_request(data_dir, api.StatusRequest())
        assert status.node_id == node.node_id


def test_the_cli_says_clearly_when_no_node_runs_with_the_data_dir(tmp_path):
    for args in (["get", "x"], ["put", "x", "y"], ["lookup", "x"], ["status"]):
        result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path / "nothing")])
        assert result.exit_code == 1, result.output
        assert f"no node is running with data dir {tmp_path / 'nothing'}" in result.output
        assert "p2pdeploy join --data-dir" in result.output


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("nope=1", "unknown Kademlia parameter 'nope'"),
        ("k=eight", "k takes int"),
        ("k=0", "kademlia.k must be >= 1"),
        ("k", "is not KEY=VALUE"),
    ],
)
def test_join_names_a_bad_kademlia_setting(setting, complaint):
    result = CliRunner().invoke(main, ["join", "--kademlia", setting])
    assert result.exit_code == 2
    assert complaint in result.output


async def test_blob_put_and_get_through_the_control_socket_byte_identical_from_another_node(tmp_path):
    data = random.Random(3).randbytes(700 * 1024)  # three chunks
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    out = io.StringIO()
    console = Console(file=out, width=200)
    async with AsyncExitStack() as stack:
        # the network stops as a whole at the end: no hand-off (test_persistence_runtime tests it)
        first, _ = await serve_node(stack, tmp_path / "a", hand_off=False)
        others = [(await serve_node(stack, tmp_path / f"n{i}", bootstrap=[first.address], seed=i, hand_off=False))[0]
                  for i in range(3)]
        for node in others:
            await node.wait_joined()
        assert await run_blob_put(source, None, tmp_path / "n0", console) == 0
        blob_id = re.search(r"^blob ([0-9a-f]{40})$", out.getvalue(), re.M).group(1)
        assert "3 chunks, 3 copies of each" in out.getvalue()
        assert await run_blob_get(blob_id, tmp_path / "fetched.bin", tmp_path / "a", console) == 0
        assert (tmp_path / "fetched.bin").read_bytes() == data
        statuses = [await api.control_request(tmp_path / d, api.StatusRequest()) for d in ("a", "n0", "n1", "n2")]
        assert sum(status.persistence["chunks"] for status in statuses) >= 4 * 3  # 3 chunks and the manifest, 3 copies
        assert all(status.persistence["bytes_used"] <= status.persistence["capacity_bytes"] for status in statuses)
        assert all(status.state_url.startswith("http://127.0.0.1:") for status in statuses)
        missing = "f" * 40
        assert await run_blob_get(missing, tmp_path / "none.bin", tmp_path / "a", console) == 1
        assert not (tmp_path / "none.bin").exists()


def test_blob_get_names_a_bad_id(tmp_path):
    result = CliRunner().invoke(main, ["blob", "get", "xyz", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "a blob id is 40 hex digits" in result.output


FAST_DETECTOR = DetectorConfig(protocol_period_s=0.1, probe_timeout_s=0.05, suspicion_min_mult=3.0)


async def _poll_status(data_dir, condition, bound_s: float = 30.0):
    """The first status of the node of ``data_dir`` that satisfies ``condition`` (polled, bounded)."""
    with trio.fail_after(bound_s):
        while not condition(status := await api.control_request(data_dir, api.StatusRequest())):
            await trio.sleep(0.05)
    return status


async def test_status_shows_the_failure_detector_watching_suspecting_and_declaring_dead(tmp_path):
    config = RuntimeConfig(detector=FAST_DETECTOR)
    fast_watch = KademliaConfig(k=8, rpc_timeout_s=1.0, watch_sync_interval_s=0.2)
    async with AsyncExitStack() as stack:
        first, _ = await serve_node(stack, tmp_path / "a", config=config, kademlia=fast_watch)
        second, _ = await serve_node(stack, tmp_path / "b", bootstrap=[first.address], config=config,
                                     kademlia=fast_watch)  # fmt: skip
        async with AsyncExitStack() as victim_stack:
            victim, _ = await serve_node(victim_stack, tmp_path / "c", bootstrap=[first.address], config=config,
                                         kademlia=fast_watch, hand_off=False)  # fmt: skip
            await victim.wait_joined()
            for data_dir in ("a", "b"):
                status = await _poll_status(tmp_path / data_dir, lambda s: s.detector.watched == 2)
                assert (status.detector.suspects, status.detector.dead) == ([], [])
                assert status.detector.counters["probes"] >= 0 and status.detector.health >= 0
            victim_id = victim.node_id
        # the victim is gone: both watchers hold it dead, since when and for how long
        for data_dir in ("a", "b"):
            status = await _poll_status(tmp_path / data_dir, lambda s: s.detector.dead)
            [dead] = status.detector.dead
            assert (dead.node_id, dead.state, status.detector.suspects) == (victim_id, "dead", [])
            assert dead.for_s >= 0 and abs(time.time() - dead.for_s - dead.since_unix_s) < 5.0
            assert status.detector.counters["peers_declared_dead"] == 1
            assert status.detector.counters["probes_failed"] >= 1
            assert status.detector.watched == 2  # dead peers stay watched, in case they come back

        # `p2pdeploy status` prints it; `--json` gives node ids in hex
        out = io.StringIO()
        assert await run_status(tmp_path / "a", Console(file=out, width=200, soft_wrap=True)) == 0
        text = out.getvalue()
        assert re.search(rf"^.*{victim_id:040x}.*dead.*s ago", text, re.M), text
        assert "failure detector: 2 peers watched, 0 suspect, 1 dead" in text
        out = io.StringIO()
        assert await run_status(tmp_path / "a", Console(file=out, width=80, soft_wrap=True), as_json=True) == 0
        reported = json.loads(out.getvalue())
        assert reported["node_id"] == f"{first.node_id:040x}"
        assert [peer["node_id"] for peer in reported["detector"]["dead"]] == [f"{victim_id:040x}"]
        assert reported["detector"]["counters"]["peers_declared_dead"] == 1
        assert reported["counters"]["peers_declared_dead"] == 1


async def test_status_of_a_node_without_a_detector_has_none(tmp_path):
    async with AsyncExitStack() as stack:
        await serve_node(stack, tmp_path, config=RuntimeConfig(detector=None))
        status = await api.control_request(tmp_path, api.StatusRequest())
        assert status.detector is None
        out = io.StringIO()
        assert await run_status(tmp_path, Console(file=out, width=200)) == 0
        assert "failure detector" not in out.getvalue()


def test_every_control_request_is_declared_once_with_its_wire_tags_and_command():
    tag_of = {cls: tag for tag, cls in wire.message_types().items()}
    declared = {
        command.request.__name__: (tag_of[command.request], command.reply.__name__, tag_of[command.reply], command.name)
        for command in CONTROL_COMMANDS.values()
    }
    assert declared == {
        "StatusRequest": (50, "StatusReply", 51, "status"),
        "PutRequest": (52, "PutReply", 53, "put"),
        "GetRequest": (54, "GetReply", 55, "get"),
        "LookupRequest": (56, "LookupReply", 57, "lookup"),
        "BlobPutRequest": (42, "BlobPutReply", 43, "blob put"),
        "BlobGetRequest": (44, "BlobGetReply", 45, "blob get"),
        "ReplicaRequest": (40, "ReplicaAnswer", 41, None),  # the `replica` commands send it themselves
        # the service commands (deploy, scale, undeploy, status SERVICE, ls, events) send theirs themselves
        "DeployRequest": (46, "DeployReply", 47, None),
        "ScaleRequest": (48, "DeployReply", 47, None),
        "UndeployRequest": (49, "DeployReply", 47, None),
        "ServiceStatusRequest": (59, "ServiceStatusReply", 37, None),
        "ServicesRequest": (38, "ServicesReply", 39, None),
    }
    for command in CONTROL_COMMANDS.values():
        if command.name is not None:
            assert command.ask is not None and command.show is not None, command.name
    assert tuple(CONTROL_COMMANDS) == REQUESTS
