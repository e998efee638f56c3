"""Reliability: hostile inputs, faults, data safety, transforms, gradients and a soak.

The basic checks live in test_errors.py; this file covers the wider
catalogue (every row of docs/reliability.md), then faults (non-finite batches),
serialisation, JAX transforms, float64 gradients and a 10,000-step soak.
"""

import math
import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import eqx_batchnorm as ebn

make = eqx.nn.make_with_state(ebn.BatchNorm)
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
_FORMAT = re.compile(r"^`(?P<arg>[^`]+)`: expected .+, but got .+\. Fix: .+", re.DOTALL)


def copy(state):
    return jax.tree_util.tree_map(lambda a: a, state)


def refused(argument, fn, *fragments):
    """`fn()` raises our error, in the one format, naming `argument`, raised by one of
    our checks (not deep inside JAX), and mentioning each of `fragments`."""
    with pytest.raises(ebn.BatchNormError) as info:
        fn()
    message = str(info.value)
    match = _FORMAT.match(message)
    assert match is not None, message
    assert match["arg"] == argument, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "eqx_batchnorm" in str(info.traceback[-1].path), info.traceback[-1]
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    return message


# --------------------------------------------------------------------------------------
# 1. The bad-input catalogue, beyond the basic checks
# --------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

CONSTRUCTOR_CASES = [
    # (id, constructor args, kwargs, argument named, fragment of the message)
    ("num_features-bool", (True,), {}, "num_features", "True"),
    ("num_features-float", (3.0,), {}, "num_features", "3.0"),
    ("num_features-str", ("3",), {}, "num_features", "'3'"),
    ("num_features-None", (None,), {}, "num_features", "None"),
    ("num_features-empty", ((),), {}, "num_features", "()"),
    ("axis-str", (3,), dict(axis="channels"), "axis", "'channels'"),
    ("axis-float", (3,), dict(axis=1.0), "axis", "1.0"),
    ("axis-bool", (3,), dict(axis=True), "axis", "True"),
    ("axis-empty", (3,), dict(axis=()), "axis", "()"),
    ("momentum-nan", (3,), dict(momentum=NAN), "momentum", "nan"),
    ("momentum-inf", (3,), dict(momentum=INF), "momentum", "inf"),
    ("momentum--inf", (3,), dict(momentum=-INF), "momentum", "-inf"),
    ("momentum-str", (3,), dict(momentum="0.9"), "momentum", "'0.9'"),
    ("momentum-bool", (3,), dict(momentum=True), "momentum", "bool"),
    ("momentum-complex", (3,), dict(momentum=0.9 + 0j), "momentum", "complex"),
    ("momentum-vector", (3,), dict(momentum=np.array([0.9, 0.9])), "momentum", "ndarray"),
    ("momentum-None", (3,), dict(momentum=None), "momentum", "None"),
    ("epsilon-nan", (3,), dict(epsilon=NAN), "epsilon", "nan"),
    ("epsilon-inf", (3,), dict(epsilon=INF), "epsilon", "finite"),
    ("epsilon-negative", (3,), dict(epsilon=-1e-3), "epsilon", "-0.001"),
    ("epsilon-str", (3,), dict(epsilon="1e-5"), "epsilon", "'1e-5'"),
    ("dtype-int", (3,), dict(dtype=jnp.int32), "dtype", "int32"),
    ("dtype-bool", (3,), dict(dtype=bool), "dtype", "bool"),
    ("dtype-str", (3,), dict(dtype="foo"), "dtype", "'foo'"),
    ("dtype-complex", (3,), dict(dtype=jnp.complex64), "dtype", "complex64"),
    ("param_dtype-int", (3,), dict(param_dtype=jnp.int8), "param_dtype", "int8"),
    ("param_dtype-bool", (3,), dict(param_dtype=jnp.bool_), "param_dtype", "bool"),
    ("param_dtype-str", (3,), dict(param_dtype="foo"), "param_dtype", "'foo'"),
    ("param_dtype-None", (3,), dict(param_dtype=None), "param_dtype", "None"),
    ("groups-missing-index", (3,), dict(axis_name="b", axis_index_groups=[[0, 1], [3, 4]]),
     "axis_index_groups", "exactly once"),
    ("groups-negative-index", (3,), dict(axis_name="b", axis_index_groups=[[-1, 0]]),
     "axis_index_groups", "exactly once"),
    ("groups-empty", (3,), dict(axis_name="b", axis_index_groups=[]),
     "axis_index_groups", "non-empty"),
    ("groups-empty-group", (3,), dict(axis_name="b", axis_index_groups=[[], []]),
     "axis_index_groups", "non-empty"),
    ("groups-float-indices", (3,), dict(axis_name="b", axis_index_groups=[[0.0, 1.0]]),
     "axis_index_groups", "ints"),
    ("groups-fractional-indices", (3,), dict(axis_name="b", axis_index_groups=[[0.5, 1.5]]),
     "axis_index_groups", "ints"),
    ("groups-bool-indices", (3,), dict(axis_name="b", axis_index_groups=[[True, False]]),
     "axis_index_groups", "ints"),
    ("groups-str-indices", (3,), dict(axis_name="b", axis_index_groups=[["a", "b"]]),
     "axis_index_groups", "ints"),
    ("groups-flat", (3,), dict(axis_name="b", axis_index_groups=[0, 1]),
     "axis_index_groups", "sequences of ints"),
    ("groups-str", (3,), dict(axis_name="b", axis_index_groups="01"),
     "axis_index_groups", "sequences of ints"),
    ("groups-empty-axis_name", (3,), dict(axis_name=(), axis_index_groups=[[0, 1]]),
     "axis_index_groups", "axis_name"),
    ("axis_name-unhashable", (3,), dict(axis_name={"b": 1}), "axis_name", "dict"),
    ("axis_name-unhashable-member", (3,), dict(axis_name=("b", ["c"])), "axis_name", "list"),
    ("axis_name-None-member", (3,), dict(axis_name=("b", None)), "axis_name", "None"),
    ("inference-str", (3,), dict(inference="yes"), "inference", "'yes'"),
    ("use_running_average-int", (3,), dict(use_running_average=1), "use_running_average",
     "int"),
    ("use_bias-str", (3,), dict(use_bias="no"), "use_bias", "'no'"),
    ("use_scale-None", (3,), dict(use_scale=None), "use_scale", "None"),
    ("use_fast_variance-str", (3,), dict(use_fast_variance="False"), "use_fast_variance",
     "'False'"),
    ("force_float32_reductions-int", (3,), dict(force_float32_reductions=0),
     "force_float32_reductions", "int"),
    ("skip_nonfinite_updates-str", (3,), dict(skip_nonfinite_updates="off"),
     "skip_nonfinite_updates", "'off'"),
    ("renorm_r_max-below-1", (3,), dict(renorm=True, renorm_r_max=0.5), "renorm_r_max",
     "0.5"),
    ("renorm_r_max-nan", (3,), dict(renorm=True, renorm_r_max=NAN), "renorm_r_max", "nan"),
    ("renorm_d_max-negative", (3,), dict(renorm=True, renorm_d_max=-1.0), "renorm_d_max",
     "-1.0"),
    ("scale_init-not-callable", (3,), dict(scale_init=1.0), "scale_init", "float"),
    ("bias_init-str", (3,), dict(bias_init="zeros"), "bias_init", "'zeros'"),
    ("scale_init-wrong-shape", (3,), dict(scale_init=lambda k, s, d: jnp.ones((2,), d)),
     "scale_init", "(2,)"),
    ("bias_init-raises", (3,), dict(bias_init=lambda k, s, d: 1 / 0), "bias_init",
     "ZeroDivisionError"),
]


