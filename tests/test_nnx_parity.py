"""`ebn.BatchNorm` against `flax.nnx.BatchNorm`, a second oracle, over the pairwise grid of
`test_flax_parity.py` (imported from there, not copied).

For each configuration an `nnx.BatchNorm` is built and given the configuration's
parameters and running statistics, and ours is made from it with `ebn.from_nnx` (for the
per-example style, with `axis` and `axis_name` overridden and called under `jax.vmap`).
Both see the same batch and mask; compared are the output (values and dtype) and the new
running statistics, in training and in inference.

NNX holds one feature axis and always reduces in at least float32: a configuration with
a tuple of feature axes is compared on a single axis, and one without
`force_float32_reductions` with it. Where `dtype=None`, NNX promotes a half-precision input
to its float32 statistics and returns float32: `from_nnx` gives ours `dtype=float32` to
match, so the output dtypes agree on every configuration. With an explicit half-precision
`dtype`, NNX rounds the input to it before taking statistics (linen and ours do not): the
running statistics are compared to one unit of that rounding there.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_flax_parity import GRID, Config, _close, _example_axis, _tolerances

import eqx_batchnorm as ebn


def _expressible(cfg: Config) -> Config:
    """The nearest configuration NNX can express."""
    return dataclasses.replace(cfg, axis="pos" if cfg.axis == "tuple" else cfg.axis,
                               ffr=True)


NNX_GRID = list(dict.fromkeys(_expressible(cfg) for cfg in GRID))


def test_nnx_grid_keeps_most_configurations():
    assert len(NNX_GRID) >= 0.9 * len(GRID), (len(NNX_GRID), len(GRID))


def _data(cfg: Config):
    """`test_flax_parity`'s data (same distributions), drawn with NumPy: JAX's random
    functions would compile anew for every shape and dtype of the grid."""
    rng = np.random.default_rng(0)
    shape = cfg.shape
    axis = cfg.batched_axis
    assert isinstance(axis, int)
    fshape = (shape[axis],)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, cfg.x_dtype)
    scale = jnp.asarray(1 + 0.5 * rng.normal(size=fshape), cfg.param_dtype)
    bias = jnp.asarray(0.5 * rng.normal(size=fshape), cfg.param_dtype)
    r_mean = jnp.asarray(0.3 * rng.normal(size=fshape), jnp.float32)
    r_var = jnp.asarray(rng.uniform(0.5, 2.0, size=fshape), jnp.float32)
    if cfg.mask == "none":
        mask = None
    elif cfg.mask == "full":
        mask = rng.random(shape) < 0.7
    else:  # whole examples, broadcast over every other axis
        mask = rng.random((shape[0],) + (1,) * (len(shape) - 1)) < 0.6
    if mask is not None:
        mask[0] = True
        mask = jnp.asarray(mask)
    return x, scale, bias, r_mean, r_var, mask


def _layers(cfg: Config, scale, bias, r_mean, r_var):
    """The nnx.BatchNorm of `cfg` holding the given arrays, and ours made from it."""
    axis = cfg.batched_axis
    assert isinstance(axis, int)
    layer = nnx.BatchNorm(
        cfg.shape[axis], use_running_average=cfg.inference, axis=axis,
        momentum=cfg.momentum, epsilon=cfg.epsilon, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, use_bias=cfg.use_bias, use_scale=cfg.use_scale,
        use_fast_variance=cfg.fast, rngs=nnx.Rngs(0))
    if cfg.use_scale:
        layer.scale[...] = scale
    if cfg.use_bias:
        layer.bias[...] = bias
    layer.mean[...], layer.var[...] = r_mean, r_var
    overrides = {}
    if cfg.style == "per_example":
        overrides = dict(axis=_example_axis(axis), axis_name="batch")
    bn, state = ebn.from_nnx(layer, **overrides)
    return layer, bn, state


@pytest.mark.parametrize("cfg", NNX_GRID, ids=str)
def test_matches_nnx(cfg: Config):
    x, scale, bias, r_mean, r_var, mask = _data(cfg)
    layer, bn, state = _layers(cfg, scale, bias, r_mean, r_var)
    graphdef, nnx_state = nnx.split(layer)

    def both(bn, state, nnx_state, x, mask):
        if cfg.style == "per_example":
            y, new = jax.vmap(lambda x, m: bn(x, state, mask=m), axis_name="batch",
                              in_axes=(0, None if mask is None else 0),
                              out_axes=(0, None))(x, mask)
        else:
            y, new = bn(x, state, mask=mask)
        stats = new.get(bn.state_index)
        reference = nnx.merge(graphdef, nnx_state)
        y_ref = reference(x, mask=mask)  # inference from the layer's own flag
        return (y, stats.mean, stats.var), (y_ref, reference.mean[...], reference.var[...])

    (y, mean, var), (y_ref, mean_ref, var_ref) = both(bn, state, nnx_state, x, mask)
    tol = _tolerances(cfg, y_ref.dtype)
    if cfg.dtype is not None and jnp.finfo(cfg.dtype).bits < 32:
        # NNX rounds the input to a half-precision `dtype` before taking statistics, where
        # linen and ours take them from the input as given: one unit of that rounding.
        tol["running"] = max(tol["running"], float(jnp.finfo(cfg.dtype).eps))
    assert y.dtype == y_ref.dtype
    _close(y, y_ref, tol["output"], "output")
    for ours, ref, name in ((mean, mean_ref, "mean"), (var, var_ref, "var")):
        assert ours.dtype == ref.dtype == jnp.float32, name
        _close(ours, ref, tol["running"], f"running {name}")
    if cfg.inference:  # neither touches the running statistics
        np.testing.assert_array_equal(mean, r_mean)
        np.testing.assert_array_equal(mean_ref, r_mean)
