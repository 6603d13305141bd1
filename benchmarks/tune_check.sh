#!/usr/bin/env bash
# A real tune on the GPU in hand, then the tuned schedule against the default in one run.
# Writes logs and JSON to $OUT (default ./out). Extra arguments go to `sla-tl tune`.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export SLA_TL_CACHE_DIR="${SLA_TL_CACHE_DIR:-/tmp/sla_tl_cache}"
status=0
python3 -m sla_tl.cli tune --arch sm90 --trials "${TRIALS:-30}" "$@" 2>&1 | tee "$OUT/tune.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 -m sla_tl.benchmarks.tuned_vs_default --out "$OUT/tuned_vs_default.json" 2>&1 \
  | tee "$OUT/tuned_vs_default.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp "$SLA_TL_CACHE_DIR/tuned_configs.json" "$OUT/" 2>/dev/null
exit $status
