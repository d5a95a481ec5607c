"""The sidecar Dockerfile, checked without a Docker engine (none runs here): what it copies
exists, it runs as a non-root user with an exec-form command and a health check, it installs
no torch, and the exact command it runs starts and becomes ready with torch unimportable."""

from __future__ import annotations

import shlex
from pathlib import Path

import httpx

from tests.deploy.manifests import dockerfile_instructions, exec_form
from tests.torchless_serve import free_port, serve_without_torch

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(ROOT / "Dockerfile")


_exec_form = exec_form


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
