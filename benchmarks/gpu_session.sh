#!/usr/bin/env bash
# One prepared GPU session: every check and number that needs a CUDA device, in one command.
#
# Written for the lent H100/H200 machines (torch 2.11, triton 3.6, Python 3.12, no network):
#
#     bash benchmarks/gpu_session.sh            # logs and CSVs go to $OUT (or ./gpu_out)
#
# Stages, each under its own timeout so that a hang in one still leaves the others' output.
# STAGES (a space-separated list, default all, in this order of priority) picks some:
#     STAGES="gpu_tests_kernels tune_gram" bash benchmarks/gpu_session.sh
# All stages: about 14 minutes plus the install, more than one 10-minute call: pick, or let
# the last ones be cut (bench_weights and bench_aggregate write their CSVs row by row, so a
# stage cut by its limit keeps what it measured). A warm machine is given back 30 s after a
# call, so plan one call per session of 15 device-minutes. On 2026-11-26 the whole GPU suite
# took more than 240 s on a fresh H200 (76 tests in 240 s) and bench_step more than 65 s on
# an H100; see RESULTS.md. With tune_gram added to all the others, 9 files would be written:
# at most 8 come back. On a 15-minute budget, two calls (each under the tool's 10-minute
# limit): STAGES="gpu_tests_kernels gpu_tests_rest", then STAGES="bench_eigh bench_weights
# bench_aggregate" (add bench_kernels if time is left).
#   env             card, driver, torch/triton versions, date (UTC): what RESULTS.md must quote
#   gpu_tests_kernels, gpu_tests_rest   pytest -m gpu over the whole suite in two stages, so
#                   that neither cuts the other: tests/kernels (200 s: kernels against fp64, bit
#                   determinism, no host sync under torch.cuda.set_sync_debug_mode("error")),
#                   then everything else (240 s: the methods without host sync, NCCL/FSDP
#                   against one process, compile_method's and graph_method's CUDA graphs)
#   gpu_tests       the whole suite as one stage (not in the default): GPU_TESTS_S (default
#                   240) is its limit in seconds, GPU_TEST_PATHS (default tests) what it runs
#   bench_kernels   gram / combine / graddrop / whole steps: triton vs torch vs per-pair loop,
#                   with the measured device-to-device copy bandwidth (issue 4's targets);
#                   N = 1e8 as a stage of its own
#   bench_eigh      the Jacobi kernels (jacobi_eigh and the eigen methods' whole-stage kernels)
#                   in both rotation orders, timed as graph replays and checked against LAPACK:
#                   the numbers to choose the default order by (90 s; CSV row by row)
#   bench_weights   the K x K stage alone: ops (= kernel launches) and time per method and K
#   bench_weights_graphed   the same through gradbal.graph_method (one CUDA graph replay)
#   bench_weights_compiled  the same through gradbal.compile_method (CUDA graphs), K = 4, 16
#   bench_aggregate every method's aggregate on a materialised [K, N] (issue 3's table)
#   bench_aggregate_graphed  the same with gradbal.graph_method where a graph can replay the
#                   method (not in the default)
#   bench_step      a ResNet-18 K = 2 distillation step against plain training
#   tune_gram       the Gram pass's plans swept (benchmarks/tune_gram.py), not in the default;
#                   TUNE_GRAM_S (default 120) is its budget in seconds
# Every stage appends to $OUT/session.log, ending with a line "== <stage> rc=<exit status>";
# files back from $OUT (at most 8): env.txt, session.log and the CSVs; when there are more
# than six CSVs they are packed into one csvs.tar at the end (tar xf it here).
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

default="gpu_tests_kernels gpu_tests_rest bench_eigh bench_kernels bench_step bench_weights_graphed bench_weights bench_aggregate bench_weights_compiled bench_kernels_1e8"
stages=" ${STAGES:-$default} "
want() { [[ "$stages" == *" $1 "* ]]; }

# --continue-on-collection-errors: a module that cannot import there (a missing optional
# package) must not stop the GPU tests of every other module.
want gpu_tests && stage gpu_tests ${GPU_TESTS_S:-240} "$py" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --continue-on-collection-errors --timeout 120 --durations=20 ${GPU_TEST_PATHS:-tests}
want gpu_tests_kernels && stage gpu_tests_kernels 200 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --continue-on-collection-errors --timeout 120 --durations=10 tests/kernels
want gpu_tests_rest && stage gpu_tests_rest 240 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --continue-on-collection-errors --timeout 120 --durations=10 tests --ignore=tests/kernels
want bench_eigh && stage bench_eigh 90 "$py" benchmarks/bench_eigh.py --reps 20 \
    --csv "$out/bench_eigh_gpu.csv"
# N = 1e6 and 1e7 first (the targets' sizes), then 1e8 apart: a timeout there keeps the rest.
want bench_kernels && stage bench_kernels 95 "$py" benchmarks/bench_kernels.py --ks 2,4,8,16 \
    --ns 1e6,1e7 --dtypes fp32,bf16 --reps 15 --graph-calls 8 --csv "$out/bench_kernels_gpu.csv"
want bench_step && stage bench_step 150 "$py" benchmarks/bench_step.py --device cuda --batch 128 \
    --size 224 --warmup 2 --repeats 10 --csv "$out/bench_step_gpu.csv"
want bench_weights_graphed && stage bench_weights_graphed 45 "$py" benchmarks/bench_weights.py \
    --device cuda --reps 10 --graph --no-ops --csv "$out/bench_weights_graphed_gpu.csv"
want bench_weights && stage bench_weights 45 "$py" benchmarks/bench_weights.py --device cuda \
    --reps 10 --csv "$out/bench_weights_gpu.csv"
want bench_aggregate && stage bench_aggregate 65 "$py" benchmarks/bench_aggregate.py --device cuda \
    --reps 5 --csv "$out/bench_aggregate_gpu.csv"
want bench_aggregate_graphed && stage bench_aggregate_graphed 50 "$py" benchmarks/bench_aggregate.py \
    --device cuda --reps 5 --graph --no-torchjd --csv "$out/bench_aggregate_graphed_gpu.csv"
want bench_weights_compiled && stage bench_weights_compiled 90 "$py" benchmarks/bench_weights.py \
    --device cuda --reps 10 --ks 4 16 --methods mokd mgda upgrad --compile \
    --csv "$out/bench_weights_compiled_gpu.csv"
want bench_kernels_1e8 && stage bench_kernels_1e8 40 "$py" benchmarks/bench_kernels.py --ks 2,8 \
    --ns 1e8 --dtypes fp32,bf16 --providers triton,torch --reps 10 --graph-calls 4 \
    --csv "$out/bench_kernels_gpu_1e8.csv"
want tune_gram && stage tune_gram $((${TUNE_GRAM_S:-120} + 30)) "$py" benchmarks/tune_gram.py --budget-s ${TUNE_GRAM_S:-120} \
    --csv "$out/tune_gram_gpu.csv"
# The device tool returns at most 8 files: pack the CSVs when there are more than six.
csvs=("$out"/*.csv)
if [ "${#csvs[@]}" -gt 6 ]; then
    tar cf "$out/csvs.tar" -C "$out" $(cd "$out" && ls *.csv) && rm -f "$out"/*.csv
fi
exit 0
