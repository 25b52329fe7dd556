"""Who enters a routing table: a contact proves its key at its address, and one address prefix
cannot fill a bucket or the table (p2pdeploy.overlay.admission)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.overlay.admission import AddressPrefixes, Challenge, ChallengeAnswer, challenge_payload
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.kademlia import Kademlia, KademliaConfig, Probe, ProbeReply
from p2pdeploy.overlay.routing import Contact

NODE = Identity.from_seed(b"n" * 32)
PEER = Identity.from_seed(b"p" * 32)
OTHER = Identity.from_seed(b"o" * 32)
ATTACKER = ("203.0.113.7", 4000)


def node(**config) -> Kademlia:
    return Kademlia(NODE.node_id, random.Random(1), KademliaConfig(**{"k": 4, **config}), identity=NODE)


def challenges(overlay: Kademlia) -> list[tuple[object, Challenge]]:
    return [(dst, msg) for dst, msg in overlay.messages_to_send() if isinstance(msg, Challenge)]


def test_a_sender_joins_the_table_only_after_signing_the_challenge_sent_to_its_address():
    overlay = node()
    overlay.receive(("198.51.100.1", 7), Probe(5, PEER.node_id), 0.0)
    sent = overlay.messages_to_send()
    assert overlay.table.get(PEER.node_id) is None
    (dst, challenge), = [(d, m) for d, m in sent if isinstance(m, Challenge)]
    assert dst == ("198.51.100.1", 7) and len(challenge.nonce) == 16
    assert [type(m) for _, m in sent if not isinstance(m, Challenge)] == [ProbeReply]  # the request is answered
    signature = PEER.sign(challenge_payload(challenge.nonce, NODE.node_id))
    overlay.receive(dst, ChallengeAnswer(challenge.rpc_id, PEER.node_id, PEER.public_key, signature), 0.1)
    assert overlay.table.get(PEER.node_id) == Contact(PEER.node_id, dst)
    overlay.receive(dst, Probe(6, PEER.node_id), 1.0)  # proved once: no second challenge
    assert challenges(overlay) == []


def test_an_answer_by_another_key_or_for_another_nonce_proves_nothing():
    overlay = node()
    overlay.receive(ATTACKER, Probe(5, PEER.node_id), 0.0)
    (_, challenge), = challenges(overlay)
    by_another_key = OTHER.sign(challenge_payload(challenge.nonce, NODE.node_id))
    overlay.receive(ATTACKER, ChallengeAnswer(challenge.rpc_id, PEER.node_id, OTHER.public_key, by_another_key), 0.1)
    assert overlay.table.get(PEER.node_id) is None and overlay.dropped["challenge_failed"] == 1
    overlay.receive(ATTACKER, Probe(6, PEER.node_id), 1.0)
    (_, again), = challenges(overlay)
    of_another_nonce = PEER.sign(challenge_payload(bytes(16), NODE.node_id))  # an answer seen elsewhere
    overlay.receive(ATTACKER, ChallengeAnswer(again.rpc_id, PEER.node_id, PEER.public_key, of_another_nonce), 1.1)
    assert overlay.table.get(PEER.node_id) is None and overlay.dropped["challenge_failed"] == 2


def test_a_flood_of_forged_senders_leaves_the_table_empty_and_the_challenges_bounded():
    """2,000 probes under random ids from one socket (the attack): none enters the table, at most
    ``max_challenges`` challenges are ever in flight, and a real peer still gets in afterwards."""
    overlay = node(max_challenges=64)
    forged = random.Random(5)
    for rpc_id in range(2000):
        overlay.receive(ATTACKER, Probe(rpc_id + 1, forged.getrandbits(160)), rpc_id * 1e-4)
    assert len(overlay.table) == 0
    assert len(challenges(overlay)) == 64 and overlay.dropped["challenge_busy"] == 2000 - 64
    overlay.handle_timer(10.0)  # the challenges time out unanswered
    assert overlay.dropped["challenge_timeout"] == 64 and not overlay._challenging
    overlay.receive(("198.51.100.1", 7), Probe(5, PEER.node_id), 11.0)
    (dst, challenge), = challenges(overlay)
    overlay.receive(dst, ChallengeAnswer(challenge.rpc_id, PEER.node_id, PEER.public_key,
                                         PEER.sign(challenge_payload(challenge.nonce, NODE.node_id))), 11.1)
    assert [c.node_id for c in overlay.table.contacts()] == [PEER.node_id]


def test_a_known_contact_keeps_its_address_until_the_new_one_is_proved():
    overlay = node()
    home, elsewhere = ("198.51.100.1", 7), ("203.0.113.9", 7)
    overlay.receive(home, Probe(5, PEER.node_id), 0.0)
    (_, challenge), = challenges(overlay)
    overlay.receive(home, ChallengeAnswer(challenge.rpc_id, PEER.node_id, PEER.public_key,
                                          PEER.sign(challenge_payload(challenge.nonce, NODE.node_id))), 0.1)
    overlay.receive(elsewhere, Probe(6, PEER.node_id), 1.0)  # someone else claims PEER's id
    assert overlay.table.get(PEER.node_id).address == home
    (dst, _), = challenges(overlay)
    assert dst == elsewhere  # it must answer there, with PEER's key, which it does not have


def test_a_node_without_a_key_does_not_answer_challenges():
    keyless = Kademlia(7, random.Random(1), KademliaConfig(k=4))
    keyless.receive(ATTACKER, Challenge(3, PEER.node_id, bytes(16)), 0.0)
    assert not [m for _, m in keyless.messages_to_send() if isinstance(m, ChallengeAnswer)]
    assert keyless.dropped["challenge_unanswered"] == 1


# -- address prefixes ---------------------------------------------------------------------------


def proved(overlay: Kademlia, identity: Identity, address, now: float) -> None:
    overlay.receive(address, Probe(1, identity.node_id), now)
    for dst, challenge in challenges(overlay):
        overlay.receive(dst, ChallengeAnswer(challenge.rpc_id, identity.node_id, identity.public_key,
                                             identity.sign(challenge_payload(challenge.nonce, NODE.node_id))), now)


def test_one_prefix_fills_at_most_its_share_of_the_table_and_loopback_only_when_asked():
    peers = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 61)]
    per_table = node(prefix_per_bucket=0, prefix_per_table=5, prefix_exempt=(), k=20)
    for i, peer in enumerate(peers):
        proved(per_table, peer, ("127.0.0.1", 1000 + i), float(i))
    assert len(per_table.table) == 5 and per_table.dropped["prefix_crowded"] == 55
    proved(per_table, OTHER, ("198.51.100.1", 7), 70.0)  # another prefix is welcome
    assert per_table.table.get(OTHER.node_id) is not None

    per_bucket = node(prefix_per_bucket=2, prefix_per_table=0, prefix_exempt=(), k=4)
    for i, peer in enumerate(peers):
        proved(per_bucket, peer, ("127.0.0.1", 1000 + i), float(i))
    settled = [b for b in per_bucket.table.buckets if not per_bucket.table._may_split(b)]
    assert settled and all(len(b.entries) + len(b.replacements) <= 2 for b in settled)
    assert per_bucket.dropped["prefix_crowded"] > 0 and len(per_bucket.table) > 2

    exempt = node(prefix_per_bucket=2, prefix_per_table=5, k=20)  # loopback is exempt by default
    for i, peer in enumerate(peers):
        proved(exempt, peer, ("127.0.0.1", 1000 + i), float(i))
    assert len(exempt.table) == len(peers) and exempt.dropped["prefix_crowded"] == 0


@given(st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=255))
def test_addresses_of_one_slash_24_share_a_prefix_and_the_simulator_has_none(a, b):
    prefixes = AddressPrefixes(exempt=())
    assert prefixes.prefix_of((f"198.51.100.{a}", 1)) == prefixes.prefix_of((f"198.51.100.{b}", 2)) == "198.51.100.0/24"
    assert prefixes.prefix_of((f"198.51.{a}.1", 1)) != prefixes.prefix_of((f"198.52.{b}.1", 1))
    assert prefixes.prefix_of(a) is None
    assert AddressPrefixes().prefix_of(("10.1.2.3", 1)) is None  # a private network is exempt by default
