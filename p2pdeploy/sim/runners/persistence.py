"""The ``persistence`` runner: blobs stored on the r closest nodes, repaired under churn.

Every node hosts a :class:`~p2pdeploy.core.Stack` of the Kademlia overlay and the
:class:`~p2pdeploy.collective.persistence.Persistence` layer. The network forms as in the
``overlay`` runner (join or oracle build, whose code this runner reuses by subclassing), then:

1. **store** (at ``store_at``, after the build and ``overlay.settle_s``): random nodes store
   ``persistence.blobs`` blobs of ``blob_bytes`` random bytes with ``replicas`` copies per
   chunk; with ``compare_replicas`` the same number of blobs also with r = 1 and r = 2. All
   three classes live through the same churn in the same run, so their losses compare directly
   (one run computes ``blobs_lost``, ``blobs_lost_r1`` and ``blobs_lost_r2``).
2. **churn** from ``churn.start_s``. What a departure means is decided when it happens: with
   probability ``permanent_departures`` the machine is gone for good with its disk (when the
   address comes back it is a new machine: a new id and an empty store); otherwise it is a crash
   or a reboot, and the node comes back with the same id and the store it had (its data
   directory), serving what it held. With probability ``graceful_leaves`` a departing node
   first hands its keys to the next closest nodes (``Persistence.leave``) and goes down when
   that is done; the others crash without warning.
   The blobs are put signed by the community's deployer (one key every node trusts, derived
   from the seed), as ``p2pdeploy deploy`` stores a bundle: their chunks carry its pins.
3. **fetch check** (``fetch_window_s`` before the end): every blob is fetched once from a random
   live node and verified (``fetch_success``).

``blobs_lost`` counts blobs with a chunk (or manifest) of which no copy exists any more on any
disk, up or down-but-coming-back: nothing can bring it back, the blob is lost for good. Repair
traffic is what the layer sends for repair and handoff: the copies it pushes and its check
searches (requests and their answers), sized as on the wire, divided by the number of nodes
and the time from the start of the churn to the end (``repair_bytes_per_node_per_s``, for the
r = ``replicas`` class; ``_r1``/``_r2``/``_all`` beside it). The pings with which holders watch
one another are counted apart (``watch_bytes_per_node_per_s``, in ``_all`` too): one ping serves
every key two nodes share, whatever its class. With ``--out``, ``key_history.csv`` lists what
happened to every copy of the keys of lost blobs (r >= 2): written, dropped, its holder down,
up, or gone for good with its disk.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pdeploy.collective.blobs import split
from p2pdeploy.collective.persistence import (
    BlobFetched,
    BlobStored,
    FindHolders,
    HandedOff,
    HolderPing,
    HolderPong,
    Holders,
    MemoryStore,
    Persistence,
    PersistenceConfig,
    Pin,
    StoreChunk,
    Stored,
    StoreRecord,
)
from p2pdeploy.core import Protocol, Stack
from p2pdeploy.overlay.identity import Identity, node_id_of
from p2pdeploy.overlay.kademlia import Kademlia
from p2pdeploy.sim.runner import register_runner
from p2pdeploy.sim.runners.overlay import OverlayRunner, overlay_table_without_lookups
from p2pdeploy.sim.schema import Field, Tunable, config_from, config_keys
from p2pdeploy.sim.simulation import Simulation

if TYPE_CHECKING:
    from p2pdeploy.sim.scenario import Scenario

@register_runner
class PersistenceRunner(OverlayRunner):
    name = "persistence"
    schema = {
        "overlay": overlay_table_without_lookups("FIND_NODE lookups of random targets (a side workload)"),
        "detector": OverlayRunner.schema["detector"],
        "persistence": {
            **config_keys(
                PersistenceConfig,
                replicas=Tunable("copies of each chunk (r) of the main class of blobs", ge=1, le=16),
                chunk_bytes=Tunable("chunk size", ge=1, le=4 * 1024 * 1024),
                repair_interval_s=Tunable("how often each held key is checked", gt=0),
                scrub_interval_s=Tunable("how often local chunks are re-hashed", gt=0),
                rpc_timeout_s=Tunable("timeout of small requests", gt=0),
            ),
            "compare_replicas": Field(True, bool, "also store as many blobs with r = 1 and r = 2"),
            "blobs": Field(50, int, "blobs stored per replication class", ge=0),
            "blob_bytes": Field(600_000, int, "size of each blob", ge=0),
            "store_window_s": Field(60.0, float, "the puts are spread over this window", ge=0),
            "permanent_departures": Field(0.5, float, "share of departures that lose the disk for good",
                                          ge=0, le=1),
            "graceful_leaves": Field(0.0, float, "share of departures that hand their keys off first",
                                     ge=0, le=1),
            "leave_timeout_s": Field(60.0, float, "a graceful leave goes down after this at the latest", gt=0),
            "fetch_window_s": Field(300.0, float, "every blob is fetched once in this window before the end",
                                    ge=0),
        },
    }

    @classmethod
    def check(cls, scenario: Scenario) -> None:
        super().check(scenario)
        s = scenario.values["persistence"]
        store_at = scenario.values["overlay"]["settle_s"]
        if s["fetch_window_s"] and scenario.values["duration_s"] - s["fetch_window_s"] <= store_at:
            raise scenario.error("persistence.fetch_window_s", "must end after the blobs are stored")

    def __init__(self, scenario: Scenario, sim: Simulation) -> None:
        super().__init__(scenario, sim)
        p = scenario.section("persistence")
        self.p = p
        self.pconfig = config_from(p, PersistenceConfig)
        nodes = len(sim.hosts)
        #: key -> what happened to its copies: (time, address, generation, what), for blobs.csv's
        #: companion key_history.csv (written for the keys of lost blobs).
        self.key_log: dict[int, list[tuple[float, int, int, str]]] = {}
        self.generation = [0] * nodes
        self.stores: list[MemoryStore] = [self._new_store(a) for a in range(nodes)]
        self.churn_rng = sim.streams.get("persistence-churn")
        self.blob_rng = sim.streams.get("persistence-blobs")
        self.classes = [p["replicas"]] + ([r for r in (1, 2) if r != p["replicas"]] if p["compare_replicas"] else [])
        #: blob id -> (replication class, keys of its manifest and chunks)
        self.blobs: dict[int, tuple[int, list[int]]] = {}
        self.stored: dict[int, int] = {}  # blob id -> copies reached when stored
        self.store_failures = 0
        self.fetches: dict[int, bool] = {}
        self.fetch_failures: dict[int, tuple[int, float, str]] = {}
        self.pending_ops: dict[tuple[int, int], tuple[str, int]] = {}  # (address, query) -> (what, blob)
        self.leaving: set[int] = set()
        self.leaving_permanently: dict[int, bool] = {}
        self.repair_bytes: dict[int, int] = {r: 0 for r in (*self.classes, 0)}
        self.repair_rpcs: dict[int, int] = {}
        #: What nodes spend probing the other holders of their keys (pings and answers, any class).
        self.watch_bytes = 0
        self._watch_size: dict[type, int] = {}
        self._holders_size: dict[tuple[int, bool], int] = {}
        self.unavailable_max = 0
        #: Per metrics sample from the end of the stores: the share of main-class keys with < r live copies.
        self.under_replicated: list[float] = []
        self._sampled_at = -1.0
        #: The longest time a main-class key was seen with fewer than r live copies (sampled).
        self.under_longest_s = 0.0
        self._under_since: dict[int, float] = {}
        self._sample = (0, 0)
        self.departures_permanent = 0
        self.handed_off = 0  # graceful departures whose keys were all offered before going down
        self.store_done_at = self.store_at + p["store_window_s"]
        #: The key every node trusts, which signs the pins of the blobs.
        self.deployer = Identity.from_seed(sim.streams.bytes("persistence-deployer"))

    # -- building --------------------------------------------------------------------------
    def stack(self, address: int, overlay: Kademlia) -> Protocol:
        host = self.sim.hosts[address]
        rng = self.sim.streams.fresh("persistence", address, host.incarnation + 1)
        layer = Persistence(overlay, self.stores[address], rng, self.sim.now, own_address=address,
                            config=self.pconfig, trusted_keys=frozenset({self.deployer.public_key}))
        return _MeteredStack([*self.below_overlay[address], overlay, layer], self)

    def start(self) -> None:
        super().start()
        engine = self.sim.engine
        for r in self.classes:
            for _ in range(self.p["blobs"]):
                at = self.store_at + self.blob_rng.uniform(0, self.p["store_window_s"])
                engine.schedule(at, self._put_blob, r, self.blob_rng.randbytes(self.p["blob_bytes"]))
        duration = self.scenario.values["duration_s"]
        if self.p["fetch_window_s"]:
            fetch_at = duration - self.p["fetch_window_s"]
            engine.schedule(fetch_at, self._fetch_all, fetch_at)

    # -- churn -----------------------------------------------------------------------------
    def on_down(self, address: int) -> None:
        if address in self.leaving or not self.sim.hosts[address].up:
            return
        permanent = self.churn_rng.random() < self.p["permanent_departures"]
        graceful = self.churn_rng.random() < self.p["graceful_leaves"]
        if permanent:
            self.departures_permanent += 1
        if graceful and self.joined_at[address] is not None:
            self.leaving.add(address)
            self.leaving_permanently[address] = permanent
            query = self.sim.hosts[address].call(_leave)
            if address in self.leaving:  # still handing off
                self.pending_ops[(address, query)] = ("leave", 0)
            self.sim.engine.schedule(self.sim.now + self.p["leave_timeout_s"], self._leave_timed_out, address)
            return
        self._go_down(address, permanent)

    def _leave_done(self, address: int) -> None:
        if address in self.leaving:
            self._go_down(address, self.leaving_permanently.pop(address, False))

    def _leave_timed_out(self, address: int) -> None:
        if address in self.leaving:
            self._go_down(address, self.leaving_permanently.pop(address, False))

    def _go_down(self, address: int, permanent: bool) -> None:
        self.leaving.discard(address)
        if not self.sim.hosts[address].up:
            return
        for key in [k for k in self.pending_ops if k[0] == address]:
            del self.pending_ops[key]
        super().on_down(address)
        self._log_holdings(address, "disk lost" if permanent else "down")
        if permanent:  # the disk is gone; a new machine will take the address
            self.generation[address] += 1
            self.stores[address] = self._new_store(address)
            old = self.node_ids[address]
            new = node_id_of(self.sim.streams.bytes("identity", address, self.generation[address]))
            self.address_of.pop(old, None)
            self.node_ids[address] = new
            self.address_of[new] = address

    def on_up(self, address: int) -> None:
        if address in self.leaving:
            self._go_down(address, self.leaving_permanently.pop(address, False))
        super().on_up(address)
        self._log_holdings(address, "up")

    def _new_store(self, address: int) -> MemoryStore:
        return _LoggedStore(self, address)

    def _log(self, address: int, key: int, what: str) -> None:
        log = self.key_log.get(key)
        if log is None:
            log = self.key_log[key] = []
        log.append((self.sim.now, address, self.generation[address], what))

    def _log_holdings(self, address: int, what: str) -> None:
        for info in self.stores[address].chunk_infos():
            self._log(address, info.key, what)

    # -- workload --------------------------------------------------------------------------
    def _put_blob(self, replicas: int, data: bytes) -> None:
        address = self._random_live(joined_only=True)
        if address is None:
            self.store_failures += 1
            return
        chunked = split(data, self.pconfig.chunk_bytes, replicas)
        keys = [chunked.blob_id, *dict(chunked.chunks)]
        self.blobs[chunked.blob_id] = (replicas, keys)
        query = self.sim.hosts[address].call(partial(_put_blob, data, replicas, self.deployer))
        self.pending_ops[(address, query)] = ("put", chunked.blob_id)

    def _fetch_all(self, fetch_at: float) -> None:
        spread = self.p["fetch_window_s"] / 2
        for blob_id in sorted(self.blobs):
            self.sim.engine.schedule(fetch_at + self.blob_rng.uniform(0, spread), self._fetch, blob_id)

    def _fetch(self, blob_id: int) -> None:
        address = self._random_live(joined_only=True)
        if address is None:
            return
        self.fetches[blob_id] = False
        query = self.sim.hosts[address].call(partial(_get_blob, blob_id))
        self.pending_ops[(address, query)] = ("get", blob_id)

    # -- events ----------------------------------------------------------------------------
    def on_event(self, address: int, event: Any) -> None:
        kind = type(event)
        if kind is HandedOff:  # (it may come at once, inside the call that started the leave)
            self.pending_ops.pop((address, event.query_id), None)
            if address in self.leaving:
                self.handed_off += 1
                # go down once the host has sent what the core queued with this event (the copies)
                self.sim.engine.schedule(self.sim.now, self._leave_done, address)
            return
        if kind in (BlobStored, BlobFetched):
            what = self.pending_ops.pop((address, event.query_id), None)
            if what is None:
                return
            if kind is BlobStored:
                self.stored[event.blob_id] = event.replicas
                if not event.ok:
                    self.store_failures += 1
            elif kind is BlobFetched:
                self.fetches[event.blob_id] = event.found
                if not event.found:
                    self.fetch_failures[event.blob_id] = (address, self.sim.now, event.reason)
            return
        super().on_event(address, event)

    def meter(self, out: list[tuple[Any, Any]]) -> None:
        """Count the repair traffic among the messages a node is sending (sized as on the wire)."""
        size_of = self.sim.network.size_of
        rpcs = self.repair_rpcs
        for _, msg in out:
            kind = type(msg)
            if kind is StoreChunk or kind is StoreRecord:
                if msg.purpose:
                    self.repair_bytes[msg.replicas] = self.repair_bytes.get(msg.replicas, 0) + size_of(msg)
                    rpcs[msg.rpc_id] = msg.replicas
            elif kind is FindHolders:
                if msg.check:
                    self.repair_bytes[msg.replicas] = self.repair_bytes.get(msg.replicas, 0) + size_of(msg)
                    rpcs[msg.rpc_id] = msg.replicas
            elif kind is HolderPing or kind is HolderPong:
                size = self._watch_size.get(kind)
                if size is None:  # about the same for every ping: sized once
                    size = self._watch_size[kind] = size_of(msg)
                self.watch_bytes += size
            elif kind is Holders or kind is Stored:
                r = rpcs.pop(msg.rpc_id, None)
                if r is not None:
                    self.repair_bytes[r] = self.repair_bytes.get(r, 0) + self._small_size(msg)

    def write(self, out_dir: Path) -> list[Path]:
        return [_write_blobs(self, out_dir), _write_key_history(self, out_dir)]

    def _small_size(self, msg: Any) -> int:
        """The wire size of an answer; an answer without a record is sized once per shape."""
        if type(msg) is Holders and msg.item is None:
            shape = (len(msg.contacts), all(type(c.address) is int for c in msg.contacts))
            size = self._holders_size.get(shape)
            if size is None:
                size = self._holders_size[shape] = self.sim.network.size_of(msg)
            return size
        return self.sim.network.size_of(msg)

    # -- results ---------------------------------------------------------------------------
    def _held_keys(self, live_only: bool = False) -> set[int]:
        held: set[int] = set()
        for address, store in enumerate(self.stores):
            if live_only and not self.sim.hosts[address].up:
                continue
            held.update(info.key for info in store.chunk_infos())
        return held

    def gauges(self) -> dict[str, Any]:
        return {
            "keys_without_live_copy": lambda: self._replication_sample()[0],
            "keys_under_replicated": lambda: self._replication_sample()[1],
            "blobs_fetched": lambda: len(self.fetches),
        }

    def _replication_sample(self) -> tuple[int, int]:
        """Keys of the main class with no live copy, and with fewer than r live copies, now."""
        now = self.sim.now
        if self._sampled_at == now:
            return self._sample
        self._sampled_at = now
        if now < self.store_done_at or not self.blobs:
            self._sample = (0, 0)
            return self._sample
        copies: dict[int, int] = {}
        for address, store in enumerate(self.stores):
            if self.sim.hosts[address].up:
                for info in store.chunk_infos():
                    copies[info.key] = copies.get(info.key, 0) + 1
        main = self.p["replicas"]
        keys = [k for r, ks in self.blobs.values() if r == main for k in ks]
        missing = sum(1 for k in keys if k not in copies)
        under = 0
        for key in keys:
            if copies.get(key, 0) < main:
                under += 1
                self._under_since.setdefault(key, now)
            elif key in self._under_since:
                self.under_longest_s = max(self.under_longest_s, now - self._under_since.pop(key))
        self.unavailable_max = max(self.unavailable_max, missing)
        self.under_replicated.append(under / len(keys) if keys else 0.0)
        self._sample = (missing, under)
        return self._sample

    def summary(self) -> dict[str, Any]:
        out = self.without_unasked_lookups(super().summary())
        held = self._held_keys()
        lost = {r: 0 for r in self.classes}
        for r, keys in self.blobs.values():
            if any(key not in held for key in keys):
                lost[r] += 1
        duration = self.scenario.values["duration_s"]
        churn = self.scenario.values["churn"]
        since = churn["start_s"] if churn["model"] != "none" else self.store_done_at
        per_node_s = len(self.sim.hosts) * max(duration - since, 1e-9)
        main = self.p["replicas"]
        out.update({
            "blobs": len(self.blobs),
            "blobs_stored_ok": sum(1 for b in self.blobs if self.stored.get(b, 0) >= self.blobs[b][0]),
            "blobs_lost": lost[main],
            "blobs_lost_r1": lost.get(1) if main != 1 else lost[main],
            "blobs_lost_r2": lost.get(2) if main != 2 else lost[main],
            "repair_bytes_per_node_per_s": round(self.repair_bytes.get(main, 0) / per_node_s, 3),
            "repair_bytes_per_node_per_s_r1": _rate(self.repair_bytes.get(1), per_node_s),
            "repair_bytes_per_node_per_s_r2": _rate(self.repair_bytes.get(2), per_node_s),
            "repair_bytes_per_node_per_s_all": round((sum(self.repair_bytes.values()) + self.watch_bytes)
                                                     / per_node_s, 3),
            "watch_bytes_per_node_per_s": round(self.watch_bytes / per_node_s, 3),
            "fetch_success": round(sum(self.fetches.values()) / len(self.fetches), 6) if self.fetches else None,
            "keys_without_live_copy_max": self.unavailable_max,
            "keys_under_replicated_mean": round(sum(self.under_replicated) / len(self.under_replicated), 6)
            if self.under_replicated else None,
            "keys_under_replicated_longest_s": max([self.under_longest_s, *(
                self.sim.now - since for since in self._under_since.values())]),
            "departures_permanent": self.departures_permanent,
            "graceful_leaves_handed_off": self.handed_off,
            "repair_interval_s": self.pconfig.repair_interval_s,
        })
        return out


def _write_blobs(runner: PersistenceRunner, out_dir: Path) -> Path:
    """One line per blob: its class, whether it is lost, what the final fetch gave."""
    held = runner._held_keys()
    live = runner._held_keys(live_only=True)
    path = out_dir / "blobs.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["blob_id", "replicas", "keys", "stored_copies", "lost", "keys_without_live_copy",
                         "fetched", "fetch_failure"])
        for blob_id, (replicas, keys) in sorted(runner.blobs.items()):
            failure = runner.fetch_failures.get(blob_id)
            writer.writerow([f"{blob_id:040x}", replicas, len(keys), runner.stored.get(blob_id, 0),
                             int(any(k not in held for k in keys)), sum(1 for k in keys if k not in live),
                             "" if blob_id not in runner.fetches else int(runner.fetches[blob_id]),
                             failure[2] if failure else ""])
    return path


def _write_key_history(runner: PersistenceRunner, out_dir: Path) -> Path:
    """For each key of a lost blob (r >= 2): every copy written or dropped, and every holder
    going down (``down``: coming back with its disk; ``disk lost``: gone for good) or up again."""
    held = runner._held_keys()
    path = out_dir / "key_history.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["blob_id", "replicas", "key", "lost", "time_s", "address", "generation", "event"])
        for blob_id, (replicas, keys) in sorted(runner.blobs.items()):
            if replicas < 2 or all(k in held for k in keys):
                continue
            for key in keys:
                for at, address, generation, what in runner.key_log.get(key, []):
                    writer.writerow([f"{blob_id:040x}", replicas, f"{key:040x}", int(key not in held),
                                     round(at, 3), address, generation, what])
    return path


class _LoggedStore(MemoryStore):
    """A node's store that tells the runner when a copy appears or goes (diagnostics only)."""

    def __init__(self, runner: PersistenceRunner, address: int) -> None:
        super().__init__()
        self._runner = runner
        self._address = address

    def write_chunk(self, key: int, data: bytes, replicas: int, pinned: bool = False, *, pin: Pin | None = None,
                    owner: int = 0, since: float = 0.0) -> str | None:
        new = key not in self._chunks
        reason = super().write_chunk(key, data, replicas, pinned, pin=pin, owner=owner, since=since)
        if new and reason is None:
            self._runner._log(self._address, key, "write")
        return reason

    def delete_chunk(self, key: int) -> None:
        if key in self._chunks:
            self._runner._log(self._address, key, "drop")
        super().delete_chunk(key)


def _rate(total: int | None, per_node_s: float) -> float | None:
    return None if total is None else round(total / per_node_s, 3)


class _MeteredStack(Stack):
    """A node's stack whose outgoing repair traffic the runner counts."""

    def __init__(self, layers: Iterable[Protocol], runner: PersistenceRunner) -> None:
        super().__init__(layers)
        self._runner = runner

    def messages_to_send(self) -> list[tuple[Any, Any]]:
        out = super().messages_to_send()
        if out:
            self._runner.meter(out)
        return out


def persistence_of(core: Protocol) -> Persistence:
    assert isinstance(core, Stack)
    return core.layer(Persistence)


def _put_blob(data: bytes, replicas: int, signer: Identity, core: Protocol, now: float) -> int:
    return persistence_of(core).put_blob(data, now, replicas=replicas, signer=signer)


def _get_blob(blob_id: int, core: Protocol, now: float) -> int:
    return persistence_of(core).get_blob(blob_id, now)


def _leave(core: Protocol, now: float) -> int:
    return persistence_of(core).leave(now)
