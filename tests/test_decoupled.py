"""Decoupled statistics: which statistics normalise vs whether the running ones move."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn

C = 3
MOMENTUM = 0.7


def _setup():
    """A layer whose running statistics differ from the batch's, and the Flax twin."""
    x = jax.random.normal(jax.random.key(0), (10, 4, C)) * jnp.array([1.0, 3.0, 0.5]) + 2.0
    running = ebn.BatchStats(jnp.array([0.5, -1.0, 4.0]), jnp.array([2.0, 0.3, 1.5]))
    scale, bias = jnp.array([1.2, 0.7, -0.4]), jnp.array([0.3, 0.0, -1.0])
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, momentum=MOMENTUM)
    bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
    state = state.set(bn.state_index, running)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": running.mean, "var": running.var}}
    return x, bn, state, variables


def _flax(variables, x, use_running_average, mask=None):
    y, updates = nn.BatchNorm(momentum=MOMENTUM).apply(
        variables, x, use_running_average=use_running_average, mask=mask,
        mutable=["batch_stats"])
    return y, updates["batch_stats"]


def _assert_stats(state, bn, expected):
    stats = state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, expected["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.var, expected["var"], rtol=1e-6, atol=1e-6)


def test_batch_statistics_without_update(clone):
    """inference=False, update_stats=False: Flax's training output, state untouched
    (evaluating a model without running statistics, or EMA/SWA weights)."""
    x, bn, state, variables = _setup()
    y, new_state = bn(x, clone(state), inference=False, update_stats=False)
    y_ref, _ = _flax(variables, x, use_running_average=False)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    _assert_stats(new_state, bn, variables["batch_stats"])


def test_running_statistics_with_update(clone):
    """inference=True, update_stats=True: normalised with the running statistics as they
    were before this call, while those are updated exactly as a training step would."""
    x, bn, state, variables = _setup()
    y, new_state = bn(x, clone(state), inference=True, update_stats=True)
    y_ref, _ = _flax(variables, x, use_running_average=True)
    _, stats_ref = _flax(variables, x, use_running_average=False)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    _assert_stats(new_state, bn, stats_ref)
    # The same through the Flax alias, and through the module's field.
    y2, state2 = bn(x, clone(state), use_running_average=True, update_stats=True)
    y3, state3 = eqx.nn.inference_mode(bn)(x, clone(state), update_stats=True)
    for yy, st in ((y2, state2), (y3, state3)):
        np.testing.assert_array_equal(yy, y)
        _assert_stats(st, bn, stats_ref)


def test_defaults_are_the_coupled_modes(clone):
    x, bn, state, variables = _setup()
    for inference in (False, True):
        y_default, s_default = bn(x, clone(state), inference=inference)
        y_explicit, s_explicit = bn(x, clone(state), inference=inference,
                                    update_stats=not inference)
        np.testing.assert_array_equal(y_default, y_explicit)
        for a, b in zip(jax.tree.leaves(s_default), jax.tree.leaves(s_explicit), strict=True):
            np.testing.assert_array_equal(a, b)
    _, s_inference = bn(x, clone(state), inference=True, update_stats=False)
    _assert_stats(s_inference, bn, variables["batch_stats"])


def test_gradients_follow_the_normalising_statistics(clone):
    x, bn, state, _ = _setup()
    cot = jax.random.normal(jax.random.key(1), x.shape)

    def grad(**flags):
        return jax.jit(jax.grad(lambda x: jnp.sum(bn(x, clone(state), **flags)[0] * cot)))(x)

    # Batch statistics normalise: gradients flow through them, update or not.
    np.testing.assert_allclose(grad(inference=False, update_stats=False),
                               grad(inference=False), rtol=1e-5, atol=1e-6)
    # Running statistics normalise: the map is affine, the update adds no gradient.
    running = state.get(bn.state_index)
    affine = bn.scale * jax.lax.rsqrt(running.var + bn.epsilon)
    np.testing.assert_allclose(grad(inference=True, update_stats=True), cot * affine,
                               rtol=1e-5, atol=1e-6)


def test_decoupled_modes_per_example_under_jit_and_with_mask(clone):
    x, bn, state, variables = _setup()
    bn_pe, state_pe = eqx.nn.make_with_state(ebn.BatchNorm)(C, axis=-1, axis_name="batch",
                                                            momentum=MOMENTUM)
    bn_pe = eqx.tree_at(lambda b: (b.scale, b.bias), bn_pe, (bn.scale, bn.bias))
    state_pe = state_pe.set(bn_pe.state_index, state.get(bn.state_index))
    mask = jnp.arange(x.shape[0] * x.shape[1]).reshape(x.shape[:2] + (1,)) % 3 != 0

    @eqx.filter_jit
    def run(x, mask, state, inference, update_stats):
        return jax.vmap(lambda xi, mi, s: bn_pe(xi, s, mask=mi, inference=inference,
                                                update_stats=update_stats),
                        axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None)
                        )(x, mask, state)

    y, new_state = run(x, mask, clone(state_pe), True, True)
    y_ref, _ = _flax(variables, x, use_running_average=True)
    _, stats_ref = _flax(variables, x, use_running_average=False, mask=mask)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    _assert_stats(new_state, bn_pe, stats_ref)

    y, new_state = run(x, mask, clone(state_pe), False, False)
    y_ref, _ = _flax(variables, x, use_running_average=False, mask=mask)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    _assert_stats(new_state, bn_pe, variables["batch_stats"])


def test_update_stats_must_be_a_bool(clone):
    x, bn, state, _ = _setup()
    with pytest.raises(ebn.BatchNormError, match="update_stats"):
        bn(x, clone(state), update_stats="no")
