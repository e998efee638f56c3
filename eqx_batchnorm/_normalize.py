r"""Normalisation with given statistics: the elementwise half of BatchNorm.

Private and unchecked: the public entry points validate, then call `normalize_kernel`.

**Gradients.** Autodiff of $y = (x-\mu)\,a + \beta$, $a = \gamma\,(\sigma^2+\epsilon)^{-1/2}$,
would take the cotangent of $\mu$ as $\sum_i \bar y_i a$, a full-size product that XLA
materialises because it also feeds $\bar x$. The hand-written JVP is per feature instead,

$$\dot y = a\,\dot x + (x-\mu)\,v + c,\qquad
  v = \dot\gamma\,(\sigma^2+\epsilon)^{-1/2}
      - \tfrac12\,\gamma\,(\sigma^2+\epsilon)^{-3/2}\,\dot{\sigma^2},
  \qquad c = \dot\beta - a\,\dot\mu,$$

linear in the tangents, so JAX transposes it into the classic backward (two reductions,
$\sum \bar y$ and $\sum \bar y\,(x-\mu)$, and one elementwise pass). It is rematerialised:
reverse mode keeps `x` itself, never a float32 copy of a half-precision `x`.

XLA:CPU fuses a reduction of a plain product faster than a longer chain, so there the
second reduction is $\sum \bar y\,x - \mu \sum \bar y$ (`backward="expanded"`), at a
relative cost of about $\varepsilon\,|\mu|/\sigma$ in the gradients of $\gamma$ and
$\sigma^2$.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array

from . import _backend


def output_dtype(x: Any, scale: Any, bias: Any, dtype: Any) -> Any:
    """Flax's output dtype: `dtype` if given, else the result type of x, scale and bias."""
    if dtype is not None:
        return jnp.dtype(dtype)
    out = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    return out if jnp.issubdtype(out, jnp.inexact) else jnp.promote_types(out, jnp.float32)


def backward_form() -> str:
    """How the tangent's `(x - mean) * v` is spelled on the current backend."""
    return "expanded" if _backend.platform() == "cpu" else "centred"


class Config(NamedTuple):
    """Static configuration of `normalize_kernel`: hashable, so traces are cached."""

    shape: tuple[int, ...]  # x.shape with 1 on every non-feature axis
    epsilon: float
    out_dtype: Any
    backward: str  # "expanded" or "centred": see `_centred_times`


def _affine(cfg: Config, x: Array, mean: Array, var: Array, scale: Array | None,
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize(cfg: Config, x: Array, mean: Array, var: Array, scale: Array | None,
               bias: Array | None) -> Array:
    return _affine(cfg, x, mean, var, scale, bias, cfg.epsilon)


def _live(t: Any) -> Any:
    """A tangent, or None where JAX knows it is zero."""
    return None if t is None or isinstance(t, SymbolicZero) else t


def _centred_times(x: Array, mean: Array, v: Array, shape: tuple[int, ...], dtype: Any,
                   backward: str) -> Array:
    """`(x - mean) * v`, broadcast per feature, in the form whose transpose is cheapest."""
    if backward == "expanded":  # transposes to sum(ct * x) - mean * sum(ct)
        return x.astype(dtype) * v.reshape(shape) - (mean * v).reshape(shape)
    # transposes to sum(ct * (x - mean))
    return (x.astype(dtype) - mean.reshape(shape)) * v.reshape(shape)


@functools.cache
def _tangent_fn(cfg: Config, dtype: Any):
    """The tangent, rematerialised: reverse mode then keeps x (and feature vectors) as
    residuals and recomputes the elementwise terms in the backward pass, inside its
    fusions. Built once per configuration, so JAX's caches recognise it."""
    return jax.checkpoint(functools.partial(_tangent, cfg, dtype), prevent_cse=False)


def _plus(a: Array | None, b: Array | None) -> Array | None:
    return b if a is None else a if b is None else a + b


def _tangent(cfg: Config, dtype: Any, x: Array, mean: Array, mul: Array,
             v: Array | None, c: Array | None, dx: Array | None) -> Array:
    dy = None if dx is None else dx.astype(dtype) * mul.reshape(cfg.shape)
    if v is not None:
        dy = _plus(dy, _centred_times(x, mean, v, cfg.shape, dtype, cfg.backward))
    dy = _plus(dy, None if c is None else c.reshape(cfg.shape))
    assert dy is not None
    return jnp.broadcast_to(dy, x.shape).astype(cfg.out_dtype)


def _normalize_jvp(cfg: Config, primals, tangents):
    x, mean, var, scale, bias = primals
    dx, dmean, dvar, dscale, dbias = map(_live, tangents)
    y = _normalize(cfg, x, mean, var, scale, bias)
    inv = lax.rsqrt(var + cfg.epsilon)
    mul = inv if scale is None else inv * scale
    dtype = jnp.result_type(x, mean, mul, *(() if bias is None else (bias,)))
    # v: the coefficient of (x - mean); c: the constant, per feature.
    v = _plus(None if dscale is None else dscale * inv,
              None if dvar is None else -0.5 * (mul * (inv * inv)) * dvar)
    c = dbias
    if dmean is not None:
        c = -mul * dmean if c is None else c - mul * dmean
    if dx is None and v is None and c is None:
        return y, jnp.zeros_like(y)
    dy = _tangent_fn(cfg, dtype)(x, mean, mul, v, c, dx)
    return y, dy


_normalize.defjvp(_normalize_jvp, symbolic_zeros=True)


def normalize_kernel(cfg: Config, x: Array, mean: Array, var: Array, scale: Array | None,
                     bias: Array | None, epsilon: Any = None) -> Array:
    """`normalize` on validated arrays. A traced `epsilon` takes plain autodiff of the
    same formula (the hand-written JVP needs it static)."""
    if epsilon is None:
        return _normalize(cfg, x, mean, var, scale, bias)
    return _affine(cfg, x, mean, var, scale, bias, epsilon)
