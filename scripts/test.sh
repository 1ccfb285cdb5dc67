#!/usr/bin/env bash
# One-command test run: scripts/setup.sh with the test extras, then the whole suite (arguments go to pytest).
#
# The parity tests need the golden fixtures of the official implementation: $MLX_SA3_SHARED/reference, by default
# ../shared/reference beside this checkout. Without them those tests are skipped with one reason (with
# MLX_SA3_REQUIRE_FIXTURES=1, as in CI, the run fails instead).
#
# With CI=true the python that .ci/run installed everything into (PYTHON, default python3) runs the suite and no
# .venv is built: CI machines are fresh, and that install is already the one under test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" = true ]; then
    python=${PYTHON:-python3}
else
    scripts/setup.sh --dev --no-demo
    python=${VENV:-.venv}/bin/python
fi
shared=${MLX_SA3_SHARED:-$(cd .. && pwd)/shared}
if [ ! -d "$shared/reference" ]; then
    echo "warning: no golden fixtures at $shared/reference (set MLX_SA3_SHARED); the parity tests are skipped" >&2
fi
exec "$python" -m pytest -q tests "$@"
