#!/usr/bin/env bash
# Unpacks the kernel of Debian's linux-image-amd64 package (the test guest's
# kernel: vmlinuz and its modules) into $1/<version> and points $1/current at
# it. Idempotent: does nothing when that version is already there.
set -euo pipefail
dest=${1:?usage: fetch-guest-kernel.sh DEST}
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
	echo "fetch-guest-kernel: apt-cache knows no linux-image-amd64 (run apt-get update)" >&2
	exit 1
fi
ver=${pkg#linux-image-}
mkdir -p "$dest"
if [ -f "$dest/$ver/boot/vmlinuz-$ver" ]; then
	ln -sfn "$ver" "$dest/current"
	echo "guest kernel $ver already in $dest"
	exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt-get download writes into the working directory; as root it warns that
# the _apt user cannot write there, which is harmless.
(cd "$tmp" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' || true)
deb=$(ls "$tmp"/*.deb)
dpkg-deb -x "$deb" "$tmp/unpacked"
rm -rf "${dest:?}/$ver"
mv "$tmp/unpacked" "$dest/$ver"
ln -sfn "$ver" "$dest/current"
echo "guest kernel $ver unpacked into $dest/$ver"
