#!/usr/bin/env bash
# One-command test run: scripts/setup.sh with the test extras, then the whole suite (arguments go to pytest).
#
# The parity tests need the golden fixtures of the official implementation: $MLX_SA3_SHARED/reference, by default
# ../shared/reference beside this checkout. Without them those tests fail with a message saying where they looked.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev --no-demo
shared=${MLX_SA3_SHARED:-$(cd .. && pwd)/shared}
[ -d "$shared/reference" ] || echo "warning: no golden fixtures at $shared/reference (set MLX_SA3_SHARED); the parity tests will fail" >&2
exec "${VENV:-.venv}/bin/python" -m pytest -q tests "$@"
