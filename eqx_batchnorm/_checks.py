"""Argument checks shared by the functional core and the module.

Every check runs on static information (shapes, dtypes, Python values), so it costs
nothing once a function is traced: errors surface at construction or trace time.
"""

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._errors import fail

Axis = int | tuple[int, ...]
AxisName = Hashable | tuple[Hashable, ...] | None


def as_axis_tuple(axis: Any, argument: str = "axis") -> tuple[int, ...]:
    """`axis` as a non-empty tuple of ints, refusing repeats visible before the rank is known."""
    items = tuple(axis) if isinstance(axis, Sequence) and not isinstance(axis, str) else (axis,)
    if not items or not all(isinstance(a, int | np.integer) and not isinstance(a, bool)
                            for a in items):
        raise fail(argument, "an int or a non-empty tuple of ints naming the feature axes",
                   repr(axis), f"pass e.g. `{argument}=-1` (channels last) or "
                   f"`{argument}=0` (channels first, per example)")
    items = tuple(int(a) for a in items)
    if len(set(items)) != len(items):
        raise fail(argument, "distinct axes", repr(axis), "name each feature axis once")
    return items


def feature_order(axes: tuple[int, ...]) -> tuple[int, ...]:
    """The order Flax stores several feature axes in: ascending once the rank is known.

    Non-negative axes come first, then negative ones, each ascending; that is the
    ascending order for every rank in which the axes are distinct, which
    `canonical_feature_axes` checks at trace time.
    """
    return tuple(sorted(range(len(axes)), key=lambda i: (axes[i] < 0, axes[i])))


def canonical_feature_axes(axes: tuple[int, ...], ndim: int, shape: tuple[int, ...],
                           argument: str = "axis") -> tuple[int, ...]:
    """Feature axes of an `ndim`-dimensional `x`, non-negative and ascending."""
    for a in axes:
        if not -ndim <= a < ndim:
            raise fail(argument, f"axes in [-{ndim}, {ndim}) for `x` of shape {shape}",
                       repr(axes if len(axes) > 1 else axes[0]),
                       "pass the axis of `x` that holds the features; under "
                       "`jax.vmap`, `x` is one example, so channels-first is `axis=0`")
    canon = tuple(a % ndim for a in axes)
    if len(set(canon)) != len(canon):
        raise fail(argument, f"distinct axes of `x` (shape {shape})", repr(axes),
                   "the axes name the same dimension of `x` twice; name it once")
    ordered = tuple(canon[i] for i in feature_order(axes))
    if list(ordered) != sorted(ordered):
        raise fail(argument, "the non-negative feature axes to lie before the negative ones",
                   f"{axes} for `x` of rank {ndim}",
                   "write the feature axes with the same sign, e.g. all negative")
    return ordered


def check_num_features(num_features: Any, axes: tuple[int, ...]) -> tuple[int, ...]:
    """`num_features` as a tuple aligned with `axes`, every size positive."""
    items = (num_features if isinstance(num_features, Sequence) else (num_features,))
    items = tuple(items)
    if not items or not all(isinstance(n, int | np.integer) and not isinstance(n, bool)
                            for n in items):
        raise fail("num_features", "a positive int, or a tuple of positive ints (one per "
                   "feature axis)", repr(num_features), "pass the channel count, e.g. "
                   "`BatchNorm(64)`")
    if any(n <= 0 for n in items):
        raise fail("num_features", "positive sizes", repr(num_features),
                   "pass the number of channels, at least 1")
    if len(items) != len(axes):
        raise fail("num_features", f"{len(axes)} size(s), one for each axis in "
                   f"`axis={axes if len(axes) > 1 else axes[0]}`", repr(num_features),
                   "give one size per feature axis, in the same order as `axis`")
    return tuple(int(n) for n in items)


def check_float_input(x: Any, argument: str = "x") -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        hint = ("complex inputs are not supported; normalise the real and imaginary "
                "parts separately" if jnp.issubdtype(dtype, jnp.complexfloating)
                else f"cast first, e.g. `{argument}.astype(jnp.float32)`")
        raise fail(argument, "a floating-point array (float16, bfloat16, float32, float64)",
                   f"dtype {dtype}", hint)


def check_mask(mask: Any, shape: tuple[int, ...]) -> None:
    mshape = tuple(np.shape(mask))
    mdtype = jnp.result_type(mask)
    if mdtype != jnp.bool_:
        raise fail("mask", "a boolean array (True where an element counts)",
                   f"dtype {mdtype}", "pass e.g. `mask=(x != pad_value)` or "
                   "`mask=m.astype(bool)`")
    ok = len(mshape) <= len(shape) and all(
        m in (1, s) for m, s in zip(mshape[::-1], shape[::-1], strict=False))
    if not ok:
        raise fail("mask", f"a shape broadcastable to x's shape {shape}",
                   f"shape {mshape}", "give the mask x's shape, or size 1 on the axes "
                   "it does not vary along")


def check_axis_index_groups(groups: Any, axis_name: AxisName) -> tuple[tuple[int, ...], ...] | None:
    """Static structure of `axis_index_groups`; checked against the axis size at trace time."""
    if groups is None:
        return None
    if axis_name is None:
        raise fail("axis_index_groups", "to be used together with `axis_name`",
                   f"axis_index_groups={groups!r} with axis_name=None",
                   "pass `axis_name=` for the named axis that the groups split "
                   "(e.g. the `jax.vmap`/`pmap`/`shard_map` axis)")
    try:
        out = tuple(tuple(int(i) for i in g) for g in groups)
    except TypeError:
        raise fail("axis_index_groups", "a sequence of sequences of ints",
                   repr(groups), "pass e.g. `[[0, 1], [2, 3]]`") from None
    if not out or any(len(g) == 0 for g in out):
        raise fail("axis_index_groups", "non-empty groups", repr(groups),
                   "pass e.g. `[[0, 1], [2, 3]]`")
    sizes = {len(g) for g in out}
    flat = [i for g in out for i in g]
    if len(sizes) != 1:
        raise fail("axis_index_groups", "groups of equal size", repr(groups),
                   "split the axis into groups that each hold the same number of indices")
    if sorted(flat) != list(range(len(flat))):
        raise fail("axis_index_groups", f"a partition of the indices 0..{len(flat) - 1}: "
                   "each index in exactly one group", repr(groups),
                   "list every index of the named axis exactly once")
    return out


def check_groups_cover(groups: tuple[tuple[int, ...], ...], size: int,
                       axis_name: AxisName) -> None:
    n = sum(len(g) for g in groups)
    if n != size:
        raise fail("axis_index_groups", f"a partition of all {size} indices of the axis "
                   f"{axis_name!r}", f"groups covering {n} indices: {groups!r}",
                   f"list each of the {size} indices 0..{size - 1} exactly once")


def check_scalar(name: str, value: Any, low: float, high: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise fail(name, "a real number", repr(value), f"pass a float for `{name}`") from None
    if not (low <= v <= high):  # also refuses NaN
        rng = f"[{low}, {high}]" if high != math.inf else f">= {low}"
        raise fail(name, f"a number in {rng}", repr(value),
                   f"pass `{name}` in {rng}" + (", e.g. 0.99 (Flax's default)"
                                                 if name == "momentum" else ""))
    return v
