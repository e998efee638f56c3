"""Adoption in one call: a whole Equinox model (`from_equinox_model`), and Flax's NNX
`BatchNorm` (`from_nnx`, `to_nnx`; Flax stays optional, imported inside them)."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._batch_norm import BatchNorm
from ._errors import fail
from ._interop import from_equinox, from_flax, to_flax


def _is_eqx_bn(x: Any) -> bool:
    return isinstance(x, eqx.nn.BatchNorm)


def _indices(layer: eqx.nn.BatchNorm) -> tuple[eqx.nn.StateIndex, eqx.nn.StateIndex]:
    """(the index of the running statistics, the auxiliary one) of either mode."""
    if layer.mode == "ema":
        main, aux = layer.ema_state_index, layer.ema_first_time_index
    else:
        main, aux = layer.batch_state_index, layer.batch_counter
    assert main is not None and aux is not None
    return main, aux


def _init_was_deleted(index: eqx.nn.StateIndex) -> bool:
    """Whether `eqx.nn.delete_init_state` (as `make_with_state` calls it) stripped `index`:
    compares with the type of Equinox's private sentinel, which a `tree_map` rebuilds."""
    stripped = eqx.nn.delete_init_state(eqx.nn.StateIndex(0)).init
    return type(index.init) is type(stripped)


def from_equinox_model(model: Any, state: eqx.nn.State) -> tuple[Any, eqx.nn.State]:
    r"""Converts every `eqx.nn.BatchNorm` of a model at once, and its state.

    Each `eqx.nn.BatchNorm` anywhere in `model` is replaced by what `from_equinox` makes
    of it, and its statistics by the converted ones; shared layers stay shared, and the
    rest of the model and state is kept. An optimiser state must be made afresh.

    !!! Example

        ```python
        model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
            eqx.nn.Conv2d(3, 8, 3, padding=1, key=jax.random.key(0)),
            eqx.nn.BatchNorm(8, "batch", mode="batch"),
            eqx.nn.Sequential([eqx.nn.Conv2d(8, 8, 3, padding=1, key=jax.random.key(1)),
                               eqx.nn.BatchNorm(8, "batch", mode="batch")]),
        ])
        model, state = ebn.from_equinox_model(model, state)   # every BatchNorm at once
        xs = jax.random.normal(jax.random.key(2), (4, 3, 8, 8))
        ys, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(xs, state)     # a training step
        ```

    **Arguments:**

    - `model`: any PyTree holding `eqx.nn.BatchNorm` layers.
    - `state`: the `eqx.nn.State` holding their statistics (from
      `eqx.nn.make_with_state`, or the latest call of the model).

    **Returns:**

    `(model, state)`: the model with `BatchNorm`s in place of the `eqx.nn.BatchNorm`s,
    and a new `eqx.nn.State` for it. `state` itself is left usable.

    **Raises:**

    `BatchNormError` if `model` holds no `eqx.nn.BatchNorm`, if `state` is not an
    `eqx.nn.State`, is an old one, or lacks a layer's entries, or if layers sharing a
    state entry differ in shape or mode.
    """
    if not isinstance(state, eqx.nn.State):
        raise fail("state", "the `eqx.nn.State` of `model`", type(state).__name__,
                   "pass `(model, state)` as `eqx.nn.make_with_state` returned them")
    try:
        # Its keys (`StateIndex` markers) and values in order. (`eqx.nn.State(new_model)`
        # would need the initial states that `make_with_state` strips.)
        values, keys = state.tree_flatten()
    except ValueError as e:  # Equinox invalidates a state once `.set` was called on it
        raise fail("state", "the latest state of the model",
                   "an old state (one already passed to `.set` or to a layer)",
                   "pass the state returned by the model's last call") from e
    entries = dict(zip(keys, values, strict=True))

    path_leaves, treedef = jtu.tree_flatten_with_path(model, is_leaf=_is_eqx_bn)
    layers = [(path, leaf) for path, leaf in path_leaves if _is_eqx_bn(leaf)]
    if not layers:
        already = any(isinstance(leaf, BatchNorm) for leaf in
                      jtu.tree_leaves(model, is_leaf=lambda x: isinstance(x, BatchNorm)))
        raise fail("model", "a model holding at least one `eqx.nn.BatchNorm`",
                   f"a {type(model).__name__} with none",
                   "its batch norms are already `eqx_batchnorm.BatchNorm`s: use it as it is"
                   if already else "pass the model that holds the `eqx.nn.BatchNorm` "
                   "layers; for one layer on its own, use `from_equinox`")

    by_object: dict[int, BatchNorm] = {}
    # Equinox identifies state by the marker of a `StateIndex`, not by object: copies of
    # one layer (e.g. after a `tree_map`) share an entry, and must keep sharing it.
    by_marker: dict[Any, tuple[eqx.nn.BatchNorm, eqx.nn.StateIndex]] = {}
    converted: dict[Any, Any] = {}  # marker -> the converted statistics
    auxiliary: set[Any] = set()  # the markers of the first-time flags and step counters
    for path, layer in layers:
        if id(layer) in by_object:
            continue
        where = f"`model{jtu.keystr(path)}`"
        main, aux = _indices(layer)
        if main.marker not in entries or aux.marker not in entries:
            raise fail("state", "the `eqx.nn.State` made together with `model`",
                       f"a state without the statistics of the eqx.nn.BatchNorm at {where}",
                       "pass the state that `eqx.nn.make_with_state` returned with this "
                       "model, or the one returned by its last call")
        first, index = by_marker.get(main.marker, (layer, None))
        if (first.input_size, first.mode) != (layer.input_size, layer.mode):
            raise fail("model", "layers sharing a state entry to have one shape and mode",
                       f"the eqx.nn.BatchNorm at {where} ({layer.input_size} features, "
                       f"mode={layer.mode!r}) sharing with one of {first.input_size} features, "
                       f"mode={first.mode!r}", "give each layer its own `eqx.nn.StateIndex`")
        bn, bn_state = from_equinox(layer, state)
        if index is None:
            stats = bn_state.get(bn.state_index)
            converted[main.marker] = stats
            index = eqx.nn.StateIndex(stats)
            # The replaced layer's key, so that models converted alike have alike states.
            object.__setattr__(index, "marker", main.marker)
            if _init_was_deleted(main):
                index = eqx.nn.delete_init_state(index)
            by_marker[main.marker] = (layer, index)
        by_object[id(layer)] = eqx.tree_at(lambda b: b.state_index, bn, index)
        auxiliary.add(aux.marker)

    new_model = jtu.tree_unflatten(treedef, [by_object[id(leaf)] if _is_eqx_bn(leaf) else leaf
                                             for _, leaf in path_leaves])

    kept = {key: converted.get(key, value) for key, value in entries.items()
            if key not in auxiliary}
    return new_model, eqx.nn.State.tree_unflatten(tuple(kept), tuple(kept.values()))


