"""The sidecar Dockerfile, checked without a Docker engine (none runs here): what it copies
exists, it runs as a non-root user with an exec-form command and a health check, it installs
no torch, and the exact command it runs starts and becomes ready with torch unimportable."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import InvalidRequirement, Requirement

from tests.deploy.manifests import dockerfile_instructions, exec_form
from tests.torchless_serve import free_port, serve_without_torch

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(ROOT / "Dockerfile")


_exec_form = exec_form


def _pip_requirements(run: str) -> dict[str, Requirement]:
    """The requirements named on the `pip install` command lines of a RUN instruction."""
    found: dict[str, Requirement] = {}
    for command in run.split("&&"):
        words = shlex.split(command)                   # continuation lines are joined
        if words[:2] != ["pip", "install"]:
            continue
        for word in words[2:]:
            if word.startswith("-") or word == ".":
                continue
            try:
                req = Requirement(word)
            except InvalidRequirement:
                continue
            found[f"{req.name.lower()}{sorted(req.extras)}"] = req
    return found


def test_image_installs_the_core_dependencies_but_torch_and_the_sidecar_extra() -> None:
    """The image installs the package with --no-deps, so its RUN line must name every core
    dependency (torch excepted: the sidecar scores on ONNX Runtime) and the sidecar extra,
    with pyproject.toml's version ranges."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    wanted = [Requirement(r) for r in project["dependencies"]
              + project["optional-dependencies"]["sidecar"]]
    run = " && ".join(rest for word, rest in _instructions() if word == "RUN")
    got = _pip_requirements(run)
    for req in wanted:
        if req.name == "torch":
            assert f"{req.name}[]" not in got, "the sidecar image installs no torch"
            continue
        key = f"{req.name.lower()}{sorted(req.extras)}"
        assert key in got, f"the Dockerfile does not install {req} (pyproject.toml)"
        assert got[key].specifier == req.specifier, (str(got[key]), str(req))


def test_structure() -> None:
    ins = _instructions()
    assert ins[0][0] == "FROM" and "slim" in ins[0][1]
    for word, rest in ins:
        if word == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = _exec_form(next(rest for word, rest in ins if word == "ENTRYPOINT"))
    cmd = _exec_form(next(rest for word, rest in ins if word == "CMD"))
    assert entry == ["repwatch", "serve"] and "--token-file" in cmd
    health = next(rest for word, rest in ins if word == "HEALTHCHECK")
    assert "/readyz" in health and "CMD [" in health
    installs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "torch" not in installs and "onnxruntime" in installs and "--no-deps ." in installs


@pytest.mark.e2e
def test_the_image_command_starts_without_torch(tmp_path: Path) -> None:
    """Run the image's ENTRYPOINT + CMD (with the port and token path swapped for free ones)."""
    ins = _instructions()
    assert _exec_form(next(r for w, r in ins if w == "ENTRYPOINT")) == ["repwatch", "serve"]
    args = _exec_form(next(r for w, r in ins if w == "CMD"))
    port = free_port()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args[args.index("--port") + 1] = str(port)
    args[args.index("--token-file") + 1] = str(token)
    args[args.index("--host") + 1] = "127.0.0.1"          # no 0.0.0.0 in tests
    with serve_without_torch(args, port) as url:
        r = httpx.post(f"{url}/v1/runs/r/streams/s/batches", content=b"",
                       headers={"Content-Type": "application/octet-stream"}, timeout=5)
        assert r.status_code == 401                          # the token is enforced
