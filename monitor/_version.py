"""repwatch's version: that of the installed distribution, whose one source is pyproject.toml.

Torch-free and dependency-free, so that both apps (the in-process server and the sidecar) and
``repwatch --version`` read it from here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("repwatch")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
