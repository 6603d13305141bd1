"""Bad tensors and settings get a TypeError or ValueError naming the argument, through every
entry (the Python API, the operators, the module), never an error from deep inside or a
silently different result."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import reference

from .helpers import random_projection, random_qkv, relative_error


@pytest.fixture
def good(generator):
    q, k, v = random_qkv(1, 2, 40, 56, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    return dict(q=q, k=k, v=v, proj_weight=w, proj_bias=b)


TENSOR_NAMES = ("q", "k", "v", "proj_weight", "proj_bias")


def _tensors(good: dict, **changes) -> list:
    return [changes.get(name, good[name]) for name in TENSOR_NAMES]


@pytest.mark.parametrize("name", TENSOR_NAMES)
def test_none_for_a_tensor_names_it_in_every_entry(good, name):
    args = _tensors(good, **{name: None})
    pattern = rf"{name} must be a torch.Tensor; got NoneType"
    with pytest.raises(TypeError, match=pattern):
        torch.ops.sla.attention(*args)
    with pytest.raises(TypeError, match=pattern):
        sla_tl.attention(*args)
    routing = sla_tl.route(good["q"], good["k"])
    with pytest.raises(TypeError, match=pattern):
        torch.ops.sla.attention_lut(*args[:3], *routing, *args[3:])
    with pytest.raises(TypeError, match=pattern):
        sla_tl.attention_with_routing(*args[:3], routing, *args[3:])


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_module_names_a_missing_input(good, name):
    module = sla_tl.SparseLinearAttention(64, 0.2)
    args = _tensors(good, **{name: None})[:3]
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor; got NoneType"):
        module(*args)


@pytest.mark.parametrize("shape", [(0, 2, 40, 64), (1, 0, 40, 64)])
def test_empty_batch_or_heads_is_a_clear_error(shape):
    q = torch.zeros(shape, dtype=torch.float64)
    w, b = torch.zeros(64, 64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    pattern = r"q must have at least one batch entry and one head"
    with pytest.raises(ValueError, match=pattern):
        torch.ops.sla.attention(q, q, q, w, b)
    with pytest.raises(ValueError, match=pattern):
        sla_tl.route(q, q)
    with pytest.raises(ValueError, match=pattern):
        sla_tl.SparseLinearAttention(64, 0.2)(q, q, q)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match=pattern):
        fake = torch.empty(shape, dtype=torch.float64)
        torch.ops.sla.attention(fake, fake, fake, torch.empty(64, 64, dtype=torch.float64),
                                torch.empty(64, dtype=torch.float64))


def test_module_refuses_integer_inputs_instead_of_returning_integers(good):
    module = sla_tl.SparseLinearAttention(64, 0.2)
    ints = [t.to(torch.int32) for t in (good["q"], good["k"], good["v"])]
    with pytest.raises(TypeError, match=r"q must be a floating tensor; got torch.int32"):
        module(*ints)
    with pytest.raises(TypeError, match=r"v must be a floating tensor"):
        module(good["q"], good["k"], ints[2])


def test_module_blames_its_head_dim_not_proj_weight(generator):
    q, k, v = random_qkv(1, 2, 32, 32, 128, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.2)
    with pytest.raises(ValueError, match=r"q has head dim 128, but this module was built with "
                                         r"head_dim=64"):
        module(q, k, v)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(head_dim=64.0), TypeError, r"head_dim must be an int; got float"),
        (dict(head_dim=True), TypeError, r"head_dim must be an int; got bool"),
        (dict(scale=0.0), ValueError, r"scale must be positive and finite"),
        (dict(scale=True), TypeError, r"scale must be a float or None; got bool"),
        (dict(topk=True), TypeError, r"topk must be a float in \[0, 1\]; got bool"),
        (dict(k_low=float("nan")), ValueError, r"k_low must be in \[0, 1\]"),
    ],
)
def test_module_constructor_checks(kwargs, error, pattern):
    args = {"head_dim": 64, "topk": 0.2, **kwargs}
    with pytest.raises(error, match=pattern):
        sla_tl.SparseLinearAttention(**args)


@pytest.mark.parametrize(
    "settings,error,pattern",
    [
        (dict(topk=True), TypeError, r"topk must be a float in \[0, 1\]; got bool"),
        (dict(k_low=False), TypeError, r"k_low must be a float in \[0, 1\]; got bool"),
        (dict(scale=True), TypeError, r"scale must be a float or None; got bool"),
        (dict(block_q=64.0), TypeError, r"block_q must be an int; got float"),
        (dict(block_kv="64"), TypeError, r"block_kv must be an int; got str"),
        (dict(block_q=2**70), ValueError, r"block_q must be below 2\*\*63"),
        (dict(topk=10**400), ValueError, r"topk must be in \[0, 1\]"),
        (dict(scale=10**400), ValueError, r"scale must be positive and finite"),
        (dict(layout=None), ValueError, r"layout must be one of bhsd, bshd; got None"),
        (dict(feature_map=None), ValueError, r"feature_map must be one of"),
        (dict(linear=3), ValueError, r"linear must be one of"),
    ],
)
def test_python_entries_check_values_the_schema_would_convert(good, settings, error, pattern):
    """The operators' schemas turn True into 1.0 and fail on a float block with an error that
    names no argument, so the Python entries check first."""
    with pytest.raises(error, match=pattern):
        sla_tl.attention(*_tensors(good), **settings)
    routing_settings = {n: settings[n] for n in settings if n not in ("topk", "k_low")}
    if routing_settings:
        routing = sla_tl.route(good["q"], good["k"])
        with pytest.raises(error, match=pattern):
            sla_tl.attention_with_routing(*_tensors(good)[:3], routing, *_tensors(good)[3:],
                                          **routing_settings)
    route_settings = {n: settings[n] for n in settings
                      if n in ("topk", "k_low", "block_q", "block_kv", "layout")}
    if route_settings:
        with pytest.raises(error, match=pattern):
            sla_tl.route(good["q"], good["k"], **route_settings)


def test_a_block_longer_than_the_sequence_allocates_only_the_sequence(good):
    """block_q = block_kv = 2**40 is one block each way: the same numbers as the smallest
    block covering the sequence, without allocating 2**40 rows."""
    args = _tensors(good)
    huge = sla_tl.attention(*args, topk=1.0, block_q=2**40, block_kv=2**40)
    covering = sla_tl.attention(*args, topk=1.0, block_q=48, block_kv=64)
    assert relative_error(huge, covering) < 1e-12
    expected = reference.attention(*args, 1.0, 0.0, 48, 64, "softmax", "marginal")
    assert relative_error(huge, expected) < 1e-12


def test_backward_checks_grad_out_and_the_saved_tensors(good):
    q, k, v, w, b = _tensors(good)
    routing = sla_tl.route(q, k, 0.3, 0.1, 16, 16)
    settings = (16, 16, "softmax", "marginal", None, "bhsd")
    saved = list(torch.ops.sla.attention_fwd(q, k, v, *routing, w, b, None, *settings))
    grad = torch.randn_like(saved[0])

    def backward(grad_out, *outputs):
        return torch.ops.sla.attention_bwd(grad_out, q, k, v, *outputs, *routing, w, b, None,
                                          *settings)

    with pytest.raises(TypeError, match=r"grad_out must be torch.float64; got torch.int32"):
        backward(grad.to(torch.int32), *saved)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(1, 2, 40, 64\); got "
                                         r"\(1, 2, 40, 1\)"):
        backward(grad[..., :1], *saved)
    with pytest.raises(TypeError, match=r"grad_out must be a torch.Tensor; got NoneType"):
        backward(None, *saved)
    for index, name in enumerate(("out", "lse", "o_lin", "h_rows", "z_rows")):
        broken = list(saved)
        broken[index] = saved[index][..., :1]
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            backward(grad, *broken)
    wrong_dtype = saved[:1] + [saved[1].double()] + saved[2:]
    with pytest.raises(TypeError, match=r"lse must be torch.float32; got torch.float64"):
        backward(grad, *wrong_dtype)
    # The good call still matches the reference's gradients.
    dq = backward(grad, *saved)[0]
    expected = reference.attention_backward(grad, q, k, v, routing, w, b, 16, 16, "softmax",
                                            "marginal")[0]
    assert relative_error(dq, expected) < 1e-12


def test_routing_must_be_a_routing_not_a_tuple(good):
    routing = sla_tl.route(good["q"], good["k"])
    with pytest.raises(TypeError, match=r"routing must be a sla_tl.Routing .* got tuple"):
        sla_tl.attention_with_routing(*_tensors(good)[:3], tuple(routing), *_tensors(good)[3:])
    with pytest.raises(TypeError, match=r"routing must be a sla_tl.Routing .* got list"):
        sla_tl.check_routing(good["q"], good["k"], list(routing))


def test_numpy_scalars_are_taken_like_the_operators_take_them(good):
    np = pytest.importorskip("numpy")
    out = sla_tl.attention(*_tensors(good), topk=np.float32(0.25), block_q=np.int64(16),
                           block_kv=np.int64(16))
    expected = torch.ops.sla.attention(*_tensors(good), 0.25, 0.0, 16, 16)
    assert relative_error(out, expected) < 1e-12
    with pytest.raises(TypeError, match=r"topk must be a float in \[0, 1\]; got bool"):
        sla_tl.attention(*_tensors(good), topk=np.bool_(True))
