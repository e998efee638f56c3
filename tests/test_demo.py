"""The main job, `examples/digits_demo.py`, run in-process: its quick mode (what CI runs) and
the exit code that guards the full run's accuracy threshold."""

import re

# The demo's packages are test dependencies: a missing one fails here, loudly.
import matplotlib  # noqa: F401
import optax  # noqa: F401
import pytest
import sklearn  # noqa: F401
import tqdm  # noqa: F401
from _scripts import loaded

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# End-to-end: `pytest -m "not slow"` leaves these out for a quick loop.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    with loaded("examples/digits_demo.py", "digits_demo") as module:
        yield module


def test_quick_mode_trains_both_layers_and_writes_the_plot(demo, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out

    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"training curves: {out}" in printed
    rows = {name: (float(acc), float(ms)) for name, acc, ms in re.findall(
        r"^(eqx_batchnorm\.BatchNorm|eqx\.nn\.BatchNorm\(\"batch\"\))\s+([\d.]+)%\s+([\d.]+)$",
        printed, flags=re.MULTILINE)}
    assert set(rows) == {"eqx_batchnorm.BatchNorm", 'eqx.nn.BatchNorm("batch")'}
    for accuracy, step_ms in rows.values():
        # 30 steps are far from converged, but well above chance (10%): training works,
        # and inference mode uses running statistics that are already meaningful.
        assert 25.0 < accuracy <= 100.0
        assert step_ms > 0
    final = re.search(r"test accuracy \(eqx_batchnorm\): ([\d.]+)%", printed)
    assert final is not None and float(final.group(1)) == rows["eqx_batchnorm.BatchNorm"][0]
    # 30 steps at the demo's momentum 0.9 leave 4.2% of the initialisation: no warning.
    assert "WARNING" not in printed + captured.err


def test_full_run_fails_below_the_accuracy_threshold(demo, tmp_path, capsys):
    # Not --quick: the threshold applies. Three steps cannot reach 97%, so it must exit 1.
    code = demo.main(["--steps", "3", "--no-baseline", "--out", str(tmp_path / "c.png")])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED: test accuracy" in err
    # 0.9**3 of the initial running statistics is left: the run says so, and what to do.
    assert "WARNING: after 3 training steps at momentum 0.9" in err
    assert "72.9% of their initial value" in err
    assert "ebn.recompute_statistics(model, state, batches)" in err
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(("momentum", "steps", "left", "enough"), [
    (0.99, 150, "22.1%", 299), (0.99, 298, "5.0%", 299), (0.9, 28, "5.2%", 29),
    (0.999, 1000, "36.8%", 2995)])
def test_stale_statistics_warning_says_how_much_is_left_and_what_to_do(demo, momentum, steps,
                                                                        left, enough):
    warning = demo.stale_statistics_warning(momentum, steps)
    assert warning is not None
    assert f"after {steps} training steps at momentum {momentum}" in warning
    assert f"still carry {left} of their initial value" in warning
    assert f"train at least {enough} steps" in warning
    # Lowering the momentum is offered only to those above 0.9.
    assert ("lower the momentum (0.9 needs 29 steps)" in warning) == (momentum > 0.9)
    assert warning.endswith("or recompute them after training with "
                            "`ebn.recompute_statistics(model, state, batches)`")
    # After `enough` steps at most 5% is left: no warning.
    assert demo.stale_statistics_warning(momentum, enough) is None


@pytest.mark.parametrize(("momentum", "steps"), [(0.9, 29), (0.9, 600), (0.99, 600), (0.0, 1)])
def test_no_warning_once_the_initialisation_is_forgotten(demo, momentum, steps):
    assert demo.stale_statistics_warning(momentum, steps) is None


def test_warning_at_momentum_one_offers_only_what_can_help(demo):
    # The statistics never move: training longer cannot help.
    warning = demo.stale_statistics_warning(1.0, 100)
    assert warning is not None and "100.0%" in warning and "train at least" not in warning
