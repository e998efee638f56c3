"""`from_nnx` / `to_nnx` against the real `flax.nnx.BatchNorm`."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eqx_batchnorm as ebn


def _normal(shape, seed, loc=0.0, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale + loc


def _close(a, b, rtol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


def _trained_nnx(steps=3, **kwargs):
    """An nnx.BatchNorm with moved parameters and running statistics."""
    layer = nnx.BatchNorm(4, rngs=nnx.Rngs(0), **kwargs)
    for name, seed in (("scale", 1), ("bias", 2)):
        var = getattr(layer, name)
        if var is not None:
            var[...] = (1.0 + 0.5 * _normal((4,), seed)).astype(var[...].dtype)
    for i in range(steps):
        layer(_normal((6, 3, 4), 10 + i, 2.0, 1.0 + i), use_running_average=False)
    return layer


def _stats(layer):
    return np.asarray(layer.mean[...]), np.asarray(layer.var[...])


@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, True), (False, True),
                                                      (False, False)])
def test_from_nnx_trains_and_infers_as_nnx(use_scale, use_bias, clone):
    layer = _trained_nnx(momentum=0.8, epsilon=1e-3, use_scale=use_scale,
                         use_bias=use_bias, use_fast_variance=False)
    bn, state = ebn.from_nnx(layer)
    assert (bn.momentum, bn.epsilon, bn.axis, bn.use_fast_variance) == (0.8, 1e-3, -1, False)
    assert (bn.scale is not None, bn.bias is not None) == (use_scale, use_bias)
    assert bn.inference is False
    x = _normal((5, 3, 4), 20, -1.0, 3.0)

    y, _ = bn(x, clone(state), inference=True)
    _close(y, layer(x, use_running_average=True))

    y, new_state = bn(x, state)
    y_ref = layer(x, use_running_average=False)  # updates the layer's BatchStats
    assert y.dtype == y_ref.dtype
    _close(y, y_ref)
    stats = new_state.get(bn.state_index)
    for ours, ref in zip((stats.mean, stats.var), _stats(layer), strict=True):
        _close(ours, ref)


def test_to_nnx_trains_and_infers_as_here(clone):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, axis=1, momentum=0.7,
                                                      epsilon=1e-4, inference=True)
    bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (1 + 0.5 * _normal((4,), 1),
                                                       _normal((4,), 2)))
    for i in range(2):
        _, state = bn(_normal((6, 4, 3), i, 1.0, 2.0), state, inference=False)
    layer = ebn.to_nnx(bn, clone(state))
    assert isinstance(layer, nnx.BatchNorm)
    assert (layer.axis, layer.momentum, layer.epsilon) == (1, 0.7, 1e-4)
    assert layer.use_running_average is True
    x = _normal((5, 4, 3), 9, 0.5, 2.0)

    _close(layer(x), bn(x, clone(state))[0])  # inference, from the `inference` flag
    y, new_state = bn(x, state, inference=False)
    _close(layer(x, use_running_average=False), y)
    stats = new_state.get(bn.state_index)
    for ours, ref in zip((stats.mean, stats.var), _stats(layer), strict=True):
        _close(ours, ref)


def test_round_trips_both_ways(clone):
    layer = _trained_nnx(axis_name="d", axis_index_groups=[[0, 1], [2, 3]],
                         use_running_average=True)
    bn, state = ebn.from_nnx(layer)
    back = ebn.to_nnx(bn, clone(state))
    for name in ("axis", "momentum", "epsilon", "param_dtype", "use_bias", "use_scale",
                 "axis_name", "use_fast_variance", "use_running_average"):
        assert getattr(back, name) == getattr(layer, name), name
    assert back.dtype == jnp.float32  # NNX's dtype=None output, made explicit
    assert tuple(map(tuple, back.axis_index_groups)) == ((0, 1), (2, 3))
    for name in ("scale", "bias", "mean", "var"):
        np.testing.assert_array_equal(getattr(back, name)[...], getattr(layer, name)[...])

    bn2, state2 = ebn.from_nnx(back)
    np.testing.assert_array_equal(bn2.scale, bn.scale)
    np.testing.assert_array_equal(bn2.bias, bn.bias)
    assert (bn2.momentum, bn2.dtype, bn2.param_dtype) == (bn.momentum, bn.dtype, bn.param_dtype)
    assert (bn2.axis_name, bn2.axis_index_groups, bn2.inference) == (
        "d", ((0, 1), (2, 3)), True)
    np.testing.assert_array_equal(state2.get(bn2.state_index).var,
                                  state.get(bn.state_index).var)


def test_half_precision_input_gives_nnx_output_dtype():
    # NNX promotes a bfloat16 input to its float32 statistics: so does the converted layer.
    layer = _trained_nnx(param_dtype=jnp.bfloat16)
    bn, state = ebn.from_nnx(layer)
    assert bn.dtype == jnp.float32 and bn.param_dtype == jnp.bfloat16
    x = _normal((6, 3, 4), 3, 1.0, 2.0).astype(jnp.bfloat16)
    y, _ = bn(x, state)
    y_ref = layer(x, use_running_average=False)
    assert y.dtype == y_ref.dtype == jnp.float32
    _close(y, y_ref)


def test_overrides_and_per_example_style(clone):
    layer = _trained_nnx(momentum=0.9)
    x = _normal((5, 4, 2), 7, 1.0, 2.0)  # (batch, C, L): nnx with axis=1
    layer_c = nnx.BatchNorm(4, axis=1, momentum=0.9, rngs=nnx.Rngs(0))
    for name in ("scale", "bias", "mean", "var"):
        getattr(layer_c, name)[...] = getattr(layer, name)[...]
    bn, state = ebn.from_nnx(layer, axis=0, axis_name="batch")
    ys, new_state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(x, state)
    _close(ys, layer_c(x, use_running_average=False))
    _close(new_state.get(bn.state_index).var, layer_c.var[...])
    bn, _ = ebn.from_nnx(layer, use_running_average=True, skip_nonfinite_updates=False)
    assert bn.inference is True and bn.skip_nonfinite_updates is False


def test_errors(clone):
    linen_vars = nn.BatchNorm().init(jax.random.key(0), jnp.ones((2, 3)),
                                     use_running_average=False)
    with pytest.raises(ebn.BatchNormError, match=r"`nnx_batch_norm`.*flax.nnx.BatchNorm.*"
                       r"from_flax"):
        ebn.from_nnx(linen_vars)
    with pytest.raises(ebn.BatchNormError, match=r"`nnx_batch_norm`"):
        ebn.from_nnx(nnx.LayerNorm(3, rngs=nnx.Rngs(0)))
    custom = nnx.BatchNorm(3, rngs=nnx.Rngs(0),
                           promote_dtype=lambda args, dtype=None: args)
    with pytest.raises(ebn.BatchNormError, match="promote_dtype"):
        ebn.from_nnx(custom)
    with pytest.raises(ebn.BatchNormError, match="num_features"):
        ebn.from_nnx(_trained_nnx(0), num_features=4)
    with pytest.raises(ebn.BatchNormError, match="use_scale"):
        ebn.from_nnx(_trained_nnx(0), use_scale=False)

    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)((3, 2), axis=(1, 2))
    with pytest.raises(ebn.BatchNormError, match=r"`bn`.*one feature axis.*to_flax"):
        ebn.to_nnx(bn, state)
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3, renorm=True)
    with pytest.raises(ebn.BatchNormError, match=r"`bn`.*renorm"):
        ebn.to_nnx(bn, state)
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3, force_float32_reductions=False)
    with pytest.raises(ebn.BatchNormError, match=r"`bn`.*force_float32_reductions"):
        ebn.to_nnx(bn, state)
    eqx_bn, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(ebn.BatchNormError, match=r"`bn`.*from_equinox"):
        ebn.to_nnx(eqx_bn, eqx_state)
    bn, _ = eqx.nn.make_with_state(ebn.BatchNorm)(3)
    with pytest.raises(ebn.BatchNormError, match=r"`state`"):
        ebn.to_nnx(bn, eqx_state)
