"""Folding an inference-mode BatchNorm into the preceding Linear/Conv: same outputs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn


def _bn(channels, seed, **kwargs):
    """A BatchNorm with trained-looking parameters and running statistics."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    kwargs.setdefault("axis", 0)
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(channels, epsilon=1e-3, **kwargs)
    if bn.scale is not None:
        bn = eqx.tree_at(lambda b: b.scale, bn, jax.random.uniform(k1, (channels,),
                                                                   minval=-2, maxval=2))
    if bn.bias is not None:
        bn = eqx.tree_at(lambda b: b.bias, bn, jax.random.normal(k2, (channels,)))
    stats = ebn.BatchStats(jax.random.normal(k3, (channels,)) * 2,
                           jax.random.uniform(k4, (channels,), minval=0.2, maxval=3.0))
    return bn, state.set(bn.state_index, stats)


def _assert_close(actual, expected):
    # 1e-5 relative to the output's scale.
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@eqx.filter_jit  # one compilation per case instead of one per eager operation
def _both(layer, bn, state, folded, xs):
    expected = jax.vmap(lambda x: bn(layer(x), state, inference=True)[0])(xs)
    return jax.vmap(folded)(xs), expected


K = jax.random.key(0)
LAYERS = {
    "linear": (lambda b: eqx.nn.Linear(6, 5, use_bias=b, key=K), (6,)),
    "conv1d": (lambda b: eqx.nn.Conv1d(3, 5, 3, padding=1, use_bias=b, key=K), (3, 7)),
    "conv2d_grouped_strided": (
        lambda b: eqx.nn.Conv2d(4, 6, 3, stride=2, groups=2, use_bias=b, key=K), (4, 7, 7)),
    "conv3d": (lambda b: eqx.nn.Conv3d(2, 3, 2, use_bias=b, key=K), (2, 3, 4, 3)),
    "conv_transpose2d": (
        lambda b: eqx.nn.ConvTranspose2d(3, 4, 3, stride=2, use_bias=b, key=K), (3, 4, 4)),
}


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fold_into_equals_layer_then_batch_norm(name, use_bias):
    make, example_shape = LAYERS[name]
    layer = make(use_bias)
    channels = layer.out_features if name == "linear" else layer.out_channels
    bn, state = _bn(channels, seed=len(name), axis_name="batch")
    xs = jax.random.normal(jax.random.key(1), (4,) + example_shape) + 0.5
    folded = ebn.fold_into(layer, bn, state)
    assert type(folded) is type(layer) and folded.use_bias
    assert folded.weight.dtype == layer.weight.dtype
    assert folded.bias is not None
    if use_bias:
        assert layer.bias is not None and folded.bias.shape == layer.bias.shape
    _assert_close(*_both(layer, bn, state, folded, xs))


@pytest.mark.parametrize(("use_scale", "use_bias"), [(False, True), (True, False)])
def test_fold_without_affine_and_training_mode_field(use_scale, use_bias):
    layer = eqx.nn.Linear(4, 3, key=K)
    bn, state = _bn(3, seed=2, use_scale=use_scale, use_bias=use_bias)
    assert not bn.inference  # folding uses the running statistics regardless
    xs = jax.random.normal(jax.random.key(1), (5, 4))
    _assert_close(*_both(layer, bn, state, ebn.fold_into(layer, bn, state), xs))


def test_fold_batched_channels_first_batch_norm():
    """A BatchNorm on the vmapped (batch, C, H, W) output, e.g. from `from_torch`."""
    conv = eqx.nn.Conv2d(2, 3, 3, key=K)
    bn, state = _bn(3, seed=3, axis=1)
    xs = jax.random.normal(jax.random.key(1), (4, 2, 5, 5))
    folded = ebn.fold_into(conv, bn, state)
    ys, expected = eqx.filter_jit(
        lambda: (jax.vmap(folded)(xs), bn(jax.vmap(conv)(xs), state, inference=True)[0]))()
    _assert_close(ys, expected)


def test_fold_errors():
    conv = eqx.nn.Conv2d(2, 4, 3, key=K)
    bn, state = _bn(4, seed=4)
    with pytest.raises(ebn.BatchNormError, match="layer"):
        ebn.fold_into(eqx.nn.LayerNorm(4), bn, state)
    with pytest.raises(ebn.BatchNormError, match="layer"):
        ebn.fold_into(eqx.nn.Linear(3, "scalar", key=K), bn, state)
    wrong_axis, wrong_state = _bn(4, seed=4, axis=-1)  # the width of a (4, H, 4) output
    with pytest.raises(ebn.BatchNormError, match="axis"):
        ebn.fold_into(conv, wrong_axis, wrong_state)
    wrong_size, wrong_size_state = _bn(5, seed=4)
    with pytest.raises(ebn.BatchNormError, match="5"):
        ebn.fold_into(conv, wrong_size, wrong_size_state)
    eqx_bn, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch")
    with pytest.raises(ebn.BatchNormError, match="from_equinox"):
        ebn.fold_into(conv, eqx_bn, eqx_state)
    with pytest.raises(ebn.BatchNormError, match="Sequential"):
        ebn.fold_sequential([conv, bn], state)


def test_fold_sequential_folds_every_pair():
    k = jax.random.split(K, 4)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(2, 4, 3, use_bias=False, key=k[0]),
        ebn.BatchNorm(4, axis=0, axis_name="batch"),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Lambda(jnp.ravel),
        eqx.nn.Sequential([
            eqx.nn.Linear(4 * 3 * 3, 8, key=k[1]),
            ebn.BatchNorm(8, axis=0, axis_name="batch"),
        ]),
        eqx.nn.Lambda(jax.nn.relu),
        ebn.BatchNorm(8, axis=0, axis_name="batch"),  # after an activation: kept
        eqx.nn.Linear(8, 2, key=k[2]),
    ])
    xs = jax.random.normal(k[3], (16, 2, 5, 5))

    @eqx.filter_jit
    def train(model, xs, state):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            xs, state)[1]

    @eqx.filter_jit
    def infer(model, xs, state):
        return jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None),
                        out_axes=(0, None))(xs, state)[0]

    for i in range(3):  # non-trivial running statistics
        state = train(model, xs * (1 + i) + i, state)
    folded = ebn.fold_sequential(model, state)
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds == ["Conv2d", "Lambda", "Lambda", "Sequential", "Lambda", "BatchNorm",
                     "Linear"]
    assert [type(layer).__name__ for layer in folded.layers[3].layers] == ["Linear"]
    _assert_close(infer(folded, xs, state), infer(model, xs, state))
