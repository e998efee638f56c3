"""`from_equinox_model`: every `eqx.nn.BatchNorm` of a real Equinox model swapped at once."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn

C = 3


def _per_example(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def _forward(model, xs, state):
    return _per_example(model)(xs, state)


@eqx.filter_jit
def _train_step(model, xs, state):
    """One SGD step as Equinox users write it: per example under vmap, filtered grads."""

    def loss(model):
        ys, new_state = _per_example(model)(xs, state)
        return jnp.mean((ys - 1.0) ** 2), new_state

    (value, new_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.05 * g, grads))
    return model, new_state, value


class Block(eqx.Module):
    layers: eqx.nn.Sequential

    def __init__(self, key, mode):
        self.layers = eqx.nn.Sequential([
            eqx.nn.Conv2d(C, C, 3, padding=1, key=key),
            eqx.nn.BatchNorm(C, "batch", mode=mode, momentum=0.8, eps=1e-3),
            eqx.nn.Lambda(jax.nn.relu),
        ])

    def __call__(self, x, state):
        return self.layers(x, state)


class Net(eqx.Module):
    """Sequentials inside modules inside a list, a dict and a tuple; a SpectralNorm (also
    stateful) beside the batch norms; a batch norm without affine parameters."""

    blocks: list
    named: dict
    spectral: eqx.nn.SpectralNorm
    plain: tuple

    def __init__(self, key, mode):
        k = jax.random.split(key, 4)
        self.blocks = [Block(k[0], mode), Block(k[1], mode)]
        self.named = {"late": (Block(k[2], mode),)}
        self.spectral = eqx.nn.SpectralNorm(eqx.nn.Conv2d(C, C, 1, key=k[3]), "weight",
                                            key=k[3])
        self.plain = (eqx.nn.BatchNorm(C, "batch", channelwise_affine=False, mode=mode,
                                       momentum=0.5),)

    def __call__(self, x, state):
        for block in self.blocks:
            x, state = block(x, state)
        x, state = self.named["late"][0](x, state)
        x, state = self.spectral(x, state)
        return self.plain[0](x, state)


def _data(seed, n=6):
    return jax.random.normal(jax.random.key(seed), (n, C, 4, 4)) * 2 + 0.5


def _trained(mode):
    """An Equinox model after a few training steps, with affine parameters moved."""
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0), mode)
    for i in range(3):
        model, state, _ = _train_step(model, _data(i) * (1 + i), state)
    return model, state


def _batch_norms(model, cls):
    return [x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, cls))
            if isinstance(x, cls)]


def _num_entries(state):
    return len(state.tree_flatten()[1])


def _close(a, b, rtol=1e-5):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_whole_model_inference_equal_and_training_goes_on(mode, clone):
    model, state = _trained(mode)
    x = _data(10)
    y_ref, _ = _forward(eqx.nn.inference_mode(model), x, clone(state))

    new_model, new_state = ebn.from_equinox_model(model, state)

    assert not _batch_norms(new_model, eqx.nn.BatchNorm)
    converted = _batch_norms(new_model, ebn.BatchNorm)
    assert len(converted) == 4
    for bn in converted:
        assert (bn.axis, bn.axis_name, bn.inference) == (0, "batch", False)
    assert converted[0].momentum == 0.8 and converted[0].epsilon == 1e-3
    assert converted[-1].scale is None and converted[-1].momentum == 0.5
    # Every other leaf is the very same object.
    old_conv, new_conv = model.blocks[1].layers[0], new_model.blocks[1].layers[0]
    assert old_conv.weight is new_conv.weight
    assert new_model.spectral.layer.weight is model.spectral.layer.weight
    # Per layer: two eqx entries (statistics + counter or first-time flag) become one;
    # SpectralNorm's entry is kept as it was.
    assert _num_entries(new_state) == _num_entries(state) - 4
    spectral_ref = state.get(model.spectral.uv_index)
    for a, b in zip(new_state.get(new_model.spectral.uv_index), spectral_ref, strict=True):
        assert a is b

    y, _ = _forward(eqx.nn.inference_mode(new_model), x, clone(new_state))
    _close(y, y_ref)

    # The old state is left usable.
    _forward(eqx.nn.inference_mode(model), x, state)

    # Training goes on under eqx.filter_jit: statistics move, SpectralNorm's as in the
    # original model (its power iteration sees the same weight and vectors).
    _, eqx_after, _ = _train_step(model, _data(11), clone(state))
    before = clone(new_state)
    trained, after, loss = _train_step(new_model, _data(11), new_state)
    assert np.isfinite(float(loss))
    for old_bn, bn in zip(converted, _batch_norms(trained, ebn.BatchNorm), strict=True):
        assert not np.allclose(after.get(bn.state_index).mean,
                               before.get(old_bn.state_index).mean)
    for a, b in zip(after.get(trained.spectral.uv_index),
                    eqx_after.get(model.spectral.uv_index), strict=True):
        _close(a, b)


def test_shared_layers_stay_shared(clone):
    """The same object in two places (state made with `eqx.nn.State`, which keeps the
    sharing), copies sharing one state entry (after a tree_map), and `eqx.nn.Shared`."""
    bn = eqx.nn.BatchNorm(C, "batch", mode="batch", momentum=0.7)
    model = {"a": bn, "b": [bn], "other": eqx.nn.BatchNorm(C, "batch", mode="batch")}
    state = eqx.nn.State(model)

    def call(model, x, state):
        x, state = model["a"](x, state)
        x, state = model["b"][0](x, state)
        return model["other"](x, state)

    for i in range(2):
        _, state = _per_example(lambda x, s: call(model, x, s))(_data(i), state)
    y_ref, _ = _per_example(lambda x, s: call(eqx.nn.inference_mode(model), x, s))(
        _data(5), clone(state))

    new_model, new_state = ebn.from_equinox_model(model, state)
    assert new_model["a"] is new_model["b"][0]
    assert new_model["a"] is not new_model["other"]
    assert _num_entries(new_state) == 2
    y, _ = _per_example(lambda x, s: call(eqx.nn.inference_mode(new_model), x, s))(
        _data(5), clone(new_state))
    _close(y, y_ref)

    # Copies of one layer: distinct objects, one state entry, kept shared.
    copied = jax.tree.map(lambda a: a, model)  # rebuilds every module
    assert copied["a"] is not copied["b"][0]
    new_copied, copied_state = ebn.from_equinox_model(copied, clone(state))
    assert new_copied["a"] is not new_copied["b"][0]
    assert new_copied["a"].state_index.marker == new_copied["b"][0].state_index.marker
    assert _num_entries(copied_state) == 2

    # eqx.nn.Shared: the tied layer appears once in the PyTree and is converted there.
    shared, shared_state = eqx.nn.make_with_state(eqx.nn.Shared)(
        (bn, bn), lambda p: p[1], lambda p: p[0])
    new_shared, new_shared_state = ebn.from_equinox_model(shared, shared_state)
    first, second = new_shared()
    assert isinstance(first, ebn.BatchNorm) and eqx.tree_equal(first, second)
    assert _num_entries(new_shared_state) == 1


def test_conversions_of_alike_models_are_compatible(clone):
    """Keys are those `make_with_state` wrote: a state converted from one copy of a model
    fits the model converted from another."""
    model_a, state_a = eqx.nn.make_with_state(Net)(jax.random.key(0), "batch")
    model_b, state_b = eqx.nn.make_with_state(Net)(jax.random.key(1), "batch")
    new_a, _ = ebn.from_equinox_model(model_a, state_a)
    _, new_state_b = ebn.from_equinox_model(model_b, state_b)
    for bn in _batch_norms(new_a, ebn.BatchNorm):
        assert isinstance(new_state_b.get(bn.state_index), ebn.BatchStats)
    # Equinox's usual whole-state check passes too: the same keys, shapes and dtypes.
    _forward(eqx.nn.inference_mode(new_a), _data(0), new_state_b)


def test_errors(clone):
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    with pytest.raises(ebn.BatchNormError, match=r"`model`.*at least one `eqx.nn.BatchNorm`"):
        ebn.from_equinox_model(mlp, eqx.nn.State(mlp))

    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0), "ema")
    new_model, new_state = ebn.from_equinox_model(model, clone(state))
    with pytest.raises(ebn.BatchNormError, match="already"):
        ebn.from_equinox_model(new_model, new_state)

    # A state that belongs to another model: the missing layer is named.
    other, other_state = eqx.nn.make_with_state(Block)(jax.random.key(0), "ema")
    with pytest.raises(ebn.BatchNormError,
                       match=r"`state`.*without the statistics.*model\.blocks\[0\]"):
        ebn.from_equinox_model(model, other_state)
    with pytest.raises(ebn.BatchNormError, match=r"`state`.*without the statistics"):
        ebn.from_equinox_model(model, eqx.nn.State(eqx.nn.BatchNorm(C, "batch", mode="ema")))

    with pytest.raises(ebn.BatchNormError, match=r"`state`.*eqx.nn.State.*got dict"):
        ebn.from_equinox_model(model, {})
    spent = clone(state)
    spent.set(model.plain[0].ema_state_index, spent.get(model.plain[0].ema_state_index))
    with pytest.raises(ebn.BatchNormError, match=r"`state`.*old state"):
        ebn.from_equinox_model(model, spent)

    # Two layers that share a state entry but could not share statistics.
    small = eqx.nn.BatchNorm(2, "batch", mode="batch")
    clash = eqx.nn.BatchNorm(C, "batch", mode="batch")
    clash = eqx.tree_at(lambda b: (b.batch_state_index, b.batch_counter), clash,
                        (small.batch_state_index, small.batch_counter))
    with pytest.raises(ebn.BatchNormError, match=r"`model`.*sharing a state entry.*model\[1\]"):
        ebn.from_equinox_model([small, clash], eqx.nn.State([small, clash]))
