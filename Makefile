# criv — see README.md. Targets are idempotent; `make test` is what CI runs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := python3-venv python3-dev gcc libc6-dev pkg-config iproute2 iptables \
	crun containernetworking-plugins busybox-static \
	docker-registry apache2-utils skopeo containerd runc \
	qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev cpio lz4
CRI_PROTO := proto/runtime/v1/api.proto
AGENT_PROTO := proto/agent/v1/agent.proto

.PHONY: install apt venv run test lint unit-test integration-test vm-test proto proto-check \
	cni-config services bench clean

install: apt venv cni-config

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml guest-agent/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e './guest-agent' -e '.[dev]'
	touch $@

cni-config:
	@mkdir -p /etc/cni/net.d
	@test -e /etc/cni/net.d/10-criv.conflist || install -m 0644 etc/cni/10-criv.conflist /etc/cni/net.d/

run: install
	$(VENV)/bin/criv serve

test: install lint
	$(PY) -m pytest tests -v -rs

lint:
	$(VENV)/bin/ruff check criv guest-agent tests bench
	$(VENV)/bin/ruff format --check criv guest-agent tests bench
	$(VENV)/bin/mypy criv guest-agent/criv_agent

proto:
	$(PY) tools/genproto.py

bench: install
	$(PY) bench/pull.py

clean:
	rm -rf $(VENV)

# Services the tests and `criv serve` use for VM pods; no systemd needed.
services:
	@pgrep -x virtlogd >/dev/null || virtlogd -d
	@pgrep -x libvirtd >/dev/null || libvirtd -d
