"""Statistics across participants, against exact NumPy float64 references, on 8 devices.

A *participant* is whatever a named axis enumerates: an example under `vmap`, a device
under `pmap` and `shard_map`. In the generic tests participant `i` sees `x[i]` (a local
batch of shape `(4, 2, 3)`, features last) and, with a mask, `mask[i]`; the reference
pools the unmasked elements of every participant of a group in float64. What is checked
everywhere: the output, the running statistics (`momentum * initial + (1 - momentum) *`
the average of the group statistics over the whole axis) and that every participant
holds the same running statistics.

Modes: `axis_index_groups` under vmap (ghost batch norm), pmap and shard_map; masks that
leave participants with different counts (one with none); several names (`vmap` inside
`pmap`/`shard_map`); SPMD `jit` over explicit and auto meshes; per-example vs batched;
both variance modes; the number of collectives; gradients against autodiff of a plain
`jnp` reference.
"""

import re
from collections import Counter

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import eqx_batchnorm as ebn
import eqx_batchnorm._backend as backend

N = 8  # participants: devices, or examples under vmap
LOCAL = (4, 2, 3)  # what one participant holds: (rows, positions, features)
C = LOCAL[-1]
MOMENTUM, EPS = 0.5, 1e-5
SCALE = np.array([0.5, 1.5, 2.0], np.float32)
BIAS = np.array([0.1, -0.2, 0.3], np.float32)
GROUPS = ((0, 4), (1, 5), (2, 6), (3, 7))  # not contiguous: the index->group map matters
TRANSFORMS = ("vmap", "pmap", "shard_map")
# "fast": the one-pass variance as this backend runs it; "shifted": the one GPUs and TPUs
# run (shifted summaries combined by Chan's formula over one all_gather), forced here
# whatever the backend; "two_pass": use_fast_variance=False.
VARIANCE = ("fast", "shifted", "two_pass")
MESH = jax.make_mesh((N,), ("d",))  # explicit axes: JAX's default


@pytest.fixture
def fast(request, monkeypatch):
    """`use_fast_variance` for a mode of VARIANCE (indirect parametrisation)."""
    if request.param == "shifted":
        monkeypatch.setattr(backend, "platform", lambda: "accelerator")
    return request.param != "two_pass"


def data(shape=(N, *LOCAL), seed=0, offset=5.0):
    # An offset several standard deviations from zero: the variance must not cancel.
    x = np.random.default_rng(seed).normal(size=shape) * 2 + offset
    return x.astype(np.float32)


def unequal_mask():
    """Participant i keeps COUNTS[i] of its 4 rows, and one position of one more row."""
    counts = (0, 1, 2, 3, 4, 1, 2, 3)
    m = np.zeros((N, 4, 2, 1), bool)
    for i, k in enumerate(counts):
        m[i, :k] = True
        if k < 4:
            m[i, k, 0] = True
    m[0] = False  # a participant with nothing to contribute
    return m


def make_bn(**kwargs):
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(C, momentum=MOMENTUM, epsilon=EPS,
                                                       **kwargs)
    bn = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (jnp.asarray(SCALE), jnp.asarray(BIAS)))
    return bn, state


