"""HTTP transport of sidecar mode: ``POST /v1/runs/{run}/streams/{stream}/batches``.

One keep-alive ``http.client`` connection (the standard library's: about 0.2 CPU ms per 128 KiB
request against 0.65 for ``httpx``, time the sender thread would otherwise hold the trainer's
GIL; docs/performance.md). Environment proxies are not consulted: a cluster's ``HTTP_PROXY``
must not route a pod-local sidecar's traffic. Torch-free.

``get`` serves the read-back of the sidecar's snapshots (:mod:`monitor.transport.readback`).

Outcomes: 2xx delivered; connection error or timeout ``sidecar_down``; 5xx ``sidecar_error``;
429 ``overload`` (with its ``Retry-After``); another 4xx ``rejected``.
"""

from __future__ import annotations

import http.client
import math
import re
import select
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit

from monitor.transport.base import Drop


def retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class HttpTransport:
    """Posts encoded batches to the sidecar at ``url``.

    Args:
        url: base URL of the sidecar, e.g. ``http://127.0.0.1:9400``.
        token: bearer token (``Authorization: Bearer <token>``), or None.
        timeout: seconds per request (connect, write, read).
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 5.0) -> None:
        if not isinstance(url, str) or not re.match(r"^https?://[^/?#\s]+", url):
            raise ValueError(f"url must be an http:// or https:// base URL like "
                             f"'http://127.0.0.1:9400', got {url!r}")
        if token is not None and (not isinstance(token, str) or not token
                                  or any(c.isspace() for c in token)):
            got = ("a string that is empty or holds whitespace" if isinstance(token, str)
                   else type(token).__name__)
            raise ValueError(f"token must be a non-empty string without whitespace, got {got}")
        if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = self.where = url.rstrip("/")
        self.timeout = float(timeout)
        parts = urlsplit(self.url)
        self._connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                                  else http.client.HTTPConnection)
        self._host, self._port, self._prefix = parts.hostname or "", parts.port, parts.path
        self._headers = {"User-Agent": "repwatch-sink"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None     # the sender thread's only

    def ready(self) -> Drop | None:
        return None

    def drained(self) -> bool:
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """The keep-alive connection, opened anew when the sidecar has closed it while idle
        (uvicorn does after 5 s), so a POST is never sent on a connection already gone."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:                              # EOF (or stray bytes): not reusable
                self.close()
                conn = None
        if conn is None:
            conn = self._connection_class(self._host, self._port, timeout=timeout)
            self._conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _post(self, path: str, headers: Mapping[str, str], body: bytes, timeout: float
             ) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body) of one POST; raises OSError or HTTPException."""
        return self._request("POST", path, headers, body, timeout)

    def get(self, path: str, timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body) of one GET of ``path`` (below the base URL) with the same token and
        connection handling as the POSTs; raises OSError or HTTPException. For the read-back
        of :mod:`monitor.transport.readback`, which owns its own instance (one connection per
        thread)."""
        status, _, data = self._request("GET", self._prefix + path,
                                        {"Accept": "application/json"}, None,
                                        self.timeout if timeout is None else timeout)
        return status, data

    def _request(self, method: str, path: str, headers: Mapping[str, str],
                 body: bytes | None, timeout: float) -> tuple[int, str | None, bytes]:
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers={**self._headers, **headers})
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.getheader("Retry-After"), data

    def send(self, run: str, stream: str, headers: Mapping[str, str], body: bytes,
             deadline: float = math.inf) -> Drop | None:
        path = (f"{self._prefix}/v1/runs/{quote(run, safe='')}/streams/"
                f"{quote(stream, safe='')}/batches")
        timeout = self.timeout
        if deadline < math.inf:                     # closing: stay within its deadline
            timeout = max(0.05, min(timeout, deadline - time.monotonic()))
        try:
            status, after, data = self._post(path, headers, body, timeout)
        except (OSError, http.client.HTTPException) as exc:  # connect/read/write, timeouts
            return Drop("sidecar_down", f"{type(exc).__name__}: {exc}")
        text = data[:300].decode("utf-8", "replace")
        if 200 <= status < 300:
            return None
        if status == 429:
            return Drop("overload", f"repwatch sink: sidecar {self.url} is overloaded (429); "
                                    f"dropping batches for its Retry-After ({after!r} s)",
                        key=429, retry_after=retry_after(after))
        if status >= 500:
            return Drop("sidecar_error", f"HTTP {status}: {text}")
        return Drop("rejected", f"repwatch sink: sidecar {self.url} rejected a batch of stream "
                                f"{stream!r} with HTTP {status}: {text} (further ones are only "
                                "counted)", key=status)

    def __repr__(self) -> str:
        return f"HttpTransport({self.url!r})"


__all__ = ["HttpTransport", "retry_after"]