@pytest.mark.parametrize("args, kwargs, argument, fragment",
                         [c[1:] for c in CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_refuses(args, kwargs, argument, fragment):
    refused(argument, lambda: make(*args, **kwargs), fragment)


def test_traced_hyperparameter_is_refused_with_a_static_hint():
    message = refused("momentum", lambda: jax.jit(lambda m: make(3, momentum=m)[1])(0.9))
    assert "static" in message


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0), dict(momentum=1), dict(epsilon=0), dict(momentum=np.float32(0.5)),
    dict(momentum=jnp.asarray(0.9)), dict(axis=[0, 1], num_features=[2, 3]),
    dict(axis=np.int64(-1), num_features=np.int64(3)), dict(use_bias=np.True_),
    dict(axis_name=["a", "b"]), dict(renorm=True, renorm_r_max=INF, renorm_d_max=INF),
    dict(dtype=jnp.bfloat16, param_dtype=np.float16),
], ids=str)
def test_constructor_accepts_reasonable_spellings(kwargs):
    kwargs = dict(kwargs)
    bn, state = make(kwargs.pop("num_features", 3), **kwargs)
    assert state.get(bn.state_index).mean.shape == bn.feature_shape


_FRESH = object()


def _call(x, ctor=(), ctor_kwargs=None, state=_FRESH, **kwargs):
    bn, fresh = make(*(ctor or (3,)), **(ctor_kwargs or {}))
    return bn(x, fresh if state is _FRESH else state, **kwargs)


