"""The simulated executor under a ReplicaHost on the simulator: start delays, crashes, restarts."""

import random

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import HealthCheck, Limits, ProcessSpec, SimulatedBehaviour
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.supervisor import ReplicaSpec, ReplicaState, ReplicaStateChanged, RestartPolicy
from p2pdeploy.resource.bundle import pack_files
from p2pdeploy.sim.engine import Engine
from p2pdeploy.sim.executor import SimExecutorConfig, serve_node
from p2pdeploy.sim.host import SimNode

BUNDLE = pack_files({"manifest.toml": b'name = "web"\nversion = "1"\ncommand = ["serve"]\n'})
TCP = HealthCheck(kind="tcp", interval_s=1.0, start_interval_s=0.25, start_period_s=60)
RESTART = RestartPolicy(mode="on-failure", backoff_initial_s=1, backoff_max_s=10, max_restarts=1000, window_s=60)


def simulate(seed, *, crash_rate_per_s=0.0, behaviour=None, until=600.0, replicas=3):
    engine = Engine()
    events = []
    node = SimNode(0, engine, network=None, observer=lambda address, event: events.append((engine.now, event)))
    host = ReplicaHost(Contribution(cpu_cores=8, max_services=8), random.Random(seed))
    node.start(host)
    executor = serve_node(node, random.Random(seed), SimExecutorConfig(crash_rate_per_s=crash_rate_per_s))
    for index in range(replicas):
        spec = ReplicaSpec(ProcessSpec(f"web-{index}", 1, ("serve",), simulated=behaviour), TCP, RESTART)
        refusal = node.call(lambda core, now, spec=spec: core.start_replica(spec, Demand(cpu_cores=1), now, bundle=BUNDLE))
        assert refusal is None
    engine.run(until=until)
    changes = [(at, e) for at, e in events if isinstance(e, ReplicaStateChanged)]
    return host, executor, changes, engine.trace_hash


def test_a_replica_becomes_running_only_after_its_simulated_start_delay():
    host, _, changes, _ = simulate(1, behaviour=SimulatedBehaviour(start_delay_s=5.0), until=30, replicas=1)
    running_at = [at for at, e in changes if e.new is ReplicaState.RUNNING]
    assert len(running_at) == 1 and 5.0 <= running_at[0] <= 5.5
    assert host.status("web-0").state is ReplicaState.RUNNING


def test_crashes_drawn_from_the_seed_are_restarted_by_the_supervisor():
    host, _, changes, _ = simulate(2, crash_rate_per_s=1 / 60)
    crashes = [e for _, e in changes if e.new is ReplicaState.FAILED]
    assert crashes and all(e.reason == "crashed (simulated)" for e in crashes)
    assert sum(s.restarts for s in host.statuses()) == len(crashes)
    assert all(s.state in (ReplicaState.RUNNING, ReplicaState.STARTING, ReplicaState.FAILED) for s in host.statuses())


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    first = simulate(3, crash_rate_per_s=1 / 30)
    again = simulate(3, crash_rate_per_s=1 / 30)
    other = simulate(4, crash_rate_per_s=1 / 30)
    assert [(at, e) for at, e in first[2]] == [(at, e) for at, e in again[2]]
    assert first[3] == again[3]
    assert first[2] != other[2]


def test_a_modelled_memory_hog_fails_with_memory_limit_and_is_not_restarted_by_policy_never():
    engine = Engine()
    node = SimNode(0, engine, network=None)
    host = ReplicaHost(Contribution(cpu_cores=1))
    node.start(host)
    serve_node(node, random.Random(0))
    hog = SimulatedBehaviour(start_delay_s=1, memory_peak_bytes=2**31)
    process = ProcessSpec("hog", 1, ("hog",), limits=Limits(memory_bytes=2**26), simulated=hog)
    spec = ReplicaSpec(process, TCP, RestartPolicy(mode="never"))
    node.call(lambda core, now: core.start_replica(spec, Demand(), now, bundle=BUNDLE))
    engine.run(until=10)
    assert str(host.status("hog")) == "failed: memory limit"
    assert host.admission.reservations == {}
