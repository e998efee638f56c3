"""Converters against real Flax, real PyTorch and eqx.nn.BatchNorm."""

import json

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import record_torch_golden as golden

import eqx_batchnorm as ebn

KEY = jax.random.key(0)


def _normal(shape, seed, loc=0.0, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale + loc


# ----------------------------------------------------------------------------- Flax


def _trained_flax(module, x, steps=3):
    variables = module.init(KEY, x, use_running_average=False)
    params = jax.tree.map(lambda p: p + _normal(p.shape, 5, 0.0, 0.3).astype(p.dtype),
                          variables.get("params", {}))
    stats = variables["batch_stats"]
    for i in range(steps):
        _, upd = module.apply({"params": params, "batch_stats": stats}, x * (1 + i),
                              use_running_average=False, mutable=["batch_stats"])
        stats = upd["batch_stats"]
    return {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}


@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, True), (False, True),
                                                      (False, False)])
def test_flax_round_trip_inference_and_training(use_scale, use_bias, clone):
    x = _normal((6, 5, 4), 1, 2.0, 3.0)
    module = nn.BatchNorm(momentum=0.8, epsilon=1e-4, use_scale=use_scale,
                          use_bias=use_bias)
    variables = _trained_flax(module, x)
    bn, state = ebn.from_flax(variables, momentum=0.8, epsilon=1e-4)
    assert (bn.scale is not None, bn.bias is not None) == (use_scale, use_bias)

    y, _ = bn(x, clone(state), inference=True)
    y_ref = module.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    # Training continues exactly as in Flax.
    y, new_state = bn(x, clone(state))
    y_ref, upd = module.apply(variables, x, use_running_average=False,
                              mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new_state.get(bn.state_index).var,
                               upd["batch_stats"]["var"], rtol=1e-6)

    back = ebn.to_flax(bn, state)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_to_flax_after_training_here_runs_in_flax(clone):
    x = _normal((8, 3, 3, 2), 2, -1.0, 2.0)
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)((3, 2), axis=(1, 3), momentum=0.5,
                                                      param_dtype=jnp.bfloat16)
    bn = eqx.tree_at(lambda b: b.scale, bn, jnp.full((3, 2), 1.5, jnp.bfloat16))
    for i in range(2):
        _, state = bn(x + i, state)
    variables = ebn.to_flax(bn, state)
    assert variables["params"]["scale"].dtype == jnp.bfloat16
    y_ref = nn.BatchNorm(axis=(1, 3), param_dtype=jnp.bfloat16).apply(
        variables, x, use_running_average=True)
    y, _ = bn(x, clone(state), inference=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    # ... and back, with the multi-axis layout and the dtype preserved.
    bn2, state2 = ebn.from_flax(variables, axis=(1, 3))
    assert bn2.feature_shape == (3, 2) and bn2.param_dtype == jnp.bfloat16
    np.testing.assert_array_equal(bn2(x, state2, inference=True)[0], y)


def test_from_flax_errors():
    x = _normal((4, 3, 2), 3)
    variables = nn.BatchNorm(axis=(1, 2)).init(KEY, x, use_running_average=False)
    with pytest.raises(ebn.BatchNormError, match="axis"):
        ebn.from_flax(variables)  # two feature axes need `axis=`
    with pytest.raises(ebn.BatchNormError, match="use_scale"):
        ebn.from_flax(variables, axis=(1, 2), use_scale=False)
    with pytest.raises(ebn.BatchNormError, match="batch_stats"):
        ebn.from_flax({"params": variables["params"]})
    with pytest.raises(ebn.BatchNormError, match="variables"):
        ebn.from_flax([variables])
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(ebn.BatchNormError, match="from_equinox"):
        ebn.to_flax(bn, state)


# ----------------------------------------------------------------------------- PyTorch
# Against real PyTorch through golden files it recorded (tests/record_torch_golden.py, whose
# `--check` mode runs the same assertions against live PyTorch): PyTorch is no dependency.


@pytest.mark.parametrize("name", sorted(golden.CASES))
def test_torch_golden_eval_and_train_outputs(name):
    arrays = golden.load(f"torch_{name}.npz")
    assert json.loads(str(arrays["meta"]))["cls"] == golden.CASES[name]["cls"]
    golden.check_case(arrays)


def test_torch_golden_state_dict_arrays_of_every_kind():
    """NumPy arrays (as loaded), JAX arrays, and the int64 `num_batches_tracked` scalar."""
    sd = golden.state_dict(golden.load("torch_bn2d.npz"))
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"] == 3
    bn_np, state_np = ebn.from_torch(sd)
    bn_jax, state_jax = ebn.from_torch({k: jnp.asarray(v) for k, v in sd.items()})
    for a, b in [(bn_np.scale, bn_jax.scale), (bn_np.bias, sd["bias"]),
                 (state_np.get(bn_np.state_index).var, sd["running_var"]),
                 (state_jax.get(bn_jax.state_index).mean, sd["running_mean"])]:
        np.testing.assert_array_equal(a, b)


def test_torch_golden_prefix_and_refusals():
    golden.check_model_dicts(golden.load("torch_model_dicts.npz"))


def test_torch_golden_refusal_messages():
    arrays = golden.load("torch_model_dicts.npz")
    with pytest.raises(ebn.BatchNormError, match="prefix"):
        ebn.from_torch(golden.state_dict(arrays, "sequential"))
    with pytest.raises(ebn.BatchNormError, match="track_running_stats"):
        ebn.from_torch(golden.state_dict(arrays, "untracked"))


def test_torch_golden_digits_cnn_port():
    """The model that notebooks/porting.ipynb ports: trained by PyTorch, its logits on all
    1797 digits are reproduced by the Equinox port."""
    golden.check_model(golden.load("torch_digits_cnn.npz"), golden.digits()[0])


# ----------------------------------------------------------------------------- Equinox


def _vmapped(layer):
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


@pytest.mark.parametrize("mode", ["ema", "batch"])
@pytest.mark.parametrize("steps", [0, 3])
def test_equinox_inference_output_is_reproduced(mode, steps):
    eqx_bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", momentum=0.9,
                                                             mode=mode, eps=1e-3)
    eqx_bn = eqx.tree_at(lambda b: (b.weight, b.bias), eqx_bn,
                         (jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, -1.0, 1.0])))
    for i in range(steps):
        _, state = _vmapped(eqx_bn)(_normal((8, 3, 4), i, 2.0, 3.0), state)
    x = _normal((8, 3, 4), 10, 2.0, 3.0)
    y_ref, state = _vmapped(eqx.nn.inference_mode(eqx_bn))(x, state)
    bn, new_state = ebn.from_equinox(eqx_bn, state)
    assert (bn.axis, bn.axis_name, bn.epsilon, bn.momentum) == (0, "batch", 1e-3, 0.9)
    y, _ = _vmapped(eqx.nn.inference_mode(bn))(x, new_state)
    if steps == 0 and mode == "ema":
        # Equinox normalises with its uninitialised (zero) buffers; so does the copy.
        assert float(jnp.abs(y_ref).max()) > 10
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_equinox_without_affine_and_batched_override():
    eqx_bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", channelwise_affine=False, mode="batch", momentum=0.5)
    _, state = _vmapped(eqx_bn)(_normal((8, 3, 2), 1, 1.0, 2.0), state)
    x = _normal((8, 3, 2), 2)
    y_ref, state = _vmapped(eqx.nn.inference_mode(eqx_bn))(x, state)
    bn, new_state = ebn.from_equinox(eqx_bn, state, axis=1, axis_name=None)
    assert bn.scale is None and bn.bias is None
    np.testing.assert_allclose(bn(x, new_state, inference=True)[0], y_ref, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ebn.BatchNormError, match="eqx_bn"):
        ebn.from_equinox(bn, new_state)


