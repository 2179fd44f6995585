#!/usr/bin/env bash
# Installs MLServer 1.7.1 (Seldon's Open Inference Protocol server) with onnxruntime into a virtual
# environment at .deps/mlserver, for the remote-inference tests (tests/remote.rs) and benches/remote.py.
# labeld itself never needs it. Wheels are downloaded from PyPI once into
# ${XDG_CACHE_HOME:-~/.cache}/labeld/wheels and installed from there; reruns are no-ops.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.deps/mlserver"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"
# Debian's python3 (python3-venv, python3-pip: scripts/setup-system.sh test).
PYTHON="${PYTHON:-/usr/bin/python3}"
PINS=("mlserver==1.7.1" "onnxruntime==1.32.0" "numpy<2.3")
STAMP="$DEST/.labeld-complete"

if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
    exit 0
fi

mkdir -p "$CACHE"
echo "setup-mlserver: installing ${PINS[*]} into $DEST (wheels cached in $CACHE)"
rm -rf "$DEST"
"$PYTHON" -m venv "$DEST"
# The first run fills the cache (pip download resolves the whole dependency set); later runs and
# other checkouts install from it without the network.
if ! "$DEST/bin/pip" install --quiet --no-index --find-links "$CACHE" "${PINS[@]}" 2> /dev/null; then
    "$DEST/bin/pip" download --quiet --only-binary=:all: --dest "$CACHE" "${PINS[@]}"
    "$DEST/bin/pip" install --quiet --no-index --find-links "$CACHE" "${PINS[@]}"
fi
"$DEST/bin/mlserver" --help > /dev/null
echo "${PINS[*]}" > "$STAMP"
