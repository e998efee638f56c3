"""Checkpoints written by release 0.1.0, for the compatibility test `tests/test_checkpoints.py`.

Recorded with the package as of commit 1f134f1 (release 0.1.0, before the package's modules
were reorganised). For each configuration in `CONFIGS` this script builds the model with a
fixed key, trains it a few steps (SGD on the parameters, running statistics updated), and
writes under `tests/golden/checkpoints/`:

- `<name>.eqx`: `eqx.tree_serialise_leaves((model, state))`, as a user's checkpoint;
- `<name>.npz`: the test input `x`; the saved parameters and running statistics by name
  (`leaf/...`); the outputs `y` and the new running `mean` and `var` of a training call
  (`train/...`) and of an inference call (`inference/...`); the dtype of every array
  (bfloat16 arrays are stored as float32, which holds them exactly); and the version that
  recorded them.

The test builds each configuration afresh with the same constructor arguments (and other
numbers in every leaf), loads the `.eqx` file into it, and requires the recorded numbers.

Record again (only to add a configuration: the point is that these files come from the old
release; the existing ones come out byte for byte the same), from the repository root, with
the old package ahead of this checkout's on the path (the script refuses to record from this
checkout unless told `--current`):

    git worktree add --detach /tmp/old 1f134f1
    PYTHONPATH=/tmp/old uv run python tests/record_checkpoint_fixture.py
    git worktree remove /tmp/old
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_batchnorm as ebn

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "golden" / "checkpoints"
RECORD_KEY = 0  # the key the recorded models were built with
TRAIN_STEPS = 4
LEARNING_RATE = 0.1

# Everything here uses only the public API that release 0.1.0 already had, so that the same
# code builds the model for the old release (recording) and the current one (loading).
#
# name -> constructor arguments of the layer (or "sequential": the small conv model), the
# shape and dtype of a batch, and whether the model is saved in inference mode (the
# `inference` flag is a leaf of the checkpoint too).
CONFIGS: dict[str, dict[str, Any]] = {
    # A default layer, channels last.
    "default": dict(kwargs=dict(num_features=8), x_shape=(4, 3, 3, 8), x_dtype="float32"),
    # Half-precision parameters and running statistics; no bias leaf.
    "bf16_no_bias": dict(
        kwargs=dict(num_features=6, use_bias=False, param_dtype=jnp.bfloat16,
                    force_float32_reductions=False, momentum=0.9),
        x_shape=(16, 6), x_dtype="bfloat16"),
    # Two feature axes; saved in inference mode.
    "multi_axis": dict(
        kwargs=dict(num_features=(3, 4), axis=(1, 2), momentum=0.9),
        x_shape=(6, 3, 4, 5), x_dtype="float32", save_inference=True),
    # Batch renormalisation, with bounds that clip.
    "renorm": dict(
        kwargs=dict(num_features=5, renorm=True, renorm_r_max=1.5, renorm_d_max=0.5,
                    momentum=0.8),
        x_shape=(12, 5), x_dtype="float32"),
    # Conv2d -> BatchNorm -> ReLU in `eqx.nn.Sequential`, per example under
    # `jax.vmap(axis_name="batch")`, channels first.
    "sequential": dict(kwargs=None, x_shape=(4, 3, 5, 5), x_dtype="float32"),
    # Float64 parameters under `jax_enable_x64` (`x64`: recorded and loaded with it on);
    # release 0.1.0 kept their running statistics in float32.
    "float64_x64": dict(kwargs=dict(num_features=5, param_dtype=jnp.float64, momentum=0.9),
                        x_shape=(10, 5), x_dtype="float64", x64=True),
}


def build(name: str, key: jax.Array) -> tuple[Any, eqx.nn.State]:
    """A fresh model and state of configuration `name` (the checkpoint's `like`)."""
    kwargs = CONFIGS[name]["kwargs"]
    if kwargs is not None:
        return eqx.nn.make_with_state(ebn.BatchNorm)(**kwargs, key=key)
    return eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(3, 4, 3, padding=1, key=key),
        ebn.BatchNorm(4, axis=0, axis_name="batch"),
        eqx.nn.Lambda(jax.nn.relu),
    ])


def batch_norm(name: str, model: Any) -> Any:
    """The configuration's `ebn.BatchNorm` layer."""
    return model if CONFIGS[name]["kwargs"] is not None else model.layers[1]


def forward(name: str, model: Any, state: eqx.nn.State, x: jax.Array,
            inference: bool) -> tuple[jax.Array, eqx.nn.State]:
    """One call of the model, in training or in inference mode."""
    model = eqx.nn.inference_mode(model, inference)
    if CONFIGS[name]["kwargs"] is not None:
        return model(x, state)
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


