"""The optimised paths against plain formulas: numbers, never timings.

Two implementations run on this CPU, through the fixture `strategy`:

- "cpu" (what XLA:CPU traces): plain one-pass sums checked for cancellation, with a
  shifted second pass under `lax.cond` where the mean dwarfs the spread; backward
  reduction `sum(ct * x) - mean * sum(ct)`;
- "accelerator" (what GPUs and TPUs trace): one pass shifted by a sample, participants
  combined with Chan's formula; backward reduction `sum(ct * (x - mean))`.

Checked: gradients against a float64 NumPy reference and against JAX autodiff of the
plain `jnp` formula (batched, NCHW, masked, per example under `vmap`, groups, and against
Flax under `pmap` with groups); forward mode (`jax.jvp`, `jax.jacfwd`), `jax.hessian`
and grad of grad; the accurate variance on offset data (|mean|/std up to 1e4), batched
and across `vmap`, `pmap` and `shard_map` participants; that reverse mode keeps no
float32 copy of a bfloat16 input.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eqx_batchnorm as ebn
import eqx_batchnorm._backend as backend

EPS = 1e-5
C = 3
SCALE = np.array([0.5, 1.5, -2.0], np.float32)
BIAS = np.array([0.1, -0.2, 0.3], np.float32)
TOL = 2e-5  # the Flax-parity tolerance, relative to the largest magnitude


@pytest.fixture(params=["cpu", "accelerator"])
def strategy(request, monkeypatch):
    """Force the kernels of one kind of backend, whatever the backend."""
    monkeypatch.setattr(backend, "platform", lambda: request.param)
    return request.param


def data(shape, seed=0, offset=0.5, spread=1.5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread + offset).astype(np.float32)


SCALE_J, BIAS_J = jnp.asarray(SCALE), jnp.asarray(BIAS)


def close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------
# References: float64 NumPy, features last


def flat_mask(mask, shape):
    """The mask broadcast to a features-last `shape`, as (positions, features) floats."""
    ones = np.ones(shape) if mask is None else np.broadcast_to(mask, shape)
    return ones.reshape(-1, shape[-1]).astype(np.float64)


def ref_forward(x, scale, bias, mask=None):
    """y, mean, var of BatchNorm on a features-last x, in float64."""
    m = flat_mask(mask, x.shape)
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    n = m.sum(0)
    mean = (m * x).sum(0) / n
    var = (m * (x - mean) ** 2).sum(0) / n
    y = (x - mean) / np.sqrt(var + EPS) * scale + bias
    return y, mean, var


def ref_vjp(x, scale, bias, g, mask=None):
    """d(sum(g * y))/d(x, scale, bias) on a features-last x, in float64."""
    shape = x.shape
    m = flat_mask(mask, shape)
    x = np.asarray(x, np.float64).reshape(-1, shape[-1])
    g = np.asarray(g, np.float64).reshape(x.shape)
    n = m.sum(0)
    mean = (m * x).sum(0) / n
    var = (m * (x - mean) ** 2).sum(0) / n
    inv = 1 / np.sqrt(var + EPS)
    a = scale * inv
    d_mean = -(g * a).sum(0)
    d_var = (g * (x - mean)).sum(0) * scale * (-0.5) * inv**3
    dx = g * a + m * (d_mean / n + 2 * (x - mean) * d_var / n)
    return dx.reshape(shape), (g * (x - mean) * inv).sum(0), g.sum(0)


def plain(x, scale, bias, axis=-1):
    """BatchNorm with jnp.mean/jnp.var, differentiated by JAX: the plain formula."""
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = tuple(C if a == axis % x.ndim else 1 for a in range(x.ndim))
    mean = jnp.mean(x, red)
    var = jnp.var(x, red)
    return (x - mean.reshape(shape)) * (scale * jax.lax.rsqrt(var + EPS)).reshape(shape) + \
        bias.reshape(shape)


def module(axis=-1, **kwargs):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, axis=axis, epsilon=EPS, **kwargs)
    return bn, state


def with_params(bn, scale, bias):
    return eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))


# ---------------------------------------------------------------------------------------
# Reverse mode


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_gradients_match_float64_and_plain_autodiff(strategy, layout, masked):
    x = data((16, 4, 4, C), seed=1)
    g = data((16, 4, 4, C), seed=2, offset=0.0, spread=1.0)
    mask = (np.random.default_rng(3).random((16, 4, 4, 1)) < 0.7) if masked else None
    dx_ref, ds_ref, db_ref = ref_vjp(x, SCALE, BIAS, g, mask)
    to = (lambda a: a) if layout == "NHWC" else (lambda a: np.moveaxis(a, -1, 1))
    axis = -1 if layout == "NHWC" else 1
    bn, state = module(axis=axis)

    @jax.jit
    def vjp(x, s, b, g, mask):
        def f(x, s, b):
            return with_params(bn, s, b)(x, state, mask=mask)[0]
        return jax.vjp(f, x, s, b)[1](g)

    dx, ds, db = vjp(to(x), SCALE, BIAS, to(g), None if mask is None else to(mask))
    close(dx, to(dx_ref))
    close(ds, ds_ref)
    close(db, db_ref)
    if not masked:  # and JAX's autodiff of the plain jnp formula, in float32
        want = jax.vjp(lambda x, s, b: plain(x, s, b, axis), to(x), SCALE, BIAS)[1](to(g))
        for got, w in zip((dx, ds, db), want, strict=True):
            close(got, w)


def test_per_example_vmap_gradients_match_flax_batched(strategy):
    x = data((16, C, 4, 4), seed=4)  # per example (C, H, W): Equinox's convention
    g = data((16, C, 4, 4), seed=5, offset=0.0, spread=1.0)
    mask = np.random.default_rng(6).random((16, 1, 4, 4)) < 0.8
    bn, state = module(axis=0, axis_name="batch")

    @jax.jit
    def ours(x, s, b, g):
        def f(x, s, b):
            model = with_params(bn, s, b)
            return jax.vmap(lambda e, m: model(e, state, mask=m)[0], axis_name="batch")(
                x, mask)
        return jax.vjp(f, x, s, b)[1](g)

    flax_bn = nn.BatchNorm(use_running_average=False, axis=1, epsilon=EPS)
    variables = flax_bn.init(jax.random.key(0), x)

    def theirs(x, s, b):
        v = {"params": {"scale": s, "bias": b}, "batch_stats": variables["batch_stats"]}
        return flax_bn.apply(v, x, mask=mask, mutable=["batch_stats"])[0]

    want = jax.vjp(theirs, x, SCALE, BIAS)[1](g)
    for got, w in zip(ours(x, SCALE, BIAS, g), want, strict=True):
        close(got, w)


def test_ghost_batch_gradients_match_float64_per_group(strategy):
    groups = ((0, 2, 4, 6), (1, 3, 5, 7))
    x = data((8, 5, C), seed=7)  # 8 examples of 5 positions, features last
    g = data((8, 5, C), seed=8, offset=0.0, spread=1.0)
    bn, state = module(axis_name="b", axis_index_groups=groups)

    @jax.jit
    def ours(x, s, b, g):
        def f(x, s, b):
            model = with_params(bn, s, b)
            return jax.vmap(lambda e: model(e, state)[0], axis_name="b")(x)
        return jax.vjp(f, x, s, b)[1](g)

    dx, ds, db = map(np.asarray, ours(x, SCALE, BIAS, g))
    ds_want, db_want = np.zeros(C), np.zeros(C)
    for members in groups:
        idx = np.asarray(members)
        dx_ref, ds_ref, db_ref = ref_vjp(x[idx], SCALE, BIAS, g[idx])
        close(dx[idx], dx_ref)
        ds_want, db_want = ds_want + ds_ref, db_want + db_ref
    close(ds, ds_want)
    close(db, db_want)


def test_pmap_groups_gradients_match_flax(strategy):
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    x = data((8, 6, C), seed=9)
    g = data((8, 6, C), seed=10, offset=0.0, spread=1.0)
    bn, state = module(axis_name="d", axis_index_groups=groups)
    flax_bn = nn.BatchNorm(use_running_average=False, axis_name="d",
                           axis_index_groups=groups, epsilon=EPS)
    variables = flax_bn.init(jax.random.key(0), x[0])

    def ours(x, g, state):
        f = lambda x: with_params(bn, SCALE_J, BIAS_J)(x, state)[0]
        return jax.vjp(f, x)[1](g)[0]

    def theirs(x, g):
        v = {"params": {"scale": SCALE_J, "bias": BIAS_J},
             "batch_stats": variables["batch_stats"]}
        f = lambda x: flax_bn.apply(v, x, mutable=["batch_stats"])[0]
        return jax.vjp(f, x)[1](g)[0]

    got = jax.pmap(ours, axis_name="d", in_axes=(0, 0, None))(x, g, state)
    want = jax.pmap(theirs, axis_name="d")(x, g)
    close(got, want)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_normalize_gradients_in_every_argument(strategy, affine):
    # Statistics that do not come from x: the JVP of normalize on its own, including
    # the tangents of mean and var, and absent scale and bias (symbolic zeros).
    x = jnp.asarray(data((10, C), seed=11, offset=3.0))
    mean = jnp.asarray([2.5, 3.5, 3.0])
    var = jnp.asarray([1.5, 0.7, 2.0])
    g = data((10, C), seed=12, offset=0.0, spread=1.0)
    scale, bias = (SCALE_J, BIAS_J) if affine else (None, None)

    def ours(x, mean, var):
        return ebn.normalize(x, mean, var, scale, bias, epsilon=EPS)

    def ref(x, mean, var):
        y = (x - mean) * (jax.lax.rsqrt(var + EPS) * (1.0 if scale is None else scale))
        return y if bias is None else y + bias

    got = jax.vjp(ours, x, mean, var)[1](g)
    want = jax.vjp(ref, x, mean, var)[1](g)
    for a, b in zip(got, want, strict=True):
        close(a, b)
    for argnum in (1, 2):
        close(jax.jacfwd(ours, argnum)(x, mean, var), jax.jacfwd(ref, argnum)(x, mean, var))


def test_inference_gradients_match_plain_formula(strategy):
    x = data((12, C), seed=13)
    g = data((12, C), seed=14, offset=0.0, spread=1.0)
    bn, state = module()
    running = state.get(bn.state_index)

    def f(x, s, b):
        return with_params(bn, s, b)(x, state, inference=True)[0]

    def ref(x, s, b):
        return (x - running.mean) * (s * jax.lax.rsqrt(running.var + EPS)) + b

    got = jax.vjp(f, x, SCALE_J, BIAS_J)[1](g)
    want = jax.vjp(ref, x, SCALE_J, BIAS_J)[1](g)
    for a, b in zip(got, want, strict=True):
        close(a, b)


def test_reverse_mode_keeps_no_float32_copy_of_a_bfloat16_input(strategy):
    x = jnp.asarray(data((32, 4, 4, C), seed=15)).astype(jnp.bfloat16)
    bn, state = module()

    def f(x):
        return bn(x, jax.tree.map(lambda a: a, state))[0]

    # Differentiating a jitted layer: what the pullback keeps of x's size is x itself.
    residuals = jax.tree.leaves(jax.vjp(jax.jit(f), x)[1])
    big = [r for r in residuals if np.size(r) >= x.size]
    assert [r.unsafe_buffer_pointer() for r in big] == [x.unsafe_buffer_pointer()]
    # Op by op: copies of x in its own dtype (one per custom rule), never float32 (Flax
    # keeps two float32 arrays of x's size here).
    residuals = jax.tree.leaves(jax.vjp(f, x)[1])
    big = [r for r in residuals if np.size(r) >= x.size]
    assert big and all(r.dtype == jnp.bfloat16 for r in big), [r.dtype for r in big]


# ---------------------------------------------------------------------------------------
# Forward mode and higher orders


def test_forward_mode_matches_plain_formula(strategy):
    x = data((6, 2, C), seed=16)
    dx = data((6, 2, C), seed=17, offset=0.0, spread=1.0)
    ds, db = np.array([0.3, -0.1, 0.2], np.float32), np.array([1.0, 0.5, -1.0], np.float32)
    bn, state = module()

    def f(x, s, b):
        return with_params(bn, s, b)(x, jax.tree.map(lambda a: a, state))[0]

    y, t = jax.jvp(f, (x, SCALE_J, BIAS_J), (dx, ds, db))
    y_ref, t_ref = jax.jvp(plain, (x, SCALE_J, BIAS_J), (dx, ds, db))
    close(y, y_ref)
    close(t, t_ref)
    close(jax.jacfwd(f)(x, SCALE_J, BIAS_J), jax.jacrev(plain)(x, SCALE_J, BIAS_J))


def test_hessian_and_grad_of_grad_match_plain_formula(strategy):
    x = data((5, C), seed=18)
    w = data((5, C), seed=19, offset=0.0, spread=1.0)
    bn, state = module()

    def loss(x):
        model = with_params(bn, SCALE_J, BIAS_J)
        return jnp.sum(w * model(x, jax.tree.map(lambda a: a, state))[0])

    def ref_loss(x):
        return jnp.sum(w * plain(x, SCALE_J, BIAS_J))

    close(jax.hessian(loss)(x), jax.hessian(ref_loss)(x), tol=2e-4)

    def grad_norm(f):
        return lambda x: jnp.sum(jax.grad(f)(x) ** 2)

    close(jax.grad(grad_norm(loss))(x), jax.grad(grad_norm(ref_loss))(x), tol=2e-4)


# ---------------------------------------------------------------------------------------
# The accurate one-pass variance


def offset_data(shape, offset, seed=20):
    # A different offset per feature, the last one small: the cancellation check is per
    # feature, the decision to refine is taken once for all of them.
    z = data(shape, seed=seed, offset=0.0, spread=1.0)
    return (z + np.array([offset, -offset / 2, 0.25], np.float32)).astype(np.float32)


def rel_error(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want)))


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3, 1e4])
def test_batched_variance_is_accurate_on_offset_data(strategy, offset, masked):
    x = offset_data((32, 8, 8, C), offset)
    mask = (np.random.default_rng(21).random((32, 8, 8, 1)) < 0.6) if masked else None
    _, mean_ref, var_ref = ref_forward(x, 1.0, 0.0, mask)
    stats = jax.jit(lambda x, m: ebn.batch_statistics(x, mask=m))(x, mask)
    assert rel_error(stats.var, var_ref) <= 1e-5
    # The mean to within rounding of its own magnitude.
    assert np.all(np.abs(np.asarray(stats.mean, np.float64) - mean_ref)
                  <= 1e-6 * np.abs(mean_ref) + 1e-5 * np.sqrt(var_ref))


@pytest.mark.parametrize("shape", [(16, 8, C), (4096, 64, C)])
def test_variance_is_accurate_just_below_the_refinement_threshold(strategy, shape):
    # The CPU path trusts the plain sums while mean^2 <= 3 var: the worst case it keeps
    # is |mean| = sqrt(3) std, on few and on many (262144) elements per feature.
    z = data(shape, seed=23, offset=0.0, spread=1.0).reshape(-1, C)
    z = (z - z.mean(0)) / z.std(0)  # exactly standardised: |mean|/std is what we set
    x = (z * 3.0 + np.float32(3.0 * np.sqrt(3.0) * 0.999)).astype(np.float32).reshape(shape)
    _, _, var_ref = ref_forward(x, 1.0, 0.0)
    assert rel_error(ebn.batch_statistics(jnp.asarray(x)).var, var_ref) <= 1e-5


def test_two_pass_variance_stays_the_two_pass_formula(strategy):
    x = jnp.asarray(offset_data((16, 4, C), 30.0))
    got = ebn.batch_statistics(x, use_fast_variance=False).var
    mean = jnp.mean(x, (0, 1))
    close(got, jnp.mean(jnp.square(x - mean), (0, 1)), tol=1e-6)


def run_across(transform, x, mask=None, **kwargs):
    """Per-participant statistics with axis_name="d": participant i holds x[i] (and
    mask[i])."""
    mask = np.ones(x.shape, bool) if mask is None else np.asarray(mask)
    masked = not mask.all()

    def stats(xi, mi):
        s = ebn.batch_statistics(xi, axis_name="d", mask=mi if masked else None, **kwargs)
        return s.mean, s.var

    if transform == "vmap":
        return jax.jit(jax.vmap(stats, axis_name="d"))(x, mask)
    if transform == "pmap":
        return jax.pmap(stats, axis_name="d")(x, mask)
    mesh = jax.make_mesh((x.shape[0],), ("d",))
    f = jax.shard_map(lambda xl, ml: jax.tree.map(lambda v: v[None], stats(xl[0], ml[0])),
                      mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"))
    sharding = NamedSharding(mesh, P("d"))
    return jax.jit(f)(jax.device_put(x, sharding), jax.device_put(mask, sharding))


@pytest.mark.parametrize("grouped", [False, True], ids=["whole_axis", "groups"])
@pytest.mark.parametrize("transform", ["vmap", "pmap", "shard_map"])
def test_variance_across_participants_is_accurate_on_offset_data(strategy, transform,
                                                                 grouped):
    groups = ((0, 1, 2, 3), (4, 5, 6, 7)) if grouped else None
    # Every participant sees a different part of the batch; offsets up to 1e4 std.
    x = offset_data((8, 16, 4, C), 1e4, seed=22)
    x[4:] += np.float32(3.0)  # the groups differ in mean
    mean, var = run_across(transform, x, axis_index_groups=groups)
    var = np.asarray(var)
    for members in (groups or (tuple(range(8)),)):
        idx = np.asarray(members)
        _, _, var_ref = ref_forward(x[idx], 1.0, 0.0)
        for i in idx:
            assert rel_error(var[i], var_ref) <= 1e-5, (transform, i)


@pytest.mark.parametrize("transform", ["vmap", "pmap", "shard_map"])
def test_masked_variance_across_participants_when_first_members_hold_no_data(strategy,
                                                                            transform):
    # The shift of a group comes from a member with valid data in that feature: here the
    # first member of each group has none at all in feature 0, the first participant
    # none in any feature. A shift of 0 (its fallback) would cancel on this offset data.
    groups = ((0, 1, 2, 3), (4, 5, 6, 7))
    x = offset_data((8, 16, 4, C), 1e4, seed=24)
    mask = np.random.default_rng(25).random((8, 16, 4, C)) < 0.7
    mask[0] = False
    mask[4, ..., 0] = False
    mean, var = run_across(transform, x, mask, axis_index_groups=groups)
    mean, var = np.asarray(mean), np.asarray(var)
    for members in groups:
        idx = np.asarray(members)
        _, mean_ref, var_ref = ref_forward(x[idx], 1.0, 0.0, mask[idx])
        for i in idx:
            assert rel_error(var[i], var_ref) <= 1e-5, (transform, i)
            assert np.all(np.abs(mean[i] - mean_ref) <= 1e-6 * np.abs(mean_ref)
                          + 1e-5 * np.sqrt(var_ref)), (transform, i)


def _variance_error(x, fast):
    """Root-mean-square relative error of the variance per feature, against float64."""
    want = np.asarray(x, np.float64).reshape(-1, x.shape[-1]).var(0)
    got = ebn.batch_statistics(x, use_fast_variance=fast, force_float32_reductions=False).var
    return float(np.sqrt(np.mean(((np.asarray(got, np.float64) - want) / want) ** 2)))


@pytest.mark.parametrize("offset", [0.0, 0.5, 1.0, 1.7, 100.0])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_one_pass_variance_is_as_accurate_as_the_two_pass_one(strategy, dtype, offset):
    # Statistics in the input's own (half) precision: still accumulated in float32, so
    # the one-pass estimator is not worse than 1.5x the two-pass one (a bfloat16 shift
    # by one sample used to be 9x worse on centred data).
    limit = 1.5
    if strategy == "cpu" and dtype == "float32" and 0 < offset < 2:
        # The plain sums are trusted while mean^2 <= 3 var; in float32 they are then up
        # to ~3.5x the two-pass error (a few 1e-7 relative): the price of XLA:CPU's fast
        # path (docs/benchmarks.md). Half precision rounds the result more than that.
        limit = 4.0
    errors = {}
    for fast in (True, False):
        errors[fast] = np.mean([
            _variance_error(jnp.asarray(data((64, 4, 6), seed, offset, 1.0), dtype), fast)
            for seed in range(20)])
    assert errors[True] <= limit * errors[False], errors
