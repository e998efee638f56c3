"""The benchmark scripts: `benchmarks/bench.py`'s target checks on made-up results (no
timing), and smoke runs of the quick modes of `bench.py` and `benchmarks/deep.py`, so the
documented commands keep working."""

import json

import jax
import pytest
from _scripts import loaded


@pytest.fixture(scope="module")
def bench():
    with loaded("benchmarks/bench.py", "bench") as module:
        yield module


def result(bench, shape, dtype, mode, **ratios):
    r = bench.Result(bench.Case(shape, "NHWC", dtype), mode)
    r.ratios = {k.replace("_over_", "/").replace("_", " "): v for k, v in ratios.items()}
    return r


def lines_about(report, text):
    return [line for line in report if text in line]


def test_gpu_forward_is_measured_against_its_floor_per_dtype(bench):
    # float32: the floor is 1.5x the copy; bfloat16 x with a float32 y: 4/3. Tensors under
    # 100 MB do not count (the (128, 28, 28, 256) bfloat16 one is 51 MB).
    results = [
        result(bench, (256, 56, 56, 64), "f32", "fwd", ours_over_copy=1.5),
        result(bench, (256, 56, 56, 64), "bf16", "fwd", ours_over_copy=1.48),
        result(bench, (128, 28, 28, 256), "bf16", "fwd", ours_over_copy=3.0),
        result(bench, (256, 56, 56, 64), "f32", "fwd+bwd", ours_over_Flax=0.9),
    ]
    report = bench.targets(results, [], {"ratio": {}}, gpu=True)
    (floor,) = lines_about(report, "memory floor")
    assert floor.startswith("- [x]") and ": 90% (worst: (256, 56, 56, 64) NHWC bf16)" in floor
    (fwd_bwd,) = lines_about(report, "fwd+bwd ours/Flax <= 0.85")
    assert fwd_bwd.startswith("- [ ]") and "0.90x" in fwd_bwd
    assert not lines_about(report, "eqx.nn.BatchNorm")  # a CPU target only

    results[0].ratios["ours/copy"] = 1.8  # 83% of the floor
    (floor,) = lines_about(bench.targets(results, [], {"ratio": {}}, gpu=True), "floor")
    assert floor.startswith("- [ ]") and ": 83% (worst: (256, 56, 56, 64) NHWC f32)" in floor


def test_cpu_targets_report_the_worst_case(bench):
    results = [
        result(bench, (64, 32, 32, 64), "f32", "fwd", ours_over_Flax=0.98),
        result(bench, (256, 8, 8, 256), "f32", "fwd", ours_over_Flax=1.02),
        result(bench, (64, 32, 32, 64), "f32", "fwd+bwd", ours_over_Flax=0.6),
    ]
    speed = {"shape": (8, 8), "ratio": {"|mean|/std=0": {"ours": 1.01},
                                        "|mean|/std=10000": {"ours": 3.0}}}
    report = bench.targets(results, [], speed)
    (fwd,) = lines_about(report, "fwd ours/Flax <= 1.0")
    assert fwd == "- [ ] fwd ours/Flax <= 1.0: 1.02x (worst: (256, 8, 8, 256) NHWC f32)"
    (fwd_bwd,) = lines_about(report, "fwd+bwd ours/Flax <= 0.75")
    assert fwd_bwd.startswith("- [x]")
    centred, offset = lines_about(report, "accurate one-pass variance")
    assert centred.startswith("- [x]") and offset.startswith("- [ ]")
    assert not lines_about(report, "memory floor")  # a GPU target only


@pytest.mark.slow
def test_quick_mode_writes_the_report_and_the_raw_numbers(bench, tmp_path, capsys):
    raw = tmp_path / "run.json"
    bench.main(["--quick", "--rounds", "1", "--modes", "fwd", "--markdown", "--json",
                str(raw)])
    printed = capsys.readouterr().out
    for heading in ("### Time", "### XLA temporary memory", "### Variance", "### Targets"):
        assert heading in printed
    # Every table fits the docs page, as it is pasted there.
    rows = [line for line in printed.splitlines() if line.startswith("|")]
    assert rows and max(line.count(" | ") + 1 for line in rows) <= bench.TABLE_COLUMNS
    assert "Command: `python benchmarks/bench.py --quick --rounds 1" in printed
    data = json.loads(raw.read_text())
    assert {t["case"] for t in data["timing"]} == {"(64, 32, 32, 64) NHWC f32",
                                                  "(64, 64, 32, 32) NCHW f32"}
    assert all(t["mode"] == "fwd" and t["times"]["ours"] > 0 for t in data["timing"])
    assert set(data["variance_accuracy"]) == {"0", "100", "1000", "10000"}


