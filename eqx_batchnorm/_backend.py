"""The one place that looks at the backend: the kernels have a form for XLA:CPU and one for
GPUs and TPUs (`docs/benchmarks.md`), chosen here once per call and passed as static
configuration, so that a trace made for one platform is never reused for the other."""

import jax


def platform() -> str:
    """`"cpu"` or `"accelerator"`: the kind of backend the next trace runs on."""
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"
