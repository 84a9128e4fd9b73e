#!/usr/bin/env bash
# Unpacks QEMU from bookworm-backports (10.0 at the time of writing) into $1,
# beside the system's QEMU 7.2, and writes $1/qemu-system-x86_64, a wrapper to
# point REMUS_QEMU at:
#
#   sudo scripts/fetch-qemu-backports.sh /opt/qemu-10.0
#   REMUS_QEMU=/opt/qemu-10.0/qemu-system-x86_64 go test ./...
#
# Nothing is installed: the packages are fetched with `apt-get download` and
# unpacked with `dpkg-deb -x`, so the installed qemu-system-x86 is untouched.
# If apt knows no bookworm-backports, this adds
# /etc/apt/sources.list.d/bookworm-backports.sources and runs apt-get update
# (backports have priority 100, so no installed package changes because of
# it). Idempotent: when $1 already holds the backports version, only the
# wrapper is rewritten.
#
# Unpacked: qemu-system-x86, qemu-system-common, qemu-system-data at the
# backports version, plus the firmware packages seabios (qemu-system-x86 10.0
# needs seabios >> 1.16.3-1~, bookworm has 1.16.2) and ipxe-qemu, each from
# backports where backports has it. Bookworm's shared libraries satisfy the
# 10.0 binary and its modules (checked with ldd below), so no library is
# unpacked and the wrapper sets no LD_LIBRARY_PATH.
#
# The binary has its data and module directories compiled in as absolute
# paths (/usr/share/qemu, /usr/share/seabios, /usr/lib/ipxe/qemu,
# /usr/lib/x86_64-linux-gnu/qemu), i.e. 7.2's files. The wrapper puts the
# unpacked ones first with -L (searched before the compiled-in firmware path)
# and QEMU_MODULE_DIR, and execs QEMU so that it keeps the wrapper's pid.
set -euo pipefail
dest=${1:?usage: fetch-qemu-backports.sh DEST}
case $dest in /*) ;; *) dest=$PWD/$dest ;; esac

# bpo_version PKG prints the version of PKG in bookworm-backports, if any.
bpo_version() {
	apt-cache madison "$1" | awk -F'|' '$3 ~ /bookworm-backports/ && !n++ { gsub(/ /, "", $2); print $2 }'
}

if [ -z "$(bpo_version qemu-system-x86)" ]; then
	if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		cat >/etc/apt/sources.list.d/bookworm-backports.sources <<-'EOF'
			Types: deb
			URIs: http://deb.debian.org/debian
			Suites: bookworm-backports
			Components: main
			Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
		EOF
	fi
	apt-get update -q
fi
ver=$(bpo_version qemu-system-x86)
if [ -z "$ver" ]; then
	echo "fetch-qemu-backports: bookworm-backports has no qemu-system-x86" >&2
	exit 1
fi

mkdir -p "$dest"
if [ "$(cat "$dest/.qemu-version" 2>/dev/null)" = "$ver" ] && [ -x "$dest/usr/bin/qemu-system-x86_64" ]; then
	echo "QEMU $ver already in $dest"
else
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	specs=(qemu-system-x86="$ver" qemu-system-common="$ver" qemu-system-data="$ver")
	for p in seabios ipxe-qemu; do
		v=$(bpo_version "$p")
		specs+=("$p${v:+=$v}")
	done
	# apt-get download writes into the working directory, as user _apt when
	# it can (otherwise it warns and downloads as root).
	chmod 755 "$tmp"
	mkdir "$tmp/debs"
	chown _apt "$tmp/debs" 2>/dev/null || true
	(cd "$tmp/debs" && apt-get download -q "${specs[@]}")
	for deb in "$tmp"/debs/*.deb; do
		dpkg-deb -x "$deb" "$tmp/root"
	done
	missing=$(for f in "$tmp"/root/usr/bin/qemu-system-x86_64 "$tmp"/root/usr/lib/x86_64-linux-gnu/qemu/*.so; do
		ldd "$f" | sed -n "/not found/s|^|${f#"$tmp"/root}: |p"
	done)
	if [ -n "$missing" ]; then
		echo "fetch-qemu-backports: shared libraries missing or too old:" >&2
		echo "$missing" >&2
		exit 1
	fi
	rm -rf "${dest:?}/usr" "${dest:?}/etc"
	cp -a "$tmp/root/." "$dest/"
	echo "$ver" >"$dest/.qemu-version"
	echo "QEMU $ver unpacked into $dest"
fi

cat >"$dest/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# QEMU from bookworm-backports, unpacked by scripts/fetch-qemu-backports.sh.
d=$(dirname "$(readlink -f "$0")")
QEMU_MODULE_DIR=$d/usr/lib/x86_64-linux-gnu/qemu
export QEMU_MODULE_DIR
exec "$d/usr/bin/qemu-system-x86_64" \
	-L "$d/usr/share/qemu" -L "$d/usr/share/seabios" -L "$d/usr/lib/ipxe/qemu" "$@"
EOF
chmod 755 "$dest/qemu-system-x86_64"
"$dest/qemu-system-x86_64" -version | head -n 1
