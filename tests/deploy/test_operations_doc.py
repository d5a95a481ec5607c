"""docs/operations.md: its Prometheus examples are valid configs, its limits are the defaults."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from monitor.sidecar.service import SidecarConfig
from tests.deploy.manifests import ROOT

DOC = (ROOT / "docs/operations.md").read_text()


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["remote_write", "scrape_configs"])
def test_prometheus_examples_pass_promtool(promtool: str, tmp_path: Path, key: str) -> None:
    blocks = [b for b in _yaml_blocks() if re.search(rf"^{key}:", b, flags=re.M)]
    assert len(blocks) == 1, f"expected one example with top-level {key}"
    assert isinstance(yaml.safe_load(blocks[0]), dict)
    config = tmp_path / "prometheus.yml"
    config.write_text(blocks[0])
    proc = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_quoted_sidecar_limits_are_the_defaults() -> None:
    config = SidecarConfig()
    rows = dict(re.findall(r"^\| `--([a-z-]+)` \| (\d+)", DOC, flags=re.M))
    assert rows == {"max-runs": str(config.max_runs),
                    "max-streams-per-run": str(config.max_streams_per_run),
                    "max-dim": str(config.max_dim), "window": str(config.window)}
