"""Golden files from real PyTorch for `ebn.from_torch`, and the live check against PyTorch.

PyTorch is no dependency of this project, not even a test one. The converter tests
(`tests/test_interop.py`) compare `ebn.from_torch` with what real PyTorch computed, recorded
by this script under `tests/golden/` as `.npz` files: for `torch.nn.BatchNorm1d/2d/3d` in
several configurations, a layer's `state_dict()` with trained-looking statistics, an input,
the `.eval()` output, and the `.train()` output with the running statistics it leaves. One
more file holds the small CNN that `notebooks/porting.ipynb` ports: its `state_dict()` after
60 training steps on scikit-learn's digits, and its logits on all of them.

Record (after changing a case, or to move to another PyTorch release), with PyTorch in a
scratch environment outside the repository, from the repository root:

    python3.11 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch numpy jax equinox jaxtyping beartype scikit-learn
    PYTHONPATH=. /tmp/torchvenv/bin/python tests/record_torch_golden.py

Check live PyTorch against the committed files and `ebn.from_torch` against live PyTorch
(including the documentation's examples that import `torch`); `.ci/run` runs this wherever
a PyTorch wheel can be installed without downloading one:

    PYTHONPATH=. /tmp/torchvenv/bin/python tests/record_torch_golden.py --check

Recording and checking both run PyTorch on kernels that give the same numbers on every
x86-64 CPU (`_pin_kernels`): 60 steps of Adam turn the last-bit differences between
instruction sets into differences of 1e-2 in the trained weights, so with PyTorch's default,
CPU-dispatched kernels the CNN's file could be reproduced only on the recording machine's CPU.

The comparisons themselves (`check_case`, `check_model`) live here and are what
`tests/test_interop.py` runs on the committed files, so the recorded and the live numbers go
through the same assertions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden"
ROOT = Path(__file__).resolve().parent.parent

# name -> torch layer class, constructor arguments, the shape of the warm-up batches that
# give it trained-looking statistics, and the test input (shape, scale, shift).
CASES: dict[str, dict[str, Any]] = {
    "bn1d_nc": dict(cls="BatchNorm1d", kwargs={}, warmup=(8, 3), x=((8, 3), 2.0, 1.0)),
    "bn1d_ncl": dict(cls="BatchNorm1d", kwargs={}, warmup=(4, 3, 5), x=((4, 3, 5), 2.0, 1.0)),
    "bn2d": dict(cls="BatchNorm2d", kwargs={}, warmup=(4, 3, 4, 5), x=((4, 3, 4, 5), 2.0, 1.0)),
    "bn3d": dict(cls="BatchNorm3d", kwargs={}, warmup=(2, 3, 2, 3, 4),
                 x=((2, 3, 2, 3, 4), 2.0, 1.0)),
    "bn2d_momentum": dict(cls="BatchNorm2d", kwargs={"momentum": 0.3}, warmup=(4, 3, 2, 2),
                          x=((5, 3, 2, 2), 3.0, -1.0)),
    "bn2d_eps": dict(cls="BatchNorm2d", kwargs={"eps": 1e-3, "momentum": 0.05},
                     warmup=(4, 3, 3, 3), x=((6, 3, 3, 3), 0.5, 4.0)),
    "bn1d_no_affine": dict(cls="BatchNorm1d", kwargs={"affine": False}, warmup=(8, 3),
                           x=((6, 3), 1.0, 0.0)),
}
DIGITS_STEPS = 60
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- recording


def _torch_layer(torch, case: dict[str, Any]):
    """A PyTorch batch norm with trained-looking statistics and parameters."""
    torch.manual_seed(0)
    layer = getattr(torch.nn, case["cls"])(3, **case["kwargs"])
    layer.train()
    for i in range(3):
        layer(torch.randn(*case["warmup"]) * (1 + i) + 2.0)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.normal_()
    return layer.eval()


def _numpy_state(state_dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state_dict.items()}


def record_case(torch, name: str) -> dict[str, np.ndarray]:
    case = CASES[name]
    layer = _torch_layer(torch, case)
    shape, scale, shift = case["x"]
    x = torch.randn(*shape) * scale + shift
    arrays = {f"state/{k}": v for k, v in _numpy_state(layer.state_dict()).items()}
    with torch.no_grad():
        arrays["eval_out"] = layer(x).numpy()
        layer.train()
        arrays["train_out"] = layer(x).numpy()
    arrays["train_running_mean"] = layer.running_mean.numpy().copy()
    arrays["train_running_var"] = layer.running_var.numpy().copy()
    arrays["x"] = x.numpy()
    meta = {"cls": case["cls"], "kwargs": case["kwargs"], "torch": torch.__version__}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def record_model_dicts(torch) -> dict[str, np.ndarray]:
    """Two state dicts that the converter must read or refuse: a batch norm inside a model
    (keys prefixed `"1."`), and a layer built with `track_running_stats=False`."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1),
                                _torch_layer(torch, CASES["bn2d"]))
    arrays = {f"sequential/{k}": v for k, v in _numpy_state(model.state_dict()).items()}
    untracked = torch.nn.BatchNorm2d(3, track_running_stats=False)
    arrays |= {f"untracked/{k}": v for k, v in _numpy_state(untracked.state_dict()).items()}
    return arrays


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    images = (X / 16.0).astype(np.float32).reshape(-1, 8, 8)
    return images[:, None], y  # NCHW, as in notebooks/porting.ipynb


