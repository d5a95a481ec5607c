"""Helpers for the deploy/ tests (not a test module): Dockerfile instructions, YAML documents,
a small emulation of the kustomize build of deploy/k8s/example, and a kustomize binary."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPONENT = K8S / "components" / "repwatch"
EXAMPLE = K8S / "example"


# ----------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(rest: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (fails on the shell form)."""
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def image_command(path: Path) -> list[str]:
    """ENTRYPOINT + CMD of a Dockerfile (exec form)."""
    ins = dockerfile_instructions(path)
    entry = exec_form(next(r for w, r in ins if w == "ENTRYPOINT"))
    return entry + exec_form(next(r for w, r in ins if w == "CMD"))


def flag(args: list[str], name: str) -> str | None:
    """Value of ``--name VALUE`` / ``--name=VALUE`` in ``args`` (None when absent)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def with_flag(args: list[str], name: str, value: str) -> list[str]:
    """``args`` with the value of ``--name`` replaced (it must be there)."""
    out = list(args)
    i = out.index(name)
    out[i + 1] = value
    return out


# ----------------------------------------------------------------------------- YAML


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


# ----------------------------------------------------------------------------- kustomize

MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
"""Strategic-merge keys of the pod-spec lists the component's patch touches (Kubernetes API:
``patchMergeKey``); other lists are replaced."""


def strategic_merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base`` the way a strategic-merge patch merges pod templates: maps
    recursively, keyed lists (:data:`MERGE_KEYS`) item by item, anything else replaced."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key in MERGE_KEYS and isinstance(out.get(key), list) and isinstance(value, list):
            merged = out[key]
            mk = MERGE_KEYS[key]
            for item in value:
                i = next((j for j, x in enumerate(merged) if x.get(mk) == item.get(mk)), None)
                if i is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[i] = strategic_merge(merged[i], item)
        elif key in out:
            out[key] = strategic_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    if target.get("group", group) != group or target.get("version", version) != version:
        return False
    if target.get("kind", doc["kind"]) != doc["kind"]:
        return False
    labels = doc.get("metadata", {}).get("labels", {}) or {}
    for term in filter(None, (target.get("labelSelector") or "").split(",")):
        k, _, v = term.partition("=")
        if labels.get(k.strip()) != v.strip():
            return False
    return True


def build_component(base: list[dict[str, Any]], component: Path = COMPONENT) -> list[dict[str, Any]]:
    """``base`` objects with the component applied: its resources added, its strategic-merge
    patches merged into every matching object (the patch's own name ignored, as kustomize
    does for patches with a target)."""
    kust = load_one(component / "kustomization.yaml")
    docs = [copy.deepcopy(d) for d in base]
    for res in kust.get("resources", []):
        docs += load_docs(component / res)
    for entry in kust.get("patches", []):
        patch = load_one(component / entry["path"])
        patch.get("metadata", {}).pop("name", None)
        docs = [strategic_merge(d, patch) if _matches(d, entry["target"]) else d for d in docs]
    return docs


def build_example() -> list[dict[str, Any]]:
    """The objects of ``deploy/k8s/example`` with the component applied (before the overlay's
    ``images`` and JSON patches, which only rename images and relabel)."""
    kust = load_one(EXAMPLE / "kustomization.yaml")
    base = [d for res in kust["resources"] for d in load_docs(EXAMPLE / res)]
    docs = base
    for comp in kust.get("components", []):
        docs = build_component(docs, (EXAMPLE / comp).resolve())
    return docs


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def kustomize_command() -> list[str] | None:
    """``kustomize build`` or ``kubectl kustomize`` when one with Component support (kustomize
    >= v3.7; kubectl >= 1.21 embeds v4+) is on PATH, else None. Debian's kubectl (1.20) is too
    old."""
    if shutil.which("kustomize"):
        return [shutil.which("kustomize") or "kustomize", "build"]
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
        version = json.loads(out).get("kustomizeVersion", "")
    except (ValueError, OSError, subprocess.TimeoutExpired):
        return None
    m = re.match(r"v(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) < (3, 7):
        return None
    return [kubectl, "kustomize"]
