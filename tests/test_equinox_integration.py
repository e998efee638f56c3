"""`ebn.BatchNorm` inside the Equinox toolbox: make_with_state, Sequential with Conv2d /
Linear / Lambda, inference_mode, filter_jit + filter_value_and_grad + optax, serialisation,
lax.scan, jax.checkpoint, and the call-time flags."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_batchnorm as ebn

KEY = jax.random.key(0)


def _stats(state, bn):
    s = state.get(bn.state_index)
    return np.asarray(s.mean), np.asarray(s.var)


def _batch(shape=(8, 4), seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 2 + 0.5


def test_make_with_state():
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)((3, 5), axis=(1, -1), momentum=0.9)
    assert isinstance(bn, eqx.nn.StatefulLayer)
    assert isinstance(bn.state_index, eqx.nn.StateIndex)
    assert bn.feature_shape == (3, 5) and bn.inference is False
    assert bn.scale.shape == bn.bias.shape == (3, 5) and bn.scale.dtype == jnp.float32
    running = state.get(bn.state_index)
    assert running.mean.dtype == running.var.dtype == jnp.float32
    np.testing.assert_array_equal(running.mean, np.zeros((3, 5)))
    np.testing.assert_array_equal(running.var, np.ones((3, 5)))
    # Parameters are the only inexact leaves of the module: what optimisers see.
    params = eqx.filter(bn, eqx.is_inexact_array)
    assert len(jax.tree.leaves(params)) == 2


def _cnn(key, inference=False):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential([
        eqx.nn.Conv2d(2, 4, kernel_size=3, padding=1, key=k1),
        ebn.BatchNorm(4, axis=0, axis_name="batch", momentum=0.9, inference=inference),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Lambda(lambda x: jnp.mean(x, axis=(1, 2))),
        eqx.nn.Linear(4, 3, key=k2),
    ])


def _per_example(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def test_sequential_with_conv_linear_lambda_matches_flax():
    model, state = eqx.nn.make_with_state(_cnn)(KEY)
    xs = _batch((6, 2, 5, 5))
    # Sequential hands `key=` to every layer: BatchNorm accepts and ignores it.
    ys, new_state = _per_example(lambda x, s: model(x, s, key=KEY))(xs, state)
    assert ys.shape == (6, 3)

    conv, bn, _, _, linear = model.layers
    h = jax.vmap(conv)(xs)  # (N, C, H, W): Flax normalises with axis=1 on the whole batch
    flax_bn = nn.BatchNorm(use_running_average=False, axis=1, momentum=0.9)
    h_ref, updates = flax_bn.apply(flax_bn.init(KEY, h), h, mutable=["batch_stats"])
    ys_ref = jax.vmap(linear)(jnp.mean(jax.nn.relu(h_ref), axis=(2, 3)))
    np.testing.assert_allclose(ys, ys_ref, rtol=2e-5, atol=1e-6)
    mean, var = _stats(new_state, bn)
    np.testing.assert_allclose(mean, updates["batch_stats"]["mean"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(var, updates["batch_stats"]["var"], rtol=2e-5)


def test_inference_mode_flips_the_field(clone):
    model, state = eqx.nn.make_with_state(_cnn)(KEY)
    xs = _batch((6, 2, 5, 5))
    _, state = _per_example(model)(xs, state)  # move the running statistics first
    frozen = eqx.nn.inference_mode(model)
    assert frozen.layers[1].inference is True and model.layers[1].inference is False
    assert eqx.nn.inference_mode(frozen, value=False).layers[1].inference is False

    before = _stats(state, model.layers[1])
    # In inference each example is normalised alone, with the running statistics: no
    # axis needed, and the same result one at a time as under vmap.
    ys, after_state = _per_example(frozen)(xs, clone(state))
    y0, _ = frozen(xs[0], clone(state))
    np.testing.assert_allclose(ys[0], y0, rtol=1e-6, atol=1e-7)
    for a, b in zip(before, _stats(after_state, model.layers[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... and it differs from normalising with the batch statistics.
    ys_train, _ = _per_example(model)(xs, clone(state))
    assert not np.allclose(ys, ys_train, atol=1e-3)


def test_training_step_with_filter_jit_and_optax():
    model, state = eqx.nn.make_with_state(_cnn)(KEY)
    kx, ky = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(kx, (16, 2, 5, 5)) + 1.0
    labels = jax.random.randint(ky, (16,), 0, 3)
    optimiser = optax.adam(5e-2)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, state, xs, labels):
        logits, state = _per_example(model)(xs, state)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, state

    @eqx.filter_jit
    def step(model, state, opt_state, xs, labels):
        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, state, xs, labels)
        updates, opt_state = optimiser.update(grads, opt_state,
                                              eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss, grads

    bn = model.layers[1]
    losses = []
    for _ in range(15):
        model, state, opt_state, loss, grads = step(model, state, opt_state, xs, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    # BatchNorm's parameters got gradients and moved; the running statistics moved.
    assert np.any(np.asarray(grads.layers[1].scale) != 0)
    assert not np.allclose(model.layers[1].scale, 1.0)
    mean, var = _stats(state, bn)
    assert np.all(np.isfinite(mean)) and not np.allclose(mean, 0.0)
    assert not np.allclose(var, 1.0)


def test_serialisation_round_trip_is_bit_exact(tmp_path, clone):
    # Half-precision parameters and running statistics too (no float32 forcing).
    make = lambda: eqx.nn.make_with_state(ebn.BatchNorm)(
        (3, 4), axis=(1, -1), param_dtype=jnp.bfloat16, force_float32_reductions=False,
        scale_init=jax.nn.initializers.normal(), key=KEY)
    bn, state = make()
    x = _batch((5, 3, 2, 4))
    y, state = bn(x, state)
    bn = eqx.nn.inference_mode(bn)  # the `inference` flag is a leaf and round-trips too
    path = tmp_path / "bn.eqx"
    eqx.tree_serialise_leaves(path, (bn, state))

    like_bn, like_state = eqx.nn.make_with_state(ebn.BatchNorm)(
        (3, 4), axis=(1, -1), param_dtype=jnp.bfloat16, force_float32_reductions=False)
    loaded_bn, loaded_state = eqx.tree_deserialise_leaves(path, (like_bn, like_state))
    assert loaded_bn.inference is True
    originals = jax.tree.leaves(eqx.filter((bn, state), eqx.is_array))
    loaded = jax.tree.leaves(eqx.filter((loaded_bn, loaded_state), eqx.is_array))
    assert len(originals) == len(loaded) == 4  # scale, bias, running mean and var
    for a, b in zip(originals, loaded, strict=True):
        assert a.dtype == b.dtype and a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    bn, loaded_bn = eqx.nn.inference_mode(bn, False), eqx.nn.inference_mode(loaded_bn, False)
    # The restored pair computes exactly what the original does.
    y1, s1 = bn(x, clone(state))
    y2, s2 = loaded_bn(x, loaded_state)
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y2, np.float32))
    for a, b in zip(_stats(s1, bn), _stats(s2, loaded_bn), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_scan_over_steps_threads_the_state(clone):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.9)
    batches = jax.random.normal(KEY, (5, 8, 4)) * 2 + 0.5

    def body(state, x):
        y, state = bn(x, state)
        return state, y

    final, ys = jax.jit(lambda s, b: jax.lax.scan(body, s, b))(clone(state), batches)

    # Closed form of five running-average updates, from the NumPy batch statistics.
    b64 = np.asarray(batches, np.float64)
    mean, var = np.zeros(4), np.ones(4)
    for x in b64:
        mean = 0.9 * mean + 0.1 * x.mean(0)
        var = 0.9 * var + 0.1 * x.var(0)
    got_mean, got_var = _stats(final, bn)
    np.testing.assert_allclose(got_mean, mean, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got_var, var, rtol=2e-5)
    # Each step normalised its own batch.
    expect = (b64 - b64.mean(1, keepdims=True)) / np.sqrt(b64.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ys, expect, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("remat", ["jax.checkpoint", "eqx.filter_checkpoint"])
def test_checkpoint_gives_the_same_numbers_and_updates_once(remat, clone):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.9)
    bn = eqx.tree_at(lambda m: m.bias, bn, jnp.linspace(-1.0, 1.0, 4))
    x = _batch()
    cotangent = jax.random.normal(jax.random.key(5), x.shape)
    params, static = eqx.partition(bn, eqx.is_array)

    def make_loss(wrap):
        call = lambda x, params, state: eqx.combine(params, static)(x, state)
        if wrap == "jax.checkpoint":
            # The module crosses jax.checkpoint as arrays + static rest (Equinox's
            # pattern: its `inference` flag must stay a Python bool, not be traced).
            call = jax.checkpoint(call)
        elif wrap == "eqx.filter_checkpoint":  # takes the module as it is
            call_bn = eqx.filter_checkpoint(lambda x, bn, state: bn(x, state))
            call = lambda x, params, state: call_bn(x, eqx.combine(params, static), state)

        def loss(diff, state):
            x, params = diff
            y, state = call(x, params, state)
            return jnp.sum(y * cotangent), (y, state)

        return loss

    def run(wrap, state):
        # Gradients w.r.t. x and the module's parameters (scale, bias).
        return eqx.filter_jit(eqx.filter_grad(make_loss(wrap), has_aux=True))((x, params), state)

    def remat_count(wrap):
        loss = make_loss(wrap)
        jaxpr = str(jax.make_jaxpr(lambda d, s: loss(d, s)[0])((x, params), clone(state)))
        return jaxpr.count("checkpoint") + jaxpr.count("remat")

    assert remat_count(remat) > remat_count(None)  # the recomputation is really there
    (gx, gbn), (y, s) = run(None, clone(state))
    (gx_r, gbn_r), (y_r, s_r) = run(remat, clone(state))
    np.testing.assert_allclose(y_r, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx_r, gx, rtol=1e-5, atol=1e-6)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(getattr(gbn_r, name), getattr(gbn, name), rtol=1e-5,
                                   atol=1e-6)
    assert np.any(np.asarray(gbn_r.scale) != 0)
    # One update (momentum 0.9 from zeros/ones), not two from the recomputation.
    mean, var = _stats(s_r, bn)
    np.testing.assert_allclose(mean, 0.1 * np.asarray(x).mean(0), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(var, 0.9 + 0.1 * np.asarray(x).var(0), rtol=2e-5)
    for a, b in zip(_stats(s_r, bn), _stats(s, bn), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("flag", ["inference", "use_running_average"])
def test_call_time_flag_overrides_the_field(flag, clone):
    x = _batch()
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.9)
    _, state = bn(x, state)  # non-trivial running statistics
    running_mean, running_var = _stats(state, bn)

    # Training layer, inference call: running statistics normalise, state unchanged.
    y, after = bn(x, clone(state), **{flag: True})
    np.testing.assert_allclose(y, (x - running_mean) / np.sqrt(running_var + 1e-5),
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(_stats(after, bn), (running_mean, running_var), strict=True):
        np.testing.assert_array_equal(a, b)

    # Inference layer, training call: batch statistics normalise and the state moves.
    frozen = eqx.nn.inference_mode(bn)
    y, after = frozen(x, clone(state), **{flag: False})
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(_stats(after, bn)[0], running_mean)

    # Both flags given and agreeing is fine; disagreeing is refused.
    bn(x, clone(state), inference=True, use_running_average=True)
    with pytest.raises(ebn.BatchNormError, match="`inference`.*pass only one of them"):
        bn(x, clone(state), inference=False, use_running_average=True)


def test_update_stats_false_leaves_the_state_untouched(clone):
    x = _batch()
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.9)
    _, state = bn(x, state)
    before = _stats(state, bn)
    y, after = bn(x * 3 + 1, clone(state), update_stats=False)
    for a, b in zip(_stats(after, bn), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # ... while still normalising with the batch statistics.
    x2 = np.asarray(x * 3 + 1, np.float64)
    np.testing.assert_allclose(y, (x2 - x2.mean(0)) / np.sqrt(x2.var(0) + 1e-5),
                               rtol=1e-5, atol=1e-5)
