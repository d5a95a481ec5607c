"""deploy/k8s: the repwatch kustomize Component and the example overlay.

No cluster runs here. The manifests are checked for what the pod needs to work (native sidecar,
a memory-backed /dev/shm shared by both containers and big enough for the ring, probes on named
ports, the token secret, one UID), validated against the Kubernetes API models of the official
``kubernetes`` client (strict: unknown fields fail), the generated objects against their sources,
and the build against a real kustomize when one with Component support is on PATH. The two
command lines of the pod run here for real: the sidecar's args with the shm ring, and the
trainer image's command with ``$(REPWATCH_SINK)`` expanded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from monitor.validation import is_loopback
from monitor.transport.shm import DEFAULT_SLOTS, HEADER_SIZE, parse_spec
from tests.deploy.manifests import (COMPONENT, DEPLOY, EXAMPLE, K8S, ROOT, build_example, flag,
                                    image_command, kustomize_command, load_docs, load_one,
                                    pod_spec, with_flag)
from tests.torchless_serve import free_port, serve_without_torch

pytestmark = pytest.mark.timeout(300)


def _quantity_bytes(q: str) -> int:
    """A Kubernetes memory quantity (``256Mi``, ``1Gi``, ``500M``, plain bytes) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", q)
    assert m, f"not a memory quantity: {q!r}"
    scale = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m[2]]
    return int(m[1]) * scale


