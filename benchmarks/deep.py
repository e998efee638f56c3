"""Deep-model benchmarks: what a BatchNorm costs in a whole training step, for
`eqx_batchnorm.BatchNorm`, `flax.linen.BatchNorm` and `equinox.nn.BatchNorm(mode="batch")`.

    uv run python benchmarks/deep.py                     # every section (see docs/benchmarks.md)
    uv run python benchmarks/deep.py --quick             # a smoke run: one shape, 2 rounds
    uv run python benchmarks/deep.py --sections stack --json deep.json
    uv run python benchmarks/deep.py --sections scan --shapes small --dtypes f32

Four sections, each measured in one process with the method of `benchmarks/bench.py`
(implementations side by side, alternating rounds, medians of per-round ratios to Flax):

- `stack`: 53 BatchNorms (ResNet-50's count) with the same work between layers in every
  variant (a relu and a 1x1 convolution), one SGD step under `jax.jit` (loss: mean of
  the squared output; gradient w.r.t. every parameter; the new running statistics
  returned). Per variant: the jaxpr trace (`jax.jit(f).trace`), the lowering
  (`.lower()`), XLA's compile (`.compile()`), each timed on a fresh function after
  `jax.clear_caches()`; the step time; the jaxpr's equation count. The same stack with
  no BatchNorm, batched and per example, gives the BatchNorms' share of each.
- `eager`: one layer's training call without `jit`, as one types it at a prompt: the
  time per call and how many XLA compilations the 2nd..Nth calls trigger.
- `resnet`: the ResNet of `examples/digits_demo.py` (batch of 64 8x8 images), one SGD
  step, with each BatchNorm in the same place, and with none (identity): the BatchNorm's
  cost per step is the model's step minus the no-BatchNorm step.
- `scan`: the stack's blocks at depths 8, 16, 32 and 53 (`--depths`), scanned over and
  unrolled, one SGD step: `ours scan` (`ebn.stack_blocks` and `ebn.scan_blocks`, NHWC
  batch), `ours vmap scan` (per example, `ebn.scan_blocks(..., axis_name="batch")`),
  `Flax scan` (`nn.scan` over a block module), and `ours`, `ours vmap`, `Flax` unrolled,
  all with the same initial values (the unrolled convolutions take the weights of the
  scanned blocks' keys; a step whose loss, update or running statistics differ from its
  unrolled model's stops the run before any step is timed). Per variant: trace, lowering,
  XLA compile, step time and the compiled step's XLA temporary memory; ratios to Flax
  unrolled, to Flax's `nn.scan` and to the same model unrolled, and the targets for
  scanned models checked.

Variants: `ours` (`ebn.BatchNorm(C)` on an NHWC batch), `Flax NCHW` (Flax's layer with
`axis=1` on the NCHW batch: the per-example variants' memory layout), `ours vmap`
(`ebn.BatchNorm(C, axis=0, axis_name="batch")` on (C, H, W) examples under
`jax.vmap(..., axis_name="batch")`, as Equinox models are written), `Flax`
(`flax.linen.BatchNorm`, NHWC batch) and `eqx` (`eqx.nn.BatchNorm(C, axis_name="batch",
mode="batch")` per example under `vmap`). In `resnet` every variant runs per example
under `vmap` (the demo's layout): Flax's layer through a small Equinox adapter with
`axis=0, axis_name="batch"`.

Equinox-style steps are `jax.jit` of a function of the parameters' and the state's
leaves, the module's static part closed over (what `eqx.filter_jit` does after
`eqx.partition`), so every variant is traced, compiled and called the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

import eqx_batchnorm as ebn  # noqa: E402

AXIS = "batch"
LAYERS = 53  # ResNet-50's BatchNorms
SHAPES = ((32, 8, 8, 16), (64, 16, 16, 64))  # logical (N, H, W, C)
SHAPE_NAMES = ("small", "large")  # `--shapes`
DTYPES = B.DTYPES
LR = 1e-2
STACK_VARIANTS = ("Flax", "Flax NCHW", "ours", "ours vmap", "eqx", "no BN", "no BN vmap")
# The same stacks with the identity for BatchNorm, batched and per example: the
# BatchNorms' cost is a stack's time less that of the one without, in the same layout.
BASELINE = {"Flax": "no BN", "Flax NCHW": "no BN vmap", "ours": "no BN",
            "ours vmap": "no BN vmap", "eqx": "no BN vmap"}
EAGER_VARIANTS = ("Flax", "ours", "ours vmap", "eqx")
RESNET_VARIANTS = ("Flax", "ours", "eqx", "no BN")
DEMO = Path(__file__).resolve().parent.parent / "examples" / "digits_demo.py"


# ---------------------------------------------------------------------------------------
# Steps: every variant as `make() -> step(params_leaves, state_leaves, *data)`, a fresh
# function per call of `make`, so that each trace and compile starts from nothing.


@dataclass
class Step:
    make: Callable[[], Callable[..., Any]]
    args: tuple


def _between(y: jax.Array, w: jax.Array, dtype: Any, channels_first: bool) -> jax.Array:
    # The non-BatchNorm work of the stack, the same in every variant: a relu and a 1x1
    # convolution (a channel-mixing matmul), in x's dtype (bfloat16 activations, as mixed
    # precision keeps them). The convolution is what makes the stack a network: with
    # elementwise work only, every layer's input is an elementwise function of the stack's
    # input and the statistics, and XLA fuses (recomputes) the whole chain into every
    # layer (an `optimization_barrier` does not stop it on XLA:CPU): the step and compile
    # times then grow with the square of the depth (measured: 0.3 ms per layer at 4
    # layers, 2.6 ms at 32, for Flax as for us).
    h = jax.nn.relu(y).astype(dtype)
    spec = "chw,cd->dhw" if channels_first else "nhwc,cd->nhwd"
    return jnp.einsum(spec, h, w.astype(dtype))


def _per_example(model: Callable) -> Callable:
    return jax.vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))


def _sgd(loss: Callable, p_leaves: list, *data) -> tuple[list, list, jax.Array]:
    (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(p_leaves, *data)
    return [p - LR * g for p, g in zip(p_leaves, grads, strict=True)], new_state, value


def equinox_step(model: eqx.Module, state: eqx.nn.State, data: tuple,
                 objective: Callable[[jax.Array, Any], jax.Array], per_example: bool) -> Step:
    """An Equinox model's SGD step, jittable with `jax.jit` on arrays only."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    s_leaves, s_def = jax.tree_util.tree_flatten(state)

    def make():
        def loss(p_leaves, s_leaves, x, *targets):
            m = eqx.combine(jax.tree_util.tree_unflatten(p_def, p_leaves), static)
            st = jax.tree_util.tree_unflatten(s_def, s_leaves)
            y, st = (_per_example(m) if per_example else m)(x, st)
            return objective(y, *targets), jax.tree_util.tree_leaves(st)

        def step(p_leaves, s_leaves, *data):
            return _sgd(lambda p, *d: loss(p, s_leaves, *d), p_leaves, *data)

        return step

    return Step(make, (p_leaves, s_leaves, *data))


