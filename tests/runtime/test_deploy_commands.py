"""The service commands on real nodes: deploy, status SERVICE, ls, events, scale and undeploy.

Three in-process full nodes on 127.0.0.1, each with a data directory, its control socket (as
``p2pdeploy join`` serves it) and a contribution that trusts the three nodes' keys. The
commands' bodies run as the CLI runs them, printing to a console the test reads. Waits poll
with a generous bound.
"""

from __future__ import annotations

import io
import json
import re
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from rich.console import Console

from p2pdeploy import api
from p2pdeploy.cli import main
from p2pdeploy.collective.deployment_messages import ServiceId
from p2pdeploy.collective.persistence import PersistenceConfig
from p2pdeploy.collective.prospector_config import ProspectorConfig
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.runtime.control import ControlSocket
from p2pdeploy.runtime.keyfile import load_or_create_identity
from p2pdeploy.runtime.node import RuntimeConfig, decision_line, open_node
from p2pdeploy.runtime.service_commands import (
    run_deploy,
    run_events,
    run_ls,
    run_scale,
    run_service_status,
    run_undeploy,
)

LOOPBACK = ("127.0.0.1", 0)
BOUND_S = 90.0
NODES = 3
CONFIG = RuntimeConfig(
    kademlia=KademliaConfig(k=8, rpc_timeout_s=1.0),
    prospector=ProspectorConfig(update_interval_s=1.0, min_update_interval_s=0.1, expiry_s=3.0, ack_timeout_s=0.5,
                                rpc_timeout_s=1.0, root_timeout_s=2.0),
    persistence=PersistenceConfig(rpc_timeout_s=2.0, transfer_timeout_s=30.0),
)
MANIFEST = """name = "sleeper"
version = "1.0"
command = ["python3", "-c", "import time; time.sleep(600)"]

[resources]
cpu = 0.1
memory = "32M"
disk = "1M"

[stop]
grace_s = 1

[placement]
replicas = 1
"""


def service_dir(root: Path) -> Path:
    directory = root / "sleeper"
    directory.mkdir()
    (directory / "manifest.toml").write_text(MANIFEST)
    return directory


def console_to(out: io.StringIO) -> Console:
    return Console(file=out, width=200, soft_wrap=True, highlight=False)


async def start_network(stack: AsyncExitStack, root: Path):
    """Three full nodes with their control sockets, each trusting the three nodes' keys."""
    identities = [load_or_create_identity(root / f"n{i}")[0] for i in range(NODES)]
    trusting = Contribution(cpu_cores=1.0, trusted_keys=frozenset(i.public_key for i in identities))
    nodes = []
    for index in range(NODES):
        data_dir = root / f"n{index}"
        control = await ControlSocket.bind(data_dir)
        node = await stack.enter_async_context(open_node(
            LOOPBACK, data_dir=data_dir, bootstrap=[nodes[0].address] if nodes else [], config=CONFIG,
            contribution=trusting, seed=index, hand_off=False))  # fmt: skip
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(control.serve, node)
        nodes.append(node)
    for node in nodes:
        await node.wait_joined()
    return nodes


def hosting(nodes) -> dict[str, int]:
    """Replica id -> the node that runs it, for every replica running on the nodes."""
    return {status.replica_id: node.node_id for node in nodes for status in node.hosted_replicas()
            if status.state.value == "running"}