def record_digits_cnn(torch) -> dict[str, np.ndarray]:
    """The PyTorch model of notebooks/porting.ipynb, trained as the notebook describes."""
    nchw, y = digits()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: threads only add overhead
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(DIGITS_STEPS):
        idx = rng.choice(len(y), 64, replace=False)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(nchw[idx])),
                                                 torch.from_numpy(y[idx]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(nchw)).numpy()
    arrays = {f"state_dict/{k}": v for k, v in _numpy_state(model.state_dict()).items()}
    arrays["logits"] = logits
    arrays["meta"] = np.array(json.dumps({"torch": torch.__version__, "steps": DIGITS_STEPS}))
    return arrays


def record_all(torch) -> dict[str, dict[str, np.ndarray]]:
    files = {f"torch_{name}.npz": record_case(torch, name) for name in CASES}
    files["torch_model_dicts.npz"] = record_model_dicts(torch)
    files["torch_digits_cnn.npz"] = record_digits_cnn(torch)
    return files


# ----------------------------------------------------------------------------- checking


def load(filename: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / filename) as data:
        return {k: data[k] for k in data.files}


def state_dict(arrays: dict[str, np.ndarray], group: str = "state") -> dict[str, np.ndarray]:
    prefix = group + "/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def check_case(arrays: dict[str, np.ndarray]) -> None:
    """`ebn.from_torch` reproduces PyTorch's `.eval()` output, batched and per example
    under `vmap`, and its `.train()` output; the running mean moves as PyTorch's, and the
    running variance by the biased batch variance (Flax's convention, documented)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_batchnorm as ebn

    meta = json.loads(str(arrays["meta"]))
    kwargs = meta["kwargs"]
    sd = state_dict(arrays)
    torch_momentum = kwargs.get("momentum", 0.1)
    extra = {"epsilon": kwargs["eps"]} if "eps" in kwargs else {}
    x = jnp.asarray(arrays["x"])

    bn, state = ebn.from_torch(sd, torch_momentum=torch_momentum, **extra)
    assert bn.axis == 1, bn.axis
    assert abs(bn.momentum - (1 - torch_momentum)) < 1e-12, bn.momentum
    assert (bn.scale is None) == (not kwargs.get("affine", True))
    y, _ = bn(x, state, inference=True)
    np.testing.assert_allclose(y, arrays["eval_out"], **TOLERANCE)

    bn0, state0 = ebn.from_torch(sd, torch_momentum=torch_momentum, axis=0,
                                 axis_name="batch", **extra)
    ys, _ = jax.vmap(eqx.nn.inference_mode(bn0), axis_name="batch", in_axes=(0, None),
                     out_axes=(0, None))(x, state0)
    np.testing.assert_allclose(ys, arrays["eval_out"], **TOLERANCE)

    y_train, new_state = bn(x, state)
    np.testing.assert_allclose(y_train, arrays["train_out"], **TOLERANCE)
    stats = new_state.get(bn.state_index)
    np.testing.assert_allclose(stats.mean, arrays["train_running_mean"], rtol=1e-5, atol=1e-6)
    reduce = tuple(i for i in range(x.ndim) if i != 1)
    n = x.size // x.shape[1]
    biased = np.asarray(x, np.float64).var(reduce)
    old_var = sd["running_var"]
    m = torch_momentum
    np.testing.assert_allclose(stats.var, (1 - m) * old_var + m * biased, rtol=1e-5)
    # PyTorch's own update uses the unbiased variance: the recorded file says so.
    np.testing.assert_allclose(arrays["train_running_var"],
                               (1 - m) * old_var + m * biased * n / (n - 1), rtol=1e-5)


def check_model_dicts(arrays: dict[str, np.ndarray]) -> None:
    """A layer out of a model's state_dict by `prefix`; the refusals name the argument."""
    import eqx_batchnorm as ebn

    model = state_dict(arrays, "sequential")
    bn, _ = ebn.from_torch(model, prefix="1.")
    np.testing.assert_array_equal(bn.scale, model["1.weight"])
    np.testing.assert_array_equal(bn.bias, model["1.bias"])
    layer = {k[2:]: v for k, v in model.items() if k.startswith("1.")}
    refusals = [
        (lambda: ebn.from_torch(model), "prefix"),
        (lambda: ebn.from_torch(layer, torch_momentum=0.1, momentum=0.9), "torch_momentum"),
        (lambda: ebn.from_torch(layer, torch_momentum=1.5), "torch_momentum"),
        (lambda: ebn.from_torch(state_dict(arrays, "untracked")), "track_running_stats"),
    ]
    for call, argument in refusals:
        try:
            call()
        except ebn.BatchNormError as error:
            assert argument in str(error), (argument, str(error))
        else:
            raise AssertionError(f"no BatchNormError naming `{argument}`")