def _mean_square(y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


class Stack(eqx.Module):
    """`layers` x (BatchNorm, relu, 1x1 convolution), an Equinox model on an NHWC batch
    or, `channels_first`, on (C, H, W) examples; the convolutions' weights are identity
    matrices unless `weights` are given."""

    norms: tuple
    weights: tuple
    channels_first: bool = eqx.field(static=True)

    def __init__(self, norm: Callable[[int], Any], c: int, layers: int, channels_first: bool,
                 weights: tuple | None = None):
        self.norms = tuple(norm(c) for _ in range(layers))
        self.weights = tuple(jnp.eye(c) for _ in range(layers)) if weights is None else weights
        self.channels_first = channels_first

    def __call__(self, x, state):
        for norm, w in zip(self.norms, self.weights, strict=True):
            y, state = norm(x, state)
            x = _between(y, w, x.dtype, self.channels_first)
        return x, state


class FlaxStack(nn.Module):
    """The stack in Flax, on an NHWC batch or, `channels_first`, on an NCHW one (the
    memory layout of the per-example variants, whose examples are (C, H, W))."""

    layers: int
    channels_first: bool = False

    @nn.compact
    def __call__(self, x):
        axis = 1 if self.channels_first else -1
        c = x.shape[axis]
        for i in range(self.layers):
            y = nn.BatchNorm(use_running_average=False, axis=axis)(x)
            w = self.param(f"weight_{i}", lambda key, c: jnp.eye(c), c)
            x = (jnp.einsum("nchw,cd->ndhw", jax.nn.relu(y).astype(x.dtype),
                            w.astype(x.dtype)) if self.channels_first
                 else _between(y, w, x.dtype, channels_first=False))
        return x


class NoNorm(eqx.nn.StatefulLayer):
    """The identity in a BatchNorm's place: the network without normalisation."""

    def __call__(self, x, state, *, key=None, inference=None):
        return x, state


def flax_step(model: nn.Module, variables: dict, data: tuple,
              objective: Callable[..., jax.Array]) -> Step:
    p_leaves, p_def = jax.tree_util.tree_flatten(variables["params"])
    s_leaves, s_def = jax.tree_util.tree_flatten(variables["batch_stats"])

    def make():
        def loss(p_leaves, s_leaves, x, *targets):
            v = {"params": jax.tree_util.tree_unflatten(p_def, p_leaves),
                 "batch_stats": jax.tree_util.tree_unflatten(s_def, s_leaves)}
            y, updates = model.apply(v, x, mutable=["batch_stats"])
            return objective(y, *targets), jax.tree_util.tree_leaves(updates["batch_stats"])

        def step(p_leaves, s_leaves, *data):
            return _sgd(lambda p, *d: loss(p, s_leaves, *d), p_leaves, *data)

        return step

    return Step(make, (p_leaves, s_leaves, *data))


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int, int]  # logical (N, H, W, C)
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.shape} {self.dtype}"

    def inputs(self) -> tuple[jax.Array, jax.Array]:
        """x as an NHWC batch and as NCHW (examples (C, H, W)): the same values."""
        x = jax.random.normal(jax.random.key(0), self.shape, jnp.float32) * 1.5 + 0.5
        x = x.astype(DTYPES[self.dtype])
        return x, jnp.transpose(x, (0, 3, 1, 2))


def _with_estimator(step: Step, name: str) -> Step:
    """`step` traced with the one-pass estimator `name` forced (a private hook: the
    layer picks its estimator per backend), to weigh the alternatives on one machine."""
    from eqx_batchnorm import _moments

    def make():
        inner = step.make()

        def traced(*args):
            chosen = _moments.estimator
            _moments.estimator = lambda fast: name if fast else "two_pass"
            try:
                return inner(*args)
            finally:
                _moments.estimator = chosen

        return traced

    return Step(make, step.args)


def stack_steps(case: Case, layers: int, estimators: tuple[str, ...] = ()) -> dict[str, Step]:
    c = case.shape[3]
    nhwc, nchw = case.inputs()
    norms = {
        "ours": (ebn.BatchNorm, False),
        "ours vmap": (lambda c: ebn.BatchNorm(c, axis=0, axis_name=AXIS), True),
        "eqx": (lambda c: eqx.nn.BatchNorm(c, axis_name=AXIS, mode="batch"), True),
        "no BN": (lambda c: NoNorm(), False),
        "no BN vmap": (lambda c: NoNorm(), True),
    }
    steps = {}
    for name, channels_first, x in (("Flax", False, nhwc), ("Flax NCHW", True, nchw)):
        flax_model = FlaxStack(layers, channels_first)
        steps[name] = flax_step(flax_model, flax_model.init(jax.random.key(0), x), (x,),
                                _mean_square)
    for name, (norm, per_example) in norms.items():
        model, state = eqx.nn.make_with_state(Stack)(norm, c, layers, per_example)
        steps[name] = equinox_step(model, state, (nchw if per_example else nhwc,),
                                   _mean_square, per_example)
    for est in estimators:
        steps[f"ours {est}"] = _with_estimator(steps["ours"], est)
        steps[f"ours vmap {est}"] = _with_estimator(steps["ours vmap"], est)
    return steps


