"""The executor contract, written once and run against the real and the simulated executor.

Each test drives an executor through commands and reads its reports; the real one runs
``examples/behave/behave.py`` as confined subprocesses, the simulated one plays the same
service from its ``SimulatedBehaviour`` on virtual time.
"""

import io
import tarfile

import pytest

from p2pdeploy.fabric.executor import (
    REASON_KILLED,
    REASON_MEMORY,
    REASON_TERM,
    HealthCheck,
    HealthResult,
    InstallBundle,
    Installed,
    Limits,
    LogPolicy,
    ProcessExited,
    ProcessFailedToStart,
    ProcessStarted,
    Removed,
    RemoveReplica,
    RunHealthCheck,
    SignalProcess,
    StartProcess,
)
from p2pdeploy.runtime.executor import RealExecutorConfig, open_executor

from .harness import RealHarness, SimHarness

MIB = 1024 * 1024
TCP = HealthCheck(kind="tcp", timeout_s=1.0)


@pytest.fixture(params=["real", "sim"])
async def harness(request, service_root):
    if request.param == "sim":
        yield SimHarness()
        return
    real = RealHarness()
    async with open_executor(RealExecutorConfig(service_root), real.sink) as executor:
        real.executor = executor
        yield real


async def installed(harness, bundle, replica_id="r1"):
    harness.execute(InstallBundle(replica_id, bundle))
    report = await harness.wait_for(lambda r: isinstance(r, Installed) and r.replica_id == replica_id)
    assert report.ok, report.reason


async def started(harness, spec):
    harness.execute(StartProcess(spec))
    report = await harness.wait_for(
        lambda r: isinstance(r, ProcessStarted | ProcessFailedToStart) and r.run == spec.run and r.replica_id == spec.replica_id
    )
    assert isinstance(report, ProcessStarted), report
    return report


async def healthy(harness, replica_id, run, port, timeout_s=15.0):
    """Check until a check passes (each check is a command; the harness waits for its result)."""
    async def one_check():
        before = len(harness.reports)
        harness.execute(RunHealthCheck(replica_id, run, TCP, port))
        return await harness.wait_for(lambda r: isinstance(r, HealthResult) and r.run == run, since=before)

    results = []

    async def passes():
        result = await one_check()
        results.append(result)
        return result.ok

    for _ in range(int(timeout_s / 0.1)):
        if await passes():
            return results[-1]
        await harness.wait_until(lambda: False, 0.1)
    raise AssertionError(f"never healthy: {results[-3:]}")


def exits(harness, run=1, replica_id="r1"):
    return [r for r in harness.reports if isinstance(r, ProcessExited) and r.run == run and r.replica_id == replica_id]


async def test_a_started_service_reports_its_pid_and_port_then_passes_its_health_check(harness, behave_bundle):
    await installed(harness, behave_bundle)
    start = await started(harness, harness.spec("serve"))
    assert start.pid > 0 and start.port is not None
    result = await healthy(harness, "r1", 1, start.port)
    assert result.ok
    assert harness.executor.replicas() == ("r1",)
    assert harness.alive_pids("r1")


async def test_an_exit_is_reported_once_with_its_code(harness, behave_bundle):
    await installed(harness, behave_bundle)
    await started(harness, harness.spec("exit", "3", "0.2"))
    exited = await harness.wait_for(lambda r: isinstance(r, ProcessExited))
    assert (exited.code, exited.signal, exited.reason) == (3, None, "exited with code 3")
    assert not exited.clean
    harness.execute(RunHealthCheck("r1", 1, TCP, None))
    await harness.wait_for(lambda r: isinstance(r, HealthResult))
    assert len(exits(harness)) == 1


async def test_term_stops_a_service_that_honours_it(harness, behave_bundle):
    await installed(harness, behave_bundle)
    start = await started(harness, harness.spec("serve"))
    await healthy(harness, "r1", 1, start.port)
    harness.execute(SignalProcess("r1", 1, "TERM"))
    exited = await harness.wait_for(lambda r: isinstance(r, ProcessExited))
    assert (exited.signal, exited.reason) == ("TERM", REASON_TERM)
    assert await harness.wait_until(lambda: not harness.alive_pids("r1"), 5)


