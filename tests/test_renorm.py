"""Batch renormalisation against the formula of Ioffe (2017), outputs and gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn

EPS = 1e-3
C = 4
# Batch std per feature is about 1, 2, 3, 4 (see `_data`); these running statistics make
# r clip low, clip high, stay inside, and d clip in both directions and stay inside.
RUNNING_MEAN = np.array([0.5, -30.0, 40.0, 1.0], np.float32)
RUNNING_VAR = np.array([100.0, 0.01, 4.0, 9.0], np.float32)


def _data(shape=(6, 3, 3, C), seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)
    return x * jnp.arange(1.0, C + 1) + jnp.array([1.0, -2.0, 3.0, 0.5])


def paper(x, gamma, beta, mu, var, r_max, d_max, *, stop=True, eps=EPS, feature_axis=-1):
    """Algorithm 1 of Ioffe (2017), written out literally."""
    sg = jax.lax.stop_gradient if stop else (lambda a: a)
    red = tuple(a for a in range(x.ndim) if a != feature_axis % x.ndim)
    shape = [1] * x.ndim
    shape[feature_axis] = -1
    mu_b = x.mean(red, keepdims=True)
    sigma_b = jnp.sqrt(((x - mu_b) ** 2).mean(red, keepdims=True) + eps)
    sigma = jnp.sqrt(var.reshape(shape) + eps)
    r = sg(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = sg(jnp.clip((mu_b - mu.reshape(shape)) / sigma, -d_max, d_max))
    return gamma.reshape(shape) * ((x - mu_b) / sigma_b * r + d) + beta.reshape(shape)


def _layer(renorm=True, **kwargs):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, epsilon=EPS, momentum=0.8,
                                                      renorm=renorm, **kwargs)
    bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn,
                     (jnp.array([1.5, 0.5, -1.0, 2.0]), jnp.array([0.1, -0.2, 0.3, 0.0])))
    state = state.set(bn.state_index, ebn.BatchStats(jnp.asarray(RUNNING_MEAN),
                                                     jnp.asarray(RUNNING_VAR)))
    return bn, state


def _loss(f, cotangent):
    return lambda *args: jnp.sum(f(*args) * cotangent)


def test_output_gradients_and_update_follow_the_paper(clone):
    bn, state = _layer(renorm_r_max=3.0, renorm_d_max=5.0)
    x = _data()
    # The chosen statistics must exercise every clipping branch, or the test proves little.
    sd = jnp.sqrt(x.var((0, 1, 2)) + EPS) / jnp.sqrt(RUNNING_VAR + EPS)
    dd = (x.mean((0, 1, 2)) - RUNNING_MEAN) / jnp.sqrt(RUNNING_VAR + EPS)
    assert (sd < 1 / 3).any() and (sd > 3).any() and ((sd > 1 / 3) & (sd < 3)).any()
    assert (dd < -5).any() and (dd > 5).any() and (jnp.abs(dd) < 5).any()

    y, new_state = bn(x, clone(state))
    mu, var = jnp.asarray(RUNNING_MEAN), jnp.asarray(RUNNING_VAR)
    y_ref = paper(x, bn.scale, bn.bias, mu, var, 3.0, 5.0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    # The running statistics move exactly as without renorm.
    stats = new_state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, 0.8 * mu + 0.2 * x.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats.var, 0.8 * var + 0.2 * x.var((0, 1, 2)), rtol=1e-5)

    cot = jax.random.normal(jax.random.key(7), x.shape)

    def ours(x, scale, bias):
        layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
        return layer(x, clone(state))[0]

    def reference(stop):
        return lambda x, g, b: paper(x, g, b, mu, var, 3.0, 5.0, stop=stop)

    args = (x, bn.scale, bn.bias)
    # Jitted: one compilation each instead of many eager operations.
    grads = jax.jit(jax.grad(_loss(ours, cot), argnums=(0, 1, 2)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(reference(True), cot), argnums=(0, 1, 2)))(*args)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    # r and d must carry no gradient: with gradient through them the result differs.
    grad_x_through_rd = jax.jit(jax.grad(_loss(reference(False), cot)))(*args)
    assert not np.allclose(grads[0], grad_x_through_rd, rtol=1e-3, atol=1e-4)


def test_unclipped_bounds_reduce_to_plain_batch_norm(clone):
    """r_max = 1, d_max = 0 gives r = 1, d = 0: plain BatchNorm, outputs and gradients."""
    bn, state = _layer(renorm_r_max=1.0, renorm_d_max=0.0)
    plain, plain_state = _layer(renorm=False)
    x = _data(seed=1)
    cot = jax.random.normal(jax.random.key(3), x.shape)
    g = jax.jit(jax.grad(lambda x: jnp.sum(bn(x, clone(state))[0] * cot)))(x)
    g_plain = jax.jit(jax.grad(lambda x: jnp.sum(plain(x, clone(plain_state))[0] * cot)))(x)
    np.testing.assert_allclose(bn(x, clone(state))[0], plain(x, clone(plain_state))[0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, g_plain, rtol=1e-4, atol=1e-5)


def test_inference_is_identical_to_plain_batch_norm(clone):
    bn, state = _layer()
    plain, plain_state = _layer(renorm=False)
    x = _data(seed=2)
    y, s1 = bn(x, clone(state), inference=True)
    y_plain, _ = plain(x, plain_state, inference=True)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(s1.get(bn.state_index).var, RUNNING_VAR)


def test_per_call_bounds_are_traceable_schedules(clone):
    """Warm-up schedules pass r_max and d_max as traced values: one compilation."""
    bn, state = _layer()
    x = _data(seed=3)
    traces = []

    @jax.jit
    def step(x, state, r_max, d_max):
        traces.append(None)
        return bn(x, state, renorm_r_max=r_max, renorm_d_max=d_max)

    mu, var = jnp.asarray(RUNNING_MEAN), jnp.asarray(RUNNING_VAR)
    for r_max, d_max in ((1.0, 0.0), (1.5, 0.5), (3.0, 5.0)):
        y, _ = step(x, clone(state), jnp.float32(r_max), jnp.float32(d_max))
        np.testing.assert_allclose(y, paper(x, bn.scale, bn.bias, mu, var, r_max, d_max),
                                   rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    # A Python float per call overrides the construction-time bound too.
    y, _ = bn(x, clone(state), renorm_r_max=1.2, renorm_d_max=0.1)
    np.testing.assert_allclose(y, paper(x, bn.scale, bn.bias, mu, var, 1.2, 0.1),
                               rtol=1e-5, atol=1e-5)


def test_per_example_style_matches_batched(clone):
    bn, state = _layer(axis=0, axis_name="batch")
    x = _data(shape=(8, 2, 3, C), seed=4)
    xs = jnp.moveaxis(x, -1, 1)  # (batch, C, H, W): channels first per example
    ys, new_state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(xs, clone(state))
    ref = paper(x, bn.scale, bn.bias, jnp.asarray(RUNNING_MEAN), jnp.asarray(RUNNING_VAR),
                3.0, 5.0)
    np.testing.assert_allclose(ys, jnp.moveaxis(ref, -1, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.get(bn.state_index).mean,
                               0.8 * RUNNING_MEAN + 0.2 * x.mean((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"renorm_r_max": 0.5}, "renorm_r_max"),
    ({"renorm_d_max": -1.0}, "renorm_d_max"),
])
def test_invalid_bounds_are_refused(kwargs, name):
    with pytest.raises(ebn.BatchNormError, match=name):
        ebn.BatchNorm(C, renorm=True, **kwargs)


def test_invalid_per_call_bound_is_refused(clone):
    bn, state = _layer()
    with pytest.raises(ebn.BatchNormError, match="renorm_r_max"):
        bn(_data(), clone(state), renorm_r_max=0.5)


def test_per_call_bound_refused_without_renorm():
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3)
    x = jnp.ones((4, 3))
    with pytest.raises(ebn.BatchNormError, match=r"`renorm_r_max`.*renorm=True"):
        bn(x, state, renorm_r_max=2.0)
