"""Precise BatchNorm (Wu & Johnson, 2021): the running statistics recomputed as exact
averages over batches of the final model."""

import itertools
import warnings
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._batch_norm import BatchNorm, BatchStats, _get_running
from ._errors import fail
from ._folding import _replace

_SENTINEL = -1.0  # a variance no batch can produce: marks a layer that was not updated


def _is_bn(node: Any) -> bool:
    return isinstance(node, BatchNorm)


def _batch_norms(model: Any) -> list[tuple[str, BatchNorm]]:
    """Every `BatchNorm` in `model` with its path, one per state entry, in tree order."""
    found, seen = [], set()
    for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_bn)[0]:
        if _is_bn(node) and node.state_index.marker not in seen:
            seen.add(node.state_index.marker)
            found.append((jax.tree_util.keystr(path) or "<model>", node))
    return found


def _probe(bn: BatchNorm) -> BatchNorm:
    # Momentum 0 writes exactly this batch's statistics into the state, with no renorm
    # correction towards the sentinel; NaN batches are recorded, to surface in the result.
    return _replace(bn, momentum=0.0, skip_nonfinite_updates=False, renorm=False,
                    inference=False)


def _clone(state: eqx.nn.State) -> eqx.nn.State:
    return jax.tree_util.tree_map(lambda a: a, state)


@dataclass(frozen=True)
class _DefaultCall:
    """The default `call`; a frozen dataclass so that jit caches it by value."""

    axis_name: Hashable | None

    def __call__(self, model: Any, batch: Any, state: eqx.nn.State) -> Any:
        if self.axis_name is None:
            return model(batch, state)
        return jax.vmap(model, axis_name=self.axis_name, in_axes=(0, None),
                        out_axes=(0, None))(batch, state)


@eqx.filter_jit
def _accumulate(probe_model: Any, base_state: eqx.nn.State, batch: Any, acc: list,
                k: jax.Array, call: Callable) -> list:
    """`acc` with the statistics of the `k`-th batch averaged in."""
    out = call(probe_model, batch, base_state)
    new_state = out[-1] if isinstance(out, tuple) else out
    if not isinstance(new_state, eqx.nn.State):
        raise fail("call", "a function returning `(output, state)`",
                   f"a function returning {type(out).__name__}",
                   "return the state as the last element, e.g. `call=lambda m, x, s: m(x, s)`")
    new_acc = []
    for (_, bn), (mean_avg, m2, var_avg, updated) in zip(_batch_norms(probe_model), acc,
                                                          strict=True):
        stats = new_state.get(bn.state_index)
        mean, var = stats.mean.astype(mean_avg.dtype), stats.var.astype(var_avg.dtype)
        # Welford's running mean (and sum of squared deviations of the batch means):
        # no cancellation, however many batches.
        delta = mean - mean_avg
        mean_avg = mean_avg + delta / k
        m2 = m2 + delta * (mean - mean_avg)
        var_avg = var_avg + (var - var_avg) / k
        features = tuple(range(-len(bn.feature_shape), 0))  # after any block axes
        updated = updated & jnp.all(jnp.any(stats.var != _SENTINEL, axis=features))
        new_acc.append((mean_avg, m2, var_avg, updated))
    return new_acc


