"""Packaging: what an install of repwatch declares, needs and ships.

* every third-party module the code imports comes from a distribution pyproject.toml declares
  (deptry, configured in ``[tool.deptry]``), and the core code paths run with nothing but the
  core dependencies importable from repwatch's own modules;
* ``requires-python`` covers what the code needs (vermin);
* a wheel built from exactly what the Dockerfile copies serves ``/runbooks`` and carries the
  license (PEP 639), ``py.typed`` markers and the runbooks as a file of its own;
* one version string (pyproject.toml) reaches ``monitor.__version__``, both apps' OpenAPI
  documents and ``repwatch --version``.

``monitor/server/web/runbooks.md`` is a copy of ``docs/runbooks.md`` (a symlink would point out of
what the images copy); after editing docs/runbooks.md regenerate it with
``python -m tests.test_packaging`` (:func:`sync_runbooks`).
"""

from __future__ import annotations

import email.parser
import html
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.manifests import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[1]
RUNBOOKS_SOURCE = ROOT / "docs" / "runbooks.md"
RUNBOOKS_PACKAGED = ROOT / "monitor" / "server" / "web" / "runbooks.md"
REGENERATE = "python -m tests.test_packaging"


def _project() -> dict[str, Any]:
    """The [project] table of pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["project"])


def _core_dependencies() -> set[str]:
    """Canonical names of the distributions in [project].dependencies."""
    return {canonicalize_name(Requirement(r).name) for r in _project()["dependencies"]}


def sync_runbooks() -> bool:
    """Write docs/runbooks.md to monitor/server/web/runbooks.md (the packaged copy served at
    /runbooks); True when the copy changed."""
    text = RUNBOOKS_SOURCE.read_bytes()
    if (RUNBOOKS_PACKAGED.is_file() and not RUNBOOKS_PACKAGED.is_symlink()
            and RUNBOOKS_PACKAGED.read_bytes() == text):
        return False
    RUNBOOKS_PACKAGED.unlink(missing_ok=True)              # a symlink is replaced, not followed
    RUNBOOKS_PACKAGED.write_bytes(text)
    return True


# ----------------------------------------------------------------------------- 1. dependencies


@pytest.mark.e2e
def test_every_import_is_declared_deptry() -> None:
    """deptry ([tool.deptry] in pyproject.toml): every third-party import of monitor/ and
    exporters/ comes from a distribution declared directly (core or an extra), none only
    transitively (starlette and pydantic arrive through fastapi, but repwatch imports them)."""
    proc = subprocess.run([sys.executable, "-m", "deptry", ".", "--no-ansi"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, ("deptry found undeclared or misdeclared dependencies "
                                  "(pip install -e '.[test]' installs deptry):\n"
                                  + proc.stdout + proc.stderr)


_CORE_ONLY = r'''
import builtins, contextlib, importlib, io, json, pkgutil, sys
from importlib.metadata import packages_distributions
from packaging.utils import canonicalize_name

CORE = set(json.loads(sys.argv[1]))
OWN = tuple(sys.argv[2:4])
OUT = sys.argv[4]
DISTS = {top: {canonicalize_name(d) for d in ds} for top, ds in packages_distributions().items()}
refused = []


def check(top, importer):
    """Refuse ``top`` when repwatch's own code imports it and no core dependency provides it."""
    if not importer or not importer.startswith(OWN) or top in ("monitor", "exporters"):
        return
    if top in sys.stdlib_module_names or DISTS.get(top, set()) & CORE:
        return
    why = (f"{importer} imports {top!r} (distribution {sorted(DISTS.get(top, ())) or 'none'}), "
           "which is not in [project].dependencies")
    refused.append(why)
    raise ModuleNotFoundError(why, name=top)


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    # every import statement, also of a module some other package has imported already
    if level == 0 and globals is not None:
        check(name.partition(".")[0], globals.get("__file__"))
    return real_import(name, globals, locals, fromlist, level)


