"""Raw loopback sockets for the servers' connection-limit tests: clients that stall on purpose
(partial request headers, no request at all, a body that never comes)."""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterable


def connect(port: int, data: bytes = b"") -> socket.socket:
    """A connection to ``127.0.0.1:port`` that has sent ``data`` and then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        s.sendall(data)
    return s


def request_head(method: str, path: str, headers: dict[str, str] | None = None,
                 complete: bool = True) -> bytes:
    """An HTTP/1.1 request head; without ``complete``, the blank line that ends it is missing."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n" + ("\r\n" if complete else "")).encode()


def still_open(socks: Iterable[socket.socket], within: float) -> tuple[set[socket.socket],
                                                                      dict[socket.socket, bytes]]:
    """Read every socket until the server closes it (EOF or reset), for at most ``within``
    seconds: (the sockets still open then, what each one received)."""
    pending = set(socks)
    got: dict[socket.socket, bytes] = {s: b"" for s in pending}
    sel = selectors.DefaultSelector()
    for s in pending:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + within
    try:
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=min(left, 0.5)):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:                    # reset by the server: closed too
                    data = b""
                if data:
                    got[s] += data
                else:
                    sel.unregister(s)
                    pending.discard(s)
    finally:
        sel.close()
    return pending, got


def close_all(socks: Iterable[socket.socket]) -> None:
    """Close every socket (the client side)."""
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
