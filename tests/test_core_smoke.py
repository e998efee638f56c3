"""A first end-to-end check of the module against Flax (the grid lives in test_flax_parity)."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import eqx_batchnorm as ebn


def test_batched_training_step_matches_flax(clone):
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 4)) * 2 + 3
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.9)
    y, new_state = bn(x, clone(state))
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = flax_bn.init(jax.random.key(1), x)
    y_ref, updates = flax_bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    stats = new_state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, updates["batch_stats"]["mean"], rtol=2e-5)
    np.testing.assert_allclose(stats.var, updates["batch_stats"]["var"], rtol=2e-5)
    assert y.dtype == y_ref.dtype == jnp.float32
