"""The simulated network carries wire bytes, as a socket does: encode, decode, drop and count."""

from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest

from p2pdeploy import wire
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.ping import Ping, PingProtocol, PingTimedOut, Pong, PongReceived
from p2pdeploy.sim.network import DROP_REASONS, NetworkConfig
from p2pdeploy.sim.scenario import load_scenario, parse_scenario, run_scenario
from p2pdeploy.sim.schema import ScenarioError
from p2pdeploy.sim.simulation import Simulation

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"


class Recorder(Protocol):
    """Records what it receives; sends whatever it is told to."""

    handles = (Ping, Pong)

    def __init__(self):
        super().__init__()
        self.received = []

    def receive(self, src, msg, now):
        self.received.append((now, src, msg))


def network_of(nodes, seed=1, **config):
    sim = Simulation(nodes, seed=seed, network=NetworkConfig(latency_model="constant", **config))
    for host in sim.hosts:
        host.start(Recorder())
    return sim


def send(sim, src, dst, msg):
    sim.hosts[src].call(lambda core, now: core.send(dst, msg))


def pinging_network(nodes=2, seed=1, **config):
    events = []
    sim = Simulation(
        nodes,
        seed=seed,
        network=NetworkConfig(latency_model="constant", base_latency_ms=10, **config),
        observer=lambda address, event: events.append((address, event)),
    )
    for host in sim.hosts:
        rng = sim.streams.fresh("node", host.address)
        host.start(Stack([PingProtocol(1000 + host.address, rng, own_address=host.address)]))
    return sim, events


def ping(sim, src, dst, **kwargs):
    return sim.hosts[src].call(lambda core, now: core.layer(PingProtocol).ping(dst, now, **kwargs))


def pongs(events):
    return [event.nonce for _, event in events if isinstance(event, PongReceived)]


# -- what arrives is what was encoded ---------------------------------------------------------


def test_a_delivered_message_is_decoded_from_bytes_not_the_object_that_was_sent():
    sim = network_of(2)
    sent = Ping(7, 2**159, b"payload")
    send(sim, 0, 1, sent)
    sim.run()
    [(_, src, received)] = sim.hosts[1].core.received
    assert src == 0 and received == sent
    assert received is not sent  # a fresh object, as the runtime's decoder builds


def test_with_encoding_off_the_object_itself_is_delivered():
    sim = network_of(2, encode=False)
    sent = Ping(7, 1)
    send(sim, 0, 1, sent)
    sim.run()
    [(_, _, received)] = sim.hosts[1].core.received
    assert received is sent


def test_the_bandwidth_model_charges_the_encoded_length_not_the_size_estimate():
    def wrong_size(msg):
        return 10**9  # would make every message a slow stream, were it consulted

    sim = Simulation(
        2,
        network=NetworkConfig(latency_model="constant", base_latency_ms=10, upload_bytes_per_s=1e6),
        size_of=wrong_size,
    )
    for host in sim.hosts:
        host.start(Recorder())
    big = Ping(1, 0, b"x" * 10_000)
    send(sim, 0, 1, Ping(0, 0))
    send(sim, 0, 1, big)
    sim.run()
    arrivals = [arrived for arrived, _, _ in sim.hosts[1].core.received]
    assert arrivals == pytest.approx([0.010, 0.010 + len(wire.encode(big)) / 1e6])
    assert sim.network.large_messages == 1
    assert sim.network.large_bytes == len(wire.encode(big))


# -- bad payloads: dropped, counted, and the node carries on ----------------------------------

BAD_PAYLOADS = {
    "malformed": [b"\xff\x00garbage", cbor2.dumps({"not": "an envelope"}), cbor2.dumps([wire.VERSION, 1, ["x"]])],
    "unknown_type": [cbor2.dumps([wire.VERSION, 65_000, []])],
    "bad_version": [cbor2.dumps([wire.VERSION + 1, wire.tag_of(Ping), [1, bytes(20), b""]])],
}


@pytest.mark.parametrize("kind", sorted(BAD_PAYLOADS))
def test_an_undecodable_payload_is_dropped_counted_by_kind_and_the_node_keeps_working(kind):
    sim, events = pinging_network()
    for data in BAD_PAYLOADS[kind]:
        sim.network.inject(0, 1, data)
    sim.run()
    assert sim.network.dropped[kind] == len(BAD_PAYLOADS[kind])
    assert sim.network.counters()[f"messages_dropped_{kind}"] == len(BAD_PAYLOADS[kind])
    assert sim.network.delivered == 0
    assert sim.hosts[1].up
    nonce = ping(sim, 0, 1)
    sim.run()
    assert pongs(events) == [nonce]


