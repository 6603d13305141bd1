# Sourced by the GPU scripts: the environment of a GPU machine that has torch but not
# tilelang/optuna. Unpacks .device/site.tar.xz (made by the device-bundle tool) and
# .device/extras.tar.xz (made by device_extras.sh: matplotlib and thu-ml/SLA) where they
# are there, installs this project without dependencies, and makes $OUT (default ./out).
OUT="${OUT:-out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1 TILELANG_PRINT_ON_COMPILATION=0
for bundle in site extras; do
  if [ -f ".device/$bundle.tar.xz" ]; then
    mkdir -p "/tmp/$bundle"
    [ -f "/tmp/$bundle/.unpacked" ] || { tar -xJf ".device/$bundle.tar.xz" -C "/tmp/$bundle" &&
      touch "/tmp/$bundle/.unpacked"; }
    export PYTHONPATH="/tmp/$bundle:${PYTHONPATH:-}"
  fi
done
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
