"""deploy/compose.yml and what it uses, checked without a Docker engine (none runs here).

The file parses; every service has an image or a build whose context and Dockerfile exist; every
bind-mounted host path exists; config files named on command lines resolve through the mounts;
ports and health checks are well formed; depends_on names services; the sidecar listens off
loopback only with a token from a compose secret; the Prometheus config is valid for promtool
and scrapes / alerts services that exist on the ports they listen on; the Alertmanager config is
the example one with the webhook pointed at the stack's receiver. The trainer image's command
runs for real against the sidecar image's command, and the webhook receiver runs for real.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from monitor.validation import is_loopback
from tests.deploy.manifests import (DEPLOY, ROOT, dockerfile_instructions, flag, image_command,
                                    load_one, with_flag)
from tests.torchless_serve import free_port, serve_without_torch

pytestmark = pytest.mark.timeout(300)

COMPOSE_FILE = DEPLOY / "compose.yml"
COMPOSE = load_one(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path resolved against deploy/, container path) of the service's bind mounts."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, dict):
            if vol.get("type") == "bind":
                out.append(((DEPLOY / vol["source"]).resolve(), vol["target"]))
            continue
        src, dst = vol.split(":")[:2]
        if src.startswith((".", "/")):
            out.append(((DEPLOY / src).resolve(), dst))
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repo file a container path of ``service`` maps to through its bind mounts."""
    target = PurePosixPath(container_path)
    for host, dst in _bind_mounts(service):
        d = PurePosixPath(dst)
        if target == d:
            return host
        if d in target.parents:
            return host / target.relative_to(d)
    return None


def _dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    context = (DEPLOY / (build if isinstance(build, str) else build["context"])).resolve()
    return context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")


def _command(service: dict[str, Any]) -> list[str]:
    """What the service's container runs: compose's ``command``, or the ENTRYPOINT+CMD of the
    image it builds; [] for a pulled image's own default."""
    if "command" in service:
        cmd = service["command"]
        return cmd if isinstance(cmd, list) else cmd.split()
    return image_command(_dockerfile(service)) if "build" in service else []


def _listen_port(name: str) -> int:
    """The port service ``name`` listens on, from its command line (or the image's default)."""
    defaults = {"prometheus": 9090, "alertmanager": 9093, "grafana": 3000}
    cmd = _command(SERVICES[name])
    port = flag(cmd, "--port")
    return int(port) if port else defaults[name]


# ----------------------------------------------------------------------------- structure


def test_services_have_an_image_or_a_build() -> None:
    assert {"sidecar", "trainer", "prometheus", "alertmanager", "grafana"} <= set(SERVICES)
    for name, svc in SERVICES.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            dockerfile = _dockerfile(svc)
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
            context = dockerfile.parent if "context" not in svc["build"] else \
                (DEPLOY / svc["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build from the repo root (its .dockerignore)"
        if "image" in svc and "build" not in svc:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]), f"{name}: pin a tag"


def test_bind_mounts_exist() -> None:
    mounts = [(name, host) for name, svc in SERVICES.items() for host, _ in _bind_mounts(svc)]
    assert len(mounts) >= 5
    for name, host in mounts:
        assert host.exists(), f"{name}: bind-mounted {host} does not exist"
        assert ROOT in host.parents, f"{name}: {host} is outside the repository"


def test_config_files_on_command_lines_resolve_through_the_mounts() -> None:
    checked = 0
    for name, svc in SERVICES.items():
        for arg in svc.get("command", []) if isinstance(svc.get("command"), list) else []:
            m = re.match(r"--config\.file=(.+)", arg)
            if m:
                host = _host_path(svc, m[1])
                assert host is not None and host.is_file(), f"{name}: {m[1]} is not mounted"
                checked += 1
        script = next((a for a in _command(svc) if a.endswith(".py")), None)
        if script and "image" in svc and "build" not in svc:
            host = _host_path(svc, script)
            assert host is not None and host.is_file(), f"{name}: {script} is not mounted"
            checked += 1
    assert checked >= 3


def test_ports_and_healthchecks_are_well_formed() -> None:
    for name, svc in SERVICES.items():
        for spec in svc.get("ports", []):
            parts = str(spec).split(":")
            assert len(parts) == 3 and is_loopback(parts[0]), \
                f"{name}: publish as 127.0.0.1:HOST:CONTAINER, got {spec!r}"
            host, container = int(parts[1]), int(parts[2])
            assert 0 < host < 65536 and container == _listen_port(name), (name, spec)
        hc = svc.get("healthcheck")
        if hc:
            assert hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) >= 2, name
            for key in ("interval", "timeout", "start_period"):
                if key in hc:
                    assert DURATION.match(hc[key]), f"{name}: {key}={hc[key]!r}"
            assert isinstance(hc.get("retries", 3), int)
            urls = [u for a in hc["test"] for u in re.findall(r"http://[^\s'\"]+", a)]
            assert all(urlsplit(u).port == _listen_port(name) for u in urls), (name, urls)