CALL_CASES = [
    ("x-python-float", lambda: _call(1.0), "x", "float"),
    ("x-None", lambda: _call(None), "x", "None"),
    ("x-str-array", lambda: _call(np.array([["a", "b", "c"]])), "x", "floating"),
    ("x-0d", lambda: _call(jnp.asarray(1.0), ctor=(1,)), "x", "0-d"),
    ("x-empty-batch", lambda: _call(jnp.ones((0, 3))), "x", "empty along axis 0"),
    ("x-empty-spatial", lambda: _call(jnp.ones((2, 0, 3))), "x", "empty along axis 1"),
    ("mask-int8", lambda: _call(X, mask=jnp.ones((4, 3), jnp.int8)), "mask", "int8"),
    ("mask-list", lambda: _call(X, mask=[[True] * 3] * 4), "mask", "list"),
    ("mask-python-bool", lambda: _call(X, mask=True), "mask", "bool"),
    ("mask-extra-leading-axis", lambda: _call(X, mask=jnp.ones((1, 4, 3), bool)), "mask",
     "(1, 4, 3)"),
    ("call-inference-str", lambda: _call(X, inference="yes"), "inference", "'yes'"),
    ("call-use_running_average-int", lambda: _call(X, use_running_average=0),
     "use_running_average", "int"),
    ("update_stats-str", lambda: _call(X, update_stats="no"), "update_stats", "'no'"),
    ("call-renorm_r_max-below-1", lambda: _call(X, ctor_kwargs=dict(renorm=True),
                                           renorm_r_max=0.5), "renorm_r_max", "0.5"),
    ("call-renorm_d_max-negative", lambda: _call(X, ctor_kwargs=dict(renorm=True),
                                            renorm_d_max=-1.0), "renorm_d_max", "-1.0"),
    ("key-not-a-key", lambda: _call(X, key=5), "key", "5"),
    ("state-dict", lambda: _call(X, state={"mean": 0}), "state", "dict"),
    ("state-None", lambda: _call(X, state=None), "state", "None"),
    ("state-other-dtype", lambda: _call(
        X, ctor_kwargs=dict(force_float32_reductions=False),
        state=make(3, force_float32_reductions=False, param_dtype=jnp.bfloat16)[1]),
     "state", "bfloat16"),
    ("one-unbound-name-in-tuple", lambda: jax.vmap(
        lambda x: _call(x, ctor_kwargs=dict(axis=0, axis_name=("b", "d")))[0],
        axis_name="b")(X), "axis_name", "'d'"),
    ("per-example-x-without-axis_name", lambda: jax.vmap(
        lambda x: _call(x, ctor_kwargs=dict(axis=0))[0])(X), "x", "axis_name"),
]


