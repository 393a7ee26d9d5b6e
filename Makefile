# espgate: `make run` and `make test` set everything up first (idempotent).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.espgate-installed

APT_PACKAGES := build-essential python3-dev python3-venv pkg-config \
	libipsec-mb-dev libssl-dev \
	strongswan-charon strongswan-swanctl strongswan-pki \
	libcharon-extra-plugins libcharon-extauth-plugins \
	libstrongswan-standard-plugins libstrongswan-extra-plugins \
	iperf3 iproute2 iputils-ping tcpdump procps util-linux \
	qemu-system-x86 busybox-static \
	freeradius freeradius-utils dnsmasq-base nftables conntrack

SOURCES := pyproject.toml setup.py $(wildcard fastpath/*.pyx fastpath/*.pxd fastpath/*.h \
	bench/*.pyx bench/*.pxd)

.PHONY: setup apt venv run test lint clean

setup: apt $(STAMP)

# Install only what is missing; a temporary policy-rc.d keeps package scripts
# from starting host-wide services (strongSwan, FreeRADIUS).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        --no-install-recommends $$missing; rc=$$?; \
	    rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q "cython>=3.0" "numpy>=1.26"
	$(VPY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/espgate demo --json results/run.json

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy control fastpath bench

clean:
	rm -rf build *.egg-info fastpath/*.so fastpath/_*.c
