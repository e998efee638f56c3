"""Scan over layers: identical blocks stacked along a leading axis, parameters and running
statistics alike, and applied in sequence with `jax.lax.scan`, so that a deep model is
traced and compiled once per block rather than once per layer."""

from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
from jax import lax
from jaxtyping import PRNGKeyArray

from ._errors import BatchNormError, fail
from ._precise import _DefaultCall
from ._validate import is_int


def stack_blocks(make_block: Callable[[PRNGKeyArray], Any], n: int,
                 key: PRNGKeyArray) -> tuple[Any, eqx.nn.State]:
    r"""Builds `n` blocks, one per key split from `key`, stacked into one.

    Each `make_block(key_i)` builds one block (any Equinox module, typically holding
    `BatchNorm`s); the result has the structure of one block, with a leading axis of
    size `n` on every array: parameters, and the running statistics in the state
    (shape `(n, *feature_shape)`). It is `eqx.filter_vmap` over the keys of
    `eqx.nn.make_with_state(make_block)`, and the block with key `key_i` holds the
    same numbers as `make_block(key_i)` built alone.

    !!! Example

        ```python
        class Block(eqx.Module):
            bn: ebn.BatchNorm
            conv: eqx.nn.Conv2d

            def __init__(self, key):
                self.bn = ebn.BatchNorm(16, axis=0, axis_name="batch")
                self.conv = eqx.nn.Conv2d(16, 16, 1, key=key)

            def __call__(self, x, state):
                x, state = self.bn(x, state)
                return self.conv(jax.nn.relu(x)), state

        blocks, state = ebn.stack_blocks(Block, 8, jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (32, 16, 8, 8))
        ys, state = ebn.scan_blocks(blocks, state, xs, axis_name="batch")
        ```

    **Arguments:**

    - `make_block`: `make_block(key) -> block`, called once (under `eqx.filter_vmap`).
    - `n`: the number of blocks, at least 1.
    - `key`: a PRNG key, split into one key per block.

    **Returns:**

    `(blocks, state)`: the stacked blocks and their stacked `eqx.nn.State`, for
    `scan_blocks` (or for `jax.lax.scan` directly).

    **Raises:**

    `BatchNormError` for an `n` that is not a positive int, a `make_block` that is not
    callable, or a `key` that is not a PRNG key.
    """
    if not is_int(n) or n < 1:
        raise fail("n", "a positive int (the number of blocks)", repr(n), "pass e.g. `n=8`")
    if not callable(make_block):
        raise fail("make_block", "a function `make_block(key) -> block`",
                   type(make_block).__name__, "pass the block's class or a function that "
                   "builds one block from a key")
    try:
        keys = jax.random.split(key, n)
    except (TypeError, ValueError) as e:
        raise fail("key", "a PRNG key (e.g. `jax.random.key(0)`)", repr(key),
                   "pass `key=jax.random.key(0)`") from e
    return eqx.filter_vmap(lambda k: eqx.nn.make_with_state(make_block)(k))(keys)


