#!/usr/bin/env bash
# What scripts/quantize.py needs: onnxruntime (its quantization tools), onnx and Pillow, in a virtual
# environment at .deps/quantize. labeld itself never needs it. Wheels are downloaded from PyPI once into
# ${XDG_CACHE_HOME:-~/.cache}/labeld/wheels and installed from there; reruns are no-ops.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.deps/quantize"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/labeld/wheels"
# Debian's python3 with python3-venv and python3-pip (scripts/setup-system.sh bench).
PYTHON="${PYTHON:-/usr/bin/python3}"
PINS=("onnxruntime==1.32.0" "onnx==1.19.1" "pillow==11.3.0" "numpy<2.3" "sympy==1.14.0")
STAMP="$DEST/.labeld-complete"

if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "${PINS[*]}" ]]; then
    exit 0
fi

mkdir -p "$CACHE"
echo "setup-quantize: installing ${PINS[*]} into $DEST (wheels cached in $CACHE)"
rm -rf "$DEST"
"$PYTHON" -m venv "$DEST"
if ! "$DEST/bin/pip" install --quiet --no-index --find-links "$CACHE" "${PINS[@]}" 2> /dev/null; then
    "$DEST/bin/pip" download --quiet --only-binary=:all: --dest "$CACHE" "${PINS[@]}"
    "$DEST/bin/pip" install --quiet --no-index --find-links "$CACHE" "${PINS[@]}"
fi
"$DEST/bin/python" -c 'import onnxruntime.quantization, onnx, PIL'
echo "${PINS[*]}" > "$STAMP"
