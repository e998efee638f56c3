"""The one place that looks at the backend.

The estimators and the normalisation's backward pass each have a form that suits XLA:CPU
and one that suits GPUs and TPUs (see `docs/benchmarks.md` for why). The choice is made
here, once per call, and handed to the kernels as static configuration, so that a trace
made for one platform is never reused for the other.
"""

import jax


def platform() -> str:
    """`"cpu"` or `"accelerator"`: the kind of backend the next trace runs on."""
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"
