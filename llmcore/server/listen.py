"""The server's listening socket, bound before any model loads.

A busy port is found at once, with an error naming ``host:port`` and ``--port``, instead of
after minutes of loading; the socket stays bound while the models load, so nothing else takes
the port meanwhile (connections are refused until the server listens).
"""

from __future__ import annotations

import socket

from llmcore.errors import ConfigError


def _address(host: str, port: int) -> tuple[int, tuple]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError("--host", host, f"is not an address this machine can listen on ({exc.strerror})",
                          "Use 127.0.0.1, 0.0.0.0 (all interfaces) or a name that resolves here") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``port`` 0: any free one), ready for uvicorn; ConfigError if busy."""
    family, addr = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConfigError("--port", port, f"cannot be used on {host}: listening on {shown} failed "
                          f"({exc.strerror or exc})",
                          "Pick another port with --port N, or --port 0 for any free one") from None
    sock.set_inheritable(True)
    return sock


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy port now (the Ray Serve proxy binds it later)."""
    bind(host, port).close()


def free_port(host: str) -> int:
    family, addr = _address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((addr[0], 0, *addr[2:]))
        return sock.getsockname()[1]
