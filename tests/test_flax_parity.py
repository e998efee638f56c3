"""`ebn.BatchNorm` against `flax.linen.BatchNorm` (the oracle), over a pairwise grid.

Every configuration compares, for the same batch, parameters, running statistics and
output cotangent: the output (values and dtype), the new running statistics (values and
dtype) and the gradients with respect to `x`, `scale` and `bias`. The per-example style
(`jax.vmap` with `axis_name`) is compared with Flax's batched call on the stacked batch.

The grid is not a cartesian product: `_pairwise_grid` picks configurations greedily until
every pair of values of any two factors appears together at least once (plus a few
hand-picked corners), which finds every bug caused by the interaction of two settings at
a fraction of the cost.

Data is `normal * 2 + 0.5`: Flax's fast variance `E[x^2] - E[x]^2` is only accurate while
`|mean| / std` is small, and this library's fast variance is deliberately more accurate
than Flax's when it is not (tested in `test_fast_variance_beats_flax_when_mean_dominates`).
"""

import dataclasses
import itertools
import random
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eqx_batchnorm as ebn

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)

# Batched shapes, one per rank, every feature size distinct so that a mix-up of axes fails.
SHAPES = {2: (6, 3), 3: (4, 5, 3), 4: (3, 4, 5, 6), 5: (2, 3, 4, 3, 5)}
# Feature axes of the batched x for each kind; never 0, so that the per-example style (the
# same axes shifted by one) is defined for every configuration.
AXES = {
    2: {"pos": 1, "neg": -1},
    3: {"pos": 1, "neg": -2, "tuple": (1, -1)},
    4: {"pos": 1, "neg": -1, "tuple": (-1, 1)},  # given out of order: Flax sorts them
    5: {"pos": 3, "neg": -4, "tuple": (1, 3)},
}

