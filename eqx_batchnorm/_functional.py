"""The public functional core: each function validates its arguments once, then calls the
kernels of `_moments.py` and `_normalize.py`, configured as `BatchNorm` configures them."""

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer
from jaxtyping import Array, Bool, Float, Shaped

from . import _moments, _normalize, _validate
from ._errors import fail


class BatchStatistics(NamedTuple):
    """What `batch_statistics` returns.

    - `mean`, `var`: the statistics that normalise this participant's `x` (its group's,
      with `axis_index_groups`).
    - `axis_mean`, `axis_var`: the groups' average over the named axis, which updates the
      running statistics (equal to `mean`, `var` without groups).
    """

    mean: Array
    var: Array
    axis_mean: Array
    axis_var: Array


# Compiled once per static configuration, so un-jitted calls are cheap.
_moments_jit = jax.jit(_moments.moments, static_argnums=2)
_normalize_jit = jax.jit(_normalize.normalize_kernel, static_argnums=0)


def moments_config(x: Any, feature_axes: tuple[int, ...], names: tuple[Hashable, ...],
                   groups: tuple[tuple[int, ...], ...] | None, use_fast_variance: bool,
                   dtype: Any, force_float32_reductions: bool) -> _moments.Config:
    """Checks that `x` has statistics to take here, then configures `moments` for them."""
    _validate.check_reducible(tuple(x.shape), feature_axes, bool(names))
    _validate.check_participants(names, groups)
    _validate.check_vmap_batch_unsharded(x, names)
    return _moments.Config(
        tuple(a for a in range(x.ndim) if a not in feature_axes), names, groups,
        _moments.estimator(use_fast_variance),
        _moments.statistics_dtype(x.dtype, dtype, force_float32_reductions))


def normalize_config(x: Any, feature_axes: tuple[int, ...], epsilon: float, scale: Any,
                     bias: Any, dtype: Any) -> _normalize.Config:
    return _normalize.Config(
        tuple(s if a in feature_axes else 1 for a, s in enumerate(x.shape)), epsilon,
        _normalize.output_dtype(x, scale, bias, dtype), _normalize.backward_form())


