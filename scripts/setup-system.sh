#!/usr/bin/env bash
# Debian packages labeld needs to build (libturbojpeg, pkg-config), to export the model
# (python3-torch, python3-torchvision), to measure peak memory in `make bench` (time), to check the
# systemd unit (systemd-analyze) and the syscalls its filter allows (strace), to build the .deb
# (patchelf), to test the status page (chromium) and MQTT publishing against a real broker the tests start
# on their own port (mosquitto, mosquitto-clients; openssl makes their TLS certificates).
# Installs only what is missing; a no-op once done.
set -euo pipefail

PACKAGES=(pkg-config libturbojpeg0-dev python3-torch python3-torchvision time strace
          systemd patchelf chromium mosquitto mosquitto-clients openssl)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
echo "setup-system: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