@pytest.fixture(scope="module")
def deep():
    with loaded("benchmarks/deep.py", "deep") as module:
        yield module


def test_equation_count_includes_sub_jaxprs(deep):
    def f(x):
        return jax.lax.cond(x > 0, lambda x: x + 1.0, lambda x: 2.0 * x - 1.0, x)

    jaxpr = jax.make_jaxpr(f)(1.0).jaxpr
    assert len(jaxpr.eqns) == 3  # gt, convert_element_type, cond
    assert deep.count_equations(jaxpr) == 3 + 1 + 2


def test_deep_quick_mode_measures_every_section(deep, tmp_path, capsys):
    raw = tmp_path / "deep.json"
    deep.main(["--quick", "--rounds", "1", "--layers", "2", "--depths", "2",
               "--eager-calls", "2", "--json", str(raw)])
    printed = capsys.readouterr().out
    for heading in ("### A stack of 2 BatchNorms", "`Flax NCHW` is",
                    "### One layer's eager training call",
                    "### The demo's ResNet (examples/digits_demo.py)",
                    "### Scan over layers", "| 2 | Flax | ", "- [", "temp memory"):
        assert heading in printed
    data = json.loads(raw.read_text())
    assert data["layers"] == 2 and data["machine"]["backend"].startswith("cpu")
    assert data["depths"] == [2]

    def positive(table, variants):
        assert set(table) == set(variants)
        assert all(v > 0 for v in table.values()), table

    (stack,) = data["stack"]
    assert stack["case"] == "2 layers, x (32, 8, 8, 16) f32"
    for quantity in ("trace", "lower", "compile", "step"):
        positive(stack["median_s"][quantity], deep.STACK_VARIANTS)
        positive(stack["ratio_to_Flax"][quantity], deep.STACK_VARIANTS)
        assert stack["ratio_to_Flax"][quantity]["Flax"] == 1.0
        assert set(stack["bn_cost_s"][quantity]) == {"Flax", "Flax NCHW", "ours",
                                                     "ours vmap", "eqx"}
        positive(stack["ratio_to_Flax_NCHW"][quantity], deep.STACK_VARIANTS)
        assert stack["ratio_to_Flax_NCHW"][quantity]["Flax NCHW"] == 1.0
    for counts in stack["equations"].values():
        assert 0 < counts["top level"] <= counts["total"]
    assert stack["equations"]["no BN"]["total"] < stack["equations"]["ours"]["total"]

    (eager,) = data["eager"]
    positive(eager["median_s"]["call"], deep.EAGER_VARIANTS)
    for counts in eager["compile_counts"].values():
        assert counts["compiles call 1"] > 0  # a fresh cache: each primitive compiles
        assert counts["compiles calls 2..2"] >= 0

    resnet = data["resnet"]
    for quantity in ("trace", "lower", "compile", "step"):
        positive(resnet["median_s"][quantity], deep.RESNET_VARIANTS)
    # The BatchNorms' cost per step: a model less the same model without BatchNorm.
    assert set(resnet["bn_cost_s"]["step"]) == {"Flax", "ours", "eqx"}
    assert resnet["equations"]["no BN"]["total"] < resnet["equations"]["Flax"]["total"]

    # Scanned and unrolled, with the same initial values: the run checked that they agree.
    (scan,) = data["scan"]["depths"]
    assert scan["case"] == "2 blocks, x (32, 8, 8, 16) f32" and scan["depth"] == 2
    for quantity in ("trace", "lower", "compile", "step"):
        positive(scan["median_s"][quantity], deep.SCAN_VARIANTS)
        assert scan["ratio_to_Flax"][quantity]["Flax"] == 1.0
        assert scan["ratio_to_Flax_scan"][quantity]["Flax scan"] == 1.0
        positive(scan["ratio_to_unrolled"][quantity], deep.UNROLLED)
    positive(scan["temp_bytes"], deep.SCAN_VARIANTS)
    loss = {name: values[0] for name, values in scan["check"].items()}
    assert loss["ours scan"] == pytest.approx(loss["ours"], rel=1e-5)
    assert scan["equations"]["ours scan"]["total"] < scan["equations"]["ours"]["total"] * 2
    targets = {t["target"].split(",")[0] for t in data["scan"]["targets"]}
    assert {"compile / Flax unrolled", "compile / Flax scan", "trace / Flax scan",
            "temp memory ours scan / Flax scan"} <= targets
    assert not any(t.startswith("compile growth") for t in targets)  # one depth only


