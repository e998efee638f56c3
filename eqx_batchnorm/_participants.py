"""Who the statistics are taken with, and every collective that reaches them.

`Participants` is the one seam for communication: the estimators in `_moments.py` only
ever call its methods (`sum`, `by_group`, `select`, `first_holding_data`), so a new
collective strategy is an edit of this file alone.

JAX implements grouped collectives only under `pmap`. Here `axis_index_groups` is
emulated with collectives that exist under `vmap`, `pmap` and `shard_map` alike:

- a grouped sum is one `psum` of a one-hot block with a slot per group, after which
  every participant holds the sums of *all* groups (so the whole-axis average of the
  group statistics costs nothing more);
- a gather is one `all_gather` over the device (mesh) names, plus one per `vmap` name,
  which `vmap` turns into a broadcast: no communication.

Several names (`axis_name=("batch", "device")`) act as one axis whose index is the
row-major combination of the names, first name outermost, as `lax.axis_index` does.

**Replication.** Under `jax.shard_map` with `check_vma=True`, what every device computes
from a `psum` or an invariant gather is typed as replicated, so running statistics
derived from it can be returned with `out_specs=P()` and pass `eqx.nn.State.set`'s type
check. A plain `lax.all_gather` would type its result as varying; the gathers here are
therefore invariant ones.
"""

from collections.abc import Hashable
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from ._errors import BatchNormError, fail


def manual_axes() -> frozenset[Hashable]:
    """Mesh axes bound by an enclosing `shard_map` or `pmap` (empty under `vmap` alone)."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def _bound_axis_names() -> tuple[str, ...]:
    """The axis names bound where this is traced, for error messages (best effort)."""
    try:
        from jax._src import core  # the axis environment has no public accessor
        sizes = core.get_axis_env().axis_sizes
    except (ImportError, AttributeError):
        return ()
    return tuple(repr(n) for n in sizes if isinstance(n, str | int))


def unbound_axis_name(name: Hashable) -> BatchNormError:
    """The error for an `axis_name` that no enclosing transform binds."""
    bound = _bound_axis_names()
    return fail(
        "axis_name", "a name bound by an enclosing `jax.vmap`, `jax.pmap` or "
        "`jax.shard_map`", f"the unbound name {name!r} (bound here: "
        f"{', '.join(bound) if bound else 'none'})",
        (f"use one of the bound names, e.g. `BatchNorm(..., axis_name={bound[0]})`; or "
         if bound else "") +
        f"call the layer under `jax.vmap(bn, axis_name={name!r}, in_axes=(0, None), "
        f"out_axes=(0, None))(xs, state)` (or pmap/shard_map with that axis name), or "
        "construct it with `axis_name=None` for a batched `x`. If it already runs under "
        "that `vmap`: JAX 0.10 loses `vmap`'s names when differentiating a `jax.jit` that "
        "contains the `vmap` (e.g. `jax.grad(jax.jit(jax.vmap(...)))`); put the `jit` "
        "outside the differentiation instead: `jax.jit(jax.grad(...))`")


class Participants:
    """The participants of the named axes `names`, split into `groups`.

    Built while tracing, from static information only. Without names there is one
    participant in one group, and every collective is the identity.

    - `count`: the number of groups, `G`; `members`: participants per group.
    - `on_devices`: whether any name is a device (mesh) axis. Over `vmap` names alone,
      every participant lives in one program and communication is free.
    - `onehot`: `(G,)` booleans, True at this participant's group.
    """

    def __init__(self, names: tuple[Hashable, ...],
                 groups: tuple[tuple[int, ...], ...] | None):
        self.names = names
        manual = manual_axes()
        self.mesh_names = frozenset(n for n in names if n in manual)
        self.on_devices = bool(self.mesh_names)
        size = 1
        for name in names:
            try:
                size *= int(lax.axis_size(name))
            except NameError:  # JAX traces a JVP rule lazily, possibly outside the vmap
                raise unbound_axis_name(name) from None
        layout = (tuple(range(size)),) if groups is None else groups
        self.layout = np.asarray(layout, dtype=np.int32)  # (G, members)
        self.count, self.members = self.layout.shape
        if self.count == 1:
            self.onehot = jnp.ones((1,), bool)
        else:
            group_of = np.empty(size, np.int32)
            for g, row in enumerate(layout):
                group_of[list(row)] = g
            self.onehot = jnp.arange(self.count) == jnp.asarray(group_of)[self._index()]

    def _index(self) -> Array:
        index = jnp.zeros((), jnp.int32)
        for name in self.names:
            index = index * lax.axis_size(name) + lax.axis_index(name)
        return index

    def sum(self, parts: tuple[Array, ...]) -> tuple[Array, ...]:
        """Each part summed within every group: shapes `(G, *part.shape)`, one collective.

        Without groups and across `vmap` names only, the parts go to one `psum` as a
        tuple, not stacked: XLA then merges each local reduction with the sum over the
        batch into one. Across devices they are stacked into one all-reduce.
        """
        if not self.names:
            return tuple(v[None] for v in parts)
        if self.count == 1:
            if self.on_devices and len(parts) > 1:
                summed = lax.psum(jnp.stack(parts), self.names)
                return tuple(summed[i][None] for i in range(len(parts)))
            return tuple(v[None] for v in lax.psum(parts, self.names))
        stacked = jnp.stack(parts)
        slot = self.onehot.reshape((-1,) + (1,) * stacked.ndim)
        block = jnp.where(slot, stacked[None], jnp.zeros_like(stacked)[None])
        summed = lax.psum(block, self.names)
        return tuple(summed[:, i] for i in range(len(parts)))

    def by_group(self, v: Array) -> Array:
        """Every participant's `v`, arranged by group: shape `(G, members, *v.shape)`."""
        if not self.names:
            return v[None, None]
        gathered = self._all_gather(v)
        return gathered[None] if self.count == 1 else gathered[self.layout]

    def _all_gather(self, v: Array) -> Array:
        """Every participant's `v` in axis-index order: shape `(size, *v.shape)`.

        Consecutive device names are gathered by one invariant `all_gather`, so the
        result is typed as replicated under `shard_map`; `vmap` names one at a time (JAX
        cannot mix them with mesh names in one gather), which costs no communication.
        """
        runs: list[tuple[bool, list[Hashable]]] = []
        for name in self.names:
            on_mesh = name in self.mesh_names
            if runs and runs[-1][0] == on_mesh:
                runs[-1][1].append(name)
            else:
                runs.append((on_mesh, [name]))
        out = v
        for on_mesh, run in reversed(runs):  # innermost first: first name outermost
            if on_mesh:
                out = lax.all_gather(out, tuple(run), to="invarying")
            else:
                for name in reversed(run):
                    out = lax.all_gather(out, name)
        return out.reshape((-1, *v.shape))

    def select(self, per_group: Array) -> Array:
        """This participant's row of a `(G, ...)` array, without a gather."""
        if self.count == 1:
            return per_group[0]
        slot = self.onehot.reshape((-1,) + (1,) * (per_group.ndim - 1))
        return jnp.where(slot, per_group, jnp.zeros_like(per_group)).sum(0)

    @staticmethod
    def first_holding_data(values: Array, counts: Array | None) -> Array:
        """`(G, members, *F)` to `(G, *F)`: each group's first member's value or, given
        the members' valid counts, its first member holding data in that feature."""
        if counts is None:
            return values[:, 0]
        pick = jnp.argmax(counts > 0, axis=1)[:, None]
        return jnp.take_along_axis(values, pick, axis=1)[:, 0]