FACTORS: dict[str, tuple[Any, ...]] = {
    "rank": (2, 3, 4, 5),
    "axis": ("pos", "neg", "tuple"),
    "x_dtype": (F32, BF16, F16),
    "param_dtype": (F32, BF16),
    "dtype": (None, F32, BF16),
    "use_bias": (True, False),
    "use_scale": (True, False),
    "fast": (True, False),
    "momentum": (0.0, 0.9, 0.99),
    "epsilon": (1e-5, 1e-3, 0.1),
    "mask": ("none", "full", "examples"),
    "inference": (False, True),
    "ffr": (True, False),
    "style": ("batched", "per_example"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    rank: int
    axis: str
    x_dtype: Any
    param_dtype: Any
    dtype: Any
    use_bias: bool
    use_scale: bool
    fast: bool
    momentum: float
    epsilon: float
    mask: str  # "none", "full" (elementwise) or "examples" (whole examples, broadcast)
    inference: bool
    ffr: bool  # force_float32_reductions
    style: str  # "batched" (Flax's) or "per_example" (jax.vmap with axis_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return SHAPES[self.rank]

    @property
    def batched_axis(self) -> int | tuple[int, ...]:
        return AXES[self.rank][self.axis]

    def __str__(self) -> str:
        def name(v):
            return jnp.dtype(v).name if isinstance(v, np.dtype) else str(v)

        return "-".join(f"{k}={name(v)}" for k, v in dataclasses.asdict(self).items())


def _valid(values: dict[str, Any]) -> bool:
    return values["axis"] in AXES[values["rank"]]


def _pairwise_grid(seed: int = 0, candidates: int = 40) -> list[Config]:
    """A greedy (AETG-style) covering array of strength 2 over `FACTORS`."""
    rng = random.Random(seed)
    names = list(FACTORS)
    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in FACTORS[a]
        for vb in FACTORS[b]
        if _valid({"rank": va if a == "rank" else 5, "axis": vb if b == "axis" else "pos"})
    }
    grid = []
    while uncovered:
        best, best_gain = None, -1
        # Seed every candidate with one uncovered pair, so each round makes progress.
        seeds = rng.sample(sorted(uncovered, key=repr), min(candidates, len(uncovered)))
        for (a, va), (b, vb) in seeds:
            values = {a: va, b: vb}
            for n in rng.sample(names, len(names)):
                if n in values:
                    continue
                options = [v for v in FACTORS[n] if _valid({"rank": 5, "axis": "pos",
                                                            **values, n: v})]
                values[n] = max(options, key=lambda v, n=n: (sum(
                    ((n, v), (m, values[m])) in uncovered or ((m, values[m]), (n, v))
                    in uncovered for m in values), rng.random()))
            if not _valid(values):
                continue
            gain = sum(((a, values[a]), (b, values[b])) in uncovered
                       for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = values, gain
        assert best is not None
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
        grid.append(Config(**best))
    return grid


_DEFAULT = dict(rank=4, axis="pos", x_dtype=F32, param_dtype=F32, dtype=None, use_bias=True,
                use_scale=True, fast=True, momentum=0.9, epsilon=1e-5, mask="none",
                inference=False, ffr=True, style="batched")
# Corners worth naming on their own: the plain defaults in both styles, a per-example
# call with no local axis to reduce, epsilon 0, momentum 1, all-bfloat16.
CORNERS = [
    Config(**_DEFAULT),
    Config(**{**_DEFAULT, "style": "per_example"}),
    Config(**{**_DEFAULT, "rank": 2, "style": "per_example"}),  # no local axis to reduce
    Config(**{**_DEFAULT, "rank": 5, "axis": "tuple", "style": "per_example",
              "mask": "full"}),
    Config(**{**_DEFAULT, "axis": "tuple", "fast": False, "epsilon": 0.0}),
    Config(**{**_DEFAULT, "momentum": 1.0, "mask": "examples"}),
    Config(**{**_DEFAULT, "x_dtype": BF16, "param_dtype": BF16, "dtype": BF16}),
    Config(**{**_DEFAULT, "x_dtype": BF16, "ffr": False, "fast": False}),
]
# Two independent covers, so that every pair of values meets in two different contexts.
GRID = list(dict.fromkeys(_pairwise_grid(seed=0) + _pairwise_grid(seed=1) + CORNERS))


def test_grid_covers_every_pair_of_values():
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in GRID}
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if a == "rank" and b == "axis" and vb not in AXES[va]:
                continue
            assert (va, vb) in seen, (a, va, b, vb)
    assert 40 <= len(GRID) <= 60, len(GRID)


# ---------------------------------------------------------------- data and the two sides


def _feature_shape(shape, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def _num_features(shape, axis):
    """`num_features` in the order `axis` lists the axes (not sorted)."""
    if isinstance(axis, tuple):
        return tuple(shape[a] for a in axis)
    return shape[axis]


def _example_axis(axis):
    """The batched feature axes, seen from one example (batch axis 0 removed)."""
    shift = lambda a: a - 1 if a >= 0 else a
    return tuple(shift(a) for a in axis) if isinstance(axis, tuple) else shift(axis)


def _data(cfg: Config, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 8)
    shape, fshape = cfg.shape, _feature_shape(cfg.shape, cfg.batched_axis)
    x = (jax.random.normal(keys[0], shape) * 2 + 0.5).astype(cfg.x_dtype)
    scale = (1 + 0.5 * jax.random.normal(keys[1], fshape)).astype(cfg.param_dtype)
    bias = (0.5 * jax.random.normal(keys[2], fshape)).astype(cfg.param_dtype)
    stat_dtype = F32 if cfg.ffr else cfg.param_dtype
    r_mean = (0.3 * jax.random.normal(keys[3], fshape)).astype(stat_dtype)
    r_var = jax.random.uniform(keys[4], fshape, minval=0.5, maxval=2.0).astype(stat_dtype)
    if cfg.mask == "none":
        mask = None
    elif cfg.mask == "full":
        mask = jax.random.bernoulli(keys[5], 0.7, shape).at[0].set(True)
    else:  # whole examples, broadcast over every other axis
        mask = jax.random.bernoulli(keys[5], 0.6, (shape[0],) + (1,) * (len(shape) - 1))
        mask = mask.at[0].set(True)
    cotangent = jax.random.normal(keys[6], shape)
    return x, scale, bias, r_mean, r_var, mask, cotangent


def _flax_side(cfg: Config, x, scale, bias, r_mean, r_var, mask, cotangent):
    module = nn.BatchNorm(
        use_running_average=cfg.inference, axis=cfg.batched_axis, momentum=cfg.momentum,
        epsilon=cfg.epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        use_bias=cfg.use_bias, use_scale=cfg.use_scale, use_fast_variance=cfg.fast,
        force_float32_reductions=cfg.ffr)

    def run(x, scale, bias):
        params = {}
        if cfg.use_scale:
            params["scale"] = scale
        if cfg.use_bias:
            params["bias"] = bias
        variables = {"params": params, "batch_stats": {"mean": r_mean, "var": r_var}}
        y, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    def loss(x, scale, bias):
        y, stats = run(x, scale, bias)
        return jnp.sum(y.astype(F32) * cotangent), (y, stats)

    grads, (y, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, (stats["mean"], stats["var"]), grads


def _ours_side(cfg: Config, x, scale, bias, r_mean, r_var, mask, cotangent):
    per_example = cfg.style == "per_example"
    axis = _example_axis(cfg.batched_axis) if per_example else cfg.batched_axis
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(
        _num_features(x.shape[1:] if per_example else x.shape, axis), axis=axis,
        momentum=cfg.momentum, epsilon=cfg.epsilon, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, use_bias=cfg.use_bias, use_scale=cfg.use_scale,
        axis_name="batch" if per_example else None, use_fast_variance=cfg.fast,
        force_float32_reductions=cfg.ffr, inference=cfg.inference)
    assert bn.feature_shape == r_mean.shape
    state = state.set(bn.state_index, ebn.BatchStats(r_mean, r_var))
    # Differentiate w.r.t. (x, scale, bias) by writing the params into the module.
    where = lambda m: (m.scale, m.bias)
    leaves = (scale if cfg.use_scale else None, bias if cfg.use_bias else None)
    bn = eqx.tree_at(where, bn, leaves, is_leaf=lambda v: v is None)

    def run(x, scale, bias, state):
        model = eqx.tree_at(where, bn, (scale, bias), is_leaf=lambda v: v is None)
        if per_example:
            call = lambda x, s, m: model(x, s, mask=m)
            in_axes = (0, None, None if mask is None else 0)
            return jax.vmap(call, axis_name="batch", in_axes=in_axes,
                            out_axes=(0, None))(x, state, mask)
        return model(x, state, mask=mask)

    def loss(x, scale, bias):
        y, new_state = run(x, scale, bias, state)
        stats = new_state.get(bn.state_index)
        return jnp.sum(y.astype(F32) * cotangent), (y, (stats.mean, stats.var))

    grads, (y, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, *leaves)
    return y, stats, grads


# ---------------------------------------------------------------- tolerances


def _eps(*dtypes) -> float:
    """Relative tolerance for a result computed in the least precise of `dtypes`."""
    worst = max(float(jnp.finfo(d).eps) for d in dtypes if d is not None)
    # float32: the 2e-5 of the contract. Half precision: one unit of its rounding (eps);
    # `_tolerances` allows two where the normalising variance itself is half precision.
    return 2e-5 if worst <= float(jnp.finfo(F32).eps) else worst


def _close(ours, ref, rtol, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    # atol: values near zero are compared relative to the array's scale.
    atol = rtol * max(1.0, float(np.max(np.abs(ref))))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol, err_msg=what)


def _tolerances(cfg: Config, y_dtype) -> dict[str, float]:
    """Relative tolerance of each compared quantity, from the dtypes it is computed in."""
    # Flax's rule: `dtype` or x's dtype, promoted to float32 by force_float32_reductions.
    base = jnp.dtype(cfg.dtype if cfg.dtype is not None else cfg.x_dtype)
    stat_dtype = jnp.promote_types(base, F32) if cfg.ffr else base
    running_dtype = F32 if cfg.ffr else jnp.dtype(cfg.param_dtype)
    # The variance that normalises: the batch's, or the running one (cast to param_dtype
    # without force_float32_reductions, as Flax does). When it is half precision, so is
    # rsqrt(var + eps) * scale, and XLA may or may not round its intermediates (it fuses
    # Flax's and ours differently): allow two units of that rounding.
    norm_dtype = running_dtype if cfg.inference else stat_dtype
    factor = 2 if jnp.finfo(norm_dtype).bits < 32 else 1
    stat_factor = 2 if jnp.finfo(stat_dtype).bits < 32 else 1
    return {
        "output": factor * _eps(y_dtype, norm_dtype),
        "running": stat_factor * _eps(running_dtype, stat_dtype),
        "x": factor * _eps(cfg.x_dtype, y_dtype, norm_dtype),
        "scale": factor * _eps(cfg.param_dtype, y_dtype, norm_dtype),
        "bias": factor * _eps(cfg.param_dtype, y_dtype, norm_dtype),
    }


@pytest.mark.parametrize("cfg", GRID, ids=str)
def test_matches_flax(cfg: Config):
    data = _data(cfg)
    y_ref, stats_ref, grads_ref = jax.jit(lambda *a: _flax_side(cfg, *a))(*data)
    y, stats, grads = jax.jit(lambda *a: _ours_side(cfg, *a))(*data)
    tol = _tolerances(cfg, y_ref.dtype)

    assert y.dtype == y_ref.dtype
    _close(y, y_ref, tol["output"], "output")

    # Running statistics. Ours keep a fixed dtype, float32 or param_dtype without
    # force_float32_reductions; Flax instead lets the update promote them (float32 x with
    # bfloat16 running statistics gives float32), so only the values are compared then.
    running_dtype = F32 if cfg.ffr else jnp.dtype(cfg.param_dtype)
    for ours, ref, name in zip(stats, stats_ref, ("mean", "var"), strict=True):
        assert ours.dtype == running_dtype, name
        if cfg.ffr:
            assert ours.dtype == ref.dtype, name
        _close(ours, ref, tol["running"], f"running {name}")

    # Gradients w.r.t. x, scale and bias, in their own dtypes.
    for ours, ref, name in zip(grads, grads_ref, ("x", "scale", "bias"), strict=True):
        if name == "scale" and not cfg.use_scale or name == "bias" and not cfg.use_bias:
            assert ours is None
            continue
        assert ours.dtype == ref.dtype, name
        try:
            _close(ours, ref, tol[name], f"grad {name}")
        except AssertionError:
            # Half-precision statistics: ours accumulate their sums in float32, Flax's
            # round each square first, so the two can differ by more than one rounding
            # where a gradient is a difference of large terms. Then ours must be at
            # least as close to the float64 result as Flax's.
            if _statistics_dtype(cfg).itemsize >= 4:
                raise
            truth = _float64_gradients(cfg, data)[("x", "scale", "bias").index(name)]
            ours_err = np.max(np.abs(np.asarray(ours, np.float64) - truth))
            flax_err = np.max(np.abs(np.asarray(ref, np.float64) - truth))
            assert ours_err <= flax_err, (name, ours_err, flax_err)


def _statistics_dtype(cfg: Config):
    base = jnp.dtype(cfg.dtype if cfg.dtype is not None else cfg.x_dtype)
    return jnp.promote_types(base, F32) if cfg.ffr else base


def _float64_gradients(cfg: Config, data):
    """Flax's gradients computed in float64 from the same inputs: the exact reference."""
    exact = dataclasses.replace(cfg, x_dtype=np.float64, param_dtype=np.float64,
                                dtype=None, ffr=True)
    with jax.enable_x64(True):
        data64 = [None if a is None else jnp.asarray(
            np.asarray(a, np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a)
            for a in data]
        _, _, grads = _flax_side(exact, *data64)
        return [None if g is None else np.asarray(g, np.float64) for g in grads]


def test_fast_variance_beats_flax_when_mean_dominates(clone):
    # Where parity is deliberately not kept: |mean| / std = 1e4. Flax's E[x^2] - E[x]^2
    # cancels catastrophically in float32; the shifted one-pass variance does not.
    x = jax.random.normal(jax.random.key(0), (256, 4)) * 0.1 + 1000.0
    exact = np.var(np.asarray(x, np.float64), axis=0)
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(4, momentum=0.0)
    _, state = bn(x, state)
    ours = np.asarray(state.get(bn.state_index).var, np.float64)
    module = nn.BatchNorm(use_running_average=False, momentum=0.0)
    _, updates = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    flax_var = np.asarray(updates["batch_stats"]["var"], np.float64)
    np.testing.assert_allclose(ours, exact, rtol=1e-3)
    assert np.max(np.abs(flax_var - exact) / exact) > 0.1  # Flax is off by >10% here


# ---------------------------------------------------------------- random initialisers


def test_random_initialisers_match_flax_shapes_and_dtypes():
    # Flax derives each parameter's key from the module path, this library splits `key`:
    # the values differ by design, the shapes and dtypes must not.
    init = dict(scale_init=jax.nn.initializers.normal(), bias_init=jax.nn.initializers.normal())
    x = jnp.ones((2, 3, 4, 5))
    module = nn.BatchNorm(use_running_average=False, axis=(1, -1),
                          param_dtype=jnp.bfloat16, **init)
    ref = module.init(jax.random.key(0), x)["params"]
    bn = ebn.BatchNorm((3, 5), axis=(1, -1), param_dtype=jnp.bfloat16,
                       key=jax.random.key(0), **init)
    again = ebn.BatchNorm((3, 5), axis=(1, -1), param_dtype=jnp.bfloat16,
                          key=jax.random.key(0), **init)
    for name in ("scale", "bias"):
        ours = getattr(bn, name)
        assert ours.shape == ref[name].shape == (3, 5)
        assert ours.dtype == ref[name].dtype == jnp.bfloat16
        assert np.unique(np.asarray(ours, np.float32)).size > 1  # really drawn
        np.testing.assert_array_equal(ours, getattr(again, name))  # reproducible
    assert not np.array_equal(np.asarray(bn.scale), np.asarray(bn.bias))  # distinct keys


# ---------------------------------------------------------------- across devices

N_DEV = 8
DIST_SHAPE = (16, 3, 4)  # batched; 2 examples per device
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))


def _dist_data(masked: bool):
    kx, kc, ks, km = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, DIST_SHAPE) * 2 + 0.5
    cotangent = jax.random.normal(kc, DIST_SHAPE)
    scale = 1 + 0.5 * jax.random.normal(ks, (4,))
    bias = 0.1 * jnp.arange(4.0)
    # Flax takes the mean of per-device masked means; with the same number of valid
    # elements on every device that equals the exact masked mean that this library takes.
    mask = None
    if masked:
        per_device = jax.random.permutation(km, jnp.arange(6) < 4)  # 4 of 6 positions valid
        mask = jnp.tile(per_device.reshape(1, 2, 3, 1), (N_DEV, 1, 1, 1)).reshape(16, 3, 1)
    return x, cotangent, scale, bias, mask


def _flax_fn(fast, groups=None):
    module = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name="d",
                          axis_index_groups=groups, use_fast_variance=fast)

    def f(x, scale, bias, mask, running):
        variables = {"params": {"scale": scale, "bias": bias},
                     "batch_stats": {"mean": running[0], "var": running[1]}}
        y, upd = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

    return f, (jnp.zeros(4), jnp.ones(4))


