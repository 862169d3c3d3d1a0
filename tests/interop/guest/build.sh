#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Builds the interop test guest: an initramfs for Debian's 6.1 kernel with
# static busybox, the virtio modules the disk needs, and every guest program
# in this folder (each NAME.c becomes /guest/bin/NAME, built with gcc -static).
# Its /init is generic: it runs the program named by "vmig.test=NAME" on the
# kernel command line with the comma-separated "vmig.args=A,B,C" as argv,
# prints "VMIG-GUEST: RESULT ok" or "VMIG-GUEST: RESULT fail exit=N" on the
# serial console, and powers off. So one initramfs serves every test.
#
# Usage: build.sh OUT_DIR
# The result goes to OUT_DIR/guest-HASH/ (initramfs.cpio.gz, the kernel path
# in "kernel", and the programs themselves, which are static x86-64 and so
# also run on the host). HASH covers every input, so a repeated call costs
# only the hashing; concurrent callers are serialised by a lock. The last line
# on stdout is the absolute path of that folder.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The guest kernel is the packaged Debian one (not the host's running kernel):
# the newest /boot/vmlinuz-6.1.0-*-amd64 and its matching module tree.
kernel=$(ls /boot/vmlinuz-6.1.0-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$kernel" ]; then
	echo "build.sh: no /boot/vmlinuz-6.1.0-*-amd64 (install linux-image-amd64)" >&2
	exit 1
fi
kver=${kernel#/boot/vmlinuz-}
moddir=/lib/modules/$kver/kernel/drivers
# Load order matters: each module's dependencies come before it.
mods=(virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev
	virtio/virtio_pci_legacy_dev virtio/virtio_pci block/virtio_blk)
busybox=$(command -v busybox || true)
# ldd fails on a static binary; busybox from the plain package is dynamic.
if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
	echo "build.sh: need a static busybox (install busybox-static)" >&2
	exit 1
fi
for m in "${mods[@]}"; do
	if [ ! -f "$moddir/$m.ko" ]; then
		echo "build.sh: missing module $moddir/$m.ko" >&2
		exit 1
	fi
done
progs=("$here"/*.c)

hash=$( {
	sha256sum "$0" "${progs[@]}" "$busybox" "$kernel"
	for m in "${mods[@]}"; do sha256sum "$moddir/$m.ko"; done
	gcc --version | head -n 1
} | sha256sum | cut -c1-16)
dest=$out/guest-$hash

exec 9>"$out/.lock"
flock -w 300 9
if [ -f "$dest/initramfs.cpio.gz" ]; then
	echo "$dest"
	exit 0
fi

stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"/{bin,dev,proc,sys,mods,guest/bin,tmp}
cp "$busybox" "$root/bin/busybox"
for m in "${mods[@]}"; do cp "$moddir/$m.ko" "$root/mods/"; done
for c in "${progs[@]}"; do
	name=$(basename "$c" .c)
	gcc -static -O2 -D_GNU_SOURCE -Wall -Wextra -Werror -Wshadow \
		-Wstrict-prototypes -Wmissing-prototypes -o "$root/guest/bin/$name" "$c"
done

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# Generic test guest init: run vmig.test=NAME with vmig.args=A,B,C.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
	insmod /mods/$m.ko || echo "VMIG-GUEST: insmod $m failed"
done
test_name=
test_args=
for w in $(cat /proc/cmdline); do
	case "$w" in
	vmig.test=*) test_name=${w#vmig.test=} ;;
	vmig.args=*) test_args=${w#vmig.args=} ;;
	esac
done
# The disk shows up asynchronously after virtio_blk probes it.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "VMIG-GUEST: BOOTED test=$test_name"
if [ -z "$test_name" ] || [ ! -x "/guest/bin/$test_name" ]; then
	echo "VMIG-GUEST: RESULT fail no-such-test name=$test_name"
else
	set -- $(echo "$test_args" | tr ',' ' ')
	"/guest/bin/$test_name" "$@"
	rc=$?
	if [ $rc -eq 0 ]; then
		echo "VMIG-GUEST: RESULT ok"
	else
		echo "VMIG-GUEST: RESULT fail exit=$rc"
	fi
fi
sync
poweroff -f
EOF
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$stage/initramfs.cpio.gz"
mkdir -p "$stage/out"
mv "$stage/initramfs.cpio.gz" "$stage/out/"
cp "$root"/guest/bin/* "$stage/out/"
echo "$kernel" >"$stage/out/kernel"
mv "$stage/out" "$dest"
echo "$dest"
