# repwatch — `make demo` runs the demo training with live metrics and alerts;
# `make test` installs everything the tests need and runs them. Both start from a clean clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch: the CPU build by default, from a local wheel directory when pip has one configured
# (find-links), else from PyTorch's CPU index. For a CUDA build, e.g.:
#   make TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128 demo
# (or TORCH_INDEX=https://pypi.org/simple: PyPI's Linux wheels are CUDA builds).
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Extra flags for the torch install only (the tests use --dry-run --report FILE).
TORCH_PIP_FLAGS ?=
DEMO_ARGS ?= --collapse-at 300 --steps 700 --linger 120
# pytest-xdist: one worker per CPU core, a test module on one worker (XDIST= : one process).
XDIST ?= -n auto --dist loadscope
# More pytest arguments for the test targets, e.g. PYTEST_ARGS='-k sink -x'.
PYTEST_ARGS ?=

TORCH_STAMP := $(VENV)/.torch-installed
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: demo demo-plasticity test test-fast test-shuffled install ops-tools promtool kernels clean \
	detection detection-report

install: $(TEST_STAMP)

# pip prints what it collects and installs (no -q): a first install takes minutes.
$(TORCH_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_SPEC) (a local wheel if pip has one, else $(TORCH_INDEX))"
	$(PY) -m pip install $(TORCH_PIP_FLAGS) --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null \
	  || $(PY) -m pip install $(TORCH_PIP_FLAGS) --no-deps --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"
	touch $@

# The demo needs only the package and scikit-learn (its data set).
$(DEMO_STAMP): pyproject.toml Makefile $(TORCH_STAMP)
	$(PY) -m pip install -e '.[demo]'
	touch $@

# urllib3-future (via grafana-client → niquests) built from source without its .pth hook that
# overwrites urllib3 (see pyproject.toml): requests-based tools (schemathesis) keep urllib3.
$(TEST_STAMP): pyproject.toml Makefile $(DEMO_STAMP)
	URLLIB3_NO_OVERRIDE=1 $(PY) -m pip install --no-binary urllib3-future -e '.[demo,test,sidecar]'
	touch $@

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

demo: $(DEMO_STAMP)
	$(VENV)/bin/repwatch demo $(DEMO_ARGS)

# Loss of plasticity on random-label tasks; ReDo wired to RepwatchPlasticityLoss.
demo-plasticity: $(DEMO_STAMP)
	$(VENV)/bin/repwatch demo --scenario plasticity --redo --linger 60

# The alert detection benchmark (docs/detection.md): trains every setting × 3 seeds with lightly's
# SSL code and the plasticity / Q-Score scenarios, then replays the alert rules and writes the page.
# Its own venv: lightly needs torchvision, which needs PyPI's torch 2.14.1 (a CUDA build, ~5.5 GB).
DETECTION_VENV ?= .venv-detection
DETECTION_ARGS ?=
$(DETECTION_VENV)/.installed: pyproject.toml
	test -x $(DETECTION_VENV)/bin/python || $(PYTHON) -m venv $(DETECTION_VENV)
	$(DETECTION_VENV)/bin/python -m pip install -e '.[detection]'
	touch $@

detection: $(DETECTION_VENV)/.installed
	$(DETECTION_VENV)/bin/python -m benchmarks.detection all $(DETECTION_ARGS)

# Rewrite docs/detection.md from the committed traces (no training).
detection-report: $(DETECTION_VENV)/.installed
	$(DETECTION_VENV)/bin/python -m benchmarks.detection report

# The whole suite.
test: $(TEST_STAMP) ops-tools
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The fast part: nothing that trains a model or starts another process.
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -m "not slow and not e2e" $(XDIST) $(PYTEST_ARGS)

# The whole suite in a random order (pytest-randomly prints the seed it drew; repeat that
# order with PYTEST_ARGS='--randomly-seed=N').
test-shuffled: $(TEST_STAMP) ops-tools
	$(PY) -m pytest -p randomly $(XDIST) $(PYTEST_ARGS)

# Re-export the sidecar's ONNX kernel from the torch scorer code (a test fails when it drifts).
kernels: $(TEST_STAMP)
	$(PY) -m monitor.sidecar.export_kernels

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
