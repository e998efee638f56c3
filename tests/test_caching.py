"""Repeated calls reuse JAX's caches: un-jitted calls do not recompile, and a jitted model
traces each distinct layer configuration once.

Counted with `jax.monitoring`'s compile event, never with timings.
"""

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn
import eqx_batchnorm._backend as backend

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
    count = [0]

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def offset_data(shape, offset, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape) + offset
    return jnp.asarray(x, jnp.float32)


@pytest.fixture(params=["cpu", "accelerator"])
def platform(request, monkeypatch):
    monkeypatch.setattr(backend, "platform", lambda: request.param)
    return request.param


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset"])
@pytest.mark.parametrize("style", ["training", "inference", "masked", "renorm"])
def test_repeated_eager_calls_do_not_compile_again(platform, style, offset):
    # The offset data takes the CPU variance's refinement branch of `lax.cond`.
    kwargs = {"renorm": True} if style == "renorm" else {}
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3, momentum=0.9, **kwargs)
    if style == "inference":
        bn = eqx.nn.inference_mode(bn)
    mask = jnp.arange(16)[:, None] % 3 != 0 if style == "masked" else None
    x = offset_data((16, 3), offset)
    y, state = bn(x, state, mask=mask)  # the first call compiles
    with counting_compiles() as count:
        for seed in range(1, 4):
            y, state = bn(offset_data((16, 3), offset, seed), state, mask=mask)
    jax.block_until_ready(y)
    assert count[0] == 0


def test_repeated_eager_gradients_do_not_compile_again(platform):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(3)

    def loss(bn, x, state):
        y, state = bn(x, state)
        return jnp.sum(y**3), state

    grad = eqx.filter_grad(loss, has_aux=True)
    _, state = grad(bn, offset_data((16, 3), 1e4), state)
    with counting_compiles() as count:
        for seed in range(1, 3):
            _, state = grad(bn, offset_data((16, 3), 1e4, seed), state)
    assert count[0] == 0


def test_repeated_functional_core_calls_do_not_compile_again(platform):
    x = offset_data((16, 3), 1e4)
    stats = ebn.batch_statistics(x)
    ebn.normalize(x, stats.mean, stats.var)
    with counting_compiles() as count:
        for seed in range(1, 3):
            x = offset_data((16, 3), 1e4, seed)
            stats = ebn.batch_statistics(x)
            ebn.normalize(x, stats.mean, stats.var)
    assert count[0] == 0


def test_a_deep_model_traces_each_layer_configuration_once():
    # 12 identical layers: the layer's kernel is traced once, so the jaxpr of the whole
    # model holds one call per layer rather than each layer's equations.
    layers, state = eqx.nn.make_with_state(lambda: [ebn.BatchNorm(4) for _ in range(12)])()

    def model(layers, state, x):
        for bn in layers:
            x, state = bn(x, state)
        return x, state

    x = offset_data((8, 4), 0.0)
    jaxpr, _, _ = eqx.filter_make_jaxpr(model)(layers, state, x)
    kernels = [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    assert len(kernels) == 12
    assert len({id(e.params["jaxpr"]) for e in kernels}) == 1
