"""A node that contributes its machine: signed replica requests in, real service processes out.

In-process nodes (``open_node(contribution=...)``) and real ``p2pdeploy join`` processes host
replicas of ``examples/hello`` (a variant asking for 1 core) for a trusted deployer, refuse what
does not fit their contribution or is signed by a key they do not trust, and stop their replicas
before they stop themselves. Every directory is under /tmp and enterable by ``nobody`` (a root
node runs services as nobody); every process is killed in ``finally``; waits poll with bounds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import psutil
import pytest
import trio
from click.testing import CliRunner
from rich.console import Console

from p2pdeploy.cli import main
from p2pdeploy.collective.persistence import Persistence
from p2pdeploy.collective.stateapi import overlay_key
from p2pdeploy.fabric.contribution import ANY, Contribution, ContributionError
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import KademliaConfig
from p2pdeploy.resource.bundle import MAX_BUNDLE_BYTES, MAX_UNPACKED_BYTES, SignedBundle, sign_bundle
from p2pdeploy.resource.protocol import LogsReply, Refused, StatusReply
from p2pdeploy.runtime.address import format_host_port
from p2pdeploy.runtime.bundlefile import (
    BundleFileError,
    bundle_from_directory,
    pack_directory,
    read_signed_bundle,
    signature_path,
    write_signed_bundle,
)
from p2pdeploy.runtime.commands import ContributionOptionError, join_contribution
from p2pdeploy.runtime.control import (
    ControlSocket,
    ReplicaAnswer,
    ReplicaRequest,
    StatusRequest,
    control_request,
    status_of,
)
from p2pdeploy.runtime.control_views import show_status
from p2pdeploy.runtime.keyfile import load_or_create_identity
from p2pdeploy.runtime.localnet import open_local_processes
from p2pdeploy.runtime.node import PingTimeout, open_node
from p2pdeploy.runtime.probe import probe_machine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEPLOYER = Identity.from_seed(b"D" * 32)
STRANGER = Identity.from_seed(b"S" * 32)
COLLEAGUE = Identity.from_seed(b"C" * 32)
#: Generous bounds for a loaded machine; a replica is healthy well within a second or two.
BOUND_S = 30.0
FAST_OVERLAY = KademliaConfig(k=8, rpc_timeout_s=1.0)

needs_two_cores = pytest.mark.skipif(
    probe_machine("/tmp").cores < 2, reason="the contribution is clamped to the machine: needs 2 cores"
)



def one_core_hello(root: Path) -> Path:
    """examples/hello, asking for 1 core instead of a quarter."""
    service = root / "hello-1core"
    shutil.copytree(EXAMPLES / "hello", service)
    manifest = service / "manifest.toml"
    text = manifest.read_text()
    assert "cpu = 0.25" in text
    manifest.write_text(text.replace("cpu = 0.25", "cpu = 1"))
    return service


def processes_under(directory: Path) -> set[int]:
    """Processes whose working directory is inside ``directory`` (a replica runs in its app dir)."""
    found = set()
    prefix = str(directory.resolve()) + "/"
    for process in psutil.process_iter(["pid", "cwd"]):
        cwd = process.info.get("cwd")
        if cwd and (cwd + "/").startswith(prefix):
            found.add(process.info["pid"])
    return found


async def http_get(port: int, path: str = "/") -> bytes:
    with trio.fail_after(BOUND_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def wait_until_running(client, address, replica_id) -> StatusReply:
    with trio.fail_after(BOUND_S):
        while True:
            reply = await client.remote_query(address, replica_id)
            assert isinstance(reply, StatusReply), reply
            assert reply.state in ("installing", "starting", "running"), reply
            if reply.state == "running":
                return reply
            await trio.sleep(0.05)


# -- in-process nodes ------------------------------------------------------------------------


@needs_two_cores
async def test_a_two_core_node_runs_two_one_core_replicas_refuses_a_third_and_untrusted_keys_then_stops_them(
    service_root,
):
    contribution = Contribution(cpu_cores=2, trusted_keys=frozenset({DEPLOYER.public_key}))
    bundle = bundle_from_directory(one_core_hello(service_root)).sign(DEPLOYER)
    async with (
        open_node(data_dir=service_root / "node", contribution=contribution) as node,
        open_node(identity=DEPLOYER, layers=client_layers) as deployer,
        open_node(identity=STRANGER, layers=client_layers) as stranger,
    ):
        assert node.contribution is not None and node.contribution.cpu_cores == 2
        assert node.replicas_dir == service_root / "node" / "replicas"
        for replica_id in ("hello-1", "hello-2"):
            reply = await deployer.remote_start(node.address, replica_id, bundle)
            assert isinstance(reply, StatusReply) and reply.state == "installing", reply
        ports = [(await wait_until_running(deployer, node.address, r)).port for r in ("hello-1", "hello-2")]
        for replica_id, port in zip(("hello-1", "hello-2"), ports, strict=True):
            assert f"(replica {replica_id}, visit 1)".encode() in await http_get(port)

        third = await deployer.remote_start(node.address, "hello-3", bundle)
        assert isinstance(third, Refused)
        assert (third.check, third.reason) == ("admission", "admission: cpu: 1 core asked, 0 of 2 free")

        strangers_bundle = bundle_from_directory(EXAMPLES / "hello").sign(STRANGER)
        refused = await deployer.remote_start(node.address, "hello-4", strangers_bundle)
        assert isinstance(refused, Refused) and refused.check == "bundle"
        assert "a key this node's owner does not trust" in refused.reason
        refused = await stranger.remote_start(node.address, "hello-4", strangers_bundle)
        assert isinstance(refused, Refused) and refused.check == "trust"
        refused = await stranger.remote_stop(node.address, "hello-1")
        assert isinstance(refused, Refused) and refused.check == "authorization"

        logs = await deployer.remote_logs(node.address, "hello-1", 4096)
        assert isinstance(logs, LogsReply) and b'"GET / HTTP/1.0" 200' in logs.data
        replica_pids = processes_under(node.replicas_dir)
        assert len(replica_pids) == 2
        assert replica_pids == node.executor.pids("hello-1") | node.executor.pids("hello-2")
        host = node.replica_host
    # The block ended: the node stopped its replicas (TERM, which hello obeys) before stopping.
    assert {(s.state.value, s.reason) for s in host.statuses()} == {("stopped", "stopped by TERM (exited with code 0)")}
    assert not any(psutil.pid_exists(pid) for pid in replica_pids)
    assert processes_under(service_root) == set()


async def test_a_bundle_larger_than_its_disk_reservation_is_refused_before_it_is_unpacked(service_root):
    """The attack of the hardening issue: `disk = "1M"` and a bundle that unpacks to much more
    (zeros, small on the wire). Refused with both sizes; nothing lands in the replicas directory."""
    service = service_root / "hello-big"
    shutil.copytree(EXAMPLES / "hello", service)
    manifest = service / "manifest.toml"
    manifest.write_text(re.sub(r'disk = "[^"]*"', 'disk = "1M"', manifest.read_text()))
    assert 'disk = "1M"' in manifest.read_text()
    (service / "zeros.bin").write_bytes(bytes(32 * 1024 * 1024))
    data = pack_directory(service)
    signed = SignedBundle(data, DEPLOYER.public_key, sign_bundle(data, DEPLOYER))  # as an attacker's tool would
    contribution = Contribution(trusted_keys=frozenset({DEPLOYER.public_key}))
    async with (
        open_node(data_dir=service_root / "node", contribution=contribution) as node,
        open_node(identity=DEPLOYER, layers=client_layers) as deployer,
    ):
        reply = await deployer.remote_start(node.address, "hello-1", signed)
        assert isinstance(reply, Refused) and reply.check == "bundle", reply
        assert re.fullmatch(r"bundle: unpacks to 32\.0 MiB \(\d+ bytes\), more than the 1 MiB \(1048576 bytes\) "
                            r"its manifest reserves \(resources\.disk\)", reply.reason), reply.reason
        assert list(node.executor.root.iterdir()) == []


async def test_the_control_socket_sends_signed_replica_requests_and_status_lists_the_contribution(service_root):
    """What `p2pdeploy replica` does through a running node: its key signs, the target answers.

    The bundle is near the 4 MiB cap: it crosses the control socket and then goes by TCP.
    """
    target_contribution = Contribution(trusted_keys=frozenset({DEPLOYER.public_key}))
    deployer_dir = service_root / "deployer"
    async with (
        open_node(data_dir=service_root / "target", contribution=target_contribution) as target,
        open_node(identity=DEPLOYER, data_dir=deployer_dir, contribution=Contribution()) as deployer,
    ):
        control = await ControlSocket.bind(deployer_dir)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, deployer)
                service = service_root / "hello-big"
                shutil.copytree(EXAMPLES / "hello", service)
                (service / "blob.bin").write_bytes(os.urandom(MAX_BUNDLE_BYTES - 64 * 1024))  # incompressible
                bundle = bundle_from_directory(service).sign(DEPLOYER)
                assert len(bundle.data) > MAX_BUNDLE_BYTES - 128 * 1024
                started = await control_request(deployer_dir, ReplicaRequest.start(target.address, "hello-1", bundle))
                assert deployer.counters["tcp_sent"] == 1
                assert isinstance(started, ReplicaAnswer) and started.node == target.node_id
                assert (started.host, started.port) == target.address and started.reply.state == "installing"
                await wait_until_running(deployer, target.address, "hello-1")

                host, port = target.address
                logs = await control_request(deployer_dir, ReplicaRequest("logs", host, port, "hello-1", max_bytes=100))
                assert isinstance(logs.reply, LogsReply) and b"hello: listening on" in logs.reply.data

                own = await control_request(deployer_dir, StatusRequest())
                assert own.contribution == Contribution().clamp_to(deployer.machine).to_table()
                assert own.replicas == [] and own.replicas_dir == str(deployer_dir / "replicas")
                (hosted,) = [r for r in target.hosted_replicas()]
                assert (hosted.replica_id, hosted.state.value) == ("hello-1", "running")
                assert target.replica_host.requested_by["hello-1"] == DEPLOYER.public_key
                (listed,) = status_of(target).replicas  # with what its files take (the blob)
                assert MAX_BUNDLE_BYTES - 128 * 1024 < listed.disk_bytes < MAX_BUNDLE_BYTES + 1024 * 1024
                console = Console(record=True, width=200)
                show_status(status_of(target), {"data_dir": str(service_root / "target")}, console)
                assert re.search(r"hello-1 .*running.* [34]\.\d MiB ", console.export_text()), console.export_text()

                stopping = await control_request(deployer_dir, ReplicaRequest("stop", host, port, "hello-1"))
                assert stopping.reply.state == "stopping"
                missing = await control_request(deployer_dir, ReplicaRequest("status", host, port, "nothing"))
                assert isinstance(missing.reply, Refused) and missing.reply.check == "replica"
                nursery.cancel_scope.cancel()
        finally:
            control.close()
    assert processes_under(service_root) == set()


# -- a real `p2pdeploy join` process -------------------------------------------------------


#: A CLI process spends about a CPU-second importing, and ``replica start`` waits up to 60 s itself.
CLI_BOUND_S = 120.0


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLI_BOUND_S):
        return await trio.run_process(
            [sys.executable, "-m", "p2pdeploy.cli", *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def run_all(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[bytes]]:
    """Independent ``p2pdeploy`` commands, run at once; their results in order."""
    results: list = [None] * len(commands)

    async def run_one(index: int) -> None:
        results[index] = await run_cli(*commands[index])

    async with trio.open_nursery() as nursery:
        for index in range(len(commands)):
            nursery.start_soon(run_one, index)
    return results


@needs_two_cores
async def test_a_join_process_hosts_what_fits_refuses_the_rest_and_stops_its_replicas_on_sigterm(service_root):
    deployer_dir, stranger_dir = service_root / "deployer", service_root / "stranger"
    deployer_key = load_or_create_identity(deployer_dir)[0].public_key.hex()
    replicas_dir = service_root / "replicas"
    service = one_core_hello(service_root)
    stranger_bundle = service_root / "stranger.tar.gz"
    async with open_local_processes() as local:
        node = await local.start_join(
            service_root / "node",
            extra_args=["--cpu", "2", "--trust", deployer_key, "--replicas-dir", str(replicas_dir)],
        )
        address = format_host_port(await node.wait_listening())
        await node.wait_for_line(lambda line: line.startswith("control socket"))
        assert re.search(r"│ cpu +│ 2 cores", "\n".join(node.stdout_lines))
        assert f"trusted key {deployer_key}" in node.stdout_lines
        isolation = "isolation: each replica runs as a uid of its own" if os.geteuid() == 0 else "isolation: none"
        assert any(line.startswith(isolation) for line in node.stdout_lines), node.transcript()

        deploy = ["--node", address, "--data-dir", str(deployer_dir)]
        first, second, packed = await run_all(
            ("replica", "start", str(service), "--id", "hello-1", *deploy),
            ("replica", "start", str(service), "--id", "hello-2", *deploy),
            ("bundle", str(EXAMPLES / "hello"), "--out", str(stranger_bundle), "--data-dir", str(stranger_dir)),
        )
        for replica_id, started in (("hello-1", first), ("hello-2", second)):
            output = started.stdout.decode()
            assert started.returncode == 0, output + started.stderr.decode()
            assert f"replica {replica_id} on node {node.node_id_hex} at {address}: installing" in output
            assert re.search(rf"^replica {replica_id}: running: healthy \(port \d+\)$", output, re.M), output
        assert packed.returncode == 0 and signature_path(stranger_bundle).is_file(), packed.stderr.decode()

        # Both cores are reserved now: these are independent too.
        third, strangers, status = await run_all(
            ("replica", "start", str(service), "--id", "hello-3", *deploy),
            ("replica", "start", str(stranger_bundle), "--id", "hello-4", *deploy),
            ("replica", "status", "hello-2", *deploy),
        )
        assert third.returncode == 1
        refusal = f"refused by node {node.node_id_hex} at {address}: admission: cpu: 1 core asked, 0 of 2 free"
        assert refusal in third.stderr.decode()
        assert strangers.returncode == 1
        assert ": bundle: signed by " in strangers.stderr.decode() and "does not trust" in strangers.stderr.decode()
        await node.wait_for_line(lambda line: line.startswith("refused StartReplica from") and "bundle:" in line)
        assert status.returncode == 0
        assert re.search(r"^run 1, restarts 0, port \d+, healthy$", status.stdout.decode(), re.M), status.stdout

        replica_pids = processes_under(replicas_dir)
        assert len(replica_pids) == 2, replica_pids
        node.terminate()
        assert await node.wait_exit() == 0, node.transcript()
        transcript = node.transcript()
        assert "stopping 2 replicas" in transcript
        for replica_id in ("hello-1", "hello-2"):
            assert f"replica {replica_id}: stopped: stopped by TERM (exited with code 0)" in transcript
        assert node.stdout_lines[-1] == "stopped"
        assert not any(psutil.pid_exists(pid) for pid in replica_pids)
        assert processes_under(service_root) == set()


@pytest.mark.slow
async def test_a_join_process_answers_pings_while_it_checks_and_unpacks_the_largest_allowed_bundle(service_root):
    """Checking a bundle reads all of it (256 MiB of zeros from a 4 MiB cap: about a second and
    more) and unpacking writes it; both run in worker threads, so every ping sent meanwhile is
    answered (within 1 s; the node means to answer within 100 ms)."""
    deployer_dir = service_root / "deployer"
    deployer_key = load_or_create_identity(deployer_dir)[0].public_key.hex()
    service = service_root / "hello-huge"
    shutil.copytree(EXAMPLES / "hello", service)
    manifest = service / "manifest.toml"
    manifest.write_text(re.sub(r'disk = "[^"]*"', 'disk = "300M"', manifest.read_text()))
    zeros = MAX_UNPACKED_BYTES - 1024 * 1024
    with open(service / "zeros.bin", "wb") as file:
        file.truncate(zeros)  # sparse here; every byte of it on the node
    async with open_local_processes() as local, open_node() as pinger:
        node = await local.start_join(service_root / "node", extra_args=["--trust", deployer_key, "--disk", "1G"])
        address = await node.wait_listening()
        answered, unanswered = [], []
        async with trio.open_nursery() as nursery:

            async def ping_until_cancelled() -> None:
                while True:
                    try:
                        answered.append(await pinger.ping(address, timeout_s=1.0))
                    except PingTimeout:
                        unanswered.append(trio.current_time())
                    await trio.sleep(0.01)

            nursery.start_soon(ping_until_cancelled)
            started = await run_cli("replica", "start", str(service), "--id", "huge-1",
                                    "--node", format_host_port(address), "--data-dir", str(deployer_dir))  # fmt: skip
            nursery.cancel_scope.cancel()
        assert started.returncode == 0, started.stdout.decode() + started.stderr.decode()
        installed = service_root / "node" / "replicas" / "huge-1" / "app" / "zeros.bin"
        assert installed.stat().st_size == zeros
        assert unanswered == [], f"{len(unanswered)} pings unanswered, {len(answered)} answered"
        assert len(answered) >= 10
        node.terminate()
        assert await node.wait_exit() == 0, node.transcript()


def test_key_prints_the_data_dirs_public_key_alone(tmp_path):
    result = CliRunner().invoke(main, ["key", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == load_or_create_identity(tmp_path)[0].public_key.hex() + "\n"
    assert "created a key in" in result.stderr
    again = CliRunner().invoke(main, ["key", "--data-dir", str(tmp_path)])
    assert again.stdout == result.stdout and again.stderr == ""


# -- options, config files and bundle files ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option", "complaint"),
    [
        (["--memory", "lots"], "'--memory'", "expected a size such as 512M or 2G (got 'lots')"),
        (["--cpu", "200%"], "'--cpu'", "at most 100%"),
        (["--bandwidth", "fast"], "'--bandwidth'", "expected a bandwidth"),
        (["--trust", "abc"], "'--trust'", "64-digit hex Ed25519 public key"),
        (["--max-services", "-1"], "'--max-services'", "-1"),
    ],
)
def test_a_bad_contribution_option_is_a_usage_error_naming_it(tmp_path, args, option, complaint):
    result = CliRunner().invoke(main, ["join", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}" in result.output and complaint in result.output


MACHINE = Machine(cores=8, memory_total_bytes=16 * 1024**3, memory_free_bytes=8 * 1024**3,
                  disk_total_bytes=100 * 1024**3, disk_free_bytes=50 * 1024**3)  # fmt: skip


def test_join_options_win_over_the_config_files_contribution_and_the_result_is_clamped(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[contribution]\ncpu = 1\nmemory = "25%"\ntrusted_keys = "any"\ntags = ["ssd"]\ndisk = "1T"\n')
    options = {"cpu": "3", "trusted_keys": [DEPLOYER.public_key.hex()]}
    contribution, path = join_contribution(options, config, MACHINE)
    assert path == config
    assert contribution.cpu_cores == 3 and contribution.memory_bytes == 4 * 1024**3
    assert contribution.trusted_keys == frozenset({DEPLOYER.public_key}) and contribution.tags == {"ssd"}
    assert contribution.disk_bytes == MACHINE.disk_free_bytes  # never more than the machine has
    default, _ = join_contribution({}, None, MACHINE)
    assert default.trusted_keys == frozenset() and not default.trusts(DEPLOYER.public_key)
    assert join_contribution({"trusted_keys": ANY}, None, MACHINE)[0].trusts(STRANGER.public_key)


def test_a_bad_config_file_names_the_file_and_key_and_a_bad_option_names_the_option(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[contribution]\nmemory = "lots"\n')
    with pytest.raises(ContributionError, match=r"config.toml: contribution.memory: expected a size"):
        join_contribution({}, config, MACHINE)
    assert join_contribution({"memory": "1G"}, config, MACHINE)[0].memory_bytes == 1024**3
    with pytest.raises(ContributionOptionError) as caught:
        join_contribution({"disk": "much"}, config, MACHINE)
    assert caught.value.option == "--disk"


def test_a_bundle_file_travels_with_its_signature_and_a_changed_bundle_is_caught(tmp_path):
    signed = bundle_from_directory(EXAMPLES / "hello").sign(DEPLOYER)
    path = tmp_path / "hello.tar.gz"
    sig_path = write_signed_bundle(path, signed)
    assert sig_path == tmp_path / "hello.tar.gz.sig"
    assert read_signed_bundle(path) == signed
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleFileError, match="does not match"):
        read_signed_bundle(path)
    sig_path.unlink()
    with pytest.raises(BundleFileError, match=r"hello.tar.gz.sig not found"):
        read_signed_bundle(path)


async def http_body(port: int, path: str) -> bytes:
    """The body of a 200 answer to ``GET path``."""
    data = await http_get(port, path)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), data
    return body


async def test_a_hosted_service_keeps_a_counter_in_the_state_api_replicated_on_other_nodes(service_root):
    """The executor hands the service the node's state API (URL and token in its environment);
    examples/hello counts /count there with compare-and-set, and the record lives on the nodes
    closest to its key: another node reads it with a quorum read."""
    contribution = Contribution(trusted_keys=frozenset({DEPLOYER.public_key, COLLEAGUE.public_key}))
    bundle = bundle_from_directory(EXAMPLES / "hello").sign(DEPLOYER)
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(
            open_node(data_dir=service_root / "host", contribution=contribution, kademlia=FAST_OVERLAY))
        others = [await stack.enter_async_context(open_node(seed=i, bootstrap=[host.address], kademlia=FAST_OVERLAY))
                  for i in range(4)]
        deployer = await stack.enter_async_context(open_node(identity=DEPLOYER, layers=client_layers))
        for node in (host, *others):
            await node.wait_joined()
        assert isinstance(await deployer.remote_start(host.address, "hello-1", bundle), StatusReply)
        port = (await wait_until_running(deployer, host.address, "hello-1")).port
        assert b"(replica hello-1, visit 1)" in await http_body(port, "/")
        assert (await http_body(port, "/count")).startswith(b"count 1 (version 1)")
        assert (await http_body(port, "/count")).startswith(b"count 2 (version 2)")
        again = await deployer.remote_start(host.address, "hello-1", bundle)  # a retried start: the same run
        assert isinstance(again, StatusReply) and (again.state, again.run, again.port) == ("running", 1, port)

        # Stopped, the same id starts again in the same directory: its data and its state carry over.
        await deployer.remote_stop(host.address, "hello-1")
        with trio.fail_after(BOUND_S):
            while (await deployer.remote_query(host.address, "hello-1")).state != "stopped":
                await trio.sleep(0.05)
        assert isinstance(await deployer.remote_start(host.address, "hello-1", bundle), StatusReply)
        port = (await wait_until_running(deployer, host.address, "hello-1")).port
        assert b"(replica hello-1, visit 2)" in await http_body(port, "/")
        assert (await http_body(port, "/count")).startswith(b"count 3 (version 3)")

        # another deployer's service of the same name has a namespace of its own
        colleague = await stack.enter_async_context(open_node(identity=COLLEAGUE, layers=client_layers))
        theirs = bundle_from_directory(EXAMPLES / "hello").sign(COLLEAGUE)
        assert isinstance(await colleague.remote_start(host.address, "hello-2", theirs), StatusReply)
        other_port = (await wait_until_running(colleague, host.address, "hello-2")).port
        assert (await http_body(other_port, "/count")).startswith(b"count 1 (version 1)")

        key = overlay_key(host.identity.public_key, f"hello@{DEPLOYER.public_key.hex()}", "count")
        with trio.fail_after(BOUND_S):
            read = await others[2].persistence.quorum_read(key)
        assert read.ok and read.item is not None and (read.item.value, read.version) == (b"3", 3)
        holders = [node for node in others if node.core.layer(Persistence).store.read_acceptor(key) is not None]
        assert holders, "the record is held by other nodes, not only by the host"


async def test_a_node_without_a_contribution_hosts_nothing():
    async with open_node() as node:
        assert node.contribution is None and node.executor is None and node.hosted_replicas() == []
        assert await node.stop_hosted_replicas() == []


def test_join_help_says_what_a_volunteer_contributes_by_default():
    result = CliRunner().invoke(main, ["join", "--help"])
    assert result.exit_code == 0
    for words in ("1 core, 1 GiB of memory, 5 GiB of disk", "trusts NO deployer", "--trust KEY", signal.SIGTERM.name):
        assert words in result.output
