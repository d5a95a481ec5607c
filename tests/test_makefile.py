"""The Makefile's install steps, run as a user runs them (``make``), without installing anything
big: ``make -n`` for the commands, and the torch step with ``pip install --dry-run --report``
in a clean virtual environment.

* ``make demo`` installs only what the demo needs (the package and its ``demo`` extra), not
  the test stack, and pip shows what it is doing (no ``-q``).
* torch is the CPU build by default: ``torch==X+cpu``, taken from a wheel directory pip is
  configured with when it has one, else from PyTorch's CPU index (``TORCH_INDEX``). On a
  machine without such a directory (a stock pip configuration), plain ``torch==X`` would
  resolve to PyPI's Linux wheel, a CUDA build with the ``nvidia-*`` packages. PyTorch's index
  cannot be reached here, so the stock-machine test stands it in by a local PEP 503 index
  holding the same CPU wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def _make(*args: str, env: dict[str, str] | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _variable(name: str) -> str:
    """A Makefile variable's default (``NAME ?= value``: a user's ``make NAME=...`` wins)."""
    m = re.search(rf"^{name} \?= (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"{name} is not set with ?= in the Makefile"
    return m.group(1).strip()


def _pip_installs(dry_run: str) -> list[str]:
    """The `pip install ...` command lines of ``make -n`` output."""
    return [line for line in dry_run.splitlines() if re.search(r"-m pip install ", line)]


def test_demo_installs_only_the_demo_extra_and_shows_progress(tmp_path: Path) -> None:
    out = _make("-n", "demo", f"VENV={tmp_path / 'venv'}")
    assert out.returncode == 0, out.stderr
    installs = _pip_installs(out.stdout)
    extras = [m.group(1) for line in installs for m in re.finditer(r"-e '?\.\[([^]]*)\]", line)]
    assert extras == ["demo"], installs
    assert not any(re.search(r"\s(-q|--quiet)\b", line) for line in installs), installs
    assert re.search(r"repwatch demo", out.stdout)


def test_test_target_installs_the_test_stack(tmp_path: Path) -> None:
    out = _make("-n", "test", f"VENV={tmp_path / 'venv'}")
    assert out.returncode == 0, out.stderr
    assert any(".[demo,test,sidecar]" in line for line in _pip_installs(out.stdout)), out.stdout


def test_torch_defaults_to_the_cpu_build() -> None:
    spec, index = _variable("TORCH_SPEC"), _variable("TORCH_INDEX")
    assert re.fullmatch(r"torch==[\d.]+\+cpu", spec), spec
    assert index == "https://download.pytorch.org/whl/cpu", index


def _local_cpu_wheel(version: str) -> Path | None:
    """The torch CPU wheel for this Python in a find-links directory pip is configured with."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, timeout=60, check=False).stdout
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for m in re.finditer(r"find-links='([^']*)'", out):
        for folder in m.group(1).split():
            for wheel in Path(folder).glob(f"torch-{version}-{tag}-*.whl"):
                return wheel
    return None


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the torch step creates its virtual environment (the first test creates it; with
    --dry-run nothing is ever installed into it)."""
    return tmp_path_factory.mktemp("make") / "venv"


def _torch_dry_run(venv: Path, tmp_path: Path, env: dict[str, str], *args: str
                   ) -> dict[str, Any]:
    """Run the Makefile's torch step (always: -B) for ``venv`` with ``--dry-run --report``."""
    report = tmp_path / "report.json"
    out = _make("-B", f"{venv}/.torch-installed", f"VENV={venv}", f"PYTHON={sys.executable}",
                f"TORCH_PIP_FLAGS=--dry-run --report {report}", *args, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (venv / "bin" / "python").exists(), "the step did not create the venv"
    assert not list(venv.glob("lib/python*/site-packages/torch")), "--dry-run installed torch"
    return dict(json.loads(report.read_text()))


def _installed(report: dict[str, Any]) -> dict[str, str]:
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}


def test_stock_machine_gets_the_cpu_build_from_the_cpu_index(clean_venv: Path,
                                                             tmp_path: Path) -> None:
    """A pip without any configuration (no find-links, no extra index) and PyTorch's CPU index
    stood in by a local PEP 503 index with the CPU wheel: the default resolves torch +cpu and
    no CUDA packages."""
    spec = _variable("TORCH_SPEC")
    version = spec.split("==", 1)[1]
    wheel = _local_cpu_wheel(version)
    if wheel is None:
        pytest.skip(f"no local {spec} wheel to stand PyTorch's CPU index in with")
    index = tmp_path / "cpu-index"
    (index / "torch").mkdir(parents=True)
    (index / "torch" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{wheel.as_uri()}">{wheel.name}</a></body></html>')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    report = _torch_dry_run(clean_venv, tmp_path, env, f"TORCH_INDEX={index.as_uri()}")
    got = _installed(report)
    assert got.get("torch") == version, got
    assert not [name for name in got if name.startswith("nvidia")], got


def test_this_machine_takes_the_local_cpu_wheel(clean_venv: Path, tmp_path: Path) -> None:
    """With the machine's pip configuration (a find-links directory holding the wheel), the
    default takes that file and never asks an index."""
    spec = _variable("TORCH_SPEC")
    version = spec.split("==", 1)[1]
    wheel = _local_cpu_wheel(version)
    if wheel is None:
        pytest.skip(f"pip has no find-links directory with a {spec} wheel here")
    report = _torch_dry_run(clean_venv, tmp_path, dict(os.environ),
                            "TORCH_INDEX=http://127.0.0.1:9/")
    (item,) = [i for i in report["install"] if i["metadata"]["name"] == "torch"]
    assert item["metadata"]["version"] == version
    assert item["download_info"]["url"] == wheel.as_uri()