def _ours_fn(fast, groups=None, axis_name="d"):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(
        4, momentum=0.9, axis_name=axis_name, axis_index_groups=groups, use_fast_variance=fast)

    # The state travels as an argument: an `eqx.nn.State` closed over as a constant does
    # not accept traced updates inside pmap/shard_map (Equinox compares their shardings).
    def f(x, scale, bias, mask, state):
        model = eqx.tree_at(lambda m: (m.scale, m.bias), bn, (scale, bias))
        y, new = model(x, state, mask=mask)
        stats = new.get(bn.state_index)
        return y, (stats.mean, stats.var)

    return f, state


def _pmap(f):
    def g(x, scale, bias, mask, running):
        xs = x.reshape(N_DEV, -1, *x.shape[1:])
        ms = None if mask is None else mask.reshape(N_DEV, -1, *mask.shape[1:])
        # (pmap mis-assigns in_axes past an argument that is None: give it None.)
        in_axes = (0, None, None, None if mask is None else 0, None)
        y, stats = jax.pmap(f, axis_name="d", in_axes=in_axes,
                            out_axes=(0, None))(xs, scale, bias, ms, running)
        return y.reshape(x.shape), stats

    return g


def _shard_map(f, check_vma=True):
    mesh = jax.make_mesh((N_DEV,), ("d",))
    sharded = jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P(), P(), P("d"), P()),
                            out_specs=(P("d"), P()), check_vma=check_vma)

    def g(x, scale, bias, mask, running):
        put = lambda a: None if a is None else jax.device_put(a, NamedSharding(mesh, P("d")))
        return sharded(put(x), scale, bias, put(mask), running)

    return g


