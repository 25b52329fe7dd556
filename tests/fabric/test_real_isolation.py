"""Services cannot reach root, nor each other: the launcher's environment and a uid per replica.

Attacks tried on real processes: a service's environment that would load a library into the
launcher while it is still root (``LD_PRELOAD``), and a service that reads another's
``/proc/PID/environ`` (its state token), lists its directory, or opens the node's store and key.
Tests that need root (switching users) skip elsewhere, saying why; every process is killed when
its executor or node closes.
"""

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trio

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import ANY, Contribution
from p2pdeploy.fabric.executor import (
    HealthCheck,
    InstallBundle,
    Installed,
    Limits,
    ProcessSpec,
    Removed,
    RemoveReplica,
)
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaState, RestartPolicy
from p2pdeploy.node import client_layers
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.resource.bundle import SignedBundle, sign_bundle
from p2pdeploy.resource.protocol import Refused, StatusReply
from p2pdeploy.runtime.bundlefile import pack_directory
from p2pdeploy.runtime.exec_local import open_local_replicas
from p2pdeploy.runtime.executor import DEFAULT_SERVICE_UIDS, RealExecutor, RealExecutorConfig, open_executor
from p2pdeploy.runtime.node import open_node
from tests.runtime.test_runtime_replicas import wait_until_running

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
    (uid,) = uids  # it did load, into the service, as the service's own uid
    assert DEFAULT_SERVICE_UIDS[0] <= uid <= DEFAULT_SERVICE_UIDS[1]


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


# -- a uid per replica ---------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@needs_root
async def test_a_service_cannot_read_another_services_environment_files_or_the_nodes_store(service_root):
    """Two services on one root node: the second tries to read the first's /proc/PID/environ
    (which holds its state token), to list its directory and data, and to open the node's store
    and key. Every attempt fails with a permission error; what is its own it reads."""
    contribution = Contribution(trusted_keys=frozenset({DEPLOYER.public_key}))
    data_dir = service_root / "node"
    async with (
        open_node(data_dir=data_dir, contribution=contribution) as node,
        open_node(identity=DEPLOYER, layers=client_layers) as deployer,
    ):
        victim = service_dir(service_root, "victim", ["python3", "behave.py", "serve"])
        assert isinstance(await deployer.remote_start(node.address, "victim-1", signed(victim)), StatusReply)
        await wait_until_running(deployer, node.address, "victim-1")
        victim_pid = node.executor.usage("victim-1").pid
        assert b"P2PDEPLOY_STATE_TOKEN=" in Path(f"/proc/{victim_pid}/environ").read_bytes()
        victim_dir = node.executor.replica_dir("victim-1")
        spy_dir = node.executor.replica_dir("spy-1")
        theirs = [f"/proc/{victim_pid}/environ", str(victim_dir), str(victim_dir / "data"),
                  str(data_dir / "persistence" / "store.sqlite3"), str(data_dir / "identity.key"), str(data_dir)]
        own = ["/proc/self/environ", str(spy_dir / "data"), str(spy_dir / "app" / "behave.py")]
        spy = service_dir(service_root, "spy", ["python3", "behave.py", "peek", *theirs, *own])  # fmt: skip
        assert isinstance(await deployer.remote_start(node.address, "spy-1", signed(spy)), StatusReply)
        await wait_until_running(deployer, node.address, "spy-1")
        output = node.executor.read_logs("spy-1", 100_000).decode()
        spy_pid = node.executor.usage("spy-1").pid
        uids = {psutil.Process(pid).uids().real for pid in (victim_pid, spy_pid)}

        for path in theirs:
            assert f"peek {path}: PermissionError" in output, output
        for path in own:
            assert f"peek {path}: ok" in output, output
        assert len(uids) == 2 and all(DEFAULT_SERVICE_UIDS[0] <= uid <= DEFAULT_SERVICE_UIDS[1] for uid in uids)
        # what keeps them apart, as modes
        assert mode_of(data_dir) == 0o711 and mode_of(data_dir / "persistence") == 0o700
        assert mode_of(data_dir / "persistence" / "store.sqlite3") == 0o600 and mode_of(data_dir / "identity.key") == 0o600
        assert mode_of(node.executor.root) == 0o711
        assert mode_of(victim_dir) == 0o710 and victim_dir.stat().st_uid == 0
        assert mode_of(victim_dir / "data") == 0o700 and (victim_dir / "data").stat().st_uid in uids


def unused_uids(count: int) -> tuple[int, int]:
    """A range of ``count`` uids no process, user or group of this machine has."""
    used = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    for first in range(993_000, 1_093_000, 1000):
        uids = range(first, first + count)
        if not any(uid in used or known_id(uid) for uid in uids):
            return first, first + count - 1
    pytest.fail("no free uids here")


