#!/usr/bin/env bash
# Builds the tiny nodemanager test guest from Debian packages (linux-image-cloud-amd64,
# busybox-static) into a cache outside the repository:
#
#   tests/guest/build-guest.sh [CACHE_DIR]
#
# Outputs, in CACHE_DIR/<kernel version>/ (CACHE_DIR defaults to
# ${XDG_CACHE_HOME:-/var/cache}/nodemanager-test-guest):
#   vmlinuz     the cloud kernel (direct kernel boot; virtio drivers are modules)
#   initrd.img  gzip'd cpio (newc): busybox + applet links, the modules of modules.txt, ./init
#   disk.raw    64 MiB raw disk whose first sector starts with "NMDISK"
#   guest.env   shell assignments GUEST_DIR, GUEST_KERNEL, GUEST_INITRD, GUEST_DISK and their
#               *_SHA256, for `. guest.env`
# and prints the three paths with their SHA-256 on stdout ("<kind> <path> <sha256>").
#
# Idempotent: when the outputs exist and the inputs (kernel, modules, busybox, this script,
# init, modules.txt) are unchanged, nothing is rebuilt. Outputs are published by rename, so a
# concurrent or interrupted build never leaves a half-written guest behind.
# NM_GUEST_KERNEL_VERSION selects the kernel (default: the newest /boot/vmlinuz-*-cloud-amd64).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
base="${1:-${XDG_CACHE_HOME:-/var/cache}/nodemanager-test-guest}"
disk_mib=64

die() { echo "build-guest: $*" >&2; exit 1; }

kver="${NM_GUEST_KERNEL_VERSION:-}"
if [ -z "$kver" ]; then
  kernel="$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' | sort -V | tail -n 1)"
  [ -n "$kernel" ] || die "no /boot/vmlinuz-*-cloud-amd64; install linux-image-cloud-amd64"
  kver="${kernel#/boot/vmlinuz-}"
fi
kernel="/boot/vmlinuz-$kver"
moddir="/lib/modules/$kver/kernel"
[ -r "$kernel" ] || die "'$kernel' is not readable"
[ -d "$moddir" ] || die "'$moddir' missing"
busybox="$(command -v busybox || true)"
[ -n "$busybox" ] || die "busybox not found; install busybox-static"
if ldd "$busybox" >/dev/null 2>&1; then
  die "'$busybox' is dynamically linked; install busybox-static"
fi
for tool in cpio gzip sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found"
done

mapfile -t modules < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/modules.txt" | grep -v '^$')
modfiles=()
for m in "${modules[@]}"; do
  f="$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) -print -quit)"
  [ -n "$f" ] || die "module '$m' not found under '$moddir'"
  modfiles+=("$f")
done

out="$base/$kver"
inputs="$(
  {
    sha256sum "$kernel" "$busybox" "${modfiles[@]}" "$here/init" "$here/modules.txt" \
      "${BASH_SOURCE[0]}" | awk '{print $1}'
    echo "disk_mib=$disk_mib"
  } | sha256sum | awk '{print $1}'
)"

if [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$inputs" ] &&
  [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/disk.raw" ] &&
  [ -f "$out/guest.env" ]; then
  echo "build-guest: up to date in '$out'" >&2
else
  echo "build-guest: building into '$out' (kernel $kver)" >&2
  mkdir -p "$base"
  work="$(mktemp -d "$base/.build-$kver.XXXXXX")"
  chmod 0755 "$work"
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  : >"$root/lib/modules/order"
  for i in "${!modules[@]}"; do
    f="${modfiles[$i]}"
    dst="$root/lib/modules/${modules[$i]}.ko"
    case "$f" in
      *.ko.xz) xz -dc "$f" >"$dst" ;;
      *.ko.zst) zstd -qdc "$f" >"$dst" ;;
      *) cp "$f" "$dst" ;;
    esac
    echo "${modules[$i]}" >>"$root/lib/modules/order"
  done
  install -m 0755 "$here/init" "$root/init"
  # Same inputs, same bytes: fixed mtimes, sorted names, no gzip timestamp.
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) | gzip -9n >"$work/initrd.img"
  cp "$kernel" "$work/vmlinuz"
  truncate -s "${disk_mib}M" "$work/disk.raw"
  printf 'NMDISK nodemanager test disk\n' | dd of="$work/disk.raw" conv=notrunc status=none
  rm -rf "$root"

  k_sha="$(sha256sum "$work/vmlinuz" | awk '{print $1}')"
  i_sha="$(sha256sum "$work/initrd.img" | awk '{print $1}')"
  d_sha="$(sha256sum "$work/disk.raw" | awk '{print $1}')"
  cat >"$work/guest.env" <<ENV
GUEST_DIR='$out'
GUEST_KERNEL_VERSION='$kver'
GUEST_KERNEL='$out/vmlinuz'
GUEST_KERNEL_SHA256='$k_sha'
GUEST_INITRD='$out/initrd.img'
GUEST_INITRD_SHA256='$i_sha'
GUEST_DISK='$out/disk.raw'
GUEST_DISK_SHA256='$d_sha'
ENV
  echo "$inputs" >"$work/inputs.sha256"
  # Publish: swap the whole directory in by rename.
  if [ -d "$out" ]; then
    old="$(mktemp -d "$base/.old-$kver.XXXXXX")"
    mv "$out" "$old/" && mv "$work" "$out" && rm -rf "$old"
  else
    mv "$work" "$out"
  fi
  trap - EXIT
fi

# shellcheck source=/dev/null
. "$out/guest.env"
echo "kernel $GUEST_KERNEL $GUEST_KERNEL_SHA256"
echo "initrd $GUEST_INITRD $GUEST_INITRD_SHA256"
echo "disk $GUEST_DISK $GUEST_DISK_SHA256"
