"""Real services under real limits: the acceptance tests of the sandbox, on this machine.

Each test runs ``examples/behave/behave.py`` through the whole stack a node uses (a
supervisor in a ReplicaHost, driven with the real executor) and checks what the user sees.
Tests name the mechanism they exercise; those that need a cgroup controller this machine
does not let us write are skipped, never silently passed. Every test ends with the executor
closing, which kills and reaps whatever the replicas left.
"""

import contextlib
import os
import re
import time
from pathlib import Path

import psutil
import pytest
import trio

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import ANY, Contribution
from p2pdeploy.fabric.executor import HealthCheck, Limits, LogPolicy, ProcessSpec
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaState, RestartPolicy
from p2pdeploy.runtime.exec_local import open_local_replicas
from p2pdeploy.runtime.executor import RealExecutorConfig, open_executor
from p2pdeploy.runtime.sandbox import detect_cgroups

MIB = 1024 * 1024
SUPPORT = detect_cgroups()
CONTRIBUTION = Contribution(cpu_cores=2, memory_bytes=4096 * MIB, max_services=8, trusted_keys=ANY)


def needs_cgroup(controller):
    return pytest.mark.skipif(
        SUPPORT.mechanism(controller) is None,
        reason=f"no writable {controller} cgroup here ({SUPPORT.describe()})",
    )


def behave(replica_id, mode, *args, limits=None, health=None, restart="never", grace_s=0.5, logs=None):
    process = ProcessSpec(
        replica_id,
        1,
        ("python3", "behave.py", mode, *args),
        limits=limits or Limits(memory_bytes=256 * MIB, processes=64),
        logs=logs or LogPolicy(),
    )
    return ReplicaSpec(process, health or HealthCheck(kind="none"), RestartPolicy(mode=restart), stop_grace_s=grace_s)


def start(local, spec, bundle):
    refusal = local.command(lambda core, now: local.host.start_replica(spec, Demand(), now, bundle=bundle))
    assert refusal is None, refusal


def stop(local, replica_id):
    local.command(lambda core, now: local.host.stop_replica(replica_id, now))


async def node_still_works():
    """The node (this test process) can still start a process and use memory."""
    result = await trio.run_process(["true"])
    assert result.returncode == 0
    assert len(bytearray(32 * MIB)) == 32 * MIB


async def assert_memory_hog_fails_with_memory_limit(local, behave_bundle):
    start(local, behave("hog", "hog", limits=Limits(memory_bytes=64 * MIB, processes=64)), behave_bundle)
    await local.wait_for_state("hog", ReplicaState.FAILED, timeout_s=30)
    assert str(local.host.status("hog")) == "failed: memory limit"
    assert b"allocated 2 GB" not in local.executor.read_logs("hog", 100_000)
    # the node stays up: it still runs another service next to the failed one
    start(local, behave("neighbour", "serve", health=HealthCheck(kind="http", interval_s=0.2)), behave_bundle)
    await local.wait_for_state("neighbour", ReplicaState.RUNNING)
    await node_still_works()


@needs_cgroup("memory")
async def test_a_memory_hog_is_killed_by_its_memory_cgroup_and_reported_failed_memory_limit(service_root, behave_bundle):
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        await assert_memory_hog_fails_with_memory_limit(local, behave_bundle)
        assert any(e.startswith("memory: cgroup") for e in local.executor.usage("hog").enforced)


async def test_a_memory_hog_is_stopped_by_rlimit_as_without_cgroups_and_reported_failed_memory_limit(
    service_root, behave_bundle
):
    config = RealExecutorConfig(service_root, use_cgroups=False)
    async with open_local_replicas(service_root, CONTRIBUTION, executor_config=config) as local:
        await assert_memory_hog_fails_with_memory_limit(local, behave_bundle)
        assert "memory: rlimit-as" in local.executor.usage("hog").enforced
        assert b"MemoryError" in local.executor.read_logs("hog", 100_000)