def test_a_datagram_over_the_datagram_limit_is_dropped_as_oversized():
    sim, events = pinging_network()
    too_big = wire.encode(Ping(1, 1000, b"x" * wire.DATAGRAM_LIMIT_BYTES))  # valid, but not as a datagram
    sim.network.inject(0, 1, too_big)
    sim.run()
    assert sim.network.dropped["oversized"] == 1
    assert sim.network.delivered == 0
    # The same message sent by a node goes by stream, as the runtime sends it, and arrives.
    nonce = ping(sim, 0, 1, payload=b"x" * wire.DATAGRAM_LIMIT_BYTES)
    sim.run()
    assert pongs(events) == [nonce]
    assert sim.network.large_messages == 2  # the ping and its pong


def test_a_stream_payload_over_the_stream_limit_is_dropped_as_oversized():
    sim, events = pinging_network()
    sim.network.inject(0, 1, bytes(wire.STREAM_LIMIT_BYTES + 1), stream=True)
    sim.network.inject(0, 1, wire.encode(Ping(5, 1000, b"x" * 5000)), stream=True)  # fits: delivered
    sim.run()
    assert sim.network.dropped["oversized"] == 1
    assert sim.network.delivered == 2  # the ping that fits, and node 1's pong to it
    nonce = ping(sim, 0, 1)
    sim.run()
    assert pongs(events) == [nonce]


@dataclass(frozen=True, slots=True)
class NotRegistered:
    nonce: int


@pytest.mark.parametrize(
    "bad",
    [NotRegistered(1), Ping("not an int", 0), Ping(1, 0, b"x" * wire.STREAM_LIMIT_BYTES)],
    ids=["unregistered", "breaks-its-schema", "over-the-stream-limit"],
)
def test_a_message_the_sender_cannot_encode_is_counted_and_dropped_never_raised(bad):
    sim = network_of(2)
    send(sim, 0, 1, bad)
    send(sim, 0, 1, Ping(2, 0))
    sim.run()
    assert sim.network.dropped["encode_error"] == 1
    assert [msg for _, _, msg in sim.hosts[1].core.received] == [Ping(2, 0)]


def test_injected_bytes_are_decoded_even_when_the_network_does_not_encode():
    sim = network_of(2, encode=False)
    sim.network.inject(0, 1, b"\x00\x01")
    sim.network.inject(0, 1, wire.encode(Ping(3, 0)))
    sim.run()
    assert sim.network.dropped["malformed"] == 1
    assert [msg for _, _, msg in sim.hosts[1].core.received] == [Ping(3, 0)]


# -- the trace hash covers message bytes, endpoints and delivery times ------------------------


def traced_pings(seed=1, payload=b"a", dst=1, encode=True):
    sim, _ = pinging_network(nodes=3, seed=seed, jitter_ms=5.0, encode=encode)
    for _ in range(20):
        ping(sim, 0, dst, payload=payload)
        ping(sim, 2, 0)
    sim.run()
    return sim.trace_hash


def test_same_seed_same_trace_hash_and_another_seed_another_with_encoding_on():
    assert traced_pings(seed=5) == traced_pings(seed=5)
    assert traced_pings(seed=5) != traced_pings(seed=6)


def test_the_trace_hash_covers_message_content_only_when_encoding():
    # Same message types at the same times: only the payload bytes differ.
    assert traced_pings(payload=b"a") != traced_pings(payload=b"b")
    assert traced_pings(payload=b"a", encode=False) == traced_pings(payload=b"b", encode=False)
    assert traced_pings(dst=1) != traced_pings(dst=2)  # endpoints
    assert traced_pings(encode=True) != traced_pings(encode=False)


def test_the_trace_hash_with_encoding_is_the_same_whatever_the_process_hash_seed(monkeypatch):
    import subprocess
    import sys

    code = (
        "from p2pdeploy.sim.scenario import parse_scenario, run_scenario;"
        "s = parse_scenario({'protocol': 'overlay', 'nodes': 30, 'duration_s': 60.0,"
        " 'overlay': {'lookups': 20, 'values': 5, 'gets': 10, 'workload_window_s': 10.0}});"
        "print(run_scenario(s).summary['trace_hash'])"
    )
    root = str(Path(__file__).resolve().parents[2])
    hashes = set()
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": root, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        hashes.add(out.stdout.strip())
    assert len(hashes) == 1 and len(hashes.pop()) == 64


# -- partitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [True, False])
def test_a_partition_drops_messages_between_groups_and_heal_restores_them(encode):
    sim = network_of(4, encode=encode, base_latency_ms=10)
    sim.network.partition([[0, 1]])  # {0, 1} and the rest, {2, 3}
    assert sim.network.partitioned
    for src, dst in ((0, 1), (0, 2), (2, 3), (3, 0), (1, 3)):
        send(sim, src, dst, Ping(src * 10 + dst, 0))
    sim.run()
    assert [msg.nonce for _, _, msg in sim.hosts[1].core.received] == [1]
    assert [msg.nonce for _, _, msg in sim.hosts[3].core.received] == [23]
    assert sim.hosts[0].core.received == [] and sim.hosts[2].core.received == []
    assert sim.network.dropped["partitioned"] == 3

    sim.network.heal()
    assert not sim.network.partitioned
    send(sim, 0, 2, Ping(99, 0))
    sim.run()
    assert [msg.nonce for _, _, msg in sim.hosts[2].core.received] == [99]


