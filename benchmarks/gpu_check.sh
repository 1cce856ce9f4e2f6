#!/usr/bin/env bash
# One device run: GPU tests, then the benchmarks, results under $OUT (or ./gpu_out).
#   bash benchmarks/gpu_check.sh [stage ...]     stages: env tests rmsnorm fused_ce profile_ce attention generate head_schedule
#                                                (default: those), host_overhead, warp_spec_probe, skinny_rows,
#                                                pdl_probe, prefill, sampling, train_step and train (only when named)
#   GPU_TESTS="tests/test_a.py tests/test_b.py" limits the test stage to those files (the warp-specialized
#   skinny tiles' test runs first in any case, unless MTP_SKINNY_WS=0).
# The stages together take longer than one device call (10 min) and a lease (15 min): pick them.
# `train` (benchmarks/gpu_train_default.sh; run benchmarks/prepare_gpu_data.sh here first and carry
# .gpu_data) trains, distils, evaluates and returns the default model in an estimated TRAIN_SECONDS
# (default 240) + 240 s, capped at 570 s so it ends inside one device call (not yet run on a GPU).
# At most 8 files come back from the device machine, so every stage appends to one log and the
# results folder (kept outside OUT) is re-packed into OUT/results.tar.gz after each stage; with the
# train stage's checkpoint pieces that is at most 7 files. Here: tar -xzf results.tar.gz -C DIR.
# GPU_CHECK_SECONDS (default 540): the whole call's time. Each stage's limit is cut to what is left of
# it (15 s kept for packing), and a stage that would get under 20 s is skipped: give it about 20 s
# under the device command's timeout, so that the device's own limit never kills the script
# mid-stage with nothing packed and no summary.
set -uo pipefail
DEADLINE=$(( SECONDS + ${GPU_CHECK_SECONDS:-540} ))
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
RES=${RESULTS_DIR:-/tmp/mtp_gpu_results}
mkdir -p "$OUT" "$RES"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
unset MTP_BACKEND
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Peer libraries for the benchmarks travel as wheels in .whl (benchmark-only, never runtime deps);
# without them (or if they fail to install) the benchmarks record those peers as skipped.
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  else
    echo "peer wheels in .whl did not install; Liger and CCE will be skipped" | tee -a "$LOG"
  fi
fi
# The package is imported from the checkout: `mtp_kernels` is the kernels/ folder.
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/mtp_kernels && export PYTHONPATH=/tmp/pkgs:$PYTHONPATH

stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(env tests rmsnorm fused_ce profile_ce attention generate head_schedule)
summary=()
pack() { tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null; }
run_stage() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$(( DEADLINE - SECONDS - 15 ))
  if [ "$left" -lt 20 ]; then
    echo "=== $name skipped: ${left}s left of GPU_CHECK_SECONDS" | tee -a "$LOG"
    summary+=("$name: skipped (deadline)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 40
  local rc=${PIPESTATUS[0]}
  summary+=("$name: rc=$rc $((SECONDS - t0))s")
  pack
}
# Three kinds of launch stay in the benchmarks only if their GPU tests ran in this call and passed (a
# tuner or a capture would otherwise keep a fast one whatever its results):
#  - the warp-specialized flash configs (`attention.warp_spec_allowed`: MTP_WARP_SPEC=1, or by
#    default the kernels in WARP_SPEC_DEFAULT_KERNELS); the tests stage runs their tests whatever the
#    setting (MTP_WARP_SPEC=1 for pytest, unless 0);
#  - programmatic dependent launches (kernels/dependent_launch.py: MTP_PDL, on unless 0);
#  - the skinny GEMM's warp-specialized TMA tiles (kernels/skinny_ws.py: MTP_SKINNY_WS, off by default
#    until a Triton version is validated; the tests stage runs their GPU test first, in its own
#    pytest run, and the other GPU tests and the benchmarks get the tiles whose cases passed).
# A call without a tests stage runs with all three off unless they were set by hand.
guard_by_tests() {  # variable, the common.py check of the JUnit file, what it switches
  local var=$1 check=$2 what=$3 junit=$RES/gpu_tests.xml
  [ "${!var:-}" = "0" ] && return 0
  # exit 0 only when the tests confirm them: a crash of the check itself also switches them off
  if ! python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import common; sys.exit(1 if common.$check(sys.argv[1]) else 0)" "$junit"; then
    export "$var=0"
    echo "$what not confirmed by their GPU tests (failed, not run, or the tests did not finish): $var=0 from here" | tee -a "$LOG"
  fi
}
if [[ " ${stages[*]} " != *" tests "* ]]; then
  for guarded in "MTP_WARP_SPEC:warp-specialized kernels" "MTP_PDL:programmatic dependent launches" \
                 "MTP_SKINNY_WS:warp-specialized skinny GEMM tiles"; do
    var=${guarded%%:*}
    if [ -z "${!var:-}" ]; then
      export "$var=0"
      echo "no tests stage in this call: ${guarded#*:} off ($var=0)" | tee -a "$LOG"
    fi
  done