class CoreOnly:
    """meta_path finder: the first import of a top-level module (importlib.import_module too)."""

    def find_spec(self, name, path=None, target=None):
        if "." in name:
            return None
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith("<frozen ")
                                 or f.f_code is guarded_import.__code__
                                 or f.f_code.co_filename == importlib.__file__):
            f = f.f_back
        check(name, f.f_globals.get("__file__") if f is not None else None)
        return None


real_import = builtins.__import__
builtins.__import__ = guarded_import
sys.meta_path.insert(0, CoreOnly())

from monitor.cli import main

with contextlib.redirect_stdout(io.StringIO()) as rules:
    assert main(["rules"]) == 0
assert "groups:" in rules.getvalue(), rules.getvalue()[:500]
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["manifests", "--out", OUT + "/k8s"]) == 0
assert main(["dashboard", "--out", OUT + "/dashboard.json"]) == 0
import exporters
modules = ["monitor", "monitor.monitor", "monitor.server", "monitor.transport.shm",
           "monitor.transport.sinks",
           "monitor.server.dashboard", "monitor.cli", "monitor.sidecar.service",
           "monitor.sidecar.cli",
           *(f"exporters.{m.name}" for m in pkgutil.iter_modules(exporters.__path__))]
for module in modules:
    importlib.import_module(module)
if refused:   # also an ImportError the code caught: a core path reached for a non-core module
    sys.exit("refused:\n" + "\n".join(refused))
print("ok", len(modules))
'''


@pytest.mark.e2e
def test_core_code_runs_on_core_dependencies_only(tmp_path: Path) -> None:
    """With an import hook refusing, from monitor/ and exporters/ code, every top-level module
    that no [project].dependencies distribution provides, `repwatch rules`, `repwatch
    manifests` and `repwatch dashboard` run and the core modules import (third-party
    packages may import their own dependencies)."""
    own = [str(ROOT / "monitor") + os.sep, str(ROOT / "exporters") + os.sep]
    proc = subprocess.run([sys.executable, "-c", _CORE_ONLY, json.dumps(sorted(
        _core_dependencies())), *own, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.startswith("ok"), proc.stdout
    assert (tmp_path / "dashboard.json").is_file() and any((tmp_path / "k8s").iterdir())


# ----------------------------------------------------------------------------- 2. requires-python


def _lower_bound(spec: SpecifierSet) -> Version | None:
    """The lowest version ``spec`` lets in, from its >=, >, ~= and == clauses (None: none)."""
    bounds = [Version(s.version) for s in spec if s.operator in (">=", ">", "~=", "==")]
    return max(bounds) if bounds else None


@pytest.mark.e2e
def test_requires_python_covers_what_the_code_needs() -> None:
    """vermin's minimum Python of monitor/ and exporters/ (annotations evaluated: FastAPI and
    pydantic read them at run time) is at most the lower bound of requires-python."""
    cmd = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--no-tips",
           "--eval-annotations", "--format", "parsable", "monitor", "exporters"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    # parsable format: the last line is the verdict over all files, ":::<py2>:<py3>:"
    verdict = proc.stdout.strip().splitlines()[-1].split(":")
    assert verdict[:3] == ["", "", ""] and verdict[4], proc.stdout[-2000:]
    needed = Version(verdict[4])
    spec = SpecifierSet(_project()["requires-python"])
    lower = _lower_bound(spec)
    needing = [line for line in proc.stdout.splitlines() if f":{verdict[4]}:" in line][:10]
    assert lower is not None and needed <= lower, (
        f"the code needs Python >= {needed} but requires-python = {str(spec)!r}; e.g.\n"
        + "\n".join(needing))
    assert not spec.contains(f"{needed.major}.{needed.minor - 1}.99")


# ----------------------------------------------------------------------------- 3. runbooks, wheel


def test_packaged_runbooks_are_a_copy_of_the_docs() -> None:
    """monitor/server/web/runbooks.md is a regular file identical to docs/runbooks.md."""
    how = f"regenerate it from docs/runbooks.md with `{REGENERATE}`"
    assert not RUNBOOKS_PACKAGED.is_symlink(), (
        f"monitor/server/web/runbooks.md is a symlink (to {os.readlink(RUNBOOKS_PACKAGED)}): the "
        f"images copy monitor/ without docs/; {how}")
    assert RUNBOOKS_PACKAGED.read_bytes() == RUNBOOKS_SOURCE.read_bytes(), (
        f"monitor/server/web/runbooks.md differs from docs/runbooks.md; {how}")


def copy_build_context(dockerfile: Path, dest: Path) -> Path:
    """Copy into ``dest`` (standing for the image's /) exactly what ``dockerfile``'s COPY
    instructions copy from the repo root, symlinks kept as symlinks as COPY keeps them, minus
    the caches .dockerignore leaves out; the directory of the last WORKDIR."""
    workdir = PurePosixPath("/")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for word, rest in dockerfile_instructions(dockerfile):
        if word == "WORKDIR":
            workdir = workdir / rest
        elif word == "COPY":
            *srcs, target = [a for a in shlex.split(rest) if not a.startswith("--")]
            into = dest / (workdir / target).relative_to("/")
            for src in srcs:
                path = ROOT / src
                if path.is_dir() and not path.is_symlink():
                    shutil.copytree(path, into, symlinks=True, ignore=ignore, dirs_exist_ok=True)
                else:
                    to = into / path.name if target.endswith("/") or len(srcs) > 1 else into
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, to, follow_symlinks=False)
    return dest / workdir.relative_to("/")


@dataclass(frozen=True)
class BuiltWheel:
    """A wheel built from the Dockerfile's copied paths, and where it is installed."""

    wheel: Path
    site: Path
    cwd: Path


def _build_requires_met() -> bool:
    """Whether this environment satisfies [build-system].requires (no isolated build needed)."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    for text in requires:
        req = Requirement(text)
        try:
            if not req.specifier.contains(importlib.metadata.version(req.name), prereleases=True):
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


@pytest.fixture(scope="module")
def docker_wheel(tmp_path_factory: pytest.TempPathFactory) -> BuiltWheel:
    """`pip wheel` of what the sidecar Dockerfile copies, installed with `pip --target`."""
    base = tmp_path_factory.mktemp("docker-build")
    src = copy_build_context(ROOT / "Dockerfile", base / "image")
    isolation = ["--no-build-isolation"] if _build_requires_met() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                           "-w", str(base / "dist"), str(src)], cwd=base, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (base / "dist").glob("repwatch-*.whl")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", str(base / "site"), str(wheel)], cwd=base,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return BuiltWheel(wheel, base / "site", base)


_SERVE_RUNBOOKS = r'''
import json, os, sys
sys.modules["torch"] = None          # the sidecar image has no torch
import importlib.metadata
import monitor
from fastapi.testclient import TestClient
from monitor.server import create_app