# ---------------------------------------------------------------------------------------
# Measurements


def count_equations(jaxpr: Any) -> int:
    """Equations of a jaxpr, those of its sub-jaxprs (cond branches, inner jits) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jex.ClosedJaxpr):
                    n += count_equations(sub.jaxpr)
                elif isinstance(sub, jex.Jaxpr):
                    n += count_equations(sub)
    return n


def _rotations(names: list[str], rounds: int):
    for r in range(rounds):
        k = r % len(names)
        yield r, names[k:] + names[:k]


def per_round_ratios(samples: dict[str, list[float]], ref: str) -> dict[str, float]:
    base = np.array(samples[ref])
    return {k: float(np.median(np.array(v) / base)) for k, v in samples.items()}


def compile_costs(steps: dict[str, Step], rounds: int) -> dict[str, Any]:
    """Trace, lowering and XLA compile of fresh functions, alternating variants; the last
    round's executables are returned too, for the step times, with their XLA temporary
    memory (`memory_analysis().temp_size_in_bytes`)."""
    phases = ("trace", "lower", "compile")
    samples = {p: {name: [] for name in steps} for p in phases}
    eqns: dict[str, dict[str, int]] = {}
    temp: dict[str, int | None] = {}
    executables: dict[str, Callable[[], Any]] = {}
    for _, order in _rotations(list(steps), rounds):
        for name in order:
            jax.clear_caches()
            f = jax.jit(steps[name].make())
            t0 = time.perf_counter()
            traced = f.trace(*steps[name].args)
            t1 = time.perf_counter()
            lowered = traced.lower()
            t2 = time.perf_counter()
            compiled = lowered.compile()
            t3 = time.perf_counter()
            for p, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                samples[p][name].append(t)
            eqns[name] = {"top level": len(traced.jaxpr.jaxpr.eqns),
                          "total": count_equations(traced.jaxpr.jaxpr)}
            memory = compiled.memory_analysis()
            temp[name] = None if memory is None else int(memory.temp_size_in_bytes)
            executables[name] = lambda c=compiled, a=steps[name].args: c(*a)
    return {"samples": samples, "equations": eqns, "temp_bytes": temp, "calls": executables}


def alternate(calls: dict[str, Callable[[], Any]], rounds: int, sample_s: float,
              warm_up: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument callable, one sample per round each, the
    order rotating; a sample is enough calls for `sample_s` of the slowest (at least one),
    then `block_until_ready`."""
    for f in calls.values():
        for _ in range(warm_up):
            jax.block_until_ready(f())
    slowest = 0.0
    for f in calls.values():
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        slowest = max(slowest, time.perf_counter() - t0)
    reps = max(1, int(round(sample_s / slowest)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _, order in _rotations(list(calls), rounds):
        for name in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                out = calls[name]()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / reps)
    return samples


def bn_costs(samples: dict[str, dict[str, list[float]]],
             baseline: dict[str, str]) -> dict[str, dict[str, float]]:
    """The BatchNorms' share of each quantity (step, trace, lower, compile): per round, a
    variant's seconds less those of its network without BatchNorm; the median."""
    return {q: {k: float(statistics.median(np.array(by[k]) - np.array(by[b])))
                for k, b in baseline.items()} for q, by in samples.items()}


@dataclass
class Section:
    """One case of a section: raw samples (seconds) and their summaries."""

    case: str
    medians: dict[str, dict[str, float]] = field(default_factory=dict)  # quantity -> variant
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # quantity -> variant
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, quantity: str, samples: dict[str, list[float]], ref: str = "Flax") -> None:
        self.medians[quantity] = {k: statistics.median(v) for k, v in samples.items()}
        self.ratios[quantity] = per_round_ratios(samples, ref)
        if "Flax NCHW" in samples:  # the per-example variants' layout-matched anchor
            self.extra.setdefault("ratio_to_Flax_NCHW", {})[quantity] = per_round_ratios(
                samples, "Flax NCHW")

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "median_s": self.medians, "ratio_to_Flax": self.ratios,
                **self.extra}


def _measure(title: str, steps: dict[str, Step], baseline: Any, rounds: int,
             compile_rounds: int, sample_s: float) -> Section:
    """Trace, lower, compile and step times of `steps`, and their BatchNorms' share."""
    out = Section(title)
    costs = compile_costs(steps, compile_rounds)
    for phase, samples in costs["samples"].items():
        out.add(phase, samples)
    out.extra["equations"] = costs["equations"]
    step = alternate(costs["calls"], rounds, sample_s)
    out.add("step", step)
    out.extra["bn_cost_s"] = bn_costs({"step": step, **costs["samples"]}, baseline)
    return out


def run_stack(case: Case, layers: int, rounds: int, compile_rounds: int,
              sample_s: float, estimators: tuple[str, ...] = ()) -> Section:
    baseline = {**BASELINE, **{f"ours {e}": "no BN" for e in estimators},
                **{f"ours vmap {e}": "no BN vmap" for e in estimators}}
    return _measure(f"{layers} layers, x {case.label}", stack_steps(case, layers, estimators),
                    baseline, rounds, compile_rounds, sample_s)


# ---------------------------------------------------------------------------------------
# Scan over layers: the stack's blocks stacked along a leading axis and applied with
# `jax.lax.scan` (`ebn.scan_blocks`, Flax's `nn.scan`), against the same stack unrolled


