"""A tiny Alertmanager webhook receiver for the compose stack: prints one line per alert.

Stdlib only (it runs in the plain ``python:3.11-slim`` image). Alertmanager POSTs its webhook
JSON (``{"status", "alerts": [{"status", "labels", "annotations", ...}], ...}``) to ``/alerts``;
each alert becomes a line like ``firing RepwatchRepresentationCollapse severity=critical
run=demo-collapse stream=projector: <summary>`` on stdout (``docker compose logs webhook``).
Replace it with your chat bridge, incident tool or training controller.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 1 << 20
LABELS = ("severity", "run", "stream", "layer", "instance")


def format_alert(alert: dict[str, Any]) -> str:
    """One line for one alert of a webhook payload."""
    labels = alert.get("labels") or {}
    parts = [str(alert.get("status", "?")), str(labels.get("alertname", "?"))]
    parts += [f"{k}={labels[k]}" for k in LABELS if k in labels]
    summary = (alert.get("annotations") or {}).get("summary", "")
    return " ".join(parts) + (f": {summary}" if summary else "")


class Handler(BaseHTTPRequestHandler):
    """POST /alerts: print the alerts, answer 200; anything else: 404/400."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") != "/alerts":
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self.send_error(400, "expected a JSON body of at most 1 MiB")
            return
        try:
            payload = json.loads(self.rfile.read(length))
            alerts = payload["alerts"]
        except (ValueError, KeyError, TypeError):
            self.send_error(400, "expected Alertmanager webhook JSON with an 'alerts' list")
            return
        for alert in alerts:
            print(format_alert(alert), flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet access log
        pass


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9095)
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"webhook receiver on http://{args.host}:{server.server_port}/alerts", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
