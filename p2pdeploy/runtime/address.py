"""Network addresses as the runtime and the CLI spell them: ``HOST:PORT`` and ``(host, port)``.

A core address on the real network is the tuple ``(host, port)`` with a numeric host, because
the core compares addresses (a pong must come from the address the ping went to) and the
kernel reports senders numerically. Parsing here is text only; name resolution happens in the
node (:meth:`p2pdeploy.runtime.node.RuntimeNode.resolve`).
"""

from __future__ import annotations

HostPort = tuple[str, int]


def parse_host_port(text: str, *, allow_port_zero: bool = False) -> HostPort:
    """Parse ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) into ``(host, port)``.

    Raises :class:`ValueError` naming what was wrong. Port 0 (the operating system picks)
    is accepted only with ``allow_port_zero``, which is for addresses to listen on.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port; write HOST:PORT, e.g. 127.0.0.1:7400")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 host in brackets, e.g. [::1]:7400")
    if not host:
        raise ValueError(f"{text!r} has no host; write HOST:PORT, e.g. 127.0.0.1:7400")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port must be a number (got {port_text!r})")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"{text!r}: port must be between {lowest} and 65535 (got {port})")
    return host, port


def format_host_port(address: HostPort) -> str:
    """The inverse of :func:`parse_host_port`: ``127.0.0.1:7400`` or ``[::1]:7400``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
