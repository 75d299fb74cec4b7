#!/usr/bin/env bash
# The GPU check, sized for one call of at most 8 minutes on a bare H200 machine (../shared/design/gpu-machine.md:
# no network, no package index, torch and the build tools preinstalled). From the repo root it builds the extension
# for sm_90 with CMake directly, then runs the stages in order, each under its own time limit and past any failure,
# and ends with a summary table (stage, status, seconds):
#
#   build     the configure line setup.py uses, sm_90 only, no emulator, against the torch that is here; _C lands
#             in mistral_ext/ as an editable install puts it
#   tests     the CUDA op and model tests (pytest -k cuda)
#   kernels graphs model profile quant parallel: bench/gpu_stages.py (its docstring says what each measures)
#   memcheck racecheck: compute-sanitizer on one small call per kernel, without torch's caching allocator
#
#   bash bench/gpu_check.sh                     # every stage
#   bash bench/gpu_check.sh model profile       # some stages
#   bash bench/gpu_check.sh --dry-run           # on the CPU, small shapes, the installed package: what CI runs
#
# Logs, figures (<stage>.json) and summary.md go to $OUT if set, else a new folder under /tmp. The interpreter is
# $PYTHON, else the active venv's, else ./.venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ALL=(build tests kernels graphs model profile quant parallel memcheck racecheck)
declare -A LIMIT=([build]=200 [tests]=150 [kernels]=60 [graphs]=60 [model]=120 [profile]=60 [quant]=60 [parallel]=40
                  [memcheck]=100 [racecheck]=100 [sanitize-calls]=60)
DRY=0
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) if [[ " ${ALL[*]} " == *" $arg "* ]]; then STAGES+=("$arg"); else
         echo "gpu_check.sh: unknown argument $arg (stages: ${ALL[*]})" >&2; exit 2; fi ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL[@]}")
RESULTS="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$RESULTS"
# The whole check fits in one 10-minute call with room to spare: a stage gets its own limit or what is left of this.
DEADLINE=$((SECONDS + 470))

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; PY_FROM='$PYTHON'
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY=$VIRTUAL_ENV/bin/python; PY_FROM="the active venv"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; PY_FROM="./.venv"
else PY=python3; PY_FROM="no venv"; fi

{
  echo "gpu_check: $([ $DRY -eq 1 ] && echo 'dry run, ')results in $RESULTS"
  echo "commit: $(git describe --always --dirty 2>/dev/null || echo 'unknown (no git here)')"
  echo "python: $PY ($PY_FROM): $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
  # What setup.py and requirements/test.txt list; a test that needs a missing one skips.
  echo "python packages missing: $("$PY" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None) or "none")' \
    torch numpy sentencepiece tokenizers jinja2 gguf pytest transformers accelerate mistral_common 2>&1)"
  "$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' 2>&1
  if [ $DRY -eq 0 ]; then
    cmake=$("$PY" -c 'from build_tools import build_tool; print(build_tool("cmake") or "")' 2>/dev/null)
    if [ -n "$cmake" ]; then
      version=$("$cmake" --version | head -n 1 | awk '{print $3}')
      older=$(printf '%s\n3.26\n' "$version" | sort -V | head -n 1)
      echo "cmake: $cmake $version$([ "$older" != 3.26 ] && echo ': older than the 3.26 CMakeLists.txt needs')"
    else echo "cmake: not found"; fi
    # Where CMakeLists.txt looks when nvcc is not on PATH
    nvcc=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null)
    echo "nvcc: ${nvcc:-not found}${nvcc:+ ($("$nvcc" --version | tail -n 1))}"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not found')"
  else
    echo "package under test: $("$PY" -c 'import json, mistral_ext; print(json.dumps(mistral_ext.build_info()))' 2>&1)"
  fi
} | tee "$RESULTS/environment.txt"

