"""Scan over layers: blocks holding `BatchNorm`s stacked along a leading axis and applied
with `jax.lax.scan`, in both calling styles, against the same blocks unrolled, against
Flax's `nn.scan`, and with the plain Equinox spelling; the layer under differentiated
control flow (`scan`, `while_loop`, `cond`, `remat`, `custom_vjp`, `linearize`), each
program also run with `eqx.nn.BatchNorm`; and what the library's other functions do with
a scanned model."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import eqx_batchnorm as ebn

C, DEPTH, EPS = 6, 3, 1e-5


class Batched(eqx.Module):
    """BatchNorm, relu and a 1x1 convolution (a matrix), channels last."""

    bn: ebn.BatchNorm
    w: jax.Array

    def __init__(self, key, dtype=None):
        self.bn = ebn.BatchNorm(C, momentum=0.8, dtype=dtype)
        self.w = jax.random.normal(key, (C, C)) / np.sqrt(C)

    def __call__(self, x, state):
        y, state = self.bn(x, state)
        return (jax.nn.relu(y) @ self.w).astype(x.dtype), state


class PerExample(eqx.Module):
    """The same block on one example, channels first, as Equinox models are written."""

    bn: ebn.BatchNorm
    conv: eqx.nn.Conv2d

    def __init__(self, key, dtype=None):
        self.bn = ebn.BatchNorm(C, axis=0, axis_name="batch", momentum=0.8, dtype=dtype)
        self.conv = eqx.nn.Conv2d(C, C, 1, use_bias=False, key=key)

    def __call__(self, x, state):
        y, state = self.bn(x, state)
        return self.conv(jax.nn.relu(y).astype(self.conv.weight.dtype)).astype(x.dtype), state


class Unrolled(eqx.Module):
    """The blocks one after the other, each with its own state entry."""

    blocks: list

    def __init__(self, block, keys, dtype=None):
        self.blocks = [block(k, dtype) for k in keys]

    def __call__(self, x, state):
        for block in self.blocks:
            x, state = block(x, state)
        return x, state


STYLES = {"batched": (Batched, None), "per_example": (PerExample, "batch")}


def _keys():
    return jax.random.split(jax.random.key(0), DEPTH)


def _data(style, dtype=jnp.float32, seed=1):
    shape = (8, 3, 3, C) if style == "batched" else (8, C, 3, 3)
    return (jax.random.normal(jax.random.key(seed), shape) * 2 + 1).astype(dtype)


def _apply(model, axis_name):
    if axis_name is None:
        return model
    return jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def _scanned(style, dtype=None):
    block, _ = STYLES[style]
    keys = jax.random.key(0)
    return ebn.stack_blocks(lambda k: block(k, dtype), DEPTH, keys)


def _unrolled(style, dtype=None):
    block, _ = STYLES[style]
    return eqx.nn.make_with_state(Unrolled)(block, _keys(), dtype)


def _stacked_stats(model, state):
    """The unrolled model's running statistics, stacked like a scanned model's."""
    stats = [state.get(b.bn.state_index) for b in model.blocks]
    return (jnp.stack([s.mean for s in stats]), jnp.stack([s.var for s in stats]))


def _scanned_loss(style):
    axis_name = STYLES[style][1]

    def loss(blocks, state, x):
        y, state = ebn.scan_blocks(blocks, state, x, axis_name=axis_name)
        return jnp.mean(jnp.sin(y.astype(jnp.float32)) * y), (y, state)

    return loss


def _unrolled_loss(style):
    axis_name = STYLES[style][1]

    def loss(model, state, x):
        y, state = _apply(model, axis_name)(x, state)
        return jnp.mean(jnp.sin(y.astype(jnp.float32)) * y), (y, state)

    return loss


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def test_stacked_blocks_hold_the_blocks_built_alone():
    blocks, state = _scanned("per_example")
    stats = state.get(blocks.bn.state_index)
    assert stats.mean.shape == stats.var.shape == (DEPTH, C)
    assert blocks.conv.weight.shape == (DEPTH, C, C, 1, 1)
    model, _ = _unrolled("per_example")
    for i, block in enumerate(model.blocks):
        np.testing.assert_array_equal(blocks.conv.weight[i], block.conv.weight)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("style", list(STYLES))
def test_scanned_equals_unrolled(style, dtype):
    # Same outputs, gradients and running statistics: float32 to 1e-6, bfloat16 to
    # within its rounding (the blocks' outputs are bfloat16; the statistics float32).
    out_dtype = None if dtype == jnp.float32 else jnp.bfloat16
    x = _data(style, dtype)
    blocks, state = _scanned(style, out_dtype)
    model, ustate = _unrolled(style, out_dtype)
    grad = eqx.filter_jit(eqx.filter_value_and_grad(_scanned_loss(style), has_aux=True))
    ugrad = eqx.filter_jit(eqx.filter_value_and_grad(_unrolled_loss(style), has_aux=True))
    (value, (y, new)), grads = grad(blocks, state, x)
    (uvalue, (uy, unew)), ugrads = ugrad(model, ustate, x)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert y.dtype == uy.dtype == dtype
    _close(value, uvalue, tol)
    _close(y, uy, tol)
    stats = new.get(blocks.bn.state_index)
    for got, want in zip((stats.mean, stats.var), _stacked_stats(model, unew), strict=True):
        _close(got, want, 1e-6 if dtype == jnp.float32 else 2e-3)
    for i, ublock in enumerate(ugrads.blocks):
        block = jax.tree.map(lambda a, i=i: a[i], grads)
        for got, want in zip(jax.tree.leaves(block), jax.tree.leaves(ublock), strict=True):
            _close(got, want, 1e-5 if dtype == jnp.float32 else 3e-2)


@pytest.mark.parametrize("style", list(STYLES))
def test_trained_scanned_model_evaluates_as_the_unrolled_one(style):
    x = _data(style)
    blocks, state = _scanned(style)
    model, ustate = _unrolled(style)

    @eqx.filter_jit
    def step(model, state, x, loss):
        (_, (_, state)), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state, x)
        return eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads)), state

    for i in range(2):
        xi = _data(style, seed=10 + i)
        blocks, state = step(blocks, state, xi, _scanned_loss(style))
        model, ustate = step(model, ustate, xi, _unrolled_loss(style))
    axis_name = STYLES[style][1]
    y, _ = ebn.scan_blocks(eqx.nn.inference_mode(blocks), state, x, axis_name=axis_name)
    uy, _ = _apply(eqx.nn.inference_mode(model), axis_name)(x, ustate)
    _close(y, uy, 1e-5)


def test_scanned_equals_flax_nn_scan():
    class FlaxBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            y = nn.BatchNorm(use_running_average=False, momentum=0.8, epsilon=EPS)(x)
            w = self.param("w", nn.initializers.lecun_normal(), (C, C))
            return jax.nn.relu(y) @ w, None

    stack = nn.scan(FlaxBlock, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=DEPTH)()
    x = _data("batched")
    variables = stack.init(jax.random.key(5), x, None)
    blocks, state = _scanned("batched")
    # Flax's model with our blocks' numbers.
    params = {"w": blocks.w, "BatchNorm_0": {"scale": blocks.bn.scale, "bias": blocks.bn.bias}}
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, variables["params"])
    stats = state.get(blocks.bn.state_index)
    variables = {"params": params, "batch_stats": {"BatchNorm_0": {"mean": stats.mean,
                                                                   "var": stats.var}}}

    def flax_loss(params, batch_stats, x):
        (y, _), new = stack.apply({"params": params, "batch_stats": batch_stats}, x, None,
                                  mutable=["batch_stats"])
        return jnp.mean(jnp.sin(y) * y), (y, new["batch_stats"]["BatchNorm_0"])

    (fvalue, (fy, fstats)), fgrads = jax.value_and_grad(flax_loss, has_aux=True)(
        variables["params"], variables["batch_stats"], x)
    (value, (y, new)), grads = eqx.filter_value_and_grad(_scanned_loss("batched"),
                                                         has_aux=True)(blocks, state, x)
    _close(value, fvalue, 1e-6)
    _close(y, fy, 1e-5)
    new_stats = new.get(blocks.bn.state_index)
    _close(new_stats.mean, fstats["mean"], 1e-6)
    _close(new_stats.var, fstats["var"], 1e-6)
    _close(grads.w, fgrads["w"], 1e-5)
    _close(grads.bn.scale, fgrads["BatchNorm_0"]["scale"], 1e-5)
    _close(grads.bn.bias, fgrads["BatchNorm_0"]["bias"], 1e-5)


@pytest.mark.parametrize("style", list(STYLES))
def test_plain_equinox_spelling_gives_the_helpers_numbers(style):
    # No helper: eqx.filter_vmap over keys of make_with_state, then lax.scan over
    # (parameters, state), the static part closed over.
    block, axis_name = STYLES[style]
    keys = jax.random.split(jax.random.key(0), DEPTH)
    blocks, state = eqx.filter_vmap(lambda k: eqx.nn.make_with_state(block)(k))(keys)
    params, static = eqx.partition(blocks, eqx.is_array)

    @eqx.filter_jit
    def forward(params, state, x):
        def body(x, params_and_state):
            p, s = params_and_state
            return _apply(eqx.combine(p, static), axis_name)(x, s)

        return lax.scan(body, x, (params, state))

    x = _data(style)
    y, new = forward(params, state, x)
    blocks2, state2 = _scanned(style)
    y2, new2 = ebn.scan_blocks(blocks2, state2, x, axis_name=axis_name)
    np.testing.assert_array_equal(y, y2)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new2), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# The per-example layer inside differentiated control flow, next to Equinox's layer


def _layers():
    """(ours, its state) and (Equinox's layer, its state): the same per-example layer."""
    ours = eqx.nn.make_with_state(ebn.BatchNorm)(C, axis=0, axis_name="batch")
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch", mode="batch")
    return {"ours": ours, "eqx": theirs}


def _vmapped(layer):
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def _score(y):
    # Not the mean square: that of a normalised output does not depend on `x`.
    return jnp.mean(jnp.sin(y) * y)


def _programs():
    """Programs around the per-example layer `f(x, state) -> (y, state)`, each a
    scalar function of `x` to differentiate."""
    def scan(f, x, state):
        (y, _), _ = lax.scan(lambda c, _: (f(*c), None), (x, state), None, length=2)
        return _score(y)

    def while_loop(f, x, state):
        y, _, _ = lax.while_loop(lambda c: c[2] < 2, lambda c: (*f(c[0], c[1]), c[2] + 1),
                                 (x, state, 0))
        return _score(y)

    def cond(f, x, state):
        y, _ = lax.cond(x.sum() > -1e9, f, lambda x, s: (x, s), x, state)
        return _score(y)

    def remat(f, x, state):
        return jax.checkpoint(lambda x: _score(f(x, state)[0]))(x)

    def custom_vjp(f, x, state):
        @jax.custom_vjp
        def g(x):
            return _score(f(x, state)[0])

        def fwd(x):
            return jax.vjp(g.__wrapped__, x)

        def bwd(vjp, ct):
            return vjp(ct)

        g.defvjp(fwd, bwd)
        return g(x)

    def scan_of_remat(f, x, state):
        body = jax.checkpoint(lambda c: f(*c))
        (y, _), _ = lax.scan(lambda c, _: (body(c), None), (x, state), None, length=2)
        return _score(y)

    return {"scan": scan, "while_loop": while_loop, "cond": cond, "remat": remat,
            "custom_vjp": custom_vjp, "scan_of_remat": scan_of_remat}


def _derivative(name, program, f, state, x):
    # Forward mode along a random direction (along ones, a normalised output is constant).
    direction = jax.random.normal(jax.random.key(7), x.shape)
    if name == "while_loop":  # not reverse-differentiable: forward mode, as JAX allows
        return jax.jvp(lambda x: program(f, x, state), (x,), (direction,))[1]
    if name == "linearize":
        _, lin = jax.linearize(lambda x: _score(f(x, state)[0]), x)
        return lin(direction)
    return jax.grad(lambda x: program(f, x, state))(x)


@pytest.mark.parametrize("name", [*_programs(), "linearize"])
def test_layer_differentiates_inside_control_flow_as_equinox_does(name):
    # Under `eqx.filter_jit` (eagerly too, for the scan: the next test).
    program = _programs().get(name)
    x = _data("per_example")
    got = {}
    for which, (layer, state) in _layers().items():
        def run(x, state, layer=layer):
            return _derivative(name, program, _vmapped(layer), state, x)

        got[which] = eqx.filter_jit(run)(x, state)
    _close(got["ours"], got["eqx"], 1e-4)


def test_the_minimal_grad_of_scan_trains_eagerly_and_jitted():
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, axis=0, axis_name="batch")

    def loss(x):
        (y, _), _ = lax.scan(lambda c, _: (_vmapped(bn)(*c), None), (x, state), None,
                             length=2)
        return _score(y[0])

    x = _data("per_example")
    g = jax.grad(loss)(x)
    np.testing.assert_allclose(eqx.filter_jit(jax.grad(loss))(x), g, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(g)) and np.any(g != 0)


