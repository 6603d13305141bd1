"""The arch registry: each kernel folder of schedules/ declares its arch in one place, a new
folder is found by looking, and an arch without kernels, or without a kernel a plan needs,
is refused by name."""

from __future__ import annotations

import sys
import textwrap

import pytest

import sla_tl.schedules as schedules_package
from sla_tl import kernels, targets
from sla_tl.plan import kernels_for
from sla_tl.schedules import archs
from sla_tl.schedules.sm90 import ARCH as SM90
from sla_tl.settings import Settings


def test_each_folder_declares_its_arch_with_a_kernel_table():
    assert archs.arch_packages() == tuple(arch.name for arch in archs.all_archs())
    assert SM90 in archs.with_kernels()
    for arch in archs.with_kernels():
        assert arch.target in arch.spellings and arch.name in arch.spellings
        for kind, definition in arch.kernels.items():
            assert callable(definition.program), kind
            if definition.tuning is not None:
                sizes = dict(dim=128, block_q=arch.block_q[-1], block_kv=arch.block_kv[0])
                defaults = kernels.default_knobs(arch.target, kind, **sizes)
                space = kernels.search_space(arch.target, kind, **sizes)
                assert set(space) <= set(defaults), kind


def test_a_users_arch_names_resolve_and_others_are_refused():
    for name in SM90.spellings:
        assert targets.arch_named(name) is SM90
    with pytest.raises(ValueError, match="arch must be one of sm90, sm_90, sm_90a"):
        targets.arch_named("sm_100a")
    with pytest.raises(NotImplementedError, match="kernels for sm_90 only; NVIDIA A100"):
        targets.arch_of_capability((8, 0), "NVIDIA A100")


def test_block_sizes_come_from_the_arch():
    targets.check_block_sizes(SM90, SM90.block_q[0], SM90.block_kv[-1])
    with pytest.raises(ValueError, match=r"block_q must be one of \(64, 128\) on CUDA; got 32"):
        targets.check_block_sizes(SM90, 32, 64)


@pytest.fixture
def extra_folder(tmp_path, monkeypatch):
    """A function that adds a kernel folder `sm80` with the given kernel table (source)."""

    def add(table: str) -> None:
        folder = tmp_path / "sm80"
        folder.mkdir()
        (folder / "__init__.py").write_text(textwrap.dedent(f"""
            from sla_tl.schedules.archs import Arch
            from sla_tl.schedules.sm90 import ARCH as SM90

            ARCH = Arch(name="sm80", target="sm_80", spellings=("sm80", "sm_80"),
                        capabilities=((8, 0),), shared_memory_bytes=163 * 1024,
                        block_q=(64,), block_kv=(64,), kernels={table})
        """))
        monkeypatch.setattr(schedules_package, "__path__",
                            [*schedules_package.__path__, str(tmp_path)])
        monkeypatch.delitem(sys.modules, "sla_tl.schedules.sm80", raising=False)
        archs.all_archs.cache_clear()

    yield add
    archs.all_archs.cache_clear()
    sys.modules.pop("sla_tl.schedules.sm80", None)


def test_a_new_folder_is_an_arch_refused_while_it_has_no_kernels(extra_folder):
    extra_folder("{}")
    assert archs.arch_packages() == ("sm80", "sm90")
    with pytest.raises(NotImplementedError, match=r"arch sm80 \(sm_80\) declares no kernels"):
        targets.arch_named("sm_80")
    assert archs.for_capability((8, 0)) is None
    assert "sm_80" not in archs.spellings()


def test_a_plan_names_the_kernel_an_arch_lacks(extra_folder):
    extra_folder('{"pool": SM90.kernels["pool"]}')
    assert targets.arch_named("sm80").kernels.keys() == {"pool"}
    with pytest.raises(NotImplementedError, match=r"arch sm80 \(sm_80\) has no key_pass kernel"):
        kernels_for("sm_80", 64, "bfloat16", Settings(block_q=64, block_kv=64))
