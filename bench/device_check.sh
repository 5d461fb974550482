#!/usr/bin/env bash
# One command for a GPU machine with torch, triton, pytest, setuptools and ninja preinstalled
# and no network (DESIGN.md, "Verifying GPU code without a GPU", check 4). Run from the repo
# root: builds the CUDA extension, runs the GPU tests, the static compile check and the quick
# benchmark suite, and writes bench/results/<gpu>-<date>-<commit>/ with a SUMMARY.md.
# Every step has a timeout inside one overall budget, so a hang costs its step, not the run;
# a failing step does not stop the others, but the exit status is non-zero if any failed.
# With $OUT set, the main files are also copied there (flat, at most 8).
set -u

PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}  # stays under 8 minutes with setup and the summary
DEADLINE=$((SECONDS + BUDGET_S))
JOBS=$(nproc)

slug() { tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g'; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo nocommit)
RES=bench/results/$(echo "${GPU:-no-gpu}" | slug)-$(date +%Y%m%d)-$COMMIT
mkdir -p "$RES"

STEPS=""
FAILED=()

# step NAME CAP_S LOG CMD...: run CMD with a timeout of min(CAP_S, time left), log to LOG.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        STEPS+="| $name | skipped: budget spent | 0 s |"$'\n'
        FAILED+=("$name")
        return 1
    fi
    echo "== $name (up to ${limit} s)"
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local status="ok"
    if ((rc == 124 || rc == 137)); then
        status="timed out after ${limit} s"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    fi
    STEPS+="| $name | $status | $((SECONDS - start)) s |"$'\n'
    ((rc == 0)) || FAILED+=("$name")
    tail -n 3 "$log"
    return "$rc"
}

print_versions() {
    nvidia-smi
    "$PY" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("triton", triton.__version__)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
}
export -f print_versions
export PY

step "versions" 60 "$RES/env.txt" bash -c print_versions
step "build" 240 "$RES/build.log" env FASTLM_BUILD_CUDA=1 MAX_JOBS="$JOBS" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
step "gpu tests" 150 "$RES/pytest.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider
step "static check" 90 "$RES/compile_check.txt" "$PY" -m fastlm.kernels.compile_check \
    --require-cuda --jobs "$((JOBS < 8 ? JOBS : 8))" --json "$RES/compile_check.json"
# The main job on the GPU (bf16 autocast, fused kernels); its weights are not committed.
step "train (100 steps)" 90 "$RES/train.log" "$PY" -m fastlm.cli train --max-steps 100 \
    --eval-every 50 --save-every 100 --no-progress --out-dir "$RES/train-run"
rm -rf "$RES/train-run/checkpoints" "$RES/train-run/tensorboard"
step "bench (quick)" 180 "$RES/bench.txt" "$PY" bench/run.py --out "$RES"

versions() { sed -n "s/^$1 //p" "$RES/env.txt" | head -n1; }
TESTS=$(grep -Eo '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed|deselected)' \
    "$RES/pytest.log" | paste -sd, - | sed 's/,/, /g')
{
    echo "# Device check: ${GPU:-no GPU found}"
    echo
    echo "| GPU | driver | torch | triton | commit | date |"
    echo "| --- | --- | --- | --- | --- | --- |"
    echo "| ${GPU:-?} | ${DRIVER:-?} | $(versions torch) | $(versions triton) | $COMMIT" \
        "| $(date -u +%Y-%m-%dT%H:%MZ) |"
    echo
    echo "| step | result | time |"
    echo "| --- | --- | --- |"
    printf '%s' "$STEPS"
    echo
    echo "GPU tests: ${TESTS:-no summary line (see pytest.log)}"
    echo
    echo "Static check: $(tail -n1 "$RES/compile_check.txt" 2>/dev/null)"
    grep -E '^(triton|cuda) [^ ].*\]:$' "$RES/compile_check.txt" 2>/dev/null | sed 's/^/- /'
    echo
    echo "## Training run"
    echo
    echo '```'
    grep '^\[fastlm train\]\|^step ' "$RES/train.log" 2>/dev/null
    echo '```'
    echo
    echo "## Quick benchmarks"
    echo
    echo '```'
    cat "$RES/bench.txt" 2>/dev/null
    echo '```'
} >"$RES/SUMMARY.md"

if [[ -n ${OUT:-} ]]; then
    for f in SUMMARY.md build.log pytest.log compile_check.txt bench.txt results.csv \
        results.json train.log; do
        [[ -f $RES/$f ]] && cp "$RES/$f" "$OUT/"
    done
fi

echo "wrote $RES (total $SECONDS s)"
if ((${#FAILED[@]})); then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
