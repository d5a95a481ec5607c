"""The read app (:mod:`monitor.server.app`: in process over one run, in the sidecar over every
run), its background server and its live dashboard (:mod:`monitor.server.dashboard`, the page in
``web/``). Torch-free."""

from monitor.server.app import (BackgroundServer, ReadSource, SingleRunSource, create_app,
                                create_read_app, serve_run)

__all__ = ["BackgroundServer", "ReadSource", "SingleRunSource", "create_app", "create_read_app",
           "serve_run"]
