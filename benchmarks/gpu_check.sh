#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with one NVIDIA GPU and JAX, Flax,
# Equinox and jaxtyping installed (beartype as a wheel in .whl/ if missing):
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Writes to OUT_DIR: gpu.txt (the card and versions), bench.md and bench.json (the
# benchmark report), passes.txt and hlo.txt (benchmarks/passes.py), tests.log (the test
# suite's single-device part on the GPU), deep.md and deep.json (benchmarks/deep.py, one
# compile round; each section is written as soon as it is done, so a run cut short by the
# timeout keeps what it measured; its ResNet section needs the `demo` extra's packages),
# scan.md and scan.json (its scan-over-layers section, float32, written case by case).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, jax, jaxlib, flax, equinox, jaxtyping, beartype, numpy
print('python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', jaxlib.__version__,
      '| flax', flax.__version__, '| equinox', equinox.__version__, '| jaxtyping',
      jaxtyping.__version__, '| beartype', beartype.__version__, '| numpy', numpy.__version__)
print(jax.devices())"
} 2>&1 | tee "$out/gpu.txt"
timeout 330 python3 benchmarks/bench.py --gpu --rounds 40 --markdown --json "$out/bench.json" \
    2>&1 | tee "$out/bench.md"
echo "bench exit: $?"
timeout 120 python3 benchmarks/passes.py "$out" 2>&1 | tee "$out/passes.txt"
# The single-device tests on the GPU: parity with Flax, the optimised paths (both
# implementations of the one-pass variance), the functional core.
EQX_BATCHNORM_TEST_BACKEND=gpu timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/test_performance_paths.py tests/test_flax_parity.py tests/test_functional_core.py \
    -k "not pmap and not shard_map and not sharded" 2>&1 | tee "$out/tests.log" | tail -25
echo "tests exit: $?"
timeout 300 python3 benchmarks/deep.py --sections stack,eager,resnet --rounds 20 \
    --compile-rounds 1 --json "$out/deep.json" 2>&1 | tee "$out/deep.md"
echo "deep exit: $?"
timeout 180 python3 benchmarks/deep.py --sections scan --dtypes f32 --rounds 20 \
    --compile-rounds 1 --json "$out/scan.json" 2>&1 | tee "$out/scan.md"
echo "scan exit: $?"