def ref_moments(x, mask=None):
    """float64 mean and biased variance of x over every axis but the last, unmasked only."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    mean = (w * x).sum(axes) / w.sum(axes)
    var = (w * (x - mean) ** 2).sum(axes) / w.sum(axes)
    return mean, var


def reference(x, groups=None, mask=None):
    """Expected output, and running mean and variance, for participants `x[i]`."""
    groups = groups or (tuple(range(len(x))),)
    y = np.empty(x.shape, np.float64)
    means, variances = [], []
    for members in groups:
        idx = list(members)
        mean, var = ref_moments(x[idx], None if mask is None else mask[idx])
        y[idx] = (x[idx] - mean) / np.sqrt(var + EPS) * SCALE + BIAS
        means.append(mean)
        variances.append(var)
    run_mean = (1 - MOMENTUM) * np.mean(means, 0)
    run_var = MOMENTUM + (1 - MOMENTUM) * np.mean(variances, 0)
    return y, run_mean, run_var


def run(transform, bn, state, x, mask=None, jit=True):
    """Participant i normalises x[i]; returns y and every participant's running stats."""
    maybe_jit = jax.jit if jit else (lambda f: f)

    def body(xi, mi, s):
        y, s = bn(xi, s, mask=mi)
        stats = s.get(bn.state_index)
        return y, stats.mean, stats.var

    # pmap (JAX 0.10) misaligns in_axes after an argument that is None: say None for it.
    in_axes = (0, None if mask is None else 0, None)
    if transform == "vmap":
        return maybe_jit(jax.vmap(body, axis_name="d", in_axes=in_axes))(x, mask, state)
    if transform == "pmap":
        return jax.pmap(body, axis_name="d", in_axes=in_axes)(x, mask, state)

    def local(xl, ml, s):
        y, mean, var = body(xl[0], None if ml is None else ml[0], s)
        return y[None], mean, var

    f = jax.shard_map(local, mesh=MESH, in_specs=(P("d"), P("d"), P()),
                      out_specs=(P("d"), P(), P()))
    shard = NamedSharding(MESH, P("d"))
    mask = None if mask is None else jax.device_put(mask, shard)
    y, mean, var = maybe_jit(f)(jax.device_put(x, shard), mask, state)
    # out_specs=P() type-checks (check_vma) that every device holds the same values.
    return y, jnp.broadcast_to(mean, (N, C)), jnp.broadcast_to(var, (N, C))


def check(got, want, atol=2e-5):
    y, mean, var = got
    y_ref, mean_ref, var_ref = want
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=atol)
    mean, var = np.asarray(mean), np.asarray(var)
    # The same running statistics on every participant, bit for bit.
    assert (mean == mean[:1]).all() and (var == var[:1]).all()
    np.testing.assert_allclose(mean[0], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[0], var_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# axis_index_groups under vmap (ghost batch norm), pmap and shard_map


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_groups_normalise_separately_and_average_running_stats(transform, fast):
    x = data()
    bn, state = make_bn(axis_name="d", axis_index_groups=GROUPS, use_fast_variance=fast)
    check(run(transform, bn, state, x), reference(x, GROUPS))


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_masked_statistics_are_exact_with_unequal_counts(transform, fast):
    x, mask = data(seed=1), unequal_mask()
    bn, state = make_bn(axis_name="d", use_fast_variance=fast)
    check(run(transform, bn, state, x, mask), reference(x, mask=mask))


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
def test_masked_groups_are_exact_per_group(fast):
    # Group (0, 4) pools participant 0 (nothing) with participant 4 (everything).
    x, mask = data(seed=2), unequal_mask()
    bn, state = make_bn(axis_name="d", axis_index_groups=GROUPS, use_fast_variance=fast)
    check(run("shard_map", bn, state, x, mask), reference(x, GROUPS, mask))


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_groups_with_a_small_mean_take_the_single_pass_path(transform):
    # |mean| well below the spread: no implementation needs a refining pass (on CPU the
    # plain sums are trusted), a different code path than the data above takes.
    x = data(seed=12, offset=0.5)
    bn, state = make_bn(axis_name="d", axis_index_groups=GROUPS)
    check(run(transform, bn, state, x), reference(x, GROUPS))


def test_masked_statistics_differ_from_flax_mean_of_means():
    # Flax averages per-device means; with unequal counts that is not the mean of the
    # data. The exact pooled mean is what the library gives (checked above); here the
    # two are shown to differ on this data, so the tests above could tell them apart.
    x, mask = data(seed=1), unequal_mask()
    pooled, _ = ref_moments(x, mask)
    per_device = [ref_moments(x[i], mask[i])[0] for i in range(1, N)]
    assert np.abs(np.mean(per_device, 0) - pooled).max() > 0.05


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_groups_that_do_not_partition_the_axis_fail_at_trace_time(transform):
    bn, state = make_bn(axis_name="d", axis_index_groups=((0, 1), (2, 3)))
    with pytest.raises(ebn.BatchNormError, match=r"partition of all 8 indices"):
        run(transform, bn, state, data())


def test_groups_are_validated_at_construction():
    with pytest.raises(ebn.BatchNormError, match=r"groups of equal size"):
        make_bn(axis_name="d", axis_index_groups=((0, 1, 2), (3,)))
    with pytest.raises(ebn.BatchNormError, match=r"each index in exactly one group"):
        make_bn(axis_name="d", axis_index_groups=((0, 1), (1, 2)))
    with pytest.raises(ebn.BatchNormError, match=r"together with `axis_name`"):
        make_bn(axis_index_groups=((0, 1), (2, 3)))


def test_unbound_axis_name_says_how_to_vmap():
    bn, state = make_bn(axis_name="batch")
    with pytest.raises(ebn.BatchNormError, match=r"jax\.vmap\(bn, axis_name='batch'"):
        bn(data()[0], state)


# ---------------------------------------------------------------------------------------
# One collective per call


# What runs: the collectives of the optimised program (XLA drops those whose operands it
# knows, such as the sums of terms that are zero in value and carry only derivatives).
_COLLECTIVES = {"all-reduce": "psum", "all-gather": "all_gather", "all-to-all": "all_to_all",
                "collective-permute": "ppermute", "reduce-scatter": "reduce_scatter"}


def _computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
    """The entry's name, and every computation's instruction lines, by name."""
    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    assert entry is not None
    return entry, comps


def _paths(name: str, comps: dict[str, list[str]]) -> set[frozenset]:
    """The collectives of every path through computation `name`: one per choice of
    conditional branches (`lax.cond`, `lax.platform_dependent`)."""
    paths = {frozenset()}
    for line in comps[name]:
        op = re.search(r" = (?:\([^=]*\)|\S+) ([\w\-]+)\(", line)  # (a tuple type)
        if op is None:
            continue
        opcode = op.group(1).removesuffix("-start")
        if opcode == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches
                     else re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line))
            options = set().union(*(_paths(b, comps) for b in names))
        else:
            here = Counter({_COLLECTIVES[opcode]: 1} if opcode in _COLLECTIVES else {})
            options = {frozenset(here.items())}
            for sub in re.findall(r"(?:body|condition|calls)=%([\w.\-]+)", line):
                options = {_add(a, b) for a in options for b in _paths(sub, comps)}
        paths = {_add(a, b) for a in paths for b in options}
    return paths


