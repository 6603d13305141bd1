"""A forged routing never gets a wrong answer: on the CPU it is refused naming the field and
row; the device-side check (torch ops, no host synchronisation) flags exactly the rows the
full check refuses; the block maps built from it never index out of range."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import reference, routing_check
from sla_tl import routing as routing_module
from sla_tl.routing import Routing

from .helpers import random_projection, random_qkv, relative_error

BLOCK = 16
LQ, LK = 70, 100  # Mq = 5 query blocks, Nk = 7 key blocks
N_KV = 7


@pytest.fixture
def problem(generator):
    q, k, v = random_qkv(2, 3, LQ, LK, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    routing = sla_tl.route(q, k, 0.3, 0.3, BLOCK, BLOCK)  # 2 critical, 2 negligible per row
    return q, k, v, w, b, routing


def _attend(problem, routing, linear="marginal"):
    q, k, v, w, b, _ = problem
    return sla_tl.attention_with_routing(q, k, v, routing, w, b, block_q=BLOCK, block_kv=BLOCK,
                                         linear=linear)


def _edit(routing: Routing, field: str, row: tuple, value) -> Routing:
    tensor = getattr(routing, field).clone()
    tensor[row] = value
    return routing._replace(**{field: tensor})


def _forgeries(routing: Routing) -> dict[str, tuple[Routing, str]]:
    """One forged routing per kind of fault, each at row (1, 2, 3), with the message it gets."""
    row = (1, 2, 3)
    lut, neg = routing.lut[row].tolist(), routing.neg_lut[row].tolist()
    return {
        "count above the width": (_edit(routing, "lut_count", row, 3),
                                  r"lut_count must lie in \[0, 2\] \(the width of lut\); row "
                                  r"\(b, h, i\) = \(1, 2, 3\) has 3"),
        "count above the key blocks": (_edit(routing, "lut_count", row, N_KV + 1),
                                       r"lut_count must lie in \[0, 2\]"),
        "negative count": (_edit(routing, "lut_count", row, -1),
                           r"lut_count must lie in \[0, 2\]"),
        "negative negligible count": (_edit(routing, "neg_count", row, -5),
                                      r"neg_count must lie in \[0, 2\]"),
        "entry past the key blocks": (_edit(routing, "lut", row + (0,), N_KV),
                                      r"lut entries must lie in \[0, 7\) within each row's count; "
                                      r"row \(b, h, i\) = \(1, 2, 3\) lists"),
        "negative entry": (_edit(routing, "neg_lut", row + (1,), -1),
                           r"neg_lut entries must lie in \[0, 7\)"),
        "block twice in lut": (_edit(routing, "lut", row + (1,), lut[0]),
                               rf"lut lists key block {lut[0]} more than once in row "
                               r"\(b, h, i\) = \(1, 2, 3\)"),
        "block twice in neg_lut": (_edit(routing, "neg_lut", row + (0,), neg[1]),
                                   rf"neg_lut lists key block {neg[1]} more than once"),
        "block in lut and neg_lut": (_edit(routing, "neg_lut", row + (0,), lut[1]),
                                     rf"key block {lut[1]} is in both lut and neg_lut"),
    }


FORGERIES = ["count above the width", "count above the key blocks", "negative count",
             "negative negligible count", "entry past the key blocks", "negative entry",
             "block twice in lut", "block twice in neg_lut", "block in lut and neg_lut"]


@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_routing_is_refused_on_the_cpu(problem, kind):
    forged, message = _forgeries(problem[-1])[kind]
    q, k, v, w, b, _ = problem
    with pytest.raises(ValueError, match=message):
        _attend(problem, forged)
    with pytest.raises(ValueError, match=message):
        sla_tl.check_routing(q, k, forged, block_q=BLOCK, block_kv=BLOCK)
    settings = (BLOCK, BLOCK, "softmax", "marginal", None, "bhsd")
    with pytest.raises(ValueError, match=message):
        torch.ops.sla.attention_fwd(q, k, v, *forged, w, b, None, *settings)
    outputs = torch.ops.sla.attention_fwd(q, k, v, *problem[-1], w, b, None, *settings)
    with pytest.raises(ValueError, match=message):
        torch.ops.sla.attention_bwd(torch.ones_like(q), q, k, v, *outputs, *forged, w, b,
                                    None, *settings)


@pytest.mark.parametrize("kind", FORGERIES)
def test_device_side_check_flags_exactly_the_forged_row(problem, kind):
    forged, _ = _forgeries(problem[-1])[kind]
    listed = routing_module.listing(forged, N_KV, negligible=True)
    faults = routing_module.row_faults(forged, listed, negligible=True)
    expected = torch.zeros_like(faults)
    expected[1, 2, 3] = True
    assert torch.equal(faults, expected)
    clean = problem[-1]
    clean_listed = routing_module.listing(clean, N_KV, negligible=True)
    assert not routing_module.row_faults(clean, clean_listed, negligible=True).any()


def _random_forgery(routing: Routing, generator: torch.Generator) -> Routing:
    """Every field overwritten with small integers around the valid range, in random rows."""
    fields = {}
    for name, tensor in routing._asdict().items():
        noise = torch.randint(-2, N_KV + 2, tensor.shape, generator=generator, dtype=torch.int32)
        pick = torch.rand(tensor.shape, generator=generator) < 0.15
        fields[name] = torch.where(pick, noise, tensor)
    return Routing(**fields)


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_device_side_flags_agree_with_the_full_check_row_by_row(problem, generator, linear):
    negligible = linear == "marginal"
    for _ in range(5):
        forged = _random_forgery(problem[-1], generator)
        faults = routing_module.row_faults(forged, routing_module.listing(forged, N_KV, negligible),
                                          negligible)
        for row in torch.cartesian_prod(*(torch.arange(n) for n in faults.shape)).tolist():
            one_row = Routing(*(t[tuple(row)][None, None, None] for t in forged))
            try:
                routing_check.check_values(one_row, N_KV, linear)
                refused = False
            except ValueError:
                refused = True
            assert refused == bool(faults[tuple(row)]), (row, [t[tuple(row)] for t in forged])


def test_entries_past_a_rows_count_are_ignored(problem, generator):
    routing = problem[-1]
    count = routing.lut_count.clone()
    count[0, 1] = 1
    trimmed = routing._replace(lut_count=count)
    # Junk (out of range, repeated) past the counted prefix is allowed and changes nothing.
    junk = trimmed.lut.clone()
    junk[0, 1, :, 1] = torch.tensor([-7, 99, 0, 0, 3], dtype=torch.int32)
    out = _attend(problem, trimmed._replace(lut=junk))
    q, k, v, w, b, _ = problem
    expected = reference.attention_with_routing(q, k, v, trimmed, w, b, BLOCK, BLOCK, "softmax",
                                                "marginal").out
    assert relative_error(out, expected) < 1e-12


def test_any_order_of_the_counted_entries_is_valid(problem):
    routing = problem[-1]
    reversed_routing = routing._replace(lut=routing.lut.flip(-1).contiguous(),
                                        neg_lut=routing.neg_lut.flip(-1).contiguous())
    sla_tl.check_routing(*problem[:2], reversed_routing, block_q=BLOCK, block_kv=BLOCK)
    assert relative_error(_attend(problem, reversed_routing), _attend(problem, routing)) < 1e-12


def test_global_mode_does_not_read_the_negligible_lists(problem):
    routing = problem[-1]
    junk = routing._replace(neg_lut=torch.full_like(routing.neg_lut, 99),
                            neg_count=torch.full_like(routing.neg_count, -3))
    out = _attend(problem, junk, linear="global")
    assert relative_error(out, _attend(problem, routing, linear="global")) < 1e-12
    # The lut still is checked in global mode.
    forged, message = _forgeries(routing)["block twice in lut"]
    with pytest.raises(ValueError, match=message):
        _attend(problem, forged, linear="global")


def test_block_maps_of_a_forged_routing_never_index_out_of_range(generator):
    """The torch glue of the CUDA path (tallies, reverse LUT) runs here on the CPU, where an
    out-of-range scatter would raise: forged entries are left out, never indexed."""
    lut = torch.tensor([[[[3, -1, 9, 3], [0, 1, 2, 6]]]], dtype=torch.int32)
    count = torch.tensor([[[4, 9]]], dtype=torch.int32)  # the second is above the width
    listed = routing_module.tally([(lut, count)], N_KV)
    assert listed.per_block[0, 0, 0].tolist() == [0, 0, 0, 2, 0, 0, 0]
    assert listed.outside[0, 0].tolist() == [2, 0]
    reverse, reverse_count = routing_module.reverse_lut(lut, count, N_KV)
    assert reverse_count[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 1]
    assert reverse[0, 0, 3, 0].item() == 0 and reverse[0, 0, 0, 0].item() == 1