@pytest.mark.parametrize("fn, argument, fragment", [c[1:] for c in CALL_CASES],
                         ids=[c[0] for c in CALL_CASES])
def test_call_refuses(fn, argument, fragment):
    refused(argument, fn, fragment)


def test_consumed_state_is_refused_with_the_fix():
    bn, state = make(3)
    bn(X, state)
    message = refused("state", lambda: bn(X, state), "consumed")
    assert "tree_map" in message


def test_errors_surface_at_trace_time_under_jit_and_eval_shape():
    bn, state = make(3)
    step = eqx.filter_jit(lambda b, x, s: b(x, s))
    refused("x", lambda: step(bn, jnp.ones((4, 5)), state), "(5,)")
    refused("mask", lambda: eqx.filter_eval_shape(
        lambda b, x, s: b(x, s, mask=jnp.ones((4, 3), jnp.float32)), bn, X, state))


def test_traced_flag_is_refused_with_how_to_branch():
    bn, state = make(3)
    message = refused("inference", lambda: jax.jit(
        lambda x, s, flag: bn(x, s, inference=flag)[0])(X, state, True))
    assert "lax.cond" in message


def test_layer_under_plain_jit_gets_the_filter_recipe(clone):
    # `jax.jit` traces every leaf, the `inference` flag too; `eqx.filter_jit` does not.
    bn, state = make(3)
    message = refused("inference", lambda: jax.jit(lambda b, x, s: b(x, s))(
        bn, X, clone(state)), "eqx.filter_jit")
    assert "Tracer" in message
    y, _ = eqx.filter_jit(lambda b, x, s: b(x, s))(bn, X, clone(state))
    assert y.shape == X.shape


def test_numpy_inputs_work_and_match_jax_inputs(clone):
    bn, state = make(3, momentum=0.5)
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    mask = np.arange(18).reshape(6, 3) % 4 != 0
    y_np, s_np = bn(x, clone(state), mask=mask)
    y_jx, s_jx = bn(jnp.asarray(x), clone(state), mask=jnp.asarray(mask))
    np.testing.assert_array_equal(y_np, y_jx)
    np.testing.assert_array_equal(s_np.get(bn.state_index).var, s_jx.get(bn.state_index).var)


def test_override_of_the_field_is_not_a_conflict(clone):
    bn, state = make(3, inference=True, momentum=0.5)
    _, new = bn(X, clone(state), use_running_average=False)
    np.testing.assert_allclose(new.get(bn.state_index).mean, 0.5 * np.mean(X, 0), rtol=1e-6)


def test_traced_renorm_bounds_are_accepted_for_schedules(clone):
    bn, state = make(3, renorm=True)
    step = jax.jit(lambda x, s, r: bn(x, s, renorm_r_max=r)[0])
    assert jnp.isfinite(step(X, clone(state), jnp.float32(2.0))).all()


def test_inference_needs_no_batch_axis(clone):
    bn, state = make(3, inference=True)
    y, _ = bn(jnp.arange(3.0), clone(state))
    np.testing.assert_allclose(y, np.arange(3.0) / np.sqrt(1 + 1e-5), rtol=1e-6)


# --------------------------------------------------------------------------------------
# 5. Faults and data safety
# --------------------------------------------------------------------------------------


def _poisoned(value):
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    x[5, 1] = value
    return jnp.asarray(x)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_batch_leaves_running_statistics_unchanged(value, clone):
    x = _poisoned(value)
    bn, state = make(3, momentum=0.9)
    start = clone(state).get(bn.state_index)
    _, new = bn(x, clone(state))
    stats = new.get(bn.state_index)
    mean, var = np.asarray(stats.mean), np.asarray(stats.var)
    # The poisoned feature keeps its running statistics; the clean ones move on.
    assert mean[1] == start.mean[1] and var[1] == start.var[1]
    clean = np.asarray(x, np.float64)[:, [0, 2]]
    np.testing.assert_allclose(mean[[0, 2]], 0.1 * clean.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var[[0, 2]], 0.9 + 0.1 * clean.var(0), rtol=1e-5)
    # The layer is still usable: inference on clean data stays finite.
    y, _ = eqx.nn.inference_mode(bn)(jnp.zeros((2, 3)), new)
    assert jnp.isfinite(y).all()


