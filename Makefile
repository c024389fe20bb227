# criv — see README.md. Targets are idempotent; `make test` is what CI runs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := python3-venv python3-dev gcc libc6-dev pkg-config iproute2 iptables \
	crun containernetworking-plugins busybox-static \
	docker-registry apache2-utils skopeo containerd runc openssh-server \
	qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev cpio lz4 erofs-utils \
	linux-source-6.1 linux-headers-amd64 debootstrap flex bison bc libelf-dev libssl-dev xz-utils binutils make \
	genisoimage syslinux syslinux-common mtools dosfstools fdisk dropbear-bin \
	ovmf systemd-boot-efi
CRI_PROTO := proto/runtime/v1/api.proto
AGENT_PROTO := proto/agent/v1/agent.proto

.PHONY: install apt venv run test lint proto cni-config services guest-image bench clean \
	install-service

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

run: install services guest-image
	$(VENV)/bin/criv serve

# criv as a service: systemd units (+ tmpfiles/sysusers) installed, enabled and started;
# without systemd, `criv serve --daemon`. CRIV_CONFIG=FILE for a config other than
# /etc/criv/config.yaml. See docs/install.md.
install-service: install guest-image
	$(PY) -m criv.unitfiles install $(if $(CRIV_CONFIG),--config $(CRIV_CONFIG))

test: install lint
	$(PY) -m pytest tests -v -rs

lint:
	$(VENV)/bin/ruff check criv guest-agent tests bench
	$(VENV)/bin/ruff format --check criv guest-agent tests bench
	$(VENV)/bin/mypy criv guest-agent/criv_agent

proto:
	$(PY) tools/genproto.py

bench: install services
	$(PY) bench/pull.py
	$(PY) bench/lifecycle.py
	$(PY) bench/stream.py
	$(PY) bench/vsock.py
	$(PY) bench/podstart.py
	$(PY) bench/sharefs.py

clean:
	rm -rf $(VENV)

# Services the tests and `criv serve` use for VM pods; no systemd needed.
# The criv-qemu user, / rshared, /dev/kvm root:kvm 0660, qemu.conf as criv needs it (QEMU
# unprivileged in a mount namespace of its own; see docs/vm.md), virtlogd + libvirtd up.
services: venv
	$(PY) -m criv.hypervisor.hostsetup

# Build (or find in the cache) the guest kernel + initramfs; see docs/guest-image.md.
guest-image: install
	$(VENV)/bin/criv image build
