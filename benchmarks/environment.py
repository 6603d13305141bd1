"""What a benchmark result must carry to be comparable: GPU, versions, commit and date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit under test: $SLA_TL_COMMIT if set (a copied tree has no .git), else git's HEAD."""
    if os.environ.get("SLA_TL_COMMIT"):
        return os.environ["SLA_TL_COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def _driver_version() -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip().splitlines()[0]


def describe_environment() -> dict:
    """GPU name, driver, library versions, git commit and UTC date of this run."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "driver": _driver_version() if gpu else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "tilelang": _version("tilelang"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
