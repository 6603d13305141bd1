"""The linear branch's feature maps phi, as TileLang macros on float32 fragments.

Each macro overwrites a fragment x [n_rows, dim] with phi(x), row by row (a row is
one token; the map runs over the head dimension). `FEATURE_MAPS` holds each map with its
gradient's macro, by the names of the torch table (`sla_tl.feature_maps`).
"""

from typing import NamedTuple

import tilelang.language as T

from .common import LOG2E


@T.macro
def _softmax(x, row_max, row_sum, n_rows, dim):
    T.reduce_max(x, row_max, dim=1)
    for i, d in T.Parallel(n_rows, dim):
        x[i, d] = T.exp2(x[i, d] * LOG2E - row_max[i] * LOG2E)
    T.reduce_sum(x, row_sum, dim=1)
    # One reciprocal per row: a per-element division compiles to an IEEE division call.
    for i in T.Parallel(n_rows):
        row_sum[i] = 1.0 / row_sum[i]
    for i, d in T.Parallel(n_rows, dim):
        x[i, d] = x[i, d] * row_sum[i]


@T.macro
def _elu_plus_one(x, row_max, row_sum, n_rows, dim):
    for i, d in T.Parallel(n_rows, dim):
        x[i, d] = T.if_then_else(x[i, d] > 0, x[i, d] + 1.0, T.exp(x[i, d]))


@T.macro
def _relu(x, row_max, row_sum, n_rows, dim):
    for i, d in T.Parallel(n_rows, dim):
        x[i, d] = T.max(x[i, d], 0.0)


@T.macro
def _softmax_vjp(x, grad, row_max, row_sum, n_rows, dim):
    # grad <- s * (grad - rowsum(grad * s)), s = softmax(x), written as (grad*s) - s*rowsum.
    _softmax(x, row_max, row_sum, n_rows, dim)
    for i, d in T.Parallel(n_rows, dim):
        grad[i, d] = grad[i, d] * x[i, d]
    T.reduce_sum(grad, row_sum, dim=1)
    for i, d in T.Parallel(n_rows, dim):
        grad[i, d] = grad[i, d] - x[i, d] * row_sum[i]


@T.macro
def _elu_plus_one_vjp(x, grad, row_max, row_sum, n_rows, dim):
    for i, d in T.Parallel(n_rows, dim):
        grad[i, d] = T.if_then_else(x[i, d] > 0, grad[i, d], grad[i, d] * T.exp(x[i, d]))


@T.macro
def _relu_vjp(x, grad, row_max, row_sum, n_rows, dim):
    for i, d in T.Parallel(n_rows, dim):
        grad[i, d] = T.if_then_else(x[i, d] > 0, grad[i, d], 0.0)


class FeatureMapMacros(NamedTuple):
    """One feature map's macros: phi, and its gradient."""

    phi: object
    vjp: object


FEATURE_MAPS = {
    "softmax": FeatureMapMacros(_softmax, _softmax_vjp),
    "elu": FeatureMapMacros(_elu_plus_one, _elu_plus_one_vjp),
    "relu": FeatureMapMacros(_relu, _relu_vjp),
}


def _macros(feature: str) -> FeatureMapMacros:
    if feature not in FEATURE_MAPS:
        raise ValueError(f"feature must be one of {tuple(FEATURE_MAPS)}; got {feature!r}")
    return FEATURE_MAPS[feature]


def feature_map_macro(feature: str):
    """The macro `(x, row_max, row_sum, n_rows, dim)` for phi; the two row buffers are
    float32 fragments [n_rows] used as scratch by the softmax map."""
    return _macros(feature).phi


def linear_rows_macro(feature: str):
    """The macro `(src, x, phi_out, z, dots, row_max, row_sum, n_rows, dim)` every kernel of
    the linear branch's query side starts with: x <- phi(src) in float32, phi_out <- phi(src)
    in its own dtype (the operand of phi(Q) H_i), dots <- phi(src) . z per row (before the
    rounding, so numerator and denominator see one phi); x holds phi(src) * z afterwards. The
    two row buffers are phi's scratch, as for `feature_map_macro`."""
    phi = feature_map_macro(feature)

    @T.macro
    def linear_rows(src, x, phi_out, z, dots, row_max, row_sum, n_rows, dim):
        T.copy(src, x)
        phi(x, row_max, row_sum, n_rows, dim)
        T.copy(x, phi_out)
        for i, d in T.Parallel(n_rows, dim):
            x[i, d] = x[i, d] * z[d]
        T.reduce_sum(x, dots, dim=1)

    return linear_rows


def feature_map_vjp_macro(feature: str):
    """The macro `(x, grad, row_max, row_sum, n_rows, dim)`: grad <- phi'(x)^T grad, row by
    row; x (raw inputs, float32) is overwritten as scratch."""
    return _macros(feature).vjp