def test_depends_on_names_services_with_the_conditions_they_can_meet() -> None:
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", [])
        items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, cond in items:
            assert dep in SERVICES and dep != name, f"{name} depends on unknown {dep!r}"
            if cond.get("condition") == "service_healthy":
                has_image_check = ("build" in SERVICES[dep] and any(
                    w == "HEALTHCHECK" for w, _ in dockerfile_instructions(_dockerfile(SERVICES[dep]))))
                assert "healthcheck" in SERVICES[dep] or has_image_check, f"{dep} has no health check"


def test_sidecar_is_off_loopback_only_with_a_token_secret() -> None:
    for name, svc in SERVICES.items():
        cmd = _command(svc)
        if cmd[:2] != ["repwatch", "serve"]:
            continue
        host = flag(cmd, "--host") or "127.0.0.1"
        if is_loopback(host):
            continue
        token = flag(cmd, "--token-file")
        assert token, f"{name} serves on {host} without --token-file"
        targets = {s["target"] if isinstance(s, dict) else s: s for s in svc.get("secrets", [])}
        assert PurePosixPath(token).parent == PurePosixPath("/run/secrets")
        entry = targets[PurePosixPath(token).name]
        source = entry["source"] if isinstance(entry, dict) else entry
        defined = COMPOSE["secrets"][source]
        assert set(defined) & {"environment", "file", "external"}
        if "file" in defined:
            assert (DEPLOY / defined["file"]).is_file()
        return
    pytest.fail("no service runs `repwatch serve`")


def test_trainer_ships_to_the_sidecar_with_the_token() -> None:
    cmd = _command(SERVICES["trainer"])
    assert cmd[:2] == ["repwatch", "demo"]
    sink = urlsplit(flag(cmd, "--sink") or "")
    assert sink.scheme == "http" and sink.hostname == "sidecar"
    assert sink.port == _listen_port("sidecar")
    token = PurePosixPath(flag(cmd, "--token-file") or "")
    trainer_secrets = {s["target"] if isinstance(s, dict) else s for s in SERVICES["trainer"]["secrets"]}
    assert token.parent == PurePosixPath("/run/secrets") and token.name in trainer_secrets
    deps = SERVICES["trainer"]["depends_on"]
    assert deps["sidecar"]["condition"] == "service_healthy"


def test_trainer_dockerfile() -> None:
    path = DEPLOY / "trainer.Dockerfile"
    ins = dockerfile_instructions(path)
    assert ins[0][0] == "FROM" and "slim" in ins[0][1]
    for word, rest in ins:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "torch" in runs and "--index-url" in runs and ".[demo]" in runs
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns
    for dockerfile in (ROOT / "Dockerfile", DEPLOY / "trainer.Dockerfile"):
        for word, rest in dockerfile_instructions(dockerfile):
            if word == "COPY":
                for src in rest.split()[:-1]:
                    assert not any(fnmatch.fnmatch(src.rstrip("/"), p) for p in patterns), src


# ----------------------------------------------------------------------------- Prometheus, Alertmanager, Grafana


@pytest.mark.e2e
def test_prometheus_compose_config_is_valid(promtool: str) -> None:
    args = SERVICES["prometheus"]["command"]
    config = _host_path(SERVICES["prometheus"], next(a for a in args
                                                    if a.startswith("--config.file="))[14:])
    assert config is not None
    proc = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
    doc = yaml.safe_load(config.read_text())
    assert doc["rule_files"] == ["rules.yml"]                     # the one generated rule file
    rules = yaml.safe_load((config.parent / "rules.yml").read_text())
    down = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == "RepwatchDown")
    job_regex = re.search(r'job=~"([^"]+)"', down["expr"])
    assert job_regex is not None
    targets = []
    for job in doc["scrape_configs"]:
        assert re.fullmatch(job_regex[1], job["job_name"]), job["job_name"]
        targets += [t for sc in job["static_configs"] for t in sc["targets"]]
    for am in doc["alerting"]["alertmanagers"]:
        targets += [t for sc in am["static_configs"] for t in sc["targets"]]
    assert {t.split(":")[0] for t in targets} == {"sidecar", "alertmanager"}
    for t in targets:
        svc, port = t.split(":")
        assert int(port) == _listen_port(svc), t


