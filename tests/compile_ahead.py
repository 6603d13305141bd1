"""Compile every kernel the GPU test modules build (their `kernels_ahead()`), for the arch
they name, on any machine: no GPU is needed, so a kernel that does not compile shows here
before a GPU session, and a warm cache is left behind.

    python -m tests.compile_ahead [--workers N]

One line per kernel as it finishes; then the failures, one line each; exit 1 if any.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

import pytest

from sla_tl.parallel import compile_ahead

from . import __path__ as TESTS_PATH


def gpu_modules_kernels() -> tuple[list, list[str]]:
    """The kernels of every `tests/test_gpu_*` module that has `kernels_ahead`, and the
    modules that could not be imported here (with the reason)."""
    specs, skipped = [], []
    for info in sorted(pkgutil.iter_modules(TESTS_PATH), key=lambda m: m.name):
        if not info.name.startswith("test_gpu_"):
            continue
        try:
            module = importlib.import_module(f"tests.{info.name}")
        except pytest.skip.Exception as reason:  # e.g. an optional package this machine lacks
            skipped.append(f"{info.name}: {reason}")
            continue
        if hasattr(module, "kernels_ahead"):
            specs += module.kernels_ahead()
    return specs, skipped


def main(argv: list[str] | None = None) -> int:
    """Compile them all; 1 if any fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None,
                        help="processes at a time (default: every core)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1; got {args.workers}")
    specs, skipped = gpu_modules_kernels()
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    unique = list(dict.fromkeys(specs))
    print(f"{len(unique)} kernels", file=sys.stderr, flush=True)
    start = time.perf_counter()
    failures = compile_ahead(unique, args.workers, progress=True)
    print(f"compiled in {time.perf_counter() - start:.0f} s; {len(failures)} failed",
          file=sys.stderr)
    for failure in failures:
        print("FAILED " + " | ".join(failure.splitlines())[:1000], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
