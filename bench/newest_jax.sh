#!/usr/bin/env bash
# sdjax under the newest JAX on Python 3.12, the stack of the GPU machines' image (jax
# 0.11.2): run it here, on CPU, before any GPU session (the GPU benchmark, bench/gpu.sh,
# runs under that JAX). It makes a venv (default /tmp/sdjax-newest-jax; reused when
# there) with jax/jaxlib $JAX_VERSION and sdjax's other pins, installs this checkout with
# --no-deps, then runs, printing each result:
#   1. the embedded model's demo (2 scenes, 2 steps): the sampler, its CPU compile options;
#   2. 3 toy training steps (configs/toy.py at test size): the train step, checkpoints;
#   3. `sdjax plan` of the toy train step for 2 CPU devices: the planner.
# Usage: bench/newest_jax.sh [VENV]   (needs PyPI, and Python 3.12 as $PYTHON312 or pyenv's)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/sdjax-newest-jax}
jax_version=${JAX_VERSION:-0.11.2}
python312=${PYTHON312:-}
if [[ -z $python312 ]]; then
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
        python312=$candidate
    done
fi
[[ -x ${python312:-} ]] || { echo "no Python 3.12: set PYTHON312" >&2; exit 2; }
if [[ ! -x $venv/bin/python ]]; then
    "$python312" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # sdjax's pins (pyproject.toml) but for jax/jaxlib.
    "$venv/bin/pip" install -q "jax==$jax_version" "jaxlib==$jax_version" flax==0.12.8 \
        optax==0.2.8 orbax-checkpoint==0.12.8 grain==0.2.18 array-record==0.8.6 numpy \
        ml-dtypes msgpack tokenizers==0.22.2 safetensors==0.8.0 pillow ml-collections tqdm \
        tensorboardX==2.6.5 scipy
fi
"$venv/bin/pip" install -q --no-deps -e . > /dev/null
"$venv/bin/python" -c 'import sys, jax, flax; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__)'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export JAX_COMPILATION_CACHE_DIR="$work/jax-cache"
echo "1. demo"
"$venv/bin/sdjax" demo --out "$work/demo" --cases 2 --steps 2
echo "2. toy training"
"$venv/bin/sdjax" train --config tests/train_config.py --workdir "$work/train" \
    --set train.num_steps=3 --set train.checkpoint_every=3
echo "3. plan"
"$venv/bin/sdjax" plan --config tests/train_config.py --cpu-devices 2 --set mesh.data=2
echo "newest JAX: all three ran"