def _add(a: frozenset, b: frozenset) -> frozenset:
    return frozenset((Counter(dict(a)) + Counter(dict(b))).items())


def collectives(fn, *args) -> set[frozenset]:
    entry, comps = _computations(jax.jit(fn).lower(*args).compile().as_text())
    return _paths(entry, comps)


def paths(*counts: dict) -> set[frozenset]:
    return {frozenset(c.items()) for c in counts}


def sharded_forward(bn):
    return jax.shard_map(lambda xl, s: bn(xl[0], s)[0][None], mesh=MESH,
                         in_specs=(P("d"), P()), out_specs=P("d"))


def totals(found: set[frozenset]) -> list[int]:
    return sorted(sum(dict(p).values()) for p in found)


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
@pytest.mark.parametrize("groups", [None, GROUPS], ids=["whole_axis", "groups"])
def test_forward_statistics_take_one_collective_in_fast_mode(request, groups, fast):
    x = jax.device_put(data(), NamedSharding(MESH, P("d")))
    bn, state = make_bn(axis_name="d", axis_index_groups=groups, use_fast_variance=fast)
    found = collectives(sharded_forward(bn), x, state)
    mode = request.node.callspec.params["fast"]
    if mode == "two_pass":  # one psum per pass
        assert found == paths({"psum": 2})
    elif mode == "fast" and jax.default_backend() == "cpu":
        # One psum of the plain sums; a second one only on the branch that refines
        # where the mean dwarfs the spread (XLA:CPU's fastest exact strategy).
        assert totals(found) == [1, 2] and all(dict(p).keys() == {"psum"} for p in found)
    else:  # one all_gather of the shifted summaries, combined with Chan's formula
        assert found == paths({"all_gather": 1})


@pytest.mark.parametrize("fast", ["fast", "shifted"], indirect=True)
def test_nested_names_still_take_one_device_collective(request, fast):
    # vmap's collectives become local reductions and broadcasts: what is left is what
    # one device name alone costs.
    x = jax.device_put(data((N, 2, *LOCAL[1:])), NamedSharding(MESH, P("d")))
    bn, state = make_bn(axis_name=("d", "b"), use_fast_variance=fast)
    inner = jax.vmap(lambda e, s: bn(e, s)[0], axis_name="b", in_axes=(0, None))
    f = jax.shard_map(lambda xl, s: inner(xl[0], s)[None], mesh=MESH,
                      in_specs=(P("d"), P()), out_specs=P("d"), check_vma=False)
    found = collectives(f, x, state)
    if request.node.callspec.params["fast"] == "shifted" or jax.default_backend() != "cpu":
        assert found == paths({"all_gather": 1})
    else:
        assert totals(found) == [1, 2] and all(dict(p).keys() == {"psum"} for p in found)


