#!/usr/bin/env bash
# One GPU round on the lent H200 (see DEVELOPERS.md): install the carried wheels, the GPU tests, then benchmarks.
# Usage (from the repository root, with .whl and .whl-peer carried): bash benchmarks/gpu_round.sh "$OUT"
# Environment: GPU_TESTS (paths), GPU_TEST_FILTER (-k), GPU_TEST_SECONDS, BENCH_IMPLS, BENCH_GROUPS, BENCH_OPS,
# BENCH_ROUNDS, BENCH_SECONDS; SKIP_TESTS=1 or SKIP_BENCH=1 leave a part out.
set -uo pipefail
out="${1:?output folder}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer .whl-peer/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . ./tests/plugins/liger-test-plugin \
    ./tests/plugins/liger-broken-plugin >"$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
liger-kernel info >"$out/info.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
    timeout "${GPU_TEST_SECONDS:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE --durations=15 \
        ${GPU_TESTS:-tests} ${GPU_TEST_FILTER:+-k "$GPU_TEST_FILTER"} 2>&1 | tee "$out/pytest-gpu.log" | tail -40
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    timeout "${BENCH_SECONDS:-400}" liger-kernel bench --out "$out/bench.json" --peer /tmp/peer \
        --rounds "${BENCH_ROUNDS:-1}" ${BENCH_IMPLS:+--impls "$BENCH_IMPLS"} ${BENCH_GROUPS:+--groups "$BENCH_GROUPS"} \
        ${BENCH_OPS:+--ops "$BENCH_OPS"} 2>&1 | tee "$out/bench.log" | tail -60
fi
