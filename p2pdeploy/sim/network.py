"""The modelled network: per-pair latency, jitter, loss, and bandwidth for large messages.

Latency between two nodes is fixed per pair and symmetric; a message's one-way delay is that
latency plus jitter. The pairwise latency comes from one of four models:

- ``euclidean`` (synthetic coordinates, as in Vivaldi's view of the Internet): every node gets a
  point uniform in the unit square, and latency = ``base_latency_ms`` + distance ×
  ``latency_scale_ms``. Median over random pairs ≈ base + 0.52 × scale.
- ``constant``: latency = ``base_latency_ms`` for every pair.
- ``uniform``: latency = base + U(0, ``latency_scale_ms``), drawn once per pair.
- ``lognormal``: latency = base + a log-normal draw with median ``latency_scale_ms`` and shape
  ``latency_sigma``, once per pair.

The pairwise draws of ``uniform`` and ``lognormal`` come from a hash of (seed, pair), so a pair's
latency does not depend on which pairs happened to talk first, and nothing of size n² is stored.

Jitter is U(0, ``jitter_ms``) per message, so a message is never faster than its pair's latency
and datagrams may overtake each other, as over UDP.

Messages up to ``large_message_bytes`` are datagrams: each is lost independently with
probability ``loss``, and its size costs no time. Larger messages travel by stream, as the trio
runtime sends them over TCP: they are not lost, and they go through a FIFO pipe at each end: the
sender's uplink (``upload_bytes_per_s``) and, from the arrival of its first byte, the receiver's
downlink (``download_bytes_per_s``). One large message alone on the path is delivered
``latency + size / min(upload, download)`` after it was sent; several from one sender queue
behind each other. There is no fair sharing between concurrent streams and no congestion model.

Messages travel as bytes, as over a real socket (``encode = true``, the default): the sender's
message goes through :func:`p2pdeploy.wire.encode` with the stream limit the trio runtime uses
(``wire.STREAM_LIMIT_BYTES``), its encoded length decides datagram or stream and is the size
the bandwidth model charges, and the receiver gets :func:`p2pdeploy.wire.decode` of the bytes,
with the limit of the path they took: ``large_message_bytes`` for a datagram (by default
``wire.DATAGRAM_LIMIT_BYTES``, the runtime's UDP limit), ``wire.STREAM_LIMIT_BYTES`` for a
stream. A message the sender cannot encode is dropped and counted (``dropped["encode_error"]``),
as the runtime's node counts it; a payload the receiver cannot decode is dropped and counted by
its :class:`p2pdeploy.wire.DecodeError` kind (``malformed``, ``oversized``, ``unknown_type``,
``bad_version``) and never reaches the core. :meth:`Network.inject` hands a node raw bytes, as
a hostile or broken peer would.

With ``encode = false`` messages travel as Python objects, never encoded, for speed. Their size
matters only above the large-message threshold, so :class:`WireSizer` bounds a message's size
from its field values cheaply and calls :func:`p2pdeploy.wire.encode` for the exact size only
when that bound exceeds the threshold; pass another ``size_of`` to :class:`Network` to change
this.

A message to a node that is down when it arrives is dropped and counted (``dropped["down"]``);
a message to an address that is not a node is dropped and counted (``dropped["unknown_address"]``).
Messages already in flight when their sender crashes are still delivered.

:meth:`Network.partition` splits the nodes into groups: a message between two groups is dropped
and counted (``dropped["partitioned"]``) when it is sent across the cut or arrives across it
(so what was in flight when the cut came is lost too); :meth:`Network.heal` joins them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import statistics
import sys
import typing
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pdeploy import wire
from p2pdeploy.core import require_at_least, require_positive

if TYPE_CHECKING:
    from p2pdeploy.sim.engine import Engine, Streams
    from p2pdeploy.sim.host import SimNode

LATENCY_MODELS = ("euclidean", "constant", "uniform", "lognormal")


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The network model's knobs; the scenario's ``[network]`` table maps onto these fields."""

    latency_model: str = "euclidean"
    base_latency_ms: float = 10.0
    latency_scale_ms: float = 100.0
    latency_sigma: float = 0.5
    jitter_ms: float = 0.0
    loss: float = 0.0
    upload_bytes_per_s: float = 1_250_000.0
    download_bytes_per_s: float = 1_250_000.0
    large_message_bytes: int = wire.DATAGRAM_LIMIT_BYTES
    encode: bool = True

    def __post_init__(self) -> None:
        if self.latency_model not in LATENCY_MODELS:
            raise ValueError(f"latency_model must be one of {', '.join(LATENCY_MODELS)} (got {self.latency_model!r})")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be between 0 and 1 (got {self.loss})")
        require_at_least(self, "", 0, "base_latency_ms", "latency_scale_ms", "jitter_ms", "large_message_bytes")
        require_positive(self, "", "latency_sigma", "upload_bytes_per_s", "download_bytes_per_s")