def test_nonfinite_statistics_from_finite_input_are_skipped(clone):
    # float16 statistics (no float32 promotion) of finite float16 data overflow.
    x = jnp.asarray([[6e4, 1.0], [-6e4, 2.0]], jnp.float16)
    bn, state = make(2, param_dtype=jnp.float16, force_float32_reductions=False)
    _, new = bn(x, clone(state))
    stats = new.get(bn.state_index)
    assert stats.var.dtype == jnp.float16
    assert stats.var[0] == 1 and stats.mean[0] == 0  # kept
    assert stats.var[1] != 1  # updated


def test_skip_is_switchable_and_then_matches_flax(clone):
    x = _poisoned(np.nan)
    bn, state = make(3, momentum=0.9, skip_nonfinite_updates=False)
    _, new = bn(x, clone(state))
    ours = new.get(bn.state_index)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    _, updates = flax_bn.apply(flax_bn.init(jax.random.key(0), x), x,
                               mutable=["batch_stats"])
    ref = updates["batch_stats"]
    assert np.isnan(ours.mean[1]) and np.isnan(ref["mean"][1])
    np.testing.assert_allclose(ours.mean, ref["mean"], rtol=1e-5)  # NaNs compare equal
    np.testing.assert_allclose(ours.var, ref["var"], rtol=1e-5)


def test_skip_works_per_example_under_vmap(clone):
    x = _poisoned(np.nan)
    bn, state = make(3, axis=0, axis_name="batch")
    _, new = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
                      out_axes=(0, None))(x, clone(state))
    stats = new.get(bn.state_index)
    assert stats.mean[1] == 0 and stats.var[1] == 1
    assert stats.mean[0] != 0


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}"), a.dtype


def _trained(param_dtype, key, force_float32_reductions=True):
    init = jax.nn.initializers.normal(1.0)
    bn, state = make(5, param_dtype=param_dtype, scale_init=init, bias_init=init,
                     force_float32_reductions=force_float32_reductions, key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (7, 5), param_dtype) * 3 + 1
    _, state = bn(x, state)
    return bn, state


@pytest.mark.parametrize("param_dtype, force_float32_reductions", [
    (jnp.float32, True), (jnp.bfloat16, False), (jnp.float16, False), (jnp.float64, False),
], ids=["f32", "bf16", "f16", "f64-x64"])
def test_serialisation_round_trip_is_bit_exact(param_dtype, force_float32_reductions,
                                               tmp_path):
    with jax.enable_x64(param_dtype == jnp.float64):
        saved = _trained(param_dtype, jax.random.key(0), force_float32_reductions)
        path = tmp_path / "bn.eqx"
        eqx.tree_serialise_leaves(path, saved)
        like = _trained(param_dtype, jax.random.key(1), force_float32_reductions)
        loaded = eqx.tree_deserialise_leaves(path, like)
        saved_leaves = jax.tree_util.tree_leaves(saved)
        loaded_leaves = jax.tree_util.tree_leaves(loaded)
        assert len(saved_leaves) == len(loaded_leaves) >= 4  # scale, bias, mean, var
        for a, b in zip(saved_leaves, loaded_leaves, strict=True):
            if isinstance(a, bool):
                assert a == b
                continue
            (bits_a, dtype_a), (bits_b, dtype_b) = _bits(a), _bits(b)
            assert dtype_a == dtype_b
            np.testing.assert_array_equal(bits_a, bits_b)
        bn, state = loaded
        assert bn.scale.dtype == bn.bias.dtype == param_dtype
        stat_dtype = jnp.float32 if force_float32_reductions else param_dtype
        assert state.get(bn.state_index).var.dtype == stat_dtype
        # What was loaded still works, and gives the saved model's numbers.
        x = jnp.linspace(-1, 1, 10, dtype=param_dtype).reshape(2, 5)
        y_loaded, _ = eqx.nn.inference_mode(bn)(x, state)
        y_saved, _ = eqx.nn.inference_mode(saved[0])(x, saved[1])
        np.testing.assert_array_equal(_bits(y_loaded)[0], _bits(y_saved)[0])


