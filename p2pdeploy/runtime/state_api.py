"""Persistence on a real node: its layer, an async facade, and the state API served to services.

- :func:`open_store` opens the store a node's persistence layer keeps its data in (an
  :class:`~p2pdeploy.runtime.store_sqlite.SQLiteStore` in the data directory, or memory); the
  layer itself is composed with the rest of the node in :mod:`p2pdeploy.node`.
- :class:`PersistenceClient` turns the layer's events into awaitable results
  (``await client.put_blob(data)``), through :meth:`RuntimeNode.request`.
- :class:`StateServer` is the state API of :mod:`p2pdeploy.collective.stateapi` over HTTP/1.1
  on 127.0.0.1, for service processes. The executor registers each service and passes two
  environment variables to its process::

      P2PDEPLOY_STATE_URL=http://127.0.0.1:<port>/v1/state/     (the namespace is the token's)
      P2PDEPLOY_STATE_TOKEN=<random bearer token>

  The service then speaks plain HTTP (curl works)::

      GET  <url><key>                      200 value, X-Version: n | 404 (X-Version: 0)
      PUT  <url><key>  body=value          200, X-Version: new version
      PUT  <url><key>  If-Match: <n>       the same, only if the version is n (0: never written);
                                           409 with the current value and X-Version otherwise
      503 when the key's group cannot be reached, 401 without a valid token, 400 for a bad request

  The token names the namespace and the identity that signs its records; a process sees only
  its own namespace. :func:`replica_namespace` chooses a replica's: the state of its service
  ``NAME@OWNER`` when the service's manager started it (shared by every host of the service),
  else its starter's namespace on this node. Loopback HTTP rather than a Unix socket: every language has a client, and
  a service running as another user (``nobody``) needs no access to the node's directory.

Deadlines are cancel scopes; every task runs in the server's nursery.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11
import trio

from p2pdeploy.collective.persistence import (
    BlobFetched,
    BlobStored,
    DurableStore,
    HandedOff,
    MemoryStore,
    Persistence,
    QuorumFinished,
    RecordFound,
    RecordStored,
)
from p2pdeploy.collective.stateapi import (
    StateError,
    StateRequest,
    StateResult,
    check_namespace,
    parse_service_namespace,
    service_namespace,
)
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.overlay.storage import Item
from p2pdeploy.resource.protocol import service_key_of
from p2pdeploy.runtime.listeners import Connection, ConnectionGuard, ListenerLimits, RefusalLog, serve_bounded
from p2pdeploy.runtime.store_sqlite import DEFAULT_CAPACITY_BYTES, SQLiteStore, capacity_from

if TYPE_CHECKING:
    from pathlib import Path

    from p2pdeploy.fabric.contribution import Contribution
    from p2pdeploy.resource.protocol import ManagedReplica
    from p2pdeploy.runtime.node import RuntimeNode

log = logging.getLogger(__name__)

STATE_URL_VARIABLE = "P2PDEPLOY_STATE_URL"
STATE_TOKEN_VARIABLE = "P2PDEPLOY_STATE_TOKEN"
STATE_PATH = "/v1/state/"
MAX_HEADER_BYTES = 16 * 1024
#: A body over the limit is still read (and dropped) up to this size, so the client sees the 413.
MAX_DRAINED_BYTES = 8 * 1024 * 1024


# -- the layer ---------------------------------------------------------------------------------


def open_store(data_dir: Path | None, contribution: Contribution | None = None) -> DurableStore:
    """A node's store: SQLite in its data directory (quota from the owner's disk contribution),
    or memory for a node without one. The caller closes it."""
    if data_dir is None:
        return MemoryStore()
    capacity = capacity_from(contribution) if contribution is not None else DEFAULT_CAPACITY_BYTES
    return SQLiteStore(data_dir, capacity_bytes=capacity)


# -- the async facade --------------------------------------------------------------------------


class NoPersistence(RuntimeError):
    """The persistence facade was used on a node whose layers include no persistence layer."""


class PersistenceClient:
    """Awaitable persistence operations on a running node (``RuntimeNode.request`` underneath)."""

    def __init__(self, node: RuntimeNode) -> None:
        self.node = node

    @property
    def layer(self) -> Persistence:
        try:
            return self.node.core.layer(Persistence)
        except KeyError:
            raise NoPersistence("this node runs no persistence layer; add p2pdeploy.node.persistence_layer "
                               "to its layers") from None

    async def _run(self, start: Callable[[Persistence, float], int], cls: type) -> Any:
        layer = self.layer
        return await self.node.request(
            lambda now: start(layer, now),
            lambda query_id, event: isinstance(event, cls) and event.query_id == query_id,
        )

    async def put_blob(self, data: bytes, *, replicas: int | None = None, keep: bool = False) -> BlobStored:
        return await self._run(lambda p, now: p.put_blob(data, now, replicas=replicas, keep=keep), BlobStored)

    async def get_blob(self, blob_id: int, *, keep: bool = False) -> bytes | None:
        return (await self.fetch_blob(blob_id, keep=keep)).data

    async def fetch_blob(self, blob_id: int, *, keep: bool = False) -> BlobFetched:
        """Like :meth:`get_blob`, with the reason when the blob could not be fetched."""
        return await self._run(lambda p, now: p.get_blob(blob_id, now, keep=keep), BlobFetched)

    async def put_record(self, item: Item, *, replicas: int | None = None) -> RecordStored:
        return await self._run(lambda p, now: p.put_record(item, now, replicas=replicas), RecordStored)

    async def get_record(self, key: int) -> Item | None:
        event: RecordFound = await self._run(lambda p, now: p.get_record(key, now), RecordFound)
        return event.item

    async def quorum_read(self, key: int) -> QuorumFinished:
        return await self._run(lambda p, now: p.quorum_read(key, now), QuorumFinished)

    async def quorum_put(self, identity: Identity, name: bytes, value: bytes) -> QuorumFinished:
        return await self._run(lambda p, now: p.quorum_put(identity, name, value, now), QuorumFinished)

    async def quorum_cas(self, identity: Identity, name: bytes, expected_version: int, value: bytes) -> QuorumFinished:
        return await self._run(lambda p, now: p.quorum_cas(identity, name, expected_version, value, now),
                               QuorumFinished)

    async def leave(self) -> HandedOff:
        return await self._run(lambda p, now: p.leave(now), HandedOff)

    async def state(self, request: StateRequest, writer: Identity) -> StateResult:
        event: QuorumFinished = await self._run(lambda p, now: request.start(p, writer, now), QuorumFinished)
        return request.result(event)


# -- the state API over loopback HTTP ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateGrant:
    """What a service is given: where the API is, its token, and the namespace it reaches
    (``service``: a service's namespace, see :mod:`p2pdeploy.collective.stateapi`)."""

    url: str
    token: str
    namespace: str
    service: bool = False

    def environment(self) -> dict[str, str]:
        """The variables the executor adds to the service's environment."""
        return {STATE_URL_VARIABLE: self.url, STATE_TOKEN_VARIABLE: self.token}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 503: "Service Unavailable", 504: "Gateway Timeout"}
