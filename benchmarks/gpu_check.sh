#!/usr/bin/env bash
# The whole GPU check in one call, for a GPU machine with torch but without tilelang/optuna:
#   1. unpack the bundled tilelang/optuna and install this project (device_env.sh);
#   2. run the tests marked `gpu`;
#   3. run the forward and backward breakdowns and the side-by-side benchmark (topk 0.05 and
#      0.10; extra arguments go to it) at the Wan2.1-1.3B shape.
# Logs and results go to $OUT (default ./out). Set SLA_TL_COMMIT when the tree has no .git.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"

status=0
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 -m sla_tl.benchmarks.forward_breakdown --out "$OUT/forward_breakdown.json" 2>&1 \
  | tee "$OUT/forward_breakdown.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 -m sla_tl.benchmarks.backward_breakdown --out "$OUT/backward_breakdown.json" 2>&1 \
  | tee "$OUT/backward_breakdown.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 -m sla_tl.benchmarks.side_by_side --topk 0.05,0.10 --out "$OUT/side_by_side.json" "$@" 2>&1 \
  | tee "$OUT/side_by_side.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