def _objects(kind: str, docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [d for d in (docs if docs is not None else build_example()) if d.get("kind") == kind]


def _job() -> dict[str, Any]:
    jobs = _objects("Job")
    assert len(jobs) == 1
    return jobs[0]


def _containers(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the repwatch sidecar, the trainer) of a patched pod spec."""
    sidecar = next(c for c in spec.get("initContainers", []) if c["name"] == "repwatch")
    trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
    return sidecar, trainer


# ----------------------------------------------------------------------------- files


def test_every_manifest_parses() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        for doc in load_docs(path):
            assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), path
            if doc["kind"] not in ("Kustomization", "Component"):
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"


def test_component_and_overlay_reference_existing_files() -> None:
    comp = load_one(COMPONENT / "kustomization.yaml")
    assert comp["apiVersion"] == "kustomize.config.k8s.io/v1alpha1" and comp["kind"] == "Component"
    for res in comp["resources"]:
        assert (COMPONENT / res).is_file(), res
    for p in comp["patches"]:
        assert (COMPONENT / p["path"]).is_file() and p["target"]["kind"] == "Job"
    example = load_one(EXAMPLE / "kustomization.yaml")
    assert example["kind"] == "Kustomization"
    assert [(EXAMPLE / c).resolve() for c in example["components"]] == [COMPONENT.resolve()]
    # every `images:` entry renames an image the build actually uses
    used = {c["image"] for c in (pod_spec(_job())["containers"] + pod_spec(_job())["initContainers"])}
    assert {i["name"] for i in example["images"]} == used


def test_the_patch_targets_the_example_job() -> None:
    comp = load_one(COMPONENT / "kustomization.yaml")
    job = load_one(EXAMPLE / "job.yaml")
    (target,) = [p["target"] for p in comp["patches"]]
    key, _, value = target["labelSelector"].partition("=")
    assert job["metadata"]["labels"][key] == value
    assert job["apiVersion"] == f"{target['group']}/{target['version']}"


# ----------------------------------------------------------------------------- the pod


def test_native_sidecar() -> None:
    sidecar, trainer = _containers(pod_spec(_job()))
    assert sidecar["restartPolicy"] == "Always"            # native sidecar (k8s >= 1.29)
    assert "restartPolicy" not in trainer
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"metrics": 9400}
    args = sidecar["args"]
    assert int(flag(args, "--port") or 0) == ports["metrics"]
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports, probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(sidecar["resources"][kind]), kind
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsUser"] != 0


def test_shared_memory_volume_is_shared_and_big_enough() -> None:
    spec = pod_spec(_job())
    sidecar, trainer = _containers(spec)
    memory = {v["name"]: v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
    assert len(memory) == 1
    (name, volume), = memory.items()

    def mounts(c: dict[str, Any]) -> set[str]:
        return {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == name}

    assert mounts(sidecar) == mounts(trainer) == {"/dev/shm"}    # where POSIX shm lives
    # the trainer's sink names the ring the sidecar creates
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    ring = flag(sidecar["args"], "--shm")
    sink = env["REPWATCH_SINK"]
    port = flag(sidecar["args"], "--port")
    assert ring and sink == f"shm://{parse_spec(ring).name}?read=http://127.0.0.1:{port}"
    spec_ring = parse_spec(ring)
    ring_bytes = HEADER_SIZE + (spec_ring.slots or DEFAULT_SLOTS) * spec_ring.slot_size
    assert ring_bytes <= _quantity_bytes(volume["emptyDir"]["sizeLimit"]) / 2, \
        "the ring should leave /dev/shm room for the trainer's DataLoader workers"
    # the ring is created with mode 0600: both containers must run as one UID
    uid = sidecar["securityContext"]["runAsUser"]
    assert (trainer.get("securityContext", {}).get("runAsUser")
            or spec.get("securityContext", {}).get("runAsUser")) == uid
    # ... which is the UID of the sidecar image and of the trainer image
    for dockerfile in (ROOT / "Dockerfile", DEPLOY / "trainer.Dockerfile"):
        text = dockerfile.read_text()
        assert f"--uid {uid}" in text and f"USER {uid}" in text, dockerfile


def test_trainer_args_use_the_sink_variable() -> None:
    _, trainer = _containers(pod_spec(_job()))
    refs = {m for a in trainer.get("args", []) for m in re.findall(r"\$\((\w+)\)", a)}
    assert refs and refs <= {e["name"] for e in trainer["env"]}


def test_non_loopback_sidecar_has_its_token_from_the_secret() -> None:
    spec = pod_spec(_job())
    sidecar, _ = _containers(spec)
    args = sidecar["args"]
    assert not is_loopback(flag(args, "--host") or "127.0.0.1")   # Prometheus scrapes the pod IP
    token_file = Path(flag(args, "--token-file") or "")
    mount = next(m for m in sidecar["volumeMounts"] if Path(m["mountPath"]) == token_file.parent)
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    secret = volume["secret"]
    assert secret["secretName"] == "repwatch-token"
    assert token_file.name in {i["path"] for i in secret["items"]}
    # the documented command creates that Secret with that key
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl create secret generic repwatch-token --from-literal=token=" in readme
    assert {i["key"] for i in secret["items"]} == {"token"}


@pytest.mark.slow
def test_pod_validates_against_the_kubernetes_api_models() -> None:
    """The patched Job, strictly: the client's pydantic models forbid unknown fields."""
    models = pytest.importorskip("kubernetes.client.models")
    assert "restart_policy" in models.V1Container.model_fields    # native sidecars (>= 1.28)
    job = models.V1Job.model_validate(_job())
    spec = job.spec.template.spec
    assert [c.restart_policy for c in spec.init_containers] == ["Always"]
    assert [v.empty_dir.medium for v in spec.volumes if v.empty_dir].count("Memory") == 1
    for obj in _objects("ConfigMap"):
        models.V1ConfigMap.model_validate(obj)
    # the validation is strict: a misspelt field is rejected
    bad = json.loads(json.dumps(_job()))
    pod_spec(bad)["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(ValueError):
        models.V1Job.model_validate(bad)


# ----------------------------------------------------------------------------- monitoring objects


def test_podmonitor_scrapes_the_sidecar_port() -> None:
    docs = build_example()
    (pm,) = _objects("PodMonitor", docs)
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    job = _job()
    sidecar, _ = _containers(pod_spec(job))
    port_names = {p["name"] for p in sidecar["ports"]}
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e["port"] in port_names and e.get("path", "/metrics") == "/metrics"
                             for e in endpoints)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # Prometheus Operator names the job "<namespace>/<PodMonitor name>": RepwatchDown must match
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    down = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == "RepwatchDown")
    regex = re.search(r'job=~"([^"]+)"', down["expr"])
    assert regex and re.fullmatch(regex[1], f"training/{pm['metadata']['name']}")


def test_prometheusrule_groups_equal_rules_yml() -> None:
    (rule,) = _objects("PrometheusRule")
    shipped = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]