def test_checkpoint_of_another_feature_size_fails_clearly(tmp_path):
    path = tmp_path / "bn3.eqx"
    eqx.tree_serialise_leaves(path, make(3))
    # Equinox's own error names the leaf and both shapes: clear enough to keep.
    with pytest.raises(RuntimeError, match=r"'scale'.*changed shape from \(4,\) in `like` "
                                           r"to \(3,\) on disk"):
        eqx.tree_deserialise_leaves(path, make(4))
    # A state of the wrong size that reaches the layer anyway is refused by us.
    refused("state", lambda: make(4)[0](jnp.ones((2, 4)), make(3)[1]), "(3,)")


# --------------------------------------------------------------------------------------
# 6. Transforms
# --------------------------------------------------------------------------------------


def _loss_and_state(bn, x, state):
    y, state = bn(x, state)
    return jnp.sum(jnp.sin(y)), state


@pytest.mark.parametrize("wrap", [jax.checkpoint, eqx.filter_checkpoint],
                         ids=["jax.checkpoint", "eqx.filter_checkpoint"])
def test_rematerialisation_updates_statistics_once(wrap, clone):
    bn, state = make(3, momentum=0.5)
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def block(p, x, s):  # arrays only in and out, so plain `jax.checkpoint` applies
        return _loss_and_state(eqx.combine(p, static), x, s)

    def loss(p, x, s, remat):
        call = wrap(block) if remat else block
        value, s = call(p, x, s)
        value2, s = call(p, x * 2, s)  # a second call: exactly one more update
        return value + value2, s

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=3)
    (v_r, s_r), g_r = step(params, X, clone(state), True)
    (v_p, s_p), g_p = step(params, X, clone(state), False)
    np.testing.assert_allclose(v_r, v_p, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g_r), jax.tree_util.tree_leaves(g_p),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    x64 = np.asarray(X, np.float64)
    mean = 0.25 * x64.mean(0) + 0.5 * (2 * x64).mean(0)
    var = 0.25 + 0.25 * x64.var(0) + 0.5 * (2 * x64).var(0)
    np.testing.assert_allclose(s_r.get(bn.state_index).mean, mean, rtol=1e-5)
    np.testing.assert_allclose(s_r.get(bn.state_index).var, var, rtol=1e-5)


def _stack(num_layers, features):
    def build(key):
        init = jax.nn.initializers.normal(1.0)
        return make(features, momentum=0.8, scale_init=init, bias_init=init, key=key)

    return eqx.filter_vmap(build)(jax.random.split(jax.random.key(3), num_layers))


def test_scan_over_a_stack_of_layers_matches_a_python_loop():
    layers, states = _stack(3, 4)
    dynamic, static = eqx.partition(layers, eqx.is_array)
    x = jax.random.normal(jax.random.key(4), (6, 4)) * 2 + 1

    def body(h, layer_and_state):
        weights, state = layer_and_state
        h, state = eqx.combine(weights, static)(h, state)
        return h, state

    y_scan, states_scan = jax.jit(lambda x, d, s: jax.lax.scan(body, x, (d, s)))(
        x, dynamic, copy(states))
    def layer_i(tree, i):
        return jax.tree_util.tree_map(lambda a: a[i], tree)

    h = x
    for i in range(3):
        layer = eqx.combine(layer_i(dynamic, i), static)
        h, state_i = layer(h, layer_i(copy(states), i))
        np.testing.assert_allclose(layer_i(states_scan, i).get(layer.state_index).var,
                                   state_i.get(layer.state_index).var, rtol=1e-6)
    np.testing.assert_allclose(y_scan, h, rtol=1e-5, atol=1e-5)
    scales = np.asarray(dynamic.scale)
    assert scales.shape == (3, 4) and not np.allclose(scales[0], scales[1])


