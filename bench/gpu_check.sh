#!/usr/bin/env bash
# One command for a machine with an H100/H200: build in place, run the CUDA tests, compute-sanitizer, and the
# benchmarks at Mistral-7B shapes, then print a summary. Each stage also runs alone:
#
#   bash bench/gpu_check.sh                 # every stage
#   bash bench/gpu_check.sh bench summary   # some stages
#   bash bench/gpu_check.sh --dry-run       # CPU, tiny shapes: what CI runs so this script cannot rot
#
# A stage that cannot run here says why and is skipped. Logs go to $GPU_CHECK_OUT (default: $OUT if set, else
# ./gpu_check_out). The GPU machine has no package index: the build compiles in place (setup.py build_ext
# --inplace) with the packages already there, and every stage imports mistral_ext from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    build|tests|sanitizer|bench|summary) STAGES+=("$arg") ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests sanitizer bench summary)
LOGS="${GPU_CHECK_OUT:-${OUT:-gpu_check_out}}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
FAILED=0

has_gpu() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
skip() { echo "== $1: skipped: $2"; }
run_stage() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" > "$LOGS/$name.log" 2>&1; then
    echo "== $name: ok ($((SECONDS - t0)) s)"
  else
    echo "== $name: FAILED ($((SECONDS - t0)) s); the end of $LOGS/$name.log:"
    tail -n 30 "$LOGS/$name.log"
    FAILED=1
  fi
}

if [ $DRY -eq 1 ]; then
  DEVICE=cpu
  LAT=(--quick --model tiny --device cpu)
  ATT=(--quick --device cpu)
  OPS=(--quick --device cpu)
  MEM=(--quick --device cpu)
  TESTS=(tests/test_build.py)
else
  DEVICE=cuda
  LAT=(--model mistral-7b --device cuda --dtype bfloat16 --prompt-lengths 512,2048 --contexts 16,4096
       --batch-sizes 1,8 --decode-steps 32 --json "$LOGS/latency.json")
  ATT=(--device cuda --lengths 1024,4096,16384)
  OPS=(--device cuda --dtype bfloat16)
  MEM=(--device cuda)
  # test_ops and test_model run every kernel on CUDA (their `cuda` parameters) against the reference
  TESTS=(tests/test_build.py tests/test_ops.py tests/test_op_contract.py tests/test_model.py)
  # against HF transformers too (cuda parameter of test_cuda_kernels_give_hf_logits), where it is installed
  if "$PY" -c "import transformers" > /dev/null 2>&1; then TESTS+=(tests/test_hf.py); else
    echo "== tests: transformers is not installed: the HF comparisons are left out"; fi
fi

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build)
      if [ $DRY -eq 1 ]; then
        # CI runs the dry run amid its tests: the package under test stays as built; it must import and say how.
        run_stage build "$PY" -c "import json, mistral_ext; print(json.dumps(mistral_ext.build_info()))"
      elif ! command -v nvcc > /dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
        skip build "nvcc not found"
      else
        run_stage build env MISTRAL_EXT_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
      fi ;;
    tests)
      if [ $DRY -eq 0 ] && ! has_gpu; then skip tests "no CUDA device"; else
        run_stage tests "$PY" -m pytest -q -x "${TESTS[@]}"
      fi ;;
    sanitizer)
      if [ $DRY -eq 1 ]; then skip sanitizer "dry run (needs a GPU)";
      elif ! command -v compute-sanitizer > /dev/null; then skip sanitizer "compute-sanitizer not found";
      elif ! has_gpu; then skip sanitizer "no CUDA device";
      else
        # The CUDA op tests at their small shapes, bfloat16 cases (dtype1): every kernel, attention included.
        for tool in memcheck racecheck; do
          run_stage "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m pytest -q -x \
            -p no:cacheprovider tests/test_ops.py -k "cuda and (dtype1 or extremes or rotation)"
        done
      fi ;;
    bench)
      if [ $DRY -eq 0 ] && ! has_gpu; then skip bench "no CUDA device"; else
        run_stage ops "$PY" bench/ops.py "${OPS[@]}"
        run_stage latency "$PY" bench/latency.py "${LAT[@]}"
        run_stage attention "$PY" bench/attention.py "${ATT[@]}"
        run_stage memory "$PY" bench/memory.py "${MEM[@]}"
      fi ;;
    summary)
      echo "== summary ($DEVICE$([ $DRY -eq 1 ] && echo ', dry run'))"
      "$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
      for name in ops latency attention memory; do
        if [ -f "$LOGS/$name.log" ]; then echo "-- $name"; grep -v '^\s*$' "$LOGS/$name.log" | tail -n 12; fi
      done ;;
  esac
done
exit $FAILED
