"""Who the statistics are taken with, and every collective that reaches them.

`Participants` is the one seam for communication: the estimators in `_moments.py` only call
its methods. Groups are emulated with collectives that exist under `vmap`, `pmap` and
`shard_map` alike (`docs/distributed.md`).
"""

import itertools
from collections.abc import Hashable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from ._errors import BatchNormError, fail


def manual_axes() -> frozenset[Hashable]:
    """Mesh axes bound by an enclosing `shard_map` or `pmap` (empty under `vmap` alone)."""
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def unbound_axis_name(name: Hashable) -> BatchNormError:
    """The error for an `axis_name` that no enclosing transform binds."""
    try:  # the names bound here, best effort: the axis environment has no public accessor
        from jax._src import core
        bound = [repr(n) for n in core.get_axis_env().axis_sizes if isinstance(n, str | int)]
    except (ImportError, AttributeError):
        bound = []
    return fail(
        "axis_name", "a name bound by an enclosing `jax.vmap`, `jax.pmap` or "
        "`jax.shard_map`", f"the unbound name {name!r} (bound here: "
        f"{', '.join(bound) if bound else 'none'})",
        (f"use one of the bound names, e.g. `BatchNorm(..., axis_name={bound[0]})`; or "
         if bound else "") +
        f"call the layer under `jax.vmap(bn, axis_name={name!r}, in_axes=(0, None), "
        f"out_axes=(0, None))(xs, state)` (or pmap/shard_map with that axis name), or "
        "construct it with `axis_name=None` for a batched `x`")


def axis_size(names: tuple[Hashable, ...]) -> int:
    """The number of participants of the named axes; each name must be bound here."""
    size = 1
    for name in names:
        try:
            size *= int(lax.axis_size(name))
        except NameError:
            raise unbound_axis_name(name) from None
        except jax.errors.InconclusiveDimensionOperation as e:
            # JAX cannot take the size of a `vmap` over a symbolic batch (Flax's and
            # Equinox's layers fail here alike).
            raise fail("axis_name", "a named axis of known size",
                       f"the `jax.vmap` axis {name!r} over a symbolic batch (`jax.export`)",
                       "export the batched style, with the same numbers: `BatchNorm(C, "
                       "axis=1)` (or the channel axis) on the whole batch, `axis_name=None`; "
                       "or export with a concrete batch size") from e
    return size


class Participants:
    """The participants of the named axes `names`, split into `groups` (`count` groups of
    `members`), built while tracing; without names, one participant and no collectives.
    `on_devices`: whether any name is a mesh axis (else communication is free)."""

    def __init__(self, names: tuple[Hashable, ...],
                 groups: tuple[tuple[int, ...], ...] | None):
        self.names = names
        self.mesh_names = manual_axes() & frozenset(names)
        self.on_devices = bool(self.mesh_names)
        size = axis_size(names)
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
        """Each part summed within every group: shapes `(G, *part.shape)`, one collective
        (over `vmap` names without groups, a tuple `psum`, which XLA fuses with the parts)."""
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

    def sum_rows(self, rows: tuple[Array, ...]) -> tuple[Array, ...]:
        """`sum` of parts already placed in their group's row (`(G, ...)`, zero in the
        other rows; see `place`), in one collective."""
        if not self.names:
            return rows
        if self.on_devices and len(rows) > 1:
            summed = lax.psum(jnp.stack(rows), self.names)
            return tuple(summed[i] for i in range(len(rows)))
        return tuple(lax.psum(rows, self.names))

    def by_group(self, v: Array) -> Array:
        """Every participant's `v`, arranged by group: shape `(G, members, *v.shape)`."""
        if not self.names:
            return v[None, None]
        gathered = self._all_gather(v)
        return gathered[None] if self.count == 1 else gathered[self.layout]

    def _all_gather(self, v: Array) -> Array:
        """Every participant's `v` in axis-index order: shape `(size, *v.shape)`. Mesh names
        take invariant gathers (typed as replicated); `vmap` names, which JAX cannot mix
        with them, one at a time."""
        runs = [(on_mesh, list(run)) for on_mesh, run
                in itertools.groupby(self.names, lambda name: name in self.mesh_names)]
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


def place(v: Array, onehot: Array) -> Array:
    """`v` in the row of its group, zeros in the others: shape `(G, *v.shape)`, from a
    participant's `onehot` (`Participants.onehot`, shape `(G,)`)."""
    if onehot.shape[0] == 1:
        return v[None]
    slot = onehot.reshape((-1,) + (1,) * v.ndim)
    return jnp.where(slot, v[None], jnp.zeros((), v.dtype))


def leading(x: Array, axis: int, k: int) -> Array:
    """`x[:k]` along `axis`; in auto mode where `axis` is explicitly sharded, since JAX
    refuses to slice part of an explicitly sharded axis."""
    index = tuple(slice(0, k) if a == axis else slice(None) for a in range(x.ndim))
    if not sharded_along(x, (axis,)):
        return x[index]
    out_spec = jax.sharding.PartitionSpec(
        *(None if a == axis else s for a, s in enumerate(full_spec(x))))
    take = jax.sharding.auto_axes(lambda v: v[index],
                                  out_sharding=jax.typeof(x).sharding.update(spec=out_spec))
    return cast(Array, take(x))


def full_spec(x: Any) -> tuple:
    """The partition spec of `x`'s type, one entry per axis."""
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def sharded_along(x: Array, axes: tuple[int, ...]) -> bool:
    """Whether `x` is explicitly sharded along any of `axes`."""
    if jax.typeof(x).sharding.mesh.empty:
        return False
    spec = full_spec(x)
    return any(spec[a] is not None for a in axes)


def explicit_mesh(x: Any) -> Any:
    """The mesh `x` is typed on, if it has explicit axes; else None."""
    mesh = jax.typeof(x).sharding.mesh
    return None if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types else mesh


def like_running(new: Array, running: Array) -> Array:
    """`new` with `running`'s sharding, which `eqx.nn.State.set` requires: statistics of a
    batch on an explicit mesh are typed on it, while the state keeps its own layout."""
    old_sharding = jax.typeof(running).sharding
    if explicit_mesh(new) is None or old_sharding.spec == jax.typeof(new).sharding.spec:
        return new
    return jax.sharding.reshard(new, old_sharding)
