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

# End-to-end and minutes long: CI's extra environments run the other tests (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    with loaded("examples/digits_demo.py", "digits_demo") as module:
        yield module


def test_quick_mode_trains_both_layers_and_writes_the_plot(demo, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

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


def test_full_run_fails_below_the_accuracy_threshold(demo, tmp_path, capsys):
    # Not --quick: the threshold applies. Three steps cannot reach 97%, so it must exit 1.
    code = demo.main(["--steps", "3", "--no-baseline", "--out", str(tmp_path / "c.png")])
    assert code == 1
    assert "FAILED: test accuracy" in capsys.readouterr().err
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
