"""Smoke test of the built wheel, installed alone in a clean environment.

Run by `.ci/run` with that environment's interpreter, from outside the source tree, so that
`import eqx_batchnorm` can only find the installed wheel. Checks: the package imports with
nothing but its runtime dependencies, ships `py.typed` and the version its metadata
declares; a jitted training step (`eqx.filter_jit`) updates parameters and running
statistics; inference uses the running statistics; an `eqx.tree_serialise_leaves` round
trip restores model and state bit for bit.
"""

import importlib.metadata
import importlib.util
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_batchnorm as ebn

package_dir = Path(ebn.__file__).resolve().parent
assert "site-packages" in package_dir.parts, f"not the installed wheel: {package_dir}"
assert (package_dir / "py.typed").is_file(), "the wheel lacks eqx_batchnorm/py.typed"
assert ebn.__version__ == importlib.metadata.version("eqx-batchnorm"), (
    ebn.__version__, importlib.metadata.version("eqx-batchnorm"))
requires = importlib.metadata.requires("eqx-batchnorm") or []
runtime = sorted(r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires
                 if "extra ==" not in r)
assert runtime == ["beartype", "equinox", "jax", "jaxtyping"], runtime
for test_only in ("flax", "optax", "torch", "pytest"):
    assert importlib.util.find_spec(test_only) is None, f"{test_only} is installed"


class Model(eqx.Module):
    linear: eqx.nn.Linear
    bn: ebn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(6, 16, key=k1)
        self.bn = ebn.BatchNorm(16, momentum=0.9)
        self.head = eqx.nn.Linear(16, 1, key=k2)

    def __call__(self, x, state, *, inference=None):
        h = jax.vmap(self.linear)(x)
        h, state = self.bn(h, state, inference=inference)
        return jax.vmap(self.head)(jax.nn.relu(h))[:, 0], state


model, state = eqx.nn.make_with_state(Model)(jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (64, 6)) * 3 + 2
target = x.sum(-1)


@eqx.filter_jit
def train_step(model, state, x, target):
    def loss(model, state):
        y, state = model(x, state)
        return jnp.mean((y - target) ** 2), state

    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -1e-3 * g, grads))
    return model, state, value


before = state.get(model.bn.state_index)
losses = []
for _ in range(5):
    model, state, value = train_step(model, state, x, target)
    losses.append(float(value))
after = state.get(model.bn.state_index)
assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
assert not np.allclose(after.mean, before.mean), "running mean did not move"

y_inf, state_inf = eqx.nn.inference_mode(model)(x, state)
assert y_inf.shape == (64,) and np.all(np.isfinite(y_inf))
np.testing.assert_array_equal(state_inf.get(model.bn.state_index).mean, after.mean)

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.eqx"
    eqx.tree_serialise_leaves(path, (model, state))
    skeleton = eqx.nn.make_with_state(Model)(jax.random.key(7))
    restored_model, restored_state = eqx.tree_deserialise_leaves(path, skeleton)
for a, b in zip(jax.tree.leaves((model, state)), jax.tree.leaves((restored_model,
                                                                  restored_state)),
                strict=True):
    np.testing.assert_array_equal(a, b)
y_restored, _ = eqx.nn.inference_mode(restored_model)(x, restored_state)
np.testing.assert_array_equal(y_restored, y_inf)

print(f"wheel smoke: eqx_batchnorm {ebn.__version__} from {package_dir}, "
      f"jax {jax.__version__}, equinox {importlib.metadata.version('equinox')}, "
      f"Python {sys.version.split()[0]}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, "
      "inference and serialisation round trip ok")
