#!/usr/bin/env bash
# Ember's GPU check: one short run of everything GPU-specific on an H100 or H200.
#
#   bash benchmarks/gpu/check.sh          # from the repository root (or from anywhere)
#
# Phases, each under its own time limit so that one hang cannot eat the run, each recorded and
# reported whatever the others do:
#   1. install .whl/*.whl into /tmp/site (Ember's abi3 wheel; optionally liger-kernel, deepspeed),
#      print versions and `nvidia-smi -L`
#   2. the kernel tests on CUDA (Triton kernels against float64 references; `gpu`-marked tests)
#   3. the kernel benchmarks at full size (RMSNorm, rotary, SwiGLU; cross-entropy, fused linear CE)
#   4. end-to-end training throughput (Llama 3.2 1B shape, seq 2048, bf16) against HF transformers
#   5. a summary table, printed last
# Results (JSON, JUnit XML, this log) go to $OUT when it is set, else to
# benchmarks/results/<date>-<gpu>/. Nothing here changes clocks, power or MIG, or resets the GPU.
#
# Without a visible GPU (or with EMBER_CHECK_DRY=1) it is a dry run: the same phases at smoke
# sizes on the CPU. Time limits (seconds) can be changed with EMBER_CHECK_LIMIT_<PHASE>
# (INSTALL, VERSIONS, TESTS, NORM_ROPE, CE, E2E) and the whole run with EMBER_CHECK_BUDGET.
# See BENCHMARKS.md.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
GPU_DIR="$ROOT/benchmarks/gpu"
SITE="${EMBER_CHECK_SITE:-/tmp/site}"
BUDGET="${EMBER_CHECK_BUDGET:-480}"
export PYTHONUNBUFFERED=1

if [[ -n "${EMBER_CHECK_DRY:-}" ]]; then
    DRY="$EMBER_CHECK_DRY"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DRY=0
else
    DRY=1
fi

if [[ -n "${OUT:-}" ]]; then
    RES="$OUT"
else
    gpu="cpu"
    if [[ "$DRY" == 0 ]]; then
        gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
            | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
        gpu="${gpu:-gpu}"
    fi
    RES="$ROOT/benchmarks/results/$(date -u +%Y-%m-%d-%H%M)-$gpu"
fi
mkdir -p "$RES" || exit 2
: > "$RES/phases.tsv"
START=$SECONDS

# phase NAME CAP COMMAND...: runs COMMAND under min(CAP, what is left of the budget) seconds.
# On the limit it gets SIGINT (pytest then stops cleanly and writes what it has), SIGKILL 15 s later.
phase() {
    local name=$1 cap=$2 left limit rc t0
    shift 2
    left=$((BUDGET - (SECONDS - START) - 15))  # 15 s kept for the summary
    limit=$((cap < left ? cap : left))
    echo
    if ((limit < 10)); then
        echo "=== phase $name: skipped, the ${BUDGET} s budget is spent ==="
        printf '%s\tbudget\t0\t%s\tthe budget was spent before it\n' "$name" "$cap" >> "$RES/phases.tsv"
        return
    fi
    echo "=== phase $name (limit ${limit} s) ==="
    t0=$SECONDS
    timeout -s INT -k 15 "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$RES/phases.tsv"
    echo "=== phase $name: exit $rc after $((SECONDS - t0)) s ==="
}

skip() {
    printf '%s\tskip\t0\t0\t%s\n' "$1" "$2" >> "$RES/phases.tsv"
    echo "=== phase $1: skipped, $2 ==="
}

bench_phase() {  # bench_phase NAME CAP FILE...: a benchmark session writing NAME.json and NAME.jsonl
    local name=$1 cap=$2
    shift 2
    phase "$name" "$cap" env PYTHONPATH="$GPU_DIR${PYTHONPATH:+:$PYTHONPATH}" EMBER_RECORD_JSONL="$RES/$name.jsonl" \
        "$PY" -m pytest "$@" -p no:cacheprovider -p record_results --benchmark-json="$RES/$name.json"
}

main() {
    echo "Ember GPU check in $ROOT; results in $RES; budget ${BUDGET} s$([[ "$DRY" == 1 ]] && echo '; DRY RUN (no GPU): smoke sizes')"
    if [[ "$DRY" == 1 ]]; then
        export EMBER_BENCH_SMALL=1
    fi

    # 1. wheels and versions
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        rm -rf "$SITE"
        phase install "${EMBER_CHECK_LIMIT_INSTALL:-30}" \
            "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        skip install "no .whl/*.whl; using the ember already importable, if any"
    fi
    echo "--- nvidia-smi -L"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>&1; else echo "(no nvidia-smi)"; fi
    phase versions "${EMBER_CHECK_LIMIT_VERSIONS:-30}" "$PY" "$GPU_DIR/versions.py" "$RES/env.json"
    local ember_ok
    ember_ok=$(tail -n 1 "$RES/phases.tsv" | cut -f 2)

    if [[ "$ember_ok" != 0 ]]; then
        echo "Ember is not importable with its compiled extension: build the wheel (maturin build --release -o .whl)" \
            "and copy .whl/ next to this tree. Skipping the phases that need it."
        for p in tests kernels-norm-rope kernels-ce e2e; do skip "$p" "ember not importable"; done
    else
        # 2. kernel tests: with CUDA the Triton paths and the gpu-marked tests run
        phase tests "${EMBER_CHECK_LIMIT_TESTS:-110}" \
            "$PY" -m pytest tests/test_kernel_*.py tests/test_model.py -q -p no:cacheprovider \
            --junitxml="$RES/tests-junit.xml"
        # 3. kernel benchmarks (one file per op) in two sessions, the elementwise ops and the losses,
        #    so that one overrun keeps the other's figures
        bench_phase kernels-norm-rope "${EMBER_CHECK_LIMIT_NORM_ROPE:-120}" \
            benchmarks/test_kernel_rms_norm.py benchmarks/test_kernel_rotary.py benchmarks/test_kernel_swiglu.py
        bench_phase kernels-ce "${EMBER_CHECK_LIMIT_CE:-90}" \
            benchmarks/test_kernel_cross_entropy.py benchmarks/test_kernel_fused_linear_cross_entropy.py
        # 4. end-to-end throughput: ember (compiled, eager) and HF transformers, in one session
        bench_phase e2e "${EMBER_CHECK_LIMIT_E2E:-150}" benchmarks/test_e2e.py
    fi

    # 5. the summary, last
    echo
    echo "phases done after $((SECONDS - START)) s"
    timeout -s INT -k 5 60 "$PY" "$GPU_DIR/summary.py" "$RES"
    # Exit status: 0 when every phase ran (or had nothing to do) and succeeded.
    awk -F '\t' '$2 != "0" && $2 != "skip" { bad = 1 } END { exit bad }' "$RES/phases.tsv"
}

main 2>&1 | tee "$RES/check.log"
exit "${PIPESTATUS[0]}"