def test_filter_eval_shape_builds_and_calls_without_computing():
    bn, state = eqx.filter_eval_shape(make, 6, axis=1, param_dtype=jnp.bfloat16)
    assert bn.scale.shape == (6,) and bn.scale.dtype == jnp.bfloat16
    assert state.get(bn.state_index).mean.shape == (6,)
    real_bn, real_state = make(6, axis=1)
    x = jnp.ones((2, 6, 5))
    y, new = eqx.filter_eval_shape(real_bn, x, real_state)
    assert (y.shape, y.dtype) == ((2, 6, 5), jnp.float32)
    assert new.get(real_bn.state_index).var.shape == (6,)
    y_real, _ = real_bn(x, real_state)  # the state was not consumed by the abstract call
    assert y_real.shape == (2, 6, 5)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("donate", ["all", "all-except-first"])
def test_buffer_donation_is_safe(donate, clone):
    bn, state = make(3, momentum=0.5)
    xs = [jax.random.normal(jax.random.key(i), (5, 3)) for i in range(3)]

    def step(x, layer, s):
        y, s = layer(x, s)
        return y, layer, s

    donated = eqx.filter_jit(step, donate=donate)
    plain = eqx.filter_jit(step)
    # Own buffers for the donating run (the `inference` flag is not an array).
    layer_d = jax.tree_util.tree_map(lambda a: jnp.copy(a) if eqx.is_array(a) else a, bn)
    state_d = jax.tree_util.tree_map(jnp.copy, state)  # `clone` would share the buffers
    layer_p, state_p = bn, clone(state)
    for x in xs:
        y_d, layer_d, state_d = donated(jnp.copy(x), layer_d, state_d)
        y_p, layer_p, state_p = plain(x, layer_p, state_p)
        np.testing.assert_array_equal(y_d, y_p)
    np.testing.assert_array_equal(state_d.get(bn.state_index).mean,
                                  state_p.get(bn.state_index).mean)
    np.testing.assert_array_equal(layer_d.scale, layer_p.scale)


# --------------------------------------------------------------------------------------
# 4. Gradients in float64
# --------------------------------------------------------------------------------------