def running(name: str, model: Any, state: eqx.nn.State) -> tuple[jax.Array, jax.Array]:
    stats = state.get(batch_norm(name, model).state_index)
    return stats.mean, stats.var


def named_leaves(name: str, model: Any, state: eqx.nn.State) -> dict[str, Any]:
    """The checkpoint's parameters and running statistics, by where they live."""
    bn = batch_norm(name, model)
    leaves = {"scale": bn.scale, "bias": bn.bias}
    if CONFIGS[name]["kwargs"] is None:
        conv = model.layers[0]
        leaves |= {"conv_weight": conv.weight, "conv_bias": conv.bias}
    leaves["mean"], leaves["var"] = running(name, model, state)
    return {k: v for k, v in leaves.items() if v is not None}


def clone(state: eqx.nn.State) -> eqx.nn.State:
    """A copy of a state (a state can be consumed only once)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def input_batch(name: str) -> jax.Array:
    return _batch(name, jax.random.key(1000))


def _batch(name: str, key: jax.Array) -> jax.Array:
    config = CONFIGS[name]
    x = jax.random.normal(key, config["x_shape"]) * 2.0 + 1.5
    return x.astype(config["x_dtype"])


def _train(name: str, model: Any, state: eqx.nn.State) -> tuple[Any, eqx.nn.State]:
    """A few SGD steps in training mode: parameters and running statistics move."""

    @eqx.filter_value_and_grad(has_aux=True)
    def loss(model, state, x, key):
        y, state = forward(name, model, state, x, inference=False)
        target = jax.random.normal(key, y.shape)
        return jnp.sum(jnp.sin(2.0 * y.astype(jnp.float32)) * target), state

    key = jax.random.key(RECORD_KEY + 1)
    for _ in range(TRAIN_STEPS):
        key, kx, kt = jax.random.split(key, 3)
        (_, state), grads = loss(model, state, _batch(name, kx), kt)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -LEARNING_RATE * g, grads))
    return model, state


def _stored(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """NumPy arrays for an `.npz` (bfloat16 as float32, exact), and their dtypes."""
    out, dtypes = {}, {}
    for key, value in arrays.items():
        value = np.asarray(value)
        dtypes[key] = str(value.dtype)
        out[key] = value.astype(np.float32) if value.dtype == jnp.bfloat16 else value
    out["dtypes"] = np.array(json.dumps(dtypes, sort_keys=True))
    return out


def record(name: str, recorded_with: str) -> None:
    with jax.enable_x64(CONFIGS[name].get("x64", False)):
        _record(name, recorded_with)


def _record(name: str, recorded_with: str) -> None:
    model, state = build(name, jax.random.key(RECORD_KEY))
    model, state = _train(name, model, state)
    if CONFIGS[name].get("save_inference", False):
        model = eqx.nn.inference_mode(model)
    eqx.tree_serialise_leaves(FIXTURES / f"{name}.eqx", (model, state))

    x = input_batch(name)
    arrays: dict[str, Any] = {"x": x}
    arrays |= {f"leaf/{k}": v for k, v in named_leaves(name, model, state).items()}
    for mode, inference in (("train", False), ("inference", True)):
        y, new_state = forward(name, model, clone(state), x, inference)
        mean, var = running(name, model, new_state)
        arrays |= {f"{mode}/y": y, f"{mode}/mean": mean, f"{mode}/var": var}
    stored: dict[str, Any] = _stored(arrays)
    stored["recorded_with"] = np.array(recorded_with)
    np.savez(FIXTURES / f"{name}.npz", **stored)


def _recorded_with() -> str:
    source = Path(ebn.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"eqx_batchnorm {ebn.__version__} (commit {commit})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--current", action="store_true",
                        help="record with this checkout's package (not an old release)")
    args = parser.parse_args(argv)
    source = Path(ebn.__file__).resolve()
    print(f"eqx_batchnorm imported from {source}")
    if source.is_relative_to(ROOT) and not args.current:
        print("that is this checkout, not an old release: put the old package first on "
              "PYTHONPATH (see this script's docstring), or pass --current", file=sys.stderr)
        return 1
    recorded_with = _recorded_with()
    print(f"recording with {recorded_with}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in CONFIGS:
        record(name, recorded_with)
        print(f"  {name}: " + ", ".join(
            f"{p.name} {p.stat().st_size} B" for p in sorted(FIXTURES.glob(f"{name}.*"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
