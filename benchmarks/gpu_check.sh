#!/usr/bin/env bash
# The whole GPU check in one call, for a GPU machine with torch but without tilelang/optuna:
#   1. unpack .device/site.tar.xz (made by the device-bundle tool) if it is there;
#   2. install this project without dependencies;
#   3. run the tests marked `gpu`;
#   4. run the forward and backward breakdowns and the side-by-side benchmark (topk 0.05 and
#      0.10; extra arguments go to it) at the Wan2.1-1.3B shape.
# Logs and results go to $OUT (default ./out). Set SLA_TL_COMMIT when the tree has no .git.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1 TILELANG_PRINT_ON_COMPILATION=0
if [ -f .device/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .device/site.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
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
