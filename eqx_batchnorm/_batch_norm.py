r"""`BatchNorm`: the module. It validates its call once, then runs one compiled kernel."""

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from . import _moments, _normalize, _validate
from ._errors import BatchNormError, fail
from ._functional import moments_config, normalize_config, running_average
from ._participants import like_running

Initializer = Callable[..., Array]


class BatchStats(eqx.Module):
    """The running statistics of one `BatchNorm`, as stored in `eqx.nn.State`."""

    mean: Float[Array, "*features"]
    var: Float[Array, "*features"]


def _check_dtype(name: str, dtype: Any, allow_none: bool) -> Any:
    if dtype is None and allow_none:
        return None
    try:  # `jnp.dtype(None)` is float64: None must not slip through as a dtype.
        floating = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise fail(name, "a floating dtype" + (" or None" if allow_none else ""), repr(dtype),
                   f"pass e.g. `{name}=jnp.float32` or `{name}=jnp.bfloat16`")
    return dtype


def _init_param(name: str, init: Initializer, key: PRNGKeyArray | None,
                shape: tuple[int, ...], dtype: Any) -> Array:
    try:
        value = init(key, shape, dtype)
    except Exception as e:  # random initialisers fail without a key
        if key is None and _works_with_a_key(init, shape, dtype):
            raise fail("key", f"a PRNG key, because `{name}` draws random numbers", "None",
                       "pass `key=jax.random.key(0)` to the constructor") from e
        raise fail(name, "an initialiser `init(key, shape, dtype) -> array`",
                   f"one that raised {type(e).__name__}: {e}",
                   f"pass e.g. `{name}=jax.nn.initializers.ones`") from e
    value = jnp.asarray(value)
    if value.shape != shape:
        raise fail(name, f"an initialiser returning shape {shape}", f"shape {value.shape}",
                   "use an initialiser with the signature `init(key, shape, dtype)`")
    return value.astype(dtype)