def test_messages_in_flight_when_the_cut_comes_are_dropped():
    sim = network_of(2, base_latency_ms=10)
    send(sim, 0, 1, Ping(1, 0))
    sim.engine.schedule(0.005, sim.network.partition, [[0]])
    sim.run()
    assert sim.hosts[1].core.received == []
    assert sim.network.dropped["partitioned"] == 1


def test_pings_across_a_partition_time_out_and_are_answered_after_heal():
    sim, events = pinging_network(nodes=6)
    sim.network.partition([range(3), range(3, 6)])
    within = ping(sim, 0, 1, timeout_s=1.0)
    across = ping(sim, 0, 4, timeout_s=1.0)
    sim.run(until=5.0)
    assert pongs(events) == [within]
    assert [event.nonce for _, event in events if isinstance(event, PingTimedOut)] == [across]

    sim.network.heal()
    again = ping(sim, 0, 4, timeout_s=1.0)
    sim.run(until=10.0)
    assert pongs(events) == [within, again]


def test_a_bad_partition_is_local_misuse():
    sim = network_of(4)
    with pytest.raises(ValueError, match="in two groups"):
        sim.network.partition([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="not a node address"):
        sim.network.partition([[0, 4]])
    assert not sim.network.partitioned


def test_counters_report_every_drop_reason():
    counters = network_of(2).network.counters()
    for reason in DROP_REASONS:
        assert counters[f"messages_dropped_{reason}"] == 0
    assert {"partitioned", "encode_error", *wire.DECODE_ERROR_KINDS} <= set(DROP_REASONS)


# -- scenarios: the switch, and every shipped scenario round-trips --------------------------------


def test_network_encode_is_a_scenario_key_defaulting_to_true():
    assert parse_scenario({}).values["network"]["encode"] is True
    assert parse_scenario({"network": {"encode": False}}).values["network"]["encode"] is False
    with pytest.raises(ScenarioError, match="network.encode must be true or false"):
        parse_scenario({"network": {"encode": 1}})


#: Per scenario, what makes it small (50 nodes) and short, keeping its phases (build, stores,
#: churn, workload) in order. A scenario not named here runs at 50 nodes for its full duration.
#: Not marked slow (about 10 s in all): runners change often, and a message that no longer
#: survives the wire should fail the ordinary suite.
SMALL = {
    "availability": ["duration_s=1200", "deployment.services=6"],
    "broadcast-churn": ["duration_s=1000", "broadcast.broadcasts=6"],
    "multicast": ["multicast.members=20", "multicast.messages=20"],
    "node-churn": ["duration_s=800", "overlay.workload_window_s=400", "overlay.lookups=100", "overlay.gets=100",
                   "persistence.blobs=4", "persistence.fetch_window_s=100", "node.prospects=50"],
    "overlay-churn": ["duration_s=700", "overlay.workload_window_s=400", "overlay.lookups=150", "overlay.gets=150"],
    "overlay-churn-weibull": ["duration_s=700", "overlay.workload_window_s=400", "overlay.lookups=150",
                              "overlay.gets=150"],
    "overlay-static": ["overlay.lookups=200"],
    "persistence-churn": ["duration_s=700", "persistence.blobs=6", "persistence.fetch_window_s=100"],
    "persistence-churn-weibull": ["duration_s=700", "persistence.blobs=6", "persistence.fetch_window_s=100"],
    "prospector-churn": ["duration_s=600", "prospector.queries_window_s=250", "prospector.prospects=100"],
}
#: What may differ between a run that encodes and one that does not: speed and the trace hash.
NOT_COMPARED = {"events_per_second", "wall_s", "trace_hash"}


@pytest.mark.parametrize("path", sorted(SIMULATIONS.glob("*.toml")), ids=lambda path: path.stem)
def test_every_scenario_runs_the_same_with_messages_encoded(path):
    def run(encode):
        overrides = ["nodes=50", *SMALL.get(path.stem, []), f"network.encode={str(encode).lower()}"]
        return run_scenario(load_scenario(path, overrides=overrides)).summary

    encoded, objects = run(True), run(False)
    for kind in ("encode_error", *wire.DECODE_ERROR_KINDS):
        assert encoded[f"messages_dropped_{kind}"] == 0, kind
    assert encoded["messages_delivered"] > 0
    assert {k: v for k, v in encoded.items() if k not in NOT_COMPARED} == {
        k: v for k, v in objects.items() if k not in NOT_COMPARED
    }
