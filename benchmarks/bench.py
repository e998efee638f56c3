"""Benchmarks: `eqx_batchnorm.BatchNorm` against `flax.linen.BatchNorm`,
`equinox.nn.BatchNorm(mode="batch")` and a plain copy of the same bytes.

    uv run python benchmarks/bench.py --markdown            # the table in docs/benchmarks.md
    uv run python benchmarks/bench.py --quick               # a smoke run: one shape, few rounds
    uv run python benchmarks/bench.py --gpu --markdown      # on a GPU: the large shapes only

Everything runs in one process. Every function is jitted, compiled and warmed up before
timing; a round times each implementation once (each sample is a few calls, then
`block_until_ready`), the order rotating from round to round; the tables give median
times and the median of the per-round ratios, which cancels most of the drift of a busy
machine. Implementations:

- `copy`: the memory floor, reading and writing the same bytes as the layer
  (forward: `x` to `y`; forward+backward: `x`, `ct` to `y`, `dx`).
- `Flax`: `flax.linen.BatchNorm`, batched.
- `ours`: `eqx_batchnorm.BatchNorm`, batched (Flax's style).
- `ours vmap`: `eqx_batchnorm.BatchNorm(axis_name="batch")` per example under
  `jax.vmap(..., axis_name="batch")` (Equinox's style).
- `eqx`: `equinox.nn.BatchNorm(mode="batch")`, per example under `vmap` (it only supports
  channels-first examples, so NCHW only).

Modes: `fwd` (training forward, returning `y` and the new state), `fwd+bwd` (`jax.vjp`
with an external cotangent, w.r.t. `x`, scale and bias, returning `y`, the three
gradients and the new state) and `infer` (inference forward).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import eqx_batchnorm as ebn

MODES = ("fwd", "fwd+bwd", "infer")
CPU_SHAPES = ((64, 32, 32, 64), (256, 8, 8, 256))  # logical (N, H, W, C)
# On a GPU the CPU shapes (16 MB) take a few microseconds: dispatch, not memory, would be
# measured. These are >= 100 MB in float32, where memory traffic dominates.
GPU_SHAPES = ((256, 56, 56, 64), (128, 28, 28, 256))
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------
# The implementations, behind one signature: apply(x, scale, bias, state, inference)


@dataclass
class Layer:
    apply: Callable[..., tuple[jax.Array, Any]]
    scale: jax.Array
    bias: jax.Array
    state: Any


def _with_leaves(apply: Callable[..., tuple[jax.Array, Any]], state: Any,
                 scale: Any, bias: Any) -> Layer:
    """The layer with its `eqx.nn.State` passed as a list of arrays, as Flax's state is.

    Flattening an `eqx.nn.State` at every call of a jitted function costs about 0.05 ms
    of Python, which a model jitted as a whole pays once per step, not once per layer;
    here it would be charged to the layer.
    """
    leaves, treedef = jax.tree_util.tree_flatten(state)

    def apply_leaves(x, scale, bias, leaves, inference):
        y, new = apply(x, scale, bias, jax.tree_util.tree_unflatten(treedef, leaves),
                       inference)
        return y, jax.tree_util.tree_leaves(new)

    return Layer(apply_leaves, scale, bias, leaves)


def _ours(c: int, axis: int) -> Layer:
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(c, axis=axis)

    def apply(x, scale, bias, state, inference):
        model = eqx.tree_at(lambda m: (m.scale, m.bias), bn, (scale, bias))
        return model(x, state, inference=inference)

    return _with_leaves(apply, state, bn.scale, bn.bias)


def _ours_vmap(c: int, example_axis: int) -> Layer:
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(c, axis=example_axis,
                                                      axis_name="batch")

    def apply(x, scale, bias, state, inference):
        model = eqx.tree_at(lambda m: (m.scale, m.bias), bn, (scale, bias))
        return jax.vmap(partial(model, inference=inference), axis_name="batch",
                        in_axes=(0, None), out_axes=(0, None))(x, state)

    return _with_leaves(apply, state, bn.scale, bn.bias)


def _flax(c: int, axis: int, x: jax.Array) -> Layer:
    layer = nn.BatchNorm(axis=axis)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)

    def apply(x, scale, bias, state, inference):
        v = {"params": {"scale": scale, "bias": bias}, "batch_stats": state}
        if inference:
            return layer.apply(v, x, use_running_average=True), state
        y, updates = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    p = variables["params"]
    return Layer(apply, p["scale"], p["bias"], variables["batch_stats"])


def _eqx(c: int) -> Layer:
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name="batch", mode="batch")

    def apply(x, scale, bias, state, inference):
        model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (scale, bias))
        return jax.vmap(partial(model, inference=inference), axis_name="batch",
                        in_axes=(0, None), out_axes=(0, None))(x, state)

    assert bn.weight is not None and bn.bias is not None
    return _with_leaves(apply, state, bn.weight, bn.bias)


def _copy(out_dtype: Any) -> Layer:
    # `x + bias` with a zero that XLA cannot see (an argument): one plain elementwise
    # pass over the same bytes. A literal `x + 0` or `x.astype(x.dtype)` would be folded
    # into an aliased output, which XLA:CPU then copies with a slow memcpy.
    def apply(x, scale, bias, state, inference):
        return (x + bias.astype(x.dtype)).astype(out_dtype), state

    return Layer(apply, jnp.ones(()), jnp.zeros(()), None)


def compiled_fn(layer: Layer, mode: str, is_copy: bool = False) -> Callable:
    """The jitted function of one mode; its arguments are `args(...)`."""
    if mode == "fwd":
        return jax.jit(lambda x, s, b, st: layer.apply(x, s, b, st, False))
    if mode == "infer":
        return jax.jit(lambda x, s, b, st: layer.apply(x, s, b, st, True)[0])
    if is_copy:  # read x and ct, write y and dx: the floor of a forward+backward
        return jax.jit(lambda x, s, b, st, ct: (layer.apply(x, s, b, st, False)[0],
                                                (ct + b.astype(ct.dtype)).astype(x.dtype)))

    def fwd_bwd(x, s, b, st, ct):
        y, pullback, new_state = jax.vjp(lambda x, s, b: layer.apply(x, s, b, st, False),
                                          x, s, b, has_aux=True)
        return y, pullback(ct), new_state

    return jax.jit(fwd_bwd)


# ---------------------------------------------------------------------------------------
# Cases and timing


@dataclass
class Case:
    shape: tuple[int, int, int, int]  # logical (N, H, W, C)
    layout: str  # "NHWC" or "NCHW"
    dtype: str

    @property
    def x_shape(self) -> tuple[int, ...]:
        n, h, w, c = self.shape
        return (n, h, w, c) if self.layout == "NHWC" else (n, c, h, w)

    @property
    def axis(self) -> int:
        return -1 if self.layout == "NHWC" else 1

    @property
    def example_axis(self) -> int:
        return -1 if self.layout == "NHWC" else 0

    @property
    def label(self) -> str:
        return f"{self.x_shape} {self.layout} {self.dtype}"


@dataclass
class Result:
    case: Case
    mode: str
    times: dict[str, float] = field(default_factory=dict)  # median seconds per call
    ratios: dict[str, float] = field(default_factory=dict)  # "a/b": median per-round ratio


RATIOS = (("ours", "Flax"), ("ours vmap", "ours"), ("eqx", "ours vmap"), ("ours", "copy"))


def _inputs(case: Case):
    x = jax.random.normal(jax.random.key(0), case.x_shape, jnp.float32) * 1.5 + 0.5
    return x.astype(DTYPES[case.dtype])


def layers_for(case: Case, x: jax.Array) -> dict[str, tuple[Layer, bool]]:
    c = case.shape[3]
    out_dtype = jnp.result_type(x.dtype, jnp.float32)  # float32 parameters, as Flax
    layers = {
        "copy": (_copy(out_dtype), True),
        "Flax": (_flax(c, case.axis, x), False),
        "ours": (_ours(c, case.axis), False),
        "ours vmap": (_ours_vmap(c, case.example_axis), False),
    }
    if case.layout == "NCHW":
        layers["eqx"] = (_eqx(c), False)
    return layers


def _block(out):
    jax.block_until_ready(out)
    return out


def run_case(case: Case, mode: str, rounds: int, sample_s: float) -> Result:
    x = _inputs(case)
    ct = jax.random.normal(jax.random.key(1), case.x_shape, jnp.float32)
    fns = {}
    for name, (layer, is_copy) in layers_for(case, x).items():
        f = compiled_fn(layer, mode, is_copy)
        args = (x, layer.scale, layer.bias, layer.state)
        if mode == "fwd+bwd":
            y_dtype = jnp.result_type(x.dtype, jnp.float32)
            args = (*args, ct.astype(y_dtype))
        fns[name] = (f, args)
    for f, args in fns.values():  # compile and warm up
        for _ in range(3):
            _block(f(*args))
    # Calls per sample: enough for `sample_s` of the slowest-but-copy implementation.
    once = {}
    for name, (f, args) in fns.items():
        t0 = time.perf_counter()
        _block(f(*args))
        once[name] = time.perf_counter() - t0
    reps = max(1, int(round(sample_s / max(v for k, v in once.items() if k != "copy"))))

    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            f, args = fns[name]
            t0 = time.perf_counter()
            for _ in range(reps):
                out = f(*args)
            _block(out)
            samples[name].append((time.perf_counter() - t0) / reps)
    res = Result(case, mode)
    res.times = {k: statistics.median(v) for k, v in samples.items()}
    for a, b in RATIOS:
        if a in samples and b in samples:
            res.ratios[f"{a}/{b}"] = float(np.median(np.array(samples[a]) /
                                                     np.array(samples[b])))
    return res


# ---------------------------------------------------------------------------------------
# XLA's temporary memory and the compile time, ours against Flax


def memory_and_compile(case: Case, reps: int) -> dict[str, Any]:
    x = _inputs(case)
    ct = jax.random.normal(jax.random.key(1), case.x_shape, jnp.result_type(x.dtype,
                                                                             jnp.float32))
    out: dict[str, Any] = {}
    layers = layers_for(case, x)
    for mode in ("fwd", "fwd+bwd"):
        trace: dict[str, list[float]] = {"ours": [], "Flax": []}
        comp: dict[str, list[float]] = {"ours": [], "Flax": []}
        for r in range(reps):
            for name in (("ours", "Flax") if r % 2 == 0 else ("Flax", "ours")):
                layer = layers[name][0]
                args = (x, layer.scale, layer.bias, layer.state)
                args = (*args, ct) if mode == "fwd+bwd" else args
                jax.clear_caches()
                f = compiled_fn(layer, mode)
                t0 = time.perf_counter()
                lowered = f.lower(*args)
                t1 = time.perf_counter()
                compiled = lowered.compile()
                t2 = time.perf_counter()
                trace[name].append(t1 - t0)
                comp[name].append(t2 - t1)
                mem = compiled.memory_analysis()
                out[f"{mode} temp {name}"] = int(mem.temp_size_in_bytes) if mem else None
        for name in ("ours", "Flax"):
            out[f"{mode} trace {name}"] = statistics.median(trace[name])
            out[f"{mode} compile {name}"] = statistics.median(comp[name])
    return out


# ---------------------------------------------------------------------------------------
# The variance: speed of the accurate one-pass formula against the naive one, and accuracy


def _naive(x, red):  # Flax's fast variance, E[x^2] - E[x]^2
    xf = x.astype(jnp.float32)
    mean = xf.mean(red)
    return mean, jnp.maximum((xf * xf).mean(red) - mean * mean, 0)


def variance_benchmark(shape: tuple[int, ...], rounds: int, sample_s: float) -> dict:
    red = tuple(range(len(shape) - 1))
    fns = {
        "naive": jax.jit(partial(_naive, red=red)),
        "ours": jax.jit(lambda x: tuple(ebn.batch_statistics(x)[:2])),
        "ours two-pass": jax.jit(
            lambda x: tuple(ebn.batch_statistics(x, use_fast_variance=False)[:2])),
    }
    z = jax.random.normal(jax.random.key(2), shape, jnp.float32)
    result: dict[str, Any] = {"shape": shape, "time": {}, "ratio": {}}
    for offset in (0.0, 1e4):
        x = z + offset
        for f in fns.values():
            for _ in range(3):
                _block(f(x))
        reps = max(1, int(round(sample_s / _timed(fns["ours two-pass"], x))))
        samples: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(reps):
                    out = fns[name](x)
                _block(out)
                samples[name].append((time.perf_counter() - t0) / reps)
        key = f"|mean|/std={offset:g}"
        result["time"][key] = {k: statistics.median(v) for k, v in samples.items()}
        result["ratio"][key] = {
            k: float(np.median(np.array(v) / np.array(samples["naive"])))
            for k, v in samples.items() if k != "naive"}
    return result


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    _block(f(*args))
    return time.perf_counter() - t0


def variance_accuracy() -> dict:
    """Max relative error of the batch variance against float64, in float32."""
    shape, red = (64, 16, 16, 32), (0, 1, 2)
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    flax_bn = nn.BatchNorm(momentum=0.0)  # running var <- batch var
    out: dict[str, dict[str, float]] = {}
    for offset in (0.0, 1e2, 1e3, 1e4):
        x = (z + offset).astype(np.float32)
        ref = x.astype(np.float64).var(axis=red)

        def err(v, ref=ref):
            return float(np.max(np.abs(np.asarray(v, np.float64) - ref) / ref))

        variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
        _, upd = flax_bn.apply(variables, x, use_running_average=False,
                               mutable=["batch_stats"])
        xs = jnp.asarray(x)
        per_example = jax.vmap(lambda e: ebn.batch_statistics(e, axis_name="b").var,
                               axis_name="b")(xs)[0]
        out[f"{offset:g}"] = {
            "naive E[x^2]-E[x]^2": err(_naive(xs, red)[1]),
            "Flax": err(upd["batch_stats"]["var"]),
            "ours (fast)": err(ebn.batch_statistics(xs).var),
            "ours (fast, vmap axis_name)": err(per_example),
            "ours (two-pass)": err(ebn.batch_statistics(xs, use_fast_variance=False).var),
        }
    return out


# ---------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "backend": f"{jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s))",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "flax": flax.__version__,
        "equinox": eqx.__version__,
        "eqx_batchnorm": ebn.__version__,
    }
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True,
                                        check=False).stdout.strip()
    except OSError:
        pass
    return info


def _ms(t: float | None) -> str:
    return "" if t is None else f"{t * 1e3:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal pipe inside a markdown table cell


def _x(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}x"


# The widest a table may be to fit the docs page at 1280 px (as `docs/tools/check_layout.py`
# checks it): seven columns of the widths below.
TABLE_COLUMNS = 7


def _table(head: list[str], rows: list[list[str]]) -> str:
    assert len(head) <= TABLE_COLUMNS, head
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _where(r: Result) -> str:
    return f"{r.case.x_shape} {r.case.layout} {r.case.dtype}"


def timing_table(results: list[Result]) -> str:
    """Two tables, each narrow enough for the docs page: ours against Flax and the memory
    floor, then the per-example style and `eqx.nn.BatchNorm`."""
    t_q = [(r, r.times, r.ratios) for r in results]
    ours = _table(
        ["x (layout, dtype)", "mode", "copy ms", "Flax ms", "ours ms", "**ours/Flax**",
         "ours/copy"],
        [[_where(r), r.mode, _ms(t.get("copy")), _ms(t.get("Flax")), _ms(t.get("ours")),
          _x(q.get("ours/Flax")), _x(q.get("ours/copy"))] for r, t, q in t_q])
    styles = _table(
        ["x (layout, dtype)", "mode", "ours ms", "ours vmap ms", "**vmap/ours**", "eqx ms",
         "**eqx/vmap**"],
        [[_where(r), r.mode, _ms(t.get("ours")), _ms(t.get("ours vmap")),
          _x(q.get("ours vmap/ours")), _ms(t.get("eqx")), _x(q.get("eqx/ours vmap"))]
         for r, t, q in t_q])
    return "\n".join([
        "Ours against Flax and the memory floor (`copy`):", "", ours, "",
        "Per example under `vmap` (Equinox's style) against batched, and `eqx.nn.BatchNorm` "
        "(NCHW only) against ours per example:", "", styles])


def memory_table(mem: list[tuple[Case, dict]]) -> str:
    def pair(m: dict, key: str, fmt=str) -> str:
        return f"{fmt(m[f'{key} ours'])} / {fmt(m[f'{key} Flax'])}"

    def ms(t: float) -> str:
        return f"{t * 1e3:.1f}"

    return _table(
        ["x (layout, dtype)", "mode", "temp bytes ours / Flax", "trace ms ours / Flax",
         "compile ms ours / Flax"],
        [[f"{case.x_shape} {case.layout} {case.dtype}", mode, pair(m, f"{mode} temp"),
          pair(m, f"{mode} trace", ms), pair(m, f"{mode} compile", ms)]
         for case, m in mem for mode in ("fwd", "fwd+bwd")])


def variance_tables(speed: dict, acc: dict) -> str:
    lines = [f"Speed, x of shape {tuple(speed['shape'])} float32, features last "
             "(median ms; ratio: median per-round ratio to the naive formula):", "",
             "| data | naive ms | ours ms | ours/naive | ours two-pass ms | two-pass/naive |",
             "|---|---|---|---|---|---|"]
    for key, t in speed["time"].items():
        q = speed["ratio"][key]
        lines.append(f"| {_cell(key)} | {_ms(t['naive'])} | {_ms(t['ours'])} | {_x(q['ours'])} "
                     f"| {_ms(t['ours two-pass'])} | {_x(q['ours two-pass'])} |")
    lines += ["", "Accuracy: max relative error of the batch variance against float64, "
              "x of shape (64, 16, 16, 32) float32, standard normal plus |mean|/std:", ""]
    methods = list(next(iter(acc.values())))
    lines.append("| " + _cell("|mean|/std") + " | " + " | ".join(methods) + " |")
    lines.append("|" + "---|" * (len(methods) + 1))
    for offset, errs in acc.items():
        lines.append(f"| {offset} | " + " | ".join(f"{errs[m]:.1e}" for m in methods) + " |")
    return "\n".join(lines)


def targets(results: list[Result], mem: list[tuple[Case, dict]], speed: dict,
            gpu: bool = False) -> list[str]:
    """What we aim for (on a CPU, or a GPU with `gpu`), each checked against the worst case
    of this run."""

    def worst(mode: str | None, key: str, pick=max):
        vals = [(r.ratios[key], r) for r in results
                if (mode is None or r.mode == mode) and key in r.ratios]
        return pick(vals, key=lambda v: v[0]) if vals else (None, None)

    out = []

    def line(name, value, ok, where):
        out.append(f"- [{'x' if ok else ' '}] {name}: {value} ({where})")

    if gpu:
        # The forward's floor: read x twice (statistics, normalisation), write y once;
        # the copy reads x and writes y once. So floor/copy = (2 bx + by) / (bx + by): 1.5
        # in float32, 4/3 for bfloat16 x with a float32 y. "90% of the floor": ours/copy
        # <= floor/copy / 0.9, on tensors of at least 100 MB.
        efficiency = []
        for r in results:
            bx = DTYPES[r.case.dtype](0).dtype.itemsize
            if r.mode == "fwd" and "ours/copy" in r.ratios and \
                    math.prod(r.case.shape) * bx >= 100e6:
                floor = (2 * bx + 4) / (bx + 4)
                efficiency.append((floor / r.ratios["ours/copy"], r))
        if efficiency:
            e, r = min(efficiency, key=lambda v: v[0])
            line("fwd at >= 90% of the memory floor (tensors >= 100 MB)", f"{e:.0%}",
                 e >= 0.9, f"worst: {r.case.label}")
        v, r = worst("fwd+bwd", "ours/Flax")
        if v is not None:
            line("fwd+bwd ours/Flax <= 0.85", _x(v), v <= 0.85, f"worst: {r.case.label}")
    for mode, limit in () if gpu else (("fwd+bwd", 0.75), ("fwd", 1.0), ("infer", 1.0)):
        v, r = worst(mode, "ours/Flax")
        if v is not None:
            line(f"{mode} ours/Flax <= {limit}", _x(v), v <= limit, f"worst: {r.case.label}")
    v, r = worst(None, "ours vmap/ours")
    if v is not None:
        line("per-example vmap / batched <= 1.15", _x(v), v <= 1.15,
             f"worst: {r.mode} {r.case.label}")
    v, r = worst("fwd+bwd", "eqx/ours vmap", pick=min)
    if v is not None and not gpu:  # an aim on the CPU only
        line("eqx.nn.BatchNorm fwd+bwd / ours per example >= 4", _x(v), v >= 4,
             f"worst: {r.case.label}")
    for mode in ("fwd+bwd", "fwd"):
        temp = [(m[f"{mode} temp ours"], m[f"{mode} temp Flax"]) for _, m in mem]
        if temp:
            ok = all(o <= f for o, f in temp)
            bad = max(temp, key=lambda t: t[0] - t[1])
            line(f"XLA temp memory <= Flax, {mode}", "every case" if ok else
                 f"{bad[0]} B against {bad[1]} B", ok, "temp_size_in_bytes")
        comp = [m[f"{mode} compile ours"] / m[f"{mode} compile Flax"] for _, m in mem]
        if comp:
            line(f"XLA compile time <= Flax, {mode}", f"worst {max(comp):.2f}x",
                 max(comp) <= 1.0, "median of alternating fresh compiles")
    for key, data in (("|mean|/std=0", "centred data"), ("|mean|/std=10000", "offset data")):
        q = speed["ratio"].get(key, {}).get("ours")
        if q is not None:
            line(f"accurate one-pass variance <= 1.05x naive ({data}, {key})", _x(q),
                 q <= 1.05, f"shape {tuple(speed['shape'])}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape, few rounds: a smoke run")
    p.add_argument("--markdown", action="store_true", help="print the markdown report only")
    p.add_argument("--gpu", action="store_true", help="the large GPU shapes instead of the "
                   "CPU ones, and what we aim for on a GPU")
    p.add_argument("--rounds", type=int, default=None, help="rounds per case (default 100)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="target duration of one timing sample (default 3 ms, 25 ms with "
                   "--gpu; a sample is at least one call)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                   + ", ".join(MODES))
    p.add_argument("--json", default=None, help="also write the raw numbers to this file")
    args = p.parse_args(argv)

    rounds = args.rounds or (5 if args.quick else 100)
    # On a GPU a call takes ~0.1 ms: longer samples keep the card busy between the
    # host's timer reads, so launch and synchronisation costs stay out of the numbers.
    sample_s = (args.sample_ms or (25.0 if args.gpu else 3.0)) / 1e3
    shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
    shapes = shapes[:1] if args.quick else shapes
    dtypes = ("f32",) if args.quick else tuple(DTYPES)
    cases = [Case(s, layout, dt) for s in shapes for layout in ("NHWC", "NCHW")
             for dt in dtypes]
    modes = [m for m in MODES if m in args.modes.split(",")]

    def log(*a):
        if not args.markdown:
            print(*a, file=sys.stderr, flush=True)
    results = []
    for case in cases:
        for mode in modes:
            r = run_case(case, mode, rounds, sample_s)
            log(f"{mode:8s} {case.label:32s} " + "  ".join(
                f"{k} {_ms(v)}ms" for k, v in r.times.items()) + "  |  " + "  ".join(
                f"{k} {_x(v)}" for k, v in r.ratios.items()))
            results.append(r)
    mem = []
    for case in cases:
        m = memory_and_compile(case, reps=3 if args.quick else 5)
        log(f"memory/compile {case.label}: {m}")
        mem.append((case, m))
    speed = variance_benchmark(cases[0].x_shape if cases[0].layout == "NHWC"
                               else (64, 32, 32, 64), rounds, sample_s)
    log(f"variance speed: {speed['ratio']}")
    acc = variance_accuracy()

    info = machine()
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None
                                                         else argv)
    report = [
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"Command: `{command.strip()}`; {rounds} rounds per case.",
        "",
        "### Time (median per call; ratios are medians of per-round ratios)",
        "",
        timing_table(results),
        "",
        "### XLA temporary memory and compile time",
        "",
        memory_table(mem),
        "",
        "### Variance",
        "",
        variance_tables(speed, acc),
        "",
        "### Targets",
        "",
        *targets(results, mem, speed, gpu=args.gpu),
    ]
    print("\n".join(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rounds": rounds,
                       "timing": [{"case": r.case.label, "mode": r.mode, "times": r.times,
                                   "ratios": r.ratios} for r in results],
                       "memory": [{"case": c.label, **m} for c, m in mem],
                       "variance_speed": speed, "variance_accuracy": acc}, f, indent=1,
                      default=str)
    if not args.markdown:
        log("(--markdown prints the same report without these progress lines)")


if __name__ == "__main__":
    main()
