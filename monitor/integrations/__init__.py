"""Training-framework callbacks that attach a :class:`~monitor.monitor.Monitor` for you.

* :mod:`monitor.integrations.lightning`: ``RepwatchCallback`` for Lightning (``lightning`` or,
  failing that, ``pytorch_lightning``).
* :mod:`monitor.integrations.transformers`: ``RepwatchCallback`` for ``transformers.Trainer``.

Each submodule imports its framework when it is imported (a clear ImportError names the package
to install); importing this package imports neither.
"""

from __future__ import annotations
