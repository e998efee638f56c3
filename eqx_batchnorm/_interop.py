"""Converters between `BatchNorm` and the batch norms of Flax, PyTorch and Equinox (their
conventions: `docs/beyond_flax.md`). Nothing here imports Flax or PyTorch: Flax variables
are read as mappings, PyTorch tensors through their `.detach().cpu().numpy()`."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from ._batch_norm import BatchNorm, BatchStats, _get_running
from ._errors import fail
from ._folding import _replace
from ._validate import check_scalar, one_or_all


def _to_jax(name: str, value: Any) -> Array:
    """A JAX array from a JAX/NumPy array or a PyTorch tensor (without importing torch)."""
    if hasattr(value, "detach"):  # a torch.Tensor
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            return jnp.asarray(tensor.float().numpy()).astype(jnp.bfloat16)
        value = tensor.numpy()
    try:
        return jnp.asarray(value)
    except TypeError as e:
        raise fail(name, "an array (JAX, NumPy or a PyTorch tensor)",
                   f"{type(value).__name__}", "pass the layer's arrays") from e


def _build(scale: Array | None, bias: Array | None, mean: Array, var: Array, source: str,
           kwargs: dict[str, Any]) -> tuple[BatchNorm, eqx.nn.State]:
    """A `BatchNorm` built with `kwargs` (read from `source`), holding the given arrays."""
    feature_shape = tuple(mean.shape)
    if "num_features" in kwargs:
        raise fail("num_features", f"no value (it is read from {source})",
                   repr(kwargs["num_features"]), "drop `num_features=`")
    for flag, value in (("use_scale", scale), ("use_bias", bias)):
        if flag in kwargs and bool(kwargs[flag]) != (value is not None):
            name = flag.removeprefix("use_")
            raise fail(flag, f"{value is not None} ({source} "
                       f"{'has' if value is not None else 'has no'} `{name}`)",
                       f"{flag}={kwargs[flag]!r}",
                       f"drop `{flag}=` and let the converter read it from the checkpoint")
        kwargs[flag] = value is not None
    present = [a for a in (scale, bias) if a is not None]
    if present:
        kwargs.setdefault("param_dtype", present[0].dtype)
    if len(feature_shape) == 0:
        raise fail("mean", "running statistics with at least one feature axis",
                   "a scalar", "pass the statistics of a batch norm layer")
    bn = BatchNorm(one_or_all(feature_shape), **kwargs)
    if bn.feature_shape != feature_shape:
        raise fail("axis", f"feature axes giving the checkpoint's feature shape "
                   f"{feature_shape}", f"`axis={bn.axis!r}`, feature shape "
                   f"{bn.feature_shape}", "pass one `axis` per feature dimension of the "
                   "checkpoint, in the order the arrays store them")
    for name, value in (("scale", scale), ("bias", bias), ("var", var)):
        if value is not None and value.shape != feature_shape:
            raise fail(name, f"shape {feature_shape} (the running mean's)",
                       f"shape {value.shape}", "pass the arrays of one layer")
    fresh = bn.state_index.init
    assert isinstance(fresh, BatchStats)
    stats = BatchStats(mean.astype(fresh.mean.dtype), var.astype(fresh.var.dtype))
    # The checkpoint becomes the layer's *initial* state: `eqx.nn.make_with_state` over a
    # model assembled from converted layers then yields a state holding it.
    bn = _replace(bn, scale=None if scale is None else scale.astype(bn.param_dtype),
                  bias=None if bias is None else bias.astype(bn.param_dtype),
                  state_index=eqx.nn.StateIndex(stats))
    return bn, eqx.nn.State(bn)


def to_flax(bn: Any, state: eqx.nn.State) -> dict[str, dict[str, Array]]:
    r"""Exports one `BatchNorm` as the variables of a `flax.linen.BatchNorm`.

    The result can be passed to `flax.linen.BatchNorm(...).apply`, or stored under the
    layer's name in a larger Flax variables tree.

    !!! Example

        ```python
        import flax.linen as nn

        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(16, momentum=0.9)
        x = jax.random.normal(jax.random.key(0), (8, 16))
        _, state = bn(x, state)                                    # a training step
        variables = ebn.to_flax(bn, state)
        y_flax = nn.BatchNorm(use_running_average=True).apply(variables, x)
        y, _ = bn(x, state, inference=True)                         # == y_flax
        ```

    **Arguments:**

    - `bn`: the layer.
    - `state`: the `eqx.nn.State` holding its running statistics.

    **Returns:**

    `{"params": {"scale": ..., "bias": ...}, "batch_stats": {"mean": ..., "var": ...}}`,
    arrays of shape `bn.feature_shape`; as in Flax, a disabled `scale` or `bias` is
    omitted, and `"params"` when both are. The hyper-parameters (`axis`, `momentum`, ...)
    are not variables in Flax: give them to `flax.linen.BatchNorm`.

    **Raises:**

    `BatchNormError` if `bn` is not a `BatchNorm` or `state` does not hold its statistics.
    """
    if not isinstance(bn, BatchNorm):
        raise fail("bn", "an `eqx_batchnorm.BatchNorm`", type(bn).__name__,
                   "for an `eqx.nn.BatchNorm`, convert it first with `from_equinox`")
    running = _get_running(state, bn, "eqx.filter_vmap(ebn.to_flax)(bn, state)")
    params = {k: v for k, v in {"scale": bn.scale, "bias": bn.bias}.items() if v is not None}
    out: dict[str, dict[str, Array]] = {
        "batch_stats": {"mean": jnp.asarray(running.mean), "var": jnp.asarray(running.var)}}
    if params:
        out["params"] = params
    return out


def from_flax(variables: Any, **kwargs: Any) -> tuple[BatchNorm, eqx.nn.State]:
    r"""Imports the variables of one `flax.linen.BatchNorm`.

    `use_scale`, `use_bias` and `param_dtype` follow from the stored parameters. Flax keeps
    the rest as module attributes (`axis`, `momentum`, `epsilon`, ...): pass them again in
    `kwargs`. Training and inference then continue exactly as in Flax.

    !!! Example

        ```python
        import flax.linen as nn

        x = jax.random.normal(jax.random.key(0), (8, 16))
        flax_bn = nn.BatchNorm(momentum=0.9)
        variables = flax_bn.init(jax.random.key(1), x, use_running_average=False)
        bn, state = ebn.from_flax(variables, momentum=0.9)   # attributes as in Flax
        y, state = bn(x, state)                               # Flax's training step
        ```

    **Arguments:**

    - `variables`: `{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}` of
      one layer (a dict or a `FrozenDict`; `"params"` may lack entries, as Flax stores it).
      In a larger model, pass one layer's sub-trees, e.g. `{"params":
      params["BatchNorm_0"], "batch_stats": batch_stats["BatchNorm_0"]}`.
    - `**kwargs`: passed to `BatchNorm` (not `num_features`, which is read from the
      arrays). With several feature axes, give `axis=` as a tuple.

    **Returns:**

    `(bn, state)`: the layer and an `eqx.nn.State` holding its running statistics, which
    are also the layer's initial state (for `eqx.nn.make_with_state` over a model).

    **Raises:**

    `BatchNormError` for missing or inconsistently shaped variables, `use_scale` /
    `use_bias` contradicting the variables, or any invalid `BatchNorm` argument.
    """
    if not isinstance(variables, Mapping):
        raise fail("variables", "a mapping {'params': ..., 'batch_stats': ...}",
                   type(variables).__name__, "pass the variables of one Flax BatchNorm")
    stats = variables.get("batch_stats")
    if not isinstance(stats, Mapping) or "mean" not in stats or "var" not in stats:
        raise fail("variables", "a 'batch_stats' entry holding 'mean' and 'var'",
                   f"keys {sorted(variables)}" + (f", batch_stats keys {sorted(stats)}"
                                                  if isinstance(stats, Mapping) else ""),
                   "pass one layer's variables, e.g. {'params': params['BatchNorm_0'], "
                   "'batch_stats': batch_stats['BatchNorm_0']}")
    params = variables.get("params", {})
    unknown = sorted(set(params) - {"scale", "bias"}) + sorted(
        set(variables) - {"params", "batch_stats"})
    if unknown:
        raise fail("variables", "only 'params' {'scale', 'bias'} and 'batch_stats'",
                   f"extra entries {unknown}", "pass the variables of one BatchNorm layer")
    mean, var = (_to_jax(k, stats[k]) for k in ("mean", "var"))
    scale, bias = (_to_jax(k, params[k]) if k in params else None for k in ("scale", "bias"))
    if "axis" not in kwargs and mean.ndim > 1:
        raise fail("axis", f"{mean.ndim} feature axes (the statistics have shape {mean.shape})",
                   "the default `axis=-1`", "pass the `axis=` tuple given to flax.linen.BatchNorm")
    return _build(scale, bias, mean, var, "the Flax variables", kwargs)


_TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def from_torch(
    state_dict: Any,
    *,
    torch_momentum: Any = None,
    prefix: str = "",
    **kwargs: Any,
) -> tuple[BatchNorm, eqx.nn.State]:
    r"""Imports a `torch.nn.BatchNorm1d/2d/3d` from its `state_dict()`.

    PyTorch's momentum is inverted, $\mu_r \leftarrow (1 - m_t)\,\mu_r + m_t\,\mu$: its
    default 0.1 is `momentum=0.9` here (its `momentum=None` has no equivalent: use
    `recompute_statistics`). Its `running_var`, the unbiased variance, is copied as-is,
    since PyTorch's `.eval()` normalises with it; later training updates it with the
    biased batch variance, as Flax does. The default layout is PyTorch's: `axis=1`.
    `num_batches_tracked` is ignored; `affine=False` gives `use_scale=use_bias=False`.

    !!! Example

        ```python
        import torch

        torch_bn = torch.nn.BatchNorm2d(16).eval()             # momentum 0.1, eps 1e-5
        bn, state = ebn.from_torch(torch_bn.state_dict())     # axis=1, momentum=0.9
        x = torch.randn(4, 16, 8, 8)                          # NCHW
        y, _ = bn(jnp.asarray(x.numpy()), state, inference=True)   # == torch_bn(x)
        ```

    **Arguments:**

    - `state_dict`: a mapping with `running_mean`, `running_var` and, for an affine
      layer, `weight` and `bias` (PyTorch tensors or JAX/NumPy arrays).
    - `torch_momentum`: the momentum in PyTorch's convention, in $[0, 1]$ (default: 0.1,
      unless `momentum=` gives this library's).
    - `prefix`: prepended to every key, to pick one layer out of a model's
      `state_dict()` (e.g. `"layer1.0.bn1."`, or `"1."` for `Sequential(conv, bn)`).
    - `**kwargs`: passed to `BatchNorm` (`axis`, `epsilon` for PyTorch's `eps`, ...), e.g.
      `axis=0, axis_name="batch"` for Equinox's per-example layers under `jax.vmap`.

    **Returns:**

    `(bn, state)`, as for `from_flax`.

    **Raises:**

    `BatchNormError` for missing keys, a layer without running statistics
    (`track_running_stats=False`), both `torch_momentum` and `momentum`, or any
    invalid `BatchNorm` argument.
    """
    if not isinstance(state_dict, Mapping):
        raise fail("state_dict", "a mapping from names to tensors (`module.state_dict()`)",
                   type(state_dict).__name__, "pass `torch_bn.state_dict()`")
    entries = {k[len(prefix):]: v for k, v in state_dict.items()
               if isinstance(k, str) and k.startswith(prefix)}
    if not prefix:
        extra = sorted(set(entries) - set(_TORCH_KEYS))
        if extra:
            raise fail("state_dict", f"the keys of one batch norm layer {_TORCH_KEYS}",
                       f"other keys too, e.g. {extra[:3]}",
                       "pass `prefix=` naming the layer, e.g. `prefix='bn1.'`")
    if "running_mean" not in entries or "running_var" not in entries:
        raise fail("state_dict", f"'{prefix}running_mean' and '{prefix}running_var'",
                   f"keys {sorted(entries)[:6]}",
                   "a layer built with `track_running_stats=False` has no running statistics and "
                   "always normalises with the batch's: build `ebn.BatchNorm` and call it with "
                   "`inference=False, update_stats=False`; otherwise check `prefix=`")
    if ("weight" in entries) != ("bias" in entries):
        raise fail("state_dict", "both 'weight' and 'bias' (affine=True) or neither",
                   f"keys {sorted(entries)}", "pass the whole state_dict of the layer")
    if torch_momentum is not None:
        if "momentum" in kwargs:
            raise fail("torch_momentum", "only one of `torch_momentum` (PyTorch's "
                       "convention) and `momentum` (Flax's)",
                       f"torch_momentum={torch_momentum!r}, momentum={kwargs['momentum']!r}",
                       "pass one: `momentum = 1 - torch_momentum`")
        kwargs["momentum"] = 1.0 - check_scalar("torch_momentum", torch_momentum, 0.0, 1.0)
    kwargs = {"momentum": 0.9, "axis": 1} | kwargs  # PyTorch's defaults: 0.1, (N, C, ...)
    mean, var = (_to_jax(k, entries[k]) for k in ("running_mean", "running_var"))
    scale, bias = (_to_jax(k, entries[k]) if k in entries else None for k in ("weight", "bias"))
    if mean.ndim != 1:
        raise fail("state_dict", "a 1-D running_mean (one entry per channel)",
                   f"shape {mean.shape}", "pass the state_dict of a torch BatchNorm1d/2d/3d")
    return _build(scale, bias, mean, var, "the PyTorch state_dict", kwargs)


def from_equinox(eqx_bn: Any, state: Any,
                 **kwargs: Any) -> tuple[BatchNorm, eqx.nn.State]:
    r"""Converts an `eqx.nn.BatchNorm` (either `mode`) and its state.

    The result is a per-example layer (`axis=0`) with the source's other attributes and
    the same inference output: `mode="batch"`'s bias-uncorrected averages $h_t$ after $t$
    steps become $h_t / (1 - m^t)$. Training then follows Flax's conventions.

    !!! Example

        ```python
        eqx_bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            16, axis_name="batch", mode="batch")
        xs = jax.random.normal(jax.random.key(0), (8, 16, 4, 4))   # (batch, C, H, W)
        _, state = jax.vmap(eqx_bn, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(xs, state)          # a training step
        bn, new_state = ebn.from_equinox(eqx_bn, state)
        ys, _ = jax.vmap(eqx.nn.inference_mode(bn), axis_name="batch",
                         in_axes=(0, None), out_axes=(0, None))(xs, new_state)
        ```

    **Arguments:**

    - `eqx_bn`: the `eqx.nn.BatchNorm`.
    - `state`: the `eqx.nn.State` holding its statistics.
    - `**kwargs`: overrides of the `BatchNorm` arguments read from `eqx_bn` (e.g.
      `axis=1, axis_name=None` to call it on a whole batch at once).

    **Returns:**

    `(bn, state)`, as for `from_flax` (a new `eqx.nn.State`).

    **Raises:**

    `BatchNormError` if `eqx_bn` is not an `eqx.nn.BatchNorm` or `state` does not hold
    its statistics.
    """
    if not isinstance(eqx_bn, eqx.nn.BatchNorm):
        raise fail("eqx_bn", "an `eqx.nn.BatchNorm`", type(eqx_bn).__name__,
                   "for an `eqx_batchnorm.BatchNorm` no conversion is needed")
    try:
        if eqx_bn.mode == "ema":
            assert eqx_bn.ema_state_index is not None
            mean, var = state.get(eqx_bn.ema_state_index)
        else:
            assert eqx_bn.batch_state_index is not None and eqx_bn.batch_counter is not None
            hidden_mean, hidden_var = state.get(eqx_bn.batch_state_index)
            counter = state.get(eqx_bn.batch_counter)
            # Equinox's own expression, so the corrected values match it to the bit.
            correction = jnp.where(counter == 0, 1, 1 - eqx_bn.momentum**counter)
            mean, var = hidden_mean / correction, hidden_var / correction
    except (KeyError, ValueError) as e:
        raise fail("state", "the `eqx.nn.State` made together with `eqx_bn`",
                   "a state without its statistics",
                   "pass the state returned by `eqx.nn.make_with_state` or by the last "
                   "call of `eqx_bn`") from e
    dtype = eqx_bn.weight.dtype if eqx_bn.weight is not None else jnp.asarray(mean).dtype
    options: dict[str, Any] = dict(axis=0, axis_name=eqx_bn.axis_name, epsilon=eqx_bn.eps,
                                   momentum=eqx_bn.momentum, param_dtype=dtype)
    if "use_running_average" not in kwargs:
        options["inference"] = eqx_bn.inference
    return _build(eqx_bn.weight, eqx_bn.bias, jnp.asarray(mean), jnp.asarray(var),
                  "the eqx.nn.BatchNorm", options | kwargs)


def deserialise_filter_spec(f: Any, like: Any) -> Any:
    r"""Equinox's `eqx.default_deserialise_filter_spec`, except that a floating-point
    array stored narrower than its `like` is widened to `like`'s dtype (exactly).

    For checkpoints written by version 0.1 of this library: a layer with
    `param_dtype=jnp.float64` under `jax_enable_x64` kept its running statistics in
    float32 then, and keeps them in float64 now (as Flax does), so the file's statistics
    are narrower than a freshly built state's, which Equinox refuses.

    !!! Example

        ```python
        import tempfile

        path = tempfile.mkdtemp() + "/model.eqx"
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(8)
        eqx.tree_serialise_leaves(path, (bn, state))   # e.g. written by version 0.1
        bn, state = eqx.tree_deserialise_leaves(
            path, (bn, state), filter_spec=ebn.deserialise_filter_spec)
        ```

    **Arguments:**

    - `f`: the open file, as `eqx.tree_deserialise_leaves` passes it.
    - `like`: the leaf of the `like` tree being loaded.

    **Returns:**

    The loaded leaf: as Equinox loads it, widened where it is a floating-point array
    of a narrower floating dtype than `like`'s.

    **Raises:**

    Nothing of its own: any other difference (shape, kind of dtype, a narrowing) is
    left for `eqx.tree_deserialise_leaves` to report.
    """
    value = eqx.default_deserialise_filter_spec(f, like)
    if (eqx.is_array(value) and eqx.is_array(like)
            and jnp.issubdtype(value.dtype, jnp.floating)
            and jnp.issubdtype(like.dtype, jnp.floating)
            and value.dtype != like.dtype
            and jnp.promote_types(value.dtype, like.dtype) == like.dtype):
        return value.astype(like.dtype)
    return value
