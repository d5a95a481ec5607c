"""Without the framework installed, importing a callback module says what to install."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize("module, hidden, package", [
    ("monitor.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"),
     "pip install lightning"),
    ("monitor.integrations.transformers", ("transformers",), "pip install transformers"),
])
def test_missing_framework_gives_a_clear_import_error(monkeypatch: pytest.MonkeyPatch,
                                                      module: str, hidden: tuple[str, ...],
                                                      package: str) -> None:
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)       # import of it raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=package):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)


@pytest.mark.e2e
def test_the_package_imports_no_framework() -> None:
    import subprocess

    code = ("import sys, monitor.integrations; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
