#!/usr/bin/env bash
# Build what the GPU checks use beyond the core bundle on a GPU machine with no package
# index, for its Python 3.12, as two bundles so that a call carries only what it needs:
#   .device/pytest.tar.xz  pytest-timeout and pytest-xdist (gpu_check's per-test timeout and
#                          parallel workers), a few hundred KB;
#   .device/extras.tar.xz  diffusers (the diffusers GPU tests; the machine has its other
#                          needs: huggingface-hub, safetensors, ..., and matplotlib) and
#                          thu-ml/SLA's `sparse_linear_attention` package (a baseline), from a
#                          checkout of it.
#
#   usage: bash benchmarks/device_extras.sh PATH/TO/thu-ml-SLA [OUTDIR]   (default: .device)
set -euo pipefail
sla="${1:?give the path of a thu-ml/SLA checkout}"
out="${2:-.device}"
[ -f "$sla/sparse_linear_attention/__init__.py" ] || { echo "no sparse_linear_attention in $sla"; exit 2; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
plat=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
      --platform any)
download() {  # download DIR ARGS...: wheels for the GPU machine's Python
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$@"
}
download "$tmp/whl" --no-deps "diffusers>=0.35,<0.43" importlib_metadata
download "$tmp/pytest-whl" --no-deps pytest-timeout pytest-xdist execnet
unpack() {  # unpack WHEELDIR SITEDIR
  mkdir -p "$2"
  for w in "$1"/*.whl; do
    # numpy comes with the machine's torch; a second copy would shadow it.
    case "$(basename "$w")" in numpy-*) continue ;; esac
    python3 -m zipfile -e "$w" "$2"
  done
  chmod -R u+w,a+rX "$2"
}
unpack "$tmp/whl" "$tmp/site"
cp -r "$sla/sparse_linear_attention" "$tmp/site/"
chmod -R u+w,a+rX "$tmp/site"
unpack "$tmp/pytest-whl" "$tmp/pytest-site"
mkdir -p "$out"
tar -C "$tmp/site" -cf - . | xz -6 -T0 > "$out/extras.tar.xz"
tar -C "$tmp/pytest-site" -cf - . | xz -6 -T0 > "$out/pytest.tar.xz"
ls -la "$out/extras.tar.xz" "$out/pytest.tar.xz"
