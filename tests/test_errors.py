"""The basic checks: bad input refused at construction or trace time with a
`BatchNormError` that names the argument, what was expected, what was given, and the fix.

Each test matches the argument's name and a fragment of the fix, so that a message that
loses either fails here.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn


def raises(argument: str, fix: str, given: str | None = None):
    """`pytest.raises` for the library's one message format:
    "`argument`: expected ..., but got <given>. Fix: ...<fix>..."."""
    pattern = re.escape(f"`{argument}`: expected ") + ".*, but got "
    pattern += (".*" + re.escape(given) + ".*" if given else ".*")
    pattern += re.escape(". Fix: ") + ".*" + re.escape(fix)
    return pytest.raises(ebn.BatchNormError, match=pattern)


def make(*args, **kwargs):
    return eqx.nn.make_with_state(ebn.BatchNorm)(*args, **kwargs)


X = jnp.ones((8, 4))


def test_batch_norm_error_is_a_value_error_and_a_type_error():
    assert issubclass(ebn.BatchNormError, ValueError)
    assert issubclass(ebn.BatchNormError, TypeError)
    # ... so code written against either convention catches it.
    with pytest.raises(ValueError):
        ebn.BatchNorm(4, momentum=2.0)
    with pytest.raises(TypeError):
        ebn.BatchNorm(4, momentum=2.0)


# ---------------------------------------------------------------- x


def test_feature_size_mismatch():
    bn, state = make(4)
    with raises("x", "or construct `BatchNorm(3, ...)`", given="shape (8, 3)"):
        bn(jnp.ones((8, 3)), state)


def test_feature_size_mismatch_per_example_hints_at_channels_first():
    # The classic slip: the channels-last default under vmap on (C, H, W) examples.
    bn, state = make(3, axis_name="batch")
    xs = jnp.ones((2, 3, 5, 5))
    with raises("x", "use `axis=0` for channels-first"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xs, state)


def test_feature_size_mismatch_is_raised_at_trace_time_under_jit():
    bn, state = make(4)
    with raises("x", "construct `BatchNorm(5, ...)`"):
        eqx.filter_jit(bn)(jnp.ones((8, 5)), state)


@pytest.mark.parametrize(
    ("dtype", "fix"),
    [(jnp.int32, "cast first, e.g. `x.astype(jnp.float32)`"),
     (jnp.bool_, "cast first, e.g. `x.astype(jnp.float32)`"),
     (jnp.complex64, "normalise the real and imaginary parts separately")],
    ids=["int", "bool", "complex"])
def test_non_floating_x(dtype, fix):
    bn, state = make(4)
    with raises("x", fix, given=f"dtype {jnp.dtype(dtype)}"):
        bn(jnp.ones((8, 4), dtype), state)


def test_non_floating_x_in_the_functional_core():
    with raises("x", "cast first"):
        ebn.batch_statistics(jnp.ones((8, 4), jnp.int32))
    with raises("x", "cast first"):
        ebn.normalize(jnp.ones((8, 4), jnp.int32), jnp.zeros(4), jnp.ones(4))


def test_nothing_to_reduce_over():
    bn, state = make(4)
    with raises("x", "pass a batch (e.g. shape (batch, features))", given="shape (4,)"):
        bn(jnp.ones(4), state)
    with raises("x", "jax.vmap(..., axis_name='batch')"):
        ebn.batch_statistics(jnp.ones(4))


def test_nothing_to_reduce_over_is_fine_in_inference():
    # With the running statistics there is nothing to reduce: one example normalises.
    bn, state = make(4, inference=True)
    y, _ = bn(jnp.full(4, 2.0), state)
    np.testing.assert_allclose(y, 2.0 / np.sqrt(1 + 1e-5), rtol=1e-6)


# ---------------------------------------------------------------- axis


@pytest.mark.parametrize("axis", [2, -3], ids=["positive", "negative"])
def test_axis_out_of_range(axis):
    bn, state = make(4, axis=axis)
    with raises("axis", "pass the axis of `x` that holds the features", given=repr(axis)):
        bn(X, state)


def test_axis_repeated_at_construction():
    with raises("axis", "name each feature axis once", given="(1, 1)"):
        ebn.BatchNorm((4, 4), axis=(1, 1))


def test_axis_repeated_once_the_rank_is_known():
    # (1, -1) are distinct numbers but the same axis of a 2-D x.
    bn, state = make((4, 4), axis=(1, -1))
    with raises("axis", "name it once"):
        bn(X, state)


def test_axis_not_an_int():
    with raises("axis", "pass e.g. `axis=-1`"):
        ebn.BatchNorm(4, axis=1.0)


# ---------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")], ids=["below", "above", "nan"])
def test_momentum_outside_unit_interval(momentum):
    with raises("momentum", "e.g. 0.99 (Flax's default)", given=repr(momentum)):
        ebn.BatchNorm(4, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds_are_allowed(momentum):
    assert ebn.BatchNorm(4, momentum=momentum).momentum == momentum


def test_negative_epsilon():
    with raises("epsilon", "pass `epsilon` in [0.0, ", given="-1e-05"):
        ebn.BatchNorm(4, epsilon=-1e-5)


@pytest.mark.parametrize("num_features", [0, -3, (4, 0)])
def test_num_features_not_positive(num_features):
    axis = (0, 1) if isinstance(num_features, tuple) else -1
    with raises("num_features", "at least 1"):
        ebn.BatchNorm(num_features, axis=axis)


def test_num_features_of_the_wrong_length():
    with raises("num_features", "one size per feature axis", given="(3, 4)"):
        ebn.BatchNorm((3, 4), axis=-1)
    with raises("num_features", "one size per feature axis", given="3"):
        ebn.BatchNorm(3, axis=(1, 2))


def test_random_initialiser_without_key():
    with raises("key", "pass `key=jax.random.key(0)` to the constructor"):
        ebn.BatchNorm(4, scale_init=jax.nn.initializers.normal())
    # With a key it works; deterministic initialisers never need one.
    ebn.BatchNorm(4, scale_init=jax.nn.initializers.normal(), key=jax.random.key(0))
    ebn.BatchNorm(4, scale_init=jax.nn.initializers.constant(2.0))


# ---------------------------------------------------------------- mask


@pytest.mark.parametrize("shape", [(8, 3), (2, 8, 4), (4, 8)])
def test_mask_of_the_wrong_shape(shape):
    bn, state = make(4)
    with raises("mask", "give the mask x's shape, or size 1", given=f"shape {shape}"):
        bn(X, state, mask=jnp.ones(shape, bool))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_mask_of_the_wrong_dtype(dtype):
    bn, state = make(4)
    with raises("mask", "`mask=m.astype(bool)`", given=f"dtype {jnp.dtype(dtype)}"):
        bn(X, state, mask=jnp.ones((8, 4), dtype))


def test_mask_is_checked_in_the_functional_core():
    with raises("mask", "give the mask x's shape"):
        ebn.batch_statistics(X, mask=jnp.ones((8, 3), bool))


# ---------------------------------------------------------------- axis_name and groups


def test_axis_index_groups_without_axis_name():
    with raises("axis_index_groups", "pass `axis_name=`"):
        ebn.BatchNorm(4, axis_index_groups=[[0, 1], [2, 3]])
    with raises("axis_index_groups", "pass `axis_name=`"):
        ebn.batch_statistics(X, axis_index_groups=[[0, 1], [2, 3]])


def test_axis_index_groups_not_a_partition():
    with raises("axis_index_groups", "list every index of the named axis exactly once"):
        ebn.BatchNorm(4, axis_name="batch", axis_index_groups=[[0, 1], [1, 2]])


def test_axis_index_groups_of_unequal_sizes():
    with raises("axis_index_groups", "each hold the same number of indices"):
        ebn.BatchNorm(4, axis_name="batch", axis_index_groups=[[0], [1, 2]])


def test_axis_index_groups_not_covering_the_axis_at_trace_time():
    bn, state = make(4, axis=0, axis_name="batch", axis_index_groups=[[0, 1], [2, 3]])
    xs = jnp.ones((8, 4, 3))  # 8 examples: the groups cover only 4 of them
    with raises("axis_index_groups", "list each of the 8 indices 0..7 exactly once",
                given="groups covering 4 indices"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xs, state)


def test_unbound_axis_name_says_how_to_vmap():
    bn, state = make(4, axis_name="batch")
    fix = ("jax.vmap(bn, axis_name='batch', in_axes=(0, None), out_axes=(0, None))"
           "(xs, state)")
    with raises("axis_name", fix, given="the unbound name 'batch'"):
        bn(X, state)
    with raises("axis_name", "axis_name='batch'"):
        ebn.batch_statistics(X, axis_name="batch")


def test_axis_name_bound_under_another_name():
    bn, state = make(4, axis=0, axis_name="batch")
    with raises("axis_name", "jax.vmap(bn, axis_name='batch'"):
        jax.vmap(bn, axis_name="examples", in_axes=(0, None), out_axes=(0, None))(
            jnp.ones((8, 4)), state)


# ---------------------------------------------------------------- inference flags and state


def test_conflicting_inference_flags_in_the_constructor():
    with raises("inference", "pass only one of them"):
        ebn.BatchNorm(4, inference=True, use_running_average=False)
    assert ebn.BatchNorm(4, inference=True, use_running_average=True).inference is True


def test_conflicting_inference_flags_at_call_time():
    bn, state = make(4)
    with raises("inference", "pass only one of them",
                given="inference=True, use_running_average=False"):
        bn(X, state, inference=True, use_running_average=False)


def test_state_of_a_layer_with_another_feature_size():
    bn4, _ = make(4)
    _, state3 = make(3)
    with raises("state", "pass the state made with this layer", given="shape (3,)"):
        bn4(X, state3)


def test_state_without_this_layer():
    bn, _ = make(4)
    _, other = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, axis_name="batch", mode="batch")
    with raises("state", "eqx.nn.make_with_state(...)"):
        bn(X, other)


# ---------------------------------------------------------------- annotations


def test_functional_core_annotations_are_checked_and_reported_as_batch_norm_errors():
    # jaxtyping + beartype check the public functions at trace time (also outside the
    # pytest hook); a mismatch names the argument like every other error.
    x = jnp.ones((8, 4))
    with raises("var", "see the annotations of `normalize`"):
        ebn.normalize(x, jnp.zeros(4), jnp.ones(3))
    with raises("batch", "see the annotations of `update_running_average`"):
        ebn.update_running_average(jnp.zeros(4), jnp.ones(3), 0.9)


def test_call_refuses_a_list_for_x():
    bn, state = make(4)
    with raises("x", "`x=jnp.asarray(x)`", given="list"):
        bn([[1.0, 2.0, 3.0, 4.0]], state)