async def run_fork_bomb(local, behave_bundle, sample):
    """Start a 3-second fork bomb limited to 20 processes; return its output and the largest sample."""
    start(local, behave("bomb", "bomb", "3", limits=Limits(memory_bytes=512 * MIB, processes=20)), behave_bundle)
    largest = 0
    with trio.fail_after(60):
        while local.host.status("bomb").state is not ReplicaState.STOPPED:
            largest = max(largest, sample())
            await node_still_works()
            await trio.sleep(0.1)
    return local.executor.read_logs("bomb", 1_000_000).decode(), largest


@needs_cgroup("pids")
async def test_a_fork_bomb_is_contained_by_the_pids_cgroup(service_root, behave_bundle):
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        output, largest = await run_fork_bomb(local, behave_bundle, lambda: len(local.executor.pids("bomb")))
        usage = local.executor.usage("bomb")
    assert "fork failed" in output
    # Forks are counted over the whole run: on a loaded machine some bombers reach their deadline
    # and exit while others still fork into the freed slots, so the limit is on processes at once.
    assert output.count("+") >= 1
    assert largest <= 20
    assert usage.peak_processes is not None and usage.peak_processes <= 20
    assert "processes: cgroup-v1" in usage.enforced or "processes: cgroup-v2" in usage.enforced


