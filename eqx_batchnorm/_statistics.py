r"""Batch statistics and the running average: the pure functional core.

The statistics of BatchNorm are the mean and the biased variance of `x` over every axis
but the feature axes, and across the participants of the named axes:

$$\mu = \frac{1}{N} \sum_{i \in \mathcal{M}} x_i, \qquad
  \sigma^2 = \frac{1}{N} \sum_{i \in \mathcal{M}} (x_i - \mu)^2,$$

where $\mathcal{M}$ is the set of unmasked positions on all participants (of the group,
with `axis_index_groups`) and $N = |\mathcal{M}|$.

**One pass that stays accurate.** Flax's fast variance, $E[x^2] - E[x]^2$, cancels
catastrophically when $|\mu| \gg \sigma$. Here each participant shifts its data by one
of its own samples $K$ (a value of the data, so $x - K$ is small and exact), takes
$\sum (x - K)$ and $\sum (x - K)^2$ in the same single pass, and the participants'
summaries are combined with Chan's parallel formula relative to one participant's shift.
That needs one `all_gather` of four numbers per feature and participant: still one
collective per call, and no cancellation anywhere.

**Gradients.** The statistics carry a hand-written JVP: $\dot\mu = \frac1N\sum\dot x$,
$\dot{\sigma^2} = \frac2N\sum (x-\mu)\dot x$, one (grouped) `psum` in the tangent. JAX
transposes it for reverse mode, so forward mode, reverse mode and higher orders all work.
"""

import math
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Shaped

from ._checks import (
    as_axis_tuple,
    canonical_feature_axes,
    check_axis_index_groups,
    check_float_input,
    check_mask,
)
from ._collectives import Groups, all_gather, as_names, axis_size, grouped_psum, my_group, select
from ._errors import fail


def statistics_dtype(x_dtype: Any, dtype: Any, force_float32_reductions: bool) -> Any:
    """The dtype the statistics are computed in (Flax's rule).

    `dtype` if given, else `x`'s dtype; promoted to at least float32 when
    `force_float32_reductions`, so half-precision inputs get float32 statistics.
    """
    base = jnp.dtype(dtype) if dtype is not None else jnp.dtype(x_dtype)
    return jnp.promote_types(base, jnp.float32) if force_float32_reductions else base


class _Config(NamedTuple):
    reduction_axes: tuple[int, ...]
    names: tuple[Hashable, ...]
    groups: tuple[tuple[int, ...], ...] | None
    fast: bool
    dtype: Any


class _GroupMoments(NamedTuple):
    mean: Array  # (G, *features): every group's mean
    var: Array
    count: Array
    onehot: Array  # (G,): this participant's group


def _expand(v: Array, axes: tuple[int, ...]) -> Array:
    return jnp.expand_dims(v, axes) if axes else v


def _group_moments(x: Array, mask: Array | None, cfg: _Config) -> _GroupMoments:
    red, names = cfg.reduction_axes, cfg.names
    xc = x.astype(cfg.dtype)
    m = None if mask is None else jnp.broadcast_to(mask, x.shape)
    if m is None:
        n_local = math.prod(x.shape[a] for a in red)
        feature_shape = tuple(s for a, s in enumerate(x.shape) if a not in red)
        count = jnp.full(feature_shape, n_local, cfg.dtype)
    else:
        count = m.sum(red, dtype=cfg.dtype)
    if names:
        groups = Groups(cfg.groups, axis_size(names), cfg.names)
        onehot = my_group(groups, names)
    else:
        groups, onehot = None, jnp.ones((1,), bool)

    if not cfg.fast:  # the exact two-pass formula: one collective per pass
        s1 = (xc if m is None else jnp.where(m, xc, 0)).sum(red)
        sums = jnp.stack([s1, count])
        sums = grouped_psum(sums, names, onehot) if names else sums[None]
        total = sums[:, 1]
        means = sums[:, 0] / total
        dev = xc - _expand(select(means, onehot), red)
        if m is not None:
            dev = jnp.where(m, dev, 0)
        s2 = (dev * dev).sum(red)
        s2 = grouped_psum(s2, names, onehot) if names else s2[None]
        return _GroupMoments(means, s2 / total, total, onehot)

    # One pass, shifted by a sample of the data. The shift cancels out of mean and
    # variance exactly, hence stop_gradient; it only removes the cancellation.
    first = xc[tuple(0 if a in red else slice(None) for a in range(x.ndim))]
    if m is not None:
        first = jnp.where(m[tuple(0 if a in red else slice(None) for a in range(x.ndim))],
                          first, 0)
    shift = lax.stop_gradient(first)
    d = xc - _expand(shift, red)
    if m is not None:
        d = jnp.where(m, d, 0)
    s1, s2 = d.sum(red), (d * d).sum(red)
    if not names:
        mean = shift + s1 / count
        var = jnp.maximum((s2 - s1 * (s1 / count)) / count, 0)
        return _GroupMoments(mean[None], var[None], count[None], onehot)

    # Chan et al.'s parallel combination, every participant relative to the group's
    # first member's shift: only differences of nearby values, no cancellation.
    assert groups is not None
    local_mean = s1 / jnp.where(count > 0, count, 1)
    m2 = s2 - s1 * local_mean
    summary = all_gather(jnp.stack([count, shift, local_mean, m2]), names)
    summary = summary[None] if groups.count == 1 else summary[groups.members]
    n, k, local_mean, m2 = (summary[:, :, i] for i in range(4))  # (G, members, *F)
    offset = (k - k[:, :1]) + local_mean
    total = n.sum(1)
    mean_offset = (n * offset).sum(1) / total
    m2 = m2.sum(1) + (n * jnp.square(offset - mean_offset[:, None])).sum(1)
    return _GroupMoments(k[:, 0] + mean_offset, jnp.maximum(m2 / total, 0), total, onehot)


