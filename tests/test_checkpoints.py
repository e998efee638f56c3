"""Checkpoints written by release 0.1.0 load into this version and give the same numbers.

The files under `tests/golden/checkpoints/` were written by `eqx.tree_serialise_leaves` with
release 0.1.0 (`tests/record_checkpoint_fixture.py` says how, and builds the models: the
same code serves both versions). Each is loaded into a model and state built here with the
same constructor arguments but other numbers in every leaf, so that only what is read from
the file can give the recorded results.
"""

import io
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import record_checkpoint_fixture as fixture

import eqx_batchnorm as ebn

# Float64 layers under x64 changed their state's dtype: they have a test of their own.
NAMES = [name for name, config in fixture.CONFIGS.items() if not config.get("x64")]

# The leaves load bit for bit; the outputs need not. This version recomputes them with its
# own kernels (one compiled kernel; on CPU, plain sums where 0.1.0 shifted the data by a
# sample of it; another order of operations), so they may differ from the recorded ones by
# rounding. Measured against these files on CPU, the largest difference in an array, in
# units of its dtype's epsilon times the array's largest magnitude: 1.73 for float32 (a
# training-mode `y`; at most 0.87 for the running statistics), 0.75 for bfloat16 (outputs
# one rounding apart); inference leaves the running statistics bit-exact. Differences per
# element, relative to the element, are no measure: outputs near zero come out of the
# cancellation in `x - mean`, where the mean's rounding is absolute. The bounds: the
# measured value rounded up, plus one rounding unit.
ULPS = {"float32": 3, "bfloat16": 2, "float64": 3}


def _recorded(name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with np.load(fixture.FIXTURES / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("dtypes")))


def _another(name: str):
    """A model and state of the configuration with other numbers in every leaf."""
    model, state = fixture.build(name, jax.random.key(fixture.RECORD_KEY + 100))
    keys = iter(jax.random.split(jax.random.key(fixture.RECORD_KEY + 101), 64))
    return jax.tree.map(
        lambda a: (jax.random.uniform(next(keys), a.shape, minval=5.0, maxval=6.0)
                   .astype(a.dtype) if eqx.is_inexact_array(a) else a),
        (model, state))


def _file_leaves(path) -> list[np.ndarray]:
    """The leaves in a `tree_serialise_leaves` file, in order: one `.npy` record each."""
    data = path.read_bytes()
    f, leaves = io.BytesIO(data), []
    while f.tell() < len(data):
        leaves.append(np.asarray(jnp.load(f)))
    return leaves


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype != bool else a