def _works_with_a_key(init: Initializer, shape: tuple[int, ...], dtype: Any) -> bool:
    try:
        init(jax.random.key(0), shape, dtype)
    except Exception:
        return False
    return True


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalisation with exactly `flax.linen.BatchNorm`'s semantics, in Equinox's
    explicit-state style.

    In training, with batch statistics $\mu, \sigma^2$ (see `batch_statistics`),

    $$y = (x - \mu)\left(\gamma\,\frac{1}{\sqrt{\sigma^2 + \epsilon}}\right) + \beta,$$

    $$\mu_r \leftarrow m\,\mu_r + (1-m)\,\mu \qquad
      \sigma^2_r \leftarrow m\,\sigma^2_r + (1-m)\,\sigma^2 .$$

    In inference the running statistics $\mu_r, \sigma^2_r$ normalise instead.

    Two ways to call it, with the same numbers:

    - **batched** (Flax's): `x` is the whole batch; every axis but `axis` is reduced.
    - **per example** (Equinox's): under
      `jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))`, with
      `axis_name="batch"`; local non-feature axes and the named axis are reduced.

    !!! Example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp
        import eqx_batchnorm as ebn

        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(16)       # channels last
        x = jax.random.normal(jax.random.key(0), (32, 8, 8, 16))
        y, state = bn(x, state)                                       # training
        y, _ = eqx.nn.inference_mode(bn)(x, state)                    # inference

        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(16, axis=0, axis_name="batch")
        xs = jax.random.normal(jax.random.key(0), (32, 16, 8, 8))    # (batch, C, H, W)
        ys, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(xs, state)
        ```

    Differences from Flax, all deliberate: the fast variance is accurate when the mean
    dwarfs the spread; masked statistics across devices are exact; the running statistics
    average the groups of `axis_index_groups`; non-finite batches are skipped.
    """

    scale: Float[Array, "*features"] | None
    bias: Float[Array, "*features"] | None
    state_index: eqx.nn.StateIndex[BatchStats]
    inference: bool
    feature_shape: tuple[int, ...] = eqx.field(static=True)
    axis: int | tuple[int, ...] = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    param_dtype: Any = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    use_scale: bool = eqx.field(static=True)
    axis_name: Hashable | tuple[Hashable, ...] | None = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)
    use_fast_variance: bool = eqx.field(static=True)
    force_float32_reductions: bool = eqx.field(static=True)
    skip_nonfinite_updates: bool = eqx.field(static=True)
    renorm: bool = eqx.field(static=True)
    renorm_r_max: float = eqx.field(static=True)
    renorm_d_max: float = eqx.field(static=True)

    def __init__(
        self,
        num_features: int | Sequence[int],
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        axis_name: Hashable | tuple[Hashable, ...] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_fast_variance: bool = True,
        force_float32_reductions: bool = True,
        inference: bool | None = None,
        key: PRNGKeyArray | None = None,
        *,
        use_running_average: bool | None = None,
        skip_nonfinite_updates: bool = True,
        renorm: bool = False,
        renorm_r_max: float = 3.0,
        renorm_d_max: float = 5.0,
    ):
        r"""**Arguments:**

        - `num_features`: the feature size, or a tuple of sizes, one per entry of `axis`.
        - `axis`: the feature axis or axes of `x` (Flax's `axis`). Negative axes count
          from the end. Per example under `vmap`, channels-first is `axis=0`.
        - `momentum`: $m$ of the running average, in $[0, 1]$.
        - `epsilon`: $\epsilon \ge 0$, added to the variance.
        - `dtype`: the output dtype, and the minimum precision of the statistics
          (default: inferred from `x` and the parameters, as Flax).
        - `param_dtype`: the dtype of `scale` and `bias`.
        - `use_bias`, `use_scale`: whether $\beta$, $\gamma$ exist.
        - `bias_init`, `scale_init`: `init(key, shape, dtype)` initialisers.
        - `axis_name`: the name(s) of `vmap`/`pmap`/`shard_map` axes to reduce across.
        - `axis_index_groups`: a partition of the named axis into equal groups that
          normalise separately, under `vmap` (ghost batch norm), `pmap` and `shard_map`.
        - `use_fast_variance`: one accurate pass if `True`; two passes if `False`.
        - `force_float32_reductions`: (running) statistics in at least float32.
        - `inference`: use the running statistics (flipped by `eqx.nn.inference_mode`).
          `use_running_average` is Flax's alias.
        - `key`: a PRNG key, needed only when an initialiser is random.
        - `skip_nonfinite_updates`: features whose batch statistics are not finite keep
          their running statistics (`False`: Flax's behaviour, the NaN written in).
        - `renorm`: batch renormalisation (Ioffe, 2017) in training, with the clipping
          bounds `renorm_r_max` ($r_{max} \ge 1$) and `renorm_d_max` ($d_{max} \ge 0$).

        **Raises:**

        `BatchNormError` (a `ValueError` and a `TypeError`) naming the argument, for
        any argument out of its domain.
        """
        axes = _validate.as_axis_tuple(axis)
        sizes = _validate.check_num_features(num_features, axes)
        self.feature_shape = tuple(sizes[i] for i in _validate.feature_order(axes))
        self.axis = axes[0] if isinstance(axis, int | np.integer) else axes
        self.momentum = _validate.check_scalar("momentum", momentum, 0.0, 1.0)
        self.epsilon = _validate.check_scalar("epsilon", epsilon, 0.0, finite=True)
        self.dtype = _check_dtype("dtype", dtype, allow_none=True)
        self.param_dtype = _check_dtype("param_dtype", param_dtype, allow_none=False)
        self.use_bias = _validate.check_flag("use_bias", use_bias)
        self.use_scale = _validate.check_flag("use_scale", use_scale)
        # Used here and not kept: two layers built alike are then one pytree structure,
        # whichever initialiser objects built them.
        _validate.check_callable("bias_init", bias_init)
        _validate.check_callable("scale_init", scale_init)
        self.axis_name = _validate.check_axis_name(axis_name)
        self.axis_index_groups = _validate.check_axis_index_groups(axis_index_groups,
                                                                   self.axis_name)
        self.use_fast_variance = _validate.check_flag("use_fast_variance", use_fast_variance)
        self.force_float32_reductions = _validate.check_flag("force_float32_reductions",
                                                             force_float32_reductions)
        self.inference = _merge_flags(inference, use_running_average, default=False)
        self.skip_nonfinite_updates = _validate.check_flag("skip_nonfinite_updates",
                                                           skip_nonfinite_updates)
        self.renorm = _validate.check_flag("renorm", renorm)
        self.renorm_r_max = _validate.check_scalar("renorm_r_max", renorm_r_max, 1.0)
        self.renorm_d_max = _validate.check_scalar("renorm_d_max", renorm_d_max, 0.0)

        skey, bkey = (None, None) if key is None else jax.random.split(key)
        self.scale = (_init_param("scale_init", scale_init, skey, self.feature_shape,
                                  param_dtype) if use_scale else None)
        self.bias = (_init_param("bias_init", bias_init, bkey, self.feature_shape,
                                 param_dtype) if use_bias else None)
        stat_dtype = running_dtype(self)
        self.state_index = eqx.nn.StateIndex(BatchStats(
            jnp.zeros(self.feature_shape, stat_dtype), jnp.ones(self.feature_shape, stat_dtype)))

    def __call__(
        self,
        x: Shaped[Array | np.ndarray, "*shape"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        use_running_average: bool | None = None,
        mask: Shaped[Array | np.ndarray, "..."] | None = None,
        update_stats: bool | None = None,
        renorm_r_max: float | Float[Array, ""] | None = None,
        renorm_d_max: float | Float[Array, ""] | None = None,
    ) -> tuple[Shaped[Array, "*shape"], eqx.nn.State]:
        r"""**Arguments:**

        - `x`: the whole batch, or one example (per-example style, under `vmap`).
        - `state`: the `eqx.nn.State` holding this layer's running statistics.
        - `key`: unused; accepted so that `eqx.nn.Sequential` can pass one.
        - `inference` / `use_running_average`: override the `inference` field for this
          call (giving both with different values is an error).
        - `mask`: boolean, broadcastable to `x`; statistics over `True` positions only.
        - `update_stats`: whether to update the running statistics (default: when not in
          inference), whichever statistics normalise: e.g. `inference=True,
          update_stats=True` normalises with the running statistics (before this update)
          while accumulating the batch's.
        - `renorm_r_max`, `renorm_d_max`: per-call clipping bounds for batch
          renormalisation (may be traced, for warm-up schedules).

        **Returns:**

        `(y, state)`: `y` shaped like `x`, and the state with updated running statistics.

        **Raises:**

        `BatchNormError` naming the argument: an `x`, `mask`, `state` or flag that does not
        fit, an unbound `axis_name`, groups that do not partition the axis, nothing to
        reduce over, or a training call under a `jax.vmap` without its `axis_name`.
        """
        _validate.check_float_input(x)
        if not isinstance(state, eqx.nn.State):
            raise fail("state", "an `eqx.nn.State`", f"{type(state).__name__}",
                       "pass the state from `eqx.nn.make_with_state(ebn.BatchNorm)(...)`, "
                       "or the one returned by the previous call")
        shape = tuple(x.shape)
        _validate.check_mask(mask, shape)
        r_max = _validate.check_call_bound("renorm_r_max", renorm_r_max, 1.0)
        d_max = _validate.check_call_bound("renorm_d_max", renorm_d_max, 0.0)
        # `x` and `mask` are fully checked above; the annotations add only these.
        _validate.check_annotations("BatchNorm.__call__", _CALL_HINTS,
                                    {"key": key, "renorm_r_max": r_max, "renorm_d_max": d_max})
        axes = _validate.as_axis_tuple(self.axis)
        feature_axes = _validate.canonical_feature_axes(axes, x.ndim, shape)
        got = tuple(shape[a] for a in feature_axes)
        if got != self.feature_shape:
            raise fail("x", f"size(s) {self.feature_shape} on the feature axis "
                       f"`axis={self.axis}`", f"shape {shape}, which has {got} there",
                       "pass `x` with the features on `axis` (under `jax.vmap`, `x` is "
                       "one example: use `axis=0` for channels-first), or construct "
                       f"`BatchNorm({_validate.one_or_all(got)}, ...)`")
        running = _get_running(state, self)
        use_running = _merge_flags(inference, use_running_average,
                                   default=_field_flag(self.inference))
        update_stats = _validate.check_optional_flag("update_stats", update_stats)
        update = (not use_running) if update_stats is None else update_stats
        if not self.renorm and (r_max is not None or d_max is not None):
            raise fail("renorm_r_max" if r_max is not None else "renorm_d_max",
                       "no per-call renorm bound on a layer built with `renorm=False`",
                       f"renorm_r_max={r_max}, renorm_d_max={d_max}",
                       "construct the layer with `BatchNorm(..., renorm=True)`, or drop the bound")
        names = _validate.as_names(self.axis_name)
        moments = None
        if not use_running or update:
            moments = moments_config(x, feature_axes, names, self.axis_index_groups,
                                     self.use_fast_variance, self.dtype,
                                     self.force_float32_reductions)
        if update:
            _validate.warn_per_index_statistics(x, running.mean, names)
            _validate.check_state_on_mesh(x, running.mean)
        renorm = self.renorm and not use_running
        plan = _Plan(
            moments=moments,
            norm=normalize_config(x, feature_axes, self.epsilon, self.scale, self.bias,
                                  self.dtype),
            use_running=use_running, update=update, renorm=renorm,
            momentum=self.momentum, skip_nonfinite=self.skip_nonfinite_updates,
            running_dtype=None if self.force_float32_reductions else self.param_dtype)
        bounds = ((self.renorm_r_max if r_max is None else r_max,
                   self.renorm_d_max if d_max is None else d_max) if renorm else (None, None))
        y, new = _forward(plan, x, mask, self.scale, self.bias, running.mean, running.var,
                          *bounds)
        if update:
            state = state.set(self.state_index, BatchStats(*new))
        return y, state


_CALL_HINTS = {
    "key": PRNGKeyArray,
    "renorm_r_max": float | Float[Array | np.ndarray, ""],
    "renorm_d_max": float | Float[Array | np.ndarray, ""],
}


class _Plan(NamedTuple):
    """Everything static about one call: the key of `_forward`'s compilation cache."""

    moments: _moments.Config | None  # None: no batch statistics needed
    norm: _normalize.Config
    use_running: bool  # normalise with the running statistics
    update: bool  # update the running statistics
    renorm: bool
    momentum: float
    skip_nonfinite: bool
    running_dtype: Any  # what the running statistics normalise in (None: as stored)


@functools.partial(jax.jit, static_argnums=0)
def _forward(plan: _Plan, x, mask, scale, bias, mean_r, var_r, r_max, d_max):
    """One call of the layer on validated arguments: `(y, (new_mean, new_var) or None)`.
    Compiled once per plan and shapes; traced once per plan inside a jitted model."""
    stats = None if plan.moments is None else _moments.moments(x, mask, plan.moments)
    if plan.use_running:
        mean, var = mean_r, var_r
        if plan.running_dtype is not None:
            mean, var = mean.astype(plan.running_dtype), var.astype(plan.running_dtype)
    else:
        assert stats is not None
        mean, var = stats[0], stats[1]
        if plan.renorm:
            scale, bias = _renorm_affine(plan.norm.epsilon, mean, var, mean_r, var_r,
                                         scale, bias, r_max, d_max)
    y = _normalize.normalize_kernel(plan.norm, x, mean, var, scale, bias)
    if not plan.update:
        return y, None
    assert stats is not None
    new_mean = running_average(mean_r, like_running(stats[2], mean_r), plan.momentum)
    new_var = running_average(var_r, like_running(stats[3], var_r), plan.momentum)
    if plan.skip_nonfinite:
        ok = jnp.isfinite(new_mean) & jnp.isfinite(new_var)
        new_mean = jnp.where(ok, new_mean, mean_r)
        new_var = jnp.where(ok, new_var, var_r)
    return y, (new_mean, new_var)


def _renorm_affine(epsilon, mean, var, mean_r, var_r, scale, bias, r_max, d_max):
    """Batch renormalisation as an affine correction: with stop-gradient `r` and `d`,
    `((x - mu) / s * r + d) * gamma + beta == (x - mu) / s * (gamma r) + (gamma d + beta)`."""
    sg = jax.lax.stop_gradient
    std_b = jnp.sqrt(sg(var) + epsilon)
    std_r = jnp.sqrt(var_r.astype(std_b.dtype) + epsilon)
    r = sg(jnp.clip(std_b / std_r, 1 / r_max, r_max))
    d = sg(jnp.clip((sg(mean) - mean_r) / std_r, -d_max, d_max))
    gamma = scale if scale is not None else jnp.ones((), r.dtype)
    beta = bias if bias is not None else jnp.zeros((), d.dtype)
    return gamma * r, gamma * d + beta


def running_dtype(bn: BatchNorm) -> Any:
    """The dtype of the running statistics: `param_dtype`, at least float32 when forcing
    float32 reductions (Flax's "at least": float64 stays float64 under x64). Canonical:
    without x64, float64 gives float32."""
    dtype = bn.param_dtype
    if bn.force_float32_reductions:
        dtype = jnp.promote_types(dtype, jnp.float32)
    return jax.dtypes.canonicalize_dtype(dtype)


def _merge_flags(inference: Any, use_running_average: Any, default: bool) -> bool:
    """`inference` and its Flax alias `use_running_average`, each checked, as one flag."""
    equinox_flag = _validate.check_optional_flag("inference", inference)
    flax_flag = _validate.check_optional_flag("use_running_average", use_running_average)
    if equinox_flag is not None and flax_flag is not None and equinox_flag != flax_flag:
        raise fail("inference", "`inference` and `use_running_average` to agree (they are "
                   "aliases)", f"inference={equinox_flag}, use_running_average={flax_flag}",
                   "pass only one of them")
    return next((f for f in (equinox_flag, flax_flag) if f is not None), default)


def _field_flag(value: Any) -> bool:
    """The `inference` field, which a careless `tree_map` or `jit` can turn into an array."""
    try:
        return _validate.check_flag("inference", value)
    except BatchNormError:
        raise fail("inference", "the layer's `inference` field to be a Python bool",
                   f"{type(value).__name__} of shape {np.shape(value)}",
                   "map or jit only the arrays of the layer (`eqx.filter_jit`, "
                   "`eqx.filter(layer, eqx.is_array)`), or set the flag with "
                   "`eqx.nn.inference_mode(layer, value)`") from None


def _get_running(state: eqx.nn.State, bn: BatchNorm, per_block: str = "",
                 stacked: bool = False) -> BatchStats:
    """`bn`'s running statistics in `state`, checked. `per_block`: the caller mapped over
    stacked blocks, for the message on a scanned model's state ("" for the layer's call);
    `stacked`: whether leading (block) axes before the features are accepted."""
    try:
        running = state.get(bn.state_index)
    except KeyError as e:
        raise fail("state", "an `eqx.nn.State` holding this layer's running statistics",
                   "a state without them", "build model and state together with "
                   "`eqx.nn.make_with_state(...)`, and pass the state returned by the "
                   "previous call") from e
    except ValueError as e:  # Equinox invalidates a state once `.set` has been called on it
        raise fail("state", "the latest state (each `eqx.nn.State` can be used once)",
                   "a state already consumed by an earlier call",
                   "pass the state returned by the previous call; to reuse one on purpose, copy "
                   "it first: `jax.tree_util.tree_map(lambda a: a, state)`") from e
    stat_dtype = running_dtype(bn)
    if not isinstance(running, BatchStats):
        raise fail("state", "running statistics for this layer", repr(running),
                   "pass the state made with this layer")
    shapes = {tuple(np.shape(v)) for v in (running.mean, running.var)}
    dtypes = {jnp.result_type(v) for v in (running.mean, running.var)}
    blocks = _validate.leading_axes(next(iter(shapes)), bn.feature_shape)
    if len(shapes) == 1 and dtypes == {stat_dtype} and (
            shapes == {bn.feature_shape} or (stacked and blocks is not None)):
        return running
    got = f"statistics of shape {np.shape(running.mean)} and dtype {jnp.result_type(running.mean)}"
    expected = (f"running statistics of shape {bn.feature_shape} and dtype "
                f"{jnp.dtype(stat_dtype)} for this layer")
    if blocks is not None and dtypes == {stat_dtype}:
        raise fail("state", expected, got, _validate.per_block_fix(per_block, blocks))
    fix = ("pass the state made with this layer (a checkpoint of another feature size or "
           "dtype does not fit)")
    if jnp.dtype(stat_dtype) == jnp.float64 and dtypes == {jnp.dtype(jnp.float32)}:
        fix += ("; a checkpoint written by version 0.1 holds float32 statistics for a float64 "
                "layer: load it with `eqx.tree_deserialise_leaves(path, (model, state), "
                "filter_spec=ebn.deserialise_filter_spec)`")
    raise fail("state", expected, got, fix)