# The arguments of `flax.nnx.BatchNorm` that mean the same here, under the same name.
_NNX_ARGUMENTS = ("momentum", "epsilon", "param_dtype", "axis_name", "axis_index_groups",
                  "use_fast_variance")


def _nnx() -> Any:
    """`flax.nnx`, or None where Flax is not installed (it is not a dependency)."""
    try:
        from flax import nnx
    except ImportError:
        return None
    return nnx


def from_nnx(nnx_batch_norm: Any, **overrides: Any) -> tuple[BatchNorm, eqx.nn.State]:
    r"""Converts a `flax.nnx.BatchNorm`: its parameters, its `nnx.BatchStat` running
    statistics and its attributes.

    Every attribute maps to the argument of the same name, and `use_running_average` to
    `inference` (NNX's `None` becomes `False`). Training and inference then give NNX's
    numbers, except that non-finite batches are skipped (`skip_nonfinite_updates=False`
    writes them in, as NNX does). NNX promotes the input to its float32 statistics, so
    `dtype=None` becomes `float32` (or a wider `param_dtype`; pass `dtype=None` to keep a
    float64 input's); with a half-precision `dtype`, NNX also rounds the input before
    taking the statistics, which differs by about one unit of that rounding. Initialisers
    and parameter metadata are not kept.

    !!! Example

        ```python
        from flax import nnx

        nnx_bn = nnx.BatchNorm(16, momentum=0.9, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(0), (8, 16))
        nnx_bn(x)                                      # a training step in NNX
        bn, state = ebn.from_nnx(nnx_bn)
        y, _ = bn(x, state, inference=True)            # == nnx_bn(x, use_running_average=True)
        ```

    **Arguments:**

    - `nnx_batch_norm`: the `flax.nnx.BatchNorm`.
    - `**overrides`: `BatchNorm` arguments that replace the ones read from the layer
      (not `num_features`), e.g. `axis=0, axis_name="batch"` for the per-example style.

    **Returns:**

    `(bn, state)`, as for `from_flax`.

    **Raises:**

    `BatchNormError` if `nnx_batch_norm` is not a `flax.nnx.BatchNorm`, if it uses a
    custom `promote_dtype` (whose arithmetic cannot be reproduced), or for any invalid
    `BatchNorm` argument.
    """
    nnx = _nnx()
    if nnx is None or not isinstance(nnx_batch_norm, nnx.BatchNorm):
        raise fail("nnx_batch_norm", "a `flax.nnx.BatchNorm`", type(nnx_batch_norm).__name__,
                   "for linen's variables use `from_flax`, for an `eqx.nn.BatchNorm` "
                   "`from_equinox`, for a PyTorch layer `from_torch`")
    from flax.nnx.nn import dtypes as nnx_dtypes

    layer = nnx_batch_norm
    if getattr(layer, "promote_dtype", nnx_dtypes.promote_dtype) is not (
            nnx_dtypes.promote_dtype):
        raise fail("nnx_batch_norm", "a layer with NNX's default `promote_dtype`",
                   f"promote_dtype={layer.promote_dtype!r}",
                   "convert a layer built without `promote_dtype=`, and cast the input yourself")
    params = {name: jnp.asarray(var[...]) for name in ("scale", "bias")
              if (var := getattr(layer, name, None)) is not None}
    variables = {"params": params,
                 "batch_stats": {"mean": jnp.asarray(layer.mean[...]),
                                 "var": jnp.asarray(layer.var[...])}}
    dtype = layer.dtype
    if dtype is None:
        dtype = jnp.promote_types(layer.param_dtype, jnp.float32)
    options = {name: getattr(layer, name) for name in _NNX_ARGUMENTS}
    options.update(axis=layer.axis, dtype=dtype)
    if "use_running_average" not in overrides:
        options["inference"] = bool(layer.use_running_average)
    return from_flax(variables, **(options | overrides))


