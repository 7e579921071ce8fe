#!/usr/bin/env bash
# One GPU round on the lent H200 (see benchmarks/README.md): install the carried wheels, the GPU tests, then the
# benchmarks. Usage (from the repository root, with .whl and .whl-peer carried): bash benchmarks/gpu_round.sh "$OUT"
# Environment: GPU_TESTS (paths), GPU_TEST_FILTER (-k), GPU_TEST_SECONDS, BENCH_IMPLS, BENCH_GROUPS, BENCH_OPS,
# BENCH_ROUNDS, BENCH_SECONDS; SKIP_TESTS=1 or SKIP_BENCH=1 leave a part out.
# Only 8 files come back from $OUT: everything is written to a scratch folder and packed into $OUT/round.tgz on exit;
# the two summaries (pytest-gpu.txt, bench.md) are also copied to $OUT as they are.
set -uo pipefail
out="${1:?output folder}"
work="$(mktemp -d)"
trap 'tar -czf "$out/round.tgz" -C "$work" . ; cp "$work/pytest-gpu.log" "$out/pytest-gpu.txt" 2>/dev/null; cp "$work/bench.md" "$out/bench.md" 2>/dev/null' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer .whl-peer/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export LIGER_KERNEL_CACHE_DIR="${LIGER_KERNEL_CACHE_DIR:-/tmp/liger-cache}"  # one CUDA build for the benchmarks
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . ./tests/plugins/liger-test-plugin \
    ./tests/plugins/liger-broken-plugin ./plugins/liger-inductor >"$work/install.log" 2>&1 || { tail -20 "$work/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$work/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$work/gpu.txt"
liger-kernel info >"$work/info.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
    timeout "${GPU_TEST_SECONDS:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE --durations=15 \
        ${GPU_TESTS:-tests} ${GPU_TEST_FILTER:+-k "$GPU_TEST_FILTER"} 2>&1 | tee "$work/pytest-gpu.log" | tail -40
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    timeout "${BENCH_SECONDS:-400}" liger-kernel bench --out "$work/bench.json" --peer /tmp/peer \
        --rounds "${BENCH_ROUNDS:-1}" ${BENCH_IMPLS:+--impls "$BENCH_IMPLS"} ${BENCH_GROUPS:+--groups "$BENCH_GROUPS"} \
        ${BENCH_OPS:+--ops "$BENCH_OPS"} 2>&1 | tee "$work/bench.log" | tail -60
    liger-kernel info --autotune >"$work/autotune.txt" 2>&1  # every decision the runs made, with its timings
fi
