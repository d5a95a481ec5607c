# repwatch — `make demo` runs the demo training with live metrics and alerts;
# `make test` installs everything the tests need and runs them. Both start from a clean clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The CPU build of torch; override (e.g. TORCH_SPEC=torch) to get a CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_ARGS ?= --collapse-at 300 --steps 700 --linger 120

.PHONY: demo demo-plasticity test install ops-tools promtool kernels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# urllib3-future (via grafana-client → niquests) built from source without its .pth hook that
	# overwrites urllib3 (see pyproject.toml): requests-based tools (schemathesis) keep urllib3.
	URLLIB3_NO_OVERRIDE=1 $(PY) -m pip install --quiet --no-binary urllib3-future -e '.[demo,test,sidecar]'
	touch $(STAMP)

# Debian's prometheus (promtool, prometheus) and prometheus-alertmanager (alertmanager, amtool)
# for the rule checks and the end-to-end alerting test, and chromium for the dashboard's browser
# test (tests/e2e, driven by Playwright by path); installed only when missing and root.
ops-tools:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
	  || missing="$$missing prometheus-alertmanager"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing$$missing and cannot apt-get install; their tests will skip (or fail under CI=true)"; \
	  fi; \
	fi

promtool: ops-tools

demo: $(STAMP)
	$(VENV)/bin/repwatch demo $(DEMO_ARGS)

# Loss of plasticity on random-label tasks; ReDo wired to RepwatchPlasticityLoss.
demo-plasticity: $(STAMP)
	$(VENV)/bin/repwatch demo --scenario plasticity --redo --linger 60

test: $(STAMP) ops-tools
	$(PY) -m pytest

# Re-export the sidecar's ONNX kernel from the torch scorer code (a test fails when it drifts).
kernels: $(STAMP)
	$(PY) -m monitor.sidecar.export_kernels

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
