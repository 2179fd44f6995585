#!/usr/bin/env bash
# Debian packages, by what you are about to do (installs only what is missing; a no-op once done):
#   scripts/setup-system.sh run     build labeld (pkg-config, libturbojpeg0-dev) and export the model
#                                   (python3-torch, python3-torchvision): all `make run` needs
#   scripts/setup-system.sh deb     + patchelf, to point the packaged binary at its private libtorch
#   scripts/setup-system.sh bench   + time, for the peak memory `make bench` reports; python3-venv and
#                                   python3-pip for the int8 copies (scripts/setup-quantize.sh)
#   scripts/setup-system.sh image   + what `make image` and `make image-test` drive: the .deb (patchelf;
#                                   binutils strips it), a Debian root file system from the archive
#                                   (mmdebstrap), the image committed from it (buildah), read back and
#                                   unpacked (skopeo, umoci), run in its own network namespace (iproute2
#                                   brings up its loopback)
#   scripts/setup-system.sh test    + what only the tests drive: the status page in Chromium, the systemd
#                                   unit and its syscall filter (systemd-analyze, strace), MQTT against
#                                   a real broker (mosquitto, mosquitto-clients; openssl makes its TLS
#                                   certificates), the man pages (groff-base), the .deb (patchelf) and
#                                   its logrotate entry (logrotate --debug parses it), and a virtual
#                                   environment for the model server of the remote tests (python3-venv,
#                                   python3-pip: scripts/setup-mlserver.sh)
#   scripts/setup-system.sh --list ROLE   print the role's packages, install nothing
set -euo pipefail

LIST=false
if [[ ${1:-} == --list ]]; then LIST=true; shift; fi
ROLE=${1:-run}
RUN=(pkg-config libturbojpeg0-dev python3-torch python3-torchvision)
case $ROLE in
    run) PACKAGES=("${RUN[@]}") ;;
    deb) PACKAGES=("${RUN[@]}" patchelf) ;;
    bench) PACKAGES=("${RUN[@]}" time python3-venv python3-pip) ;;
    image) PACKAGES=("${RUN[@]}" patchelf binutils mmdebstrap buildah skopeo umoci iproute2) ;;
    test) PACKAGES=("${RUN[@]}" patchelf chromium strace systemd mosquitto mosquitto-clients openssl groff-base logrotate python3-venv python3-pip) ;;
    *) echo "setup-system: unknown role '$ROLE' (run, deb, bench, image or test)" >&2; exit 2 ;;
esac
if $LIST; then printf '%s\n' "${PACKAGES[@]}"; exit 0; fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
echo "setup-system ($ROLE): installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
