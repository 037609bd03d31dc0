#!/usr/bin/env bash
# One prepared GPU session: every check and number that needs a CUDA device, in one command.
#
# Written for the lent H100/H200 machines (torch 2.11, triton 3.6, Python 3.12, no network):
#
#     bash benchmarks/gpu_session.sh            # logs and CSVs go to $OUT (or ./gpu_out)
#
# Stages, each under its own timeout so that a hang in one still leaves the others' output
# (at most 8.75 minutes of stages plus the install; run it with timeout_s 590: a warm machine
# is given back 30 s after a call, so a rerun would mean a fresh start, and one full run fits
# the 15-minute device budget better than two short ones; bench_weights and bench_aggregate
# write their CSVs row by row, so a stage cut by its limit keeps what it measured):
#   env             card, driver, torch/triton versions, date (UTC): what RESULTS.md must quote
#   gpu_tests       pytest -m gpu over the whole suite (kernels against fp64,
#                   bit determinism, no host sync under torch.cuda.set_sync_debug_mode("error"),
#                   NCCL/FSDP against one process, compile_method's CUDA graphs)
#   bench_kernels   gram / combine / graddrop / whole steps: triton vs torch vs per-pair loop,
#                   with the measured device-to-device copy bandwidth (issue 4's targets);
#                   N = 1e8 as a stage of its own
#   bench_weights   the K x K stage alone: ops (= kernel launches) and time per method and K
#   bench_weights_compiled  the same through gradbal.compile_method (CUDA graphs), K = 4, 16
#   bench_aggregate every method's aggregate on a materialised [K, N] (issue 3's table)
#   bench_step      a ResNet-18 K = 2 distillation step against plain training
# Every stage appends to $OUT/session.log, ending with a line "== <stage> rc=<exit status>";
# files back from $OUT (at most 8): env.txt, session.log and six CSVs.
#
# pytest, hypothesis and scipy are on the lent machines; TorchJD (the peer the benchmarks compare
# with) is not: carry its wheels in .whl/ (torchjd, qpsolvers, quadprog; see the device tool's
# README for `pip download`) and this script installs them into /tmp/site.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"

if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tail -n 3 | tee -a "$out/env.txt"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

"$py" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3 | tee -a "$out/env.txt"
"$py" -c "import gradbal.kernels as k; print('gradbal.kernels.AVAILABLE =', k.AVAILABLE)
try:
    import torchjd.aggregation; print('torchjd importable')
except ImportError as e:
    print('torchjd not importable:', e)" 2>&1 | tee -a "$out/env.txt"

stage() {  # stage NAME SECONDS CMD...: run CMD under a timeout, append to $out/session.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/session.log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$out/session.log"
    echo "== $name rc=${PIPESTATUS[0]}" | tee -a "$out/session.log"
}

stage gpu_tests 170 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests
# N = 1e6 and 1e7 first (the targets' sizes), then 1e8 apart: a timeout there keeps the rest.
stage bench_kernels 95 "$py" benchmarks/bench_kernels.py --ks 2,4,8,16 --ns 1e6,1e7 \
    --dtypes fp32,bf16 --reps 15 --csv "$out/bench_kernels_gpu.csv"
stage bench_kernels_1e8 40 "$py" benchmarks/bench_kernels.py --ks 2,8 --ns 1e8 \
    --dtypes fp32,bf16 --providers triton,torch --reps 10 --csv "$out/bench_kernels_gpu_1e8.csv"
stage bench_weights 25 "$py" benchmarks/bench_weights.py --device cuda --reps 10 \
    --csv "$out/bench_weights_gpu.csv"
stage bench_weights_compiled 65 "$py" benchmarks/bench_weights.py --device cuda --reps 10 \
    --ks 4 16 --methods mokd mgda upgrad --compile --csv "$out/bench_weights_compiled_gpu.csv"
stage bench_aggregate 65 "$py" benchmarks/bench_aggregate.py --device cuda --reps 5 \
    --csv "$out/bench_aggregate_gpu.csv"
stage bench_step 65 "$py" benchmarks/bench_step.py --device cuda --batch 128 --size 224 \
    --repeats 10 --csv "$out/bench_step_gpu.csv"