def to_nnx(bn: Any, state: eqx.nn.State, *, rngs: Any = None) -> Any:
    r"""Exports one `BatchNorm` as a `flax.nnx.BatchNorm`.

    Every argument NNX has is passed on (`inference` as `use_running_average`), and
    training and inference continue in NNX with the same numbers, except that NNX writes
    non-finite batch statistics in, and with `dtype=None` returns float32 for a
    half-precision input.

    !!! Example

        ```python
        from flax import nnx

        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(16, momentum=0.9)
        x = jax.random.normal(jax.random.key(0), (8, 16))
        _, state = bn(x, state)                                 # a training step here
        nnx_bn = ebn.to_nnx(bn, state)
        y_nnx = nnx_bn(x, use_running_average=True)
        y, _ = bn(x, state, inference=True)                     # == y_nnx
        ```

    **Arguments:**

    - `bn`: the layer.
    - `state`: the `eqx.nn.State` holding its running statistics.
    - `rngs`: the `flax.nnx.Rngs` NNX's constructor asks for (default `nnx.Rngs(0)`);
      the values it would initialise are overwritten by `bn`'s.

    **Returns:**

    A `flax.nnx.BatchNorm` holding `bn`'s parameters and running statistics.

    **Raises:**

    `BatchNormError` if `bn` is not a `BatchNorm` or `state` does not hold its
    statistics, if Flax is not installed, or for what NNX cannot express: several
    feature axes (use `to_flax`), `renorm=True`, `force_float32_reductions=False`.
    """
    variables = to_flax(bn, state)  # checks `bn`, and that `state` holds its statistics
    nnx = _nnx()
    if nnx is None:
        raise fail("bn", "Flax installed, to build a `flax.nnx.BatchNorm`",
                   "no `flax` package", "`pip install flax`")
    if len(bn.feature_shape) != 1:
        raise fail("bn", "a layer with one feature axis (NNX's statistics have shape "
                   "(num_features,))", f"`axis={bn.axis!r}`, feature shape "
                   f"{bn.feature_shape}", "export it to linen with `to_flax`, whose "
                   "`flax.linen.BatchNorm` takes several axes")
    for field, needed, why, rebuilt in (
            ("renorm", False, "NNX has no batch renormalisation", "without renormalisation"),
            ("force_float32_reductions", True, "NNX always reduces in at least float32",
             "with float32 reductions")):
        if getattr(bn, field) != needed:
            raise fail("bn", f"`{field}={needed}` ({why})",
                       f"a layer built with `{field}={not needed}`",
                       f"rebuild it {rebuilt} before exporting: `ebn.from_flax(ebn.to_flax("
                       "bn, state), axis=bn.axis, momentum=bn.momentum, ...)`")
    axis = bn.axis if isinstance(bn.axis, int) else bn.axis[0]
    layer = nnx.BatchNorm(
        bn.feature_shape[0], use_running_average=bool(bn.inference), axis=axis, dtype=bn.dtype,
        use_bias=bn.use_bias, use_scale=bn.use_scale, rngs=nnx.Rngs(0) if rngs is None else rngs,
        **{name: getattr(bn, name) for name in _NNX_ARGUMENTS})
    for name, value in variables.get("params", {}).items():
        getattr(layer, name)[...] = value
    layer.mean[...] = variables["batch_stats"]["mean"].astype(jnp.float32)
    layer.var[...] = variables["batch_stats"]["var"].astype(jnp.float32)
    return layer