async def test_a_service_that_ignores_term_survives_it_and_kill_ends_it(harness, behave_bundle):
    await installed(harness, behave_bundle)
    start = await started(harness, harness.spec("ignore-term"))
    await healthy(harness, "r1", 1, start.port)
    harness.execute(SignalProcess("r1", 1, "TERM"))
    assert await harness.stays_false(lambda: bool(exits(harness)), 0.5)
    harness.execute(SignalProcess("r1", 1, "KILL"))
    exited = await harness.wait_for(lambda r: isinstance(r, ProcessExited))
    assert (exited.code, exited.signal, exited.reason) == (None, "KILL", REASON_KILLED)
    assert await harness.wait_until(lambda: not harness.alive_pids("r1"), 5)


async def test_a_service_over_its_memory_limit_dies_of_memory_limit(harness, behave_bundle):
    await installed(harness, behave_bundle)
    await started(harness, harness.spec("hog", limits=Limits(memory_bytes=64 * MIB, processes=64)))
    exited = await harness.wait_for(lambda r: isinstance(r, ProcessExited), timeout_s=30)
    assert exited.reason == REASON_MEMORY


async def test_a_bundle_with_a_path_leaving_its_directory_is_not_installed(harness):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for name in ("manifest.toml", "../evil.sh"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"x=1"))
    harness.execute(InstallBundle("r1", raw.getvalue()))
    report = await harness.wait_for(lambda r: isinstance(r, Installed))
    assert not report.ok
    assert "'../evil.sh'" in report.reason and "escapes" in report.reason


async def test_starting_a_replica_that_is_not_installed_fails_to_start(harness):
    harness.execute(StartProcess(harness.spec("serve", replica_id="ghost")))
    report = await harness.wait_for(lambda r: isinstance(r, ProcessFailedToStart))
    assert (report.replica_id, report.reason) == ("ghost", "not installed")


async def test_a_health_check_of_a_finished_run_fails(harness, behave_bundle):
    await installed(harness, behave_bundle)
    await started(harness, harness.spec("exit", "0"))
    await harness.wait_for(lambda r: isinstance(r, ProcessExited))
    harness.execute(RunHealthCheck("r1", 1, TCP, None))
    result = await harness.wait_for(lambda r: isinstance(r, HealthResult))
    assert (result.ok, result.detail) == (False, "not running")


async def test_a_signal_for_a_finished_run_is_ignored(harness, behave_bundle):
    await installed(harness, behave_bundle)
    await started(harness, harness.spec("exit", "0"))
    await harness.wait_for(lambda r: isinstance(r, ProcessExited))
    harness.execute(SignalProcess("r1", 1, "KILL"))
    assert await harness.stays_false(lambda: len(exits(harness)) > 1, 0.3)


async def test_each_run_is_reported_apart_from_the_ones_before(harness, behave_bundle):
    await installed(harness, behave_bundle)
    first_start = await started(harness, harness.spec("exit", "1"))
    first = await harness.wait_for(lambda r: isinstance(r, ProcessExited) and r.run == 1)
    second = await started(harness, harness.spec("serve", run=2))
    await healthy(harness, "r1", 2, second.port)
    assert first.reason == "exited with code 1"
    assert second.port == first_start.port  # clients find a restarted replica where it was
    assert not exits(harness, run=2)


async def test_logs_hold_the_output_and_stop_growing_at_their_cap(harness, behave_bundle):
    policy = LogPolicy(max_bytes=16 * 1024, files=2)
    await installed(harness, behave_bundle)
    start = await started(harness, harness.spec("chatter", "300000", logs=policy))
    await healthy(harness, "r1", 1, start.port)  # it serves once everything is printed
    cap = policy.max_bytes * policy.files
    assert await harness.wait_until(lambda: len(harness.executor.read_logs("r1", 10 * cap)) >= policy.max_bytes, 5)
    logs = harness.executor.read_logs("r1", 10 * cap)
    assert policy.max_bytes <= len(logs) <= cap
    assert logs.endswith(b"\n") and b"xxxx" in logs
    assert len(harness.executor.read_logs("r1", 100)) == 100


async def test_removing_a_replica_kills_its_process_and_forgets_it(harness, behave_bundle):
    await installed(harness, behave_bundle)
    start = await started(harness, harness.spec("serve"))
    await healthy(harness, "r1", 1, start.port)
    harness.execute(RemoveReplica("r1"))
    await harness.wait_for(lambda r: isinstance(r, Removed))
    exited = exits(harness)
    assert len(exited) == 1 and exited[0].reason == REASON_KILLED
    assert harness.executor.replicas() == ()
    assert harness.executor.usage("r1") is None
    assert not harness.alive_pids("r1")
