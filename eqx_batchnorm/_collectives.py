"""Collectives over named axes, with `axis_index_groups` emulated everywhere.

JAX implements grouped collectives only under `pmap`. Here groups are emulated with
ordinary collectives that exist under `vmap`, `pmap` and `shard_map` alike:

- a grouped sum is one `psum` of a one-hot block with a slot per group, after which
  every participant holds the sums of *all* groups (so the whole-axis average of the
  group statistics costs nothing more);
- a gather is one `all_gather` over the device (mesh) names, plus one per `vmap` name,
  which `vmap` turns into a broadcast: no communication.

Several names (`axis_name=("batch", "device")`) act as one axis whose index is the
row-major combination of the names, first name outermost, as `lax.axis_index` does.

**Replication.** Under `jax.shard_map` (whose `check_vma=True` tracks which values vary
across devices), what every device computes from a `psum` or an invariant gather is
typed as replicated, so running statistics derived from it can be returned with
`out_specs=P()` and pass `eqx.nn.State.set`'s type check. A plain `lax.all_gather`
would type its result as varying; the gathers here are therefore invariant ones.
"""

from collections.abc import Hashable
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool

from ._checks import check_groups_cover
from ._errors import fail


def as_names(axis_name: Hashable | tuple[Hashable, ...] | None) -> tuple[Hashable, ...]:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _manual_axes() -> frozenset[Hashable]:
    """Mesh axes bound by an enclosing `shard_map` or `pmap` (empty under `vmap` alone)."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def across_devices(names: tuple[Hashable, ...]) -> bool:
    """Whether any of `names` is a device (mesh) axis, rather than a `vmap` axis whose
    participants all live in one program."""
    return not _manual_axes().isdisjoint(names)


def _varying(value: Array) -> frozenset[Hashable]:
    """The `shard_map` axes along which `value` is typed as varying (empty elsewhere)."""
    aval = jax.typeof(value)
    mat = getattr(aval, "mat", None)  # JAX >= 0.10; older JAX spells it `vma`
    varying = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
    return frozenset(varying or ())


def _tracks_replication(mesh_name: Hashable) -> bool:
    """Whether the enclosing `shard_map` checks replication (`check_vma=True`)."""
    return bool(_varying(lax.axis_index(mesh_name)))


def typed_like(value: Array, *refs: Array | None,
               reduced: tuple[Hashable, ...] = ()) -> Array:
    """`value` typed as a `psum` over `reduced` of something computed from `refs` is.

    Under `shard_map` with `check_vma=True`, the branches of a `lax.cond` must agree on
    which axes their results vary along; a branch that skips a computation returns
    constants, which this types like the other branch's result (varying wherever a
    ref varies, except along `reduced`). A no-op under `vmap`, `pmap` and plain `jit`.
    """
    want = frozenset().union(*(_varying(r) for r in refs if r is not None))
    missing = tuple(want - set(reduced) - _varying(value))
    return lax.pcast(value, missing, to="varying") if missing else value


def axis_size(names: tuple[Hashable, ...]) -> int:
    """The number of participants along `names`, with a clear error for a name that is
    unbound, or that JAX cannot reduce over in this context."""
    size = 1
    for name in names:
        try:
            size *= int(lax.axis_size(name))
        except NameError:
            raise fail(
                "axis_name", "a name bound by an enclosing `jax.vmap`, `jax.pmap` or "
                "`jax.shard_map`", f"the unbound name {name!r}",
                f"call the layer under `jax.vmap(bn, axis_name={name!r}, in_axes=(0, None), "
                f"out_axes=(0, None))(xs, state)` (or pmap/shard_map with that axis "
                "name), or construct it with `axis_name=None` for a batched `x`. If it "
                "already runs under that `vmap`: JAX 0.10 loses `vmap`'s names when "
                "differentiating a `jax.jit` that contains the `vmap` (e.g. "
                "`jax.grad(jax.jit(jax.vmap(...)))`); put the `jit` outside the "
                "differentiation instead: `jax.jit(jax.grad(...))`",
            ) from None
    manual = _manual_axes()
    vmapped = [n for n in names if n not in manual]
    if vmapped and manual and _tracks_replication(next(iter(manual))):
        # JAX 0.10's replication checker fails on any collective over a `vmap` name
        # inside `shard_map` (an internal AssertionError); say what to do instead.
        raise fail(
            "axis_name", "`vmap` names to be reduced over only outside `jax.shard_map`, "
            "or inside one built with `check_vma=False`",
            f"the `vmap` name(s) {tuple(vmapped)!r} inside a `jax.shard_map` over "
            f"{tuple(sorted(map(str, manual)))!r} with `check_vma=True`",
            "build the shard_map with `jax.shard_map(..., check_vma=False)` (JAX cannot "
            "check replication across `vmap` names), or use the batched style inside "
            "shard_map: `BatchNorm(..., axis_name=<mesh axis>)` on the local batch",
        )
    return size


def axis_index(names: tuple[Hashable, ...]) -> Array:
    index = jnp.zeros((), jnp.int32)
    for name in names:
        index = index * lax.axis_size(name) + lax.axis_index(name)
    return index


def all_gather(v: Array, names: tuple[Hashable, ...]) -> Array:
    """Every participant's `v`, stacked in axis-index order: shape `(size, *v.shape)`.

    Consecutive device (mesh) names are gathered by one invariant `all_gather`, so the
    result is typed as replicated under `shard_map`; `vmap` names one at a time (JAX
    cannot mix them with mesh names in one gather), which costs no communication.
    """
    manual = _manual_axes()
    runs: list[tuple[bool, list[Hashable]]] = []
    for name in names:
        on_mesh = name in manual
        if runs and runs[-1][0] == on_mesh:
            runs[-1][1].append(name)
        else:
            runs.append((on_mesh, [name]))
    out = v
    for on_mesh, run in reversed(runs):  # innermost first: row-major, first name outermost
        if on_mesh:
            out = lax.all_gather(out, tuple(run), to="invarying")
        else:
            for name in reversed(run):
                out = lax.all_gather(out, name)
    return out.reshape((-1, *v.shape))


def first_sample(x: Array, axes: tuple[int, ...]) -> Array:
    """`x` at index 0 along each of `axes` (which are dropped).

    Under explicit sharding JAX refuses to slice one element off a sharded axis; the
    slice is then taken in auto mode, where the partitioner reads it from the shard
    that holds it (one all-reduce of a feature-sized array), as it does for any jit.
    """
    index = tuple(0 if a in axes else slice(None) for a in range(x.ndim))
    sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    if sharding.mesh.empty or all(spec[a] is None for a in axes):
        return x[index]
    out_spec = jax.sharding.PartitionSpec(*(spec[a] for a in range(x.ndim) if a not in axes))
    take = jax.sharding.auto_axes(lambda v: v[index],
                                  out_sharding=sharding.update(spec=out_spec))
    return cast(Array, take(x))


def like_running(new: Array, running: Array) -> Array:
    """`new` with `running`'s sharding, so that `eqx.nn.State.set` (which compares
    shardings under explicit meshes) accepts the updated running statistics.

    Statistics reduced from a batch sharded over an explicit mesh are typed on that
    mesh, with the features' sharding; the state keeps its own layout (e.g. replicated
    while the features are split over a model axis). A state that lives on no mesh
    cannot take values typed on one, hence the error with the recipe.
    """
    new_sharding = jax.typeof(new).sharding
    mesh = new_sharding.mesh
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return new
    old_sharding = jax.typeof(running).sharding
    if old_sharding.mesh.empty:
        raise fail(
            "state", "running statistics placed on the mesh of the batch "
            f"({dict(mesh.shape)}), since the batch is sharded over it",
            "a state on no mesh (e.g. fresh from `eqx.nn.make_with_state`)",
            "replicate model and state on the mesh inside the jitted step: `model, state "
            "= eqx.filter_shard((model, state), NamedSharding(mesh, P()))`, or "
            "`jax.device_put` them with that sharding beforehand",
        )
    if old_sharding.spec == new_sharding.spec:
        return new
    return jax.sharding.reshard(new, old_sharding)


class Groups:
    """The static layout of `axis_index_groups` over an axis of `size` participants."""

    def __init__(self, groups: tuple[tuple[int, ...], ...] | None, size: int,
                 axis_name: object):
        if groups is None:
            groups = (tuple(range(size)),)
        else:
            check_groups_cover(groups, size, axis_name)
        self.members = np.asarray(groups, dtype=np.int32)  # (G, size // G)
        self.group_of = np.empty(size, np.int32)
        for g, row in enumerate(groups):
            self.group_of[list(row)] = g

    @property
    def count(self) -> int:
        return self.members.shape[0]


def my_group(groups: Groups, names: tuple[Hashable, ...]) -> Bool[Array, " G"]:
    """One-hot over groups, True at the group of this participant."""
    if groups.count == 1:
        return jnp.ones((1,), bool)
    g = jnp.asarray(groups.group_of)[axis_index(names)]
    return jnp.arange(groups.count) == g


def grouped_psum(v: Array, names: tuple[Hashable, ...], onehot: Array) -> Array:
    """Sums of `v` within every group, shape `(G, *v.shape)`, on every participant."""
    if onehot.shape[0] == 1:
        return lax.psum(v, names)[None]
    block = jnp.where(onehot.reshape((-1,) + (1,) * v.ndim), v[None], jnp.zeros_like(v)[None])
    return lax.psum(block, names)


def psum_parts(parts: tuple[Array, ...], names: tuple[Hashable, ...]) -> tuple[Array, ...]:
    """Each of `parts` summed across `names`, in one collective.

    Across devices the parts are stacked into one `psum` (one all-reduce, not one per
    part). Over `vmap` names alone no communication happens, and a tuple `psum` lets
    XLA merge each part's local reduction with the sum over the batch.
    """
    if any(name in _manual_axes() for name in names) and len(parts) > 1:
        summed = lax.psum(jnp.stack(parts), names)
        return tuple(summed[i] for i in range(len(parts)))
    return tuple(lax.psum(parts, names))


def select(per_group: Array, onehot: Array) -> Array:
    """This participant's row of a `(G, ...)` array, without a gather."""
    if onehot.shape[0] == 1:
        return per_group[0]
    mask = onehot.reshape((-1,) + (1,) * (per_group.ndim - 1))
    return jnp.where(mask, per_group, jnp.zeros_like(per_group)).sum(0)
