"""The network model: latency models, jitter, loss, bandwidth for large messages, dead nodes."""

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdeploy import wire
from p2pdeploy.core import Protocol
from p2pdeploy.overlay.ping import Ping, Pong
from p2pdeploy.sim.network import NetworkConfig, WireSizer, pair_latency_median_s
from p2pdeploy.sim.simulation import Simulation


class Recorder(Protocol):
    """Records what it receives, with the arrival time."""

    handles = (Ping, Pong)

    def __init__(self):
        super().__init__()
        self.received = []

    def receive(self, src, msg, now):
        self.received.append((now, src, msg))


def network_of(nodes, seed=1, **config):
    sim = Simulation(nodes, seed=seed, network=NetworkConfig(**config))
    for host in sim.hosts:
        host.start(Recorder())
    return sim


def send(sim, src, dst, msg):
    sim.hosts[src].call(lambda core, now: core.send(dst, msg))


def test_constant_latency_delivers_after_exactly_the_base_latency():
    sim = network_of(2, latency_model="constant", base_latency_ms=40)
    send(sim, 0, 1, Ping(1, 0))
    sim.run()
    [(arrived, src, msg)] = sim.hosts[1].core.received
    assert arrived == pytest.approx(0.040)
    assert src == 0 and msg == Ping(1, 0)


def test_euclidean_latency_is_symmetric_and_bounded_by_the_unit_square():
    sim = network_of(50, latency_model="euclidean", base_latency_ms=5, latency_scale_ms=100)
    latency = sim.network.latency_s
    for a in range(50):
        for b in range(50):
            assert latency(a, b) == latency(b, a)
            assert 0.005 <= latency(a, b) <= 0.005 + 0.100 * 2**0.5
    # Median distance between random points of the unit square is about 0.512.
    assert pair_latency_median_s(sim.network) == pytest.approx(0.005 + 0.0512, rel=0.05)


@pytest.mark.parametrize("model", ["uniform", "lognormal"])
def test_pairwise_latency_models_have_the_configured_median(model):
    sim = network_of(400, latency_model=model, base_latency_ms=10, latency_scale_ms=80, latency_sigma=0.6)
    expected = 0.010 + (0.040 if model == "uniform" else 0.080)
    assert pair_latency_median_s(sim.network) == pytest.approx(expected, rel=0.05)
    assert sim.network.latency_s(3, 9) == sim.network.latency_s(9, 3)
    again = network_of(400, latency_model=model, base_latency_ms=10, latency_scale_ms=80, latency_sigma=0.6)
    assert again.network.latency_s(3, 9) == sim.network.latency_s(3, 9)


def test_jitter_adds_between_zero_and_jitter_ms():
    sim = network_of(2, latency_model="constant", base_latency_ms=20, jitter_ms=10)
    for nonce in range(2000):
        send(sim, 0, 1, Ping(nonce, 0))
    sim.run()
    delays = [arrived for arrived, _, _ in sim.hosts[1].core.received]
    assert all(0.020 <= d < 0.030 for d in delays)
    assert statistics.mean(delays) == pytest.approx(0.025, abs=0.0005)


def test_loss_model_drops_the_configured_fraction_of_datagrams():
    sim = network_of(2, latency_model="constant", loss=0.1)
    total = 20_000
    for nonce in range(total):
        send(sim, 0, 1, Ping(nonce, 0))
    sim.run()
    delivered = len(sim.hosts[1].core.received)
    assert delivered + sim.network.dropped["loss"] == total
    assert sim.network.dropped["loss"] / total == pytest.approx(0.1, abs=0.01)


def test_bandwidth_model_delays_a_large_message_by_size_over_bandwidth():
    sim = network_of(
        2, latency_model="constant", base_latency_ms=50, upload_bytes_per_s=1e6, download_bytes_per_s=1e6
    )
    big = Ping(1, 0, b"x" * 100_000)
    size = len(wire.encode(big))
    send(sim, 0, 1, big)
    sim.run()
    [(arrived, _, msg)] = sim.hosts[1].core.received
    assert msg == big
    assert arrived == pytest.approx(0.050 + size / 1e6)
    assert sim.network.large_messages == 1 and sim.network.large_bytes == size