def scan_blocks(
    blocks: Any,
    state: eqx.nn.State,
    x: Any,
    *,
    axis_name: Hashable | None = None,
    call: Callable[[Any, Any, eqx.nn.State], tuple[Any, eqx.nn.State]] | None = None,
    unroll: int | bool = 1,
) -> tuple[Any, eqx.nn.State]:
    r"""Applies stacked blocks in sequence with `jax.lax.scan`: block $0$ first.

    $$x_{k+1}, s_k' = \mathrm{block}_k(x_k, s_k), \qquad k = 0, \dots, n-1,$$

    returning $x_n$ and the state of every block, stacked as it came in. The same
    numbers as calling the blocks one after the other, with one trace of a block
    whatever `n` is. Differentiable, and usable inside `eqx.filter_jit`;
    `eqx.nn.inference_mode(blocks)` switches every block's `BatchNorm`s to inference.

    !!! Example

        ```python
        def make_block(key):  # BatchNorm, relu, a 1x1 convolution; per example
            return eqx.nn.Sequential([ebn.BatchNorm(16, axis=0, axis_name="batch"),
                                      eqx.nn.Lambda(jax.nn.relu),
                                      eqx.nn.Conv2d(16, 16, 1, key=key)])

        blocks, state = ebn.stack_blocks(make_block, 8, jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (32, 16, 8, 8))

        @eqx.filter_jit
        def loss(blocks, state, xs):
            ys, state = ebn.scan_blocks(blocks, state, xs, axis_name="batch")
            return jnp.mean(ys ** 2), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            blocks, state, xs)
        ys, _ = ebn.scan_blocks(eqx.nn.inference_mode(blocks), state, xs,
                                axis_name="batch")   # inference
        ```

    **Arguments:**

    - `blocks`: blocks stacked along a leading axis (from `stack_blocks`, or
      `eqx.filter_vmap` over keys).
    - `state`: their stacked `eqx.nn.State`.
    - `x`: the input of the first block: the whole batch, or (with `axis_name`) a batch
      of examples for blocks written per example.
    - `axis_name`: for blocks written per example, the name their `BatchNorm`s reduce
      over: each block is then called as `jax.vmap(block, axis_name=axis_name,
      in_axes=(0, None), out_axes=(0, None))(x, state)`.
    - `call`: `call(block, x, state) -> (x, state)` applies one block (instead of
      `block(x, state)`), e.g. to pass a key or a mask.
    - `unroll`: `jax.lax.scan`'s `unroll` (blocks per loop iteration).

    **Returns:**

    `(y, state)`: the last block's output and the new stacked state.

    **Raises:**

    `BatchNormError` if `state` is not an `eqx.nn.State`, if the blocks' and the state's
    arrays do not share one leading size, if both `call` and `axis_name` are given, if
    `call` does not return `(x, state)`, or if a block's output does not have its
    input's shape and dtype (the scan's carry).
    """
    if not isinstance(state, eqx.nn.State):
        raise fail("state", "the stacked `eqx.nn.State` of `blocks`", type(state).__name__,
                   "pass the state that `ebn.stack_blocks` returned with the blocks")
    if call is not None and axis_name is not None:
        raise fail("axis_name", "no value when `call` is given", repr(axis_name),
                   "pass either `call=` or `axis_name=`; `call` may vmap itself")
    params, static = eqx.partition(blocks, eqx.is_array)
    sizes = {a.shape[0] if a.ndim else None for a in jax.tree.leaves((params, state))}
    if len(sizes) != 1 or None in sizes:
        raise fail("blocks", "blocks and a state stacked along one leading axis",
                   f"arrays with leading sizes {sorted(sizes, key=str)}",
                   "build them together with `ebn.stack_blocks(make_block, n, key)` (or "
                   "`eqx.filter_vmap` over keys of `eqx.nn.make_with_state(make_block)`)")
    apply = _DefaultCall(axis_name) if call is None else call

    def step(carry: Any, block_and_state: tuple[Any, eqx.nn.State]):
        block_params, block_state = block_and_state
        out = apply(eqx.combine(block_params, static), carry, block_state)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State)):
            got = "an array" if isinstance(out, jax.Array) else type(out).__name__
            raise fail("call", "a function returning `(x, state)`", f"one returning {got}",
                       "return the block's output and its state, e.g. "
                       "`call=lambda block, x, state: block(x, state)`")
        return out

    try:
        return lax.scan(step, x, (params, state), unroll=unroll)
    except TypeError as e:
        if "carry" not in str(e) or isinstance(e, BatchNormError):
            raise
        first = jax.tree.map(lambda a: a[0], (params, state))
        out = jax.eval_shape(lambda p, s: step(x, (p, s))[0], *first)
        types = [", ".join(str(jax.typeof(a)) for a in jax.tree.leaves(t)) for t in (x, out)]
        raise fail("blocks", "blocks whose output has the shape and dtype of their input "
                   "(the scan carries it from block to block)",
                   f"blocks that turn {types[0]} into {types[1]}",
                   "make each block return its input's shape and dtype (e.g. cast back "
                   "with `.astype(x.dtype)`), and apply layers that change the shape "
                   "before or after the scanned blocks") from None
