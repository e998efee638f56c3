r"""Normalisation with given statistics: the elementwise half of BatchNorm."""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Shaped

from ._checks import as_axis_tuple, canonical_feature_axes, check_float_input


def output_dtype(x: Array, scale: Array | None, bias: Array | None, dtype: Any) -> Any:
    """Flax's output dtype: `dtype` if given, else the result type of x, scale and bias."""
    if dtype is not None:
        return jnp.dtype(dtype)
    out = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    return out if jnp.issubdtype(out, jnp.inexact) else jnp.promote_types(out, jnp.float32)


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

    !!! Example

        ```python
        stats = ebn.batch_statistics(x)
        y = ebn.normalize(x, stats.mean, stats.var, scale, bias)
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
    y = x - mean.reshape(shape)
    mul = lax.rsqrt(var + epsilon)
    if scale is not None:
        mul = mul * scale
    y = y * mul.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(output_dtype(x, scale, bias, dtype))
