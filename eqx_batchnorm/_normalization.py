r"""Normalisation with given statistics: the elementwise half of BatchNorm.

**Gradients.** `normalize` carries a hand-written JVP. Autodiff of
$y = (x-\mu)\,a + \beta$, $a = \gamma\,(\sigma^2+\epsilon)^{-1/2}$, would take the
cotangent of $\mu$ as $\sum_i \bar y_i a$: a full-size product that XLA materialises
because the same product also feeds $\bar x$. Written per feature instead,

$$\dot y = a\,\dot x + (x-\mu)\,v + c,\qquad
  v = \dot\gamma\,(\sigma^2+\epsilon)^{-1/2}
      - \tfrac12\,\gamma\,(\sigma^2+\epsilon)^{-3/2}\,\dot{\sigma^2},
  \qquad c = \dot\beta - a\,\dot\mu,$$

its transpose is the classic backward: two reductions, $\sum \bar y$ and
$\sum \bar y\,(x-\mu)$, and one elementwise pass for $\bar x$. The JVP is linear in the
tangents, so JAX transposes it for reverse mode, and forward mode and higher orders
work as for any JAX function. The tangent is rematerialised (`jax.checkpoint`): what
reverse mode keeps from the forward pass is `x` itself, never a float32 copy of a
half-precision `x`.

On XLA:CPU a reduction fuses a plain product of two arrays at close to memory speed
but pays about half a pass for every extra elementwise operation, so there the second
reduction is taken as $\sum \bar y\,x - \mu \sum \bar y$ (elsewhere as written). That
costs a relative error of about $\varepsilon\,|\mu|/\sigma$ in the gradient of $\gamma$
and $\sigma^2$ (float32: $10^{-5}$ at $|\mu| = 100\,\sigma$), and in the term of $\bar x$
along $x - \mu$.
"""

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Shaped, jaxtyped

from ._checks import (
    as_axis_tuple,
    canonical_feature_axes,
    check_float_input,
    with_argument_checks,
)
from ._statistics import strategy as _strategy


def output_dtype(x: Array, scale: Array | None, bias: Array | None, dtype: Any) -> Any:
    """Flax's output dtype: `dtype` if given, else the result type of x, scale and bias."""
    if dtype is not None:
        return jnp.dtype(dtype)
    out = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    return out if jnp.issubdtype(out, jnp.inexact) else jnp.promote_types(out, jnp.float32)


class _NormConfig(NamedTuple):
    shape: tuple[int, ...]  # x.shape with 1 on every non-feature axis
    epsilon: float
    out_dtype: Any
    # "cpu" or "default" forces an implementation of the backward reduction (tests use
    # it to run both on one machine); None picks by the default backend.
    strategy: str | None = None


def _affine(cfg: _NormConfig, x: Array, mean: Array, var: Array, scale: Array | None,
            bias: Array | None, epsilon: Any) -> Array:
    # Flax's order of operations, so that the bits agree.
    y = x - mean.reshape(cfg.shape)
    mul = lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale
    y = y * mul.reshape(cfg.shape)
    if bias is not None:
        y = y + bias.reshape(cfg.shape)
    return y.astype(cfg.out_dtype)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize(cfg: _NormConfig, x: Array, mean: Array, var: Array, scale: Array | None,
               bias: Array | None) -> Array:
    return _affine(cfg, x, mean, var, scale, bias, cfg.epsilon)


def _live(t: Any) -> Any:
    """A tangent, or None where JAX knows it is zero."""
    return None if t is None or isinstance(t, SymbolicZero) else t


def _centred_times(x: Array, mean: Array, v: Array, shape: tuple[int, ...], dtype: Any,
                   strategy: str | None) -> Array:
    """`(x - mean) * v`, broadcast per feature, in the form whose transpose is cheapest."""

    def expanded(x, mean, v):  # transposes to sum(ct * x) - mean * sum(ct)
        return x.astype(dtype) * v.reshape(shape) - (mean * v).reshape(shape)

    def centred(x, mean, v):  # transposes to sum(ct * (x - mean))
        return (x.astype(dtype) - mean.reshape(shape)) * v.reshape(shape)

    if _strategy(strategy) == "cpu":
        return expanded(x, mean, v)
    return centred(x, mean, v)