# ---------------------------------------------------------------------------------------
# The library's other functions on a scanned model


def test_serialised_scanned_model_loads_bit_for_bit(tmp_path):
    blocks, state = _scanned("per_example")
    _, state = ebn.scan_blocks(blocks, state, _data("per_example"), axis_name="batch")
    eqx.tree_serialise_leaves(tmp_path / "m.eqx", (blocks, state))
    like = ebn.stack_blocks(lambda k: PerExample(k), DEPTH, jax.random.key(9))
    loaded = eqx.tree_deserialise_leaves(tmp_path / "m.eqx", like)
    for a, b in zip(jax.tree.leaves((blocks, state)), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("estimator", ["batch_average", "population"])
def test_recompute_statistics_of_a_scanned_model_equals_the_unrolled_ones(estimator):
    batches = [_data("per_example", seed=20 + i) for i in range(3)]
    blocks, state = _scanned("per_example")
    model, ustate = _unrolled("per_example")
    new = ebn.recompute_statistics(
        blocks, state, batches, estimator=estimator,
        call=lambda m, x, s: ebn.scan_blocks(m, s, x, axis_name="batch"))
    unew = ebn.recompute_statistics(model, ustate, batches, axis_name="batch",
                                    estimator=estimator)
    stats = new.get(blocks.bn.state_index)
    for got, want in zip((stats.mean, stats.var), _stacked_stats(model, unew), strict=True):
        _close(got, want, 1e-6)


def test_per_layer_functions_name_the_stacked_state_and_work_per_block():
    keys = jax.random.split(jax.random.key(0), DEPTH)
    seq, state = eqx.filter_vmap(lambda k: eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(C, C, 1, key=k), ebn.BatchNorm(C, axis=0, axis_name="batch"),
        eqx.nn.Lambda(jax.nn.relu)]))(keys)
    x = _data("per_example")
    _, state = ebn.scan_blocks(seq, state, x, axis_name="batch")
    fix = (r"this is the state of blocks stacked \(3,\) \(a scanned model\): apply the "
           r"blocks with `ebn.scan_blocks\(blocks, state, x\)`")
    with pytest.raises(ebn.BatchNormError, match=fix + r".*`eqx.filter_vmap\(ebn."
                                                      r"fold_sequential\)\(blocks, state\)`"):
        ebn.fold_sequential(seq, state)
    with pytest.raises(ebn.BatchNormError, match=fix + r".*eqx.filter_vmap\(ebn.to_flax\)"):
        ebn.to_flax(seq.layers[1], state)
    with pytest.raises(ebn.BatchNormError, match=fix + r" \(or inside `jax.lax.scan`\)$"):
        seq.layers[1](x[0], state)  # a stacked layer called as one

    folded = eqx.filter_vmap(ebn.fold_sequential)(seq, state)  # per block
    y, _ = ebn.scan_blocks(eqx.nn.inference_mode(seq), state, x, axis_name="batch")
    yf, _ = ebn.scan_blocks(folded, eqx.nn.State(folded), x,
                            call=lambda block, x, s: (jax.vmap(block)(x), s))
    _close(yf, y, 1e-5)