class WireSizer:
    """The wire size of a message, computed exactly only when it may exceed ``threshold_bytes``.

    Calling it returns an int: the exact ``len(wire.encode(msg))`` when a cheap upper bound
    is over the threshold, otherwise that bound (then at most the threshold). The bound comes
    from a plan made once per message class from its field annotations: fixed-size fields
    (``float``, ``bool``, ``NodeId``, and ``int``, which wire messages use for values that fit
    64 bits) cost a constant, ``bytes`` fields their length, other fields (strings, sequences,
    maps, records) a bound computed from their value. Messages that are not registered with
    :mod:`p2pdeploy.wire` get the bound.
    """

    __slots__ = ("threshold_bytes", "_plans")

    def __init__(self, threshold_bytes: int) -> None:
        self.threshold_bytes = threshold_bytes
        self._plans: dict[type, tuple[int, tuple[str, ...], tuple[str, ...]] | None] = {}

    def __call__(self, msg: Any) -> int:
        bound = self.bound(msg)
        if bound <= self.threshold_bytes:
            return bound
        try:
            return len(wire.encode(msg))
        except wire.WireError:
            return bound

    def bound(self, value: Any) -> int:
        """An upper bound on the CBOR size of ``value`` (a message, record or plain value)."""
        kind = type(value)
        if kind is int:
            return 9 if -(1 << 64) < value < (1 << 64) else 9 + (value.bit_length() + 7) // 8
        if kind is float or kind is bool or value is None:
            return 9
        if kind is bytes:
            return 9 + len(value)
        if kind is str:
            return 9 + 4 * len(value)  # at most four UTF-8 bytes per character
        if kind is list or kind is tuple:
            total = 9
            bound = self.bound
            for item in value:
                total += bound(item)
            return total
        if kind is dict:
            return 9 + sum(self.bound(k) + self.bound(v) for k, v in value.items())
        try:
            plan = self._plans[kind]
        except KeyError:
            plan = self._plans[kind] = _size_plan(kind)
        if plan is None:
            return 9 + len(repr(value))  # an arbitrary object: a generous guess
        # A message or record: [version, tag, [fields...]] headers and its fixed-size fields are
        # the plan's constant; bytes fields cost their length, the others a bound of their value.
        total, byte_fields, other_fields = plan
        for name in byte_fields:
            total += len(getattr(value, name))
        for name in other_fields:
            total += self.bound(getattr(value, name))
        return total


_FIXED_FIELD_BYTES = {int: 9, float: 9, bool: 1, wire.NodeId: 1 + wire.ID_BYTES}


def _size_plan(cls: type) -> tuple[int, tuple[str, ...], tuple[str, ...]] | None:
    """``(constant bytes, bytes fields, other fields)`` for a dataclass message, else ``None``."""
    if not dataclasses.is_dataclass(cls):
        return None
    try:
        namespace = dict(vars(sys.modules[cls.__module__]))
        namespace.update({"NodeId": wire.NodeId, "Address": wire.Address})
        hints = typing.get_type_hints(cls, globalns=namespace)
    except Exception:  # unresolvable annotations: fall back to bounding values
        return None
    constant = 8  # array headers, version and tag
    byte_fields: list[str] = []
    other_fields: list[str] = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        fixed = _FIXED_FIELD_BYTES.get(hint) if isinstance(hint, Hashable) else None
        if fixed is not None:
            constant += fixed
        elif hint is bytes:
            constant += 9
            byte_fields.append(f.name)
        else:
            other_fields.append(f.name)
    return constant, tuple(byte_fields), tuple(other_fields)


