"""Folding an inference-mode `BatchNorm` into the linear layer before it."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jax import lax

from ._batch_norm import BatchNorm, _get_running
from ._errors import fail
from ._validate import as_axis_tuple

_Foldable = eqx.nn.Linear | eqx.nn.Conv | eqx.nn.ConvTranspose


def _replace(module: eqx.Module, **changes: Any) -> Any:
    """A copy of `module` with some fields replaced, static ones included (which
    `eqx.tree_at` cannot change), as unflattening a module does: no `__init__`."""
    new = object.__new__(type(module))
    for name, value in vars(module).items():
        object.__setattr__(new, name, changes.get(name, value))
    return new


def _output_channels(layer: Any) -> tuple[int, int]:
    """(output channels, rank of one example's output) of a foldable layer."""
    if isinstance(layer, eqx.nn.Linear):
        if layer.out_features == "scalar":
            raise fail("layer", "a layer with an output channel axis",
                       "eqx.nn.Linear(..., out_features='scalar')",
                       "a scalar output has no feature axis to normalise")
        return int(layer.out_features), 1
    if isinstance(layer, eqx.nn.Conv | eqx.nn.ConvTranspose):
        return layer.out_channels, layer.num_spatial_dims + 1
    raise fail("layer", "an eqx.nn.Linear, eqx.nn.Conv (1-D/2-D/3-D) or "
               "eqx.nn.ConvTranspose", type(layer).__name__,
               "fold only a batch norm that directly follows one of these layers")


def fold_into(layer: Any, bn: Any, state: eqx.nn.State) -> Any:
    r"""Folds an inference-mode `BatchNorm` into the linear layer that precedes it.

    Returns a layer of the same type as `layer` computing
    $\mathrm{BN}_{\text{inference}}(\text{layer}(x))$, one pass instead of two:

    $$W' = \mathrm{diag}(s)\,W,\qquad b' = s\odot(b - \mu_r) + \beta,\qquad
      s = \gamma / \sqrt{\sigma^2_r + \epsilon},$$

    in at least float32, with the running statistics whatever `bn.inference` says.

    !!! Example

        ```python
        conv = eqx.nn.Conv2d(3, 16, 3, use_bias=False, key=jax.random.key(0))
        bn, state = eqx.nn.make_with_state(ebn.BatchNorm)(16, axis=0, axis_name="batch")
        xs = jax.random.normal(jax.random.key(1), (8, 3, 10, 10))
        train = jax.vmap(lambda x, s: bn(conv(x), s), axis_name="batch",
                         in_axes=(0, None), out_axes=(0, None))
        _, state = train(xs, state)                    # a training step
        folded = ebn.fold_into(conv, bn, state)        # an eqx.nn.Conv2d, with bias
        y = folded(xs[0])                  # == bn(conv(xs[0]), state, inference=True)[0]
        ```

    **Arguments:**

    - `layer`: an `eqx.nn.Linear`, `eqx.nn.Conv` (`Conv1d`/`Conv2d`/`Conv3d`) or
      `eqx.nn.ConvTranspose`, with or without bias.
    - `bn`: the `BatchNorm` applied to the layer's output channels: `axis=0` per example
      (Equinox's layers output `(C, ...)`), or `axis=1` on a `jax.vmap`ped layer's output.
    - `state`: the `eqx.nn.State` holding `bn`'s running statistics (not consumed).

    **Returns:**

    A layer of `type(layer)` and dtype, with bias (a layer without one gets one).

    **Raises:**

    `BatchNormError` for another kind of layer, a `bn` that is not a `BatchNorm`, or a
    `bn` whose feature axis or size is not the layer's output channels.
    """
    return _fold_into(layer, bn, state, "eqx.filter_vmap(ebn.fold_into)(layer, bn, state)")


def _fold_into(layer: Any, bn: Any, state: eqx.nn.State, per_block: str) -> Any:
    """`fold_into`; `per_block`: the public call, mapped over stacked blocks."""
    channels, rank = _output_channels(layer)
    if not isinstance(bn, BatchNorm):
        raise fail("bn", "an eqx_batchnorm.BatchNorm", type(bn).__name__,
                   "convert it first (e.g. `from_equinox`, `from_torch`)")
    axes = as_axis_tuple(bn.axis)
    # Per example the channels are axis 0 of a rank-`rank` output; batched, axis 1.
    per_example = len(axes) == 1 and -rank <= axes[0] < rank and axes[0] % rank == 0
    batched = axes == (1,)
    if not (per_example or batched):
        raise fail("bn", f"a batch norm over the output channels of the "
                   f"{type(layer).__name__} (`axis=0` per example, or `axis=1` on a "
                   "vmapped batch)", f"`axis={bn.axis!r}`",
                   "fold only a batch norm normalising the layer's output channels; "
                   "Equinox layers put them first: `BatchNorm(C, axis=0)`")
    if bn.feature_shape != (channels,):
        raise fail("bn", f"{channels} features (the {type(layer).__name__}'s output "
                   "channels)", f"feature shape {bn.feature_shape}",
                   "pass the batch norm that follows this layer")
    running = _get_running(state, bn, per_block)
    weight = layer.weight
    compute = jnp.promote_types(weight.dtype, jnp.float32)
    s = lax.rsqrt(running.var.astype(compute) + bn.epsilon)  # as `normalize` does
    if bn.scale is not None:
        s = s * bn.scale.astype(compute)
    old_bias = 0.0 if layer.bias is None else layer.bias.reshape(channels).astype(compute)
    new_bias = (old_bias - running.mean.astype(compute)) * s
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.astype(compute)
    new_weight = weight.astype(compute) * s.reshape((channels,) + (1,) * (weight.ndim - 1))
    return _replace(layer, weight=new_weight.astype(weight.dtype), use_bias=True,
                    bias=new_bias.reshape((channels,) + (1,) * (rank - 1)).astype(weight.dtype))


def fold_sequential(seq: Any, state: eqx.nn.State) -> eqx.nn.Sequential:
    r"""Folds every `BatchNorm` that directly follows a foldable layer in a `Sequential`.

    Each such pair in `seq.layers` (or in nested `eqx.nn.Sequential`s) becomes
    `fold_into(layer, bn, state)`; batch norms after anything else are kept.

    !!! Example

        ```python
        k1, k2 = jax.random.split(jax.random.key(0))
        model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
            eqx.nn.Conv2d(3, 16, 3, key=k1),
            ebn.BatchNorm(16, axis=0, axis_name="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(16 * 6 * 6, 10, key=k2),
        ])
        xs = jax.random.normal(jax.random.key(1), (8, 3, 8, 8))
        _, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                            out_axes=(0, None))(xs, state)   # a training step
        fast = ebn.fold_sequential(model, state)   # [Conv2d, Lambda, Lambda, Linear]
        ys = jax.vmap(fast)(xs)                    # no state needed any more
        ```

    **Arguments:**

    - `seq`: an `eqx.nn.Sequential`.
    - `state`: the `eqx.nn.State` holding its batch norms' running statistics.

    **Returns:**

    A new `eqx.nn.Sequential` with the pairs folded.

    **Raises:**

    `BatchNormError` if `seq` is not an `eqx.nn.Sequential`, or a pair cannot be folded.
    """
    if not isinstance(seq, eqx.nn.Sequential):
        raise fail("seq", "an eqx.nn.Sequential", type(seq).__name__,
                   "for a single pair, call `fold_into(layer, bn, state)`")
    out = []
    for i, layer in enumerate(seq.layers):
        before = seq.layers[i - 1] if i > 0 else None
        if isinstance(layer, eqx.nn.Sequential):
            out.append(fold_sequential(layer, state))
        elif isinstance(layer, BatchNorm) and isinstance(before, _Foldable):
            out[-1] = _fold_into(before, layer, state,  # in place of `before`
                                 "eqx.filter_vmap(ebn.fold_sequential)(blocks, state)")
        else:
            out.append(layer)
    return eqx.nn.Sequential(out)
