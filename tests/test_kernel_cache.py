"""Where compiled kernels go: one directory per arch for every path that compiles (the
operators, warm, tune, kernels, demo: all through `kernels.compiled`), given to TileLang
only around sla-tl's own compiles, never through the process's environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tilelang.env import env

from sla_tl import kernel_cache, kernels
from sla_tl.kernels import KernelSpec


def _forced_cache_dir() -> object:
    return type(env).__dict__["TILELANG_CACHE_DIR"]._forced_value


def test_one_directory_per_arch_unless_the_user_names_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TILELANG_CACHE_DIR", raising=False)
    assert kernel_cache.kernel_directory("sm_90a") == tmp_path / "kernels" / "sm_90a"
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "mine"))
    assert kernel_cache.kernel_directory("sm_90a") == tmp_path / "mine"


def test_tilelang_gets_the_directory_only_while_sla_tl_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TILELANG_CACHE_DIR", raising=False)
    before = _forced_cache_dir()
    with pytest.raises(RuntimeError, match="a failed compile"):
        with kernel_cache.compiling_for("sm_90a") as directory:
            assert directory == tmp_path / "kernels" / "sm_90a" and directory.is_dir()
            assert env.TILELANG_CACHE_DIR == str(directory)
            raise RuntimeError("a failed compile")
    assert _forced_cache_dir() == before
    assert "TILELANG_CACHE_DIR" not in os.environ
    # A directory the user names is TileLang's own variable: nothing is forced over it.
    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "mine"))
    with kernel_cache.compiling_for("sm_90a") as directory:
        assert directory == tmp_path / "mine" and _forced_cache_dir() == before
        assert env.TILELANG_CACHE_DIR == str(tmp_path / "mine")


def test_a_compile_lands_in_the_arch_directory_and_leaves_the_environment_alone(
        tmp_path, monkeypatch):
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TILELANG_CACHE_DIR", raising=False)
    environment, forced = dict(os.environ), _forced_cache_dir()
    # A pooling kernel no other test builds (block 48, float16, (B, L, H, D)): compiled here.
    spec = KernelSpec("pool", (("dim", 64), ("block", 48), ("dtype", "float16"),
                               ("layout", "bshd")), "sm_90a")
    kernels.compiled.__wrapped__(spec)
    built = list(Path(tmp_path, "kernels", "sm_90a").rglob("*.so"))
    assert built, "nothing compiled into the arch's directory"
    assert dict(os.environ) == environment
    assert _forced_cache_dir() == forced