def known_id(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        try:
            grp.getgrgid(uid)
        except KeyError:
            return False
    return True


async def installed(executor, reports: list, replica_id: str, bundle: bytes) -> Installed:
    since = len(reports)
    executor.execute(InstallBundle(replica_id, bundle))
    with trio.fail_after(BOUND_S):
        while True:
            found = [r for r in reports[since:] if isinstance(r, Installed) and r.replica_id == replica_id]
            if found:
                return found[0]
            await trio.sleep(0.02)


def owner(path: Path) -> int:
    return path.lstat().st_uid


@needs_root
async def test_each_replica_gets_a_uid_of_its_own_which_it_keeps_across_restarts_and_frees_when_removed(
    service_root, behave_bundle
):
    first, last = unused_uids(2)
    config = RealExecutorConfig(service_root, service_uid_range=(first, last))
    reports: list = []
    async with open_executor(config, reports.append) as executor:
        for replica_id in ("a", "b"):
            assert (await installed(executor, reports, replica_id, behave_bundle)).ok
        uids = {r: owner(executor.replica_dir(r) / "data") for r in ("a", "b")}
        assert sorted(uids.values()) == [first, last]
        for replica_id, uid in uids.items():
            directory = executor.replica_dir(replica_id)
            assert (owner(directory), directory.stat().st_gid, mode_of(directory)) == (0, uid, 0o710)
            assert (owner(directory / "data"), mode_of(directory / "data")) == (uid, 0o700)
            assert owner(directory / "data" / "tmp") == uid and owner(directory / "app" / "behave.py") == 0
        refused = await installed(executor, reports, "c", behave_bundle)
        assert not refused.ok and refused.reason == f"every uid of service_uid_range {first}-{last} is in use"

    async with open_executor(config, reports.append) as executor:  # the node restarted
        assert (await installed(executor, reports, "b", behave_bundle)).ok
        assert owner(executor.replica_dir("b") / "data") == uids["b"]  # its files are its own still
        refused = await installed(executor, reports, "c", behave_bundle)
        assert not refused.ok, "a's directory still holds its uid"
        since = len(reports)
        executor.execute(RemoveReplica("a"))
        with trio.fail_after(BOUND_S):
            while not any(isinstance(r, Removed) for r in reports[since:]):
                await trio.sleep(0.02)
        assert not executor.replica_dir("a").exists()
        assert (await installed(executor, reports, "c", behave_bundle)).ok
        assert owner(executor.replica_dir("c") / "data") == uids["a"]


@needs_root
async def test_a_link_a_service_leaves_in_its_data_directory_is_not_followed_when_the_node_reinstalls_it(
    service_root, behave_bundle
):
    """A service owns its data directory and may put a link to a directory of root's where its
    ``tmp`` was; installing the replica again must not hand that directory to the service."""
    roots = service_root / "roots"
    roots.mkdir()
    reports: list = []
    async with open_executor(RealExecutorConfig(service_root), reports.append) as executor:
        assert (await installed(executor, reports, "r1", behave_bundle)).ok
        tmp = executor.replica_dir("r1") / "data" / "tmp"
        tmp.rmdir()
        tmp.symlink_to(roots)  # as the service could
        assert (await installed(executor, reports, "r1", behave_bundle)).ok
    assert owner(roots) == 0 and mode_of(roots) == 0o755


def test_a_node_that_cannot_switch_users_says_so(service_root, monkeypatch):
    executor = RealExecutor(RealExecutorConfig(service_root), lambda report: None)
    assert executor.isolation().startswith("isolation: each replica runs as a uid of its own") == (os.geteuid() == 0)
    shared = RealExecutor(RealExecutorConfig(service_root, service_uid_range=None), lambda report: None)
    if os.geteuid() == 0:
        assert "can read each other's environment (state tokens) and files" in shared.isolation()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    unprivileged = RealExecutor(RealExecutorConfig(service_root), lambda report: None)
    assert unprivileged.isolation() == (
        "isolation: none between services: they run as this node's user (uid 1000), so they can read each "
        "other's environment (state tokens) and files, and the node's; run the node as root for a uid per replica"
    )


@needs_root
async def test_a_replica_that_gets_another_uid_gets_its_files_handed_over(service_root, behave_bundle):
    before, after = unused_uids(2)
    reports: list = []
    async with open_executor(RealExecutorConfig(service_root, service_uid_range=(before, before)), reports.append) as executor:
        assert (await installed(executor, reports, "r1", behave_bundle)).ok
        data = executor.replica_dir("r1") / "data"
        (data / "kept").mkdir()
        (data / "kept" / "state").write_text("1")
        (data / "link").symlink_to("/etc/hostname")
        for path in (data / "kept", data / "kept" / "state", data / "link"):
            os.chown(path, before, before, follow_symlinks=False)  # as the service made them
    async with open_executor(RealExecutorConfig(service_root, service_uid_range=(after, after)), reports.append) as executor:
        again = await installed(executor, reports, "r1", behave_bundle)
        assert again.ok, again
    assert {owner(path) for path in (data, data / "tmp", data / "kept", data / "kept" / "state", data / "link")} == {after}
    assert owner(Path("/etc/hostname")) == 0
