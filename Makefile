# remus-kvm: Remus-style high availability for KVM/QEMU virtual machines.
#
#   make setup   install what a Debian 12 host needs (idempotent)
#   make demo    boot the test guest and show it serving, under protection
#   make test    setup, then every test with the race detector
#   make bench   benchmarks
#   make chaos   the fault-injection suite: CHAOS_N iterations (default 300),
#                CHAOS_SEED to replay, results in CHAOS_JSON
#   make fuzz    run each fuzz target for FUZZTIME
#   make install remusd and remusctl into PREFIX/bin (default /usr/local), the
#                systemd unit, the libvirt hook and an example configuration
#                (kept if one exists), all under DESTDIR

SHELL := /bin/bash
GO ?= go
FUZZTIME ?= 20s
CHAOS_N ?= 300
CHAOS_SEED ?= 0
CHAOS_JSON ?= chaos-results.json
APT_PACKAGES := qemu-system-x86 qemu-utils iproute2 kmod ca-certificates etcd-server libvirt-daemon-system libvirt-clients
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
KERNEL_CACHE := .cache/guest-kernel
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: setup demo test vet bench fuzz chaos install clean

setup:
	@command -v $(GO) >/dev/null || { echo "setup: Go 1.26 or newer is required (https://go.dev/dl)"; exit 1; }
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	$(SUDO) scripts/fetch-guest-kernel.sh $(KERNEL_CACHE)
	$(GO) mod download

demo: setup
	$(SUDO) $(GO) run ./cmd/remus-demo $(if $(REMUS_QEMU),--qemu '$(REMUS_QEMU)') $(if $(REMUS_ACCEL),--accel '$(REMUS_ACCEL)')

test: setup vet
	$(GO) test -race -timeout 45m ./...

vet:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@if $(GO) list -deps ./cmd/... | grep -qx testing; then echo "a command links package testing: production code imports a test harness (go list -deps ./cmd/...)"; exit 1; fi

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

chaos: setup
	$(GO) test -timeout 0 -run '^TestChaos$$' ./e2e -chaos.n $(CHAOS_N) -chaos.seed $(CHAOS_SEED) -chaos.json $(abspath $(CHAOS_JSON)) -v

fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

install:
	$(GO) build -o bin/ ./cmd/remusd ./cmd/remusctl
	install -D -m 0755 bin/remusd $(DESTDIR)$(PREFIX)/bin/remusd
	install -D -m 0755 bin/remusctl $(DESTDIR)$(PREFIX)/bin/remusctl
	install -d -m 0755 $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/libvirt/hooks/qemu.d
	sed 's|@BINDIR@|$(PREFIX)/bin|g' packaging/remusd.service > $(DESTDIR)/etc/systemd/system/remusd.service
	sed 's|@BINDIR@|$(PREFIX)/bin|g' packaging/libvirt-hook > $(DESTDIR)/etc/libvirt/hooks/qemu.d/remus
	chmod 0755 $(DESTDIR)/etc/libvirt/hooks/qemu.d/remus
	@if [ -e $(DESTDIR)/etc/remus/remusd.toml ]; then echo "kept $(DESTDIR)/etc/remus/remusd.toml"; \
	else install -D -m 0644 packaging/remusd.toml $(DESTDIR)/etc/remus/remusd.toml; fi
	@echo "next: edit /etc/remus/remusd.toml, make /etc/remus/key (the same on both hosts), then"
	@echo "      systemctl daemon-reload && systemctl enable --now remusd && systemctl reload libvirtd"

clean:
	rm -rf .cache bin