GPU=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && GPU=1
NAMES=(); STATUS=(); TIMES=()
record() { NAMES+=("$1"); STATUS+=("$2"); TIMES+=("$3"); echo "== $1: $2 ($3 s)"; }
skip() { record "$1" "skipped: $2" 0; }
run_stage() {  # name, lines of the log to show (all or a count), command...
  local name=$1 limit=${LIMIT[$1]} show=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ $left -lt 15 ]; then skip "$name" "out of time"; return; fi
  [ "$limit" -gt $left ] && limit=$left
  echo "== $name (limit $limit s): $*"
  local t0=$SECONDS rc=0 log="$RESULTS/$name.log"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1 || rc=$?
  if [ "$show" = all ]; then cat "$log"; else tail -n "$([ $rc -eq 0 ] && echo "$show" || echo 40)" "$log"; fi
  case $rc in
    0) record "$name" ok $((SECONDS - t0)) ;;
    3) record "$name" "n/a: $(tail -n 1 "$log" | sed 's/^n\/a: //')" $((SECONDS - t0)) ;;
    124|137) record "$name" "timeout (limit $limit s)" $((SECONDS - t0)) ;;
    *) record "$name" "FAILED (exit $rc)" $((SECONDS - t0)) ;;
  esac
}

build() {
  local cmake ninja
  cmake=$("$PY" -c 'from build_tools import build_tool; print(build_tool("cmake") or "cmake")') || return 1
  ninja=$("$PY" -c 'from build_tools import build_tool; print(build_tool("ninja") or "ninja")') || return 1
  "$cmake" -S . -B build/gpu-check -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" \
    -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/mistral_ext" -DMISTRAL_EXT_CUDA=ON -DMISTRAL_EXT_EMU=OFF \
    -DMISTRAL_EXT_CUDA_ARCHS=90 \
    -DMISTRAL_EXT_VERSION="$("$PY" -c 'exec(open("mistral_ext/version.py").read()); print(__version__)')" &&
  "$cmake" --build build/gpu-check -j "$(nproc)" &&
  "$PY" -c 'import json, mistral_ext; info = mistral_ext.build_info(); print(json.dumps(info))
assert info["cuda"], "built without CUDA"'
}

# timeout runs commands, not functions: the build goes through a child bash
export -f build
export PY
STAGES_PY=("$PY" bench/gpu_stages.py --out "$RESULTS")
[ $DRY -eq 1 ] && STAGES_PY+=(--dry-run)

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build)
      if [ $DRY -eq 1 ]; then skip build "dry run: the installed package";
      else run_stage build 30 bash -c build; fi ;;
    tests)
      if [ $DRY -eq 0 ] && [ $GPU -eq 0 ]; then skip tests "no CUDA device"; else
        # On the GPU the environment describes the build above, which the build tests check. Test files that need a
        # package the machine lacks skip (importorskip), so collection goes through.
        # One seed for every xdist worker, so that MISTRAL_EXT_SEED replays any failure.
        env=(MISTRAL_EXT_SEED=$(( (RANDOM << 15) | RANDOM )))
        [ $DRY -eq 0 ] && env+=(MISTRAL_EXT_CUDA=1 MISTRAL_EXT_CUDA_ARCHS=90)
        workers=(); "$PY" -c "import xdist" 2> /dev/null && workers=(-n 8)
        run_stage tests 25 env "${env[@]}" "$PY" -m pytest -q -k cuda -p no:cacheprovider "${workers[@]}" tests
      fi ;;
    kernels|graphs|model|profile|quant|parallel)
      if [ $DRY -eq 0 ] && [ $GPU -eq 0 ]; then skip "$stage" "no CUDA device"; else
        run_stage "$stage" all "${STAGES_PY[@]}" "$stage"
      fi ;;
    memcheck|racecheck)
      if [ $DRY -eq 1 ]; then
        # No sanitizer on the CPU, but the calls it would watch still run, so they cannot rot.
        if [ "$stage" = memcheck ]; then run_stage sanitize-calls all "${STAGES_PY[@]}" sanitize; fi
        skip "$stage" "dry run: compute-sanitizer needs a GPU"
      elif ! command -v compute-sanitizer > /dev/null; then skip "$stage" "compute-sanitizer not found"
      elif [ $GPU -eq 0 ]; then skip "$stage" "no CUDA device"
      else
        # Without the caching allocator every tensor is an allocation of its own: an access past its end is caught.
        run_stage "$stage" all env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$stage" \
          --error-exitcode 1 "$PY" bench/gpu_stages.py sanitize --out "$RESULTS"
      fi ;;
  esac
done

failed=0
{
  echo "| stage | status | seconds |"
  echo "|---|---|---:|"
  for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${TIMES[$i]} |"; done
  echo
  echo "total $SECONDS s; figures in $RESULTS/*.json, logs in $RESULTS/*.log"
} > "$RESULTS/summary.md"
cat "$RESULTS/summary.md"
for status in "${STATUS[@]}"; do case "$status" in FAILED*|timeout*) failed=1 ;; esac; done
exit $failed
