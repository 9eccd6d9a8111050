# The two commands of the README: `make run` (the embedded demo) and
# `make test` (the whole suite).  Both create .venv and install what they need,
# so they work on a fresh Debian machine with Python 3.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Debian packages the tests drive (real sshd, curl, nc, ip netns; node runs the PAC file,
# headless chromium browses through it; etcd and etcdctl are the gateways' shared store).
DEBS   := openssh-server openssh-client curl netcat-openbsd socat iproute2 nodejs chromium etcd-server etcd-client

.PHONY: run test lint bench system-deps clean

$(STAMP): setup.py
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || $(MAKE) --no-print-directory _apt PKGS=python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# Installs the Debian packages the system tests need, when missing and root.
# As non-root, missing packages only mean those tests are skipped (they say why).
system-deps:
	@missing=""; \
	for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory _apt PKGS="$$missing"; \
	  else echo "not root: not installing$$missing (system tests will be skipped)"; fi; \
	fi

_apt:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PKGS) >/dev/null

run: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= gateway --demo

test: $(STAMP) system-deps
	$(BIN)/trial --temp-directory=/tmp/_trial_gateway_$$$$ tests

# The gate: lint, formatting and types (mypy's settings are in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench twisted
	$(BIN)/ruff format --check gateway tests bench twisted
	$(BIN)/mypy gateway

# The benchmarks' origin (bench/origin.py): nginx serving static files.
BENCH_DEBS := nginx-light

bench: $(STAMP) system-deps
	@$(MAKE) --no-print-directory system-deps DEBS="$(BENCH_DEBS)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