def made_up_scan(deep, depth, growth, temp):
    s = deep.Section(f"{depth} blocks, x (32, 8, 8, 16) f32")
    ones = {q: dict.fromkeys(deep.SCAN_VARIANTS, 1.0) for q in ("trace", "compile", "step")}
    s.ratios = ones
    s.extra.update(x="(32, 8, 8, 16) f32", depth=depth, ratio_to_Flax_scan=ones,
                   ratio_to_unrolled=ones, temp_bytes=dict.fromkeys(deep.SCAN_VARIANTS, temp),
                   shallowest=8, ratio_to_shallowest={
                       **ones, "compile": dict.fromkeys(deep.SCAN_VARIANTS, 6.0) | growth})
    return s


def test_scan_targets_take_the_deepest_stack_and_the_growth_from_the_shallowest(deep):
    shallow = made_up_scan(deep, 8, {}, 100)
    deep_one = made_up_scan(deep, 53, {"ours scan": 1.2, "ours vmap scan": 1.4}, 100)
    deep_one.ratios = {**deep_one.ratios, "compile": {**deep_one.ratios["compile"],
                                                      "ours scan": 0.45, "ours vmap scan": 0.6}}
    deep_one.extra["temp_bytes"] = {**deep_one.extra["temp_bytes"], "ours vmap": 101}
    targets = {t["target"]: t for t in deep.scan_targets([deep_one, shallow])}
    compile_ = targets["compile / Flax unrolled, 53 blocks, x (32, 8, 8, 16) f32"]
    assert compile_["values"] == {"ours scan": 0.45, "ours vmap scan": 0.6}
    assert not compile_["met"]
    growth = targets["compile growth, 8 to 53 blocks, x (32, 8, 8, 16) f32"]
    assert growth["values"] == {"ours scan": 1.2, "ours vmap scan": 1.4}
    assert not growth["met"] and "Flax 6.00x" in growth["note"]
    memory = targets["temp memory ours vmap / Flax, x (32, 8, 8, 16) f32"]
    assert not memory["met"] and "worst at 53 blocks" in memory["note"]
    assert targets["temp memory ours scan / Flax scan, x (32, 8, 8, 16) f32"]["met"]
    lines = deep.target_lines(list(targets.values()))
    assert any(line.startswith("- [ ] compile growth, 8 to 53") for line in lines)


def test_a_scanned_variant_that_disagrees_with_its_unrolled_model_stops_the_run(deep):
    import jax.numpy as jnp

    params = [jnp.ones(3)]
    steps = {name: deep.Step(lambda: None, (params, [])) for name in deep.SCAN_VARIANTS}
    calls = {name: (lambda: ([params[0] - 0.1], [jnp.ones(3)], jnp.float32(1.0)))
             for name in deep.SCAN_VARIANTS}
    assert deep.check_scanned(steps, calls)["ours scan"] == pytest.approx([1.0, 0.03, 3.0])
    calls["ours vmap scan"] = lambda: ([params[0] - 0.1], [jnp.ones(3)], jnp.float32(1.001))
    with pytest.raises(AssertionError, match="ours vmap scan and ours vmap disagree"):
        deep.check_scanned(steps, calls)