def _tangent(cfg: _NormConfig, dtype: Any, x: Array, mean: Array, mul: Array,
             v: Array | None, c: Array | None, dx: Array | None) -> Array:
    dy = None
    if dx is not None:
        dy = dx.astype(dtype) * mul.reshape(cfg.shape)
    if v is not None:
        t = _centred_times(x, mean, v, cfg.shape, dtype, cfg.strategy)
        dy = t if dy is None else dy + t
    if c is not None:
        dy = c.reshape(cfg.shape) if dy is None else dy + c.reshape(cfg.shape)
    assert dy is not None
    return jnp.broadcast_to(dy, x.shape).astype(cfg.out_dtype)


def _normalize_jvp(cfg: _NormConfig, primals, tangents):
    x, mean, var, scale, bias = primals
    dx, dmean, dvar, dscale, dbias = map(_live, tangents)
    y = _normalize(cfg, x, mean, var, scale, bias)
    inv = lax.rsqrt(var + cfg.epsilon)
    mul = inv if scale is None else inv * scale
    dtype = jnp.result_type(x, mean, mul, *(() if bias is None else (bias,)))
    v = None  # the coefficient of (x - mean)
    if dscale is not None:
        v = dscale * inv
    if dvar is not None:
        dv = -0.5 * (mul * (inv * inv)) * dvar
        v = dv if v is None else v + dv
    c = None  # the constant per feature
    if dbias is not None:
        c = dbias
    if dmean is not None:
        c = -mul * dmean if c is None else c - mul * dmean
    if dx is None and v is None and c is None:
        return y, jnp.zeros_like(y)
    # Rematerialised: reverse mode then keeps x (and feature vectors) as residuals and
    # recomputes the elementwise terms in the backward pass, inside its fusions.
    dy = jax.checkpoint(partial(_tangent, cfg, dtype), prevent_cse=False)(
        x, mean, mul, v, c, dx)
    return y, dy


_normalize.defjvp(_normalize_jvp, symbolic_zeros=True)


def _check_normalize_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    check_float_input(arguments["x"])
    return arguments


@with_argument_checks(_check_normalize_arguments)
@jaxtyped(typechecker=beartype)
def normalize(
    x: Shaped[Array, "*shape"],
    mean: Float[Array, "*features"],
    var: Float[Array, "*features"],
    scale: Float[Array, "*features"] | None = None,
    bias: Float[Array, "*features"] | None = None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-5,
    dtype: Any = None,
) -> Shaped[Array, "*shape"]:
    r"""Normalises `x` with the given per-feature statistics.

    $$y = (x - \mu)\,\left(\gamma\,\frac{1}{\sqrt{\sigma^2 + \epsilon}}\right) + \beta$$

    in the order Flax computes it, so the bits agree. The arithmetic runs in the
    promoted dtype of `x` and the statistics (float32 for half-precision `x` with float32
    statistics); the result is cast to `dtype`, or to the result type of `x`, `scale`
    and `bias`.

    Differentiable in every argument, in forward and reverse mode and to any order;
    reverse mode costs two reductions and one elementwise pass over `x` (see the
    module notes).

    !!! Example

        ```python
        x = jax.random.normal(jax.random.key(0), (32, 16)) * 2 + 3
        scale, bias = jnp.ones(16), jnp.zeros(16)
        stats = ebn.batch_statistics(x)
        y = ebn.normalize(x, stats.mean, stats.var, scale, bias)  # features last
        ```

    **Arguments:**

    - `x`: the input.
    - `mean`, `var`: feature-shaped statistics (shape `x.shape[a] for a in axis`).
    - `scale`, `bias`: optional feature-shaped $\gamma$ and $\beta$.
    - `axis`: the feature axis or axes of `x`.
    - `epsilon`: $\epsilon$, added to the variance.
    - `dtype`: the output dtype (default: inferred as above).

    **Returns:**

    An array shaped like `x`.
    """
    check_float_input(x)
    feature_axes = canonical_feature_axes(as_axis_tuple(axis), x.ndim, x.shape)
    shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    out = output_dtype(x, scale, bias, dtype)
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    if isinstance(epsilon, int | float | np.floating | np.integer) and math.isfinite(epsilon):
        return _normalize(_NormConfig(shape, float(epsilon), out), jnp.asarray(x), mean, var,
                          scale, bias)
    # A traced epsilon: plain autodiff of the same formula.
    return _affine(_NormConfig(shape, 0.0, out), jnp.asarray(x), mean, var, scale, bias,
                   epsilon)
