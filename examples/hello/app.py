"""A tiny HTTP service for p2pdeploy: GET / greets, GET /health answers ok, GET /count counts.

It listens on $PORT (set by the node), keeps a visit counter in $P2PDEPLOY_DATA_DIR (this
replica's own) and, for /count, a counter in the node's state API ($P2PDEPLOY_STATE_URL with
$P2PDEPLOY_STATE_TOKEN): a quorum record replicated on the nodes closest to its key, shared by
the replicas this deployer started on the node, incremented with compare-and-set. It stops cleanly on
SIGTERM. Standard library only.
"""

import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

PORT = int(os.environ.get("PORT", "8080"))
DATA_DIR = Path(os.environ.get("P2PDEPLOY_DATA_DIR", "."))
GREETING = os.environ.get("GREETING", "hello")
REPLICA = os.environ.get("P2PDEPLOY_REPLICA_ID", "local")
STATE_URL = os.environ.get("P2PDEPLOY_STATE_URL")
STATE_TOKEN = os.environ.get("P2PDEPLOY_STATE_TOKEN", "")
COUNT_DEADLINE_S = 60.0
WORKERS = 8


def state(method: str, key: str, body: bytes | None = None, version: int | None = None) -> tuple[int, int, bytes]:
    """One state API call: (HTTP status, version, value)."""
    request = urllib.request.Request(STATE_URL + key, data=body, method=method)
    request.add_header("Authorization", f"Bearer {STATE_TOKEN}")
    if version is not None:
        request.add_header("If-Match", str(version))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, int(response.headers.get("X-Version", "0")), response.read()
    except urllib.error.HTTPError as error:
        return error.code, int(error.headers.get("X-Version", "0")), error.read()


def count() -> tuple[int, bytes]:
    """Add one to the shared counter: read it, then write it only if nobody wrote meanwhile.

    A write that lost to another (409) carries the winner's value: try again on it, after a
    short random pause that grows, so that many clients at once take turns; give up after
    COUNT_DEADLINE_S."""
    if STATE_URL is None:
        return 404, b"no state API on this node\n"
    deadline = time.monotonic() + COUNT_DEADLINE_S
    status, version, value = state("GET", "count")
    pause = 0.01
    while True:
        if status not in (200, 404, 409):
            return 503, f"state API answered {status}: {value.decode(errors='replace')}\n".encode()
        new = (int(value) if status != 404 and value else 0) + 1
        status, version, value = state("PUT", "count", str(new).encode(), version)
        if status == 200:
            return 200, f"count {new} (version {version})\n".encode()
        if time.monotonic() > deadline:
            return 503, b"too many concurrent writers\n"
        if status == 409:
            time.sleep(random.uniform(0, pause))
            pause = min(2 * pause, 0.5)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        code = 200
        if self.path == "/health":
            body = b"ok\n"
        elif self.path == "/count":
            code, body = count()
        else:
            counter = DATA_DIR / "visits"
            visits = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(visits))
            body = f"{GREETING} (replica {REPLICA}, visit {visits})\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")


class Server(HTTPServer):
    """Requests served by a few worker threads: the manifest allows 16 processes (threads count)
    and 64 MiB of address space, so a thread per client would fail past a dozen clients."""

    request_queue_size = 128  # the standard library's 5 resets a sixth client that connects at once

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        threading.stack_size(512 * 1024)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)

    def process_request(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        self.pool.submit(self._serve, request, client_address)

    def _serve(self, request, client_address) -> None:  # noqa: ANN001
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def main() -> None:
    server = Server(("127.0.0.1", PORT), Handler)

    def stop(signum: int, frame: object) -> None:
        print("SIGTERM: shutting down", flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"hello: listening on 127.0.0.1:{PORT}", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
