"""Fuzzing: generated constructor and call arguments, valid and invalid mixed.

Every outcome must be one of two things:

- a correct result: `y` finite, of `x`'s shape and the documented dtype, and matching a
  NumPy float64 reference of `flax.linen.BatchNorm`'s semantics; the new running
  statistics likewise;
- a `BatchNormError` naming the argument that was made invalid.

At most one argument is spoiled per example, so the test knows which error is due, and
whether it is due at all: some inputs are only wrong in training (an unbound
`axis_name`, an empty batch), and must then work in inference.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import eqx_batchnorm as ebn

make = eqx.nn.make_with_state(ebn.BatchNorm)
HALF = {jnp.dtype(jnp.float16): 1e-2, jnp.dtype(jnp.bfloat16): 6e-2}

# Spoilers: (argument named by the error, where it is refused, how to spoil).
CONSTRUCTOR_SPOILERS = {
    "num_features": [0, -1, 2.5, True, "3", None],
    "axis": ["a", 1.5, (), True],
    "momentum": [float("nan"), float("inf"), -0.1, 1.5, "0.9", True],
    "epsilon": [-1e-3, float("nan"), float("inf"), "1e-5"],
    "dtype": [jnp.int32, "foo", jnp.complex64, bool],
    "param_dtype": [jnp.int8, None, "foo"],
    "use_bias": ["no", 1, None],
    "use_scale": ["yes", 0],
    "axis_index_groups": [[[0, 1]], [[0.0, 1.0]]],
    "inference": ["conflict", "yes"],
    "renorm_r_max": [0.5, float("nan")],
    "scale_init": [1.0, "ones"],
}
CALL_SPOILERS = ["x-features", "x-axis-range", "x-dtype", "x-list", "x-0d", "mask-dtype",
                 "mask-shape", "mask-list", "call-conflict", "call-flag", "state-size",
                 "state-type", "unbound-axis_name", "empty-batch"]


@st.composite
def scenarios(draw):
    rank = draw(st.integers(2, 3))
    two_features = rank == 3 and draw(st.booleans())
    canon = (1, 2) if two_features else (draw(st.integers(0, rank - 1)),)
    reduced = [a for a in range(rank) if a not in canon]
    sizes = {a: draw(st.sampled_from([1, 2, 3])) for a in range(rank)}
    sizes[reduced[0]] = draw(st.sampled_from([2, 3]))
    shape = tuple(sizes[a] for a in range(rank))
    negative = draw(st.booleans())
    written = tuple(a - rank if negative else a for a in canon)
    ctor = dict(
        axis=written if two_features else written[0],
        momentum=draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])),
        epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        dtype=draw(st.sampled_from([None, jnp.float32, jnp.bfloat16, jnp.float16])),
        param_dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])),
        use_bias=draw(st.booleans()), use_scale=draw(st.booleans()),
        use_fast_variance=draw(st.booleans()),
        force_float32_reductions=draw(st.booleans()),
        scale_init=jax.nn.initializers.constant(1.5),
        bias_init=jax.nn.initializers.constant(-0.5),
    )
    num_features = tuple(shape[a] for a in canon)
    num_features = num_features if two_features else num_features[0]
    call = dict(
        x_dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])),
        mode=draw(st.sampled_from(["train", "train", "train", "inference",
                                   "use_running_average", "field-inference"])),
        masked=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    where = draw(st.sampled_from(["none", "none", "constructor", "call"]))
    spoil = None
    if where == "constructor":
        argument = draw(st.sampled_from(sorted(CONSTRUCTOR_SPOILERS)))
        spoil = (argument, draw(st.sampled_from(CONSTRUCTOR_SPOILERS[argument])))
    elif where == "call":
        spoil = (draw(st.sampled_from(CALL_SPOILERS)), None)
    return shape, canon, num_features, ctor, call, where, spoil


def _reference(x, mask, canon, running, ctor, training, scale, bias):
    """Flax's BatchNorm in float64: the output and the new running statistics."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    red = tuple(a for a in range(x.ndim) if a not in canon)
    shape = tuple(x.shape[a] if a in canon else 1 for a in range(x.ndim))
    mean_r, var_r = (np.asarray(jnp.asarray(v, jnp.float32), np.float64) for v in running)
    if training:
        w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
        n = w.sum(red)
        mean = (x * w).sum(red) / n
        var = (np.square(x - mean.reshape(shape)) * w).sum(red) / n
        m = ctor["momentum"]
        new = (m * mean_r + (1 - m) * mean, m * var_r + (1 - m) * var)
    else:
        mean, var, new = mean_r, var_r, (mean_r, var_r)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + ctor["epsilon"])
    if scale is not None:
        y = y * np.asarray(jnp.asarray(scale, jnp.float32), np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(jnp.asarray(bias, jnp.float32), np.float64).reshape(shape)
    return y, new


def _tolerance(*dtypes):
    return max(HALF.get(jnp.dtype(d), 2e-4) for d in dtypes)


def _spoil_constructor(ctor, num_features, argument, value):
    ctor = dict(ctor)
    if argument == "num_features":
        return ctor, value
    if argument == "inference" and value == "conflict":
        ctor.update(inference=True, use_running_average=False)
    elif argument == "axis_index_groups" and value == [[0, 1]]:
        ctor.update(axis_index_groups=value)  # no axis_name
    elif argument == "axis_index_groups":
        ctor.update(axis_name="b", axis_index_groups=value)
    elif argument == "renorm_r_max":
        ctor.update(renorm=True, renorm_r_max=value)
    else:
        ctor[argument] = value
    return ctor, num_features


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_every_outcome_is_a_correct_result_or_our_error(scenario):
    shape, canon, num_features, ctor, call, where, spoil = scenario
    rng = np.random.default_rng(call["seed"])

    if where == "constructor":
        argument, value = spoil
        bad_ctor, bad_features = _spoil_constructor(ctor, num_features, argument, value)
        with pytest.raises(ebn.BatchNormError, match=f"^`{argument}`: expected "):
            make(bad_features, **bad_ctor)
        event("refused at construction")
        return

    spoiler = spoil[0] if spoil else None
    if spoiler == "unbound-axis_name":
        ctor = dict(ctor, axis_name="b")
    if call["mode"] == "field-inference":
        ctor = dict(ctor, inference=True)
    if spoiler == "x-axis-range":  # accepted at construction: the rank is not known yet
        rank = len(shape)
        out_of_range = -(rank + 1) if ctor["axis"] == -1 or (
            isinstance(ctor["axis"], tuple) and ctor["axis"][0] < 0) else rank
        axis = ctor["axis"]
        ctor = dict(ctor, axis=(axis[0], out_of_range) if isinstance(axis, tuple)
                    else out_of_range)
    bn, state = make(num_features, **ctor)
    stat_dtype = jnp.float32 if ctor["force_float32_reductions"] else ctor["param_dtype"]
    running = (jnp.asarray(rng.normal(size=bn.feature_shape), stat_dtype),
               jnp.asarray(rng.uniform(0.5, 2.0, size=bn.feature_shape), stat_dtype))
    state = state.set(bn.state_index, ebn.BatchStats(*running))

    x_shape = tuple(0 if (spoiler == "empty-batch" and a == min(
        set(range(len(shape))) - set(canon))) else s for a, s in enumerate(shape))
    x = jnp.asarray(rng.normal(size=x_shape) * 2 + 1, call["x_dtype"])
    mask = None
    if call["masked"]:  # the first element along the reduced axes always counts
        m = rng.random(x_shape) < 0.6
        if m.size:
            m[tuple(0 if a not in canon else slice(None) for a in range(len(x_shape)))] = 1
        mask = jnp.asarray(m)
    kwargs = {}
    training = call["mode"] == "train"
    if call["mode"] == "inference":
        kwargs["inference"] = True
    elif call["mode"] == "use_running_average":
        kwargs["use_running_average"] = True

    expected = None  # the argument the error must name, if one is due
    if spoiler == "x-features":
        x = jnp.concatenate([x, x], axis=canon[-1])
        expected = "x"
    elif spoiler == "x-axis-range":
        expected = "axis"
    elif spoiler == "x-dtype":
        x = x.astype([jnp.int32, jnp.bool_, jnp.complex64][rng.integers(3)])
        expected = "x"
    elif spoiler == "x-list":
        x, expected = np.asarray(x, np.float32).tolist(), "x"
    elif spoiler == "x-0d":
        x, expected = x.reshape(-1)[0], "x"
    elif spoiler == "mask-dtype":
        mask, expected = jnp.ones(x_shape, [jnp.int8, jnp.float32][rng.integers(2)]), "mask"
    elif spoiler == "mask-shape":
        mask, expected = jnp.ones(x_shape[:-1] + (x_shape[-1] + 1,), bool), "mask"
    elif spoiler == "mask-list":
        mask, expected = np.ones(x_shape, bool).tolist(), "mask"
    elif spoiler == "call-conflict":
        kwargs.update(inference=True, use_running_average=False)
        expected = "inference"
    elif spoiler == "call-flag":
        kwargs["update_stats"], expected = "no", "update_stats"
    elif spoiler == "state-size":
        state, expected = make(tuple(n + 1 for n in bn.feature_shape),
                               axis=(1, 2) if len(canon) == 2 else -1)[1], "state"
    elif spoiler == "state-type":
        state, expected = dict(mean=running[0], var=running[1]), "state"
    elif spoiler == "unbound-axis_name" and training:
        expected = "axis_name"
    elif spoiler == "empty-batch" and training:
        expected = "x"

    if expected is not None:
        with pytest.raises(ebn.BatchNormError, match=f"^`{expected}`: expected "):
            bn(x, state, **kwargs, mask=mask)
        event("refused at the call")
        return

    y, new_state = bn(x, state, **kwargs, mask=mask)
    event(f"result ({'training' if training else 'inference'}"
          f"{', spoiled only for training' if spoiler else ''})")
    params = [p for p in (bn.scale, bn.bias) if p is not None]
    out_dtype = (jnp.dtype(ctor["dtype"]) if ctor["dtype"] is not None
                 else jnp.result_type(x.dtype, *(p.dtype for p in params)))
    assert y.shape == x.shape and y.dtype == out_dtype
    y_ref, new_ref = _reference(x, mask, canon, running, ctor, training, bn.scale, bn.bias)
    stats = new_state.get(bn.state_index)
    assert stats.mean.dtype == stats.var.dtype == stat_dtype
    assert stats.mean.shape == bn.feature_shape
    assert bool(jnp.isfinite(y).all())
    compute = ctor["dtype"] if ctor["dtype"] is not None else x.dtype
    tol = _tolerance(out_dtype, stat_dtype, compute if not ctor["force_float32_reductions"]
                     else jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=tol, atol=4 * tol)
    for got, want in zip((stats.mean, stats.var), new_ref, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