def recompute_statistics(
    model: Any,
    state: eqx.nn.State,
    batches: Iterable[Any],
    *,
    call: Callable[[Any, Any, eqx.nn.State], Any] | None = None,
    axis_name: Hashable | None = None,
    estimator: str = "batch_average",
    max_batches: Any = None,
    progress: bool = False,
) -> eqx.nn.State:
    r"""Recomputes every `BatchNorm`'s running statistics exactly over `batches`
    (precise BN).

    Each `BatchNorm` in `model` (at any depth) gets equal-weight averages over the $K$
    batches of its per-batch statistics $\mu_k, \sigma^2_k$ (biased), taken in training
    mode with the current weights; every batch weighs the same, whatever its size.

    - `estimator="batch_average"` (default): Wu & Johnson's PreciseBN, what the moving
      average of training estimates, with equal weights:

      $$\mu_r = \frac1K\sum_k \mu_k,\qquad \sigma^2_r = \frac1K\sum_k \sigma^2_k .$$

    - `estimator="population"`: the variance of all batches pooled (exactly, for batches
      of equal size), which the above underestimates by about $(n-1)/n$ for $n$ elements
      per feature and batch:

      $$\sigma^2_r = \frac1K\sum_k \sigma^2_k + \frac1K\sum_k (\mu_k - \mu_r)^2.$$

    Only the `BatchNorm`s are switched to training: pass an `eqx.nn.inference_mode`
    model to keep dropout off.

    !!! Example

        ```python
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
            eqx.nn.Linear(8, 32, key=k1),
            ebn.BatchNorm(32, axis=0, axis_name="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(32, 1, key=k2),
        ])
        x_train = jax.random.normal(k3, (1024, 8))
        batches = [x_train[i:i + 128] for i in range(0, 1024, 128)]
        # ... training, then e.g. weight averaging, then, for a per-example model:
        state = ebn.recompute_statistics(model, state, batches, axis_name="batch")
        ```

    **Arguments:**

    - `model`: any pytree holding `BatchNorm`s (typically the whole model).
    - `state`: the `eqx.nn.State` made with it (not consumed).
    - `batches`: an iterable of batches (arrays or pytrees), read once.
    - `call`: `call(model, batch, state) -> (output, state)` (the state last) runs the
      model on one batch, e.g. to unpack dict batches. Default: `model(batch, state)`.
    - `axis_name`: for per-example models, the name their `BatchNorm`s reduce over: the
      default `call` is then `jax.vmap(model, axis_name=axis_name, in_axes=(0, None),
      out_axes=(0, None))(batch, state)`.
    - `estimator`: `"batch_average"` or `"population"`, as above.
    - `max_batches`: use at most this many batches (e.g. 200, as in PreciseBN).
    - `progress`: show a progress bar (needs `tqdm`; without it, a warning and no bar).

    **Returns:**

    A new `eqx.nn.State`: `state` with every `BatchNorm`'s running statistics replaced.

    **Raises:**

    `BatchNormError` if `model` holds no `BatchNorm`, `batches` is empty, a
    `BatchNorm` was not called in training mode on every batch, `call` does not return
    a state, or an argument is invalid.
    """
    if estimator not in ("batch_average", "population"):
        raise fail("estimator", "'batch_average' or 'population'", repr(estimator),
                   "pass `estimator='batch_average'` (PreciseBN) or 'population'")
    if call is not None and axis_name is not None:
        raise fail("axis_name", "no value when `call` is given", repr(axis_name),
                   "pass either `call=` or `axis_name=`; `call` may vmap itself")
    if max_batches is not None and (not isinstance(max_batches, int)
                                    or isinstance(max_batches, bool) or max_batches < 1):
        raise fail("max_batches", "a positive int or None", repr(max_batches),
                   "pass e.g. `max_batches=200`")
    if call is None:
        call = _DefaultCall(axis_name)
    bns = _batch_norms(model)
    if not bns:
        raise fail("model", "a model holding at least one eqx_batchnorm.BatchNorm",
                   f"{type(model).__name__} without one",
                   "pass the whole model; convert other batch norms first (from_equinox)")

    base = _clone(state)
    acc = []
    for _, bn in bns:
        # Stacked blocks (a scanned model) hold their layers' statistics with a block axis.
        running = _get_running(base, bn, stacked=True)
        base = base.set(bn.state_index, BatchStats(jnp.zeros_like(running.mean),
                                                   jnp.full_like(running.var, _SENTINEL)))
        zeros = jnp.zeros(running.mean.shape,
                          jnp.promote_types(running.mean.dtype, jnp.float32))
        acc.append((zeros, zeros, zeros, jnp.array(True)))
    probe_model = jax.tree_util.tree_map(lambda n: _probe(n) if _is_bn(n) else n, model,
                                         is_leaf=_is_bn)

    iterator: Iterable[Any] = itertools.islice(batches, max_batches)  # None: no limit
    if progress:
        iterator = _with_progress(iterator, batches, max_batches)
    count = 0
    for count, batch in enumerate(iterator, start=1):
        acc = _accumulate(probe_model, base, batch, acc, jnp.asarray(count, jnp.float32), call)
    if count == 0:
        raise fail("batches", "at least one batch", "an empty iterable",
                   "pass an iterable that yields batches (a generator is read only once)")

    missing = [path for (path, _), entry in zip(bns, acc, strict=True) if not entry[3]]
    if missing:
        raise fail("model", "every BatchNorm called in training mode on every batch",
                   f"{missing} left without statistics",
                   "make `call` run the model as in training; a layer called with "
                   "`inference=True` or `update_stats=False`, or not at all, cannot be recomputed")
    result = _clone(state)
    for (_, bn), (mean, m2, var, _) in zip(bns, acc, strict=True):
        if estimator == "population":
            var = var + m2 / count
        running = _get_running(result, bn, stacked=True)
        result = result.set(bn.state_index, BatchStats(mean.astype(running.mean.dtype),
                                                       var.astype(running.var.dtype)))
    return result


def _with_progress(iterator: Iterable[Any], batches: Iterable[Any],
                   max_batches: int | None) -> Iterable[Any]:
    try:
        from tqdm import tqdm
    except ImportError:
        warnings.warn("recompute_statistics(progress=True) needs `tqdm`, which is not "
                      "installed; continuing without a progress bar", stacklevel=3)
        return iterator
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(iterator, total=total, desc="recompute_statistics", unit="batch")
