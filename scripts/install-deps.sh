#!/usr/bin/env bash
# Installs the Debian 12 packages vmig needs to build, test and benchmark,
# but only those that are missing, so repeated runs cost a dpkg query.
set -euo pipefail

pkgs=(
  build-essential meson ninja-build pkg-config clang libclang-rt-14-dev
  liburing-dev libzstd-dev zlib1g-dev libxxhash-dev libjansson-dev libcmocka-dev
  libgnutls28-dev openssl
  python3 iproute2 cpio gzip procps psmisc
  strace # test_security.py slows the daemon's start down to catch ordering races
  qemu-system-x86 qemu-utils busybox-static linux-image-amd64
  chromium # test_timeline.py renders the timeline SVG headless
  # test_libvirt.py: libvirtd and virsh. libvirt-daemon-system, not only
  # libvirt-daemon: libvirtd 9.0 will not start without the libvirt-qemu
  # user that it creates, even when qemu.conf says user = "root".
  libvirt-daemon-system libvirt-clients
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]} (run as root, or install them)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
