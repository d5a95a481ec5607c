"""The ``repwatch`` command line (:mod:`monitor.cli.main`; ``repwatch = monitor.cli:main``)."""

from monitor.cli.main import main

__all__ = ["main"]