def _outputs(gm: _GroupMoments) -> tuple[Array, Array, Array, Array]:
    return (select(gm.mean, gm.onehot), select(gm.var, gm.onehot),
            gm.mean.mean(0), gm.var.mean(0))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _moments(x: Array, mask: Array | None, cfg: _Config):
    return _outputs(_group_moments(x, mask, cfg))


@_moments.defjvp
def _moments_jvp(cfg: _Config, primals, tangents):
    x, mask = primals
    dx = tangents[0]
    gm = _group_moments(x, mask, cfg)
    out = _outputs(gm)
    red = cfg.reduction_axes
    dxc = dx.astype(cfg.dtype)
    if mask is not None:
        dxc = jnp.where(jnp.broadcast_to(mask, x.shape), dxc, 0)
    centred = x.astype(cfg.dtype) - _expand(out[0], red)
    t = jnp.stack([dxc.sum(red), (centred * dxc).sum(red)])
    t = grouped_psum(t, cfg.names, gm.onehot) if cfg.names else t[None]
    dmean = t[:, 0] / gm.count
    dvar = 2 * t[:, 1] / gm.count
    tangent_out = (select(dmean, gm.onehot), select(dvar, gm.onehot),
                   dmean.mean(0), dvar.mean(0))
    return out, tangent_out


class BatchStatistics(NamedTuple):
    """What `batch_statistics` returns.

    - `mean`, `var`: the statistics that normalise this participant's `x` (its group's,
      with `axis_index_groups`).
    - `axis_mean`, `axis_var`: the average of the group statistics over the whole named
      axis: what the running statistics are updated with. Equal to `mean`, `var` without
      groups.
    """

    mean: Array
    var: Array
    axis_mean: Array
    axis_var: Array


def batch_statistics(
    x: Shaped[Array, "*shape"],
    axis: int | Sequence[int] = -1,
    *,
    mask: Bool[Array, "*#shape"] | None = None,
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

    - `x`: floating-point input.
    - `axis`: the feature axis or axes; every other axis is reduced.
    - `mask`: boolean, broadcastable to `x`; only `True` positions count. With
      `axis_name`, sums and counts are reduced across participants, so the statistics
      are exact even when participants hold different numbers of valid elements.
    - `axis_name`: a name or tuple of names bound by `vmap`/`pmap`/`shard_map`.
    - `axis_index_groups`: a partition of the named axis into equal groups; each group
      gets its own statistics. Works under `vmap`, `pmap` and `shard_map`.
    - `use_fast_variance`: one pass over `x` (shifted, so accurate even when the mean
      dwarfs the spread) if `True`; the two-pass $E[(x-\mu)^2]$ if `False`.
    - `dtype`: the minimum precision of the statistics (default: `x`'s dtype).
    - `force_float32_reductions`: promote the statistics to at least float32.

    **Returns:**

    A `BatchStatistics(mean, var, axis_mean, axis_var)` of feature-shaped arrays.

    **Raises:**

    `BatchNormError` for a non-floating `x`, a bad `axis` or `mask`, bad groups, an
    unbound `axis_name`, or nothing to reduce over.
    """
    check_float_input(x)
    x = jnp.asarray(x)
    feature_axes = canonical_feature_axes(as_axis_tuple(axis), x.ndim, x.shape)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    names = as_names(axis_name)
    if not red and not names:
        raise fail("x", "at least one axis to reduce over besides the feature axes "
                   f"{feature_axes}, or an `axis_name`", f"shape {x.shape}",
                   "pass a batch (e.g. shape (batch, features)), or call the layer under "
                   "`jax.vmap(..., axis_name='batch')` with `axis_name='batch'`")
    if mask is not None:
        check_mask(mask, x.shape)
        mask = jnp.asarray(mask)
    groups = check_axis_index_groups(axis_index_groups, axis_name)
    cfg = _Config(red, names, groups, bool(use_fast_variance),
                  statistics_dtype(x.dtype, dtype, force_float32_reductions))
    return BatchStatistics(*_moments(x, mask, cfg))


def update_running_average(
    running: Float[Array, "*features"],
    batch: Float[Array, "*features"],
    momentum: float | Float[Array, ""],
) -> Float[Array, "*features"]:
    r"""Flax's exponential moving average, in the dtype of `running`.

    $$r \leftarrow m\,r + (1 - m)\,b$$

    No bias correction and no special first step, as in `flax.linen.BatchNorm`.
    Gradients do not flow into the running statistics.

    **Arguments:**

    - `running`: the current running statistic.
    - `batch`: this batch's statistic.
    - `momentum`: $m$, in $[0, 1]$.

    **Returns:**

    The updated running statistic, with `running`'s dtype.
    """
    new = momentum * running + (1 - momentum) * lax.stop_gradient(batch)
    return new.astype(running.dtype)