def test_large_messages_from_one_sender_queue_on_its_uplink():
    sim = network_of(3, latency_model="constant", base_latency_ms=10, upload_bytes_per_s=1e6)
    big = Ping(1, 0, b"x" * 50_000)
    size = len(wire.encode(big))
    send(sim, 0, 1, big)
    send(sim, 0, 2, big)
    sim.run()
    [(first, _, _)] = sim.hosts[1].core.received
    [(second, _, _)] = sim.hosts[2].core.received
    assert first == pytest.approx(0.010 + size / 1e6)
    assert second == pytest.approx(0.010 + 2 * size / 1e6)


def test_the_slower_downlink_is_the_bottleneck_and_receivers_queue():
    sim = network_of(
        3, latency_model="constant", base_latency_ms=10, upload_bytes_per_s=4e6, download_bytes_per_s=1e6
    )
    big = Ping(1, 0, b"x" * 40_000)
    size = len(wire.encode(big))
    send(sim, 0, 2, big)
    send(sim, 1, 2, big)
    sim.run()
    arrivals = sorted(arrived for arrived, _, _ in sim.hosts[2].core.received)
    assert arrivals == pytest.approx([0.010 + size / 1e6, 0.010 + 2 * size / 1e6])


def test_small_messages_ignore_bandwidth_and_large_ones_are_never_lost():
    sim = network_of(2, latency_model="constant", base_latency_ms=10, loss=1.0, upload_bytes_per_s=1.0)
    send(sim, 0, 1, Ping(1, 0, b"x" * 100))
    send(sim, 0, 1, Ping(2, 0, b"x" * 2000))
    sim.run()
    assert [msg.nonce for _, _, msg in sim.hosts[1].core.received] == [2]
    assert sim.network.dropped["loss"] == 1


def test_messages_to_a_node_that_is_down_or_to_no_node_are_dropped_and_counted():
    sim = network_of(3, latency_model="constant")
    sim.hosts[2].crash()
    send(sim, 0, 2, Ping(1, 0))
    send(sim, 0, 7, Ping(2, 0))
    send(sim, 0, ("10.0.0.1", 4000), Ping(3, 0))
    sim.run()
    assert sim.network.dropped["down"] == 1
    assert sim.network.dropped["unknown_address"] == 2
    assert sim.network.counters()["messages_delivered"] == 0


def test_wire_sizer_is_exact_above_the_threshold_and_cheap_below():
    sizer = WireSizer(1200)
    small = Ping(1, 2**159, b"abc")
    assert sizer(small) <= 1200
    assert sizer(small) >= len(wire.encode(small))
    large = Pong(5, 7, b"y" * 5000)
    assert sizer(large) == len(wire.encode(large))

    class NotAMessage:
        pass

    assert sizer(NotAMessage()) > 0


def test_bad_network_configuration_is_refused():
    with pytest.raises(ValueError, match="loss must be between 0 and 1"):
        NetworkConfig(loss=1.5)
    with pytest.raises(ValueError, match="latency_model"):
        NetworkConfig(latency_model="ring")


@given(st.binary(max_size=3000), st.integers(0, 2**63 - 1), st.integers(0, 2**160 - 1))
def test_wire_sizer_never_underestimates_a_message(payload, nonce, sender):
    sizer = WireSizer(1200)
    msg = Ping(nonce, sender, payload)
    actual = len(wire.encode(msg))
    estimate = sizer(msg)
    assert estimate >= actual
    if estimate > 1200:
        assert estimate == actual


@settings(max_examples=30)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 2000)), max_size=60),
    st.floats(0, 0.5),
    st.integers(0, 2**32),
)
def test_no_message_arrives_before_its_pair_latency_and_every_message_is_accounted_for(sends, loss, seed):
    sim = network_of(10, seed=seed, jitter_ms=5.0, loss=loss, upload_bytes_per_s=1e5)
    for nonce, (src, dst, payload_bytes) in enumerate(sends):
        send(sim, src, dst, Ping(nonce, src, b"p" * payload_bytes))
    sim.run()
    arrivals = [(arrived, src, dst) for dst, host in enumerate(sim.hosts) for arrived, src, _ in host.core.received]
    for arrived, src, dst in arrivals:
        assert arrived >= sim.network.latency_s(src, dst)
    assert len(arrivals) + sim.network.dropped["loss"] == len(sends) == sim.network.sent
