# Sourced by the GPU scripts: the environment of a GPU machine that has torch but not
# tilelang/optuna. Unpacks, where they are there, .device/site.tar.xz (made by the
# device-bundle tool), .device/pytest.tar.xz and .device/extras.tar.xz (made by
# device_extras.sh: pytest's plugins; matplotlib, diffusers and thu-ml/SLA) onto the Python
# path and .device/kernels.tar.xz (made by kernel_bundle.sh: kernels compiled ahead for
# sm_90a) into the kernel cache at $SLA_TL_CACHE_DIR (default /tmp/sla_tl_cache); installs
# this project without dependencies, and makes $OUT (default ./out).
OUT="${OUT:-out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1 TILELANG_PRINT_ON_COMPILATION=0
for bundle in site pytest extras; do
  if [ -f ".device/$bundle.tar.xz" ]; then
    mkdir -p "/tmp/$bundle"
    [ -f "/tmp/$bundle/.unpacked" ] || { tar -xJf ".device/$bundle.tar.xz" -C "/tmp/$bundle" &&
      touch "/tmp/$bundle/.unpacked"; }
    export PYTHONPATH="/tmp/$bundle:${PYTHONPATH:-}"
  fi
done
if [ -f .device/kernels.tar.xz ] && [ -z "${TILELANG_CACHE_DIR:-}" ]; then
  export SLA_TL_CACHE_DIR="${SLA_TL_CACHE_DIR:-/tmp/sla_tl_cache}"
  mkdir -p "$SLA_TL_CACHE_DIR/kernels/sm_90a"
  tar -xJf .device/kernels.tar.xz -C "$SLA_TL_CACHE_DIR/kernels/sm_90a" || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
