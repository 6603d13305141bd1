"""A built wheel holds the whole library: every package, every kernel module, the data files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from sla_tl.static_check import RECORD_FILE

ROOT = Path(__file__).parents[1]
tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_packages() -> set[str]:
    """Every directory with an __init__.py under the mapped source roots, as a package name."""
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    names = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            names.add(".".join([package, *relative.parts]))
    return names


def test_every_source_package_is_packaged():
    assert _source_packages() == set(_pyproject()["tool"]["setuptools"]["packages"])


def test_built_wheel_installs_and_imports_every_kernel_module(tmp_path):
    """Build the wheel, install it alone into a fresh environment that borrows this one's
    dependencies, and import the library and every kernel module from it."""
    # Built from a copy of the files git would commit: a build/ folder left in the work tree
    # would slip its stale files into the wheel.
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for name in listed.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("sla_tl-*.whl")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(fresh),
                                                      "platbase": str(fresh)}))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    # This environment's packages (torch, tilelang, ...) without its editable sla_tl: a path
    # line in a .pth file adds the directory but runs none of the .pth files inside it.
    (target / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    modules = sorted(
        "sla_tl.schedules." + ".".join(p.relative_to(ROOT / "schedules").with_suffix("").parts)
        for p in (ROOT / "schedules").rglob("*.py") if p.name != "__init__.py")
    # Every arch's static record, and the benchmarks' baselines.
    data_files = [str(p.relative_to(ROOT)) for p in (ROOT / "schedules").glob(f"*/{RECORD_FILE}")]
    data_files.append("benchmarks/baselines/NVIDIA-H200.json")
    script = textwrap.dedent(f"""
        import importlib, os, sla_tl
        assert sla_tl.__file__.startswith({str(target)!r}), sla_tl.__file__
        for name in {modules!r}:
            importlib.import_module(name)
        here = os.path.dirname(sla_tl.__file__)
        for data in {data_files!r}:
            assert os.path.isfile(os.path.join(here, data)), data
        print(len({modules!r}), "kernel modules")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(fresh / "bin" / "python"), "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(modules)} kernel modules" in result.stdout
