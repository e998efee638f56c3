"""Test configuration: 8 virtual CPU devices, set before JAX initialises its backend.

`EQX_BATCHNORM_TEST_BACKEND=gpu` (or `tpu`) runs the tests on that backend instead,
with its real devices; deselect the multi-device tests there (see docs/benchmarks.md).

On the CPU, XLA's machine-code generation runs at `--xla_backend_optimization_level=0`:
the suite compiles well over a thousand small programs and runs most of them once, and
LLVM's optimisation of the machine code is about a third of its time. The level changes
only how LLVM lowers the same optimised HLO program (XLA's HLO passes, fusion and layout
run as always; no fast-math at either level); vectorised reductions may sum in another
order, so results can differ in the last bits, within every tolerance here: the suite
passes at both levels. `EQX_BATCHNORM_TEST_BACKEND_OPT=xla` keeps XLA's default level, as
users compile; CI runs its version-sensitive tests (the numbers against Flax among them)
that way.
"""

import os

_BACKEND = os.environ.get("EQX_BATCHNORM_TEST_BACKEND", "cpu")
_BACKEND_OPT = os.environ.get("EQX_BATCHNORM_TEST_BACKEND_OPT", "0")
if _BACKEND_OPT not in ("0", "xla"):
    raise ValueError(f"EQX_BATCHNORM_TEST_BACKEND_OPT={_BACKEND_OPT!r}: expected '0' or 'xla'")

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if _BACKEND == "cpu" and _BACKEND_OPT == "0":
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
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