async def test_deploy_status_ls_events_and_undeploy_through_the_commands(service_root):
    source = service_dir(service_root)
    async with AsyncExitStack() as stack:
        nodes = await start_network(stack, service_root)
        deployer_dir = service_root / "n0"
        owner = nodes[0].identity.public_key
        service = str(ServiceId("sleeper", owner))

        out = io.StringIO()
        with trio.fail_after(BOUND_S):
            status = await run_deploy(source, deployer_dir, console_to(out), replicas=2, timeout_s=BOUND_S - 10)
        text = out.getvalue()
        assert status == 0, text
        assert re.search(rf"^deployed {service} version 1$", text, re.M), text
        lines = re.findall(r"^(sleeper-\S+) on ([0-9a-f]{12}) \(127\.0\.0\.1:\d+\): running(?:: .*)?$", text, re.M)
        assert len({replica for replica, _ in lines}) >= 2, text
        running = hosting(nodes)
        assert len(running) == 2 and len(set(running.values())) == 2  # two replicas, on distinct nodes

        # `status SERVICE` from another node: the manager, desired and running, each replica's node
        out = io.StringIO()
        assert await run_service_status("sleeper@" + owner.hex(), service_root / "n2", console_to(out)) == 0
        text = out.getvalue()
        assert f"service {service}" in text and re.search(r"^desired 2\b.*running 2$", text, re.M), text
        assert re.search(r"^manager [0-9a-f]{12} \(127\.0\.0\.1:\d+\)$", text, re.M), text
        assert "recent decisions:" in text and " placed " in text, text
        out = io.StringIO()
        assert await run_service_status("sleeper", deployer_dir, console_to(out), as_json=True) == 0
        reported = json.loads(out.getvalue().splitlines()[-1])
        assert (reported["service"], reported["desired"], reported["running"]) == (service, 2, 2)
        assert {r["node"]["node_id"] for r in reported["replicas"] if r["state"] == "running"} == {
            f"{node_id:040x}" for node_id in running.values()}
        assert any(d["decision"] == "placed" for d in reported["decisions"])

        # `ls` lists the key's services with their counts; `--json` parses
        out = io.StringIO()
        assert await run_ls(deployer_dir, console_to(out)) == 0
        assert f"{service}: running 2 of 2" in out.getvalue()
        out = io.StringIO()
        assert await run_ls(service_root / "n1", console_to(out), owner=owner.hex(), as_json=True) == 0
        listed = json.loads(out.getvalue().splitlines()[-1])
        assert listed["owner"] == owner.hex() and [s["service"] for s in listed["services"]] == [service]

        # `events` prints the manager's decisions, one JSON object per line with --json
        out = io.StringIO()
        assert await run_events(None, deployer_dir, console_to(out), as_json=True) == 0
        decisions = [json.loads(line) for line in out.getvalue().splitlines()]
        assert sum(d["decision"] == "placed" for d in decisions) >= 2 and {d["service"] for d in decisions} == {service}

        # a node whose key does not own the service refuses to change it, before asking anyone
        out = io.StringIO()
        assert await run_undeploy(service, service_root / "n1", console_to(out), as_json=True) == 1
        refusal = json.loads(out.getvalue().splitlines()[-1])
        assert refusal["ok"] is False
        assert refusal["error"] == (
            f"service sleeper@{owner.hex()[:12]}… is owned by key {owner.hex()[:12]}…; this node's key is "
            f"{nodes[1].identity.public_key.hex()[:12]}…: only the owner may update, scale or undeploy it")
        assert len(hosting(nodes)) == 2

        # the owner undeploys: every replica stops
        out = io.StringIO()
        with trio.fail_after(BOUND_S):
            status = await run_undeploy("sleeper", deployer_dir, console_to(out), timeout_s=BOUND_S - 10, as_json=True)
        result = json.loads(out.getvalue().splitlines()[-1])
        assert status == 0 and result["ok"] and result["ready"], result
        assert result["service"] == service and result["version"] == 2
        assert hosting(nodes) == {}
        assert not any(node.active_replicas() for node in nodes)


async def test_a_refused_deploy_and_scale_say_why(service_root):
    source = service_dir(service_root)
    manifest = source / "manifest.toml"
    manifest.write_text(MANIFEST.replace("cpu = 0.1", "cpu = 64"))
    async with AsyncExitStack() as stack:
        await start_network(stack, service_root)
        out = io.StringIO()
        with trio.fail_after(BOUND_S):
            status = await run_deploy(source, service_root / "n0", console_to(out), as_json=True)
        refusal = json.loads(out.getvalue().splitlines()[-1])
        assert status == 1 and refusal["ok"] is False
        assert "64" in refusal["error"] and "cpu" in refusal["error"], refusal
        out = io.StringIO()
        assert await run_scale("nothing", service_root / "n0", console_to(out), replicas=2, as_json=True) == 1
        assert "no service nothing owned by this key" in json.loads(out.getvalue().splitlines()[-1])["error"]


async def test_the_library_deploys_and_asks_a_running_node(service_root):
    source = service_dir(service_root)
    async with AsyncExitStack() as stack:
        nodes = await start_network(stack, service_root)
        bundle = api.bundle_from_directory(source).sign(nodes[1].identity)
        service = ServiceId("sleeper", nodes[1].identity.public_key)
        with trio.fail_after(BOUND_S):
            async with nodes[2].service_events(str(service)) as decisions:
                reply = await api.control_request(service_root / "n1", api.DeployRequest.of(bundle, replicas=1))
                assert reply.ok and reply.service == str(service), reply
                async for delivered in decisions:  # the manager publishes its decisions on the service's topic
                    if delivered.attributes.get("decision") == "placed":
                        break
            assert delivered.attributes["service"] == str(service) and delivered.attributes["replica"]
            while not (report := (await nodes[2].service_status(reply.service)).report) or not [
                    r for r in report.replicas if r.state == "running"]:
                await trio.sleep(0.5)
        assert await nodes[1].services() == ["sleeper"]
        assert await nodes[0].services(nodes[1].identity.public_key) == ["sleeper"]
        with pytest.raises(api.ControlRequestRefused, match="not this node's key"):
            await api.control_request(service_root / "n0", api.DeployRequest.of(bundle))
        with pytest.raises(api.ControlRequestRefused, match="only the owner may"):
            await api.control_request(service_root / "n0", api.ScaleRequest(reply.service, 2))
        done = await nodes[1].undeploy("sleeper")
        assert done.ok and done.action == "undeploy"


def test_decision_lines_name_the_service_replica_node_and_reason():
    owner = Identity.from_seed(b"o" * 32).public_key
    decision = api.Decision(str(ServiceId("web", owner)), "placed", "owner ada", 3.0, "web-1", 0xABCDEF << 136)
    assert decision_line(decision) == f"service web@{owner.hex()[:12]}: placed web-1 on abcdef000000: owner ada"


def test_the_service_commands_check_their_options_before_asking_a_node(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["scale", "web", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "give --replicas N or --availability A" in result.output
    result = runner.invoke(main, ["deploy", str(tmp_path), "--replicas", "2", "--availability", "0.9",
                                  "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(main, ["ls", "--owner", "abc", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "--owner is a public key, 64 hex digits" in result.output
    result = runner.invoke(main, ["status", "web", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no node is running with data dir" in result.output