def gone(pid):
    """True when ``pid`` no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_processes_of(uid):
    """Processes (not zombies) whose real uid is ``uid``, with their command lines."""
    found = {}
    for process in psutil.process_iter(["uids", "status", "cmdline"]):
        info = process.info
        if info["uids"] is not None and info["uids"].real == uid and info["status"] != psutil.STATUS_ZOMBIE:
            found[process.pid] = " ".join(info["cmdline"] or ())
    return found


def unused_uid(start):
    """The first of ``start``, ``start + 1000``, ... that no process runs as (another run of the
    suite on this machine may be using the first)."""
    for uid in range(start, start + 100_000, 1000):
        if not live_processes_of(uid):
            return uid
    pytest.fail(f"every uid tried from {start} on is in use on this machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root node gives each replica a uid of its own")
async def test_a_fork_bomb_is_contained_by_rlimit_nproc_under_a_uid_of_its_own(service_root, behave_bundle):
    # No cgroups: RLIMIT_NPROC alone, which counts per real uid, so the replica gets its own uid
    uid = unused_uid(991_000)
    config = RealExecutorConfig(service_root, use_cgroups=False, service_uid_range=(uid, uid))
    before = set(live_processes_of(uid))

    def processes_of_the_service_uid():
        return len(set(live_processes_of(uid)) - before)

    try:
        async with open_local_replicas(service_root, CONTRIBUTION, executor_config=config) as local:
            output, largest = await run_fork_bomb(local, behave_bundle, processes_of_the_service_uid)
            usage = local.executor.usage("bomb")
    finally:  # belt and braces: nothing this test started may survive it (killed by pid)
        for pid, cmdline in live_processes_of(uid).items():
            if pid not in before and "behave.py" in cmdline:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
    assert "fork failed" in output
    assert output.count("+") >= 1
    assert largest <= 20
    assert any(e.startswith("processes: rlimit-nproc") for e in usage.enforced)
    assert processes_of_the_service_uid() == 0


async def test_a_stopped_replicas_files_are_removed_when_the_owners_retention_period_ends(service_root, behave_bundle):
    contribution = Contribution(cpu_cores=2, memory_bytes=4096 * MIB, trusted_keys=ANY, retention_s=3)
    async with open_local_replicas(service_root, contribution) as local:
        start(local, behave("job", "fill", str(4 * MIB)), behave_bundle)
        directory = local.executor.replica_dir("job")
        with trio.fail_after(60):
            while (status := local.host.status("job")) is not None and status.state is not ReplicaState.STOPPED:
                await trio.sleep(0.05)
            assert status is not None, "removed before the test saw it stop (a machine too loaded for 3 s)"
            assert (directory / "data" / "fill").stat().st_size == 4 * MIB
            while directory.exists() or local.host.status("job") is not None:
                await trio.sleep(0.05)
        assert local.host.admission.retained == {}


async def test_a_replica_whose_files_outgrow_its_disk_reservation_is_stopped_with_both_sizes(service_root, behave_bundle):
    config = RealExecutorConfig(service_root, disk_check_interval_s=0.2)
    limits = Limits(memory_bytes=256 * MIB, processes=64, disk_bytes=1 * MIB)
    process = ProcessSpec("filler", 1, ("python3", "behave.py", "fill", str(3 * MIB), "serve"), limits=limits)
    restart = RestartPolicy(mode="on-failure", backoff_initial_s=0.1, max_restarts=1)
    spec = ReplicaSpec(process, HealthCheck(kind="none"), restart, stop_grace_s=0.5)
    async with open_local_replicas(service_root, CONTRIBUTION, executor_config=config) as local:
        start(local, spec, behave_bundle)
        with trio.fail_after(60):
            while not ((status := local.host.status("filler")) and local.host.admission.retained):
                await trio.sleep(0.05)  # until it failed for good and gave back all but its disk
        over = r"disk: the replica's files take 3\.\d MiB, it reserved 1 MiB"
        states = local.states("filler")
        assert states[:3] == ["installing", "starting", "running: process started"], states
        assert re.fullmatch("failed: " + over, states[3]), states  # killed for its files
        # its restart is refused (it never runs) while they still take too much
        assert states[4] == "starting: restart 1" and len(states) == 6, states
        assert re.fullmatch(over + "; gave up after 1 restarts in 300 s", status.reason), status.reason
        assert 3 * MIB <= local.executor.usage("filler").disk_bytes < 4 * MIB


def left_by_an_earlier_run(replicas_dir, replica_id, size_bytes, ended_s_ago):
    """A replica directory as a node leaves it: its app, data and logs, last in use ``ended_s_ago``."""
    directory = replicas_dir / replica_id
    for part in ("app", "data", "logs"):
        (directory / part).mkdir(parents=True)
    (directory / "data" / "kept").write_bytes(b"x" * size_bytes)
    (directory / "logs" / "service.log").write_bytes(b"bye\n")
    then = time.time() - ended_s_ago
    for path in (directory / "logs" / "service.log", directory / "logs", directory):
        os.utime(path, (then, then))
    return directory


async def test_a_restarted_node_counts_the_files_an_earlier_run_left_and_removes_them_when_their_retention_ends(
    service_root, behave_bundle
):
    contribution = Contribution(cpu_cores=2, memory_bytes=4096 * MIB, disk_bytes=1024 * MIB, trusted_keys=ANY,
                                retention_s=3600)  # fmt: skip
    async with open_local_replicas(service_root, contribution) as local:  # the earlier run
        start(local, behave("job", "fill", str(4 * MIB)), behave_bundle)
        await local.wait_for_state("job", ReplicaState.STOPPED)
    job = service_root / "replicas" / "job"
    old = left_by_an_earlier_run(service_root / "replicas", "old", MIB, ended_s_ago=2 * 3600)
    recent = left_by_an_earlier_run(service_root / "replicas", "recent", 2 * MIB, ended_s_ago=3600 - 4)

    async with open_local_replicas(service_root, contribution) as local:  # the node again
        admission = local.host.admission
        with trio.fail_after(30):
            while "job" not in admission.retained:
                await trio.sleep(0.02)
        # counted against the contribution's disk: "job" for an hour, "recent" for 4 s more
        assert 4 * MIB <= admission.retained["job"] < 5 * MIB and 2 * MIB <= admission.retained["recent"] < 3 * MIB
        assert admission.free().disk_bytes == 1024 * MIB - sum(admission.retained.values())
        with trio.fail_after(30):
            while old.exists() or recent.exists():
                await trio.sleep(0.05)  # "old" went at once, "recent" when its hour was over
        assert set(admission.retained) == {"job"} and job.exists()
        assert local.host.next_deadline() > trio.current_time() + 3000


async def test_a_service_that_ignores_term_is_killed_after_the_grace_period(service_root, behave_bundle):
    health = HealthCheck(kind="tcp", interval_s=0.2)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        start(local, behave("stubborn", "ignore-term", health=health, grace_s=0.5), behave_bundle)
        await local.wait_for_state("stubborn", ReplicaState.RUNNING)
        pid = local.host.status("stubborn").pid
        asked = trio.current_time()
        stop(local, "stubborn")
        await local.wait_for_state("stubborn", ReplicaState.STOPPED)
        waited = trio.current_time() - asked
        assert str(local.host.status("stubborn")) == "stopped: killed after the 0.5 s grace period"
        assert local.states("stubborn")[-2:] == ["stopping: stop requested", "stopped: killed after the 0.5 s grace period"]
        assert waited >= 0.5
        assert gone(pid)
        assert local.executor.pids("stubborn") == set()


@needs_cgroup("pids")
async def test_a_process_that_left_the_process_group_dies_with_its_service(service_root, behave_bundle):
    health = HealthCheck(kind="tcp", interval_s=0.2)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        start(local, behave("escaper", "escape", health=health), behave_bundle)
        await local.wait_for_state("escaper", ReplicaState.RUNNING)
        with trio.fail_after(30):
            while b"escaped child" not in local.executor.read_logs("escaper", 10_000):
                await trio.sleep(0.02)
        escaped = int(re.search(rb"escaped child (\d+)", local.executor.read_logs("escaper", 10_000)).group(1))
        assert psutil.pid_exists(escaped) and os.getpgid(escaped) != local.host.status("escaper").pid
        stop(local, "escaper")
        await local.wait_for_state("escaper", ReplicaState.STOPPED)
        with trio.fail_after(30):
            while not gone(escaped):
                await trio.sleep(0.02)


async def test_logs_rotate_and_stop_growing_at_their_cap(service_root, behave_bundle):
    policy = LogPolicy(max_bytes=64 * 1024, files=2)
    health = HealthCheck(kind="tcp", interval_s=0.2)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        start(local, behave("chatty", "chatter", str(2 * MIB), health=health, logs=policy), behave_bundle)
        await local.wait_for_state("chatty", ReplicaState.RUNNING)  # serving: all 2 MiB are written
        logs = service_root / "replicas" / "chatty" / "logs"
        names = sorted(p.name for p in logs.iterdir())
        sizes = [p.stat().st_size for p in logs.iterdir()]
        assert names == ["service.log", "service.log.1"]
        assert all(size <= policy.max_bytes for size in sizes)
        assert sum(sizes) <= policy.max_bytes * policy.files


async def test_rlimit_cpu_ends_a_service_that_uses_more_cpu_time_than_it_asked_for(service_root, behave_bundle):
    limits = Limits(memory_bytes=256 * MIB, processes=16, cpu_time_s=1)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        # It spins for up to 30 s of wall time: long enough to use its 1 s of CPU on a loaded machine.
        start(local, behave("spinner", "spin", "30", limits=limits), behave_bundle)
        await local.wait_for_state("spinner", ReplicaState.FAILED, timeout_s=60)
        assert str(local.host.status("spinner")) == "failed: cpu time limit"


async def test_rlimit_fsize_ends_a_service_that_writes_a_file_over_its_limit(service_root, behave_bundle):
    limits = Limits(memory_bytes=256 * MIB, processes=16, file_size_bytes=1 * MIB)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        start(local, behave("filler", "fill", str(8 * MIB), limits=limits), behave_bundle)
        await local.wait_for_state("filler", ReplicaState.FAILED)
        assert str(local.host.status("filler")) == "failed: file size limit"
        assert (service_root / "replicas" / "filler" / "data" / "fill").stat().st_size <= MIB


@needs_cgroup("cpu")
async def test_the_cpu_cgroup_holds_a_service_to_its_share_of_cores(service_root, behave_bundle):
    limits = Limits(memory_bytes=256 * MIB, processes=16, cpu_cores=0.2)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        start(local, behave("spinner", "spin", "1.0", limits=limits), behave_bundle)
        await local.wait_for_state("spinner", ReplicaState.STOPPED)
        used = float(re.search(rb"cpu (\d+\.\d+)", local.executor.read_logs("spinner", 1000)).group(1))
    assert used < 0.5  # a second of spinning, at most a fifth of a core (plus start-up)


async def test_a_command_that_does_not_exist_fails_with_that_reason(service_root, behave_bundle):
    process = ProcessSpec("typo", 1, ("no-such-program-p2pdeploy", "--serve"))
    spec = ReplicaSpec(process, HealthCheck(), RestartPolicy(mode="never"))
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        start(local, spec, behave_bundle)
        await local.wait_for_state("typo", ReplicaState.FAILED)
        assert str(local.host.status("typo")) == "failed: cannot run 'no-such-program-p2pdeploy': command not found"


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root node switches services to another user")
async def test_a_data_directory_the_service_user_cannot_enter_is_refused_with_a_reason(tmp_path, behave_bundle):
    async with open_local_replicas(tmp_path, CONTRIBUTION) as local:
        start(local, behave("r1", "serve"), behave_bundle)
        await local.wait_for_state("r1", ReplicaState.FAILED)
        reason = local.host.status("r1").reason
    assert reason.startswith("install: /") and "cannot be entered by the service user (uid" in reason


async def test_the_hello_example_serves_http_and_passes_its_http_and_command_health_checks(service_root, hello_bundle):
    from p2pdeploy.resource.bundle import Bundle

    manifest = Bundle.parse(hello_bundle).manifest
    spec = manifest.replica_spec("hello-1")
    command_check = HealthCheck(kind="command", argv=("python3", "-c", "import os; assert os.environ['PORT']"), interval_s=0.2)
    async with open_local_replicas(service_root, CONTRIBUTION) as local:
        refusal = local.command(lambda core, now: local.host.start_replica(spec, manifest.demand(), now, bundle=hello_bundle))
        assert refusal is None
        await local.wait_for_state("hello-1", ReplicaState.RUNNING)
        port = local.host.status("hello-1").port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some(4096):
            response += chunk
        assert b"hello from p2pdeploy (replica hello-1, visit 1)" in response
        spec2 = ReplicaSpec(
            ProcessSpec("hello-2", 1, manifest.command, env=dict(manifest.env), limits=manifest.limits()),
            command_check,
            RestartPolicy(mode="never"),
        )
        assert local.command(lambda core, now: local.host.start_replica(spec2, Demand(), now, bundle=hello_bundle)) is None
        await local.wait_for_state("hello-2", ReplicaState.RUNNING)
        stop(local, "hello-1")
        stop(local, "hello-2")
        await local.wait_for_state("hello-1", ReplicaState.STOPPED)
        await local.wait_for_state("hello-2", ReplicaState.STOPPED)
        assert b"SIGTERM: shutting down" in local.executor.read_logs("hello-1", 10_000)


@needs_cgroup("pids")
async def test_what_a_node_that_died_left_running_is_killed_when_the_next_executor_starts(service_root):
    parent = SUPPORT.v2_dir if SUPPORT.mechanism("pids") == "cgroup-v2" else SUPPORT.v1_dirs["pids"]
    directory = os.path.join(parent, "p2pdeploy-99999999-orphan-1")  # no process has pid 99999999
    os.mkdir(directory)
    orphan = await trio.lowlevel.open_process(["sh", "-c", f"echo $$ > {directory}/cgroup.procs && exec sleep 60"])
    try:
        with trio.fail_after(30):
            while str(orphan.pid) not in Path(directory, "cgroup.procs").read_text().split():
                await trio.sleep(0.01)
        async with open_executor(RealExecutorConfig(service_root), lambda report: None):
            pass
        with trio.fail_after(30):
            assert await orphan.wait() == -9
        assert not os.path.exists(directory)
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()
        with contextlib.suppress(OSError):
            os.rmdir(directory)
