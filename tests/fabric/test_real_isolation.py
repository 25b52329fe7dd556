"""Services cannot reach root, nor each other: the launcher's environment and a uid per replica.

Attacks tried on real processes: a service's environment that would load a library into the
launcher while it is still root (``LD_PRELOAD``).
Tests that need root (switching users) skip elsewhere, saying why; every process is killed when
its executor or node closes.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import ANY, Contribution
from p2pdeploy.fabric.executor import HealthCheck, Limits, ProcessSpec
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaState, RestartPolicy
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.bundle import SignedBundle, sign_bundle
from p2pdeploy.resource.protocol import Refused, StatusReply
from p2pdeploy.runtime.bundlefile import pack_directory
from p2pdeploy.runtime.exec_local import open_local_replicas
from p2pdeploy.runtime.executor import RealExecutorConfig
from p2pdeploy.runtime.node import open_node

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MIB = 1024 * 1024
CONTRIBUTION = Contribution(cpu_cores=1, memory_bytes=1024 * MIB, max_services=8, trusted_keys=ANY)
DEPLOYER = Identity.from_seed(b"D" * 32)
BOUND_S = 30.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only a root node runs services as other users")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the preloaded library")

#: A library that, wherever it is loaded, leaves a file named after the uid it runs as.
PRELOAD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void record_uid(void) {
    const char *directory = getenv("PRELOAD_RECORDS");
    char path[4096];
    if (directory == NULL) return;
    snprintf(path, sizeof path, "%s/ran-as-uid-%d", directory, (int) getuid());
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) close(fd);
}
"""


def service_dir(root: Path, name: str, command: list[str], env: dict[str, str] | None = None) -> Path:
    """examples/behave as service ``name`` running ``command``, with ``env`` in its manifest."""
    service = root / name
    shutil.copytree(EXAMPLES / "behave", service)
    manifest = service / "manifest.toml"
    text = manifest.read_text().replace('name = "behave"', f'name = "{name}"')
    text = text.replace('command = ["python3", "behave.py", "serve"]', f"command = {command!r}".replace("'", '"'))
    if env:
        text += "\n[env]\n" + "".join(f'{key} = "{value}"\n' for key, value in env.items())
    manifest.write_text(text)
    return service


def signed(directory: Path) -> SignedBundle:
    """The directory packed and signed, without the deployer-side manifest checks (an attacker's tool)."""
    data = pack_directory(directory)
    return SignedBundle(data, DEPLOYER.public_key, sign_bundle(data, DEPLOYER))


def run_once(replica_id: str, argv: tuple[str, ...], env: dict[str, str]) -> ReplicaSpec:
    process = ProcessSpec(replica_id, 1, argv, env=env, limits=Limits(memory_bytes=256 * MIB, processes=64))
    return ReplicaSpec(process, HealthCheck(kind="none"), RestartPolicy(mode="never"), stop_grace_s=0.5)


async def run_to_the_end(local, spec: ReplicaSpec, bundle: bytes) -> str:
    replica_id = spec.process.replica_id
    refusal = local.command(lambda core, now: local.host.start_replica(spec, Demand(), now, bundle=bundle))
    assert refusal is None, refusal
    with trio.fail_after(BOUND_S):
        while local.host.status(replica_id).state not in (ReplicaState.STOPPED, ReplicaState.FAILED):
            await trio.sleep(0.05)
    return local.executor.read_logs(replica_id, 100_000).decode()


# -- the launcher runs with the node's environment, never the service's ----------------------


async def test_the_launcher_runs_with_the_nodes_environment_and_the_service_gets_its_own(service_root, behave_bundle):
    """The launcher is wrapped by a script that records its environment and arguments: the
    service's variable (and so its state token) is in neither; the service itself sees it."""
    records = service_root / "records"
    records.mkdir()
    wrapper = service_root / "launcher-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'env > "{records}/environment"\n'
        f'printf "%s\\n" "$@" > "{records}/arguments"\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    config = RealExecutorConfig(service_root, launcher_python=str(wrapper))
    async with open_local_replicas(service_root, CONTRIBUTION, executor_config=config) as local:
        spec = run_once("env-1", ("python3", "behave.py", "env", "MARKER"), {"MARKER": "set-by-the-service"})
        output = await run_to_the_end(local, spec, behave_bundle)
    assert "MARKER=set-by-the-service" in output
    launcher_environment = (records / "environment").read_text()
    assert "MARKER" not in launcher_environment and "set-by-the-service" not in launcher_environment
    assert "PATH=" in launcher_environment
    assert "set-by-the-service" not in (records / "arguments").read_text()  # /proc/PID/cmdline is public


@needs_root
@needs_cc
async def test_ld_preload_in_a_services_environment_never_runs_as_root(service_root, behave_bundle):
    """The attack of the hardening issue: a library shipped in the bundle, named by LD_PRELOAD,
    ran inside the launcher as uid 0. It now loads only into the service, after the drop."""
    service = service_dir(service_root, "preloading", ["python3", "behave.py", "exit", "0"])
    compiled = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(service / "preload.so"), "-x", "c", "-"],
                              input=PRELOAD_C.encode(), capture_output=True, check=False)  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr.decode()
    records = service_root / "records"
    records.mkdir()
    records.chmod(0o777)  # the service's uid records itself here too
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        library = local.executor.replica_dir("preload-1") / "app" / "preload.so"
        env = {"LD_PRELOAD": str(library), "PRELOAD_RECORDS": str(records)}
        spec = run_once("preload-1", ("python3", "behave.py", "exit", "0"), env)
        output = await run_to_the_end(local, spec, pack_directory(service))
    assert "exiting with code 0" in output
    uids = {int(name.removeprefix("ran-as-uid-")) for name in os.listdir(records)}
    assert 0 not in uids, "the bundled library ran as root"
    assert len(uids) == 1  # it did load, into the service, as the service's own uid


async def wait_until_running(client, address, replica_id) -> StatusReply:
    with trio.fail_after(BOUND_S):
        while True:
            reply = await client.remote_query(address, replica_id)
            assert isinstance(reply, StatusReply), reply
            assert reply.state in ("installing", "starting", "running"), reply
            if reply.state == "running":
                return reply
            await trio.sleep(0.05)


async def test_a_manifest_that_sets_ld_preload_is_refused_by_a_node_naming_the_variable(service_root):
    service = service_dir(service_root, "preloading", ["python3", "behave.py", "serve"],
                          env={"LD_PRELOAD": "./preload.so"})  # fmt: skip
    contribution = Contribution(trusted_keys=frozenset({DEPLOYER.public_key}))
    async with (
        open_node(data_dir=service_root / "node", contribution=contribution) as node,
        open_node(identity=DEPLOYER, layers=client_layers) as deployer,
    ):
        reply = await deployer.remote_start(node.address, "preloading-1", signed(service))
        assert isinstance(reply, Refused), reply
        assert reply.check == "bundle"
        assert "env.LD_PRELOAD changes how the dynamic loader" in reply.reason
        assert node.hosted_replicas() == []
