r"""Normalisation with given statistics: the elementwise half of BatchNorm.

Private and unchecked: the public entry points validate, then call `normalize_kernel`.

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

On XLA:CPU a reduction fuses a plain product of two arrays faster than a longer chain of
elementwise operations, so there the second reduction is taken as
$\sum \bar y\,x - \mu \sum \bar y$ (`backward="expanded"`; elsewhere as written). That
costs a relative error of about $\varepsilon\,|\mu|/\sigma$ in the gradient of $\gamma$
and $\sigma^2$ (float32: $10^{-5}$ at $|\mu| = 100\,\sigma$), and in the term of $\bar x$
along $x - \mu$.
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


def _tangent(cfg: Config, dtype: Any, x: Array, mean: Array, mul: Array,
             v: Array | None, c: Array | None, dx: Array | None) -> Array:
    dy = None
    if dx is not None:
        dy = dx.astype(dtype) * mul.reshape(cfg.shape)
    if v is not None:
        t = _centred_times(x, mean, v, cfg.shape, dtype, cfg.backward)
        dy = t if dy is None else dy + t
    if c is not None:
        dy = c.reshape(cfg.shape) if dy is None else dy + c.reshape(cfg.shape)
    assert dy is not None
    return jnp.broadcast_to(dy, x.shape).astype(cfg.out_dtype)


def _normalize_jvp(cfg: Config, primals, tangents):
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
