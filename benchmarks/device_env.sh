# Sourced by the GPU scripts: the environment of a GPU machine that has torch but not
# tilelang/optuna. Unpacks .device/site.tar.xz (made by the device-bundle tool) if it is
# there, installs this project without dependencies, and makes $OUT (default ./out).
OUT="${OUT:-out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1 TILELANG_PRINT_ON_COMPILATION=0
if [ -f .device/site.tar.xz ]; then
  mkdir -p /tmp/site
  [ -d /tmp/site/tilelang ] || tar -xJf .device/site.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
