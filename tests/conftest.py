"""Test configuration: 8 virtual CPU devices, set before JAX initialises its backend.

`EQX_BATCHNORM_TEST_BACKEND=gpu` (or `tpu`) runs the tests on that backend instead,
with its real devices; deselect the multi-device tests there (see docs/benchmarks.md).
"""

import os

_BACKEND = os.environ.get("EQX_BATCHNORM_TEST_BACKEND", "cpu")

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
if _BACKEND == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    if _BACKEND != "cpu":
        assert jax.default_backend() == _BACKEND, (
            f"EQX_BATCHNORM_TEST_BACKEND={_BACKEND}, but JAX runs on "
            f"{jax.default_backend()}")
        return
    assert jax.device_count() == 8, (
        "tests need 8 virtual CPU devices; JAX was initialised before conftest set XLA_FLAGS"
    )


@pytest.fixture
def clone():
    """Copy of an `eqx.nn.State` (a state can be consumed only once)."""

    def _clone(state):
        leaves, treedef = jax.tree_util.tree_flatten(state)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return _clone
