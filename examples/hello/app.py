"""A tiny HTTP service for p2pdeploy: GET / greets, GET /health answers ok.

It listens on $PORT (set by the node), keeps a visit counter in $P2PDEPLOY_DATA_DIR and
stops cleanly on SIGTERM. Standard library only.
"""

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PORT = int(os.environ.get("PORT", "8080"))
DATA_DIR = Path(os.environ.get("P2PDEPLOY_DATA_DIR", "."))
GREETING = os.environ.get("GREETING", "hello")
REPLICA = os.environ.get("P2PDEPLOY_REPLICA_ID", "local")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/health":
            body = b"ok\n"
        else:
            counter = DATA_DIR / "visits"
            visits = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(visits))
            body = f"{GREETING} (replica {REPLICA}, visit {visits})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)

    def stop(signum: int, frame: object) -> None:
        print("SIGTERM: shutting down", flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"hello: listening on 127.0.0.1:{PORT}", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