client = TestClient(create_app(lambda: None, lambda: []), raise_server_exceptions=False)
page = client.get("/runbooks")
print(json.dumps({"file": monitor.__file__, "status": page.status_code,
                  "text": page.text, "version": importlib.metadata.version("repwatch"),
                  "api_version": client.get("/openapi.json").json()["info"]["version"],
                  "path": [os.path.abspath(p or os.curdir) for p in sys.path]}))
'''


def _headings(markdown: str) -> list[str]:
    """Texts of the ATX headings of ``markdown`` outside fenced code blocks."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


@pytest.mark.e2e
def test_wheel_of_the_image_serves_the_runbooks(docker_wheel: BuiltWheel) -> None:
    """From the installed wheel only (no repo on sys.path, no site hooks: python -S),
    /runbooks answers 200 with every heading of docs/runbooks.md."""
    purelib = sysconfig.get_paths()["purelib"]                # third-party packages
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(docker_wheel.site), purelib])
    proc = subprocess.run([sys.executable, "-S", "-c", _SERVE_RUNBOOKS], cwd=docker_wheel.cwd,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(docker_wheel.site), got["file"]
    assert str(ROOT) not in got["path"], got["path"]
    assert got["status"] == 200, got["text"][:2000]
    headings = _headings(RUNBOOKS_SOURCE.read_text(encoding="utf-8"))
    assert len(headings) > 3
    for heading in headings:
        assert re.search(rf"<h\d id=\"[^\"]*\">{re.escape(html.escape(heading, quote=False))}"
                         r"</h\d>", got["text"]), heading
    assert got["version"] == got["api_version"] == _project()["version"]


# ----------------------------------------------------------------------------- 4. version


@pytest.mark.e2e
def test_one_version_string() -> None:
    """pyproject's version is the installed distribution's, monitor.__version__, the
    info.version of both apps' OpenAPI documents and what `repwatch --version` prints."""
    from fastapi.testclient import TestClient

    import monitor
    from monitor.server import create_app
    from monitor.sidecar.service import SidecarConfig, create_sidecar_app

    version = _project()["version"]
    assert importlib.metadata.version("repwatch") == version, (
        "the installed metadata is stale: pip install -e . again")
    assert monitor.__version__ == version
    assert TestClient(create_app(lambda: None, lambda: [])).get(
        "/openapi.json").json()["info"]["version"] == version
    sidecar = create_sidecar_app(SidecarConfig())
    try:
        assert TestClient(sidecar).get("/openapi.json").json()["info"]["version"] == version
    finally:
        sidecar.state.sidecar.close()
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"repwatch {version}"


# ----------------------------------------------------------------------------- 5. wheel contents


def _dist_info(names: set[str], name: str) -> str:
    """The path of ``name`` (e.g. METADATA) in the wheel's repwatch-*.dist-info."""
    found = [n for n in names if re.fullmatch(rf"repwatch-[^/]+\.dist-info/{name}", n)]
    assert len(found) == 1, (name, sorted(n for n in names if ".dist-info/" in n))
    return found[0]


@pytest.mark.e2e
def test_wheel_metadata_has_the_spdx_license(docker_wheel: BuiltWheel) -> None:
    """PEP 639: License-Expression, the LICENSE file in the dist-info, no deprecated License
    field or license classifier."""
    with zipfile.ZipFile(docker_wheel.wheel) as z:
        names = set(z.namelist())
        meta = email.parser.Parser().parsestr(z.read(_dist_info(names, "METADATA")).decode())
        text = z.read(_dist_info(names, "licenses/LICENSE")).decode()
    assert meta.get_all("License-Expression") == ["Apache-2.0"], meta.items()
    assert meta.get("License") is None, meta.get("License")
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    assert "LICENSE" in (meta.get_all("License-File") or []), meta.get_all("License-File")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert text == (ROOT / "LICENSE").read_text(encoding="utf-8")


@pytest.mark.e2e
def test_wheel_ships_package_data(docker_wheel: BuiltWheel) -> None:
    """monitor/py.typed, exporters/py.typed (PEP 561), the dashboard's assets, the ONNX kernels
    and monitor/server/web/runbooks.md with the runbooks' text (a regular file: not a symlink's
    target path)."""
    from monitor.server.dashboard import ASSETS

    with zipfile.ZipFile(docker_wheel.wheel) as z:
        names = set(z.namelist())
        for marker in ("monitor/py.typed", "exporters/py.typed"):
            assert marker in names, sorted(n for n in names if n.endswith("typed"))
        for asset in ASSETS:
            assert f"monitor/server/web/{asset}" in names, sorted(n for n in names if "web/" in n)
        models = sorted(p.name for p in (ROOT / "monitor" / "sidecar" / "models").glob("*.onnx"))
        assert models and all(f"monitor/sidecar/models/{m}" in names for m in models), models
        assert "monitor/server/web/runbooks.md" in names, sorted(n for n in names if "web/" in n)
        info = z.getinfo("monitor/server/web/runbooks.md")
        assert stat.S_ISLNK(info.external_attr >> 16) is False, "stored as a symlink"
        assert z.read(info) == RUNBOOKS_SOURCE.read_bytes()
    installed = docker_wheel.site / "monitor" / "server" / "web" / "runbooks.md"
    assert installed.is_file() and not installed.is_symlink()


if __name__ == "__main__":
    print("monitor/server/web/runbooks.md", "updated" if sync_runbooks() else "already up to date")
