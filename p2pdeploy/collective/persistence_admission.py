"""Storage admission of replicated persistence: who may fill this node's store, and for how long.

A node stores for its community, not for whoever asks: storage beyond a small quota needs a
signature by a key the node trusts (the security model). What decides, here:

- **pins** (:class:`~p2pdeploy.collective.persistence_messages.Pin`): a chunk is wanted while
  this node holds a pin of it that is signed, unexpired, and by a key it trusts (its owner's
  ``trusted_keys``, or its own key). The pin travels with every copy of the chunk, so repair
  and hand-off between holders keep the publisher's authority without its key (a member storing
  on a deployer's behalf). An eventual record carries its own authority: its writer signs it.
- **quotas**: a chunk or record without that authority (a stranger's, or a member's whose key
  this node does not trust; a quorum record's accepted value too) is kept only within
  ``stranger_quota_bytes`` per sender (per writer, for records) and ``stranger_share`` of the
  store in all, each item weighing at least ``MIN_CHARGE_BYTES``. Beyond them the ``Stored``
  reply says why (a refused ``Accept`` is an ``Accepted`` that is not ok), the refusal is
  counted (``store_unauthorized``) and nothing changes. Such data is never repaired or handed
  off by this node, and trusted data evicts it when the store is full. What it weighs is
  tallied as it arrives and counted afresh with every repair round.
- **service state**: a service state record (:mod:`p2pdeploy.collective.records`) lives under
  a key its name derives, so any key can sign a version of it; this node keeps one only from a
  key it trusts (the trust by which it runs the replicas a service's manager starts) or from the
  service's owner, and refuses the rest with the reason (counted, ``service_state_refused``).
- **replication cap**: a copy that asks for more than ``max_replicas`` copies is kept with
  ``max_replicas`` (counted, ``replicas_clamped``), so no repair spreads a key wider; a stranger's
  copy of a key held already changes nothing.
- **collection**: with every repair round, a chunk without a live trusted pin is deleted
  ``unpinned_grace_s`` after it was stored or its last pin expired (garbage collection of unpinned
  data, as content stores such as IPFS do); a chunk this node keeps by its own choice (``keep``)
  never is. An eventual record by a writer this node does not trust goes ``unpinned_grace_s``
  after this node stored its version (the writer keeps it by writing a newer one), and such a
  writer's quorum record ``stranger_quorum_grace_s`` after this node last promised or accepted on
  it (:class:`~p2pdeploy.collective.persistence_quorum.QuorumAcceptor`, which also bounds and
  forgets the promises that no value followed).
- **refresh**: a publisher re-signs the pins of the chunks it keeps once less than half of
  ``pin_ttl_s`` is left, and its next check of each key brings the new pin to the other holders
  (``StorePin``). Putting a blob again refreshes its pins as well.

Pins cross nodes, so their times are wall-clock seconds: the layer's ``now`` plus the driver's
``wall_clock_offset_s`` (0 in the simulator, whose clock all nodes share).

:class:`Admission` is the part of the :class:`~p2pdeploy.collective.persistence.Persistence`
layer that applies these rules.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Literal

from p2pdeploy.collective.persistence_messages import Pin, StorePin, sign_pin
from p2pdeploy.collective.records import is_service_state, service_state_refusal
from p2pdeploy.overlay.identity import Identity, node_id_of
from p2pdeploy.overlay.storage import Item, item_bytes

if TYPE_CHECKING:
    from p2pdeploy.collective.persistence import PersistenceConfig
    from p2pdeploy.collective.persistence_store import ChunkInfo, DurableStore
    from p2pdeploy.overlay.routing import Contact

#: What the smallest chunk or record weighs in the quotas (a row and a file cost about that
#: much), so a flood of tiny items meets the quota as soon as one of large ones.
MIN_CHARGE_BYTES = 1024
#: Verified pins remembered (a repair round re-reads the same ones); the memory is dropped past it.
MAX_VERIFIED_PINS = 4096

TrustedKeys = frozenset[bytes] | Literal["any"]


class Admission:
    """Pins, quotas, the replication cap and the collection of unpinned chunks of the
    :class:`~p2pdeploy.collective.persistence.Persistence` layer."""

    config: PersistenceConfig
    store: DurableStore
    node_id: int
    counters: Counter[str]
    identity: Identity | None
    trusted_keys: TrustedKeys
    wall_clock_offset_s: float
    _verified: dict[Pin, bool]
    #: Bytes each sender or writer holds here without trusted authority; None: count afresh.
    _usage: Counter[int] | None
    _started_wall: float
    #: Keys whose pin this node renewed: their next check brings the pin to the other holders.
    _pin_news: set[int]
    _peers: dict[int, dict[int, Contact]]

    def trusts(self, public_key: bytes) -> bool:
        """True when data signed by ``public_key`` may use this node's store beyond the quotas."""
        if self.identity is not None and public_key == self.identity.public_key:
            return True
        return self.trusted_keys == "any" or public_key in self.trusted_keys

    def wall(self, now: float) -> float:
        return now + self.wall_clock_offset_s

    def capped(self, replicas: int) -> int:
        if replicas > self.config.max_replicas:
            self.counters["replicas_clamped"] += 1
            return self.config.max_replicas
        return replicas

    # -- pins -------------------------------------------------------------------------------
    def sign_pins(self, signer: Identity, keys: list[int], now: float) -> dict[int, Pin]:
        expires_at = int(self.wall(now) + self.config.pin_ttl_s)
        return {key: sign_pin(signer, key, expires_at) for key in keys}

    def pin_refusal(self, pin: Pin, key: int, now: float) -> str | None:
        """Why ``pin`` does not authorize keeping ``key`` here (``None`` when it does)."""
        wall = self.wall(now)
        if pin.key != key:
            return "its pin names another key"
        if pin.expires_at <= wall:
            return "its pin has expired"
        if pin.expires_at > wall + self.config.max_pin_ttl_s:
            return f"its pin lasts longer than this node accepts ({self.config.max_pin_ttl_s:.0f} s)"
        if not self.trusts(pin.public_key):
            return f"its pin is signed by {pin.public_key.hex()[:16]}…, a key this node does not trust"
        verified = self._verified.get(pin)
        if verified is None:
            if len(self._verified) >= MAX_VERIFIED_PINS:
                self._verified.clear()
            verified = self._verified[pin] = pin.verifies()
        return None if verified else "its pin's signature does not verify"

    def live(self, info: ChunkInfo, now: float) -> bool:
        """True when ``info``'s chunk holds an unexpired pin by a key this node trusts."""
        pin = info.pin
        return pin is not None and pin.expires_at > self.wall(now) and self.trusts(pin.public_key)

    def _stranger_chunk(self, info: ChunkInfo) -> bool:
        return info.pin is None and not info.pinned and info.owner != self.node_id

    # -- admitting copies -------------------------------------------------------------------
    def admit_chunk(self, key: int, data: bytes, replicas: int, pin: Pin | None, sender: int,
                    now: float) -> str | None:
        """Keep the verified chunk ``key`` sent by ``sender`` (this node's id for its own
        copies): ``None``, or why not. A copy without a trusted pin changes nothing held already."""
        replicas = self.capped(replicas)
        why_not_pinned = ""
        if pin is not None:
            refusal = self.pin_refusal(pin, key, now)
            if refusal is not None:
                self.counters["pins_refused"] += 1
                why_not_pinned, pin = f" ({refusal})", None
        current = self.store.chunk_info(key)
        if current is not None:
            if pin is not None:
                if replicas > current.replicas:
                    self.store.update_chunk(key, replicas, current.pinned)
                if current.pin is None or pin.expires_at > current.pin.expires_at:
                    self.store.set_pin(key, pin)
            return None
        wall = self.wall(now)
        if pin is None and sender != self.node_id:
            refusal = self.stranger_refusal(sender, len(data))
            if refusal is not None:
                self.counters["store_unauthorized"] += 1
                return refusal + why_not_pinned
            reason = self.store.write_chunk(key, data, replicas, owner=sender, since=wall)
            if reason is None:
                self._charge(sender, len(data))
            return reason
        reason = self.store.write_chunk(key, data, replicas, pin=pin, owner=sender, since=wall)
        if reason is not None and self._evict_strangers(len(data)):
            reason = self.store.write_chunk(key, data, replicas, pin=pin, owner=sender, since=wall)
        return reason

    def admit_pin(self, msg: StorePin, now: float) -> str | None:
        """A newer pin of a chunk held here: ``None`` once kept, else why not."""
        if self.store.chunk_info(msg.key) is None:
            return "this node does not hold the chunk"
        refusal = self.pin_refusal(msg.pin, msg.key, now)
        if refusal is not None:
            self.counters["pins_refused"] += 1
            return refusal
        return self.admit_chunk(msg.key, b"", 1, msg.pin, msg.sender, now)

    def admit_record(self, item: Item, held: bool) -> str | None:
        """``None`` when a (checked, signed) record, or a quorum record's value, may be kept here
        (``held``: this node holds a version of it already); its writer's key is its authority.
        A service state record, which any key may sign, is kept only from a key this node trusts
        or the service's owner (``service_state_refused`` counts the others), held or not."""
        if is_service_state(item.name):
            refusal = service_state_refusal(item, self.trusts)
            if refusal is not None:
                self.counters["service_state_refused"] += 1
                return refusal
        if held or self.trusts(item.public_key):
            return None  # a record's key names its writer: a held one may be replaced by a newer one
        writer = node_id_of(item.public_key)
        refusal = self.stranger_refusal(writer, item_bytes(item))
        if refusal is not None:
            self.counters["store_unauthorized"] += 1
        else:
            self._charge(writer, item_bytes(item))
        return refusal

    def stranger_refusal(self, owner: int, size: int) -> str | None:
        """Why ``size`` more bytes from ``owner`` without trusted authority do not fit its quota
        or the share of the store such data may take (``None``: they fit)."""
        usage = self._stranger_usage()
        size = max(size, MIN_CHARGE_BYTES)
        quota = self.config.stranger_quota_bytes
        if usage[owner] + size > quota:
            return (f"not authorized: this node keeps at most {quota} bytes per sender that no key it trusts "
                    f"signed ({usage[owner]} held); sign with a trusted key")
        limit = int(self.config.stranger_share * self.store.capacity_bytes)
        if sum(usage.values()) + size > limit:
            return (f"not authorized: data that no key this node trusts signed is at its limit here "
                    f"({limit} bytes in all); sign with a trusted key")
        return None

    def _charge(self, owner: int, size: int) -> None:
        if self._usage is not None:
            self._usage[owner] += max(size, MIN_CHARGE_BYTES)

    def _stranger_usage(self) -> Counter[int]:
        if self._usage is not None:
            return self._usage
        usage: Counter[int] = Counter()
        for info in self.store.chunk_infos():
            if self._stranger_chunk(info):
                usage[info.owner] += max(info.size, MIN_CHARGE_BYTES)
        items = [stored[0] for stored in map(self.store.read_record, self.store.record_keys()) if stored is not None]
        items += [state.item for state in map(self.store.read_acceptor, self.store.acceptor_keys())
                  if state is not None and state.item is not None]
        for item in items:
            if not self.trusts(item.public_key):
                usage[node_id_of(item.public_key)] += max(item_bytes(item), MIN_CHARGE_BYTES)
        self._usage = usage
        return usage

    def _evict_strangers(self, size: int) -> bool:
        """Make room for ``size`` bytes of trusted data by deleting unauthorized chunks, oldest
        first; True when there is room now."""
        free = self.store.capacity_bytes - self.store.used_bytes()
        strangers = sorted((i for i in self.store.chunk_infos() if self._stranger_chunk(i)),
                           key=lambda i: (i.since, i.key))
        for info in strangers:
            if free >= size:
                break
            self.store.delete_chunk(info.key)
            self._peers.pop(info.key, None)
            free += info.size
            self.counters["strangers_evicted"] += 1
            self._usage = None
        return free >= size

    # -- collection and refresh (with every repair round) -----------------------------------
    def collect(self, now: float) -> None:
        """Delete the chunks unpinned for longer than ``unpinned_grace_s`` and the records by
        writers this node does not trust stored as long ago (and count afresh what strangers
        hold: copies can also go by other ways, such as a failed hash check)."""
        self._usage = None
        wall = self.wall(now)
        for info in self.store.chunk_infos():
            if info.pinned or self.live(info, now):
                continue
            since = info.since or self._started_wall  # a copy from before chunks had a time
            if info.pin is not None and self.trusts(info.pin.public_key):
                since = max(since, info.pin.expires_at)
            if wall >= since + self.config.unpinned_grace_s:
                self.store.delete_chunk(info.key)
                self._peers.pop(info.key, None)
                self.counters["collected"] += 1
        for key, since in self.store.record_times().items():
            if wall < (since or self._started_wall) + self.config.unpinned_grace_s:
                continue
            stored = self.store.read_record(key)
            if stored is not None and not self.trusts(stored[0].public_key):
                self.store.delete_record(key)
                self._peers.pop(key, None)
                self.counters["records_collected"] += 1

    def refresh_pins(self, now: float) -> list[int]:
        """Re-sign the pins by this node's key of the chunks it keeps once half their TTL is
        gone; the keys whose pins are new (their next check brings the pins to the holders)."""
        if self.identity is None:
            return []
        wall = self.wall(now)
        renewed = []
        for info in self.store.chunk_infos():
            pin = info.pin
            if info.pinned and pin is not None and pin.public_key == self.identity.public_key and \
                    pin.expires_at - wall < self.config.pin_ttl_s / 2:
                self.store.set_pin(info.key, sign_pin(self.identity, info.key, int(wall + self.config.pin_ttl_s)))
                self._pin_news.add(info.key)
                renewed.append(info.key)
        self.counters["pins_renewed"] += len(renewed)
        return renewed
