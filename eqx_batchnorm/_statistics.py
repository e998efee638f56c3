r"""Batch statistics and the running average: the pure functional core.

The statistics of BatchNorm are the mean and the biased variance of `x` over every axis
but the feature axes, and across the participants of the named axes:

$$\mu = \frac{1}{N} \sum_{i \in \mathcal{M}} x_i, \qquad
  \sigma^2 = \frac{1}{N} \sum_{i \in \mathcal{M}} (x_i - \mu)^2,$$

where $\mathcal{M}$ is the set of unmasked positions on all participants (of the group,
with `axis_index_groups`) and $N = |\mathcal{M}|$.

**One pass that stays accurate.** Flax's fast variance, $E[x^2] - E[x]^2$, cancels
catastrophically when $|\mu| \gg \sigma$ (float32: relative error 3e-3 at
$|\mu| = 100\sigma$, 20 at $10^4\sigma$). Two implementations, exact to rounding (relative
error of the variance below $10^{-5}$ in float32 for $|\mu|/\sigma$ up to $10^4$ and
beyond), picked when tracing by the default backend (`strategy`):

- **GPU, TPU** (`_shifted_moments`): each participant shifts its data by one of its own
  valid samples $K$ (so $x - K$ is small and exact) and takes $\sum (x - K)$ and
  $\sum (x - K)^2$ in one fused pass; across devices the participants' summaries are
  combined with Chan's parallel formula over one `all_gather` of four numbers per
  feature. Across `vmap` names alone (every participant in one program) the group
  shares one shift instead, and one `psum` of the shifted sums combines them: XLA
  merges it with the per-example reductions, as cheap as the batched style.
- **CPU** (`_summed_moments`): XLA:CPU reduces $\sum x$ and $\sum x^2$ at memory speed
  but pays about half a pass more for any other elementwise producer, such as
  $x - K$. So it takes the plain sums (one `psum`) and checks them: where
  $\mu^2 \le 3\sigma^2$ for every feature (data that is roughly centred: the common
  case) the plain formula loses at most 2 bits; otherwise a second pass, shifted by the
  first pass's mean, runs under `lax.cond` (costing nothing when not taken).

`use_fast_variance=False` is the exact two-pass $E[(x - \mu)^2]$, one collective per pass.

**Gradients.** The statistics carry a hand-written JVP: $\dot\mu = \frac1N\sum\dot x$,
$\dot{\sigma^2} = \frac2N\sum (x-\mu)\dot x$, one (grouped) `psum` in the tangent. JAX
transposes it for reverse mode, so forward mode, reverse mode and higher orders all work.
The tangent is rematerialised (`jax.checkpoint`): reverse mode keeps `x` itself as the
residual, never a float32 copy of a half-precision `x`, and XLA fuses the transposed
tangent ($\bar x \mathrel{+}= \bar\mu/N + 2(x-\mu)\,\overline{\sigma^2}/N$) into the one
elementwise pass of the backward (see `normalize` for the rest of it).
"""

import math
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jax import lax
from jaxtyping import Array, Bool, Float, Shaped, jaxtyped

from ._checks import (
    as_axis_tuple,
    canonical_feature_axes,
    check_axis_index_groups,
    check_float_input,
    check_mask,
    check_reducible,
    with_argument_checks,
)
from ._collectives import (
    Groups,
    across_devices,
    all_gather,
    as_names,
    axis_size,
    first_sample,
    grouped_psum,
    my_group,
    psum_parts,
    select,
)


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
    # "cpu" or "default" forces an implementation of the one-pass variance (tests use
    # it to run both on one machine); None picks by the default backend (`strategy`).
    strategy: str | None = None


class _GroupMoments(NamedTuple):
    mean: Array  # (G, *features): every group's mean
    var: Array
    count: Array
    onehot: Array  # (G,): this participant's group


class _Local(NamedTuple):
    xc: Array  # x in the statistics dtype
    m: Array | None  # the mask, broadcast to x
    count: Array  # this participant's number of valid elements, per feature
    groups: Groups | None
    onehot: Array


# The one-pass sums are trusted while E[x^2] <= 4 var, i.e. mean^2 <= 3 var: the
# subtraction E[x^2] - E[x]^2 then loses at most 2 bits (measured in float32: relative
# error <= 3e-6, against 4e-5 at mean^2 = 100 var). Beyond that, one more pass.
_CANCELLATION_LIMIT = 3.0


def _expand(v: Array, axes: tuple[int, ...]) -> Array:
    return jnp.expand_dims(v, axes) if axes else v


def _local(x: Array, mask: Array | None, cfg: _Config) -> _Local:
    red, names = cfg.reduction_axes, cfg.names
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
    return _Local(x.astype(cfg.dtype), m, count, groups, onehot)


def strategy(forced: str | None) -> str:
    """Which implementation of the one-pass reductions to trace: "cpu" or "default".

    Picked when tracing, from `jax.default_backend()`, because the two differ in their
    collectives (which JAX cannot trace inside a `lax.platform_dependent` branch of a
    custom JVP under `vmap`). Both are exact to rounding, so code lowered for another
    platform than the default one is only slower, never wrong.
    """
    if forced is not None:
        return forced
    return "cpu" if jax.default_backend() == "cpu" else "default"


def _group_moments(x: Array, mask: Array | None, cfg: _Config) -> _GroupMoments:
    if not cfg.fast:
        return _two_pass_moments(x, mask, cfg)
    if strategy(cfg.strategy) == "cpu" and jnp.finfo(cfg.dtype).bits >= 32:
        return _summed_moments(x, mask, cfg)
    return _shifted_moments(x, mask, cfg)


def _two_pass_moments(x: Array, mask: Array | None, cfg: _Config) -> _GroupMoments:
    """The exact two-pass formula: one collective per pass."""
    red, names = cfg.reduction_axes, cfg.names
    xc, m, count, _, onehot = _local(x, mask, cfg)
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


def _first_valid_sample(xc: Array, m: Array, red: tuple[int, ...]) -> Array:
    """`xc` at the first unmasked position along `red`, per feature (0 where none is).

    The shift must be a value of the valid data: a masked-out sample (padding, often 0)
    would be as far from the mean as no shift at all. Finding it scans the mask, not
    `x`: a min-reduction of positions, then a gather of one value per feature.
    """
    sharding = jax.typeof(xc).sharding
    spec = tuple(sharding.spec) + (None,) * (xc.ndim - len(sharding.spec))
    if not sharding.mesh.empty and any(spec[a] is not None for a in red):
        # Under explicit sharding of the reduced axes: the first sample if it is valid.
        return jnp.where(first_sample(m, red), first_sample(xc, red), 0)
    sizes = tuple(xc.shape[a] for a in red)
    n = math.prod(sizes)
    position = sum(lax.broadcasted_iota(jnp.int32, xc.shape, a) * math.prod(sizes[i + 1:])
                   for i, a in enumerate(red))
    first = jnp.min(jnp.where(m, position, n), axis=red)  # n: no valid position
    along = iter(jnp.unravel_index(jnp.minimum(first, n - 1), sizes))
    features = [a for a in range(xc.ndim) if a not in red]
    index = tuple(next(along) if a in red else lax.broadcasted_iota(
        jnp.int32, first.shape, features.index(a)) for a in range(xc.ndim))
    return jnp.where(first < n, xc[index], 0)


def _shifted_moments(x: Array, mask: Array | None, cfg: _Config) -> _GroupMoments:
    """One pass shifted by a sample of the data, participants combined with Chan's formula.

    Every reduction is one fused pass over `x` where reductions fuse their elementwise
    producers well (GPU, TPU): as fast as the plain sums, and never cancelling.
    """
    red, names = cfg.reduction_axes, cfg.names
    xc, m, count, groups, onehot = _local(x, mask, cfg)
    # The shift cancels out of mean and variance exactly, hence stop_gradient; it only
    # removes the cancellation.
    shift = lax.stop_gradient(first_sample(xc, red) if m is None else
                              _first_valid_sample(xc, m, red))
    if names and not across_devices(names):
        assert groups is not None
        return _common_shift_moments(xc, m, count, groups, onehot, shift, cfg)
    s1, s2 = _shifted_sums(xc, m, shift, red)
    if not names:
        mean = shift + s1 / count
        var = jnp.maximum((s2 - s1 * (s1 / count)) / count, 0)
        return _GroupMoments(mean[None], var[None], count[None], onehot)

    # Chan et al.'s parallel combination, every participant relative to the shift of
    # the group's first member holding data (in that feature): only differences of
    # nearby values, no cancellation.
    assert groups is not None
    local_mean = s1 / jnp.where(count > 0, count, 1)
    m2 = s2 - s1 * local_mean
    summary = _by_group(jnp.stack([count, shift, local_mean, m2]), names, groups)
    n, k, local_mean, m2 = (summary[:, :, i] for i in range(4))  # (G, members, *F)
    ref = _first_holding_data(k, None if m is None else n)
    offset = (k - ref[:, None]) + local_mean
    total = n.sum(1)
    mean_offset = (n * offset).sum(1) / total
    m2 = m2.sum(1) + (n * jnp.square(offset - mean_offset[:, None])).sum(1)
    return _GroupMoments(ref + mean_offset, jnp.maximum(m2 / total, 0), total, onehot)


def _common_shift_moments(xc: Array, m: Array | None, count: Array, groups: Groups,
                          onehot: Array, shift: Array, cfg: _Config) -> _GroupMoments:
    """One pass shifted by the group's first sample, for `vmap` names only.

    All participants live in one program, so the group's shift (its first member's,
    or the first member holding valid data, per feature) is a slice rather than a
    communication, and the shifted sums combine by a plain `psum`, which XLA merges
    with the per-example reductions into one. Chan's formula over an `all_gather`
    would cost a dozen feature-sized kernels more (measured on an H200: up to 1.27x
    the batched style's forward on a 51 MB tensor).
    """
    red, names = cfg.reduction_axes, cfg.names
    first = _first_holding_data(_by_group(shift, names, groups),
                                None if m is None else _by_group(count, names, groups))
    parts = _shifted_sums(xc, m, lax.stop_gradient(select(first, onehot)), red)
    if m is None:
        s1, s2 = _group_sums(parts, names, onehot)
        total = count[None] * groups.members.shape[1]
    else:
        s1, s2, total = _group_sums((*parts, count), names, onehot)
    d1 = s1 / total
    var = jnp.maximum(s2 / total - d1 * d1, 0)
    return _GroupMoments(lax.stop_gradient(first) + d1, var, total, onehot)


def _shifted_sums(xc: Array, m: Array | None, shift: Array,
                  red: tuple[int, ...]) -> tuple[Array, Array]:
    """`sum(x - shift)` and `sum((x - shift)^2)` over the valid positions: one fused pass."""
    d = xc - _expand(shift, red)
    if m is not None:
        d = jnp.where(m, d, 0)
    return d.sum(red), (d * d).sum(red)


def _by_group(v: Array, names: tuple[Hashable, ...], groups: Groups) -> Array:
    """Every participant's `v`, arranged by group: shape `(G, members, *v.shape)`."""
    gathered = all_gather(v, names)
    return gathered[None] if groups.count == 1 else gathered[groups.members]


def _first_holding_data(values: Array, counts: Array | None) -> Array:
    """`(G, members, *F)` to `(G, *F)`: each group's first member's value or, given the
    members' valid counts, its first member holding data in that feature. (A member
    without any has the fallback shift 0, as far from the data as no shift at all.)"""
    if counts is None:
        return values[:, 0]
    pick = jnp.argmax(counts > 0, axis=1)[:, None]
    return jnp.take_along_axis(values, pick, axis=1)[:, 0]


def _group_sums(parts: tuple[Array, ...], names: tuple[Hashable, ...],
                onehot: Array) -> tuple[Array, ...]:
    """Each part summed within every group: shapes `(G, *part.shape)`, one collective.

    Without groups the parts go to one `psum` as a tuple, not stacked: under `vmap` XLA
    then merges each local reduction with the sum over the batch into one reduction.
    """
    if not names:
        return tuple(v[None] for v in parts)
    if onehot.shape[0] == 1:
        return tuple(v[None] for v in psum_parts(parts, names))
    summed = grouped_psum(jnp.stack(parts), names, onehot)
    return tuple(summed[:, i] for i in range(len(parts)))


def _summed_moments(x: Array, mask: Array | None, cfg: _Config) -> _GroupMoments:
    """Plain sums, checked for cancellation; a second, shifted pass only where it bites.

    For XLA:CPU, whose reductions take `sum(x)` and `sum(x * x)` at memory speed but
    pay about half a pass more for any other elementwise producer (such as
    `x - shift`). The shifted pass runs (under `lax.cond`, so it costs nothing
    otherwise) only when `mean^2 > 3 var` for some feature, where the plain formula
    would lose digits; it is shifted by the first pass's mean, so `mean + E[d]` and
    `E[d^2] - E[d]^2` are exact to rounding. Participants combine by `psum`s of sums
    (at least float32): one, plus one inside the refining branch.
    """
    red, names = cfg.reduction_axes, cfg.names
    xc, m, count, groups, onehot = _local(x, mask, cfg)

    def valid(x):
        xc = x.astype(cfg.dtype)
        return xc if m is None else jnp.where(m, xc, 0)

    # Each sum gets its own spelling of `x` (an optimization barrier, gone once XLA has
    # fused): a producer shared by two fusions (these sums, or the normalisation) is
    # written out in full first, which for a half-precision `x` is a float32 copy
    # (measured on bfloat16: 4.5x slower sums).
    x1, x2 = lax.optimization_barrier((x, x))
    s1, s2 = valid(x1).sum(red), jnp.square(valid(x2)).sum(red)
    if m is None:  # the count is static: no need to sum it
        s1, s2 = _group_sums((s1, s2), names, onehot)
        members = 1 if groups is None else groups.members.shape[1]
        total = count[None] * members
    else:
        s1, s2, total = _group_sums((s1, s2, count), names, onehot)
    mean = s1 / total
    var = jnp.maximum(s2 / total - mean * mean, 0)
    # Decided on every group's sums, which every participant holds: the same branch
    # everywhere, and an unbatched predicate under `vmap`, so the cond stays a cond.
    refine = jnp.any(jnp.isfinite(mean) & ~(mean * mean <= _CANCELLATION_LIMIT * var))

    # The branches take `x` itself (an operand of a `lax.cond` is materialised, and
    # `x.astype(float32)` would be a full float32 copy of a half-precision `x`) and
    # return the statistics themselves, so that they reach the normalisation as
    # vectors rather than as formulas XLA would re-evaluate for every element.
    def refined(x, m, mean, var):
        xc = x.astype(cfg.dtype)
        # `shift + E[x - shift]` with one stop-gradient shift: its derivatives (which
        # second-order differentiation of the JVP rule goes through) are the mean's.
        shift = lax.stop_gradient(mean)
        mine = select(shift, onehot)
        # Two differently spelled shifts, so that XLA fuses each subtraction into its
        # reduction instead of writing `x - shift` out once for both.
        d = xc - _expand(mine, red)
        e = xc - _expand(lax.optimization_barrier(mine), red)
        if m is not None:
            m = jnp.broadcast_to(m, x.shape)
            d, e = jnp.where(m, d, 0), jnp.where(m, e, 0)
        # Reduced inside the branch: without refinement, one collective per call.
        t1, t2 = _group_sums((d.sum(red), (e * e).sum(red)), names, onehot)
        d1 = t1 / total
        return shift + d1, jnp.maximum(t2 / total - d1 * d1, 0)

    def kept(x, m, mean, var):
        return mean, var

    mean, var = lax.cond(refine, refined, kept, x, mask, mean, var)
    return _GroupMoments(mean, var, total, onehot)


def _outputs(gm: _GroupMoments) -> tuple[Array, Array, Array, Array]:
    return (select(gm.mean, gm.onehot), select(gm.var, gm.onehot),
            gm.mean.mean(0), gm.var.mean(0))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _moments(x: Array, mask: Array | None, cfg: _Config):
    return _outputs(_group_moments(x, mask, cfg))


def _local_tangents(red: tuple[int, ...], dtype: Any, x: Array, mask: Array | None,
                    mean: Array, dx: Array) -> tuple[Array, Array]:
    dxc = dx.astype(dtype)
    if mask is not None:
        dxc = jnp.where(jnp.broadcast_to(mask, x.shape), dxc, 0)
    centred = x.astype(dtype) - _expand(mean, red)
    return dxc.sum(red), (centred * dxc).sum(red)


@_moments.defjvp
def _moments_jvp(cfg: _Config, primals, tangents):
    x, mask = primals
    dx = tangents[0]
    gm = _group_moments(x, mask, cfg)
    out = _outputs(gm)
    # Rematerialised: reverse mode keeps `x` as the residual (not a float32 copy of
    # `x - mean`) and recomputes `x - mean` inside the backward pass's elementwise
    # fusion. The two sums stay separate arrays (not stacked): their cotangents then
    # reach that fusion as two vectors, not as slices of a padded block.
    local = jax.checkpoint(partial(_local_tangents, cfg.reduction_axes, cfg.dtype),
                           prevent_cse=False)
    t1, t2 = _group_sums(local(x, mask, out[0], dx), cfg.names, gm.onehot)
    dmean = t1 / gm.count
    dvar = 2 * t2 / gm.count
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


def _check_statistics_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The library's own checks first, so they (not the annotations) name the problem."""
    check_float_input(arguments["x"])
    if arguments.get("mask") is not None:
        check_mask(arguments["mask"], tuple(np.shape(arguments["x"])))
    return arguments


@with_argument_checks(_check_statistics_arguments)
@jaxtyped(typechecker=beartype)
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
    - `use_fast_variance`: one pass over `x` that stays accurate when the mean dwarfs
      the spread (shifted; on CPU, plain sums plus a shifted pass only where they
      would cancel: see the module notes) if `True`; the two-pass
      $E[(x-\mu)^2]$ if `False`.
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
    check_reducible(x.shape, feature_axes, bool(names))
    if mask is not None:
        check_mask(mask, x.shape)
        mask = jnp.asarray(mask)
    groups = check_axis_index_groups(axis_index_groups, axis_name)
    cfg = _Config(red, names, groups, bool(use_fast_variance),
                  statistics_dtype(x.dtype, dtype, force_float32_reductions))
    return BatchStatistics(*_moments(x, mask, cfg))


@with_argument_checks(lambda arguments: arguments)
@jaxtyped(typechecker=beartype)
def update_running_average(
    running: Float[Array, "*features"],
    batch: Float[Array, "*features"],
    momentum: float | Float[Array, ""],
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
    - `momentum`: $m$, in $[0, 1]$.

    **Returns:**

    The updated running statistic, with `running`'s dtype.
    """
    new = momentum * running + (1 - momentum) * lax.stop_gradient(batch)
    return new.astype(running.dtype)