def port_digits_cnn(sd: dict[str, np.ndarray], nchw: np.ndarray) -> np.ndarray:
    """The port of notebooks/porting.ipynb: Equinox layers, `ebn.from_torch` per batch norm
    (per example, under `vmap`), inference on every digit."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_batchnorm as ebn

    def conv(prefix, stride):
        w = sd[prefix + "weight"]
        layer = eqx.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=stride, padding=1,
                              key=jax.random.key(0))
        return eqx.tree_at(lambda c: (c.weight, c.bias), layer,
                           (jnp.asarray(w), jnp.asarray(sd[prefix + "bias"])[:, None, None]))

    def bn(prefix):
        return ebn.from_torch(sd, prefix=prefix, axis=0, axis_name="batch")[0]

    linear = eqx.tree_at(lambda d: (d.weight, d.bias),
                         eqx.nn.Linear(16, 10, key=jax.random.key(0)),
                         (jnp.asarray(sd["8.weight"]), jnp.asarray(sd["8.bias"])))
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        conv("0.", 1), bn("1."), eqx.nn.Lambda(jax.nn.relu),
        conv("3.", 2), bn("4."), eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Lambda(lambda h: h.mean((1, 2))), linear,
    ])
    logits, _ = jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None),
                         out_axes=(0, None))(jnp.asarray(nchw), state)
    return np.asarray(logits)


def check_model(arrays: dict[str, np.ndarray], nchw: np.ndarray) -> None:
    logits = port_digits_cnn(state_dict(arrays, "state_dict"), nchw)
    np.testing.assert_allclose(logits, arrays["logits"], rtol=1e-4, atol=1e-4)


def _torch_doc_examples() -> list[tuple[str, str]]:
    """The ```python blocks that import torch, in the public docstrings and docs/ pages."""
    import eqx_batchnorm as ebn

    fence = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
    sources = [(name, inspect.getdoc(getattr(ebn, name)) or "")
               for name in dir(ebn) if not name.startswith("_")]
    sources += [(str(p.relative_to(ROOT)), p.read_text())
                for p in sorted((ROOT / "docs").rglob("*.md"))]
    return [(where, textwrap.dedent(m.group(2))) for where, text in sources
            for m in fence.finditer(text)
            if re.search(r"^\s*(import torch|from torch)", m.group(2), re.MULTILINE)]


def check_live(torch) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_batchnorm as ebn

    live = record_all(torch)
    for filename, arrays in live.items():
        committed = load(filename)
        assert set(committed) == set(arrays), (filename, sorted(set(committed) ^ set(arrays)))
        for key, value in arrays.items():
            if key == "meta":
                continue
            np.testing.assert_allclose(value, committed[key], **TOLERANCE,
                                       err_msg=f"{filename}: {key}")
        print(f"live PyTorch {torch.__version__} matches {filename} "
              f"(recorded with {json.loads(str(committed['meta']))['torch']})"
              if "meta" in committed else f"live PyTorch matches {filename}")
    for name in CASES:
        check_case(live[f"torch_{name}.npz"])
    check_model_dicts(live["torch_model_dicts.npz"])
    check_model(live["torch_digits_cnn.npz"], digits()[0])
    print("ebn.from_torch matches live PyTorch in every case")
    examples = _torch_doc_examples()
    assert examples, "no documentation example imports torch: update this check"
    for where, code in examples:
        namespace = {"jax": jax, "jnp": jnp, "np": np, "eqx": eqx, "ebn": ebn}
        exec(compile(code, f"<example in {where}>", "exec"), namespace)
        print(f"documentation example in {where} runs with real PyTorch")


def _pin_kernels() -> None:
    """Kernels that compute alike whatever the CPU: ATen's portable (non-AVX) kernels, MKL in
    its conditional-numerical-reproducibility mode, and no oneDNN convolutions. Read when
    PyTorch loads, so set before `import torch`. Checked by emulating smaller instruction
    sets on one machine (ONEDNN_MAX_CPU_ISA=AVX2 or SSE41, MKL_ENABLE_INSTRUCTIONS=AVX2 or
    SSE4_2, ATEN_CPU_CAPABILITY=avx2): each changes the CNN's trained weights by up to 1e-2
    with the default kernels, and none changes a bit with these."""
    os.environ["ATEN_CPU_CAPABILITY"] = "default"
    os.environ["MKL_CBWR"] = "COMPATIBLE"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare live PyTorch with the committed files instead of "
                             "writing them")
    args = parser.parse_args(argv)
    _pin_kernels()
    import torch

    torch.backends.mkldnn.enabled = False

    if args.check:
        check_live(torch)
        print("record_torch_golden --check: passed")
        return 0
    GOLDEN.mkdir(exist_ok=True)
    for filename, arrays in record_all(torch).items():
        np.savez_compressed(GOLDEN / filename, **arrays)
        print(f"wrote {GOLDEN.relative_to(ROOT) / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
