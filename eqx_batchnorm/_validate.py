"""The checks at the public boundary, run once before private kernels that trust their inputs:
arguments in, canonical values out. They read only static information (shapes, dtypes, the
names bound by enclosing transforms), so jitted code pays nothing for them."""

import math
import sys
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype.door import is_bearable
from jax import lax
from jax.core import Tracer
from jaxtyping import jaxtyped

from ._errors import fail
from ._participants import axis_size, explicit_mesh, full_spec, manual_axes

AxisName = Hashable | tuple[Hashable, ...] | None


def is_int(value: Any) -> bool:
    """An int, but not a bool: `True` is no axis, size or index anyone means."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def as_axis_tuple(axis: Any) -> tuple[int, ...]:
    """`axis` as a non-empty tuple of ints, refusing repeats visible before the rank is known."""
    items = tuple(axis) if isinstance(axis, Sequence) and not isinstance(axis, str) else (axis,)
    if not items or not all(is_int(a) for a in items):
        raise fail("axis", "an int or a non-empty tuple of ints naming the feature axes",
                   repr(axis), "pass e.g. `axis=-1` (channels last) or `axis=0` (channels "
                   "first, per example)")
    items = tuple(int(a) for a in items)
    if len(set(items)) != len(items):
        raise fail("axis", "distinct axes", repr(axis), "name each feature axis once")
    return items


def one_or_all(items: tuple) -> Any:
    """A tuple as the user would write it: a lone item on its own."""
    return items[0] if len(items) == 1 else items


def feature_order(axes: tuple[int, ...]) -> tuple[int, ...]:
    """The order Flax stores several feature axes in: non-negative ones, then negative ones,
    each ascending (ascending once the rank is known; `canonical_feature_axes` checks)."""
    return tuple(sorted(range(len(axes)), key=lambda i: (axes[i] < 0, axes[i])))


def canonical_feature_axes(axes: tuple[int, ...], ndim: int,
                           shape: tuple[int, ...]) -> tuple[int, ...]:
    """Feature axes of an `ndim`-dimensional `x`, non-negative and ascending."""
    if ndim == 0:
        # Without this, a scalar would be reported as an `axis` out of "[-0, 0)".
        raise fail("x", "an array with at least one (feature) axis", "a 0-d array (a "
                   "scalar)", "pass `x` with its features on `axis`, e.g. shape "
                   "(batch, features); a lone scalar has no feature axis")
    for a in axes:
        if not -ndim <= a < ndim:
            raise fail("axis", f"axes in [-{ndim}, {ndim}) for `x` of shape {shape}",
                       repr(one_or_all(axes)),
                       "pass the axis of `x` that holds the features; under "
                       "`jax.vmap`, `x` is one example, so channels-first is `axis=0`")
    canon = tuple(a % ndim for a in axes)
    if len(set(canon)) != len(canon):
        raise fail("axis", f"distinct axes of `x` (shape {shape})", repr(axes),
                   "the axes name the same dimension of `x` twice; name it once")
    ordered = tuple(canon[i] for i in feature_order(axes))
    if list(ordered) != sorted(ordered):
        raise fail("axis", "the non-negative feature axes to lie before the negative ones",
                   f"{axes} for `x` of rank {ndim}",
                   "write the feature axes with the same sign, e.g. all negative")
    return ordered


def check_num_features(num_features: Any, axes: tuple[int, ...]) -> tuple[int, ...]:
    """`num_features` as a tuple aligned with `axes`, every size positive."""
    items = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
    if not items or not all(is_int(n) for n in items):
        raise fail("num_features", "a positive int, or a tuple of positive ints (one per "
                   "feature axis)", repr(num_features), "pass the channel count, e.g. "
                   "`BatchNorm(64)`")
    if any(n <= 0 for n in items):
        raise fail("num_features", "positive sizes", repr(num_features),
                   "pass the number of channels, at least 1")
    if len(items) != len(axes):
        raise fail("num_features", f"{len(axes)} size(s), one for each axis in "
                   f"`axis={one_or_all(axes)}`", repr(num_features),
                   "give one size per feature axis, in the same order as `axis`")
    return tuple(int(n) for n in items)


def check_array(argument: str, value: Any, what: str = "floating-point") -> None:
    """Refuses what is not a JAX or NumPy array, as Flax does (it reads `x.ndim`): a list
    silently converted to float32 would hide dtype mistakes."""
    if not isinstance(value, jax.Array | np.ndarray):
        raise fail(argument, f"a JAX or NumPy {what} array", f"{type(value).__name__} "
                   f"{_short_repr(value)}", f"convert it first, e.g. "
                   f"`{argument}=jnp.asarray({argument})`")


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_float_input(x: Any) -> None:
    check_array("x", x)
    dtype = x.dtype  # a NumPy dtype, also for strings and objects
    if not jnp.issubdtype(dtype, jnp.floating):
        hint = ("complex inputs are not supported; normalise the real and imaginary "
                "parts separately" if jnp.issubdtype(dtype, jnp.complexfloating)
                else "cast first, e.g. `x.astype(jnp.float32)`")
        raise fail("x", "a floating-point array (float16, bfloat16, float32, float64)",
                   f"dtype {dtype}", hint)


def check_mask(mask: Any, shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    check_array("mask", mask, "boolean")
    if mask.dtype != jnp.bool_:
        raise fail("mask", "a boolean array (True where an element counts)", f"dtype {mask.dtype}",
                   "pass e.g. `mask=(x != pad_value)` or `mask=m.astype(bool)`")
    mshape = tuple(np.shape(mask))
    if len(mshape) > len(shape) or not all(
            m in (1, s) for m, s in zip(mshape[::-1], shape[::-1], strict=False)):
        raise fail("mask", f"a shape broadcastable to x's shape {shape}", f"shape {mshape}",
                   "give the mask x's shape, or size 1 on the axes it does not vary along")


def check_axis_index_groups(groups: Any, axis_name: AxisName) -> tuple[tuple[int, ...], ...] | None:
    """Static structure of `axis_index_groups`; checked against the axis size at trace time."""
    if groups is None:
        return None
    if axis_name is None or axis_name == ():
        raise fail("axis_index_groups", "to be used together with `axis_name`",
                   f"axis_index_groups={groups!r} with axis_name=None",
                   "pass `axis_name=` for the named axis that the groups split "
                   "(e.g. the `jax.vmap`/`pmap`/`shard_map` axis)")
    # Indices must be ints: `int(1.7)` would silently move a participant to another group.
    def is_seq(v: Any) -> bool:
        return isinstance(v, Sequence | np.ndarray) and not isinstance(v, str | bytes)

    if not is_seq(groups) or not all(is_seq(g) and all(is_int(i) for i in g) for g in groups):
        raise fail("axis_index_groups", "a sequence of sequences of ints",
                   repr(groups), "pass e.g. `[[0, 1], [2, 3]]`")
    out = tuple(tuple(int(i) for i in g) for g in groups)
    if not out or any(len(g) == 0 for g in out):
        raise fail("axis_index_groups", "non-empty groups", repr(groups),
                   "pass e.g. `[[0, 1], [2, 3]]`")
    flat = [i for g in out for i in g]
    if len({len(g) for g in out}) != 1:
        raise fail("axis_index_groups", "groups of equal size", repr(groups),
                   "split the axis into groups that each hold the same number of indices")
    if sorted(flat) != list(range(len(flat))):
        raise fail("axis_index_groups", f"a partition of the indices 0..{len(flat) - 1}: "
                   "each index in exactly one group", repr(groups),
                   "list every index of the named axis exactly once")
    return out


def check_scalar(name: str, value: Any, low: float, high: float = math.inf, *,
                 finite: bool = False) -> float:
    """`value` as a Python float in `[low, high]` (`finite=True`: not infinite), refusing
    what `float()` accepts but nobody means: strings, bools, complex numbers, arrays, tracers."""
    if isinstance(value, Tracer):
        raise fail(name, "a concrete Python number (it is static, fixed at construction)",
                   f"a traced value {_short_repr(value)}",
                   f"build the layer outside `jit`/`vmap`, with `{name}` a Python float")
    dtype = getattr(value, "dtype", None)  # NumPy scalars and 0-d arrays have one
    real = (isinstance(value, int | float) and not isinstance(value, bool)) or (
        dtype is not None and np.ndim(value) == 0
        and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)))
    if not real:
        raise fail(name, "a real number", f"{type(value).__name__} {_short_repr(value)}",
                   f"pass a float for `{name}`")
    v = float(value)
    if not (low <= v <= high) or (finite and math.isinf(v)):  # also refuses NaN
        rng = f"[{low}, {high}]" if high != math.inf else f"[{low}, inf)"
        what = f"a {'finite ' if finite else ''}number in {rng}"
        raise fail(name, what, repr(value),
                   f"pass `{name}` in {rng}" + (", e.g. 0.99 (Flax's default)"
                                                 if name == "momentum" else ""))
    return v


def check_call_bound(name: str, value: Any, low: float) -> Any:
    """A per-call bound that may be traced (a schedule): checked only when concrete."""
    if value is None or isinstance(value, Tracer):
        return value
    v = check_scalar(name, value, low)
    # An array stays an array; a number becomes the float that the annotation asks for.
    return value if isinstance(value, jax.Array | np.ndarray) else v


def check_flag(name: str, value: Any, expected: str = "a Python bool") -> bool:
    """`value` as a Python bool. `bool("no")` is True: strings and numbers are refused."""
    traced = isinstance(value, Tracer)
    if isinstance(value, bool | np.bool_) or (
            isinstance(value, jax.Array | np.ndarray) and np.ndim(value) == 0
            and value.dtype == np.bool_ and not traced):
        return bool(value)
    raise fail(name, expected, f"{type(value).__name__} {_short_repr(value)}",
               ("it selects the code path while tracing, so it cannot be a traced value: "
                "mark it static (`eqx.filter_jit` does so for Python bools) or branch "
                "with `jax.lax.cond` over two calls") if traced
               else f"pass `{name}=True` or `{name}=False`")


def check_optional_flag(name: str, value: Any) -> bool | None:
    """`value` as a Python bool, or None (meaning: not given)."""
    return None if value is None else check_flag(name, value, "a Python bool or None")


def check_axis_name(axis_name: Any) -> Any:
    """`axis_name` as None, one hashable name, or a tuple of names (a list becomes a tuple)."""
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    for name in as_names(axis_name):
        try:
            hash(name)
        except TypeError:
            raise fail("axis_name", "None, a hashable name (e.g. a str) or a tuple of names",
                       f"{type(name).__name__} {_short_repr(name)}",
                       "pass the `axis_name=` given to `jax.vmap`/`pmap`/`shard_map`, e.g. "
                       "`axis_name='batch'`") from None
        if name is None:
            raise fail("axis_name", "names, not None, inside the tuple", repr(axis_name),
                       "leave None out of the tuple")
    return axis_name


def check_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise fail(name, "an initialiser `init(key, shape, dtype) -> array`",
                   f"{type(value).__name__} {_short_repr(value)}",
                   f"pass e.g. `{name}=jax.nn.initializers.ones`, or "
                   "`jax.nn.initializers.constant(v)` for a constant")


def check_reducible(shape: tuple[int, ...], feature_axes: tuple[int, ...],
                    has_names: bool) -> None:
    """There is something to take statistics over, and it is not empty."""
    reduction_axes = tuple(a for a in range(len(shape)) if a not in feature_axes)
    if not reduction_axes and not has_names:
        raise fail("x", "an axis to reduce over besides the feature axes "
                   f"{feature_axes}, or an `axis_name`", f"shape {shape}",
                   "pass a batch (e.g. shape (batch, features)), or take the statistics "
                   "across a named axis: `jax.vmap(..., axis_name='batch')` with "
                   "`axis_name='batch'` (for the layer: `jax.vmap(bn, axis_name='batch', "
                   "in_axes=(0, None), out_axes=(0, None))` with "
                   "`BatchNorm(..., axis_name='batch')`)")
    empty = tuple(a for a in reduction_axes if shape[a] == 0)
    if empty:
        # Under vmap/pmap/shard_map every participant has this shape: all are empty.
        raise fail("x", "at least one element per feature to take statistics over",
                   f"shape {shape}, empty along axis {empty[0]}",
                   "skip empty batches, or normalise them with the running statistics "
                   "(`inference=True`)")


def as_names(axis_name: AxisName) -> tuple[Hashable, ...]:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def check_participants(names: tuple[Hashable, ...],
                       groups: tuple[tuple[int, ...], ...] | None) -> None:
    """Every name is bound, the groups partition the axis, and JAX can reduce over the names."""
    size = axis_size(names)
    covered = sum(len(g) for g in groups or ())
    if groups is not None and covered != size:
        raise fail("axis_index_groups", f"a partition of all {size} indices of the axis "
                   f"{one_or_all(names)!r}", f"groups covering {covered} indices: {groups!r}",
                   f"list each of the {size} indices 0..{size - 1} exactly once")
    manual = manual_axes()
    vmapped = [n for n in names if n not in manual]
    if vmapped and manual and _tracks_replication(next(iter(manual))):
        # JAX 0.10's replication checker fails on any collective over a `vmap` name
        # inside `shard_map` (an internal AssertionError); say what to do instead.
        raise fail("axis_name",
                   "`vmap` names to be reduced over only outside `jax.shard_map`, or inside one "
                   "built with `check_vma=False`",
                   f"the `vmap` name(s) {tuple(vmapped)!r} inside a `jax.shard_map` over "
                   f"{tuple(sorted(map(str, manual)))!r} with `check_vma=True`",
                   "build the shard_map with `jax.shard_map(..., check_vma=False)` (JAX cannot "
                   "check replication across `vmap` names), or use the batched style inside "
                   "shard_map: `BatchNorm(..., axis_name=<mesh axis>)` on the local batch")


def _tracks_replication(mesh_name: Hashable) -> bool:
    """Whether the enclosing `shard_map` checks replication (`check_vma=True`)."""
    mat = getattr(jax.typeof(lax.axis_index(mesh_name)), "mat", None)
    return bool(getattr(mat, "varying", None))


def _vmap_levels(value: Any) -> list[tuple[Any, Any, Any, int]]:
    """`(trace, axis name, mapped value, batch axis)` for each `vmap` that maps `value`,
    innermost first. Reads JAX's private tracers: another layout only turns the checks off."""
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:
        return []
    levels = []
    while isinstance(value, BatchTracer):
        if value.batch_dim is not None:  # None: not mapped at this level
            name = getattr(getattr(value._trace, "axis_data", None), "name", None)
            levels.append((value._trace, name, value.val, value.batch_dim))
        value = value.val
    return levels