# ---------------------------------------------------------------------------------------
# Several names: a vmapped example axis inside a device axis

NESTED = (N, 2, 2, C)  # (devices, examples per device, positions, features)


def run_nested(transform, bn, state, x):
    def per_device(xd, s):
        return jax.vmap(lambda e, s: bn(e, s), axis_name="b", in_axes=(0, None),
                        out_axes=(0, None))(xd, s)

    if transform == "pmap":
        y, s = jax.pmap(per_device, axis_name="d", in_axes=(0, None), out_axes=(0, 0))(
            x, state)
        stats = s.get(bn.state_index)
        return y, stats.mean, stats.var
    f = jax.shard_map(lambda xl, s: (lambda y, s: (y[None], s))(*per_device(xl[0], s)),
                      mesh=MESH, in_specs=(P("d"), P()), out_specs=(P("d"), P()),
                      check_vma=False)
    y, s = jax.jit(f)(jax.device_put(x, NamedSharding(MESH, P("d"))), state)
    stats = s.get(bn.state_index)
    return y, np.broadcast_to(stats.mean, (N, C)), np.broadcast_to(stats.var, (N, C))


# Index on ("d", "b") is 2 * device + example: the groups pool all first examples of
# every device, and all second ones.
PARITY = (tuple(range(0, 2 * N, 2)), tuple(range(1, 2 * N, 2)))


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
@pytest.mark.parametrize("groups", [None, PARITY], ids=["whole_axis", "groups"])
@pytest.mark.parametrize("transform", ["pmap", "shard_map"])
def test_nested_names_pool_every_example_of_every_device(transform, groups, fast):
    x = data(NESTED, seed=3)
    bn, state = make_bn(axis_name=("d", "b"), axis_index_groups=groups,
                        use_fast_variance=fast)
    y, mean, var = run_nested(transform, bn, state, x)
    flat = x.reshape(2 * N, *NESTED[2:])  # participant 2 * d + b
    y_ref, mean_ref, var_ref = reference(flat, groups)
    check((np.asarray(y).reshape(flat.shape), mean, var),
          (y_ref, mean_ref, var_ref))


def test_name_order_sets_the_group_index():
    # ("b", "d"): index = N * example + device, so groups of 8 are the examples' halves.
    x = data(NESTED, seed=4)
    halves = (tuple(range(N)), tuple(range(N, 2 * N)))
    bn, state = make_bn(axis_name=("b", "d"), axis_index_groups=halves)
    y, mean, var = run_nested("pmap", bn, state, x)
    by_example = x.transpose(1, 0, 2, 3).reshape(2 * N, *NESTED[2:])
    y_ref, mean_ref, var_ref = reference(by_example, halves)
    y_ref = y_ref.reshape(2, N, *NESTED[2:]).transpose(1, 0, 2, 3)
    check((y, mean, var), (y_ref, mean_ref, var_ref))


def test_vmap_name_inside_checked_shard_map_says_to_disable_check_vma():
    bn, state = make_bn(axis_name=("d", "b"))
    f = jax.shard_map(
        lambda xl, s: jax.vmap(lambda e, s: bn(e, s)[0], axis_name="b",
                               in_axes=(0, None))(xl[0], s)[None],
        mesh=MESH, in_specs=(P("d"), P()), out_specs=P("d"))
    x = jax.device_put(data(NESTED), NamedSharding(MESH, P("d")))
    with pytest.raises(ebn.BatchNormError, match=r"check_vma=False"):
        jax.jit(f)(x, state)


# ---------------------------------------------------------------------------------------
# Per-example (Equinox) vs batched (Flax) style


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
def test_per_example_and_batched_styles_agree_with_numpy(fast):
    x = data((16, C, 2, 2), seed=5)  # channels first, as eqx.nn.Conv2d gives
    per_example, state = make_bn(axis=0, axis_name="batch", use_fast_variance=fast)
    y1, s1 = eqx.filter_jit(jax.vmap(per_example, axis_name="batch", in_axes=(0, None),
                                     out_axes=(0, None)))(x, state)
    batched, state = make_bn(axis=1, use_fast_variance=fast)
    y2, s2 = eqx.filter_jit(batched)(x, state)
    y_ref, mean_ref, var_ref = reference(np.moveaxis(x, 1, -1)[None])
    for y, s, bn in ((y1, s1, per_example), (y2, s2, batched)):
        np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), y_ref[0],
                                   rtol=1e-5, atol=2e-5)
        stats = s.get(bn.state_index)
        np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, var_ref, rtol=1e-5, atol=1e-6)


