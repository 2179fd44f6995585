#!/usr/bin/env bash
# What scripts/quantize.py needs: onnxruntime (its quantization tools), onnx and Pillow, in a virtual
# environment at .deps/quantize. labeld itself never needs it (scripts/setup-venv.sh: cached wheels, a
# no-op once done).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/scripts/setup-venv.sh" setup-quantize "$ROOT/.deps/quantize" "./python -c 'import onnxruntime.quantization, onnx, PIL'" \
    "onnxruntime==1.32.0" "onnx==1.19.1" "pillow==11.3.0" "numpy<2.3" "sympy==1.14.0"