def leading(x: Array, axis: int, k: int) -> Array:
    """`x[:k]` along `axis`.

    Under explicit sharding JAX refuses to slice part of a sharded axis; the slice is
    then taken in auto mode, where the partitioner reads it from the shard that holds
    it, as it does for any jit.
    """
    index = tuple(slice(0, k) if a == axis else slice(None) for a in range(x.ndim))
    if not sharded_along(x, (axis,)):
        return x[index]
    sharding = jax.typeof(x).sharding
    spec = _spec(x)
    out_spec = jax.sharding.PartitionSpec(*(None if a == axis else spec[a]
                                            for a in range(x.ndim)))
    take = jax.sharding.auto_axes(lambda v: v[index],
                                  out_sharding=sharding.update(spec=out_spec))
    return cast(Array, take(x))


def _spec(x: Array) -> tuple:
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def sharded_along(x: Array, axes: tuple[int, ...]) -> bool:
    """Whether `x` is explicitly sharded along any of `axes`."""
    if jax.typeof(x).sharding.mesh.empty:
        return False
    spec = _spec(x)
    return any(spec[a] is not None for a in axes)


def like_running(new: Array, running: Array) -> Array:
    """`new` with `running`'s sharding, so that `eqx.nn.State.set` (which compares
    shardings under explicit meshes) accepts the updated running statistics.

    Statistics reduced from a batch sharded over an explicit mesh are typed on that
    mesh, with the features' sharding; the state keeps its own layout (e.g. replicated
    while the features are split over a model axis).
    """
    new_sharding = jax.typeof(new).sharding
    mesh = new_sharding.mesh
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return new
    old_sharding = jax.typeof(running).sharding
    if old_sharding.spec == new_sharding.spec:
        return new
    return jax.sharding.reshard(new, old_sharding)
