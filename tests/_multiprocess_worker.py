"""One process of the two-process synchronised BatchNorm run in `test_multiprocess.py`.

Run as `python _multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` in the environment: it joins a
`jax.distributed` cluster whose coordinator listens on 127.0.0.1:PORT, trains `Net` for
a few steps on one global batch sharded over every device of every process, once with
`shard_map` (`BatchNorm(axis_name="data")`) and once with SPMD `jit`
(`axis_name=None`), and process 0 writes the outputs, the running statistics and the
trained weights to OUT.npz.

The test imports `Net`, `make_data` and `reference_run` from here, so both sides train
exactly the same model on exactly the same data.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_batchnorm as ebn

FEATURES_IN, FEATURES, BATCH, STEPS, LR = 5, 6, 16, 3, 0.1


class Net(eqx.Module):
    """Linear -> synchronised BatchNorm -> ReLU -> Linear, on a batch of shape (B, 5)."""

    lin1: eqx.nn.Linear
    bn: ebn.BatchNorm
    lin2: eqx.nn.Linear

    def __init__(self, axis_name, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(FEATURES_IN, FEATURES, key=k1)
        self.bn = ebn.BatchNorm(FEATURES, axis_name=axis_name, momentum=0.8)
        self.lin2 = eqx.nn.Linear(FEATURES, 1, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(jax.vmap(self.lin1)(x), state)
        return jax.vmap(self.lin2)(jax.nn.relu(h)), state


def make_data():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(BATCH, FEATURES_IN)) * 2 + 3).astype(np.float32)
    t = rng.normal(size=(BATCH, 1)).astype(np.float32)
    return x, t


def _loss(forward, model, state, x, t):
    y, state = forward(model, state, x)
    return jnp.mean((y - t) ** 2), (y, state)


def _sgd(model, grads):
    return eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))


def train(forward, model, state, x, t, to_host):
    """`STEPS` steps of SGD; the outputs of every step, the final state and model."""

    @eqx.filter_jit
    def step(model, state, x, t):
        (_, (y, state)), grads = eqx.filter_value_and_grad(
            lambda m: _loss(forward, m, state, x, t), has_aux=True)(model)
        return _sgd(model, grads), state, y

    outputs = []
    for _ in range(STEPS):
        model, state, y = step(model, state, x, t)
        outputs.append(to_host(y))
    stats = state.get(model.bn.state_index)
    return {"y": np.stack(outputs), "mean": to_host(stats.mean), "var": to_host(stats.var),
            "w1": to_host(model.lin1.weight), "w2": to_host(model.lin2.weight)}


def reference_run():
    """The same training in one process, on the whole batch, on one device."""
    x, t = make_data()
    model, state = eqx.nn.make_with_state(Net)(None, jax.random.key(0))
    return train(lambda m, s, xb: m(xb, s), model, state, jnp.asarray(x), jnp.asarray(t),
                 np.asarray)


def distributed_runs():
    """Both data-parallel styles over a mesh spanning the devices of all processes."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def put(a, sharding):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def replicate(*tree):
        return jax.tree.map(lambda a: put(a, replicated) if eqx.is_array(a) else a, tree)

    def to_host(a):
        if a.sharding.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    x, t = make_data()
    x, t = put(x, batch), put(t, batch)
    results = {}

    # shard_map: each device normalises its local rows with statistics synchronised
    # across all devices of all processes by the collectives over "data".
    model, state = replicate(*eqx.nn.make_with_state(Net)("data", jax.random.key(0)))

    def shard_forward(model, state, xb):
        params, static = eqx.partition(model, eqx.is_array)
        body = jax.shard_map(lambda p, s, xl: eqx.combine(p, static)(xl, s), mesh=mesh,
                             in_specs=(P(), P(), P("data")), out_specs=(P("data"), P()))
        return body(params, state, xb)

    out = train(shard_forward, model, state, x, t, to_host)
    results.update({f"shard_map_{k}": v for k, v in out.items()})

    # SPMD jit: the global view, axis_name=None; the partitioner makes the statistics
    # global. Model and state are replicated on the mesh (see docs/distributed.md).
    model, state = replicate(*eqx.nn.make_with_state(Net)(None, jax.random.key(0)))

    def spmd_forward(model, state, xb):
        model, state = eqx.filter_shard((model, state), replicated)
        return model(xb, state)

    out = train(spmd_forward, model, state, x, t, to_host)
    results.update({f"spmd_{k}": v for k, v in out.items()})
    return results


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=60,
                               heartbeat_timeout_seconds=30)
    try:
        assert jax.process_count() == num_processes
        assert jax.device_count() == num_processes * jax.local_device_count()
        results = distributed_runs()
        results["device_count"] = np.asarray(jax.device_count())
        if process_id == 0:
            np.savez(out, **results)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