fi
for s in "${stages[@]}"; do
  case $s in
    env) run_stage env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"' ;;
    tests) # pytest-xdist (in the device image) spreads the tests, so Triton's compiles run on several cores
           workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-8}")
           # The warp-specialized skinny tiles first, alone and under their own limit (an experimental
           # compiler pass that hung would otherwise take the whole tests stage with it); the other GPU
           # tests and the benchmarks get the tiles whose cases passed (MTP_SKINNY_WS).
           if [ "${MTP_SKINNY_WS:-}" != "0" ]; then
             run_stage skinny_ws_tests 150 python3 -m pytest -q -m gpu "${workers[@]}" tests/test_skinny_linear.py -k warp_specialized_tiles -p no:cacheprovider --junitxml="$RES/gpu_tests_skinny_ws.xml"
             # "1", the tiles that passed (of those set by hand, if any), or "0" (common.skinny_ws_selection)
             MTP_SKINNY_WS=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.skinny_ws_selection(sys.argv[1], sys.argv[2]))" "$RES/gpu_tests_skinny_ws.xml" "${MTP_SKINNY_WS:-}" || echo 0)
             export MTP_SKINNY_WS
             echo "warp-specialized skinny GEMM tiles from their GPU test: MTP_SKINNY_WS=$MTP_SKINNY_WS" | tee -a "$LOG"
           fi
           # test_large_offsets.py reserves 8 GiB per process: one process of its own, after the others
           MTP_WARP_SPEC=${MTP_WARP_SPEC:-1} run_stage tests 300 python3 -m pytest -q -m gpu "${workers[@]}" ${GPU_TESTS:-tests} -k "not warp_specialized_tiles" --ignore=tests/test_large_offsets.py -p no:cacheprovider --junitxml="$RES/gpu_tests.xml"
           if [ -z "${GPU_TESTS:-}" ]; then
             run_stage large_offsets_tests 90 python3 -m pytest -q -m gpu tests/test_large_offsets.py -p no:cacheprovider --junitxml="$RES/gpu_tests_large_offsets.xml"
           fi
           guard_by_tests MTP_WARP_SPEC warp_spec_tests_failed "warp-specialized kernels"
           guard_by_tests MTP_PDL programmatic_tests_failed "programmatic dependent launches" ;;
    rmsnorm) run_stage rmsnorm 40 python3 benchmarks/bench_rmsnorm.py --out "$RES" ;;
    fused_ce) run_stage fused_ce 180 python3 benchmarks/bench_fused_ce.py --out "$RES" ;;
    profile_ce) run_stage profile_ce 120 python3 benchmarks/profile_fused_ce.py --out "$RES" ;;
    attention) run_stage attention 240 python3 benchmarks/bench_attention.py --out "$RES" ;;   # ~50 s + KV launch tuning + 42 flash configs to compile
    generate) run_stage generate 420 python3 benchmarks/bench_generate.py --out "$RES" ;;   # 177 s on an H100 (seventeenth session)
    prefill) run_stage prefill 180 python3 benchmarks/bench_prefill.py --out "$RES" ;;   # ragged-batch prefill, grouped vs padded (7B shape)
    sampling) run_stage sampling 90 python3 benchmarks/bench_sampling.py --out "$RES" ;;   # linear argmax / sample vs eager, R 1-512 (7B unembedding); estimated < 30 s, not yet run on a GPU
    continuous) run_stage continuous 120 python3 benchmarks/bench_continuous_batching.py --out "$RES" ;;   # continuous vs static batches, default model, plain and tree; not yet run on a GPU
    train_step) run_stage train_step 240 python3 benchmarks/bench_train_step.py --out "$RES" ;;   # eager vs torch.compile (Inductor) training step, 2 models; mostly Inductor's compile, estimated 90-180 s, not yet run on a GPU
    host_overhead) run_stage host_overhead 120 python3 benchmarks/bench_host_overhead.py --out "$RES" ;;   # 54-59 s on an H200, mostly autotuning
    warp_spec_probe) # opts in by itself; PROBE_PARTS=timing runs that part only (default: flash timing)
                     run_stage warp_spec_probe 240 python3 benchmarks/probe_warp_spec.py --out "$RES" ${PROBE_PARTS:+--parts $PROBE_PARTS} ;;
    head_schedule) run_stage head_schedule 120 python3 benchmarks/bench_head_schedule.py --device cuda --out "$RES" ;;
    skinny_rows) run_stage skinny_rows 150 python3 benchmarks/probe_skinny_rows.py --out "$RES" ;;   # x's cost in the 64-row GEMM tiles
    pdl_probe) # opts in by itself (MTP_PDL=1): ordinary, programmatic, programmatic waiting first
               MTP_PDL=1 run_stage pdl_probe 180 python3 benchmarks/probe_dependent_launch.py --out "$RES" ;;
    train) limit=$(( ${TRAIN_SECONDS:-240} + 240 )); [ "$limit" -gt 570 ] && limit=570
           run_stage train "$limit" bash benchmarks/gpu_train_default.sh "$OUT" ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
pack