def batch_statistics(
    x: Shaped[Array | np.ndarray, "*shape"],
    axis: int | Sequence[int] = -1,
    *,
    mask: Bool[Array | np.ndarray, "..."] | None = None,
    axis_name: Hashable | tuple[Hashable, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    use_fast_variance: bool = True,
    dtype: Any = None,
    force_float32_reductions: bool = True,
) -> BatchStatistics:
    r"""Mean and biased variance of `x` over all axes but `axis`, and across `axis_name`.

    $$\mu = \frac1N \sum_{i\in\mathcal M} x_i,\qquad
      \sigma^2 = \frac1N \sum_{i\in\mathcal M} (x_i-\mu)^2$$

    over the unmasked positions $\mathcal M$ of every participant of the named axes
    (of this participant's group, with `axis_index_groups`).

    !!! Example

        ```python
        x = jax.random.normal(jax.random.key(0), (32, 8, 8, 16)) + 3.0
        stats = ebn.batch_statistics(x)          # features on the last axis
        stats.mean.shape                          # (16,)
        ```

    **Arguments:**

    - `x`: floating-point input (a JAX or NumPy array).
    - `axis`: the feature axis or axes; every other axis is reduced.
    - `mask`: boolean, broadcastable to `x`; only `True` positions count, exactly also
      across participants holding different numbers of them.
    - `axis_name`: a name or tuple of names bound by `vmap`/`pmap`/`shard_map`.
    - `axis_index_groups`: a partition of the named axis into equal groups; each group
      gets its own statistics. Works under `vmap`, `pmap` and `shard_map`.
    - `use_fast_variance`: one pass over `x` that stays accurate when the mean dwarfs
      the spread if `True`; the two-pass $E[(x-\mu)^2]$ if `False`.
    - `dtype`: the minimum precision of the statistics (default: `x`'s dtype).
    - `force_float32_reductions`: promote the statistics to at least float32.

    **Returns:**

    A `BatchStatistics(mean, var, axis_mean, axis_var)` of feature-shaped arrays.

    **Raises:**

    `BatchNormError` for a non-floating `x`, a bad `axis` or `mask`, bad groups, an
    unbound `axis_name`, or nothing to reduce over.
    """
    _validate.check_float_input(x)
    _validate.check_mask(mask, tuple(x.shape))
    feature_axes = _validate.canonical_feature_axes(_validate.as_axis_tuple(axis), x.ndim,
                                                    tuple(x.shape))
    names = _validate.as_names(_validate.check_axis_name(axis_name))
    groups = _validate.check_axis_index_groups(axis_index_groups, axis_name)
    fast = _validate.check_flag("use_fast_variance", use_fast_variance)
    force = _validate.check_flag("force_float32_reductions", force_float32_reductions)
    cfg = moments_config(x, feature_axes, names, groups, fast, dtype, force)
    return BatchStatistics(*_moments_jit(x, mask, cfg))


def normalize(
    x: Shaped[Array | np.ndarray, "*shape"],
    mean: Float[Array | np.ndarray, "*features"],
    var: Float[Array | np.ndarray, "*features"],
    scale: Float[Array | np.ndarray, "*features"] | None = None,
    bias: Float[Array | np.ndarray, "*features"] | None = None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float | Float[Array, ""] = 1e-5,
    dtype: Any = None,
) -> Shaped[Array, "*shape"]:
    r"""Normalises `x` with the given per-feature statistics.

    $$y = (x - \mu)\,\left(\gamma\,\frac{1}{\sqrt{\sigma^2 + \epsilon}}\right) + \beta$$

    in Flax's order, so the bits agree, and in the promoted dtype of `x` and the
    statistics. Differentiable in every argument, to any order.

    !!! Example

        ```python
        x = jax.random.normal(jax.random.key(0), (32, 16)) * 2 + 3
        scale, bias = jnp.ones(16), jnp.zeros(16)
        stats = ebn.batch_statistics(x)
        y = ebn.normalize(x, stats.mean, stats.var, scale, bias)  # features last
        ```

    **Arguments:**

    - `x`: the input (a JAX or NumPy array).
    - `mean`, `var`: feature-shaped statistics (shape `x.shape[a] for a in axis`).
    - `scale`, `bias`: optional feature-shaped $\gamma$ and $\beta$.
    - `axis`: the feature axis or axes of `x`.
    - `epsilon`: $\epsilon$, added to the variance (may be traced).
    - `dtype`: the output dtype (default: the result type of `x`, `scale` and `bias`).

    **Returns:**

    An array shaped like `x`.

    **Raises:**

    `BatchNormError` for a non-floating `x`, a bad `axis`, or statistics and parameters
    whose shape is not the features' shape.
    """
    _validate.check_float_input(x)
    _validate.check_annotations("normalize", normalize.__annotations__,
                                {"x": x, "mean": mean, "var": var, "scale": scale,
                                 "bias": bias})
    shape = tuple(x.shape)
    feature_axes = _validate.canonical_feature_axes(_validate.as_axis_tuple(axis), x.ndim, shape)
    features = tuple(shape[a] for a in feature_axes)
    if tuple(mean.shape) != features:
        raise fail("mean", f"the features' shape {features} of `x` (shape {shape}, "
                   f"`axis={axis}`)", f"shape {tuple(mean.shape)}", "pass statistics with "
                   "one entry per feature, e.g. from `ebn.batch_statistics(x, axis)`")
    cfg = normalize_config(x, feature_axes, 0.0, scale, bias, dtype)
    if isinstance(epsilon, int | float | np.floating | np.integer):
        eps = _validate.check_scalar("epsilon", epsilon, 0.0, finite=True)
        return _normalize_jit(cfg._replace(epsilon=eps), x, mean, var, scale, bias)
    return _normalize_jit(cfg, x, mean, var, scale, bias, epsilon)


def update_running_average(
    running: Float[Array | np.ndarray, "*features"],
    batch: Float[Array | np.ndarray, "*features"],
    momentum: float | Float[Array | np.ndarray, ""],
) -> Float[Array, "*features"]:
    r"""Flax's exponential moving average, in the dtype of `running`.

    $$r \leftarrow m\,r + (1 - m)\,b$$

    No bias correction and no special first step, as in `flax.linen.BatchNorm`.
    Gradients do not flow into the running statistics.

    !!! Example

        ```python
        x = jax.random.normal(jax.random.key(0), (32, 16)) + 3
        running = jnp.zeros(16)
        running = ebn.update_running_average(running, ebn.batch_statistics(x).mean, 0.9)
        ```

    **Arguments:**

    - `running`: the current running statistic.
    - `batch`: this batch's statistic.
    - `momentum`: $m$, in $[0, 1]$ (may be traced).

    **Returns:**

    The updated running statistic, with `running`'s dtype.

    **Raises:**

    `BatchNormError` for arrays of different shapes, non-floating arrays, or a concrete
    `momentum` outside $[0, 1]$.
    """
    if _validate.is_int(momentum):
        momentum = float(momentum)
    _validate.check_annotations("update_running_average", update_running_average.__annotations__,
                                {"running": running, "batch": batch, "momentum": momentum})
    if not isinstance(momentum, Tracer):
        _validate.check_scalar("momentum", momentum, 0.0, 1.0)
    return running_average(jnp.asarray(running), jnp.asarray(batch), momentum)


def running_average(running: Array, batch: Array, momentum: Any) -> Array:
    """`update_running_average` on validated arrays."""
    new = momentum * running + (1 - momentum) * lax.stop_gradient(batch)
    return new.astype(running.dtype)
