"""Service state records: quorum records of a service that every node hosting it shares.

The record ``svcstate/<OWNER_HEX>/<NAME>/<key>`` lives under a key derived from its name
alone, so a replacement replica on another node reads what the failed one wrote; each version
is signed by the node that wrote it, and acceptors keep a version only from a key they trust
or from the service's owner.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.collective.persistence import Accept, Accepted, PersistenceConfig, QuorumFinished
from p2pdeploy.collective.records import (
    Ballot,
    ServiceStateName,
    check_record,
    quorum_key,
    service_state_refusal,
    shared_record_key,
)
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.routing import Contact
from p2pdeploy.overlay.storage import record_key, sign_record
from tests.simnet import StorageNet

OWNER = Identity.from_seed(bytes(range(40, 72)))
STRANGER_KEY = Identity.from_seed(bytes(range(80, 112)))
CONFIG = PersistenceConfig(rpc_timeout_s=1.0, quorum_attempts=3, quorum_backoff_s=0.2)
NAME = ServiceStateName(OWNER.public_key, "hello", b"counter").name


def op(net: StorageNet, address: int, start) -> QuorumFinished:
    return net.result(address, net.call(address, start), QuorumFinished, timeout_s=120)


# -- names and keys ----------------------------------------------------------------------------

services = st.from_regex(r"[a-z0-9][a-z0-9-]{0,47}", fullmatch=True)
state_keys = st.binary(min_size=1, max_size=256).filter(lambda k: not {0, 10, 13} & set(k))


@given(st.binary(min_size=32, max_size=32), services, state_keys)
def test_a_service_state_name_parses_back_to_its_parts(owner, service, key):
    parts = ServiceStateName(owner, service, key)
    assert ServiceStateName.parse(parts.name) == parts
    assert parts.name.startswith(b"svcstate/" + owner.hex().encode() + b"/" + service.encode() + b"/")


@pytest.mark.parametrize("name", [
    b"svcstate/" + b"00" * 31 + b"/hello/k",  # a short owner
    b"svcstate/" + b"AB" * 32 + b"/hello/k",  # upper-case hex: two spellings of one owner
    b"svcstate/" + b"00" * 32 + b"/Hello/k",  # not a service name
    b"svcstate/" + b"00" * 32 + b"/hello/",  # no key
    b"svcstate/" + b"00" * 32 + b"/hello",
    b"state/wiki/k",
])
def test_a_name_that_is_not_a_service_state_name_does_not_parse(name):
    assert ServiceStateName.parse(name) is None


def test_the_key_derives_from_the_name_whoever_writes():
    writer_a, writer_b = Identity.from_seed(bytes(32)), Identity.from_seed(bytes([1] * 32))
    key_a, item_a = sign_record(writer_a, NAME, b"1", 1, key=shared_record_key(NAME))
    key_b, item_b = sign_record(writer_b, NAME, b"2", 2, key=quorum_key(writer_b.public_key, NAME))
    assert key_a == key_b == quorum_key(OWNER.public_key, NAME) != record_key(writer_a.public_key, NAME)
    assert check_record(key_a, item_a) is None and check_record(key_a, item_b) is None
    assert quorum_key(writer_a.public_key, b"state/wiki/k") == record_key(writer_a.public_key, b"state/wiki/k")


def test_a_service_state_record_under_another_key_or_badly_signed_is_refused():
    writer = Identity.from_seed(bytes(32))
    owner_keyed, item = sign_record(writer, NAME, b"v", 1)  # under the writer's key, as ordinary records
    assert check_record(owner_keyed, item) == "a service state record's key does not derive from its name"
    key, good = sign_record(writer, NAME, b"v", 1, key=shared_record_key(NAME))
    assert check_record(key, dataclasses.replace(good, value=b"w")) == "bad signature"
    other = ServiceStateName(OWNER.public_key, "hello", b"other").name
    assert check_record(shared_record_key(other), good) == "a service state record's key does not derive from its name"


def test_only_a_trusted_key_or_the_owner_may_write_a_services_state():
    trusted = Identity.from_seed(bytes(32))
    trusts = {trusted.public_key}.__contains__
    for writer, allowed in ((trusted, True), (OWNER, True), (STRANGER_KEY, False)):
        _, item = sign_record(writer, NAME, b"v", 1, key=shared_record_key(NAME))
        refusal = service_state_refusal(item, trusts)
        assert (refusal is None) == allowed, writer
    _, item = sign_record(STRANGER_KEY, NAME, b"v", 1, key=shared_record_key(NAME))
    assert "not authorized: the state of hello@" in service_state_refusal(item, trusts)


def test_a_malformed_service_state_name_is_refused_by_the_local_api():
    net = StorageNet(3, seed=1, config=CONFIG)
    with pytest.raises(ValueError, match="svcstate/<OWNER_HEX>/<NAME>/<key>"):
        net.call(0, lambda p, now: p.quorum_put(OWNER, b"svcstate/nobody/k", b"v", now))


# -- on a network ------------------------------------------------------------------------------


def test_two_nodes_write_and_read_the_same_service_state_and_so_does_its_owner():
    net = StorageNet(9, seed=3, config=CONFIG)
    key = shared_record_key(NAME)
    a, b = 1, 6
    first = op(net, a, lambda p, now: p.quorum_put(net.identity_of(a), NAME, b"1", now))
    assert first.ok and first.key == key and first.version == 1
    read = op(net, b, lambda p, now: p.quorum_read(key, now))
    assert read.ok and read.item.value == b"1" and read.item.public_key == net.identity_of(a).public_key
    second = op(net, b, lambda p, now: p.quorum_cas(net.identity_of(b), NAME, 1, b"2", now))
    assert second.ok and second.version == 2
    read = op(net, a, lambda p, now: p.quorum_read(key, now))
    assert read.item.value == b"2" and read.item.public_key == net.identity_of(b).public_key
    # the owner's key is no node's, and no node trusts it: still, it may write its service's state
    by_owner = op(net, 4, lambda p, now: p.quorum_put(OWNER, NAME, b"3", now))
    assert by_owner.ok and by_owner.version == 3
    states = [store.read_acceptor(key) for store in net.stores]
    assert sum(1 for state in states if state is not None and state.item == by_owner.item) >= 2


def test_a_strangers_write_of_a_services_state_is_refused_and_changes_nothing():
    stranger = 8
    net = StorageNet(9, seed=5, config=CONFIG, strangers=frozenset({stranger}))
    key = shared_record_key(NAME)
    assert stranger not in net.closest(key, CONFIG.quorum_replicas)  # a proposer outside the group
    assert op(net, 0, lambda p, now: p.quorum_put(net.identity_of(0), NAME, b"mine", now)).ok
    before = {a: net.stores[a].read_acceptor(key) for a in range(9)}
    refused = op(net, stranger, lambda p, now: p.quorum_put(net.identity_of(stranger), NAME, b"theirs", now))
    assert not refused.ok
    # a trusted node that signs with a stranger's key is refused alike
    assert not op(net, 2, lambda p, now: p.quorum_put(STRANGER_KEY, NAME, b"theirs", now)).ok
    for address in range(9):
        after = net.stores[address].read_acceptor(key)
        assert (after.item if after else None) == (before[address].item if before[address] else None), address
    assert sum(net.persistence(a).counters["service_state_refused"] for a in range(9)) >= 2
    read = op(net, 3, lambda p, now: p.quorum_read(key, now))
    assert read.ok and read.item.value == b"mine" and read.version == 1


def test_an_accept_of_a_service_state_version_under_a_key_not_its_names_is_dropped():
    net = StorageNet(3, seed=7, config=CONFIG)
    layer, sender = net.persistence(0), net.node_id(1)
    writer = net.identity_of(1)
    wrong_key, item = sign_record(writer, NAME, b"v", 1)  # its writer's key, not the name's
    group = [Contact(net.node_id(a), a) for a in range(3)]
    layer.receive(1, Accept(1, sender, wrong_key, Ballot(1, sender), item, group), net.now)
    assert layer.dropped["bad_accept"] == 1 and net.stores[0].read_acceptor(wrong_key) is None
    key, good = sign_record(STRANGER_KEY, NAME, b"v", 1, key=shared_record_key(NAME))
    layer.receive(1, Accept(2, sender, key, Ballot(1, sender), good, group), net.now)
    answers = [msg for _, msg in layer.messages_to_send() if isinstance(msg, Accepted)]
    assert [msg.ok for msg in answers] == [False]
    assert layer.counters["service_state_refused"] == 1 and net.stores[0].read_acceptor(key) is None