def _assert_bit_equal(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_array_equal(actual, expected, err_msg=what)
    np.testing.assert_array_equal(_bits(actual), _bits(expected), err_msg=what)  # -0.0


def _assert_close(actual, expected: np.ndarray, dtype: str, what: str) -> None:
    assert str(actual.dtype) == dtype, f"{what}: dtype {actual.dtype}, recorded {dtype}"
    actual = np.asarray(actual, np.float64)  # exact for every dtype here
    assert actual.shape == expected.shape, what
    ulp = float(jnp.finfo(dtype).eps) * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ULPS[dtype] * ulp,
                               err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_of_release_0_1_0_loads(name, clone):
    path = fixture.FIXTURES / f"{name}.eqx"
    recorded, dtypes = _recorded(name)
    like = _another(name)
    # Every parameter and statistic of `like` differs from the checkpoint's.
    for leaf, value in fixture.named_leaves(name, *like).items():
        assert np.all(np.asarray(value, np.float32) != recorded[f"leaf/{leaf}"]), leaf
    model, state = eqx.tree_deserialise_leaves(path, like)

    # The layout: the file holds exactly the leaves of the loaded pair, in its order, with
    # its dtypes and shapes (`tree_deserialise_leaves` alone would not notice trailing
    # leaves left unread).
    loaded = [leaf for leaf in jax.tree.leaves((model, state)) if eqx.is_array_like(leaf)]
    saved = _file_leaves(path)
    assert len(loaded) == len(saved)
    for i, (a, b) in enumerate(zip(loaded, saved, strict=True)):
        _assert_bit_equal(a, b, f"leaf {i}")
    # ... and each number landed where it belongs.
    leaves = fixture.named_leaves(name, model, state)
    assert sorted(f"leaf/{k}" for k in leaves) == sorted(k for k in recorded
                                                         if k.startswith("leaf/"))
    for leaf, value in leaves.items():
        key = f"leaf/{leaf}"
        assert str(value.dtype) == dtypes[key], key
        _assert_bit_equal(np.asarray(value, np.float32), recorded[key], key)
    bn = fixture.batch_norm(name, model)
    assert bn.inference is fixture.CONFIGS[name].get("save_inference", False)

    # The loaded model computes what release 0.1.0 computed with it.
    x = jnp.asarray(recorded["x"], dtypes["x"])
    for mode, inference in (("train", False), ("inference", True)):
        y, new_state = fixture.forward(name, model, clone(state), x, inference)
        mean, var = fixture.running(name, model, new_state)
        for what, value in (("y", y), ("mean", mean), ("var", var)):
            key = f"{mode}/{what}"
            _assert_close(value, recorded[key], dtypes[key], f"{name}: {key}")


def test_float64_checkpoint_of_release_0_1_0_loads_widened(clone):
    # Release 0.1.0 kept the running statistics of a float64 layer in float32; they are
    # now float64 (Flax's "at least float32"). Equinox refuses the narrower leaves, and
    # `ebn.deserialise_filter_spec` widens them, exactly.
    name = "float64_x64"
    path = fixture.FIXTURES / f"{name}.eqx"
    recorded, dtypes = _recorded(name)
    assert dtypes["leaf/mean"] == dtypes["leaf/var"] == "float32"
    with jax.enable_x64(True):
        like = _another(name)
        assert like[1].get(like[0].state_index).mean.dtype == jnp.float64
        with pytest.raises(RuntimeError, match="changed dtype from float64 in `like` to "
                                               "float32 on disk"):
            eqx.tree_deserialise_leaves(path, like)
        model, state = eqx.tree_deserialise_leaves(path, like,
                                                   filter_spec=ebn.deserialise_filter_spec)

        loaded = [leaf for leaf in jax.tree.leaves((model, state)) if eqx.is_array_like(leaf)]
        saved = _file_leaves(path)
        assert len(loaded) == len(saved)
        for i, (a, b) in enumerate(zip(loaded, saved, strict=True)):
            # The `inference` flag, a bool, as saved; every array widened to float64.
            want = b if b.dtype == bool else b.astype(np.float64)
            _assert_bit_equal(a, want, f"leaf {i}")
        for leaf, value in fixture.named_leaves(name, model, state).items():
            _assert_bit_equal(value, recorded[f"leaf/{leaf}"].astype(np.float64), leaf)

        x = jnp.asarray(recorded["x"])
        f32_ulps = ULPS["float32"] * float(jnp.finfo(jnp.float32).eps)
        for mode, inference in (("train", False), ("inference", True)):
            y, new_state = fixture.forward(name, model, clone(state), x, inference)
            if inference:
                # 0.1.0 normalised with its float32 statistics, so in float32: now in
                # float64, the recorded outputs are one float32 rounding off.
                want = recorded["inference/y"]
                assert y.dtype == jnp.float64
                np.testing.assert_allclose(np.asarray(y), want, rtol=0,
                                           atol=f32_ulps * float(np.max(np.abs(want))))
            else:
                _assert_close(y, recorded["train/y"], "float64", "train/y")
            mean, var = fixture.running(name, model, new_state)
            for what, value in (("mean", mean), ("var", var)):
                # 0.1.0 rounded the new statistics to float32; they stay float64 now.
                assert value.dtype == jnp.float64
                want = recorded[f"{mode}/{what}"]
                np.testing.assert_allclose(np.asarray(value), want, rtol=0,
                                           atol=f32_ulps * float(np.max(np.abs(want))),
                                           err_msg=what)
