"""NumPy arrays are accepted wherever JAX arrays are, in and out of `jit`, with the same
numbers: `x`, `mask`, the parameters (`jax.device_get(bn)`) and the state's leaves
(`jax.device_get(state)`, a checkpoint loaded as NumPy)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn

X = (np.random.default_rng(0).standard_normal((16, 3)) * 2 + 1).astype(np.float32)
MASK = np.arange(16)[:, None] % 4 != 0


def trained():
    """A layer and a state one training step in, with non-trivial parameters."""
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3, momentum=0.5)
    bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn,
                     (jnp.asarray([0.5, 2.0, -1.0]), jnp.asarray([0.1, 0.2, 0.3])))
    _, state = bn(jnp.asarray(X) + 3.0, state)
    return bn, state


def copy(state):
    return jax.tree_util.tree_map(lambda a: a, state)


def stats(state, bn):
    s = state.get(bn.state_index)
    return np.asarray(s.mean), np.asarray(s.var)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
@pytest.mark.parametrize("inference", [False, True], ids=["training", "inference"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_numpy_x_mask_parameters_and_state_give_the_same_numbers(jit, inference, masked):
    bn, state = trained()
    mask = MASK if masked else None
    call = eqx.filter_jit(bn.__call__) if jit else bn

    want_y, want_state = call(jnp.asarray(X), copy(state), inference=inference,
                              mask=None if mask is None else jnp.asarray(mask))

    np_bn, np_state = jax.device_get((bn, state))
    assert isinstance(np_bn.scale, np.ndarray)
    assert isinstance(np_state.get(bn.state_index).mean, np.ndarray)
    np_call = eqx.filter_jit(np_bn.__call__) if jit else np_bn
    y, new_state = np_call(X, np_state, inference=inference, mask=mask)

    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    for got, want in zip(stats(new_state, bn), stats(want_state, bn), strict=True):
        np.testing.assert_array_equal(got, want)


def test_numpy_in_the_functional_core():
    x, mask = jnp.asarray(X), jnp.asarray(MASK)
    want = ebn.batch_statistics(x, mask=mask)
    got = ebn.batch_statistics(X, mask=MASK)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    m, v = np.asarray(want.mean), np.asarray(want.var)
    scale, bias = np.asarray([0.5, 2.0, -1.0], np.float32), np.zeros(3, np.float32)
    np.testing.assert_array_equal(
        np.asarray(ebn.normalize(X, m, v, scale, bias)),
        np.asarray(ebn.normalize(x, jnp.asarray(m), jnp.asarray(v), jnp.asarray(scale),
                                 jnp.asarray(bias))))

    running = np.zeros(3, np.float32)
    np.testing.assert_array_equal(
        np.asarray(ebn.update_running_average(running, m, 0.9)),
        np.asarray(ebn.update_running_average(jnp.asarray(running), jnp.asarray(m), 0.9)))


def test_numpy_under_jit_in_the_functional_core():
    stats_of = jax.jit(lambda x: ebn.batch_statistics(x).var)
    np.testing.assert_array_equal(np.asarray(stats_of(X)),
                                  np.asarray(ebn.batch_statistics(X).var))


def test_numpy_checkpoint_round_trip(tmp_path):
    bn, state = trained()
    path = tmp_path / "bn.eqx"
    eqx.tree_serialise_leaves(path, (bn, state))
    like = jax.device_get(eqx.nn.make_with_state(ebn.BatchNorm)(3, momentum=0.5))
    np_bn, np_state = eqx.tree_deserialise_leaves(path, like)
    y, _ = np_bn(X, np_state, inference=True)
    want, _ = bn(jnp.asarray(X), state, inference=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
