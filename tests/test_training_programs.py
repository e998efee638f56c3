"""Programs that real training code writes around the layer, each run as Flax and Equinox
users run them: `jax.export` with a symbolic batch, float64 under x64, models combined
leaf by leaf (model soups, weight averages), and `vmap`s nested around the per-example
layer. Each is checked against NumPy, Flax or `eqx.nn.BatchNorm` running the same program.
"""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import eqx_batchnorm as ebn
import eqx_batchnorm._backend as backend

C = 4
EPS = 1e-5


@pytest.fixture(params=["cpu", "accelerator"])
def strategy(request, monkeypatch):
    """Trace the kernels of one kind of backend (the estimator that exporting for it
    would use), whatever the backend."""
    monkeypatch.setattr(backend, "platform", lambda: request.param)
    return request.param


def _copy(state):
    return jax.tree.map(lambda a: a, state)


# ---------------------------------------------------------------------------------------
# jax.export with a symbolic batch


def _export_cases(style):
    """(a jittable `f(x, params, state)`, the layer, example batches of two sizes, and
    the symbolic shape of x)."""
    key = jax.random.key(0)
    if style == "batched":
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, momentum=0.9)

        def apply(bn, x, state):
            return bn(x, state)

        shape, sizes = "b, 3, 3, 4", [(5, 3, 3, C), (70, 3, 3, C)]
    else:
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, axis=0, axis_name="batch",
                                                          momentum=0.9)

        def apply(bn, x, state):
            return jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(x, state)

        shape, sizes = "b, 4, 3", [(5, C, 3), (70, C, 3)]
    xs = [jax.random.normal(jax.random.fold_in(key, i), s) * 2 + 3 for i, s in
          enumerate(sizes)]
    return bn, state, apply, shape, xs


@pytest.mark.parametrize("style, mode", [("batched", "inference"), ("batched", "train_step"),
                                         ("per_example", "inference")])
