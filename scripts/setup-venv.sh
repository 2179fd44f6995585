#!/usr/bin/env bash
# A Python virtual environment at DEST with exactly PINS, for tools labeld itself never needs (the model
# server of the remote tests, the int8 quantizer). Wheels are downloaded from PyPI once into
# ${XDG_CACHE_HOME:-~/.cache}/labeld/wheels and installed from there; a rerun with the same pins is a no-op.
# Needs Debian's python3-venv and python3-pip (scripts/setup-system.sh test or bench).
#
#   scripts/setup-venv.sh NAME DEST CHECK PIN...     (CHECK: a command run in DEST/bin once installed)
set -euo pipefail

NAME=$1 DEST=$2 CHECK=$3
shift 3
PINS=("$@")
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"
PYTHON="${PYTHON:-/usr/bin/python3}"
STAMP="$DEST/.labeld-complete"

if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
    exit 0
fi

mkdir -p "$CACHE"
echo "$NAME: installing ${PINS[*]} into $DEST (wheels cached in $CACHE)"
rm -rf "$DEST"
"$PYTHON" -m venv "$DEST"
# The first run fills the cache (pip download resolves the whole dependency set); later runs and
# other checkouts install from it without the network.
if ! "$DEST/bin/pip" install --quiet --no-index --find-links "$CACHE" "${PINS[@]}" 2> /dev/null; then
    "$DEST/bin/pip" download --quiet --only-binary=:all: --dest "$CACHE" "${PINS[@]}"
    "$DEST/bin/pip" install --quiet --no-index --find-links "$CACHE" "${PINS[@]}"
fi
(cd "$DEST/bin" && eval "$CHECK") > /dev/null
echo "${PINS[*]}" > "$STAMP"