SCAN_DEPTHS = (8, 16, 32, LAYERS)
SCAN_VARIANTS = ("Flax", "Flax scan", "ours", "ours scan", "ours vmap", "ours vmap scan")
UNROLLED = {"Flax scan": "Flax", "ours scan": "ours", "ours vmap scan": "ours vmap"}
SCANNED = ("ours scan", "ours vmap scan")


def _weight(key: jax.Array, c: int) -> jax.Array:
    # The identity perturbed from the block's key: the blocks differ, so that the check of
    # the scanned variants against the unrolled ones sees the blocks' order.
    return jnp.eye(c) + 0.1 / np.sqrt(c) * jax.random.normal(key, (c, c))


class Block(eqx.Module):
    """One block of the stack: a BatchNorm, then `_between` (relu, 1x1 convolution)."""

    norm: Any
    weight: jax.Array
    channels_first: bool = eqx.field(static=True)

    def __init__(self, norm: Callable[[int], Any], c: int, channels_first: bool,
                 key: jax.Array):
        self.norm = norm(c)
        self.weight = _weight(key, c)
        self.channels_first = channels_first

    def __call__(self, x, state):
        y, state = self.norm(x, state)
        return _between(y, self.weight, x.dtype, self.channels_first), state


class Scanned(eqx.Module):
    """Blocks stacked by `ebn.stack_blocks`, applied by `ebn.scan_blocks` (per example,
    under its `vmap`, with an `axis_name`)."""

    blocks: Block
    axis_name: str | None = eqx.field(static=True)

    def __call__(self, x, state):
        return ebn.scan_blocks(self.blocks, state, x, axis_name=self.axis_name)


class FlaxBlock(nn.Module):
    """One block of `FlaxStack` (NHWC), in `nn.scan`'s form `(carry, x) -> (carry, y)`."""

    @nn.compact
    def __call__(self, x, _):
        y = nn.BatchNorm(use_running_average=False)(x)
        w = self.param("weight", lambda key, c: jnp.eye(c), x.shape[-1])
        return _between(y, w, x.dtype, channels_first=False), None


class FlaxScanStack(nn.Module):
    """`FlaxStack` with `nn.scan` over its blocks: parameters and batch statistics stacked
    along a leading axis."""

    layers: int

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(FlaxBlock, variable_axes={"params": 0, "batch_stats": 0},
                         split_rngs={"params": True}, length=self.layers)
        return blocks(name="blocks")(x, None)[0]


def scan_steps(case: Case, depth: int) -> dict[str, Step]:
    """The six variants at `depth`, with the same initial values: the unrolled models'
    convolutions take the weights that `ebn.stack_blocks` gives its blocks (one key each,
    split from the same key), Flax's are set to them after `init`."""
    c = case.shape[3]
    nhwc, nchw = case.inputs()
    key = jax.random.key(0)
    weights = tuple(_weight(k, c) for k in jax.random.split(key, depth))
    steps = {}
    flax_model = FlaxStack(depth)
    v = jax.jit(flax_model.init)(jax.random.key(0), nhwc)  # jitted: one compile, not many
    v = {**v, "params": {**v["params"], **{f"weight_{i}": w for i, w in enumerate(weights)}}}
    steps["Flax"] = flax_step(flax_model, v, (nhwc,), _mean_square)
    scan_model = FlaxScanStack(depth)
    v = jax.jit(scan_model.init)(jax.random.key(0), nhwc)
    assert v["params"]["blocks"]["weight"].shape == (depth, c, c)
    v = {**v, "params": {"blocks": {**v["params"]["blocks"], "weight": jnp.stack(weights)}}}
    steps["Flax scan"] = flax_step(scan_model, v, (nhwc,), _mean_square)
    norms = {"ours": (ebn.BatchNorm, False),
             "ours vmap": (lambda c: ebn.BatchNorm(c, axis=0, axis_name=AXIS), True)}
    for name, (norm, per_example) in norms.items():
        x = nchw if per_example else nhwc
        model, state = eqx.nn.make_with_state(Stack)(norm, c, depth, per_example, weights)
        steps[name] = equinox_step(model, state, (x,), _mean_square, per_example)
        blocks, state = ebn.stack_blocks(partial(Block, norm, c, per_example), depth, key)
        steps[f"{name} scan"] = equinox_step(Scanned(blocks, AXIS if per_example else None),
                                             state, (x,), _mean_square, per_example=False)
    return {name: steps[name] for name in SCAN_VARIANTS}


def check_scanned(steps: dict[str, Step], calls: dict[str, Callable[[], Any]],
                  rtol: float = 1e-5) -> dict[str, list[float]]:
    """Each scanned variant against its unrolled model (same initial values), on the
    compiled steps' outputs, before any step is timed: the loss, the squared norm of the
    SGD update and that of the new running statistics, to `rtol`. Returns them."""
    out = {}
    for name in steps:
        new_params, new_state, value = calls[name]()
        update = sum(float(jnp.sum(jnp.square(n - o)))
                     for n, o in zip(new_params, steps[name].args[0], strict=True))
        stats = sum(float(jnp.sum(jnp.square(s))) for s in new_state)
        out[name] = [float(value), update, stats]
    for scanned, unrolled in UNROLLED.items():
        a, b = np.array(out[scanned]), np.array(out[unrolled])
        if not np.allclose(a, b, rtol=rtol, atol=0.0):
            raise AssertionError(f"{scanned} and {unrolled} disagree: (loss, |update|^2, "
                                 f"|stats|^2) {a.tolist()} against {b.tolist()}")
    return out


def _ratio(by: dict[str, list[float]], name: str, ref: str) -> float:
    """The median of per-round ratios of two variants' samples."""
    return float(np.median(np.array(by[name]) / np.array(by[ref])))


