"""Properties of BatchNorm over generated shapes, feature axes, dtypes and masks.

- training with scale 1, bias 0 and a small epsilon normalises every feature;
- permuting the batch permutes the output and leaves the statistics alone;
- x -> a * x + b (a > 0) leaves the output alone;
- the batched style, the per-example `vmap` style and the batch split over virtual
  devices with `shard_map` give the same numbers;
- after k steps the running statistics are the closed-form exponential moving average.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import eqx_batchnorm as ebn

make = eqx.nn.make_with_state(ebn.BatchNorm)
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def copy(state):
    return jax.tree_util.tree_map(lambda a: a, state)


@st.composite
def layouts(draw, max_rank=4):
    """A shape, its feature axes as the user writes them (int or tuple, either sign), and
    the canonical (non-negative, ascending) feature axes."""
    rank = draw(st.integers(2, max_rank))
    n_features = draw(st.integers(1, min(2, rank - 1)))
    canon = tuple(sorted(draw(st.lists(st.integers(0, rank - 1), min_size=n_features,
                                       max_size=n_features, unique=True))))
    reduced = [a for a in range(rank) if a not in canon]
    # Few distinct sizes, so that compiled calls are reused across examples; the first
    # reduced axis holds at least 3 elements, so there is something to normalise.
    sizes = {a: draw(st.sampled_from([1, 2, 3])) for a in range(rank)}
    sizes[reduced[0]] = draw(st.sampled_from([3, 4]))
    shape = tuple(sizes[a] for a in range(rank))
    negative = draw(st.booleans())
    written = tuple(a - rank if negative else a for a in canon)
    axis = written[0] if len(written) == 1 else written
    return shape, axis, canon


def _data(seed, shape, dtype, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * scale + shift
    return jnp.asarray(x, dtype)


def _mask(seed, shape, draw_mask):
    if not draw_mask:
        return None
    rng = np.random.default_rng(seed + 1)
    return jnp.asarray(rng.random(shape) < 0.7)


def _masked_moments(y, mask, canon):
    y = np.asarray(y, np.float64)
    w = np.ones(y.shape) if mask is None else np.broadcast_to(np.asarray(mask), y.shape)
    red = tuple(a for a in range(y.ndim) if a not in canon)
    n = w.sum(red)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty features: `assume`d away
        mean = (y * w).sum(red) / n
        var = (np.square(y - np.expand_dims(mean, red)) * w).sum(red) / n
    return mean, var, n


def _features(shape, canon):
    return tuple(shape[a] for a in canon)


@eqx.filter_jit
def _call(bn, x, state, mask):
    return bn(x, state, mask=mask)


@settings(max_examples=20, **SETTINGS)
@given(layout=layouts(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
       use_mask=st.booleans(), fast=st.booleans())
def test_training_output_has_zero_mean_and_unit_variance(layout, seed, dtype, use_mask,
                                                          fast):
    shape, axis, canon = layout
    x = _data(seed, shape, dtype, scale=3.0, shift=-2.0)
    mask = _mask(seed, shape, use_mask)
    _, x_var, count = _masked_moments(x, mask, canon)
    assume(count.min() >= 2 and x_var.min() > 1e-2)
    bn, state = make(_features(shape, canon), axis=axis, epsilon=1e-9,
                     use_fast_variance=fast)
    y, _ = _call(bn, x, state, mask)
    assert y.shape == x.shape and y.dtype == jnp.float32  # float32 params promote
    mean, var, _ = _masked_moments(y, mask, canon)
    np.testing.assert_allclose(mean, 0, atol=2e-5)
    np.testing.assert_allclose(var, 1, rtol=2e-4)


@settings(max_examples=15, **SETTINGS)
@given(layout=layouts(), seed=st.integers(0, 2**16), use_mask=st.booleans(),
       data=st.data())
def test_permuting_the_batch_permutes_the_output(layout, seed, use_mask, data):
    shape, axis, canon = layout
    reduced = [a for a in range(len(shape)) if a not in canon]
    along = data.draw(st.sampled_from(reduced))
    perm = np.asarray(data.draw(st.permutations(range(shape[along]))))
    x = _data(seed, shape, jnp.float32, scale=2.0, shift=5.0)
    mask = _mask(seed, shape, use_mask)
    _, _, count = _masked_moments(x, mask, canon)
    assume(count.min() >= 1)
    bn, state = make(_features(shape, canon), axis=axis, momentum=0.5)
    y, s1 = _call(bn, x, copy(state), mask)
    y_p, s2 = _call(bn, jnp.take(x, perm, along), copy(state),
                    None if mask is None else jnp.take(mask, perm, along))
    np.testing.assert_allclose(y_p, np.take(np.asarray(y), perm, along), rtol=1e-5,
                               atol=1e-5)
    for field in ("mean", "var"):
        np.testing.assert_allclose(getattr(s1.get(bn.state_index), field),
                                   getattr(s2.get(bn.state_index), field),
                                   rtol=1e-5, atol=1e-6)


@settings(max_examples=15, **SETTINGS)
@given(layout=layouts(), seed=st.integers(0, 2**16), a=st.floats(0.25, 8.0),
       b=st.floats(-50.0, 50.0), use_mask=st.booleans())
def test_output_is_invariant_to_positive_affine_maps(layout, seed, a, b, use_mask):
    shape, axis, canon = layout
    x = np.asarray(_data(seed, shape, jnp.float32), np.float64)
    mask = _mask(seed, shape, use_mask)
    _, x_var, count = _masked_moments(x, mask, canon)
    assume(count.min() >= 2 and x_var.min() > 0.05)
    bn, state = make(_features(shape, canon), axis=axis, epsilon=0.0)
    y, _ = _call(bn, jnp.asarray(x, jnp.float32), copy(state), mask)
    y_ab, _ = _call(bn, jnp.asarray(a * x + b, jnp.float32), copy(state), mask)
    np.testing.assert_allclose(y_ab, y, atol=1e-3, rtol=1e-3)


# The three styles of one normalisation, jitted once per configuration and shape.

@functools.cache
def _layers(channels, groups):
    names = dict(batch="batch", devices="devices")
    return {style: make(channels, axis=0 if style == "batch" else 1,
                        axis_name=None if style == "batched" else names[style],
                        axis_index_groups=groups if style != "batched" else None,
                        momentum=0.5)
            for style in ("batched", "batch", "devices")}


@eqx.filter_jit
def _per_example(bn, x, state, mask):
    return jax.vmap(lambda xi, mi: bn(xi, state, mask=mi), axis_name="batch",
                    out_axes=(0, None))(x, mask)


@functools.cache
def _sharded(channels, groups, n_devices, masked):
    bn, _ = _layers(channels, groups)["devices"]
    mesh = Mesh(np.asarray(jax.devices()[:n_devices]), ("devices",))
    static = eqx.partition(bn, eqx.is_array)[1]

    def local(dynamic, x, state, *mask):
        return eqx.combine(dynamic, static)(x, state, mask=mask[0] if mask else None)

    specs = (P(), P("devices"), P()) + ((P("devices"),) if masked else ())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs,
                                 out_specs=(P("devices"), P())))


def _over_devices(channels, groups, x, state, mask, n_devices):
    bn, _ = _layers(channels, groups)["devices"]
    dynamic = eqx.partition(bn, eqx.is_array)[0]
    fn = _sharded(channels, groups, n_devices, mask is not None)
    return fn(dynamic, x, state, *(() if mask is None else (mask,)))


@settings(max_examples=6, **SETTINGS)
@given(batch=st.sampled_from([8, 16]), channels=st.sampled_from([1, 3]),
       spatial=st.sampled_from([(), (3, 2)]), seed=st.integers(0, 2**16),
       use_mask=st.booleans(), grouped=st.booleans(), n_devices=st.sampled_from([2, 4, 8]))
def test_batched_equals_per_example_equals_sharded(batch, channels, spatial, seed,
                                                   use_mask, grouped, n_devices):
    shape = (batch, channels, *spatial)
    x = _data(seed, shape, jnp.float32, scale=2.0, shift=1.0)
    mask = None
    if use_mask:  # every example keeps its first element of each channel: no empty group
        m = np.random.default_rng(seed).random(shape) < 0.6
        m.reshape(batch, channels, -1)[:, :, 0] = True
        mask = jnp.asarray(m)
    layers = _layers(channels, None)
    y_b, s_b = _call(layers["batched"][0], x, copy(layers["batched"][1]), mask)
    bn_e, st_e = layers["batch"]
    y_e, s_e = _per_example(bn_e, x, copy(st_e), mask)
    bn_d, st_d = layers["devices"]
    y_d, s_d = _over_devices(channels, None, x, copy(st_d), mask, n_devices)
    for y in (y_e, y_d):
        np.testing.assert_allclose(y, y_b, rtol=2e-5, atol=2e-5)
    ref = s_b.get(layers["batched"][0].state_index)
    for s, bn in ((s_e, bn_e), (s_d, bn_d)):
        np.testing.assert_allclose(s.get(bn.state_index).mean, ref.mean, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(s.get(bn.state_index).var, ref.var, rtol=1e-5)
    if grouped:
        # Ghost batch norm: groups of examples under vmap == groups of devices under
        # shard_map == each chunk normalised on its own, when chunks line up.
        n_groups = 2
        per = batch // n_groups
        groups = [list(range(g * per, (g + 1) * per)) for g in range(n_groups)]
        dev_groups = [list(range(g * n_devices // n_groups, (g + 1) * n_devices // n_groups))
                      for g in range(n_groups)]
        groups, dev_groups = tuple(map(tuple, groups)), tuple(map(tuple, dev_groups))
        bn_ge, st_ge = _layers(channels, groups)["batch"]
        st_gd = _layers(channels, dev_groups)["devices"][1]
        y_ge, _ = _per_example(bn_ge, x, copy(st_ge), mask)
        y_gd, _ = _over_devices(channels, dev_groups, x, copy(st_gd), mask, n_devices)
        for g in range(n_groups):
            chunk = slice(g * per, (g + 1) * per)
            y_chunk, _ = _call(layers["batched"][0], x[chunk],
                                  copy(layers["batched"][1]),
                                  None if mask is None else mask[chunk])
            np.testing.assert_allclose(y_ge[chunk], y_chunk, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(y_gd[chunk], y_chunk, rtol=2e-5, atol=2e-5)


@functools.cache
def _stepper(features, momentum, fast):
    bn, state = make(features, momentum=momentum, use_fast_variance=fast)

    @jax.jit
    def steps(xs, masks, state):
        def body(state, xm):
            _, state = bn(xm[0], state, mask=xm[1])
            stats = state.get(bn.state_index)
            return state, (stats.mean, stats.var)
        return jax.lax.scan(body, state, (xs, masks))[1]

    return steps, state


@settings(max_examples=15, **SETTINGS)
@given(k=st.integers(1, 8), batch=st.sampled_from([2, 5]), features=st.integers(1, 3),
       momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]) | st.floats(0.0, 1.0),
       fast=st.booleans(), seed=st.integers(0, 2**16))
def test_running_statistics_are_the_closed_form_ema(k, batch, features, momentum, fast,
                                                    seed):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(k, batch, features)) * rng.uniform(0.5, 3, features) + \
        rng.uniform(-5, 5, features)
    masks = rng.random(size=xs.shape) < 0.8
    masks[:, 0] = True
    steps, state = _stepper(features, momentum, fast)
    means, variances = steps(jnp.asarray(xs, jnp.float32), jnp.asarray(masks), copy(state))
    xs32 = np.asarray(jnp.asarray(xs, jnp.float32), np.float64)
    n = masks.sum(1)
    batch_mean = (xs32 * masks).sum(1) / n
    batch_var = (np.square(xs32 - batch_mean[:, None]) * masks).sum(1) / n
    # r_k = m^k r_0 + (1 - m) sum_i m^(k - i) s_i
    powers = momentum ** np.arange(k - 1, -1, -1)[:, None]
    expected_mean = (1 - momentum) * (powers * batch_mean).sum(0)
    expected_var = momentum ** k + (1 - momentum) * (powers * batch_var).sum(0)
    np.testing.assert_allclose(means[-1], expected_mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(variances[-1], expected_var, rtol=2e-5, atol=2e-6)