def test_dashboard_configmap_holds_the_dashboard() -> None:
    (cm,) = _objects("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = cm["data"]["repwatch.json"]
    assert text == (DEPLOY / "grafana/dashboards/repwatch.json").read_text()
    from exporters.grafana import render_dashboard

    assert json.loads(text) == render_dashboard()
    # client-side `kubectl apply` stores the object in an annotation limited to 256 KiB
    assert len(json.dumps(cm)) < 262144 * 0.8


def test_overlay_relabel_patches_hit_existing_labels() -> None:
    """The overlay's JSON patches `replace` the release label: replace needs it to exist."""
    example = load_one(EXAMPLE / "kustomization.yaml")
    docs = build_example()
    for entry in example["patches"]:
        targets = [d for d in docs if d["apiVersion"].split("/")[0] == entry["target"]["group"]]
        assert {d["kind"] for d in targets} == {"PodMonitor", "PrometheusRule"}
        for op in yaml.safe_load(entry["patch"]):
            assert op["op"] == "replace" and op["path"] == "/metadata/labels/release"
            assert all("release" in d["metadata"]["labels"] for d in targets)


# ----------------------------------------------------------------------------- real kustomize


def _normalise(doc: Any) -> Any:
    """Keyed lists as dicts (kustomize orders merged list items its own way), images untagged."""
    if isinstance(doc, dict):
        out = {k: _normalise(v) for k, v in doc.items()}
        if isinstance(out.get("image"), str):
            out["image"] = out["image"].split(":")[0]
        return out
    if isinstance(doc, list) and doc and all(isinstance(x, dict) for x in doc):
        key = next((k for k in ("name", "mountPath", "containerPort") if all(k in x for x in doc)),
                   None)
        if key is not None:
            return {str(x[key]): _normalise(x) for x in doc}
    if isinstance(doc, list):
        return [_normalise(x) for x in doc]
    return doc


@pytest.mark.slow
@pytest.mark.e2e
def test_kustomize_build_matches() -> None:
    """With a kustomize that supports Components on PATH (this VM: google-cloud-sdk's kubectl),
    the real build equals the emulation the other tests read, and validates."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("no kustomize >= 3.7 / kubectl >= 1.21 on PATH (Debian's kubectl is 1.20)")
    proc = subprocess.run([*cmd, str(EXAMPLE)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    by_kind = {d["kind"]: d for d in built}
    assert sorted(by_kind) == ["ConfigMap", "Job", "PodMonitor", "PrometheusRule"]
    assert _normalise(by_kind["Job"]) == _normalise(_job())
    example = load_one(EXAMPLE / "kustomization.yaml")
    tags = {i["name"]: i["newTag"] for i in example["images"]}
    spec = pod_spec(by_kind["Job"])
    for c in spec["containers"] + spec["initContainers"]:
        name, _, tag = c["image"].partition(":")
        assert tag == tags[name]
    for kind in ("PodMonitor", "PrometheusRule"):
        assert by_kind[kind]["metadata"]["labels"]["release"]
    assert by_kind["PrometheusRule"]["spec"] == _objects("PrometheusRule")[0]["spec"]
    models = pytest.importorskip("kubernetes.client.models")
    models.V1Job.model_validate(by_kind["Job"])


# ----------------------------------------------------------------------------- the pod's commands


@pytest.mark.slow
@pytest.mark.e2e
def test_pod_commands_run_over_shared_memory(tmp_path: Path) -> None:
    """The sidecar with the manifest's args (loopback, free port, temporary token, a unique ring
    name) and the trainer image's ENTRYPOINT with the Job's args, ``$(REPWATCH_SINK)`` expanded
    from the patched env: the rows travel through /dev/shm and the sidecar scores them."""
    spec = pod_spec(_job())
    sidecar, trainer = _containers(spec)
    ring = f"rwk8s{uuid.uuid4().hex[:10]}"
    port = free_port()
    token = tmp_path / "token"
    token.write_text("k8s-test-token\n")
    args = with_flag(sidecar["args"], "--host", "127.0.0.1")
    args = with_flag(args, "--port", str(port))
    args = with_flag(args, "--token-file", str(token))
    args = with_flag(args, "--shm", ring)
    assert image_command(ROOT / "Dockerfile")[:2] == ["repwatch", "serve"]   # + these args
    env = {e["name"]: e["value"] for e in trainer["env"]}
    env["REPWATCH_SINK"] = env["REPWATCH_SINK"].replace(
        flag(sidecar["args"], "--shm") or "", ring).replace(
        f":{flag(sidecar['args'], '--port')}", f":{port}")
    entry = image_command(DEPLOY / "trainer.Dockerfile")[:2]
    assert entry == ["repwatch", "demo"]
    targs = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in trainer["args"]]
    targs = with_flag(with_flag(targs, "--steps", "60"), "--linger", "0")
    targs += ["--every", "10", "--device", "cpu"]
    with serve_without_torch(args, port) as url:
        proc = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", *targs], cwd=ROOT,
                              capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs = httpx.get(f"{url}/v1/runs", timeout=5).json()
    run = next(r for r in runs if r["run"] == "demo-collapse")     # --collapse-at in the Job
    assert run["step"] == 60 and run["streams"]["projector"]["window_samples"] > 0