def test_from_equinox_model_converts_a_scanned_equinox_model_per_block():
    keys = jax.random.split(jax.random.key(0), DEPTH)
    seq, state = eqx.filter_vmap(lambda k: eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(C, C, 1, key=k), eqx.nn.BatchNorm(C, "batch", mode="batch")]))(keys)
    x = _data("per_example")
    _, state = ebn.scan_blocks(seq, state, x, axis_name="batch")
    ours, ours_state = eqx.filter_vmap(ebn.from_equinox_model)(seq, state)
    assert isinstance(ours.layers[1], ebn.BatchNorm)
    y, _ = ebn.scan_blocks(eqx.nn.inference_mode(ours), ours_state, x, axis_name="batch")
    y_eqx, _ = ebn.scan_blocks(eqx.nn.inference_mode(seq), state, x, axis_name="batch")
    _close(y, y_eqx, 1e-4)  # Equinox's layer divides where ours multiplies by rsqrt


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_stack_blocks_refuses_a_bad_count(n):
    with pytest.raises(ebn.BatchNormError, match=r"`n`: expected a positive int"):
        ebn.stack_blocks(Batched, n, jax.random.key(0))


def test_stack_blocks_refuses_what_is_not_callable_or_a_key():
    with pytest.raises(ebn.BatchNormError, match=r"`make_block`: expected a function"):
        ebn.stack_blocks(Batched.__name__, 2, jax.random.key(0))
    with pytest.raises(ebn.BatchNormError, match=r"`key`: expected a PRNG key"):
        ebn.stack_blocks(Batched, 2, "seed")