def _run(transform, fn_and_running, x, cotangent, scale, bias, mask):
    """Output, new running statistics and gradients w.r.t. (x, scale, bias), under jit."""
    f, running = fn_and_running
    f = transform(f)

    @jax.jit
    def value_and_grads(x, cotangent, scale, bias, mask, running):
        def loss(x, scale, bias):
            y, stats = f(x, scale, bias, mask, running)
            return jnp.sum(y * cotangent), (y, stats)

        grads, (y, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
        return y, stats, grads

    return value_and_grads(x, cotangent, scale, bias, mask, running)


def _assert_all_close(ours, ref, rtol=2e-5):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        _close(a, b, rtol, "")


@pytest.mark.parametrize("transform", [_pmap, _shard_map], ids=["pmap", "shard_map"])
@pytest.mark.parametrize(("fast", "masked"), [(True, False), (False, False), (True, True)],
                         ids=["fast", "two_pass", "fast_masked"])
def test_axis_name_across_devices_matches_flax(transform, fast, masked):
    data = _dist_data(masked)
    ours = _run(transform, _ours_fn(fast), *data)
    ref = _run(transform, _flax_fn(fast), *data)
    _assert_all_close(ours, ref)
    # ... and the same numbers as Flax on the whole batch on one device.
    x, _, scale, bias, mask = data
    batched = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=fast)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
    y_ref, _ = batched.apply(variables, x, mask=mask, mutable=["batch_stats"])
    _close(ours[0], y_ref, 2e-5, "output vs batched Flax")