def test_export_with_a_symbolic_batch_equals_jit(strategy, style, mode):
    bn, state, apply, shape, xs = _export_cases(style)
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    if mode == "inference":
        def f(x, params, state):
            return apply(eqx.nn.inference_mode(eqx.combine(params, static)), x, state)
    else:
        def f(x, params, state):  # one SGD step: new parameters, output and statistics
            def loss(params):
                y, new_state = apply(eqx.combine(params, static), x, state)
                return jnp.mean(jnp.sin(y) * y), (y, new_state)

            grads, (y, new_state) = jax.grad(loss, has_aux=True)(params)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), y, new_state

    spec = jax.ShapeDtypeStruct(export.symbolic_shape(shape), jnp.float32)
    exported = export.export(jax.jit(f))(spec, params, state)
    assert exported.in_avals[0].shape[0] != xs[0].shape[0]  # symbolic, not a size
    for x in xs:
        got = exported.call(x, params, _copy(state))
        want = jax.jit(f)(x, params, _copy(state))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_export_of_per_example_training_over_a_symbolic_batch_says_what_to_export():
    # JAX cannot take the size of a vmap over a symbolic batch: Equinox's layer fails
    # with JAX's error; ours names the argument and the batched spelling that exports.
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, 4, 3"), jnp.float32)
    for layer, state in (eqx.nn.make_with_state(ebn.BatchNorm)(C, axis=0, axis_name="batch"),
                         eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch", mode="batch")):
        f = jax.jit(jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
        error = (ebn.BatchNormError if isinstance(layer, ebn.BatchNorm)
                 else jax.errors.InconclusiveDimensionOperation)
        match = (r"`axis_name`: expected a named axis of known size, but got the `jax.vmap` "
                 r"axis 'batch' over a symbolic batch .* `BatchNorm\(C, axis=1\)`"
                 if error is ebn.BatchNormError else "Symbolic dimension")
        with pytest.raises(error, match=match):
            export.export(f)(spec, state)


def test_export_with_a_symbolic_batch_and_a_mask(strategy):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C)
    f = jax.jit(lambda x, m, state: bn(x, state, mask=m))
    b = export.symbolic_shape("b")[0]
    exported = export.export(f)(jax.ShapeDtypeStruct((b, 6, C), jnp.float32),
                                jax.ShapeDtypeStruct((b, 6, 1), jnp.bool_), state)
    for n in (3, 40):
        x = jax.random.normal(jax.random.key(n), (n, 6, C)) + 5
        m = jax.random.bernoulli(jax.random.key(n + 1), 0.7, (n, 6, 1))
        for g, w in zip(jax.tree.leaves(exported.call(x, m, _copy(state))),
                        jax.tree.leaves(f(x, m, _copy(state))), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ---------------------------------------------------------------------------------------
# float64 under x64


@pytest.mark.parametrize("param_dtype, force, stat_dtype", [
    (jnp.float64, True, jnp.float64), (jnp.float64, False, jnp.float64),
    (jnp.float32, True, jnp.float32), (jnp.bfloat16, True, jnp.float32),
    (jnp.bfloat16, False, jnp.bfloat16),
])
def test_running_statistics_dtype_is_param_dtype_at_least_float32(param_dtype, force,
                                                                   stat_dtype):
    with jax.enable_x64(True):
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(
            C, param_dtype=param_dtype, force_float32_reductions=force)
        stats = state.get(bn.state_index)
        assert stats.mean.dtype == stats.var.dtype == stat_dtype
        x = jnp.ones((8, C), param_dtype) + jnp.arange(8, dtype=param_dtype)[:, None]
        _, state = bn(x, state)  # an update keeps the dtype
        assert state.get(bn.state_index).var.dtype == stat_dtype


def test_float64_parameters_without_x64_give_float32_statistics():
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX's own "float64 is not available" warning
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, param_dtype=jnp.float64)
    assert state.get(bn.state_index).mean.dtype == jnp.float32
    _, state = bn(jnp.ones((3, C)), state)


def test_float64_training_matches_numpy_and_flax_to_1e_12():
    steps, momentum = 300, 0.9
    rng = np.random.default_rng(0)
    batches = rng.standard_normal((steps, 16, C)) * 3 + 2
    mean_ref, var_ref = np.zeros(C), np.ones(C)
    for x in batches:
        mean_ref = momentum * mean_ref + (1 - momentum) * x.mean(0)
        var_ref = momentum * var_ref + (1 - momentum) * x.var(0)
    probe = batches[0]
    y_ref = (probe - mean_ref) / np.sqrt(var_ref + EPS)

    with jax.enable_x64(True):
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, momentum=momentum,
                                                          param_dtype=jnp.float64)
        step = jax.jit(lambda x, state: bn(x, state)[1])
        for x in batches:
            state = step(jnp.asarray(x), state)
        stats = state.get(bn.state_index)
        y, _ = eqx.nn.inference_mode(bn)(jnp.asarray(probe), state)

        flax_bn = nn.BatchNorm(use_running_average=False, momentum=momentum,
                               param_dtype=jnp.float64)
        variables = flax_bn.init(jax.random.key(0), jnp.asarray(probe))
        flax_step = jax.jit(lambda x, v: flax_bn.apply(v, x, mutable=["batch_stats"])[1])
        for x in batches:
            variables = {**variables, **flax_step(jnp.asarray(x), variables)}
        y_flax = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64).apply(
            variables, jnp.asarray(probe))

    assert stats.mean.dtype == stats.var.dtype == y.dtype == jnp.float64
    for got, want in ((stats.mean, mean_ref), (stats.var, var_ref), (y, y_ref),
                      (variables["batch_stats"]["mean"], mean_ref), (y_flax, y_ref)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Models built alike are one pytree structure


def _average(a, b):
    """Of two models' leaves: the mean of floating arrays; flags and the like kept."""
    return (a + b) / 2 if eqx.is_inexact_array(a) else a


def _model(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(3, C, 3, padding=1, key=k1),
        # Initialisers as Flax users spell them: each call makes a new function object.
        ebn.BatchNorm(C, axis=0, axis_name="batch",
                      scale_init=jax.nn.initializers.constant(0.5),
                      bias_init=nn.initializers.normal(0.1), key=k2),
    ])


def test_two_models_built_alike_combine_leaf_by_leaf_and_jit_once():
    (m1, s1), (m2, s2) = _model(jax.random.key(1)), _model(jax.random.key(2))
    assert jax.tree.structure((m1, s1)) == jax.tree.structure((m2, s2))
    # A model soup: the average of two models' weights and statistics.
    soup, soup_state = jax.tree.map(_average, (m1, s1), (m2, s2))
    assert soup.layers[1].inference is False
    np.testing.assert_allclose(soup.layers[1].bias, (m1.layers[1].bias
                                                     + m2.layers[1].bias) / 2)
    assert not np.allclose(m1.layers[1].bias, m2.layers[1].bias)  # the keys were used
    np.testing.assert_allclose(m1.layers[1].scale, 0.5)

    traces = []

    @eqx.filter_jit
    def forward(model, state, xs):
        traces.append(None)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None),
                        out_axes=(0, None))(xs, state)

    xs = jnp.ones((4, 3, 5, 5))
    for model, state in ((m1, s1), (m2, s2), (soup, soup_state)):
        forward(model, state, xs)
    assert len(traces) == 1