#: The longest ``If-Match`` version accepted (a version is a 64-bit count).
MAX_VERSION_DIGITS = 20


def default_state_api_limits() -> ListenerLimits:
    """The state API's bounds: one short request per connection, every client on 127.0.0.1 (so
    one cap for both); room for a few hundred requests in flight at once, as a busy service makes."""
    return ListenerLimits(max_connections=256, max_connections_per_source=256, header_timeout_s=10.0,
                          idle_timeout_s=10.0, message_timeout_s=30.0,
                          max_buffered_bytes_per_connection=MAX_HEADER_BYTES + MAX_DRAINED_BYTES,
                          max_buffered_bytes_total=32 * 1024 * 1024)


class StateServer:
    """HTTP/1.1 on 127.0.0.1 in front of a node's persistence layer (see the module docstring).

    Requests are parsed by h11; a malformed one gets a 400 (a refusal, counted as
    ``state_api_bad_request``), and connections are bounded by ``limits``
    (:class:`~p2pdeploy.runtime.listeners.ListenerLimits`, default the node's
    ``RuntimeConfig.state_api``)."""

    def __init__(self, node: RuntimeNode, *, port: int = 0, timeout_s: float = 30.0,
                 max_value_bytes: int | None = None, limits: ListenerLimits | None = None) -> None:
        self.client = PersistenceClient(node)
        self.node = node
        self.port = port
        self.timeout_s = timeout_s
        self.max_value_bytes = max_value_bytes
        self.limits = limits or node.config.state_api
        self.connections = ConnectionGuard("state_api", self.limits, node.counters)
        self._refusals = RefusalLog(log)
        self._grants: dict[str, tuple[str, Identity, bool]] = {}
        self._tokens: dict[tuple[str, bytes, bool], str] = {}
        self._listener_port: int | None = None
        self.requests = 0

    @property
    def url(self) -> str:
        if self._listener_port is None:
            raise RuntimeError("the state server has not started; run it with nursery.start(server.run)")
        return f"http://127.0.0.1:{self._listener_port}{STATE_PATH}"

    def register(self, namespace: str, writer: Identity | None = None, *, service: bool = False) -> StateGrant:
        """A token for ``namespace``, whose records ``writer`` (default: the node) signs; asking
        again for the same namespace and writer gives the same token (every run of a service,
        every replica of it on this node), so grants do not pile up. With ``service`` the
        namespace is a service's ``NAME@OWNER_HEX`` (``stateapi.service_namespace``), whose
        records are the service's and shared with its replicas on other nodes."""
        if service:
            parse_service_namespace(namespace)
        else:
            check_namespace(namespace)
        writer = writer or self.node.identity
        token = self._tokens.get((namespace, writer.public_key, service))
        if token is None:
            token = secrets.token_urlsafe(24)
            self._grants[token] = (namespace, writer, service)
            self._tokens[(namespace, writer.public_key, service)] = token
        return StateGrant(self.url, token, namespace, service)

    def revoke(self, token: str) -> None:
        grant = self._grants.pop(token, None)
        if grant is not None:
            self._tokens.pop((grant[0], grant[1].public_key, grant[2]), None)

    def environment(self, namespace: str, writer: Identity | None = None, *, service: bool = False) -> dict[str, str]:
        """Register ``namespace`` and return the variables for the service's process."""
        return self.register(namespace, writer, service=service).environment()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self._listener_port = listeners[0].socket.getsockname()[1]
        try:
            await serve_bounded(listeners[0], self._serve, self.connections, self._refusals, task_status=task_status)
        finally:
            self._listener_port = None

    async def _serve(self, stream: trio.SocketStream, connection: Connection) -> None:
        """One connection, one request. Nothing a client does may take the node down: a client
        that hangs up early, or a request that breaks the handler, ends this connection only."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            request = await _read_request(http, stream, connection, self._value_limit())
            if request is None:
                return  # timed out, or closed before a request: nothing to answer
            connection.busy = True
            status, headers, body = await self._handle(*request)
        except _BadRequest as exc:
            self.node.counters["state_api_bad_request" if exc.status == 400 else f"state_api_{exc.status}"] += 1
            self._refusals.debug(f"state api {exc.status}", "state API request from %s refused: %s %s",
                                 connection.source, exc.status, exc)
            status, headers, body = exc.status, {}, (str(exc) + "\n").encode()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the client went away
        except Exception:
            self.node.counters["state_api_failed"] += 1
            self._refusals.log(logging.ERROR, "state api failure", "the state API failed on a request",
                               exc_info=True)
            status, headers, body = 500, {}, b"internal error\n"
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with trio.move_on_after(self.limits.idle_timeout_s):  # a client that does not read is not waited for
            await stream.send_all(_response(http, status, headers, body))

    async def _handle(self, method: str, target: str, headers: dict[str, bytes],
                      body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.requests += 1
        token = headers.get("authorization", b"")
        grant = self._grants.get(token[7:].decode("latin-1")) if token.startswith(b"Bearer ") else None
        if grant is None:
            raise _BadRequest(401, "missing or unknown bearer token (P2PDEPLOY_STATE_TOKEN)")
        namespace, writer, service = grant
        if not target.startswith(STATE_PATH):
            raise _BadRequest(404, f"the state API is under {STATE_PATH}<key>")
        key = unquote(target[len(STATE_PATH):].split("?", 1)[0])
        try:
            if method == "GET":
                request = StateRequest("get", namespace, key, service=service)
            elif method == "PUT":
                match = headers.get("if-match")
                if match is None:
                    request = StateRequest("put", namespace, key, body, service=service)
                else:
                    request = StateRequest("cas", namespace, key, body, _version(match), service=service)
            else:
                raise _BadRequest(405, "use GET or PUT")
        except StateError as exc:
            raise _BadRequest(400, str(exc)) from None
        result: StateResult | None = None
        with trio.move_on_after(self.timeout_s):
            result = await self.client.state(request, writer)
        if result is None:
            return 504, {}, b"the operation did not finish in time\n"
        version = {"X-Version": str(result.version)}
        if result.outcome == "ok":
            return 200, version, result.value if method == "GET" else b""
        if result.outcome == "absent":
            return 404, version, b""
        if result.outcome == "conflict":
            return 409, version, result.value
        return 503, {}, (result.detail + "\n").encode()

    def _value_limit(self) -> int:
        if self.max_value_bytes is not None:
            return self.max_value_bytes
        try:
            return self.client.layer.config.max_record_bytes
        except Exception:  # the node stopped: the request will fail with its own error
            return 0


def replica_namespace(service: str, replica_id: str, starter: bytes,
                      managed: ManagedReplica | None) -> tuple[str, bool]:
    """The state namespace of a replica, and whether it is a service's (shared by every node
    that hosts the service): ``service`` is its manifest's name (empty: the replica id stands
    in), ``starter`` the key that started it, ``managed`` what the service's manager said when
    it started it (``None``: started by hand).

    A managed replica gets its service's namespace ``NAME@OWNER_HEX``: the service its start
    named, whose key the host checked against the manifest's name and the bundle's signer
    (checked here again). Anything else keeps the node's own namespace ``NAME@STARTER_HEX``, as
    a replica started by hand does."""
    name = service or replica_id
    if managed is not None:
        if managed.service_name == service and service_key_of(service, managed.owner) == managed.service_key:
            try:
                return service_namespace(service, managed.owner), True
            except StateError:
                pass
        log.warning("replica %s: its start names a service other than %s@%s…; it gets this node's state "
                    "namespace", replica_id, service, managed.owner.hex()[:16])
    return (f"{name}@{starter.hex()}" if starter else name), False


def _version(match: bytes) -> int:
    """The version an ``If-Match`` header names: ASCII digits only (``²`` is a digit to Python)."""
    text = match.strip()
    if not (text.isdigit() and text.isascii() and len(text) <= MAX_VERSION_DIGITS):
        raise _BadRequest(400, f"If-Match must be a version number (got {match.decode('latin-1')!r})")
    return int(text)


async def _read_request(http: h11.Connection, stream: trio.SocketStream, connection: Connection,
                        max_body: int) -> tuple[str, str, dict[str, bytes], bytes] | None:
    """The request on ``stream`` as (method, target, headers, body), or None when the client
    went quiet or away before sending one; raises :class:`_BadRequest` for a malformed one."""
    request: h11.Request | None = None
    body = bytearray()
    received = 0
    too_large = False
    while True:
        try:
            event = http.next_event()
        except (h11.RemoteProtocolError, ValueError) as exc:  # ValueError: a number too long for int()
            raise _BadRequest(400, f"malformed request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await connection.receive_some(stream, 65536)
            if data is None:
                return None
            http.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
            connection.introduced = True
            connection.begin_message()
            length = _content_length(event)
            if length is not None and length > max_body:
                too_large = True
            elif length is not None and not connection.reserve(length):
                raise _BadRequest(503, "too many requests in progress; try again")
            elif http.they_are_waiting_for_100_continue:  # curl asks before sending a larger body
                await stream.send_all(http.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        elif isinstance(event, h11.Data):
            received += len(event.data)
            too_large = too_large or received > max_body
            if not too_large:
                body += event.data
            elif received > MAX_DRAINED_BYTES:
                break  # the client sees the 413 or a reset; either way the node stops reading
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # ConnectionClosed or PAUSED (the client closed before the request was complete)
            if request is None:
                return None
            raise _BadRequest(400, "connection closed before the request was complete")
    assert request is not None
    if too_large:
        raise _BadRequest(413, f"a value is at most {max_body} bytes (got {_content_length(request) or 'more'})")
    headers = {name.decode("latin-1"): value for name, value in request.headers}
    return request.method.decode("latin-1"), request.target.decode("latin-1"), headers, bytes(body)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _response(http: h11.Connection, status: int, headers: dict[str, str], body: bytes) -> bytes:
    fields = [("Content-Length", str(len(body))), ("Connection", "close"),
              ("Content-Type", "application/octet-stream"), *headers.items()]
    head = http.send(h11.Response(status_code=status, headers=fields, reason=_REASONS.get(status, "Error")))
    return (head or b"") + (http.send(h11.Data(data=body)) or b"") + (http.send(h11.EndOfMessage()) or b"")


__all__ = [
    "STATE_TOKEN_VARIABLE",
    "STATE_URL_VARIABLE",
    "PersistenceClient",
    "StateGrant",
    "StateServer",
    "replica_namespace",
]
