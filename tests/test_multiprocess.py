"""Synchronised BatchNorm across two processes equals one process on the whole batch.

Starts two `jax.distributed` processes on this machine (coordinator on 127.0.0.1, CPU
collectives over Gloo, 2 virtual devices each: a mesh of 4 devices over 2 processes),
runs `STEPS` training steps of `_multiprocess_worker.Net` with data-parallel `shard_map`
(`axis_name="data"`) and with SPMD `jit` (`axis_name=None`), and compares the outputs of
every step, the running statistics and the trained weights with the same training run
here on one device. Every wait is bounded; on any failure both children are killed and
their logs are shown.
"""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import _multiprocess_worker as worker
import numpy as np
import pytest

HERE = Path(__file__).parent
PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 240  # both children together; a healthy run takes ~20 s on 2 busy cores

# End-to-end: `pytest -m "not slow"` leaves these out for a quick loop.
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _launch(out: Path, logs: Path) -> tuple[list[int], str]:
    """Runs both processes to completion or to the deadline; their return codes and logs."""
    port = _free_port()
    procs, files = [], []
    try:
        for rank in range(PROCESSES):
            log = open(logs / f"process{rank}.log", "w")  # noqa: SIM115 (closed below)
            files.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "_multiprocess_worker.py"), str(rank),
                 str(PROCESSES), str(port), str(out)],
                cwd=HERE, env=_child_env(), stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                codes.append(-1)
                break
    finally:
        for p in procs:  # a child stuck in a collective waits for its dead peer forever
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for f in files:
            f.close()
    text = "\n".join(f"--- process {r} ---\n" + (logs / f"process{r}.log").read_text()[-3000:]
                     for r in range(PROCESSES))
    return codes, text


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    out = tmp / "results.npz"
    codes, logs = _launch(out, tmp)
    if codes != [0] * PROCESSES and "address already in use" in logs.lower():
        codes, logs = _launch(out, tmp)  # the free port was taken meanwhile: once more
    assert codes == [0] * PROCESSES, f"return codes {codes}\n{logs}"
    return dict(np.load(out))


@pytest.fixture(scope="module")
def single():
    return worker.reference_run()


def test_two_processes_span_one_mesh(distributed):
    assert int(distributed["device_count"]) == PROCESSES * DEVICES_PER_PROCESS


@pytest.mark.parametrize("mode", ["shard_map", "spmd"])
def test_training_equals_one_process_on_the_whole_batch(distributed, single, mode):
    for key in ("y", "mean", "var", "w1", "w2"):
        got, want = distributed[f"{mode}_{key}"], single[key]
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    # The steps moved the statistics and the weights: the comparison above has teeth.
    assert np.abs(single["mean"]).min() > 1e-3
    assert not np.allclose(single["y"][0], single["y"][-1])
