"""The passes of a BatchNorm, timed one by one, with their achieved memory bandwidth.

    python benchmarks/passes.py [OUT_DIR]      # on a GPU (see benchmarks/gpu_check.sh)

Each pass reads (R) and writes (W) whole tensors of x's size: the copy (1R1W) is the
memory floor's unit; the statistics read x once (1R); the backward's sums read x and
the cotangent (2R); the normalisation is 1R1W and the backward's elementwise pass 2R1W.
Times are medians over alternating rounds of 100 calls each. With OUT_DIR, the
optimised HLO of ours and Flax's forward+backward is written there (hlo.txt), to count
kernels. Meant for a GPU: on a CPU the shape below takes seconds per call.
"""

import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

import eqx_batchnorm as ebn  # noqa: E402


def _time(fns, rounds=30, calls=100):
    for f, a in fns.values():
        for _ in range(5):
            jax.block_until_ready(f(*a))
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            f, a = fns[n]
            t = time.perf_counter()
            for _ in range(calls):
                o = f(*a)
            jax.block_until_ready(o)
            samples[n].append((time.perf_counter() - t) / calls)
    return {n: statistics.median(v) for n, v in samples.items()}


def _passes(layout: str) -> tuple[dict, B.Case, jax.Array, jax.Array]:
    case = B.Case((256, 56, 56, 64), layout, "f32")
    x = B._inputs(case)
    ct = jax.random.normal(jax.random.key(1), case.x_shape)
    red = (0, 1, 2) if layout == "NHWC" else (0, 2, 3)
    ax = -1 if layout == "NHWC" else 1
    shape = (1, 1, 1, 64) if layout == "NHWC" else (1, 64, 1, 1)
    m0, v0 = jnp.full(64, 0.5), jnp.full(64, 2.0)
    m, v = m0.reshape(shape), v0.reshape(shape)
    fns = {
        "copy 1R1W": (jax.jit(lambda x, b: x + b), (x, jnp.zeros(()))),
        "sum(x) 1R": (jax.jit(lambda x: x.sum(red)), (x,)),
        "Flax's sums 1R": (jax.jit(lambda x: (x.sum(red), (x * x).sum(red))), (x,)),
        "ours statistics 1R": (
            jax.jit(lambda x: tuple(ebn.batch_statistics(x, ax)[:2])), (x,)),
        "backward sums 2R": (
            jax.jit(lambda x, ct: (ct.sum(red), (ct * (x - m)).sum(red))), (x, ct)),
        "normalize 1R1W": (jax.jit(lambda x: ebn.normalize(x, m0, v0, axis=ax)), (x,)),
        "backward dx 2R1W": (
            jax.jit(lambda x, ct: ct * v - m - (x - m) * (v * 0.3)), (x, ct)),
    }
    return fns, case, x, ct


def main(out: str | None) -> None:
    hlo = open(os.path.join(out, "hlo.txt"), "w") if out else None
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for layout in ("NHWC", "NCHW"):
        fns, case, x, ct = _passes(layout)
        nbytes = x.size * x.dtype.itemsize
        for name, t in _time(fns).items():
            k = re.search(r"(\d)R(?:(\d)W)?", name)
            assert k is not None
            moved = (int(k.group(1)) + int(k.group(2) or 0)) * nbytes
            print(f"{layout} {case.x_shape} f32  {name:20s} {t * 1e3:.4f} ms  "
                  f"{moved / t / 1e12:.2f} TB/s", flush=True)
        if hlo is not None:
            layers = B.layers_for(case, x)
            for name in ("Flax", "ours"):
                layer = layers[name][0]
                f = B.compiled_fn(layer, "fwd+bwd")
                text = f.lower(x, layer.scale, layer.bias, layer.state, ct).compile().as_text()
                hlo.write(f"===== {layout} {name} fwd+bwd\n{text.split('ENTRY')[1]}\n")
    if hlo is not None:
        hlo.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