def _grad_case(name):
    """The layer and `f(x, scale, bias) -> y` for one gradient check (inside x64)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(6, 3)) * 2 + 1, jnp.float64)
    mask = jnp.asarray(rng.random(size=(6, 3)) > 0.3).at[:2].set(True)
    init = jax.nn.initializers.normal(1.0)
    common = dict(param_dtype=jnp.float64, scale_init=init, bias_init=init,
                  key=jax.random.key(6))
    per_example = name.startswith("axis_name")
    groups = [[0, 1, 2], [3, 4, 5]] if name == "axis_name+groups" else None
    bn, state = make(3, axis=0 if per_example else -1,
                     axis_name="batch" if per_example else None, axis_index_groups=groups,
                     use_fast_variance=name != "two-pass+mask", renorm=name == "renorm",
                     **common)
    if name == "renorm":
        stat_dtype = state.get(bn.state_index).mean.dtype  # float64: at least float32
        state = state.set(bn.state_index, ebn.BatchStats(
            jnp.full((3,), 0.5, stat_dtype), jnp.full((3,), 2.0, stat_dtype)))
    use_mask = name.endswith("mask")

    @jax.jit  # one trace per derivative order and mode, not thousands of eager ops
    def g(x, scale, bias, mask):
        layer = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
        return layer(x, copy(state), mask=mask if use_mask else None)[0]

    if per_example:
        # vmap outside the jit, as a per-example training loop writes it.
        f = jax.vmap(g, axis_name="batch", in_axes=(0, None, None, 0))
    else:
        f = g
    return bn, x, lambda x, scale, bias: f(x, scale, bias, mask)


@pytest.mark.parametrize("name", ["batched", "two-pass+mask", "axis_name+mask",
                                  "axis_name+groups", "renorm"])
def test_second_order_gradients_in_float64(name):
    with jax.enable_x64(True):
        bn, x, f = _grad_case(name)
        assert f(x, bn.scale, bn.bias).dtype == jnp.float64
        if name == "renorm":
            # r and d are constants to the gradient by design (Ioffe, 2017), so finite
            # differences in x disagree with it on purpose: check scale and bias only.
            check_grads(lambda s, b: f(x, s, b), (bn.scale, bn.bias), order=2,
                        modes=("fwd", "rev"))
        else:
            check_grads(f, (x, bn.scale, bn.bias), order=2, modes=("fwd", "rev"))


def test_float64_inputs_keep_float64_statistics_under_x64():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(7).normal(size=(9, 2)) * 1e-3 + 1e4)
        stats = ebn.batch_statistics(x)
        assert stats.mean.dtype == stats.var.dtype == jnp.float64
        np.testing.assert_allclose(stats.var, np.var(np.asarray(x), 0), rtol=1e-9)
        # Through the module: float64 statistics normalise, float64 running statistics
        # when the reductions are not forced to float32.
        bn, state = make(2, param_dtype=jnp.float64, force_float32_reductions=False)
        y, new = bn(x, state)
        ref = (np.asarray(x) - np.mean(x, 0)) / np.sqrt(np.var(x, 0) + 1e-5)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)
        assert new.get(bn.state_index).var.dtype == jnp.float64
    assert jnp.ones(1).dtype == jnp.float32  # nothing leaked


# --------------------------------------------------------------------------------------
# 7. Soak
# --------------------------------------------------------------------------------------


def test_soak_ten_thousand_steps_keep_running_statistics_accurate():
    true_mean = jnp.asarray([1e3, -3.0, 2.0, 0.5], jnp.float32)
    true_std = jnp.asarray([1.0, 2.0, 0.5, 0.1], jnp.float32)
    bn, state = make(4)  # momentum 0.99, as Flax
    dynamic, static = eqx.partition(bn, eqx.is_array)
    steps, batch = 10_000, 4096

    def body(state, t):
        x = true_mean + true_std * jax.random.normal(
            jax.random.fold_in(jax.random.key(8), t), (batch, 4))
        _, state = eqx.combine(dynamic, static)(x, state)
        stats = state.get(bn.state_index)
        return state, (stats.mean, stats.var)

    # 40M random numbers: compiled at XLA's default level (3), whatever the suite's level.
    run = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(steps)))
    _, (means, variances) = run.lower(state).compile(
        compiler_options={"xla_backend_optimization_level": 3})(state)
    means, variances = np.asarray(means, np.float64), np.asarray(variances, np.float64)
    assert np.isfinite(means).all() and np.isfinite(variances).all()
    # After a burn-in of 1000 steps (0.99**1000 ~ 4e-5 of the start remains), every step
    # stays within 1% of the truth; the biased variance is (1 - 1/batch) of it.
    mu, var = np.asarray(true_mean, np.float64), np.asarray(true_std, np.float64) ** 2
    mean_err = np.abs(means[1000:] - mu) / np.abs(mu)
    var_err = np.abs(variances[1000:] - var) / var
    assert mean_err.max() < 0.01, mean_err.max(0)
    assert var_err.max() < 0.01, var_err.max(0)
    assert math.isclose(float(np.mean(variances[1000:, 1])), 4.0 * (1 - 1 / batch),
                        rel_tol=2e-3)


def test_reliability_doc_lists_every_catalogue_case():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    missing = [c[0] for c in CONSTRUCTOR_CASES + CALL_CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"docs/reliability.md lacks rows for {missing}"

