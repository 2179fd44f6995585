#!/usr/bin/env bash
# Installs MLServer 1.7.1 (Seldon's Open Inference Protocol server) with onnxruntime into a virtual
# environment at .deps/mlserver, for the remote-inference tests (tests/remote.rs) and benches/remote.py.
# labeld itself never needs it (scripts/setup-venv.sh: cached wheels, a no-op once done).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
exec "$ROOT/scripts/setup-venv.sh" setup-mlserver "$ROOT/.deps/mlserver" "./mlserver --help" \
    "mlserver==1.7.1" "onnxruntime==1.32.0" "numpy<2.3"
