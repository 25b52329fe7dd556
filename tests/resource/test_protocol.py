"""The remote protocol, sans-I/O: a deployer's client and a node linked through the wire codec."""

import dataclasses
import random

import cbor2
import pytest

from p2pdeploy import wire
from p2pdeploy.fabric.contribution import Contribution
from p2pdeploy.fabric.executor import InstallBundle, Installed
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.replicas import ReplicaHost
from p2pdeploy.fabric.units import GIB
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.requests import RequestsFull
from p2pdeploy.resource import protocol as protocol_module
from p2pdeploy.resource.bundle import Bundle, BundleError, pack_files
from p2pdeploy.resource.protocol import (
    FetchLogs,
    LogsReply,
    LogsRequested,
    QueryReplica,
    Refused,
    RemoteClient,
    RemoteConfig,
    RemoteControl,
    ReplicaStartAccepted,
    RequestAnswered,
    RequestTimedOut,
    StartReplica,
    StatusReply,
    StopReplica,
    sign_request,
)

NODE = Identity.from_seed(b"n" * 32)
DEPLOYER = Identity.from_seed(b"d" * 32)
COLLEAGUE = Identity.from_seed(b"c" * 32)
STRANGER = Identity.from_seed(b"s" * 32)
MACHINE = Machine(cores=4, memory_total_bytes=8 * GIB, memory_free_bytes=6 * GIB, disk_total_bytes=GIB,
                  disk_free_bytes=GIB, os="linux", arch="x86_64")  # fmt: skip
NOW = 1_700_000_000.0  # wall-clock seconds; the node is built with an offset of 0, so now is wall time


def manifest(cpu=1, requirements='os == "linux"'):
    return (
        f'name = "web"\nversion = "1.0"\ncommand = ["python3", "app.py"]\n'
        f"[resources]\ncpu = {cpu}\nmemory = \"64M\"\nrequirements = '{requirements}'\n"
    ).encode()


def signed_bundle(signer=DEPLOYER, **kwargs):
    return Bundle.parse(pack_files({"manifest.toml": manifest(**kwargs), "app.py": b"print(1)\n"})).sign(signer)


class Link:
    """A node and a deployer's client; every message crosses the wire codec, as on a network."""

    def __init__(self, contribution=None, config=None, client_identity=DEPLOYER, client_clock_offset_s=0.0,
                 started_s=None):
        contribution = contribution or Contribution(
            cpu_cores=2, memory_bytes=4 * GIB, max_services=8, trusted_keys=frozenset({DEPLOYER.public_key, COLLEAGUE.public_key})
        )
        self.host = ReplicaHost(contribution)
        self.node = RemoteControl(NODE.node_id, self.host, machine=MACHINE, owner_keys=frozenset({NODE.public_key}),
                                  config=config, started_s=started_s)  # fmt: skip
        self.client = RemoteClient(client_identity, random.Random(1), wall_clock_offset_s=client_clock_offset_s)
        self.node_events = []
        self.host_events = []
        self.sent = []  # what the client put on the wire, for replay tests

    def flush(self, now=NOW):
        for dst, msg in self.client.messages_to_send():
            assert dst == "node"
            self.sent.append(msg)
            self.deliver(msg, now)
        for dst, msg in self.node.messages_to_send():
            assert dst == "client"
            self.client.receive("node", crossed(msg), now)
        while (event := self.node.next_event()) is not None:
            self.node_events.append(event)
        while (event := self.host.next_event()) is not None:
            self.host_events.append(event)

    def deliver(self, msg, now=NOW):
        self.node.receive("client", crossed(msg), now)

    def ask(self, call, now=NOW):
        request_id = call(self.client, now)
        self.flush(now)
        answers = []
        while (event := self.client.next_event()) is not None:
            answers.append(event)
        matching = [a for a in answers if a.request_id == request_id]
        assert len(matching) == 1, answers
        return matching[0].reply if isinstance(matching[0], RequestAnswered) else matching[0]

    def start(self, replica_id="web-1", bundle=None, now=NOW, **kwargs):
        bundle = bundle or signed_bundle()
        return self.ask(lambda c, t: c.start("node", NODE.node_id, replica_id, bundle, t, **kwargs), now)