@pytest.mark.e2e
def test_alertmanager_compose_config(alertmanager: str) -> None:
    args = SERVICES["alertmanager"]["command"]
    config = _host_path(SERVICES["alertmanager"],
                        next(a for a in args if a.startswith("--config.file="))[14:])
    assert config is not None
    compose_cfg = yaml.safe_load(config.read_text())
    example = yaml.safe_load((DEPLOY / "alertmanager/alertmanager.yml").read_text())
    urls = [w["url"] for r in compose_cfg["receivers"] for w in r.get("webhook_configs", [])]
    for r in example["receivers"]:
        for w in r.get("webhook_configs", []):
            w["url"] = urls[0]
    assert compose_cfg == example, "alertmanager.compose.yml differs from alertmanager.yml " \
                                   "beyond the webhook URL"
    url = urlsplit(urls[0])
    assert url.hostname == "webhook" and url.port == int(flag(_command(SERVICES["webhook"]), "--port") or 0)
    amtool = Path(alertmanager).with_name("amtool")
    if amtool.exists():
        proc = subprocess.run([str(amtool), "check-config", str(config)], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisioning_reaches_prometheus_and_the_dashboard() -> None:
    grafana = SERVICES["grafana"]
    ds_dir = _host_path(grafana, "/etc/grafana/provisioning/datasources")
    dash_dir = _host_path(grafana, "/etc/grafana/provisioning/dashboards")
    assert ds_dir is not None and dash_dir is not None
    datasources = [d for f in sorted(ds_dir.glob("*.yml")) for d in load_one(f)["datasources"]]
    prom = next(d for d in datasources if d["type"] == "prometheus")
    url = urlsplit(prom["url"])
    assert url.hostname == "prometheus" and url.port == _listen_port("prometheus")
    providers = [p for f in sorted(dash_dir.glob("*.yml")) for p in load_one(f)["providers"]]
    for p in providers:
        host = _host_path(grafana, p["options"]["path"])
        assert host is not None and (host / "repwatch.json").is_file()
        json.loads((host / "repwatch.json").read_text())
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (_host_path(grafana, home) or Path("/nonexistent")).is_file()


# ----------------------------------------------------------------------------- commands, for real


@pytest.mark.slow
@pytest.mark.e2e
def test_trainer_command_reaches_the_sidecar_command(tmp_path: Path) -> None:
    """The sidecar image's command and the trainer image's command (ports, token path and the
    service host swapped for local ones, fewer steps): the run arrives, authenticated."""
    token = tmp_path / "repwatch-token"
    token.write_text("compose-test-token\n")
    port = free_port()
    serve = _command(SERVICES["sidecar"])[2:]
    serve = with_flag(with_flag(with_flag(serve, "--host", "127.0.0.1"), "--port", str(port)),
                      "--token-file", str(token))
    train = _command(SERVICES["trainer"])[2:]
    train = with_flag(with_flag(train, "--sink", f"http://127.0.0.1:{port}"),
                      "--token-file", str(token))
    train = with_flag(train, "--steps", "60") + ["--device", "cpu"]
    with serve_without_torch(serve, port) as url:
        proc = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", *train], cwd=ROOT,
                              capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs = {r["run"]: r for r in httpx.get(f"{url}/v1/runs", timeout=5).json()}
    assert runs["demo-collapse"]["step"] == 60          # --collapse-at in the image's command
    assert runs["demo-collapse"]["streams"]["projector"]["window_samples"] > 0


@pytest.mark.e2e
def test_webhook_receiver_prints_alerts() -> None:
    script = _host_path(SERVICES["webhook"], next(a for a in _command(SERVICES["webhook"])
                                                  if a.endswith(".py")))
    assert script is not None
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/alerts"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "receiver did not start"
                time.sleep(0.1)
        payload = {"status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": "RepwatchRepresentationCollapse",
                                            "severity": "critical", "run": "r1",
                                            "stream": "projector"},
             "annotations": {"summary": "collapsed"}}]}
        assert httpx.post(url, json=payload, timeout=5).status_code == 200
        assert httpx.post(url, content=b"not json", timeout=5).status_code == 400
        assert httpx.post(url.replace("/alerts", "/other"), json=payload, timeout=5).status_code == 404
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert ("firing RepwatchRepresentationCollapse severity=critical run=r1 stream=projector: "
            "collapsed") in out


def test_trainer_command_refuses_a_bad_token_setup(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --sink URL --token-file F`: an empty token file, or a token with a shm:// sink,
    ends with exit code 2 and a message, before any training."""
    from monitor.cli import main

    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["demo", "--sink", "http://127.0.0.1:9", "--token-file", str(empty),
                 "--steps", "1"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["demo", "--sink", "shm://x", "--token-file", str(empty), "--steps", "1"]) == 2
    assert "--token-file needs --sink http" in capsys.readouterr().err
