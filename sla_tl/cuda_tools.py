"""The CUDA command-line tools the static gate runs: nvcc (with ptxas's resource report) to
build a kernel's cubin the way TileLang builds it, and cuobjdump to disassemble it.

nvcc is TileLang's (from CUDA_HOME). cuobjdump, and nvdisasm which it runs, are not in every
CUDA install (the CPU machines' toolkit lacks them); the `nvidia-cuda-cuobjdump` and
`nvidia-cuda-nvdisasm` packages from PyPI (in the `dev` extra) provide them. Each tool is
looked up through its package's installed files, then in CUDA_HOME/bin, then on PATH.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from typing import NamedTuple

# Tool -> the PyPI package that provides it.
PACKAGES = {"cuobjdump": "nvidia-cuda-cuobjdump", "nvdisasm": "nvidia-cuda-nvdisasm"}


class Build(NamedTuple):
    """A compiled cubin's ptxas report and its disassembly."""

    ptxas_report: str
    sass: str


def nvcc() -> str:
    """The nvcc TileLang compiles with."""
    from tilelang.contrib.nvcc import get_nvcc_compiler

    return get_nvcc_compiler()


@functools.cache
def version(executable: str) -> str:
    """A CUDA tool's version line ("Cuda compilation tools, release 13.0, V13.0.88")."""
    result = subprocess.run([executable, "--version"], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if "release" in line]
    if result.returncode or not lines:
        raise RuntimeError(f"{executable} --version failed: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    return lines[-1].strip()


def _packaged_tool(package: str, name: str) -> str | None:
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == name:
            path = str(file.locate())
            if os.access(path, os.X_OK):
                return path
    return None


@functools.cache
def tool(name: str) -> str:
    """Path of a disassembly tool ("cuobjdump", "nvdisasm"); RuntimeError saying how to
    install it where none is found."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    in_cuda_home = os.path.join(cuda_home, "bin", name)
    found = (_packaged_tool(PACKAGES[name], name)
             or (in_cuda_home if os.access(in_cuda_home, os.X_OK) else None)
             or shutil.which(name))
    if not found:
        raise RuntimeError(f"{name} not found (not in the {PACKAGES[name]} package, "
                           f"{cuda_home}/bin or PATH): pip install {PACKAGES[name]}")
    return found


def disassemble(cubin_path: str) -> str:
    """`cuobjdump -sass` of a cubin (cuobjdump runs nvdisasm, found as `tool` finds it)."""
    nvdisasm_directory = os.path.dirname(tool("nvdisasm"))
    environment = {**os.environ,
                   "PATH": nvdisasm_directory + os.pathsep + os.environ.get("PATH", "")}
    dumped = subprocess.run([tool("cuobjdump"), "-sass", cubin_path], capture_output=True,
                            text=True, env=environment)
    if dumped.returncode or "Function :" not in dumped.stdout:
        raise RuntimeError(f"cuobjdump -sass failed:\n{(dumped.stderr or dumped.stdout)[-3000:]}")
    return dumped.stdout


def nvcc_command(source_path: str, cubin_path: str, arch: str, flags: list[str]) -> list[str]:
    """The nvcc command TileLang runs for a kernel (tilelang.contrib.nvcc.compile_cuda with
    the options of its CUDA backend), with `flags` the kernel's own, plus ptxas's report."""
    import tilelang.env as tl_env
    from tilelang.contrib.nvcc import get_cplus_compiler

    number = arch.removeprefix("sm_")
    return [nvcc(), f"-ccbin={get_cplus_compiler()}", "--cubin", "-O3", "-lineinfo",
            "-gencode", f"arch=compute_{number},code=sm_{number}", "-std=c++20",
            "-I" + tl_env.TILELANG_TEMPLATE_PATH, "-I" + tl_env.CUTLASS_INCLUDE_DIR,
            *flags, "-w", "-Xptxas", "-v", "-o", cubin_path, source_path]


def build(source: str, arch: str, flags: list[str]) -> Build:
    """Compile CUDA `source` for `arch` with `flags` and disassemble the cubin.
    RuntimeError with the tools' output where either fails."""
    with tempfile.TemporaryDirectory() as tmp:
        source_path = os.path.join(tmp, "kernel.cu")
        cubin_path = os.path.join(tmp, "kernel.cubin")
        with open(source_path, "w") as f:
            f.write(source)
        compiled = subprocess.run(nvcc_command(source_path, cubin_path, arch, flags),
                                  capture_output=True, text=True)
        if compiled.returncode:
            raise RuntimeError(f"nvcc failed:\n{(compiled.stdout + compiled.stderr)[-3000:]}")
        return Build(compiled.stdout + compiled.stderr, disassemble(cubin_path))