def test_equinox_batch_norm_models_combine_alike():
    # The same program with Equinox's layer, which keeps no initialisers either.
    def build(key):
        return eqx.nn.make_with_state(eqx.nn.Sequential)([
            eqx.nn.Conv2d(3, C, 3, key=key), eqx.nn.BatchNorm(C, "batch", mode="batch")])

    (m1, s1), (m2, s2) = build(jax.random.key(1)), build(jax.random.key(2))
    assert jax.tree.structure((m1, s1)) == jax.tree.structure((m2, s2))
    jax.tree.map(_average, (m1, s1), (m2, s2))


# ---------------------------------------------------------------------------------------
# vmaps around the per-example layer


def test_per_example_layer_under_an_unnamed_outer_vmap_matches_equinox_and_numpy():
    # Equinox's own test, ported: the per-example layer under `vmap(axis_name="batch")`,
    # inside an outer unnamed `vmap` that maps the state out: one set of running
    # statistics per outer index.
    x = np.asarray(jax.random.uniform(jax.random.key(0), (10, 5, 6)))
    outs = {}
    for name, (layer, state) in {
        "ours": eqx.nn.make_with_state(ebn.BatchNorm)(5, axis=0, axis_name="batch",
                                                      momentum=0.9),
        "eqx": eqx.nn.make_with_state(eqx.nn.BatchNorm)(5, "batch", momentum=0.9,
                                                        mode="batch"),
    }.items():
        inner = jax.vmap(layer, axis_name="batch", in_axes=(1, None), out_axes=(1, None))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning either: the program is fine
            out, new_state = jax.vmap(inner, in_axes=(0, None))(jnp.asarray(x), state)
        index = layer.state_index if name == "ours" else layer.batch_state_index
        outs[name] = out, new_state.get(index)
    (y, stats), (y_eqx, (mean_eqx, var_eqx)) = outs["ours"], outs["eqx"]
    assert y.shape == y_eqx.shape == x.shape
    assert stats.mean.shape == stats.var.shape == mean_eqx.shape == var_eqx.shape == (10, 5)

    mean, var = x.mean(2), x.var(2)  # per outer index, across the 6 examples
    y_ref = (x - mean[..., None]) / np.sqrt(var[..., None] + EPS)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_eqx, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.mean, 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.var, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-7)


def test_batched_layer_vmapped_over_tasks_keeps_statistics_per_task():
    # Flax's meta-learning pattern: the whole batch of each task normalised on its own,
    # from one shared state; one set of statistics per task comes out. Legal, so it
    # runs (with a warning, since the mistake below looks alike).
    tasks = jax.random.normal(jax.random.key(0), (3, 16, C)) * 2 + 1
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, momentum=0.5)
    with pytest.warns(UserWarning, match="running statistics per mapped index"):
        ys, new = jax.vmap(bn, in_axes=(0, None), out_axes=(0, 0))(tasks, state)
    assert new.get(bn.state_index).mean.shape == (3, C)

    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
    variables = flax_bn.init(jax.random.key(0), tasks[0])
    flax_ys, flax_new = jax.vmap(lambda x: flax_bn.apply(variables, x,
                                                         mutable=["batch_stats"]))(tasks)
    np.testing.assert_allclose(ys, flax_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.get(bn.state_index).var, flax_new["batch_stats"]["var"],
                               rtol=1e-5)
    for i in range(3):  # each task as if alone
        y, alone = bn(tasks[i], _copy(state))
        np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new.get(bn.state_index).mean[i],
                                   alone.get(bn.state_index).mean, rtol=1e-6)


def test_layer_without_axis_name_under_a_per_example_vmap_warns_before_jax_refuses():
    # The commonest vmap mistake: the state cannot come out unmapped, JAX refuses, and
    # the warning just before says why and what to write.
    xs = jnp.ones((4, 3, 2))
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3, axis=0)
    fix = r"BatchNorm\(\.\.\., axis_name='batch'\)"
    with pytest.warns(UserWarning, match=fix) as record:
        with pytest.raises(ValueError, match="got axis spec None but output was batched"):
            jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(xs, state)
    assert record[0].filename == __file__  # shown at the user's line
    with pytest.warns(UserWarning, match="under `jax.vmap\\(..., axis_name='batch'\\)`"):
        with pytest.raises(ValueError, match="out_axes"):
            jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
                xs, state)


def test_a_misspelt_axis_name_is_still_refused():
    xs = jnp.ones((4, 3, 2))
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3, axis=0, axis_name="btach")
    with pytest.raises(ebn.BatchNormError, match=r"the unbound name 'btach' \(bound here: "
                                                 r"'batch'\)"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xs, state)
