#!/usr/bin/env bash
# The loss tests and the loss benchmarks on a CUDA device, in under 5 minutes, with a summary.
#
#     bash benchmarks/gpu_check.sh            # from anywhere; needs torch with CUDA and a GPU
#
# 1. pytest on the loss and fused-kernel tests (the CUDA-parametrised ones run instead of skip),
# 2. bench_losses.py --device cuda at C = 100k (d = 512) and C = 1M (d = 128): the buffer and the
#    streaming path, GM arcface streaming, PML's ArcFaceLoss and the three matrix products.
# Each step has its own time limit (120 + 2 × 80 s), so the whole script ends within 5 minutes
# whatever happens. Without a GPU it says so and exits with status 2.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
log_dir="${GPU_CHECK_LOG_DIR:-$(mktemp -d)}"

# Without a GPU nothing is run: exit status 2 (not 1, which means a failure on the GPU).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False):" \
        "not measured on GPU. The CPU figures come from benchmarks/bench_losses.py without" \
        "--device; run this script again on a machine with a GPU."
    exit 2
fi
python -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

start=$SECONDS
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_*loss*.py tests/test_fused*.py \
    >"$log_dir/tests.txt" 2>&1
tests_status=$?
tests_seconds=$((SECONDS - start))

bench() {  # name, then bench_losses.py arguments
    local name=$1
    shift
    timeout 80 python benchmarks/bench_losses.py --device cuda --repeats 5 "$@" >"$log_dir/$name.txt" 2>&1
    echo $?
}
bench_100k=$(bench c100k --classes 100000 --dim 512 \
    --cases floor lm-buffer lm-stream gm-arcface-stream pml-arcface)
bench_1m=$(bench c1m --classes 1000000 --dim 128 --slice-check 100000 \
    --cases floor lm-buffer lm-stream gm-arcface-stream pml-arcface)

echo
echo "== tests (exit $tests_status, ${tests_seconds} s) =="
grep -E "passed|failed|error" "$log_dir/tests.txt" | tail -3
grep -E "^(FAILED|ERROR)" "$log_dir/tests.txt" | head -20
for name in c100k c1m; do
    echo
    echo "== bench $name =="
    cat "$log_dir/$name.txt"
done
echo
echo "summary: tests exit $tests_status; bench C=100k exit $bench_100k; bench C=1M exit $bench_1m;" \
    "total ${SECONDS} s; logs in $log_dir"
[ "$tests_status" = 0 ] && [ "$bench_100k" = 0 ] && [ "$bench_1m" = 0 ]