def run_scan(case: Case, depths: list[int], rounds: int, compile_rounds: int,
             sample_s: float) -> list[Section]:
    """Every depth's variants measured together, in the same alternating rounds, so that
    the ratios across depths (compile growth) are per-round ratios too; one section per
    depth."""
    steps, key = {}, {}
    for depth in depths:
        for name, step in scan_steps(case, depth).items():
            key[depth, name] = f"{depth}/{name}"
            steps[key[depth, name]] = step
    costs = compile_costs(steps, compile_rounds)
    checks = {depth: check_scanned({n: steps[key[depth, n]] for n in SCAN_VARIANTS},
                                   {n: costs["calls"][key[depth, n]] for n in SCAN_VARIANTS})
              for depth in depths}
    samples = {**costs["samples"], "step": alternate(costs["calls"], rounds, sample_s)}
    sections, low = [], min(depths)
    for depth in depths:
        out = Section(f"{depth} blocks, x {case.label}")
        mine = {q: {n: by[key[depth, n]] for n in SCAN_VARIANTS} for q, by in samples.items()}
        for quantity, by in mine.items():
            out.add(quantity, by)
        out.extra.update(
            x=case.label, depth=depth, check=checks[depth],
            equations={n: costs["equations"][key[depth, n]] for n in SCAN_VARIANTS},
            temp_bytes={n: costs["temp_bytes"][key[depth, n]] for n in SCAN_VARIANTS},
            ratio_to_Flax_scan={q: per_round_ratios(by, "Flax scan") for q, by in mine.items()},
            # A scanned variant over the same model unrolled, same style.
            ratio_to_unrolled={q: {k: _ratio(by, k, u) for k, u in UNROLLED.items()}
                               for q, by in mine.items()},
            # Each variant over itself at the shallowest depth: how its costs grow.
            shallowest=low,
            ratio_to_shallowest={q: {n: _ratio(by, key[depth, n], key[low, n])
                                     for n in SCAN_VARIANTS} for q, by in samples.items()})
        sections.append(out)
    return sections


def scan_targets(sections: list[Section]) -> list[dict[str, Any]]:
    """What we aim for with scanned models, checked at the deepest stack of a case (growth:
    over the shallowest one, per round); temporary memory at every depth."""
    out = []

    def target(name: str, limit: float, values: dict[str, float], note: str = "") -> None:
        out.append({"target": name, "limit": limit, "values": values, "note": note,
                    "met": all(v <= limit for v in values.values())})

    for x in dict.fromkeys(s.extra["x"] for s in sections):
        mine = sorted((s for s in sections if s.extra["x"] == x), key=lambda s: s.extra["depth"])
        low, high = mine[0], mine[-1]
        n = high.extra["depth"]
        where = f"{n} blocks, x {x}"
        target(f"compile / Flax unrolled, {where}", 0.5,
               {k: high.ratios["compile"][k] for k in SCANNED},
               f"Flax scan {B._x(high.ratios['compile']['Flax scan'])}")
        target(f"compile / Flax scan, {where}", 1.1,
               {k: high.extra["ratio_to_Flax_scan"]["compile"][k] for k in SCANNED})
        target(f"trace / Flax scan, {where}", 1.0,
               {k: high.extra["ratio_to_Flax_scan"]["trace"][k] for k in SCANNED})
        target(f"step / our unrolled step (same style), {where}", 1.1,
               {k: high.extra["ratio_to_unrolled"]["step"][k] for k in SCANNED},
               f"Flax scan / Flax {B._x(high.extra['ratio_to_unrolled']['step']['Flax scan'])}")
        if high is not low:
            growth = high.extra["ratio_to_shallowest"]["compile"]
            target(f"compile growth, {high.extra['shallowest']} to {n} blocks, x {x}", 1.3,
                   {k: growth[k] for k in SCANNED}, ", ".join(
                       f"{k} {B._x(growth[k])}" for k in SCAN_VARIANTS if k not in SCANNED))
        for ours, flax in (("ours scan", "Flax scan"), ("ours vmap scan", "Flax scan"),
                           ("ours", "Flax"), ("ours vmap", "Flax")):
            if any(s.extra["temp_bytes"][k] is None for s in mine for k in (ours, flax)):
                continue  # a backend without XLA's memory analysis
            worst = max(mine, key=lambda s: s.extra["temp_bytes"][ours]
                        / s.extra["temp_bytes"][flax])
            t = worst.extra["temp_bytes"]
            target(f"temp memory {ours} / {flax}, x {x}", 1.0, {ours: t[ours] / t[flax]},
                   f"worst at {worst.extra['depth']} blocks: {t[ours] / 2**20:.2f} MiB "
                   f"against {t[flax] / 2**20:.2f} MiB")
    return out


# ---------------------------------------------------------------------------------------
# Eager: one layer's training call, no jit


class _EventCounter:
    """Counts JAX's compile-time events (`jax.monitoring`) while active."""

    EVENTS = {"/jax/core/compile/backend_compile_duration": "compiles",
              "/jax/core/compile/jaxpr_trace_duration": "traces"}

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in self.EVENTS:
            self.counts[self.EVENTS[event]] += 1

    def __enter__(self):
        self.counts.clear()
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


class _Threaded:
    """A training call that threads its state from call to call, as a training loop does
    (an `eqx.nn.State` may be consumed only once)."""

    def __init__(self, call: Callable[[Any], tuple[jax.Array, Any]], state: Any):
        self.call, self.state = call, state

    def __call__(self):
        y, self.state = self.call(self.state)
        return y, self.state


