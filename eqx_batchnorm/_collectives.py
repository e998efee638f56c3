"""Collectives over named axes, with `axis_index_groups` emulated everywhere.

JAX implements grouped collectives only under `pmap`. Here groups are emulated with
ordinary collectives that exist under `vmap`, `pmap` and `shard_map` alike:

- a grouped sum is one `psum` of a one-hot block with a slot per group, after which
  every participant holds the sums of *all* groups (so the whole-axis average of the
  group statistics costs nothing more);
- a gather is one `all_gather` per name.

Several names (`axis_name=("batch", "device")`) act as one axis whose index is the
row-major combination of the names, first name outermost, as `lax.axis_index` does.
"""

from collections.abc import Hashable

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


def axis_size(names: tuple[Hashable, ...]) -> int:
    """The number of participants along `names`; a clear error if a name is unbound."""
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
                "name), or construct it with `axis_name=None` for a batched `x`",
            ) from None
    return size


def axis_index(names: tuple[Hashable, ...]) -> Array:
    index = jnp.zeros((), jnp.int32)
    for name in names:
        index = index * lax.axis_size(name) + lax.axis_index(name)
    return index


def all_gather(v: Array, names: tuple[Hashable, ...]) -> Array:
    """Every participant's `v`, stacked in axis-index order: shape `(size, *v.shape)`."""
    out = v
    for name in reversed(names):
        out = lax.all_gather(out, name)
    return out.reshape((-1, *v.shape))


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


def select(per_group: Array, onehot: Array) -> Array:
    """This participant's row of a `(G, ...)` array, without a gather."""
    if onehot.shape[0] == 1:
        return per_group[0]
    mask = onehot.reshape((-1,) + (1,) * (per_group.ndim - 1))
    return jnp.where(mask, per_group, jnp.zeros_like(per_group)).sum(0)
