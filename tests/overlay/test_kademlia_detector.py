"""The overlay with a failure detector below it: dead contacts stop costing lookups."""

from __future__ import annotations

import random

from p2pdeploy.core import Stack
from p2pdeploy.overlay.kademlia import FindNode, Kademlia, KademliaConfig, LookupFinished
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.swim import DetectorConfig, FailureDetector, PeerDeclaredDead
from p2pdeploy.sim import NetworkConfig, Simulation

K = 5
CONFIG = KademliaConfig(k=K, rpc_timeout_s=1.0, watch_sync_interval_s=1.0)


class Community:
    """``n`` nodes, each a stack of a failure detector and the overlay, with full routing tables."""

    def __init__(self, n: int, seed: int = 3) -> None:
        self.sim = Simulation(n, seed=seed, network=NetworkConfig(latency_model="constant", base_latency_ms=5.0))
        rng = random.Random(seed)
        self.ids = [rng.getrandbits(160) for _ in range(n)]
        self.events: list[tuple[int, object]] = []
        self.sent: list[tuple[int, int, object]] = []
        self.sim.set_observer(lambda address, event: self.events.append((address, event)))
        for address, host in enumerate(self.sim.hosts):
            detector = FailureDetector(self.ids[address], random.Random(rng.getrandbits(64)), DetectorConfig())
            overlay = Kademlia(self.ids[address], random.Random(rng.getrandbits(64)), CONFIG, detector=detector)
            for other in range(n):
                if other != address:
                    overlay.table.add(Contact(self.ids[other], other))
            host.start(_Watched(self, address, [detector, overlay]))
            host.call(lambda core, now: core.layer(Kademlia).start(now))

    def overlay(self, address: int) -> Kademlia:
        return self.sim.hosts[address].core.layer(Kademlia)

    def run(self, seconds: float) -> None:
        self.sim.run(until=self.sim.now + seconds)

    def live(self) -> list[int]:
        return [a for a, host in enumerate(self.sim.hosts) if host.up]

    def lookup(self, address: int, target: int) -> LookupFinished:
        query = self.sim.hosts[address].call(lambda core, now: core.layer(Kademlia).lookup(target, now))
        for _ in range(100):
            self.run(0.1)
            done = [e for a, e in self.events if a == address and isinstance(e, LookupFinished) and e.query_id == query]
            if done:
                return done[0]
        raise AssertionError("the lookup did not finish")


class _Watched(Stack):
    """A node's stack whose every sent message the test sees."""

    def __init__(self, community: Community, address: int, layers: list) -> None:
        super().__init__(layers)
        self._community = community
        self._address = address

    def messages_to_send(self):
        out = super().messages_to_send()
        self._community.sent.extend((self._address, dst, msg) for dst, msg in out)
        return out


def test_after_the_verdict_lookups_find_the_live_k_closest_and_ask_no_dead_node():
    community = Community(30)
    community.run(5.0)
    dead = list(range(20, 30))
    for address in dead:
        community.sim.hosts[address].crash()
    community.run(20.0)  # the detector's verdict time, with margin
    declared = {(a, e.node_id) for a, e in community.events if isinstance(e, PeerDeclaredDead)}
    assert all((a, community.ids[d]) in declared for a in community.live() for d in dead)
    mark = len(community.sent)
    rng = random.Random(1)
    for _ in range(20):
        asker = rng.choice(community.live())
        target = rng.getrandbits(160)
        result = community.lookup(asker, target)
        live = sorted((community.ids[a] for a in community.live() if a != asker), key=lambda i: i ^ target)[:K]
        assert [c.node_id for c in result.closest] == live
        assert result.failures == 0  # no request went to a dead node and timed out
    asked = {dst for _, dst, msg in community.sent[mark:] if isinstance(msg, FindNode)}
    assert not asked & set(dead)


def test_a_dead_contact_is_stale_avoided_by_the_layers_and_offered_again_once_it_recovers():
    community = Community(12)
    community.run(3.0)
    victim = 11
    community.sim.hosts[victim].pause()
    community.run(20.0)
    watcher = community.overlay(0)
    assert community.ids[victim] not in [c.node_id for c in watcher.table.closest(community.ids[victim], K)]
    assert watcher.suspicions.suspected(community.ids[victim], community.sim.now)  # the layers above avoid it
    community.sim.hosts[victim].resume()
    community.run(20.0)  # the victim refutes the verdict: alive again, its contact fresh
    assert community.ids[victim] in [c.node_id for c in watcher.table.closest(community.ids[victim], K)]
    assert not watcher.suspicions.suspected(community.ids[victim], community.sim.now)


def test_the_overlay_lets_go_only_of_the_peers_it_holds_and_joins_another_layers_watch():
    rng = random.Random(5)
    ids = [rng.getrandbits(160) for _ in range(4)]
    detector = FailureDetector(ids[0], random.Random(1), DetectorConfig())
    overlay = Kademlia(ids[0], random.Random(2), CONFIG, detector=detector)
    overlay.table.add(Contact(ids[1], 1))
    overlay.table.add(Contact(ids[2], 2))
    detector.watch(ids[2], 2, 0.0, by="deployment")  # in the table, watched by another layer first
    detector.watch(ids[3], 3, 0.0, by="deployment")  # a replica host the overlay does not route to
    overlay.start(0.0)
    assert set(detector.watched(by="overlay")) == {ids[1], ids[2]}
    assert detector.holders(ids[2]) == {"overlay", "deployment"}
    overlay.handle_timer(overlay.timer_deadline("watch"))  # the periodic sync
    assert set(detector.watched()) == {ids[1], ids[2], ids[3]}
    assert set(detector.watched(by="overlay")) == {ids[1], ids[2]}
    detector.unwatch(ids[2], by="deployment")
    assert detector.holders(ids[2]) == {"overlay"}  # still watched: the overlay holds it