def eager_calls(case: Case) -> dict[str, Callable[[], _Threaded]]:
    """Fresh layers, one per variant, built on demand."""
    c = case.shape[3]
    nhwc, nchw = case.inputs()

    def ours():
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(c)
        return _Threaded(lambda s: bn(nhwc, s), state)

    def ours_vmap():
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(c, axis=0, axis_name=AXIS)
        return _Threaded(lambda s: _per_example(bn)(nchw, s), state)

    def flax():
        layer = nn.BatchNorm(use_running_average=False)
        variables = layer.init(jax.random.key(0), nhwc)

        def call(stats):
            y, upd = layer.apply({"params": variables["params"], "batch_stats": stats},
                                 nhwc, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        return _Threaded(call, variables["batch_stats"])

    def eqx_():
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name=AXIS, mode="batch")
        return _Threaded(lambda s: _per_example(bn)(nchw, s), state)

    return {"Flax": flax, "ours": ours, "ours vmap": ours_vmap, "eqx": eqx_}


def run_eager(case: Case, calls: int, rounds: int, sample_s: float) -> Section:
    out = Section(f"one layer, x {case.label}")
    compiles: dict[str, dict[str, int]] = {}
    layers = {}
    for name, build in eager_calls(case).items():
        layers[name] = layer = build()
        jax.clear_caches()
        with _EventCounter() as first:
            jax.block_until_ready(layer())
        with _EventCounter() as later:
            for _ in range(calls - 1):
                jax.block_until_ready(layer())
        compiles[name] = {"compiles call 1": first.counts["compiles"],
                          "traces call 1": first.counts["traces"],
                          f"compiles calls 2..{calls}": later.counts["compiles"],
                          f"traces calls 2..{calls}": later.counts["traces"]}
    out.extra["calls"] = calls
    out.extra["compile_counts"] = compiles
    # One warm-up call: the `jax.clear_caches()` of the later layers emptied the earlier
    # ones' caches.
    out.add("call", alternate(layers, rounds, sample_s, warm_up=1))
    return out


# ---------------------------------------------------------------------------------------
# The demo's ResNet


