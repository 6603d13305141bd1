#!/usr/bin/env bash
# The whole GPU check, for a GPU machine with torch but without tilelang/optuna:
#   1. unpack the bundled packages and install this project (device_env.sh);
#   2. tests:       the tests marked `gpu` (each stopped after $TEST_TIMEOUT s, default 240:
#                   a kernel that hangs fails its test instead of the whole call), of
#                   $TESTS (default tests; name files to split the suite over calls of the
#                   device's 10-minute limit), on $TEST_WORKERS pytest-xdist workers
#                   (default 1: each test already compiles its kernels on every core, and
#                   8 workers on the H200 machine's 16 cores ran no more tests in a call);
#   3. breakdowns:  the forward and backward breakdowns at the Wan2.1-1.3B shape (the forward
#                   also with every fusion serving it, with the sort, and with the sort and
#                   every fusion serving that), and the GPU time of each kernel of a forward
#                   and a forward+backward as called (`kernel_profile`), and of a forward
#                   with every fusion;
#   4. bench:       `sla-tl bench` over $SECTIONS of the suite (default all) with JSON and plot;
#   5. gate:        `sla-tl bench --check benchmarks/baselines` (the throughput gate).
# Not by default: baseline: a new baseline, cuDNN and sla-tl over the suite, kernel timing,
#                           at $OUT/baseline.json (to copy to benchmarks/baselines/<GPU>.json).
#                 ulysses:  Ulysses sequence parallelism on every visible GPU (2 or more) against
#                           one GPU at the Wan2.1-14B 720p shape, at $OUT/ulysses.json.
#                 variants: every forward, dQ, query-pass and key-pass schedule and alternative
#                           timed alone (`forward_variants`, also with K and V L2-resident,
#                           `dq_variants`, `query_pass_variants`, `key_pass_variants`);
#                 counters: Nsight Compute's full set of counters for the kernels of the steps
#                           in $COUNTER_STEPS (default the forward's and the backward's GEMM
#                           kernels, `step_counters`), one launch each: the details page at
#                           $OUT/counters_details.txt, each SASS line's samples at
#                           $OUT/counters_sass.csv;
#                 quality:  `sla-tl quality --size gpu` for the seeds in $QUALITY_SEEDS (default
#                           0; ~5 minutes a seed), at $OUT/quality_seeds_<seeds>.json; merge the
#                           parts with `sla-tl quality --from A.json B.json ... --plot q.png`.
# STEPS picks steps (default "tests breakdowns bench gate"); extra arguments go to the bench.
# Logs and results go to $OUT (default ./out). Set SLA_TL_COMMIT when the tree has no .git.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
STEPS="${STEPS:-tests breakdowns bench gate}"

status=0
step() {  # step NAME COMMAND...: run it if NAME is in $STEPS, log to $OUT/NAME.log
  local name=$1; shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
breakdowns() {
  python3 -m sla_tl.benchmarks.forward_breakdown --out "$OUT/forward_breakdown.json" &&
    python3 -m sla_tl.benchmarks.forward_breakdown --all-fusions \
      --out "$OUT/forward_breakdown_fused.json" &&
    python3 -m sla_tl.benchmarks.forward_breakdown --selection sort \
      --out "$OUT/forward_breakdown_sorted.json" &&
    python3 -m sla_tl.benchmarks.forward_breakdown --selection sort --all-fusions \
      --out "$OUT/forward_breakdown_sorted_fused.json" &&
    python3 -m sla_tl.benchmarks.backward_breakdown --out "$OUT/backward_breakdown.json" &&
    python3 -m sla_tl.benchmarks.backward_breakdown --fusion key_major_kernel \
      --out "$OUT/backward_breakdown_key_major.json" &&
    python3 -m sla_tl.benchmarks.kernel_profile --out "$OUT/kernel_profile_fwd.json" &&
    python3 -m sla_tl.benchmarks.kernel_profile --mode fwd+bwd \
      --out "$OUT/kernel_profile_fwdbwd.json" &&
    python3 -m sla_tl.benchmarks.kernel_profile --all-fusions \
      --out "$OUT/kernel_profile_fwd_fused.json"
}
workers=()
[ "${TEST_WORKERS:-1}" -gt 1 ] && workers=(-n "$TEST_WORKERS")
export SLA_TL_FAILURE_LOG="${SLA_TL_FAILURE_LOG:-$OUT/test_failures.log}"
step tests python3 -m pytest -m gpu -q -p no:cacheprovider --timeout "${TEST_TIMEOUT:-240}" \
  "${workers[@]}" ${TESTS:-tests}
variants() {
  python3 -m sla_tl.benchmarks.forward_variants --out "$OUT/forward_variants.json" &&
    python3 -m sla_tl.benchmarks.forward_variants --lut shared \
      --out "$OUT/forward_variants_shared.json" &&
    python3 -m sla_tl.benchmarks.dq_variants --out "$OUT/dq_variants.json" &&
    python3 -m sla_tl.benchmarks.query_pass_variants --out "$OUT/query_pass_variants.json" &&
    python3 -m sla_tl.benchmarks.key_pass_variants --out "$OUT/key_pass_variants.json"
}
counters() {
  local ncu report=/tmp/counters
  ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)"
  [ -n "$ncu" ] || { echo "no ncu on this machine"; return 1; }
  # The clocks are left as they are (the device notes ask it of every measurement).
  "$ncu" --profile-from-start off --clock-control none --set full -f -o "$report" \
    python3 -m sla_tl.benchmarks.step_counters \
    ${COUNTER_STEPS:+--steps "$COUNTER_STEPS"} &&
    "$ncu" -i "$report.ncu-rep" --page details > "$OUT/counters_details.txt" &&
    "$ncu" -i "$report.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/counters_sass.csv"
}
step breakdowns breakdowns
step counters counters
step variants variants
step bench python3 -m sla_tl.cli bench --sections "${SECTIONS:-shapes,sparsity,length}" \
  --out "$OUT/bench.json" --plot "$OUT/bench.png" "$@"
step baseline python3 -m sla_tl.cli bench --timing kernels --systems sdpa_cudnn,sla_tl \
  --out "$OUT/baseline.json"
step ulysses python3 -m torch.distributed.run --nproc-per-node \
  "$(python3 -c 'import torch; print(torch.cuda.device_count())')" \
  -m sla_tl.benchmarks.ulysses --out "$OUT/ulysses.json"
step gate python3 -m sla_tl.cli bench --check benchmarks/baselines --tolerance 0.05 \
  --out "$OUT/gate.json"
step quality python3 -m sla_tl.cli quality --size gpu --seeds "${QUALITY_SEEDS:-0}" \
  --out "$OUT/quality_seeds_${QUALITY_SEEDS:-0}.json"
exit $status
