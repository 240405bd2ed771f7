#!/usr/bin/env bash
# The whole test suite on a fresh machine with Python >= 3.10 and a Rust toolchain:
# creates .venv (once), builds Ember's wheel, installs it with its test extra,
# then runs the Rust tests, the Python tests and the benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${EMBER_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
# The venv's tools (torchrun, deepspeed, ninja for DeepSpeed's CPU ops) come first on PATH.
export PATH="$VENV/bin:$PATH"
"$PY" -m pip install -q --upgrade pip "maturin>=1.5,<2"

# Test what ships: build the wheel and install it (not an editable install), so a
# file missing from the wheel fails here.
rm -rf dist
"$VENV/bin/maturin" build --release --out dist
WHEEL=$(ls dist/*.whl)
"$PY" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install -q "$WHEEL[test]"

# The installed wheel, seen from outside the source tree.
(cd / && "$PY" -c "import ember, ember._native, ember.data; print('ember', ember.__version__, 'from', ember.__file__)")
(cd / && "$VENV/bin/ember" --help > /dev/null)

cargo test --locked -p ember-data -p ember-tok

"$PY" -m pytest "$@"
EMBER_BENCH_SMALL=1 "$PY" -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider
