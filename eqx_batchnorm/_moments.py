r"""The batch statistics: three estimators of the mean and biased variance, and their
derivatives.

Private and unchecked: the public entry points validate, then call `moments`, which
computes $\mu = \frac{1}{N} \sum_{i \in \mathcal{M}} x_i$ and
$\sigma^2 = \frac{1}{N} \sum_{i \in \mathcal{M}} (x_i - \mu)^2$ over the unmasked
positions $\mathcal{M}$ of every participant of a group. `estimator` picks, in one place:

- `"two_pass"` (`use_fast_variance=False`): the mean, then $\sum (x - \mu)^2$, in the
  statistics dtype as Flax's.
- `"shifted"`: one pass over $x - K$, $K$ the mean of a few leading valid samples, so
  the sums do not cancel; participants across devices combine by Chan's formula.
- `"summed"`: the plain sums $\sum x$, $\sum x^2$, and a second pass shifted by the
  first mean (under `lax.cond`) only where $\mu^2 > 3\sigma^2$ for some feature.

The one-pass sums accumulate in at least float32 (half precision would round away the
spread). **Gradients:** hand-written, $\dot\mu = \frac1N\sum\dot x$,
$\dot{\sigma^2} = \frac2N\sum (x-\mu)\dot x$, one (grouped) `psum`, rematerialised so
that reverse mode keeps `x` as the residual; the custom rules are local, so they hold
wherever and whenever JAX traces them (see `moments`).
"""

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import core, lax
from jaxtyping import Array

from . import _backend
from ._participants import Participants, leading, place, sharded_along

# The plain sums are trusted while E[x^2] <= 4 var, i.e. mean^2 <= 3 var: the subtraction
# E[x^2] - E[x]^2 then loses at most two bits.
_CANCELLATION_LIMIT = 3.0


def estimator(use_fast_variance: bool) -> str:
    """The estimator for `use_fast_variance` on the current backend."""
    if not use_fast_variance:
        return "two_pass"
    return "summed" if _backend.platform() == "cpu" else "shifted"


def statistics_dtype(x_dtype: Any, dtype: Any, force_float32_reductions: bool) -> Any:
    """Flax's rule: `dtype` if given, else `x`'s; at least float32 when forcing."""
    base = jnp.dtype(dtype) if dtype is not None else jnp.dtype(x_dtype)
    return jnp.promote_types(base, jnp.float32) if force_float32_reductions else base


class Config(NamedTuple):
    """Static configuration of `moments`: hashable, so traces are cached per value."""

    reduction_axes: tuple[int, ...]
    names: tuple[Hashable, ...]
    groups: tuple[tuple[int, ...], ...] | None
    estimator: str  # "two_pass", "shifted" or "summed"
    dtype: Any  # of the statistics

    @property
    def accumulate(self) -> Any:
        return jnp.promote_types(self.dtype, jnp.float32)


class _Moments(NamedTuple):
    mean: Array  # (G, *features): every group's statistics
    var: Array
    count: Array


def _expand(v: Array, axes: tuple[int, ...]) -> Array:
    return jnp.expand_dims(v, axes) if axes else v


def _count(x: Array, m: Array | None, cfg: Config) -> Array:
    """This participant's number of valid elements, per feature."""
    red = cfg.reduction_axes
    if m is None:
        n = math.prod(x.shape[a] for a in red)
        return jnp.full(tuple(s for a, s in enumerate(x.shape) if a not in red), n,
                        cfg.accumulate)
    return m.sum(red, dtype=cfg.accumulate)


def _broadcast(mask: Array | None, x: Array) -> Array | None:
    return None if mask is None else jnp.broadcast_to(mask, x.shape)


def _valid(v: Array, m: Array | None) -> Array:
    return v if m is None else jnp.where(m, v, 0)


def _two_pass(x: Array, mask: Array | None, p: Participants, cfg: Config) -> _Moments:
    # In the statistics dtype, as Flax computes it: nothing cancels, and half-precision
    # statistics round as Flax's do.
    red = cfg.reduction_axes
    m = _broadcast(mask, x)
    xc = x.astype(cfg.dtype)
    s1, total = p.sum((_valid(xc, m).sum(red), _count(x, m, cfg).astype(cfg.dtype)))
    means = s1 / total
    dev = _valid(xc - _expand(p.select(means), red), m)
    (s2,) = p.sum(((dev * dev).sum(red),))
    return _Moments(means, s2 / total, total)


# The shift is the mean of at least this many leading samples (where the data has them):
# the sums then measure a spread only about 1/16 wider than the variance itself, and the
# one-pass variance is as accurate as the two-pass one.
_SHIFT_SAMPLES = 32


def _shift(xc: Array, m: Array | None, red: tuple[int, ...]) -> Array:
    """Per feature, the mean of the valid values among the first few samples; where
    there are none, the first valid value along the reduced axes (0 if none)."""
    inner = math.prod(xc.shape[a] for a in red[1:])
    # `jax.core`'s min and max also take symbolic sizes (`jax.export`), where `min` and
    # `max` would compare them with a constant.
    k = core.min_dim(xc.shape[red[0]], -(-_SHIFT_SAMPLES // core.max_dim(inner, 1)))
    head = leading(xc, red[0], k)
    if m is None:
        return head.mean(red)
    valid = leading(m, red[0], k)
    n = valid.sum(red, dtype=xc.dtype)
    head_mean = jnp.where(valid, head, 0).sum(red) / jnp.where(n > 0, n, 1)
    return jnp.where(n > 0, head_mean, _first_valid_sample(xc, m, red))


def _first(v: Array, red: tuple[int, ...]) -> Array:
    """`v` at index 0 along each of `red` (which are dropped)."""
    for a in red:
        v = leading(v, a, 1)
    return jnp.squeeze(v, red)


def _first_valid_sample(xc: Array, m: Array, red: tuple[int, ...]) -> Array:
    """`xc` at the first unmasked position along `red`, per feature (0 where none is).
    Under explicit sharding of the reduced axes, where JAX cannot gather unambiguously:
    the first sample, if it is valid."""
    if sharded_along(xc, red):
        return jnp.where(_first(m, red), _first(xc, red), 0)
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


def _shifted_sums(xc: Array, m: Array | None, shift: Array,
                  red: tuple[int, ...]) -> tuple[Array, Array]:
    """`sum(x - shift)` and `sum((x - shift)^2)` over the valid positions: one fused pass."""
    d = _valid(xc - _expand(shift, red), m)
    return d.sum(red), (d * d).sum(red)


def _shifted(x: Array, mask: Array | None, p: Participants, cfg: Config) -> _Moments:
    red = cfg.reduction_axes
    m = _broadcast(mask, x)
    xc = x.astype(cfg.accumulate)
    count = _count(x, m, cfg)
    # The shift cancels out of mean and variance exactly, hence stop_gradient.
    shift = lax.stop_gradient(_shift(xc, m, red))
    if not p.on_devices:
        # One program holds every participant: the group's shift (its first member
        # holding data) is a slice, not a communication, and the shifted sums combine
        # by one `psum` that XLA merges with the local reductions. (Chan's formula over
        # an `all_gather` would cost a dozen feature-sized kernels more.)
        first = p.first_holding_data(p.by_group(shift),
                                     None if m is None else p.by_group(count))
        parts = _shifted_sums(xc, m, lax.stop_gradient(p.select(first)), red)
        s1, s2, total = p.sum((*parts, count)) if m is not None else (
            *p.sum(parts), count[None] * p.members)
        d1 = s1 / total
        var = jnp.maximum((s2 - s1 * d1) / total, 0)
        return _Moments(lax.stop_gradient(first) + d1, var, total)

    # Across devices: Chan et al.'s parallel combination, every participant relative to
    # the shift of its group's first member holding data (in that feature), so only
    # differences of nearby values are formed.
    s1, s2 = _shifted_sums(xc, m, shift, red)
    local_mean = s1 / jnp.where(count > 0, count, 1)
    m2 = s2 - s1 * local_mean
    summary = p.by_group(jnp.stack([count, shift, local_mean, m2]))
    n, k, local_mean, m2 = (summary[:, :, i] for i in range(4))  # (G, members, *F)
    ref = p.first_holding_data(k, None if m is None else n)
    offset = (k - ref[:, None]) + local_mean
    total = n.sum(1)
    mean_offset = (n * offset).sum(1) / total
    m2 = m2.sum(1) + (n * jnp.square(offset - mean_offset[:, None])).sum(1)
    return _Moments(ref + mean_offset, jnp.maximum(m2 / total, 0), total)


def _summed(x: Array, mask: Array | None, p: Participants, cfg: Config) -> _Moments:
    red = cfg.reduction_axes
    m = _broadcast(mask, x)
    # Each sum gets its own spelling of `x` (an optimization barrier, gone once XLA has
    # fused): a producer shared by two fusions is written out in full first, which for
    # a half-precision `x` is a float32 copy.
    x1, x2 = lax.optimization_barrier((x, x))
    s1 = _valid(x1.astype(cfg.accumulate), m).sum(red)
    s2 = jnp.square(_valid(x2.astype(cfg.accumulate), m)).sum(red)
    if m is None:  # the count is static: no need to sum it
        s1, s2 = p.sum((s1, s2))
        total = _count(x, m, cfg)[None] * p.members
    else:
        s1, s2, total = p.sum((s1, s2, _count(x, m, cfg)))
    mean = s1 / total
    var = jnp.maximum(s2 / total - mean * mean, 0)
    # Decided on every group's sums, which every participant holds: the same branch
    # everywhere, and an unbatched predicate under `vmap`, so the cond stays a cond.
    refine = jnp.any(jnp.isfinite(mean) & ~(mean * mean <= _CANCELLATION_LIMIT * var))
    refined, kept = _refinement(cfg)
    mean, var = lax.cond(refine, refined, kept, x, mask, mean, var, total)
    return _Moments(mean, var, total)


@functools.cache
def _refinement(cfg: Config):
    """The two branches of `_summed`'s `lax.cond`, built once per configuration so that
    JAX's caches hit. They take `x` itself (a cond's operand is materialised: a float32
    copy of a half-precision `x` would be) and return the statistics as vectors."""
    red = cfg.reduction_axes

    def refined(x, mask, mean, var, total):
        p = Participants(cfg.names, cfg.groups)
        m = _broadcast(mask, x)
        xc = x.astype(cfg.accumulate)
        # `shift + E[x - shift]` with one stop-gradient shift: its derivatives (which
        # second-order differentiation of the JVP rule goes through) are the mean's.
        shift = lax.stop_gradient(mean)
        mine = p.select(shift)
        # Two differently spelled shifts, so that XLA fuses each subtraction into its
        # reduction instead of writing `x - shift` out once for both.
        d = _valid(xc - _expand(mine, red), m)
        e = _valid(xc - _expand(lax.optimization_barrier(mine), red), m)
        t1, t2 = p.sum((d.sum(red), (e * e).sum(red)))
        d1 = t1 / total
        return shift + d1, jnp.maximum(t2 / total - d1 * d1, 0)

    def kept(x, mask, mean, var, total):
        return mean, var

    return refined, kept


_ESTIMATORS = {"two_pass": _two_pass, "shifted": _shifted, "summed": _summed}


def _outputs(gm: _Moments, p: Participants, dtype: Any) -> tuple[Array, ...]:
    """This participant's group's statistics, and their average over the groups."""
    outs = (p.select(gm.mean), p.select(gm.var), gm.mean.mean(0), gm.var.mean(0))
    return tuple(o.astype(dtype) for o in outs)


def moments(x: Array, mask: Array | None, cfg: Config) -> tuple[Array, ...]:
    r"""`(mean, var, axis_mean, axis_var)` of `x` over `cfg.reduction_axes` and the named
    axes: this participant's group's statistics, and their average over the groups.

    The estimator computes the values (no gradient flows through it); the derivatives
    come from terms that are zero in value and carry the tangents
    $\dot\mu = \frac1N\sum\dot x$ and $\dot{\sigma^2} = \frac2N\sum (x-\mu)\dot x$. Their
    custom rules are local (no collective), and their sums across participants are
    ordinary `psum`s, bound here where the names are: JAX may trace a custom rule
    later, outside the `vmap` that binds the names (e.g. when it differentiates a
    `lax.scan`), and the rule then needs none. The terms arrive in their group's row
    already (`place`), so that in value they are zero on every participant alike, and
    XLA drops their collectives from programs that do not differentiate."""
    p = Participants(cfg.names, cfg.groups)
    gm = _ESTIMATORS[cfg.estimator](lax.stop_gradient(x), mask, p, cfg)
    mean, var, axis_mean, axis_var = _outputs(gm, p, cfg.dtype)
    count = gm.count.astype(cfg.dtype)
    mean_carrier, carrier = _carriers(cfg)
    # The centre of `(x - mean) dx`, moving with `x`, as second derivatives need. First
    # derivatives ignore its tangent (the deviations sum to zero), and XLA drops it.
    (moving,) = p.sum_rows((mean_carrier(x, mask, p.onehot),))
    t1, t2 = p.sum_rows(carrier(x, mask, mean + p.select(moving / count), p.onehot))
    dmean, dvar = t1 / count, 2 * t2 / count  # (G, *F), zero in value
    return (mean + p.select(dmean), var + p.select(dvar), axis_mean + dmean.mean(0),
            axis_var + dvar.mean(0))


@functools.cache
def _carriers(cfg: Config):
    r"""Functions of value zero whose JVPs are this participant's local sums of the
    tangent over the valid positions, in its group's row (`place`): `mean_carrier`
    $\sum \dot x$, `carrier` $(\sum \dot x, \sum (x - \mu)\,\dot x)$. The sums are
    rematerialised: reverse mode keeps `x` (not a copy of `x - mean`) and recomputes
    `x - mean` inside the backward pass's fusion. Built once per configuration, so that
    JAX's caches recognise them."""
    # In the statistics dtype (the tangents' own), as Flax's autodiff computes them.
    red, dtype = cfg.reduction_axes, cfg.dtype

    def zeros(x: Array, mask: Array | None, onehot: Array, mean: Array | None = None):
        # Zero, but computed from every input: under `vmap`, JAX may batch a rule traced
        # later (e.g. under `lax.scan`) assuming that the value is batched wherever the
        # tangent is. XLA folds the never-taken select away.
        pick = _first(x, red).astype(dtype)
        never = jnp.zeros(pick.shape, bool) & onehot.reshape((-1,) + (1,) * pick.ndim)
        if mask is not None:
            never = never & _first(jnp.broadcast_to(mask, x.shape), red)
        if mean is not None:
            pick = pick + mean
        return jnp.where(never, pick[None], jnp.zeros((), dtype))

    def summed(x: Array, mask: Array | None, onehot: Array, dx: Array) -> Array:
        return place(_valid(dx.astype(dtype), _broadcast(mask, x)).sum(red), onehot)

    def both(x: Array, mask: Array | None, mean: Array, onehot: Array,
             dx: Array) -> tuple[Array, Array]:
        dxc = _valid(dx.astype(dtype), _broadcast(mask, x))
        centred = x.astype(dtype) - _expand(mean, red)
        # Two arrays, not stacked: their cotangents then reach the backward's elementwise
        # fusion as two vectors, not as slices of a padded block.
        return place(dxc.sum(red), onehot), place((centred * dxc).sum(red), onehot)

    summed_r = jax.checkpoint(summed, prevent_cse=False)
    both_r = jax.checkpoint(both, prevent_cse=False)

    @jax.custom_jvp
    def mean_carrier(x, mask, onehot):
        return zeros(x, mask, onehot)

    @mean_carrier.defjvp
    def _(primals, tangents):
        x, mask, onehot = primals
        # The value through the function itself, so that a second derivative taken
        # through this rule still sees the carried tangent.
        return mean_carrier(x, mask, onehot), summed_r(x, mask, onehot, tangents[0])

    @jax.custom_jvp
    def carrier(x, mask, mean, onehot):
        zero = zeros(x, mask, onehot, mean)
        return zero, zero

    @carrier.defjvp
    def _(primals, tangents):
        x, mask, mean, onehot = primals
        return carrier(x, mask, mean, onehot), both_r(x, mask, mean, onehot, tangents[0])

    return mean_carrier, carrier
