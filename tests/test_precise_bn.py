"""recompute_statistics (precise BN) against a hand-written forward pass."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_batchnorm as ebn

EPS = 1e-3


class Counter(eqx.nn.StatefulLayer):
    """Another stateful layer: recompute_statistics must leave its state alone."""

    index: eqx.nn.StateIndex

    def __init__(self):
        self.index = eqx.nn.StateIndex(jnp.array(0))

    def __call__(self, x, state, *, key=None):
        return x, state.set(self.index, state.get(self.index) + 1)


class Block(eqx.Module):
    linear: eqx.nn.Linear
    bn: ebn.BatchNorm

    def __call__(self, x, state):
        return self.bn(jax.vmap(self.linear)(x), state)  # batched style: x is (B, F)


class Net(eqx.Module):
    """Nested modules, a list, several BatchNorms, dropout and another stateful layer."""

    blocks: list[Block]
    dropout: eqx.nn.Dropout
    counter: Counter

    def __init__(self, key, renorm=False):
        k = jax.random.split(key, 6)
        sizes = [(3, 5), (5, 4)]
        self.blocks = []
        for i, (n_in, n_out) in enumerate(sizes):
            bn = ebn.BatchNorm(n_out, epsilon=EPS, momentum=0.9, renorm=renorm)
            bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn,
                             (jax.random.uniform(k[2 * i], (n_out,), minval=0.5, maxval=2),
                              jax.random.normal(k[2 * i + 1], (n_out,))))
            self.blocks.append(Block(eqx.nn.Linear(n_in, n_out, key=k[4 + i]), bn))
        self.dropout = eqx.nn.Dropout(0.5)
        self.counter = Counter()

    def __call__(self, x, state, *, key=None):
        x, state = self.counter(x, state)
        for block in self.blocks:
            x, state = block(x, state)
            x = self.dropout(jax.nn.relu(x), key=key)
        return x, state


def _batches(n=5, size=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, (size, 3)) * jnp.array([1.0, 3.0, 0.5]) + 2.0
            for k in keys]


def _reference(model, batches):
    """Per layer: the list of (batch mean, batch variance, activations), in float64."""
    out = [[] for _ in model.blocks]
    for x in batches:
        x = np.asarray(x, np.float64)
        for i, block in enumerate(model.blocks):
            w, b = np.asarray(block.linear.weight), np.asarray(block.linear.bias)
            h = x @ w.T + b
            mu, var = h.mean(0), h.var(0)
            out[i].append((mu, var, h))
            x = np.maximum((h - mu) / np.sqrt(var + EPS) * np.asarray(block.bn.scale)
                           + np.asarray(block.bn.bias), 0)
    return out


def _trained(model, state):
    """Running statistics from training, which recompute_statistics must discard."""
    for i, x in enumerate(_batches(3, seed=9)):
        _, state = model(x * (i + 2), state, key=jax.random.key(i))
    return state


def test_batch_average_and_population_are_exact():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    state = _trained(model, state)
    counter_before = int(state.get(model.counter.index))
    batches = _batches()
    ref = _reference(model, batches)
    # Dropout stays off in an inference-mode model; BatchNorms are switched to training.
    frozen = eqx.nn.inference_mode(model)
    new = ebn.recompute_statistics(frozen, state, batches)
    pop = ebn.recompute_statistics(frozen, state, batches, estimator="population")
    for block, per_batch in zip(model.blocks, ref, strict=True):
        mus = np.stack([m for m, _, _ in per_batch])
        variances = np.stack([v for _, v, _ in per_batch])
        stats = new.get(block.bn.state_index)
        np.testing.assert_allclose(stats.mean, mus.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, variances.mean(0), rtol=1e-5)
        # With equal batch sizes, "population" is the variance of everything pooled.
        pooled = np.concatenate([h for _, _, h in per_batch])
        pop_stats = pop.get(block.bn.state_index)
        np.testing.assert_allclose(pop_stats.mean, pooled.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pop_stats.var, pooled.var(0), rtol=1e-5)
        assert not np.allclose(pop_stats.var, stats.var, rtol=1e-3)
    # Only the BatchNorm entries change, and the input state stays usable.
    assert int(new.get(model.counter.index)) == counter_before
    assert int(state.get(model.counter.index)) == counter_before


def test_result_does_not_depend_on_the_old_statistics_or_renorm():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0), renorm=True)
    frozen = eqx.nn.inference_mode(model)
    batches = _batches(3)
    fresh = ebn.recompute_statistics(frozen, state, batches)
    trained = ebn.recompute_statistics(frozen, _trained(model, state), batches)
    plain_model, plain_state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    plain = ebn.recompute_statistics(eqx.nn.inference_mode(plain_model), plain_state,
                                     batches)
    for block, plain_block in zip(model.blocks, plain_model.blocks, strict=True):
        a, b = fresh.get(block.bn.state_index), trained.get(block.bn.state_index)
        c = plain.get(plain_block.bn.state_index)
        for x, y in ((a, b), (a, c)):
            np.testing.assert_array_equal(x.mean, y.mean)
            np.testing.assert_array_equal(x.var, y.var)


def test_per_example_models_with_axis_name_or_call():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(2, 3, 3, key=k1),
        ebn.BatchNorm(3, axis=0, axis_name="batch", momentum=0.5),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Lambda(jnp.ravel),
        eqx.nn.Linear(3 * 2 * 2, 2, key=k2),
        ebn.BatchNorm(2, axis=0, axis_name="batch", momentum=0.5),
    ])
    batches = list(jax.random.normal(k3, (4, 8, 2, 4, 4)))
    by_name = ebn.recompute_statistics(model, state, batches, axis_name="batch")
    traces = []

    def call(model, batch, state):
        traces.append(None)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None),
                        out_axes=(0, None))(batch["x"], state)

    by_call = ebn.recompute_statistics(model, state, ({"x": b} for b in batches), call=call)
    assert len(traces) == 1  # one compiled step for every batch
    conv_out = [jax.vmap(model.layers[0])(b) for b in batches]
    first = by_name.get(model.layers[1].state_index)
    np.testing.assert_allclose(first.mean, np.mean([h.mean((0, 2, 3)) for h in conv_out], 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.var, np.mean([h.var((0, 2, 3)) for h in conv_out], 0),
                               rtol=1e-5)
    for layer in (model.layers[1], model.layers[5]):
        np.testing.assert_array_equal(by_name.get(layer.state_index).var,
                                      by_call.get(layer.state_index).var)


def test_max_batches_and_progress_bar(capfd, monkeypatch):
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    frozen = eqx.nn.inference_mode(model)
    batches = _batches(6)
    first3 = ebn.recompute_statistics(frozen, state, batches[:3])
    limited = ebn.recompute_statistics(frozen, state, iter(batches), max_batches=3,
                                       progress=True)
    index = model.blocks[1].bn.state_index
    np.testing.assert_array_equal(first3.get(index).var, limited.get(index).var)
    assert "recompute_statistics" in capfd.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    with pytest.warns(UserWarning, match="tqdm"):
        again = ebn.recompute_statistics(frozen, state, batches[:3], progress=True)
    np.testing.assert_array_equal(again.get(index).var, first3.get(index).var)


def test_errors():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    frozen = eqx.nn.inference_mode(model)
    with pytest.raises(ebn.BatchNormError, match="batches"):
        ebn.recompute_statistics(frozen, state, [])
    with pytest.raises(ebn.BatchNormError, match="estimator"):
        ebn.recompute_statistics(frozen, state, _batches(1), estimator="unbiased")
    with pytest.raises(ebn.BatchNormError, match="axis_name"):
        ebn.recompute_statistics(frozen, state, _batches(1), axis_name="batch",
                                 call=lambda m, x, s: m(x, s))
    with pytest.raises(ebn.BatchNormError, match="call"):
        ebn.recompute_statistics(frozen, state, _batches(1), call=lambda m, x, s: m(x, s)[0])
    # A BatchNorm the call never reaches cannot be recomputed: refused, not left at zero.
    with pytest.raises(ebn.BatchNormError, match=r"blocks\[1\]"):
        ebn.recompute_statistics(frozen, state, _batches(1),
                                 call=lambda m, x, s: m.blocks[0](x, s))
    linear, lin_state = eqx.nn.make_with_state(eqx.nn.Linear)(2, 2, key=jax.random.key(0))
    with pytest.raises(ebn.BatchNormError, match="BatchNorm"):
        ebn.recompute_statistics(linear, lin_state, _batches(1))
