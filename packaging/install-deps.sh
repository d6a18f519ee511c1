#!/usr/bin/env bash
# Installs every Debian package nodemanager needs to build, test and run.
# Idempotent: does nothing (not even `apt-get update`) when everything is present.
#
#   packaging/install-deps.sh            build + runtime + test packages
#   packaging/install-deps.sh --runtime  only what the installed daemon needs
set -euo pipefail

build_pkgs=(
  build-essential cmake ninja-build pkg-config git
  clang libclang-rt-14-dev clang-format clang-tidy
  libvirt-dev libsystemd-dev libboost-program-options-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libbenchmark-dev libsqlite3-dev nlohmann-json3-dev
  libnl-route-3-dev libnftables-dev libssl-dev libcurl4-openssl-dev file
)
runtime_pkgs=(
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  dbus dnsmasq-base iproute2 nftables libcurl4
)
# systemd: busctl for the D-Bus tests (the package only; it does not become PID 1).
test_pkgs=(
  libvirt-dbus busybox-static linux-image-cloud-amd64 cpio kmod python3 procps psmisc systemd
  iperf3 bash-completion groff-base man-db
)

pkgs=()
case "${1:-}" in
  --runtime) pkgs=("${runtime_pkgs[@]}") ;;
  "") pkgs=("${build_pkgs[@]}" "${runtime_pkgs[@]}" "${test_pkgs[@]}") ;;
  *) echo "usage: $0 [--runtime]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root to install them" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# No init system runs here: keep maintainer scripts from trying to start services.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
# --force-confold: libvirt-daemon-system must not stop on a prompt when qemu.conf was edited.
# Dpkg::Use-Pty=0: no '(Reading database ... 5%' progress flooding logs and CI output.
apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 \
  -o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef "${missing[@]}"