def test_vmap_inside_shard_map_with_two_axis_names():
    # Per-example style on every device: axis_name=("batch", "d") reduces over both.
    # check_vma=False: in this JAX, no collective over a vmap axis (not even psum) traces
    # inside a shard_map that checks varying types; Flax's BatchNorm is refused as well.
    data = _dist_data(False)
    f, state = _ours_fn(True, axis_name=("batch", "d"))
    per_example = lambda x, s, b, m, st: jax.vmap(
        f, axis_name="batch", in_axes=(0, None, None, None, None), out_axes=(0, None))(
        x, s, b, m, st)
    ours = _run(lambda g: _shard_map(g, check_vma=False), (per_example, state), *data)
    ref = _run(_pmap, _flax_fn(True), *data)
    _assert_all_close(ours, ref)


def test_axis_index_groups_under_pmap_match_flax_outputs():
    data = _dist_data(False)
    y, stats, grads = _run(_pmap, _ours_fn(True, GROUPS), *data)
    y_ref, _, grads_ref = _run(_pmap, _flax_fn(True, GROUPS), *data)
    _assert_all_close((y, grads), (y_ref, grads_ref))
    # Running statistics: deliberately the average of the group statistics, where
    # Flax keeps each device's own group's.
    halves = data[0].reshape(2, 8, 3, 4)
    _close(stats[0], 0.1 * halves.mean((1, 2)).mean(0), 2e-5, "running mean")
    _close(stats[1], 0.9 + 0.1 * halves.var((1, 2)).mean(0), 2e-5, "running var")


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_jit_with_sharded_batch_needs_no_axis_name(axis_type):
    # Under plain jit, XLA's SPMD partitioner turns the local reductions into global ones.
    # With an explicit-axis mesh (jax.make_mesh's default) shardings are part of the
    # types, so the state must live on the mesh too (replicated); with auto axes it need not.
    types = (jax.sharding.AxisType.Explicit if axis_type == "explicit"
             else jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((N_DEV,), ("d",), axis_types=types)
    x, cotangent, scale, bias, _ = _dist_data(False)
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    f, state = _ours_fn(True, axis_name=None)
    if axis_type == "explicit":
        state = jax.device_put(state, NamedSharding(mesh, P()))
    ours = _run(lambda f: f, (f, state), xs, cotangent, scale, bias, None)
    module = nn.BatchNorm(use_running_average=False, momentum=0.9)

    def flax_f(x, scale, bias, mask, running):
        variables = {"params": {"scale": scale, "bias": bias},
                     "batch_stats": {"mean": running[0], "var": running[1]}}
        y, upd = module.apply(variables, x, mutable=["batch_stats"])
        return y, (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

    ref = _run(lambda f: f, (flax_f, (jnp.zeros(4), jnp.ones(4))), x, cotangent, scale,
               bias, None)
    assert ours[0].sharding.spec[0] == "d"  # really computed sharded
    _assert_all_close(ours, ref)