def check_vmap_batch_unsharded(x: Any, names: tuple[Hashable, ...]) -> None:
    """Refuses a `vmap` axis in `names` whose batch dimension is sharded over an explicit
    mesh: JAX 0.10 cannot lower a `psum` over it (a raw `ValueError`)."""
    for _, name, mapped, axis in _vmap_levels(x):
        mesh = explicit_mesh(mapped) if name in names else None
        if mesh is None or full_spec(mapped)[axis] is None:
            continue
        raise fail(
            "axis_name", f"a `jax.vmap` axis {name!r} whose examples are not sharded over "
            "an explicit mesh (JAX cannot yet reduce over such an axis)",
            f"the examples sharded as {full_spec(mapped)[axis]!r} over the mesh "
            f"{dict(mesh.shape)} with `AxisType.Explicit` axes",
            "make the mesh with `axis_types=(jax.sharding.AxisType.Auto,)`, or use the "
            "batched style on the whole sharded batch (`BatchNorm(C, axis=1)` on "
            "(N, C, H, W), `axis_name=None`: XLA's partitioner makes the statistics "
            "global), or `jax.shard_map` with `BatchNorm(..., axis_name=<mesh axis>)`")


PER_INDEX_WARNING = "BatchNorm: running statistics per mapped index"


def warn_per_index_statistics(x: Any, running: Any, names: tuple[Hashable, ...]) -> None:
    """Warns of a training call whose statistics are taken across none of the `vmap`s that
    map `x`, while one of them leaves the state unmapped: the new running statistics then
    come out mapped, one set per index. Legal (vmapping a batched model over tasks,
    `out_axes=(0, 0)`), so not refused; but the commonest `vmap` mistake (a layer without
    `axis_name`) looks the same, and JAX then refuses `out_axes=None` for the state with
    a message about axis specs, which this warning, shown just before, explains."""
    x_levels = _vmap_levels(x)
    if any(name in names for _, name, _, _ in x_levels):
        return  # reduced across a vmap of `x` (e.g. inside an unnamed ensemble vmap)
    state_levels = [trace for trace, *_ in _vmap_levels(running)]
    foreign = [name for level, name, _, _ in x_levels if level not in state_levels]
    if not foreign:
        return
    name = foreign[0]
    under = (f"`jax.vmap(..., axis_name={name!r})`" if isinstance(name, str)
             else "a `jax.vmap` without `axis_name`")
    want = repr(name) if isinstance(name, str) else "'batch'"
    given = names[0] if len(names) == 1 else (names or None)
    warnings.warn(
        f"{PER_INDEX_WARNING}: a layer with axis_name={given!r} is trained under {under} "
        "that maps `x` but not the state, so every mapped index gets its own running "
        "statistics and the state comes out mapped. For statistics across the examples "
        f"(a per-example model), construct the layer with `BatchNorm(..., "
        f"axis_name={want})` and call it under `jax.vmap(bn, axis_name={want}, "
        "in_axes=(0, None), out_axes=(0, None))(xs, state)`: with `out_axes=None` for the "
        "state, JAX refuses this call ('got axis spec None but output was batched'). For "
        "one set per index on purpose, map the state out (`out_axes=(0, 0)`) and silence "
        f"this with `warnings.filterwarnings('ignore', message={PER_INDEX_WARNING!r})`.",
        UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The `stacklevel` of the first frame outside this library, JAX and Equinox (the
    user's line calling the `vmap`), for `warnings.warn` called from one level below."""
    skip = tuple(str(Path(str(m.__file__)).parent)
                 for m in (jax, eqx, sys.modules[str(__package__)]))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def check_state_on_mesh(x: Any, running: Any) -> None:
    """A batch on an explicit mesh gives statistics typed on that mesh, which a state on no
    mesh cannot take (`eqx.nn.State.set` compares shardings)."""
    mesh = explicit_mesh(x)
    if mesh is not None and jax.typeof(running).sharding.mesh.empty:
        raise fail("state",
                   f"running statistics placed on the mesh of the batch ({dict(mesh.shape)}), "
                   "since the batch is sharded over it",
                   "a state on no mesh (e.g. fresh from `eqx.nn.make_with_state`)",
                   "replicate model and state on the mesh inside the jitted step: `model, state = "
                   "eqx.filter_shard((model, state), NamedSharding(mesh, P()))`, or "
                   "`jax.device_put` them with that sharding beforehand")


def leading_axes(shape: tuple[int, ...], feature_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes in front of `feature_shape` in `shape` (the blocks of a stacked model's
    statistics), or None where `shape` does not end with `feature_shape` after some."""
    k = len(shape) - len(feature_shape)
    return tuple(shape[:k]) if k > 0 and tuple(shape[k:]) == feature_shape else None


def per_block_fix(per_block: str, blocks: tuple[int, ...]) -> str:
    """The fix for a stacked (scanned) model's state given to one layer's function;
    `per_block`: that function mapped over the blocks (or "" for the layer's call)."""
    where = (f"this is the state of blocks stacked {blocks} (a scanned model): apply the "
             "blocks with `ebn.scan_blocks(blocks, state, x)` (or inside `jax.lax.scan`)")
    return where + (f", and map functions of one layer over the blocks: `{per_block}`"
                    if per_block else "")


def describe(value: Any) -> str:
    """A short description of an argument, for messages."""
    if isinstance(value, jax.Array | np.ndarray):
        kind = "NumPy array" if isinstance(value, np.ndarray) else "array"
        return f"a {kind} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {_short_repr(value)}"


def check_annotations(function: str, hints: dict[str, Any], values: dict[str, Any]) -> None:
    """Checks `values` against the jaxtyping annotations `hints`, with one shape memo (so
    `*features` means one shape throughout), reporting the first mismatch."""
    with jaxtyped("context"):
        for name, value in values.items():
            hint = hints[name]
            if value is not None and not is_bearable(value, hint):
                expected = getattr(hint, "__name__", None) or repr(hint)
                raise fail(name, expected.replace("jaxlib._jax.Array", "Array"), describe(value),
                           f"see the annotations of `{function}`: arguments annotated with the "
                           "same dimension names must agree in shape")
