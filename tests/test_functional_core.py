"""The public functional core, usable without the module: `ebn.batch_statistics`,
`ebn.normalize`, `ebn.update_running_average`. Small optax-style tests: jit-compatible,
finite, equal to a NumPy float64 reference, and the running-average formula and dtype."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import eqx_batchnorm as ebn


def _reference_statistics(x, axis, mask=None):
    """Mean and biased variance in float64 over every axis but `axis`, where `mask`."""
    x = np.asarray(x, np.float64)
    axes = axis if isinstance(axis, tuple) else (axis,)
    feature = {a % x.ndim for a in axes}
    red = tuple(a for a in range(x.ndim) if a not in feature)
    m = np.ones_like(x, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    n = m.sum(red)
    mean = np.where(m, x, 0).sum(red) / n
    var = (np.where(m, x - np.expand_dims(mean, red), 0) ** 2).sum(red) / n
    return mean, var


def _x(shape, seed=0, loc=0.5):
    return jax.random.normal(jax.random.key(seed), shape) * 2 + loc


CASES = [
    ((16, 5), -1, None),
    ((4, 3, 6), 1, None),
    ((3, 4, 5, 6), (1, -1), None),  # several feature axes
    ((6, 5), -1, "full"),
    ((3, 4, 5, 6), (1, -1), "full"),
    ((4, 3, 6), -1, "examples"),  # broadcast mask of shape (N, 1, 1)
]


def _mask(kind, shape):
    if kind is None:
        return None
    key = jax.random.key(7)
    if kind == "full":
        return jax.random.bernoulli(key, 0.6, shape).at[0].set(True)
    return jax.random.bernoulli(key, 0.6, (shape[0],) + (1,) * (len(shape) - 1)).at[0].set(True)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "two_pass"])
@pytest.mark.parametrize(("shape", "axis", "mask"), CASES,
                         ids=[f"{s}-axis{a}-mask_{m}" for s, a, m in CASES])
def test_batch_statistics_match_numpy_float64(shape, axis, mask, fast):
    x, m = _x(shape), _mask(mask, shape)
    fn = jax.jit(lambda x, m: ebn.batch_statistics(x, axis, mask=m, use_fast_variance=fast))
    stats = fn(x, m)
    mean, var = _reference_statistics(x, axis, m)
    assert stats.mean.shape == mean.shape and stats.mean.dtype == jnp.float32
    np.testing.assert_allclose(stats.mean, mean, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=2e-6)
    # Without groups, what the running statistics see is the same thing.
    np.testing.assert_array_equal(stats.axis_mean, stats.mean)
    np.testing.assert_array_equal(stats.axis_var, stats.var)


def test_batch_statistics_per_example_under_vmap_equal_batched():
    xs = _x((8, 3, 4, 4))
    batched = ebn.batch_statistics(xs, 1)
    per_example = jax.jit(jax.vmap(lambda x: ebn.batch_statistics(x, 0, axis_name="b"),
                                   axis_name="b", out_axes=None))(xs)
    for a, b in zip(per_example, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_batch_statistics_accurate_when_the_mean_dominates():
    # |mean| / std = 1e4: E[x^2] - E[x]^2 in float32 would lose every digit.
    x = _x((512, 3), loc=0.0) * 0.05 + 1000.0
    _, var = _reference_statistics(x, -1)
    for fast in (True, False):
        stats = ebn.batch_statistics(x, use_fast_variance=fast)
        np.testing.assert_allclose(stats.var, var, rtol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("force", [True, False])
def test_batch_statistics_dtype(dtype, force):
    x = _x((16, 4)).astype(dtype)
    stats = ebn.batch_statistics(x, force_float32_reductions=force)
    expect = jnp.float32 if force else dtype
    assert stats.mean.dtype == stats.var.dtype == expect
    mean, var = _reference_statistics(x, -1)  # of the half-precision values
    # Statistics computed in half precision: within a few units of its rounding.
    rtol = 2e-6 if force else 4 * float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(stats.mean, np.float64), mean, rtol=rtol,
                               atol=rtol)
    np.testing.assert_allclose(np.asarray(stats.var, np.float64), var, rtol=rtol)
    # `dtype` raises the precision of the statistics even without forcing.
    assert ebn.batch_statistics(x, dtype=jnp.float32,
                                force_float32_reductions=False).mean.dtype == jnp.float32


def test_batch_statistics_of_a_constant_batch_are_finite():
    x = jnp.full((8, 3), 7.0)
    for fast in (True, False):
        stats = ebn.batch_statistics(x, use_fast_variance=fast)
        np.testing.assert_allclose(stats.mean, 7.0)
        np.testing.assert_array_equal(stats.var, 0.0)  # exactly, never negative
        y = ebn.normalize(x, stats.mean, stats.var)
        assert np.all(np.isfinite(y)) and np.all(y == 0)


def test_batch_statistics_gradients_match_autodiff_of_the_formula():
    x = _x((6, 5, 3))
    m = _mask("full", x.shape)
    a, b = jnp.arange(1.0, 4.0), jnp.arange(3.0, 0.0, -1.0)

    def ours(x):
        s = ebn.batch_statistics(x, mask=m)
        return jnp.sum(a * s.mean + b * s.var)

    def plain(x):
        n = m.sum((0, 1))
        mean = jnp.where(m, x, 0).sum((0, 1)) / n
        var = jnp.where(m, (x - mean) ** 2, 0).sum((0, 1)) / n
        return jnp.sum(a * mean + b * var)

    grads = jax.jit(lambda x: (jax.grad(ours)(x), jax.grad(plain)(x)))(x)
    np.testing.assert_allclose(*grads, rtol=1e-5, atol=1e-6)
    tangent = _x(x.shape, seed=3)
    jvps = jax.jit(lambda x, t: (jax.jvp(ours, (x,), (t,))[1],
                                 jax.jvp(plain, (x,), (t,))[1]))(x, tangent)
    np.testing.assert_allclose(*jvps, rtol=1e-5)


@pytest.mark.parametrize("axis", [-1, (1, -1)], ids=["one", "several"])
def test_normalize_matches_numpy_float64(axis):
    x = _x((3, 4, 5, 6))
    fshape = (6,) if axis == -1 else (4, 6)
    mean = jax.random.normal(jax.random.key(1), fshape)
    var = jax.random.uniform(jax.random.key(2), fshape, minval=0.5, maxval=2.0)
    scale = jax.random.normal(jax.random.key(3), fshape)
    bias = jax.random.normal(jax.random.key(4), fshape)
    y = jax.jit(lambda *a: ebn.normalize(*a, axis=axis, epsilon=1e-3))(
        x, mean, var, scale, bias)
    bshape = (1, 1, 1, 6) if axis == -1 else (1, 4, 1, 6)
    f64 = lambda v: np.asarray(v, np.float64).reshape(bshape)
    expect = ((np.asarray(x, np.float64) - f64(mean)) / np.sqrt(f64(var) + 1e-3) * f64(scale)
              + f64(bias))
    np.testing.assert_allclose(y, expect, rtol=2e-6, atol=2e-6)
    assert y.dtype == jnp.float32


def test_normalize_output_dtype_follows_flax():
    x = _x((8, 4)).astype(jnp.bfloat16)
    mean, var = jnp.zeros(4), jnp.ones(4)
    # The result type of x, scale and bias (not of the float32 statistics) ...
    assert ebn.normalize(x, mean, var).dtype == jnp.bfloat16
    assert ebn.normalize(x, mean, var, jnp.ones(4)).dtype == jnp.float32
    assert ebn.normalize(x, mean, var, jnp.ones(4, jnp.bfloat16)).dtype == jnp.bfloat16
    # ... unless `dtype` says otherwise.
    assert ebn.normalize(x, mean, var, jnp.ones(4), dtype=jnp.float16).dtype == jnp.float16


def test_batch_statistics_then_normalize_give_zero_mean_unit_variance():
    x = _x((64, 3))
    stats = ebn.batch_statistics(x)
    y = ebn.normalize(x, stats.mean, stats.var, epsilon=0.0)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.99, 1.0])
def test_update_running_average_formula(momentum):
    running, batch = jnp.array([0.0, 1.0, -2.0]), jnp.array([4.0, 1.0, 2.0])
    new = jax.jit(ebn.update_running_average)(running, batch, momentum)
    expect = momentum * np.asarray(running, np.float64) + (1 - momentum) * np.asarray(batch)
    np.testing.assert_allclose(new, expect, rtol=1e-6)


def test_update_running_average_keeps_the_running_dtype_and_blocks_gradients():
    running = jnp.ones(3, jnp.bfloat16)
    new = ebn.update_running_average(running, jnp.full(3, 3.0, jnp.float32), 0.5)
    assert new.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new, np.float32), 2.0)
    # No gradient flows into the running statistics through the batch statistic.
    grad = jax.grad(lambda b: ebn.update_running_average(jnp.zeros(3), b, 0.9).sum())
    np.testing.assert_array_equal(grad(jnp.ones(3)), 0.0)
    # A traced momentum (e.g. a schedule) works.
    traced = jax.jit(ebn.update_running_average)(jnp.zeros(3), jnp.ones(3), jnp.float32(0.25))
    np.testing.assert_allclose(traced, 0.75)


def test_functional_core_composes_into_a_flax_batch_norm_step():
    # What the module does, written with the three public functions.
    x = _x((16, 4))
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.9)
    y_module, state = bn(x, state)
    stats = ebn.batch_statistics(x)
    y = ebn.normalize(x, stats.mean, stats.var, bn.scale, bn.bias, epsilon=bn.epsilon)
    np.testing.assert_allclose(y, y_module, rtol=1e-6, atol=1e-6)
    running = state.get(bn.state_index)
    np.testing.assert_allclose(running.mean, ebn.update_running_average(
        jnp.zeros(4), stats.axis_mean, 0.9), rtol=1e-6)
    np.testing.assert_allclose(running.var, ebn.update_running_average(
        jnp.ones(4), stats.axis_var, 0.9), rtol=1e-6)


@st.composite
def _shapes_and_axes(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    n_features = draw(st.integers(1, ndim - 1))
    axes = draw(st.lists(st.integers(-ndim, ndim - 1), min_size=n_features,
                         max_size=n_features, unique_by=lambda a: a % ndim))
    # Flax's axis convention: the same sign for every axis (mixed signs must be ordered).
    if len(axes) > 1 and len({a < 0 for a in axes}) > 1:
        axes = [a % ndim for a in axes]
    return shape, tuple(axes) if len(axes) > 1 else axes[0]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(_shapes_and_axes(), st.booleans())
def test_batch_statistics_random_shapes_and_axes(shape_axis, fast):
    shape, axis = shape_axis
    x = _x(shape, seed=len(shape))
    stats = jax.jit(lambda x: ebn.batch_statistics(x, axis, use_fast_variance=fast))(x)
    mean, var = _reference_statistics(x, axis)
    np.testing.assert_allclose(stats.mean, mean, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(stats.var, var, rtol=2e-5, atol=2e-6)
