"""The state API a service uses: HTTP on 127.0.0.1 in front of quorum records, on real nodes."""

from __future__ import annotations

import logging
import socket
import struct
from contextlib import AsyncExitStack

import pytest
import trio

from p2pdeploy.collective.stateapi import StateError, StateRequest, record_name
from p2pdeploy.overlay.identity import Identity
from p2pdeploy.runtime.listeners import ListenerLimits
from p2pdeploy.runtime.node import RuntimeConfig, open_node
from p2pdeploy.runtime.state_api import STATE_TOKEN_VARIABLE, STATE_URL_VARIABLE, StateServer

from .test_persistence_runtime import start_network


async def http(url: str, method: str, token: str | None, body: bytes = b"", headers: dict | None = None):
    """A tiny HTTP/1.1 client: (status, headers, body)."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, port = hostport.split(":")
    lines = [f"{method} /{path} HTTP/1.1", f"Host: {hostport}", f"Content-Length: {len(body)}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), parsed, payload


async def running_state_api(stack: AsyncExitStack, tmp_path, size: int = 5):
    """``size`` nodes and the second one's state API, running until ``stack`` closes:
    ``(nodes, the nursery it runs in, the URL and token of the service "wiki")``."""
    nodes, _ = await start_network(stack, tmp_path, size)
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)
    server = StateServer(nodes[1])
    await nursery.start(server.run)
    env = server.environment("wiki")
    return nodes, nursery, env[STATE_URL_VARIABLE], env[STATE_TOKEN_VARIABLE]


async def test_a_service_gets_puts_and_compares_and_sets_its_state_over_loopback_http(tmp_path):
    async with AsyncExitStack() as stack:
        nodes, nursery, url, token = await running_state_api(stack, tmp_path)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1/state/")
        with trio.fail_after(60):
            status, headers, _ = await http(url + "pages/home", "GET", token)
            assert (status, headers["x-version"]) == (404, "0")
            status, headers, _ = await http(url + "pages/home", "PUT", token, b"hello")
            assert (status, headers["x-version"]) == (200, "1")
            status, headers, body = await http(url + "pages/home", "GET", token)
            assert (status, headers["x-version"], body) == (200, "1", b"hello")
            status, headers, body = await http(url + "pages/home", "PUT", token, b"stale", {"If-Match": "0"})
            assert (status, headers["x-version"], body) == (409, "1", b"hello")
            status, headers, _ = await http(url + "pages/home", "PUT", token, b"v2", {"If-Match": "1"})
            assert (status, headers["x-version"]) == (200, "2")
            status, _, _ = await http(url + "pages%2Fother", "PUT", token, b"x", {"If-Match": "0"})
            assert status == 200
            assert (await http(url + "pages/home", "GET", None))[0] == 401
            assert (await http(url + "pages/home", "GET", "not-a-token"))[0] == 401
            assert (await http(url + "pages/home", "PUT", token, b"x", {"If-Match": "soon"}))[0] == 400
            assert (await http(url + "pages/home", "DELETE", token))[0] == 405
            assert (await http(url + "", "GET", token))[0] == 400
            too_big = bytes(nodes[1].core.layers[-1].config.max_record_bytes + 1)
            assert (await http(url + "big", "PUT", token, too_big))[0] == 413

            # another node's service, given the same state key for the namespace, shares the state
            shared = Identity.from_seed(bytes(range(32)))
            first, second = StateServer(nodes[2]), StateServer(nodes[4])
            await nursery.start(first.run)
            await nursery.start(second.run)
            a = first.register("shop", shared)
            b = second.register("shop", shared)
            assert (await http(a.url + "cart", "PUT", a.token, b"apples"))[0] == 200
            status, headers, body = await http(b.url + "cart", "GET", b.token)
            assert (status, headers["x-version"], body) == (200, "1", b"apples")


def test_state_keys_and_namespaces_are_checked():
    assert record_name("wiki", "pages/home") == b"state/wiki/pages/home"
    with pytest.raises(StateError, match="namespace"):
        record_name("a/b", "k")
    with pytest.raises(StateError, match="state key"):
        record_name("wiki", "")
    with pytest.raises(StateError, match="expected version"):
        StateRequest("cas", "wiki", "k", b"v", None)


def test_a_node_with_a_data_directory_keeps_its_store_in_sqlite(tmp_path):

    from p2pdeploy.collective.persistence import MemoryStore
    from p2pdeploy.fabric.contribution import Contribution
    from p2pdeploy.runtime.state_api import open_store
    from p2pdeploy.runtime.store_sqlite import SQLiteStore

    store = open_store(tmp_path, Contribution(disk_bytes=4000))
    try:
        assert isinstance(store, SQLiteStore) and store.capacity_bytes == 2000
        assert (tmp_path / "persistence" / "store.sqlite3").exists()
    finally:
        store.close()
    assert isinstance(open_store(None), MemoryStore)


async def test_a_client_that_hangs_up_at_once_does_not_take_the_node_down():
    async with open_node(("127.0.0.1", 0)) as node:
        server = node.state_server
        url = server.url
        port = int(url.removeprefix("http://127.0.0.1:").split("/", 1)[0])
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET /v1/state/x HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, before the 401 is written back
        with trio.fail_after(30):
            while server.requests < 1:
                await trio.sleep(0.01)
            status, _, _ = await http(url + "x", "GET", "not-a-token")
        assert status == 401 and server.requests == 2


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


def port_of(url: str) -> int:
    return int(url.removeprefix("http://127.0.0.1:").split("/", 1)[0])


async def test_a_header_holding_a_non_ascii_digit_gets_a_400_and_no_traceback(caplog):
    """``"²".isdigit()`` is True in Python: Content-Length (no token needed) and If-Match."""
    async with open_node(("127.0.0.1", 0)) as node:
        server = node.state_server
        token = server.register("wiki").token
        port = port_of(server.url)
        answers = []
        for encoding in ("latin-1", "utf-8"):  # one byte 0xb2, or two
            answers += [
                await raw_exchange(port, "PUT /v1/state/k HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n"
                                   .encode(encoding)),
                await raw_exchange(port, (f"PUT /v1/state/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                                          "\r\nIf-Match: ²\r\nContent-Length: 1\r\n\r\nx").encode(encoding)),
            ]
        answers.append(await raw_exchange(port, b"GET /v1/state/k HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                          + b"9" * 5000 + b"\r\n\r\n"))
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert node.counters["state_api_bad_request"] == 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_state_api_connections_held_open_do_not_lock_services_out():
    """Connections that send half a request head and wait: past the cap each new one replaces
    the quietest, silent ones are closed at the header deadline, and a request is still answered."""
    limits = ListenerLimits(max_connections=16, max_connections_per_source=16, header_timeout_s=0.5,
                            idle_timeout_s=10.0, message_timeout_s=10.0,
                            max_buffered_bytes_per_connection=1 << 20, max_buffered_bytes_total=4 << 20)
    async with open_node(("127.0.0.1", 0), config=RuntimeConfig(state_api=limits)) as node:
        port = port_of(node.state_server.url)
        held = []
        for _ in range(100):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /v1/state/k HTTP/1.1\r\nHost: x\r\n")
            held.append(stream)
        try:
            answer = await raw_exchange(port, b"GET /v1/state/k HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 401 "), answer
            assert node.counters["state_api_evicted"] >= 100 - 16
            with trio.fail_after(30):
                while node.counters["state_api_timeouts"] < 1:
                    await trio.sleep(0.01)
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)


async def test_a_client_that_expects_100_continue_is_told_to_send_its_body():
    async with open_node(("127.0.0.1", 0)) as node:
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(node.state_server.url))
        async with stream:
            await stream.send_all(b"PUT /v1/state/k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                  b"Content-Length: 5\r\n\r\n")
            with trio.fail_after(30):
                interim = await stream.receive_some(65536)
                assert interim.startswith(b"HTTP/1.1 100 "), interim
                await stream.send_all(b"hello")
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 "), answer