def test_converted_layers_assemble_into_a_model():
    """The converted statistics are the layer's initial state: `make_with_state` over a
    model built from converted layers gives a state holding them."""
    stats = {"mean": jnp.array([1.0, -2.0]), "var": jnp.array([4.0, 0.25])}
    bn_a, _ = ebn.from_flax({"params": {"scale": jnp.array([2.0, 1.0])}, "batch_stats": stats},
                            axis=0)
    bn_b, _ = ebn.from_flax({"batch_stats": {"mean": -stats["mean"], "var": stats["var"]}},
                            axis=0)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([bn_a, bn_b])
    np.testing.assert_array_equal(state.get(model.layers[0].state_index).var, stats["var"])
    np.testing.assert_array_equal(state.get(model.layers[1].state_index).mean, -stats["mean"])
    x = jnp.array([3.0, 0.0])
    y, _ = eqx.nn.inference_mode(model)(x, state)
    h = (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * jnp.array([2.0, 1.0])
    np.testing.assert_allclose(y, (h + stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5),
                               rtol=1e-6)


def test_every_converter_refuses_num_features():
    eqx_bn, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema")
    with pytest.raises(ebn.BatchNormError, match=r"`num_features`.*drop `num_features=`"):
        ebn.from_equinox(eqx_bn, eqx_state, num_features=3)