#: Why the network dropped a message: the keys of :attr:`Network.dropped`, in report order.
DROP_REASONS = ("loss", "down", "unknown_address", "partitioned", "encode_error", *wire.DECODE_ERROR_KINDS)


class Network:
    """Carries messages between :class:`~p2pdeploy.sim.host.SimNode` hosts on an :class:`Engine`.

    Addresses are node indices ``0 .. nodes-1``. Counters: ``sent``, ``delivered``,
    ``large_messages``, ``large_bytes``, and ``dropped`` by reason (:data:`DROP_REASONS`).
    """

    def __init__(
        self,
        engine: Engine,
        streams: Streams,
        nodes: int,
        config: NetworkConfig | None = None,
        *,
        size_of: Callable[[Any], int] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config = config or NetworkConfig()
        self.nodes = nodes
        self.hosts: Sequence[SimNode] = ()
        self.size_of = size_of or WireSizer(config.large_message_bytes)
        self.large_message_bytes = config.large_message_bytes
        #: Messages travel as bytes (encoded by the sender, decoded by the receiver).
        self.encode = config.encode
        #: The bound on an encoded message, and on a payload that arrives by stream.
        self.stream_limit_bytes = wire.STREAM_LIMIT_BYTES
        self.loss = config.loss
        self.jitter_s = config.jitter_ms / 1000.0
        self.base_s = config.base_latency_ms / 1000.0
        self.scale_s = config.latency_scale_ms / 1000.0
        #: Per-node link rates; change one with :meth:`set_bandwidth`.
        self.upload_bytes_per_s = [config.upload_bytes_per_s] * nodes
        self.download_bytes_per_s = [config.download_bytes_per_s] * nodes
        self._upload_free_at = [0.0] * nodes
        self._download_free_at = [0.0] * nodes
        self._rng = streams.get("network")
        self._pair_seed = int.from_bytes(hashlib.sha256(f"{streams.seed}:latency".encode()).digest()[:8], "big")
        self._pair_latency: dict[int, float] = {}
        self.xs: list[float] = []
        self.ys: list[float] = []
        #: ``latency_s(a, b)``: the pair's one-way latency in seconds, without jitter.
        self.latency_s: Callable[[int, int], float]
        if config.latency_model == "euclidean":
            coordinates = streams.fresh("coordinates")
            self.xs = [coordinates.random() for _ in range(nodes)]
            self.ys = [coordinates.random() for _ in range(nodes)]
            self.latency_s = self._latency_euclidean
        elif config.latency_model == "constant":
            self.latency_s = self._latency_constant
        else:
            self.latency_s = self._latency_pairwise
        self._normal = statistics.NormalDist(math.log(self.scale_s) if self.scale_s > 0 else 0.0, config.latency_sigma)
        # A datagram and the last byte of a stream arrive through these; bytes are decoded there.
        self._deliver_small_cb = self._deliver_datagram if config.encode else self._deliver
        self._deliver_large_cb = self._deliver_stream if config.encode else self._deliver
        self._arrive_cb = self._arrive_large
        #: The group of each node while the network is partitioned, else ``None``.
        self._group_of: list[int] | None = None
        self.sent = 0
        self.delivered = 0
        self.large_messages = 0
        self.large_bytes = 0
        self.dropped: Counter[str] = Counter()

    def attach(self, hosts: Sequence[SimNode]) -> None:
        """The hosts messages are delivered to, indexed by address."""
        if len(hosts) != self.nodes:
            raise ValueError(f"expected {self.nodes} hosts (got {len(hosts)})")
        self.hosts = hosts

    def set_bandwidth(self, address: int, *, upload_bytes_per_s: float, download_bytes_per_s: float) -> None:
        if not (upload_bytes_per_s > 0 and download_bytes_per_s > 0):
            raise ValueError("bandwidth must be > 0 bytes per second")
        self.upload_bytes_per_s[address] = upload_bytes_per_s
        self.download_bytes_per_s[address] = download_bytes_per_s

    # -- partitions ------------------------------------------------------------------------
    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Split the network: messages between nodes of different groups are dropped.

        ``groups`` are disjoint collections of addresses; the nodes no group names form one
        more group together, so ``partition([range(10)])`` cuts nodes 0..9 off from the rest.
        A new partition replaces the previous one; :meth:`heal` ends it.
        """
        groups = [list(group) for group in groups]
        rest = len(groups)
        group_of = [rest] * self.nodes
        for index, group in enumerate(groups):
            for address in group:
                if type(address) is not int or not 0 <= address < self.nodes:
                    raise ValueError(f"partition: {address!r} is not a node address (0 .. {self.nodes - 1})")
                if group_of[address] != rest:
                    raise ValueError(f"partition: node {address} is in two groups")
                group_of[address] = index
        self._group_of = group_of

    def heal(self) -> None:
        """End the partition: every node reaches every other again."""
        self._group_of = None

    @property
    def partitioned(self) -> bool:
        return self._group_of is not None

    def reachable(self, a: int, b: int) -> bool:
        """Whether a message from ``a`` to ``b`` crosses no cut of the current partition."""
        groups = self._group_of
        return groups is None or groups[a] == groups[b]

    # -- latency models --------------------------------------------------------------------
    def _latency_constant(self, a: int, b: int) -> float:
        return self.base_s

    def _latency_euclidean(self, a: int, b: int) -> float:
        xs = self.xs
        ys = self.ys
        return self.base_s + self.scale_s * math.hypot(xs[a] - xs[b], ys[a] - ys[b])

    def _latency_pairwise(self, a: int, b: int) -> float:
        key = a * self.nodes + b if a < b else b * self.nodes + a
        latency = self._pair_latency.get(key)
        if latency is None:
            u = _unit_interval(self._pair_seed ^ key)
            if self.config.latency_model == "uniform":
                spread = u * self.scale_s
            elif self.scale_s > 0:
                spread = math.exp(self._normal.inv_cdf(u))  # log-normal with median scale_s
            else:
                spread = 0.0
            latency = self._pair_latency[key] = self.base_s + spread
        return latency

    # -- carrying messages -----------------------------------------------------------------
    def send(self, src: int, messages: list[tuple[Any, Any]]) -> None:
        """Send each ``(dst, msg)`` from ``src``; called by a host after draining its core.

        An encoding network carries each message's bytes (one that does not encode is dropped
        and counted before anything else is decided about it); otherwise it carries the object
        and sizes it with ``size_of``."""
        engine = self.engine
        now = engine.now
        nodes = self.nodes
        rng = self._rng
        loss = self.loss
        jitter_s = self.jitter_s
        threshold = self.large_message_bytes
        stream_limit = self.stream_limit_bytes
        size_of = self.size_of
        latency_s = self.latency_s
        groups = self._group_of
        encode = wire.encode if self.encode else None
        deliver = self._deliver_small_cb
        for dst, msg in messages:
            self.sent += 1
            if type(dst) is not int or not 0 <= dst < nodes:
                self.dropped["unknown_address"] += 1
                continue
            payload = msg
            if encode is not None:
                try:
                    payload = encode(msg, stream_limit)
                except wire.WireError:  # the runtime's node drops and counts it the same way
                    self.dropped["encode_error"] += 1
                    continue
            if groups is not None and groups[src] != groups[dst]:
                self.dropped["partitioned"] += 1
                continue
            size = size_of(msg) if encode is None else len(payload)
            if size > threshold:
                self._send_large(src, dst, payload, size, now)
                continue
            if loss and rng.random() < loss:
                self.dropped["loss"] += 1
                continue
            delay = latency_s(src, dst)
            if jitter_s:
                delay += rng.random() * jitter_s
            engine.schedule(now + delay, deliver, dst, src, payload)

    def inject(self, src: int, dst: int, data: bytes, *, stream: bool = False) -> None:
        """Deliver raw bytes to ``dst`` as if ``src`` had sent them, after the pair's latency.

        What a broken or hostile peer does: the payload is decoded at ``dst`` with the limit of
        its path (a datagram's, or a stream's when ``stream``) and dropped and counted by kind
        when it does not decode. It is never lost, and a stream payload skips the bandwidth
        model. Works whether or not the network encodes its own messages.
        """
        if type(data) is not bytes:
            raise TypeError(f"inject takes bytes (got {type(data).__name__})")
        if not (0 <= src < self.nodes and 0 <= dst < self.nodes):
            raise ValueError(f"inject: {src} -> {dst} is not a pair of node addresses (0 .. {self.nodes - 1})")
        self.sent += 1
        deliver = self._deliver_stream if stream else self._deliver_datagram
        self.engine.schedule(self.engine.now + self.latency_s(src, dst), deliver, dst, src, data)

    def _send_large(self, src: int, dst: int, payload: Any, size: int, now: float) -> None:
        self.large_messages += 1
        self.large_bytes += size
        upload_start = max(now, self._upload_free_at[src])
        upload_done = upload_start + size / self.upload_bytes_per_s[src]
        self._upload_free_at[src] = upload_done
        delay = self.latency_s(src, dst)
        if self.jitter_s:
            delay += self._rng.random() * self.jitter_s
        self.engine.schedule(upload_start + delay, self._arrive_cb, dst, src, payload, size, upload_done + delay)

    def _arrive_large(self, dst: int, src: int, payload: Any, size: int, last_byte_at: float) -> None:
        """The first byte of a large message reached ``dst``: queue it on the downlink."""
        download_start = max(self.engine.now, self._download_free_at[dst])
        download_done = download_start + size / self.download_bytes_per_s[dst]
        self._download_free_at[dst] = download_done
        self.engine.schedule(max(download_done, last_byte_at), self._deliver_large_cb, dst, src, payload)

    def _receiver(self, dst: int, src: int) -> SimNode | None:
        """The host at ``dst`` if what ``src`` sent can reach it now (it is up, on ``src``'s side
        of any partition); ``None``, counted as dropped, if not."""
        host = self.hosts[dst]
        if host.core is None:
            self.dropped["down"] += 1
            return None
        groups = self._group_of
        if groups is not None and groups[src] != groups[dst]:
            self.dropped["partitioned"] += 1
            return None
        return host

    def _deliver(self, dst: int, src: int, msg: Any) -> None:
        host = self._receiver(dst, src)
        if host is None:
            return
        self.delivered += 1
        host.deliver(src, msg)

    def _deliver_datagram(self, dst: int, src: int, data: bytes) -> None:
        self._deliver_bytes(dst, src, data, self.large_message_bytes)

    def _deliver_stream(self, dst: int, src: int, data: bytes) -> None:
        self._deliver_bytes(dst, src, data, self.stream_limit_bytes)

    def _deliver_bytes(self, dst: int, src: int, data: bytes, limit_bytes: int) -> None:
        """Bytes reached ``dst``: decode them as the runtime's node does, then hand over the message."""
        host = self._receiver(dst, src)
        if host is None:
            return
        msg = wire.decode(data, limit_bytes)
        if type(msg) is wire.DecodeError:
            self.dropped[msg.kind] += 1
            return
        self.delivered += 1
        host.deliver(src, msg)

    def counters(self) -> dict[str, int]:
        """The network's counters as one flat mapping (for metrics and summaries)."""
        out = {
            "messages_sent": self.sent,
            "messages_delivered": self.delivered,
            "large_messages": self.large_messages,
            "large_bytes": self.large_bytes,
        }
        for reason in DROP_REASONS:
            out[f"messages_dropped_{reason}"] = self.dropped[reason]
        return out


def _unit_interval(key: int) -> float:
    """A uniform draw in (0, 1) from an integer key (SplitMix64 finaliser)."""
    z = (key + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z + 0.5) / 18446744073709551616.0


def pair_latency_median_s(network: Network, pairs: int = 20_000, seed: int = 0) -> float:
    """The median pairwise latency over random distinct pairs (what an RTT/2 should approach)."""
    rng = random.Random(seed)
    n = network.nodes
    samples = []
    for _ in range(pairs):
        a = rng.randrange(n)
        b = rng.randrange(n - 1)
        if b >= a:
            b += 1
        samples.append(network.latency_s(a, b))
    return statistics.median(samples)