def crossed(msg):
    data = wire.encode(msg)
    decoded = wire.decode(data, limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert not isinstance(decoded, wire.DecodeError), decoded
    return decoded


def test_an_admitted_start_is_answered_with_its_status_and_the_bundle_goes_to_the_executor():
    link = Link()
    reply = link.start(bindings={"DATABASE_URL": "postgres://db"})
    assert isinstance(reply, StatusReply) and (reply.replica_id, reply.state) == ("web-1", "installing")
    install = [e for e in link.host_events if isinstance(e, InstallBundle)]
    assert len(install) == 1 and install[0].bundle == signed_bundle().data
    assert [type(e) for e in link.node_events] == [ReplicaStartAccepted]
    assert link.host.supervisor("web-1").spec.process.env["DATABASE_URL"] == "postgres://db"


def test_with_two_cores_offered_a_third_one_core_replica_is_refused_with_the_reason():
    link = Link()
    assert isinstance(link.start("web-1"), StatusReply)
    assert isinstance(link.start("web-2"), StatusReply)
    reply = link.start("web-3")
    assert isinstance(reply, Refused)
    assert (reply.check, reply.reason) == ("admission", "admission: cpu: 1 core asked, 0 of 2 free")
    assert link.host.status("web-3") is None


def test_a_bundle_signed_by_a_stranger_is_refused_by_the_owners_trust_policy():
    link = Link()
    reply = link.start(bundle=signed_bundle(signer=STRANGER))
    assert reply.check == "bundle"
    assert reply.reason.startswith("bundle: signed by ") and reply.reason.endswith("a key this node's owner does not trust")
    assert link.host.statuses() == []


def test_a_request_signed_by_an_untrusted_key_is_refused():
    link = Link(client_identity=STRANGER)
    reply = link.start()
    assert reply.check == "trust" and "is not trusted by this node's owner" in reply.reason


def test_an_open_community_runs_bundles_of_any_key():
    link = Link(contribution=Contribution(cpu_cores=2, trusted_keys="any"), client_identity=STRANGER)
    assert isinstance(link.start(bundle=signed_bundle(signer=STRANGER)), StatusReply)


def test_a_replayed_start_request_is_refused():
    link = Link()
    assert isinstance(link.start(), StatusReply)
    request = link.sent[-1]
    link.deliver(request, NOW + 5)
    replies = link.node.messages_to_send()
    assert len(replies) == 1
    _, reply = replies[0]
    assert (reply.check, reply.reason) == ("replay", "replay: this request (its nonce) was already received")
    assert len(link.host.statuses()) == 1


def test_a_request_signed_before_the_node_started_is_refused_as_a_replay():
    """The nonces of the node's previous run are gone: a request of that run, still inside the
    time window, would act twice (a stop captured on the wire, replayed after a restart)."""
    first_run = Link()
    assert isinstance(first_run.ask(lambda c, t: c.stop("node", NODE.node_id, "web-1", t)), Refused)
    captured = first_run.sent[-1]
    restarted = Link(started_s=NOW + 10)
    assert isinstance(restarted.start(now=NOW + 11), StatusReply)
    restarted.deliver(captured, NOW + 11)
    (_, reply), = restarted.node.messages_to_send()
    assert (reply.check, reply.reason) == (
        "replay", "replay: the request was signed 10.0 s before this node started, so it may have been "
        "received already; sign it again")
    assert restarted.node.refused["replay"] == 1
    assert restarted.host.status("web-1").state.value != "stopping"
    # a request signed after the start is taken
    assert isinstance(restarted.ask(lambda c, t: c.query("node", NODE.node_id, "web-1", t), NOW + 12), StatusReply)


def test_a_request_from_outside_the_time_window_is_refused_as_stale():
    link = Link(client_clock_offset_s=-300)
    reply = link.start()
    assert reply.check == "stale"
    assert reply.reason == "stale: the request's timestamp is 300 s behind this node's clock (allowed ±120 s)"


def test_a_replay_after_the_window_is_still_refused_and_the_nonce_is_forgotten():
    link = Link()
    link.start()
    request = link.sent[-1]
    later = NOW + 200
    link.node.handle_timer(later)
    link.node.handle_timer(later + 200)
    assert link.node._nonces == {}  # the cache does not grow forever (checked once, here)
    link.deliver(request, later + 200)
    (_, reply), = link.node.messages_to_send()
    assert reply.check == "stale"


def test_a_tampered_request_fails_its_signature_check():
    link = Link()
    link.client.start("node", NODE.node_id, "web-1", signed_bundle(), NOW)
    (_, request), = link.client.messages_to_send()
    link.deliver(dataclasses.replace(request, replica_id="web-9"))
    (_, reply), = link.node.messages_to_send()
    assert (reply.check, reply.reason) == ("signature", "signature: the request is not signed by the key it names")


def test_a_request_for_another_node_is_refused():
    link = Link()
    reply = link.ask(lambda c, t: c.start("node", NODE.node_id ^ 1, "web-1", signed_bundle(), t))
    assert reply.check == "node"


def test_a_bundle_changed_after_signing_is_refused():
    link = Link()
    bundle = signed_bundle()
    other = Bundle.parse(pack_files({"manifest.toml": manifest(cpu=0.5)}))
    forged = dataclasses.replace(bundle, data=other.data)
    reply = link.start(bundle=forged)
    assert (reply.check, reply.reason) == ("bundle", "bundle: its signature does not match the bundle and the key it names")


def test_a_service_whose_requirements_this_node_misses_is_refused_with_the_clause():
    link = Link()
    reply = link.start(bundle=signed_bundle(requirements='arch == "riscv64"'))
    assert (reply.check, reply.reason) == ("requirements", 'requirements: arch == "riscv64" (arch is "x86_64")')


def test_a_retried_start_with_the_same_bundle_gets_the_same_answer():
    link = Link()
    first = link.start()
    again = link.start()
    assert isinstance(again, StatusReply) and again.state == first.state
    assert len(link.host.statuses()) == 1


def test_stop_is_allowed_to_the_key_that_started_the_replica_and_to_the_owner_only():
    link = Link()
    link.start()
    colleague = RemoteClient(COLLEAGUE, random.Random(2))
    colleague.stop("node", NODE.node_id, "web-1", NOW)
    (_, request), = colleague.messages_to_send()
    link.deliver(request)
    (_, reply), = link.node.messages_to_send()
    assert reply.check == "authorization" and "did not start web-1" in reply.reason
    reply = link.ask(lambda c, t: c.stop("node", NODE.node_id, "web-1", t))
    assert isinstance(reply, StatusReply) and reply.state == "stopped"  # nothing was running yet
    owner = RemoteClient(NODE, random.Random(3))
    owner.stop("node", NODE.node_id, "web-1", NOW)
    (_, request), = owner.messages_to_send()
    link.deliver(request)
    (_, reply), = link.node.messages_to_send()
    assert isinstance(reply, StatusReply)


def test_a_finished_replicas_id_starts_again_for_the_key_that_started_it_only():
    link = Link()
    link.start()
    assert link.ask(lambda c, t: c.stop("node", NODE.node_id, "web-1", t)).state == "stopped"
    colleague = RemoteClient(COLLEAGUE, random.Random(2))
    colleague.start("node", NODE.node_id, "web-1", signed_bundle(), NOW)
    (_, request), = colleague.messages_to_send()
    link.deliver(request)
    (_, reply), = link.node.messages_to_send()
    assert reply.check == "authorization" and "web-1 was started by another key" in reply.reason
    again = link.start()
    assert isinstance(again, StatusReply) and again.state == "installing"
    assert len([e for e in link.host_events if isinstance(e, InstallBundle)]) == 2
    assert link.host.admission.holders() == ("web-1",)


def test_status_of_a_replica_and_of_an_unknown_one():
    link = Link()
    link.start()
    link.host.report(Installed("web-1", True), NOW)
    reply = link.ask(lambda c, t: c.query("node", NODE.node_id, "web-1", t))
    assert (reply.state, reply.run) == ("starting", 1)
    reply = link.ask(lambda c, t: c.query("node", NODE.node_id, "nope", t))
    assert (reply.check, reply.reason) == ("replica", "replica: no replica nope on this node")


def test_logs_are_read_by_the_driver_and_sent_back():
    link = Link()
    link.start()
    request_id = link.client.fetch_logs("node", NODE.node_id, "web-1", NOW, max_bytes=100)
    link.flush()
    (asked,) = [e for e in link.node_events if isinstance(e, LogsRequested)]
    assert (asked.replica_id, asked.max_bytes) == ("web-1", 100)
    link.node.answer_logs(asked.token, b"hello\n", NOW + 0.1)
    link.flush(NOW + 0.1)
    answer = link.client.next_event()
    assert answer == RequestAnswered(request_id, LogsReply(request_id, "web-1", b"hello\n"))


def test_logs_the_driver_never_reads_are_refused_after_a_while():
    link = Link()
    link.start()
    link.client.fetch_logs("node", NODE.node_id, "web-1", NOW)
    link.flush()
    link.node.handle_timer(NOW + 11)
    link.flush(NOW + 11)
    answer = link.client.next_event()
    assert answer.reply.check == "busy" and answer.reply.reason == "logs: the node did not read the logs in time"


def test_a_node_that_remembers_too_many_nonces_refuses_new_requests_as_busy():
    link = Link(config=RemoteConfig(max_nonces=2))
    link.start("web-1")
    link.start("web-2")
    assert link.start("web-3").check == "busy"


def test_log_reads_beyond_the_cap_are_refused_as_busy(monkeypatch):
    monkeypatch.setattr(protocol_module, "MAX_LOGS_WAITING", 1)
    link = Link()
    link.start()
    link.client.fetch_logs("node", NODE.node_id, "web-1", NOW)
    link.flush()
    second = link.ask(lambda c, t: c.fetch_logs("node", NODE.node_id, "web-1", t))
    assert second.check == "busy" and "1 log reads are waiting" in second.reason
    (asked,) = [e for e in link.node_events if isinstance(e, LogsRequested)]
    link.node.answer_logs(asked.token, b"x", NOW)  # a slot is free again: the next read waits for the driver
    link.client.fetch_logs("node", NODE.node_id, "web-1", NOW)
    link.flush()
    assert len([e for e in link.node_events if isinstance(e, LogsRequested)]) == 2


def test_a_client_at_its_cap_raises_and_a_request_it_could_not_make_is_not_waited_for(monkeypatch):
    monkeypatch.setattr(protocol_module, "MAX_CLIENT_REQUESTS", 1)
    client = RemoteClient(DEPLOYER, random.Random(1))
    with pytest.raises(ValueError, match="max_bytes"):
        client.fetch_logs("node", NODE.node_id, "web-1", NOW, max_bytes=-1)
    first = client.query("node", NODE.node_id, "web-1", NOW)
    with pytest.raises(RequestsFull):
        client.query("node", NODE.node_id, "web-2", NOW)
    client.handle_timer(NOW + 10)
    assert client.next_event() == RequestTimedOut(first, "QueryReplica") and client.next_event() is None
    assert [type(m) for _, m in client.messages_to_send()] == [QueryReplica]


def test_a_request_nobody_answers_times_out_at_the_client():
    client = RemoteClient(DEPLOYER, random.Random(1), timeout_s=10)
    request_id = client.query("node", NODE.node_id, "web-1", NOW)
    client.handle_timer(NOW + 10)
    assert client.next_event() == RequestTimedOut(request_id, "QueryReplica")


def test_replies_from_the_wrong_address_or_for_unknown_requests_are_dropped():
    client = RemoteClient(DEPLOYER, random.Random(1))
    request_id = client.query("node", NODE.node_id, "web-1", NOW)
    client.receive("elsewhere", Refused(request_id, "trust", "x"), NOW)
    client.receive("node", Refused(12345, "trust", "x"), NOW)
    assert client.next_event() is None and client.dropped["unsolicited_reply"] == 2


def test_requests_survive_the_wire_and_malformed_ones_are_dropped_at_decode():
    request = sign_request(QueryReplica(7, NODE.node_id, DEPLOYER.public_key, b"n" * 16, NOW, "web-1"), DEPLOYER)
    assert crossed(request) == request
    for message in (StopReplica(1, 2, DEPLOYER.public_key, b"n" * 16, NOW, "x"), FetchLogs(1, 2, DEPLOYER.public_key, b"n" * 16, NOW, "x", 10)):
        assert crossed(message) == message
    envelope = cbor2.loads(wire.encode(request))
    envelope[2][3] = b"short nonce"
    decoded = wire.decode(cbor2.dumps(envelope), limit_bytes=wire.STREAM_LIMIT_BYTES)
    assert isinstance(decoded, wire.DecodeError) and decoded.kind == "malformed"
    with pytest.raises(ValueError, match="nonce must be 16 bytes"):
        StartReplica(1, 2, DEPLOYER.public_key, b"short", NOW, "x", b"", b"", b"", {})


def test_requests_of_unknown_keys_do_not_fill_the_nonce_cache():
    link = Link(client_identity=STRANGER, config=RemoteConfig(max_nonces=1))
    for replica in ("a", "b", "c"):
        assert link.start(replica).check == "trust"
    trusted = Link(config=RemoteConfig(max_nonces=1))
    trusted.node = link.node  # the same node, now asked by a trusted key
    trusted.host = link.host
    assert isinstance(trusted.start("web-1"), StatusReply)


def test_a_driver_parses_a_trusted_starts_bundle_ahead_and_the_start_uses_what_it_found():
    link = Link(config=RemoteConfig(parse_bundles_ahead=True))
    trusted, strangers = signed_bundle(), signed_bundle(signer=STRANGER)
    link.client.start("node", NODE.node_id, "web-1", trusted, NOW)
    link.client.start("node", NODE.node_id, "web-2", strangers, NOW)
    (_, start), (_, stranger_start) = link.client.messages_to_send()
    assert not Link().node.worth_parsing_ahead(crossed(start))  # a driver that parses in place (the simulator)
    assert link.node.worth_parsing_ahead(crossed(start))
    assert not link.node.worth_parsing_ahead(crossed(stranger_start))  # refused without reading it
    forged = dataclasses.replace(crossed(start), bundle_signature=bytes(64))
    assert not link.node.worth_parsing_ahead(forged)
    # what the driver found is what the start goes by (here a refusal, to show it is used)
    link.node.bundle_parsed(trusted.data, BundleError("bundle: found wanting ahead"))
    link.deliver(start)
    ((_, reply),) = link.node.messages_to_send()
    assert isinstance(reply, Refused) and (reply.check, reply.reason) == ("bundle", "bundle: found wanting ahead")