def test_scan_blocks_refuses_what_cannot_be_scanned():
    blocks, state = _scanned("batched")
    x = _data("batched")
    with pytest.raises(ebn.BatchNormError, match=r"`state`: expected the stacked "):
        ebn.scan_blocks(blocks, {"mean": 0}, x)
    with pytest.raises(ebn.BatchNormError, match=r"`axis_name`: expected no value when "):
        ebn.scan_blocks(blocks, state, x, axis_name="batch", call=lambda b, x, s: b(x, s))
    short = eqx.tree_at(lambda b: b.w, blocks, blocks.w[:2])
    with pytest.raises(ebn.BatchNormError, match=r"`blocks`: expected blocks and a state "
                                                 r"stacked along one leading axis"):
        ebn.scan_blocks(short, state, x)
    with pytest.raises(ebn.BatchNormError, match=r"`call`: expected a function returning "):
        ebn.scan_blocks(blocks, state, x, call=lambda b, x, s: b(x, s)[0])
    wide = eqx.tree_at(lambda b: b.w, blocks, jnp.ones((DEPTH, C, 2 * C)))
    with pytest.raises(ebn.BatchNormError, match=r"`blocks`: expected blocks whose output "
                                                 r"has the shape and dtype of their input"):
        ebn.scan_blocks(wide, state, x)
