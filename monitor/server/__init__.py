"""The in-process HTTP server (:mod:`monitor.server.app`) and the live dashboard both apps serve
(:mod:`monitor.server.dashboard`, its page in ``web/``). Torch-free."""

from monitor.server.app import BackgroundServer, create_app

__all__ = ["BackgroundServer", "create_app"]
