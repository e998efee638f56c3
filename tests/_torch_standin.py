"""A NumPy stand-in for the few PyTorch calls that the documentation's examples make.

PyTorch is no dependency of this project. `tests/test_docs.py` runs an example that imports
`torch` against this module when PyTorch is absent, so that the example's own calls (the
`ebn.from_torch` ones) are checked on every run; `tests/record_torch_golden.py --check`
runs the same examples against real PyTorch. It covers freshly built layers only (their
`state_dict()` is PyTorch's initialisation: scale 1, bias 0, running mean 0, running
variance 1); anything else an example uses fails loudly here, naming what is missing.
"""

from __future__ import annotations

import types

import numpy as np

_rng = np.random.default_rng(0)


class Tensor(np.ndarray):
    def numpy(self) -> np.ndarray:
        return np.asarray(self)


def _tensor(a) -> Tensor:
    return np.asarray(a).view(Tensor)


def manual_seed(seed: int) -> None:
    global _rng
    _rng = np.random.default_rng(seed)


def randn(*shape: int) -> Tensor:
    return _tensor(_rng.standard_normal(shape).astype(np.float32))


class Module:
    def __init__(self) -> None:
        self.training = True
        self._state: dict[str, Tensor] = {}

    def eval(self) -> Module:
        self.training = False
        return self

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self._state)

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"the PyTorch stand-in in {__name__} does not run `{type(self).__name__}`: "
            "extend it, or check this example against real PyTorch only")


class _BatchNorm(Module):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.affine = affine
        if affine:
            self._state["weight"] = _tensor(np.ones(num_features, np.float32))
            self._state["bias"] = _tensor(np.zeros(num_features, np.float32))
        if track_running_stats:
            self._state["running_mean"] = _tensor(np.zeros(num_features, np.float32))
            self._state["running_var"] = _tensor(np.ones(num_features, np.float32))
            self._state["num_batches_tracked"] = _tensor(np.array(0, np.int64))
        self.eps, self.momentum = eps, momentum

    def __call__(self, x):
        """PyTorch's BatchNorm on channels at axis 1: batch statistics in training (the
        running ones updated with the unbiased variance), the running ones in eval."""
        x = np.asarray(x, np.float64)
        axes = tuple(a for a in range(x.ndim) if a != 1)
        shape = [1] * x.ndim
        shape[1] = -1
        if self.training or "running_mean" not in self._state:
            mean, var = x.mean(axes), x.var(axes)
            if "running_mean" in self._state and self.momentum is not None:
                n = x.size // x.shape[1]
                m, s = self.momentum, self._state
                s["running_mean"] = _tensor(((1 - m) * s["running_mean"] + m * mean)
                                            .astype(np.float32))
                s["running_var"] = _tensor(((1 - m) * s["running_var"] + m * var * n / (n - 1))
                                           .astype(np.float32))
        else:
            mean, var = self._state["running_mean"], self._state["running_var"]
        y = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape) + self.eps)
        if self.affine:
            y = y * np.reshape(self._state["weight"], shape) + np.reshape(
                self._state["bias"], shape)
        return _tensor(y.astype(np.float32))


class BatchNorm1d(_BatchNorm):
    pass


class BatchNorm2d(_BatchNorm):
    pass


class BatchNorm3d(_BatchNorm):
    pass


class Conv2d(Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 bias: bool = True, **unused) -> None:
        super().__init__()
        bound = 1 / np.sqrt(in_channels * kernel_size**2)
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self._state["weight"] = _tensor(_rng.uniform(-bound, bound, shape).astype(np.float32))
        if bias:
            self._state["bias"] = _tensor(
                _rng.uniform(-bound, bound, out_channels).astype(np.float32))


class Sequential(Module):
    def __init__(self, *layers: Module) -> None:
        super().__init__()
        self.layers = layers

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers)
                for k, v in layer.state_dict().items()}


nn = types.SimpleNamespace(Module=Module, BatchNorm1d=BatchNorm1d, BatchNorm2d=BatchNorm2d,
                           BatchNorm3d=BatchNorm3d, Conv2d=Conv2d, Sequential=Sequential)
