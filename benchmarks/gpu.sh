#!/usr/bin/env bash
# The checks that need a GPU, in one run on a machine with one (issues 15 and 16 ask for "the same
# table with the CUDA backend"): the CUDA test; the continuous daemon at Python's switch interval
# and at 0.2 ms (whether the GIL's hand-over slows its forward, benchmarks/gil_convoy.py); then
# speed.py's side-by-side table and evaluate.py with the GPU serving the model (the daemon's and the
# evaluator's default device when there is one); then the tests of the engine, the evaluator and
# the daemon, which run on CUDA there for the same reason. Each step has a time limit, so that a slow one cannot take the others' time; its log goes
# to OUT (the first argument, default ./gpu-logs) and its last lines to stdout.
#
#     bash benchmarks/gpu.sh [OUT]
#     SPEED_ARGS="--files 200 --rounds 1" bash benchmarks/gpu.sh   # a shorter table
#
# meddaemon must be importable (installed, or its dependencies installed and src on PYTHONPATH, as
# this script adds) and its console scripts must sit beside the Python that runs it, as in a
# virtual environment. Hand-written ones need pip's `if __name__ == "__main__":` guard: every
# forkserver child imports the main module, and without it runs the daemon again (the first run
# on the H200 lost its daemon figures that way). The figures are from SYNTHETIC files and untrained SYNTHETIC weights.
set -u -o pipefail
out=${1:-gpu-logs}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
speed_args=${SPEED_ARGS:---files 800 --rounds 2}
evaluate_args=${EVALUATE_ARGS:---files 4000 --rss-files 0 --skip ray}
test_paths=${TEST_PATHS:-tests/engine tests/evaluate tests/daemon}

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: limit ${limit} s, started $(date +%T)"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: rc=$? at $(date +%T)"
    tail -n "${TAIL_LINES:-30}" "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
$python -c 'import os, torch; print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}, {os.cpu_count()} CPUs")' \
    | tee -a "$out/gpu.txt"
step cuda-test 90 $python -m pytest -p no:cacheprovider -q tests/engine/test_inference.py -k cuda
# shellcheck disable=SC2086
step switch-interval "${SWITCH_LIMIT:-150}" $python benchmarks/speed.py --continuous-only \
    --continuous "${SWITCH_CONTINUOUS:-densenet121=400,mobilenet_v2=800}" --switch-intervals-ms 5,0.2
# shellcheck disable=SC2086  # the arguments are word lists
step speed "${SPEED_LIMIT:-240}" $python benchmarks/speed.py $speed_args
# shellcheck disable=SC2086
step evaluate "${EVALUATE_LIMIT:-120}" $python benchmarks/evaluate.py $evaluate_args
# the Ray tests need ray, which this script does not assume; PostgreSQL's skip without a server
# shellcheck disable=SC2086
step tests "${TESTS_LIMIT:-150}" $python -m pytest -p no:cacheprovider -q -m "not alone" -n "${TEST_PROCESSES:-8}" \
    --ignore=tests/evaluate/test_ray_engine.py --ignore=tests/evaluate/test_ray_workers.py $test_paths
