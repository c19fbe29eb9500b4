# imgsim: two commands on a fresh machine — `make demo` and `make test`.
# Each creates .venv/ with the pinned dependencies (requirements.lock) when it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist
WORK   ?= demo-run
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint format bench lock clean system-deps browser haproxy

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e '.[dev]'
	@touch $(STAMP)
	@echo "imgsim installed in $(VENV)/ (activate with: . $(VENV)/bin/activate)"

# Debian packages the targets below install when they are missing and we are root with apt-get.
CAN_APT = [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null
apt_install = (apt-get install -y -q $(1) >/dev/null 2>&1 || \
	(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(1) >/dev/null 2>&1))

# Fashion-MNIST from Debian when we can install it; otherwise imgsim downloads it itself.
system-deps:
	@if [ ! -d $(FMNIST) ] && $(CAN_APT); then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  $(call apt_install,dataset-fashion-mnist) || \
	  echo "could not install dataset-fashion-mnist; imgsim will download Fashion-MNIST instead"; \
	fi

# A real browser for the web-page test: Debian's chromium (tests skip with a reason if absent).
browser:
	@if ! command -v chromium >/dev/null && $(CAN_APT); then \
	  echo "installing Debian's chromium for the browser test"; \
	  $(call apt_install,chromium) || \
	  echo "could not install chromium; the browser test will be skipped"; \
	fi

# HAProxy: `imgsim serve` puts it in front of the replicas when installed (serve/ingress.py); the
# tests run `imgsim serve` through it (and skip that case with a reason if it cannot be installed).
haproxy:
	@if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ] && $(CAN_APT); then \
	  echo "installing Debian's haproxy for imgsim serve"; \
	  $(call apt_install,haproxy) || \
	  echo "could not install haproxy; imgsim serve will use Ray Serve's own HTTP proxy"; \
	fi

demo: install system-deps
	$(BIN)/imgsim demo --work $(WORK)

lint: install
	$(BIN)/ruff check imgsim pipelines serve tests bench
	$(BIN)/ruff format --check imgsim pipelines serve tests bench

format: install
	$(BIN)/ruff format imgsim pipelines serve tests bench
	$(BIN)/ruff check --fix imgsim pipelines serve tests bench

# The default run: everything but tests marked slow.
test: install browser haproxy lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install browser haproxy lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.embed
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.serve

# Re-pin: install from pyproject into a scratch venv (under build/) and freeze it.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q '.[dev]'
	(echo '# Pinned environment for `make install` (pip freeze of a working install; torch is the CPU build).'; \
	 echo '# Regenerate: make lock'; \
	 $(LOCK_VENV)/bin/pip freeze | grep -v -e '^imgsim' -e '^-e' | sed 's/+cpu$$//') > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
