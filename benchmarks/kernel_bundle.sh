#!/usr/bin/env bash
# Pack this machine's compiled sm_90a kernels (`sla_tl.kernel_cache`) into
# .device/kernels.tar.xz, for a GPU machine to load instead of compiling them again:
# TileLang keys a kernel by its text, target, flags and version, not by the machine, so a
# kernel compiled here for sm_90a is the one the GPU machine would build. device_env.sh
# unpacks it into that machine's cache. Fill the cache first, e.g. with
# `python -m tests.compile_ahead` (every kernel of the GPU tests) or `sla-tl warm`.
#
#   usage: bash benchmarks/kernel_bundle.sh [OUTDIR]   (default: .device)
set -euo pipefail
out="$(realpath -m "${1:-.device}")"
cache="$(python3 -c 'from sla_tl.kernel_cache import kernel_directory; print(kernel_directory("sm_90a"))')"
[ -d "$cache" ] || { echo "no compiled kernels at $cache"; exit 2; }
mkdir -p "$out"
# Each entry under <version>/linux-x86_64 is a whole kernel (sources, parameters and a
# library holding its cubin); TileLang's cross-host cubin cache (<version>/cuda-binaries)
# serves compiles only, and is left out to keep the bundle small (~25 KB a kernel).
(cd "$cache" && tar -cf - */linux-x86_64) | xz -6 -T0 > "$out/kernels.tar.xz"
ls -la "$out/kernels.tar.xz"
