"""A service that misbehaves on purpose, for testing executors and limits.

    python3 behave.py serve              listen on $PORT and answer HTTP (GET /health: 200)
    python3 behave.py ignore-term        serve, and ignore SIGTERM
    python3 behave.py exit CODE [S]      exit with CODE after S seconds (default 0)
    python3 behave.py hog                allocate memory 8 MB at a time (stops itself at 2 GB)
    python3 behave.py bomb SECONDS       a fork bomb: every process forks until it fails or
                                         SECONDS pass (at most 2 children each, 8 levels deep,
                                         so even unconfined it stays under 512 processes)
    python3 behave.py chatter BYTES      print BYTES of output, then serve
    python3 behave.py escape             start a child that leaves the process group, then serve
    python3 behave.py spin SECONDS       burn cpu for SECONDS of wall time, print the cpu time used
    python3 behave.py fill BYTES [serve] write a file of BYTES into $P2PDEPLOY_DATA_DIR (then serve)
    python3 behave.py env NAME...        print NAME=value for each variable set, then exit
    python3 behave.py peek PATH...       try to read each file (or list each directory) and
                                         print "peek PATH: ok" or the error's name, then serve

Every mode that serves also stops on its own after 120 s, so nothing lingers if a test breaks.
Standard library only.
"""

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

LIFETIME_S = 120.0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve() -> None:
    port = int(os.environ["PORT"])
    server = HTTPServer(("127.0.0.1", port), Handler)
    threading.Timer(LIFETIME_S, lambda: os._exit(0)).start()
    print(f"serving on {port}", flush=True)
    server.serve_forever()


def hog() -> None:
    held = []
    for step in range(256):  # 256 x 8 MB = 2 GB at most
        held.append(bytearray(8 * 1024 * 1024))  # zero-filled: the pages are touched
        print(f"holding {8 * (step + 1)} MB", flush=True)
    print("allocated 2 GB without being stopped", flush=True)


def bomb(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    depth = 0
    children = 0
    failures = 0
    while time.monotonic() < deadline:
        if depth < 8 and children < 2:
            try:
                pid = os.fork()
            except OSError:
                failures += 1
                if failures == 1:
                    print(f"fork failed at depth {depth}", flush=True)
                time.sleep(0.05)
                continue
            if pid == 0:
                depth += 1
                children = 0
                failures = 0
                print("+", flush=True)
                continue
            children += 1
        else:
            time.sleep(0.05)
    os._exit(0)


def peek(path: str) -> str:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as file:
                file.read(1)
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if mode == "serve":
        serve()
    elif mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve()
    elif mode == "exit":
        code = int(sys.argv[2])
        time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
        print(f"exiting with code {code}", flush=True)
        sys.exit(code)
    elif mode == "hog":
        hog()
    elif mode == "bomb":
        bomb(float(sys.argv[2]))
    elif mode == "chatter":
        total = int(sys.argv[2])
        line = b"x" * 1023 + b"\n"
        for _ in range(total // len(line)):
            sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        serve()
    elif mode == "escape":
        if os.fork() == 0:
            os.setsid()  # leaves the service's process group; only its cgroup still holds it
            print(f"escaped child {os.getpid()}", flush=True)
            time.sleep(LIFETIME_S)
            os._exit(0)
        serve()
    elif mode == "spin":
        deadline = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < deadline:
            pass
        print(f"cpu {time.process_time():.3f}", flush=True)
    elif mode == "fill":
        path = os.path.join(os.environ["P2PDEPLOY_DATA_DIR"], "fill")
        with open(path, "wb") as file:
            for _ in range(int(sys.argv[2]) // 65536):
                file.write(b"\0" * 65536)
        print(f"wrote {os.path.getsize(path)} bytes", flush=True)
        if sys.argv[3:] == ["serve"]:
            serve()
    elif mode == "env":
        for name in sys.argv[2:]:
            if name in os.environ:
                print(f"{name}={os.environ[name]}", flush=True)
    elif mode == "peek":
        for path in sys.argv[2:]:
            print(f"peek {path}: {peek(path)}", flush=True)
        serve()
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