def load_demo():
    """`examples/digits_demo.py` as a module (it needs the `demo` extra's packages)."""
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_demo"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class FlaxBatchNorm(eqx.nn.StatefulLayer):
    """`flax.linen.BatchNorm` as an Equinox stateful layer on (C, H, W) examples under
    `vmap` (`axis=0`, statistics shared over the vmap's named axis), its parameters as
    leaves and its `batch_stats` in the `eqx.nn.State`."""

    params: dict
    index: eqx.nn.StateIndex
    momentum: float = eqx.field(static=True)

    def __init__(self, channels: int, momentum: float):
        # Flax's own initial values: scale 1, bias 0, running mean 0, running variance 1.
        self.params = {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}
        self.index = eqx.nn.StateIndex({"mean": jnp.zeros(channels),
                                        "var": jnp.ones(channels)})
        self.momentum = momentum

    def __call__(self, x, state, *, key=None, inference=None):
        layer = nn.BatchNorm(use_running_average=False, axis=0, momentum=self.momentum,
                             axis_name=AXIS)
        y, updates = layer.apply({"params": self.params, "batch_stats": state.get(self.index)},
                                 x, mutable=["batch_stats"])
        return y, state.set(self.index, updates["batch_stats"])


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def resnet_steps(demo: Any, batch: int) -> dict[str, Step]:
    x = jax.random.uniform(jax.random.key(1), (batch, 1, 8, 8), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    norms = {"Flax": lambda c: FlaxBatchNorm(c, demo.MOMENTUM), "ours": demo.ebn_norm,
             "eqx": demo.eqx_norm, "no BN": lambda c: NoNorm()}
    steps = {}
    for name, norm in norms.items():
        model, state = eqx.nn.make_with_state(demo.ResNet)(norm, jax.random.key(0))
        steps[name] = equinox_step(model, state, (x, labels), _cross_entropy,
                                   per_example=True)
    return steps


def run_resnet(batch: int, rounds: int, compile_rounds: int, sample_s: float) -> Section:
    return _measure(f"digits ResNet, batch {batch}", resnet_steps(load_demo(), batch),
                    {k: "no BN" for k in ("Flax", "ours", "eqx")}, rounds, compile_rounds,
                    sample_s)


# ---------------------------------------------------------------------------------------
# Report


def _ratio_cell(section: Section, quantity: str, name: str) -> str:
    return f"**{B._x(section.ratios[quantity].get(name))}**"


def _bn_cells(s: Section, quantity: str, name: str) -> str:
    """The BatchNorms' share of a quantity, and its ratio to Flax's share."""
    cost = s.extra["bn_cost_s"][quantity]
    if name not in cost:
        return "| | "
    share = B._x(cost[name] / cost["Flax"]) if cost["Flax"] > 0 else ""
    return f"| {B._ms(cost[name])} | {share} "


def stack_table(sections: list[Section]) -> str:
    lines = ["| case | variant | step ms | **step/Flax** | BN ms per step | BN/Flax's BN "
             "| trace ms | **trace/Flax** | lower ms | **lower/Flax** | XLA compile ms "
             "| **compile/Flax** | BN compile ms | jaxpr eqns (total) |", "|" + "---|" * 14]
    for s in sections:
        for name in s.medians["step"]:
            eq = s.extra["equations"][name]
            lines.append(
                f"| {s.case} | {name} | {B._ms(s.medians['step'][name])} "
                f"| {_ratio_cell(s, 'step', name)} {_bn_cells(s, 'step', name)}"
                f"| {B._ms(s.medians['trace'][name])} | {_ratio_cell(s, 'trace', name)} "
                f"| {B._ms(s.medians['lower'][name])} | {_ratio_cell(s, 'lower', name)} "
                f"| {B._ms(s.medians['compile'][name])} | {_ratio_cell(s, 'compile', name)} "
                f"| {B._ms(s.extra['bn_cost_s']['compile'].get(name))} "
                f"| {eq['top level']} ({eq['total']}) |")
    return "\n".join(lines)


def layout_table(sections: list[Section]) -> str:
    """The per-example variants against Flax on the same (channels-first) memory layout."""
    lines = ["| case | variant | **step/Flax NCHW** | BN/Flax NCHW's BN | **trace/Flax NCHW** "
             "| **compile/Flax NCHW** | Flax NCHW compile/Flax |", "|" + "---|" * 7]
    for s in sections:
        by = s.extra["ratio_to_Flax_NCHW"]
        cost = s.extra["bn_cost_s"]["step"]
        for name in ("ours vmap", "eqx"):
            share = cost[name] / cost["Flax NCHW"] if cost["Flax NCHW"] > 0 else None
            lines.append(
                f"| {s.case} | {name} | **{B._x(by['step'][name])}** | {B._x(share)} "
                f"| **{B._x(by['trace'][name])}** | **{B._x(by['compile'][name])}** "
                f"| {B._x(s.ratios['compile']['Flax NCHW'])} |")
    return "\n".join(lines)


def eager_table(sections: list[Section]) -> str:
    lines = ["| case | variant | ms per call | **call/Flax** | compiles, call 1 "
             "| compiles, later calls | traces, later calls |", "|" + "---|" * 7]
    for s in sections:
        n = s.extra["calls"]
        for name in EAGER_VARIANTS:
            c = s.extra["compile_counts"][name]
            lines.append(
                f"| {s.case} | {name} | {B._ms(s.medians['call'][name])} "
                f"| {_ratio_cell(s, 'call', name)} | {c['compiles call 1']} "
                f"| {c[f'compiles calls 2..{n}']} | {c[f'traces calls 2..{n}']} |")
    return "\n".join(lines)


def resnet_table(s: Section) -> str:
    lines = ["| variant | step ms | **step/Flax** | BN ms per step | BN/Flax's BN "
             "| trace ms | XLA compile ms | **compile/Flax** | BN compile ms "
             "| jaxpr eqns (total) |", "|" + "---|" * 10]
    for name in RESNET_VARIANTS:
        eq = s.extra["equations"][name]
        lines.append(
            f"| {name} | {B._ms(s.medians['step'][name])} | {_ratio_cell(s, 'step', name)} "
            f"{_bn_cells(s, 'step', name)}| {B._ms(s.medians['trace'][name])} "
            f"| {B._ms(s.medians['compile'][name])} | {_ratio_cell(s, 'compile', name)} "
            f"| {B._ms(s.extra['bn_cost_s']['compile'].get(name))} "
            f"| {eq['top level']} ({eq['total']}) |")
    return "\n".join(lines)


def scan_table(sections: list[Section]) -> str:
    """One case's depths, narrow enough for the docs page (`bench.TABLE_COLUMNS`): a row per
    variant, each time with its ratio to Flax unrolled at the same depth."""

    def cell(s: Section, quantity: str, name: str, digits: int) -> str:
        return f"{s.medians[quantity][name] * 1e3:.{digits}f} ({B._x(s.ratios[quantity][name])})"

    rows = []
    for s in sections:
        for i, name in enumerate(SCAN_VARIANTS):
            temp = s.extra["temp_bytes"][name]
            rows.append([str(s.extra["depth"]) if i == 0 else "", name,
                         cell(s, "trace", name, 1), cell(s, "compile", name, 1),
                         cell(s, "step", name, 2), "" if temp is None else f"{temp / 2**20:.2f}"])
    return B._table(["blocks", "variant", "trace ms (/Flax)", "compile ms (/Flax)",
                     "step ms (/Flax)", "temp MiB"], rows)


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    return [f"- [{'x' if t['met'] else ' '}] {t['target']} <= {t['limit']}x: "
            + ", ".join(f"{k} {B._x(v)}" for k, v in t["values"].items())
            + (f" ({t['note']})" if t["note"] else "") for t in targets]


SECTIONS = ("stack", "eager", "resnet", "scan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: one shape in float32, "
                   "a stack of 4, scanned stacks of 8, 2 rounds, 1 compile round, 3 eager "
                   "calls")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds of the steps and eager calls (default 30)")
    p.add_argument("--compile-rounds", type=int, default=None,
                   help="fresh trace+compile rounds per variant (default 3)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"BatchNorms in the stack (default {LAYERS})")
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help="x's dtypes in the stack, eager and scan sections: comma-separated "
                   "subset of " + ", ".join(DTYPES))
    p.add_argument("--shapes", default=",".join(SHAPE_NAMES),
                   help="x's shapes in the stack, eager and scan sections: comma-separated "
                   "subset of " + ", ".join(f"{n} {s}" for n, s in zip(SHAPE_NAMES, SHAPES,
                                                                         strict=True)))
    p.add_argument("--depths", default=None,
                   help="scan: the stacks' depths, comma-separated (default "
                   + ",".join(map(str, SCAN_DEPTHS)) + f", {SCAN_DEPTHS[0]} with --quick)")
    p.add_argument("--batch", type=int, default=64, help="the ResNet's batch (default 64)")
    p.add_argument("--eager-calls", type=int, default=None,
                   help="eager calls counted for compilations (default 20)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="target duration of one timing sample (default 10 ms on a CPU, "
                   "25 ms elsewhere; a sample is at least one call)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--estimators", default="",
                   help="stack: also our layer with each of these one-pass estimators "
                   "forced (comma-separated: summed, shifted), e.g. to weigh XLA:CPU's "
                   "choice")
    p.add_argument("--json", default=None, help="also write the raw numbers to this file "
                   "(rewritten after each section)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    rounds = args.rounds or (2 if args.quick else 30)
    compile_rounds = args.compile_rounds or (1 if args.quick else 3)
    layers = args.layers or (4 if args.quick else LAYERS)
    depths = ([int(d) for d in args.depths.split(",")] if args.depths
              else list(SCAN_DEPTHS[:1] if args.quick else SCAN_DEPTHS))
    calls = args.eager_calls or (3 if args.quick else 20)
    sample_s = (args.sample_ms or (10.0 if jax.default_backend() == "cpu" else 25.0)) / 1e3
    shapes = SHAPES[:1] if args.quick else [
        s for n, s in zip(SHAPE_NAMES, SHAPES, strict=True) if n in args.shapes.split(",")]
    dtypes = ("f32",) if args.quick else [d for d in DTYPES if d in args.dtypes.split(",")]
    cases = [Case(s, dt) for s in shapes for dt in dtypes]

    info = B.machine()
    command = "python benchmarks/deep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    raw: dict[str, Any] = {"machine": info, "command": command.strip(), "rounds": rounds,
                           "compile_rounds": compile_rounds, "layers": layers,
                           "depths": depths}
    start = time.perf_counter()

    def emit(key: str, value: Any, lines: list[str]) -> None:
        # Each section is printed and saved as soon as it is done: a run cut short (a
        # time limit on a lent GPU) keeps what it measured.
        raw[key] = value
        raw["seconds"] = time.perf_counter() - start
        print("\n".join(lines), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(raw, f, indent=1, default=str)

    def log(*a):
        # With the process's CPU seconds so far: on a shared machine, a load-independent
        # measure of what a run costs.
        print(*a, f"[{time.perf_counter() - start:.0f} s, CPU {time.process_time():.0f} s]",
              file=sys.stderr, flush=True)

    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"Command: `{command.strip()}`", end="\n\n", flush=True)
    if "stack" in sections:
        done = []
        for case in cases:
            done.append(run_stack(case, layers, rounds, compile_rounds, sample_s,
                                  tuple(e for e in args.estimators.split(",") if e)))
            log(f"stack {case.label}: step/Flax {done[-1].ratios['step']}")
        emit("stack", [s.to_json() for s in done], [
            f"### A stack of {layers} BatchNorms: one SGD step", "",
            "Each BatchNorm followed by a relu and a 1x1 convolution. Times: medians; "
            "ratios: **medians of per-round ratios** to Flax. Trace, lower, compile: fresh "
            f"functions after `jax.clear_caches()`, {compile_rounds} round(s); step: "
            f"{rounds} rounds. BN ms: median per-round difference to the stack without "
            "BatchNorm in the same layout (`no BN`: NHWC batch; `no BN vmap`: per "
            "example); BN/Flax's BN: ratio of those medians. Equations: the step's jaxpr, "
            "top level (all, sub-jaxprs included).", "", stack_table(done), "",
            "Per example, the batch is laid out channels-first (N, C, H, W); `Flax NCHW` is "
            "Flax's BatchNorm (`axis=1`) on that layout, the same network otherwise:", "",
            layout_table(done), ""])
    if "eager" in sections:
        done = []
        for case in cases:
            done.append(run_eager(case, calls, rounds, sample_s))
            log(f"eager {case.label}: call/Flax {done[-1].ratios['call']}")
        emit("eager", [s.to_json() for s in done], [
            "### One layer's eager training call (no jit)", "",
            f"Time per call: median over {rounds} rounds; compilations counted by "
            "`jax.monitoring` on a fresh layer after `jax.clear_caches()`, on the first "
            f"call and on calls 2..{calls}.", "", eager_table(done), ""])
    if "resnet" in sections:
        try:
            resnet = run_resnet(args.batch, rounds, compile_rounds, sample_s)
        except ImportError as e:  # the demo's packages (optax, scikit-learn, ...) missing
            emit("resnet", {"not run": f"examples/digits_demo.py: {e}"}, [
                "### The demo's ResNet", "", "Not run: examples/digits_demo.py could not "
                f"be imported ({e}); install the `demo` extra.", ""])
        else:
            log(f"resnet: step/Flax {resnet.ratios['step']}")
            emit("resnet", resnet.to_json(), [
                "### The demo's ResNet (examples/digits_demo.py): one SGD step", "",
                f"Batch {args.batch} of (1, 8, 8) examples under `vmap`; {compile_rounds} "
                f"compile round(s), {rounds} step rounds. BN ms per step: median per-round "
                "difference to the network without BatchNorm; BN/Flax's BN: ratio of those "
                "medians; BN compile ms: likewise for XLA's compile.", "",
                resnet_table(resnet), ""])
    if "scan" in sections:
        print("\n".join([
            "### Scan over layers: one SGD step", "",
            "The stack's blocks (BatchNorm, relu, 1x1 convolution) stacked and applied with "
            "`jax.lax.scan` (`ebn.scan_blocks`; Flax: `nn.scan`), and the same model "
            "unrolled, with the same initial values (checked: equal losses, updates and "
            "running statistics). Times: medians; ratios: **medians of per-round ratios** "
            "to Flax unrolled at the same depth, every depth measured in the same rounds. "
            "Trace, compile: fresh functions after `jax.clear_caches()`, "
            f"{compile_rounds} round(s); step: {rounds} rounds; temp: the compiled step's "
            "XLA temporary memory.", ""]), flush=True)
        done = []
        for case in cases:
            mine = run_scan(case, depths, rounds, compile_rounds, sample_s)
            for s in mine:
                log(f"scan {s.case}: compile/Flax {s.ratios['compile']}")
            done += mine
            # Saved case by case: a run cut short keeps the cases it finished.
            emit("scan", {"depths": [s.to_json() for s in done]},
                 [f"x {case.label}:", "", scan_table(mine), ""])
        targets = scan_targets(done)
        last = done[len(depths) - 1]
        emit("scan", {"depths": [s.to_json() for s in done], "targets": targets}, [
            "What we aim for (medians of per-round ratios):", "",
            *target_lines(targets), "",
            f"The step's jaxpr equations, sub-jaxprs included (top level in brackets), "
            f"{last.case}: " + "; ".join(f"{k} {e['total']} ({e['top level']})"
                                         for k, e in last.extra["equations"].items()) + ".",
            ""])
    print(f"Done in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