def test_ghost_batch_norm_equals_batched_calls_on_each_ghost_batch():
    # Ghost batch norm with contiguous groups of 4 examples == one batched call per
    # ghost batch, with running statistics averaged over the ghost batches.
    x = data((16, 2, C), seed=6)
    ghosts = tuple(tuple(range(g, g + 4)) for g in range(0, 16, 4))
    bn, state = make_bn(axis_name="batch", axis_index_groups=ghosts)
    y, s = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    batched, bstate = make_bn()
    outs, means, variances = [], [], []
    for g in range(4):
        yg, sg = batched(x[4 * g:4 * g + 4], jax.tree.map(lambda a: a, bstate))
        outs.append(yg)
        means.append(sg.get(batched.state_index).mean)
        variances.append(sg.get(batched.state_index).var)
    np.testing.assert_allclose(y, np.concatenate(outs), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(s.get(bn.state_index).mean, np.mean(means, 0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(s.get(bn.state_index).var, np.mean(variances, 0), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# SPMD jit: a sharded batch, axis_name=None


def _spmd_step(bn, state, x, mesh, mask=None):
    replicated = NamedSharding(mesh, P())

    @eqx.filter_jit
    def step(bn, state, x, mask):
        bn, state = eqx.filter_shard((bn, state), replicated)
        return bn(x, state, mask=mask)

    return step(bn, state, x, mask)


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
def test_spmd_jit_gives_global_statistics_and_keeps_the_state_replicated(fast):
    x = data((32, 2, C), seed=7)
    mask = np.ones((32, 1, 1), bool)
    mask[:5] = False  # the first device (4 rows) holds nothing; the second, 3 rows
    xs = jax.device_put(x, NamedSharding(MESH, P("d")))
    ms = jax.device_put(mask, NamedSharding(MESH, P("d")))
    bn, state = make_bn(use_fast_variance=fast)
    for m in (None, ms):
        y, new_state = _spmd_step(bn, jax.tree.map(lambda a: a, state), xs, MESH, m)
        y_ref, mean_ref, var_ref = reference(x[None], mask=None if m is None else mask[None])
        np.testing.assert_allclose(y, y_ref[0], rtol=1e-5, atol=2e-5)
        stats = new_state.get(bn.state_index)
        np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, var_ref, rtol=1e-5, atol=1e-6)
        assert y.sharding.spec == P("d", None, None)
        assert stats.mean.sharding.is_fully_replicated
        assert stats.mean.sharding.mesh.shape == MESH.shape


def test_spmd_jit_with_sharded_features_keeps_the_state_layout():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x = data((16, C * 2), seed=8)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(2 * C, momentum=MOMENTUM)
    y, new_state = _spmd_step(bn, state, xs, mesh)
    mean, var = ref_moments(x)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=2e-5)
    stats = new_state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, (1 - MOMENTUM) * mean, rtol=1e-5, atol=1e-6)
    assert stats.mean.sharding.spec == P(None)  # as the state came in, not P("model")


def test_spmd_jit_with_a_state_off_the_mesh_says_to_replicate_it():
    xs = jax.device_put(data((16, C)), NamedSharding(MESH, P("d")))
    bn, state = make_bn()
    with pytest.raises(ebn.BatchNormError, match=r"filter_shard"):
        eqx.filter_jit(lambda bn, s, x: bn(x, s))(bn, state, xs)


def test_spmd_jit_per_example_on_an_auto_mesh():
    mesh = jax.make_mesh((N,), ("d",), axis_types=(AxisType.Auto,))
    x = data((16, C, 2), seed=9)
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    bn, state = make_bn(axis=0, axis_name="batch")

    @eqx.filter_jit
    def step(bn, state, x):
        bn, state = eqx.filter_shard((bn, state), NamedSharding(mesh, P()))
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    y, new_state = step(bn, state, xs)
    y_ref, mean_ref, var_ref = reference(np.moveaxis(x, 1, -1)[None])
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), 1, -1), y_ref[0], rtol=1e-5,
                               atol=2e-5)
    np.testing.assert_allclose(new_state.get(bn.state_index).mean, mean_ref, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("fast", [True, False], ids=["one_pass", "two_pass"])
def test_per_example_vmap_over_examples_sharded_on_an_explicit_mesh_is_refused(fast):
    # JAX 0.10 cannot lower a psum over a vmap axis whose examples are sharded over an
    # explicit mesh (a raw "Sharding spec ... does not evenly divide" ValueError); the
    # layer refuses it first and names the ways that work.
    xs = jax.device_put(data((16, C)), NamedSharding(MESH, P("d")))
    bn, state = make_bn(axis=0, axis_name="batch", use_fast_variance=fast)

    @eqx.filter_jit
    def step(bn, state, x):
        bn, state = eqx.filter_shard((bn, state), NamedSharding(MESH, P()))
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    with pytest.raises(ebn.BatchNormError, match=r"`axis_name`: expected a `jax.vmap` axis "
                       r"'batch' whose examples are not sharded over an explicit mesh.*"
                       r"Fix: make the mesh with `axis_types=\(jax.sharding.AxisType.Auto,\)`"):
        step(bn, state, xs)


# ---------------------------------------------------------------------------------------
# Gradients against autodiff of a plain jnp reference


def jnp_reference(x, scale, bias, groups, mask=None):
    """Grouped batch norm on the stacked participants, with jnp only."""
    y = jnp.zeros_like(x)
    for members in groups:
        idx = np.asarray(members)
        xs = x[idx]
        w = (jnp.ones_like(xs) if mask is None
             else jnp.broadcast_to(jnp.asarray(mask[idx]), xs.shape).astype(xs.dtype))
        axes = tuple(range(xs.ndim - 1))
        mean = (w * xs).sum(axes) / w.sum(axes)
        var = (w * (xs - mean) ** 2).sum(axes) / w.sum(axes)
        y = y.at[idx].set((xs - mean) * jax.lax.rsqrt(var + EPS) * scale + bias)
    return y


@pytest.mark.parametrize("fast", VARIANCE, indirect=True)
@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_gradients_match_autodiff_of_a_jnp_reference(transform, fast):
    x, mask = data(seed=10), unequal_mask()
    mask[0, 0, 0] = True  # every group keeps a few elements
    cot = data(seed=11, offset=0.0)
    bn, state = make_bn(axis_name="d", axis_index_groups=GROUPS, use_fast_variance=fast)

    def loss(params, x):
        scale, bias = params
        model = eqx.tree_at(lambda b: (b.scale, b.bias), bn, (scale, bias))
        y = run(transform, model, state, x, mask, jit=False)[0]
        return jnp.sum(y * cot)

    def ref_loss(params, x):
        return jnp.sum(jnp_reference(x, *params, GROUPS, mask) * cot)

    params = (jnp.asarray(SCALE), jnp.asarray(BIAS))
    if transform == "shard_map":
        x = jax.device_put(x, NamedSharding(MESH, P("d")))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    ref = jax.grad(ref_loss, argnums=(0, 1))(params, jnp.asarray(np.asarray(x)))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4)


def test_differentiating_a_jit_around_vmap_names_works_as_for_equinox():
    # JAX traces a custom rule under vmap lazily, outside the vmap's axis environment,
    # when the jit is inside the differentiation: the statistics' rules need no names.
    x = data()
    bn, state = make_bn(axis_name="d")
    ref, ref_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "d", eps=EPS, mode="batch")
    ref = eqx.tree_at(lambda b: (b.weight, b.bias), ref, (jnp.asarray(SCALE),
                                                           jnp.asarray(BIAS)))
    def eqx_channels_last(x, s):  # Equinox's layer takes the channels first
        return jnp.moveaxis(ref(jnp.moveaxis(x, -1, 0), s)[0], 0, -1), None

    grads = []
    for layer, st in ((bn, state), (eqx_channels_last, ref_state)):
        f = jax.jit(jax.vmap(lambda x, s, layer=layer: layer(x, s)[0], axis_name="d",
                             in_axes=(0, None)))
        grads.append(jax.grad(lambda x, f=f, st=st: jnp.sum(f(x, st) ** 3))(x))
    scale = float(np.abs(grads[1]).max())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4 * scale)
