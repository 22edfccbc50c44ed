#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py: what it measures and compares) on one H100/H200, in under
# 10 minutes, everything printed. Run from anywhere: bench/gpu.sh [bench/gpu.py options].
#
# Installs nothing from the network. sdjax comes from this checkout (PYTHONPATH); Python
# packages the machine lacks (on this workplace's GPU image: diffusers and ml_collections)
# are installed from wheel files in $SDJAX_BENCH_WHEELS (default: .whl/ in the checkout)
# with --no-index, into a temporary folder. To make that folder (once, where pip reaches
# PyPI), then carry it with the checkout (the device tool's carry=[".whl"]):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.39.0 ml_collections==1.1.0
# The interpreter: $PYTHON, else .venv/bin/python when the checkout has one, else python3.
# Without a GPU, bench/gpu.py says so and runs its tiny CPU validation (--quick) instead.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=${SDJAX_BENCH_WHEELS:-.whl}
python=${PYTHON:-python3}
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
if compgen -G "$wheels/*.whl" > /dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Memory peaks per process need JAX to allocate on demand, not 75% of the card up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
fi
"$python" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
exec timeout --signal=INT 590 "$python" bench/gpu.py "$@"
