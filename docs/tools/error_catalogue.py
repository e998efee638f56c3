"""The error catalogue of docs/contract.md: every `BatchNormError` the library raises, each
with an input that triggers it and the message it prints.

    uv run python docs/tools/error_catalogue.py           # print the catalogue
    uv run python docs/tools/error_catalogue.py --write   # rewrite it in docs/contract.md

`tests/test_docs.py` checks that the page holds what this script prints (so a changed
message is a changed page), and that every argument the library's checks can name has an
entry here. To document a new error, add its trigger to `TRIGGERS` and run `--write`.
"""

import argparse
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_batchnorm as ebn

PAGE = Path(__file__).resolve().parent.parent / "contract.md"
START, END = "<!-- error catalogue: start -->", "<!-- error catalogue: end -->"

# Every trigger runs with these names defined (and a fresh copy of them each time).
PREAMBLE = """\
make = eqx.nn.make_with_state(ebn.BatchNorm)
bn, state = make(3)
x = jnp.ones((4, 3))
stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}  # Flax's batch_stats
torch_stats = {"running_mean": jnp.zeros(3), "running_var": jnp.ones(3)}
"""
WIDTH = 78  # what a code block holds at 1280 px

# (section, argument, code): `code` raises a `BatchNormError` naming `argument`.
TRIGGERS: list[tuple[str, str, str]] = [
    # ------------------------------------------------------------------ constructor
    ("Constructor", "num_features", "ebn.BatchNorm(0)"),
    ("Constructor", "num_features", "ebn.BatchNorm(3.0)"),
    ("Constructor", "num_features", "ebn.BatchNorm((3, 4), axis=-1)"),
    ("Constructor", "axis", "ebn.BatchNorm(3, axis=1.0)"),
    ("Constructor", "axis", "ebn.BatchNorm((3, 3), axis=(1, 1))"),
    ("Constructor", "momentum", "ebn.BatchNorm(3, momentum=2.0)"),
    ("Constructor", "momentum", 'ebn.BatchNorm(3, momentum="0.9")'),
    ("Constructor", "momentum", "jax.jit(lambda m: make(3, momentum=m)[1])(0.9)"),
    ("Constructor", "epsilon", "ebn.BatchNorm(3, epsilon=-1e-5)"),
    ("Constructor", "epsilon", 'ebn.BatchNorm(3, epsilon="1e-5")'),
    ("Constructor", "dtype", "ebn.BatchNorm(3, dtype=jnp.int32)"),
    ("Constructor", "param_dtype", "ebn.BatchNorm(3, param_dtype=None)"),
    ("Constructor", "use_bias", 'ebn.BatchNorm(3, use_bias="no")'),
    ("Constructor", "use_scale", "ebn.BatchNorm(3, use_scale=None)"),
    ("Constructor", "bias_init", 'ebn.BatchNorm(3, bias_init="zeros")'),
    ("Constructor", "scale_init", "ebn.BatchNorm(3, scale_init=lambda k, s, d: jnp.ones(2))"),
    ("Constructor", "bias_init", "ebn.BatchNorm(3, bias_init=lambda k, s, d: 1 / 0)"),
    ("Constructor", "key", "ebn.BatchNorm(3, scale_init=jax.nn.initializers.normal())"),
    ("Constructor", "axis_name", 'ebn.BatchNorm(3, axis_name={"b": 1})'),
    ("Constructor", "axis_name", 'ebn.BatchNorm(3, axis_name=("b", None))'),
    ("Constructor", "axis_index_groups", "ebn.BatchNorm(3, axis_index_groups=[[0, 1], [2, 3]])"),
    ("Constructor", "axis_index_groups",
     'ebn.BatchNorm(3, axis_name="b", axis_index_groups=[[0, 1], [1, 2]])'),
    ("Constructor", "axis_index_groups",
     'ebn.BatchNorm(3, axis_name="b", axis_index_groups=[[0], [1, 2]])'),
    ("Constructor", "axis_index_groups", 'ebn.BatchNorm(3, axis_name="b", axis_index_groups=[])'),
    ("Constructor", "axis_index_groups",
     'ebn.BatchNorm(3, axis_name="b", axis_index_groups=[[0.5, 1.5]])'),
    ("Constructor", "use_fast_variance", 'ebn.BatchNorm(3, use_fast_variance="False")'),
    ("Constructor", "force_float32_reductions", "ebn.BatchNorm(3, force_float32_reductions=0)"),
    ("Constructor", "inference", 'ebn.BatchNorm(3, inference="yes")'),
    ("Constructor", "inference", "ebn.BatchNorm(3, inference=True, use_running_average=False)"),
    ("Constructor", "use_running_average", "ebn.BatchNorm(3, use_running_average=1)"),
    ("Constructor", "skip_nonfinite_updates", 'ebn.BatchNorm(3, skip_nonfinite_updates="off")'),
    ("Constructor", "renorm", 'ebn.BatchNorm(3, renorm="yes")'),
    ("Constructor", "renorm_r_max", "ebn.BatchNorm(3, renorm=True, renorm_r_max=0.5)"),
    ("Constructor", "renorm_d_max", "ebn.BatchNorm(3, renorm=True, renorm_d_max=-1.0)"),
    # ------------------------------------------------------------------ call
    ("Call", "x", "bn(jnp.ones((4, 5)), state)"),
    ("Call", "x", "bn(jnp.ones((4, 3), jnp.int32), state)"),
    ("Call", "x", "bn(jnp.ones((4, 3), jnp.complex64), state)"),
    ("Call", "x", "bn([[1.0, 2.0, 3.0]], state)"),
    ("Call", "x", "bn(jnp.ones(3), state)"),
    ("Call", "x", "make(1)[0](jnp.asarray(1.0), make(1)[1])"),
    ("Call", "x", "bn(jnp.ones((0, 3)), state)"),
    ("Call", "x", "bn, state = make(3, axis=0)\n"
                  "jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x, state)"),
    ("Call", "axis", "bn, state = make(3, axis=2)\nbn(x, state)"),
    ("Call", "axis", "bn, state = make((3, 3), axis=(1, -1))\nbn(jnp.ones((4, 3)), state)"),
    ("Call", "axis", "bn, state = make((3, 5), axis=(2, -3))\nbn(jnp.ones((4, 5, 3)), state)"),
    ("Call", "state", 'bn(x, {"mean": 0})'),
    ("Call", "state", 'bn(x, eqx.nn.make_with_state(eqx.nn.BatchNorm)(\n'
                     '    3, "batch", mode="batch")[1])'),
    ("Call", "state", "bn(x, make(4)[1])"),
    ("Call", "state", "bn(x, state)\nbn(x, state)"),
    ("Call", "mask", "bn(x, state, mask=jnp.ones((4, 2), bool))"),
    ("Call", "mask", "bn(x, state, mask=jnp.ones((4, 3)))"),
    ("Call", "mask", "bn(x, state, mask=[[True] * 3] * 4)"),
    ("Call", "inference", "bn(x, state, inference=True, use_running_average=False)"),
    ("Call", "inference", 'bn(x, state, inference="yes")'),
    ("Call", "inference", "traced = jax.jit(lambda x, s, flag: bn(x, s, inference=flag))\n"
                          "traced(x, state, True)"),
    ("Call", "inference", "jax.jit(lambda b, x, s: b(x, s))(bn, x, state)"),
    ("Call", "use_running_average", "bn(x, state, use_running_average=0)"),
    ("Call", "update_stats", 'bn(x, state, update_stats="no")'),
    ("Call", "renorm_r_max", "bn(x, state, renorm_r_max=2.0)"),
    ("Call", "renorm_r_max", "bn, state = make(3, renorm=True)\nbn(x, state, renorm_r_max=0.5)"),
    ("Call", "renorm_d_max", "bn, state = make(3, renorm=True)\nbn(x, state, renorm_d_max=-1.0)"),
    ("Call", "key", "bn(x, state, key=5)"),
    ("Call", "state", "with jax.enable_x64(True):  # a float32 state for a float64 layer\n"
                      "    bn64, _ = make(3, param_dtype=jnp.float64)\n"
                      "    bn64(x, state)"),
    ("Call", "state", "blocks, states = ebn.stack_blocks(lambda k: ebn.BatchNorm(3), 2,\n"
                      "                                  jax.random.key(0))\n"
                      "blocks(x, states)  # stacked blocks called as one layer"),
    ("Call", "axis_name", 'bn, state = make(3, axis_name="batch")\nbn(x, state)'),
    ("Call", "axis_name", 'bn, state = make(3, axis=0, axis_name="batch")\n'
                          'jax.vmap(bn, axis_name="examples", in_axes=(0, None),\n'
                          '         out_axes=(0, None))(x, state)'),
    ("Call", "axis_name", 'bn, state = make(3, axis=0, axis_name=("b", "d"))\n'
                          'jax.vmap(bn, axis_name="b", in_axes=(0, None),\n'
                          '         out_axes=(0, None))(x, state)'),
    ("Call", "axis_name", 'from jax.sharding import PartitionSpec as P\n'
                          'mesh = jax.make_mesh((1,), ("d",))\n'
                          'bn, state = make(3, axis=0, axis_name="b")\n'
                          'x = jax.device_put(x, jax.NamedSharding(mesh, P("d")))\n'
                          'per_device = lambda x, s: jax.vmap(\n'
                          '    bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))(x, s)\n'
                          'jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P()),\n'
                          '              out_specs=(P("d"), P()))(x, state)'),
    ("Call", "axis_index_groups",
     'bn, state = make(3, axis=0, axis_name="b", axis_index_groups=[[0], [1]])\n'
     'jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))(x, state)'),
    ("Call", "axis_name", 'bn, state = make(3, axis=0, axis_name="batch")\n'
                          'per_example = jax.vmap(bn, axis_name="batch", in_axes=(0, None),\n'
                          '                       out_axes=(0, None))\n'
                          'batch = jax.export.symbolic_shape("b, 3")\n'
                          'jax.export.export(jax.jit(per_example))(\n'
                          '    jax.ShapeDtypeStruct(batch, jnp.float32), state)'),
    # ------------------------------------------------------------------ functional core
    ("Functional core", "x", "ebn.batch_statistics(jnp.ones((4, 3), jnp.int32))"),
    ("Functional core", "x", "ebn.batch_statistics(jnp.ones(3))"),
    ("Functional core", "var", "ebn.normalize(x, jnp.zeros(3), jnp.ones(2))"),
    ("Functional core", "batch", "ebn.update_running_average(jnp.zeros(3), jnp.ones(2), 0.9)"),
    # ------------------------------------------------------------------ converters
    ("Converters", "nnx_batch_norm", "ebn.from_nnx(bn)"),
    ("Converters", "variables", "ebn.from_flax([])"),
    ("Converters", "variables", "ebn.from_flax({})"),
    ("Converters", "variables", 'ebn.from_flax({"params": {}, "batch_stats": {}})'),
    ("Converters", "variables",
     'ebn.from_flax({"params": {}, "batch_stats": stats, "cache": {}})'),
    ("Converters", "mean",
     'ebn.from_flax({"batch_stats": {"mean": jnp.zeros(()), "var": jnp.ones(())}})'),
    ("Converters", "mean", 'ebn.from_flax({"batch_stats": {**stats, "mean": "zeros"}})'),
    ("Converters", "var", 'ebn.from_flax({"batch_stats": {**stats, "var": jnp.ones(2)}})'),
    ("Converters", "axis", 'two_axes = {"mean": jnp.zeros((2, 3)), "var": jnp.ones((2, 3))}\n'
                           'ebn.from_flax({"batch_stats": two_axes})'),
    ("Converters", "axis", 'two_axes = {"mean": jnp.zeros((2, 3)), "var": jnp.ones((2, 3))}\n'
                           'ebn.from_flax({"batch_stats": two_axes}, axis=(-1, 0))'),
    ("Converters", "use_scale", 'variables = {"params": {"scale": jnp.ones(3)},\n'
                                '             "batch_stats": stats}\n'
                                'ebn.from_flax(variables, use_scale=False)'),
    ("Converters", "num_features", 'ebn.from_flax({"batch_stats": stats}, num_features=3)'),
    ("Converters", "bn", "ebn.to_flax(eqx.nn.Linear(3, 3, key=jax.random.key(0)), state)"),
    ("Converters", "state_dict", "ebn.from_torch([1, 2])"),
    ("Converters", "state_dict",
     'ebn.from_torch({**torch_stats, "weight": jnp.ones(3), "extra": 0})'),
    ("Converters", "state_dict", 'ebn.from_torch({"weight": jnp.ones(3)})'),
    ("Converters", "state_dict", 'ebn.from_torch({**torch_stats, "weight": jnp.ones(3)})'),
    ("Converters", "state_dict", 'ebn.from_torch({"running_mean": jnp.zeros((2, 3)),\n'
                                 '                "running_var": jnp.ones((2, 3))})'),
    ("Converters", "torch_momentum",
     "ebn.from_torch(torch_stats, torch_momentum=0.1, momentum=0.9)"),
    ("Converters", "torch_momentum", "ebn.from_torch(torch_stats, torch_momentum=2.0)"),
    ("Converters", "eqx_bn", "ebn.from_equinox(bn, state)"),
    ("Converters", "state",
     'ebn.from_equinox(eqx.nn.BatchNorm(3, "batch", mode="batch"), state)'),
    # ------------------------------------------------------------------ folding
    ("Folding", "layer", "ebn.fold_into(eqx.nn.Lambda(jnp.sin), bn, state)"),
    ("Folding", "layer", 'ebn.fold_into(eqx.nn.Linear(3, "scalar", key=jax.random.key(0)),\n'
                         '             bn, state)'),
    ("Folding", "bn", "ebn.fold_into(eqx.nn.Linear(3, 3, key=jax.random.key(0)),\n"
                      "             eqx.nn.Lambda(jnp.sin), state)"),
    ("Folding", "bn", "ebn.fold_into(eqx.nn.Linear(3, 4, key=jax.random.key(0)), bn, state)"),
    ("Folding", "bn", "bn, state = make(3, axis=-1)\n"
                      "ebn.fold_into(eqx.nn.Conv1d(2, 3, 1, key=jax.random.key(0)), bn, state)"),
    ("Folding", "seq", "ebn.fold_sequential(bn, state)"),
    # ------------------------------------------------------------------ precise BN
    ("Precise BN", "estimator", 'ebn.recompute_statistics(bn, state, [x], estimator="mean")'),
    ("Precise BN", "axis_name", 'ebn.recompute_statistics(bn, state, [x], axis_name="b",\n'
                                '                         call=lambda m, b, s: m(b, s))'),
    ("Precise BN", "max_batches", "ebn.recompute_statistics(bn, state, [x], max_batches=0)"),
    ("Precise BN", "model", "ebn.recompute_statistics(eqx.nn.Lambda(jnp.sin), state, [x])"),
    ("Precise BN", "batches", "ebn.recompute_statistics(bn, state, [])"),
    ("Precise BN", "call", "ebn.recompute_statistics(bn, state, [x], call=lambda m, b, s: 0)"),
    ("Precise BN", "model", "ebn.recompute_statistics(\n"
                            "    bn, state, [x], call=lambda m, b, s: (b, s))"),
    # ------------------------------------------------------------------ scan over layers
    ("Scan over layers", "n",
     "ebn.stack_blocks(lambda k: ebn.BatchNorm(3), 0, jax.random.key(0))"),
    ("Scan over layers", "make_block", 'ebn.stack_blocks("BatchNorm", 2, jax.random.key(0))'),
    ("Scan over layers", "key", "ebn.stack_blocks(lambda k: ebn.BatchNorm(3), 2, key=0)"),
    ("Scan over layers", "state", "ebn.scan_blocks(bn, None, x)"),
    ("Scan over layers", "axis_name", 'ebn.scan_blocks(bn, state, x, axis_name="b",\n'
                                      '                call=lambda b, x, s: b(x, s))'),
    ("Scan over layers", "blocks", "ebn.scan_blocks(bn, make(4)[1], x)  # sizes 3 and 4"),
    ("Scan over layers", "call",
     "blocks, states = ebn.stack_blocks(lambda k: ebn.BatchNorm(3), 2,\n"
     "                                  jax.random.key(0))\n"
     "ebn.scan_blocks(blocks, states, x, call=lambda b, x, s: b(x, s)[0])"),
    ("Scan over layers", "blocks",
     "def widen(key):  # a block whose output is wider than its input\n"
     "    return eqx.nn.Sequential([ebn.BatchNorm(3),\n"
     "                              eqx.nn.Lambda(lambda x: jnp.tile(x, 2))])\n"
     "blocks, states = ebn.stack_blocks(widen, 2, jax.random.key(0))\n"
     "ebn.scan_blocks(blocks, states, x)"),
    # ------------------------------------------------------------------ vmap mistakes
    ("Mistakes under vmap", "axis_name",
     "xs = jnp.ones((4, 3, 2))\n"
     'bn, state = make(3, axis=0, axis_name="btach")  # a typo\n'
     'jax.vmap(bn, axis_name="batch", in_axes=(0, None),\n'
     "         out_axes=(0, None))(xs, state)"),
    ("Mistakes under vmap", "axis_name",
     "from jax.sharding import PartitionSpec as P\n"
     'mesh = jax.make_mesh((1,), ("data",))  # explicit axes: the default\n'
     'bn, state = make(3, axis=0, axis_name="batch")\n'
     'xs = jax.device_put(jnp.ones((4, 3, 2)), jax.NamedSharding(mesh, P("data")))\n'
     'step = eqx.filter_jit(lambda bn, s, x: jax.vmap(\n'
     '    bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s))\n'
     "step(bn, state, xs)"),
]


def run(code: str) -> ebn.BatchNormError:
    """The error `code` raises (an AssertionError if it raises none)."""
    namespace = {"jax": jax, "jnp": jnp, "np": np, "eqx": eqx, "ebn": ebn}
    exec(PREAMBLE, namespace)
    try:
        exec(compile(code, "<trigger>", "exec"), namespace)
    except ebn.BatchNormError as e:
        return e
    raise AssertionError(f"no BatchNormError from:\n{code}")


def argument_of(error: ebn.BatchNormError) -> str:
    """The argument a message names: "`momentum`: expected ..." -> "momentum"."""
    return str(error).split("`")[1]


def _message_block(message: str) -> str:
    # One line in the library; wrapped here so that it fits the page.
    lines = []
    for part in message.split("\n"):
        lines += textwrap.wrap(part, 76, break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def catalogue() -> str:
    """The catalogue, as markdown: by section, then argument, each trigger and message."""
    out = ["Each input below runs after", "", "```py", PREAMBLE.rstrip(), "```", ""]
    section = argument = None
    for where, expected, code in TRIGGERS:
        if max(len(line) for line in code.split("\n")) > WIDTH:
            raise AssertionError(f"a line longer than {WIDTH} characters:\n{code}")
        error = run(code)
        if argument_of(error) != expected:
            raise AssertionError(f"expected an error naming `{expected}`, got: {error}")
        if where != section:
            section, argument = where, None
            out += [f"### {where}", ""]
        if expected != argument:
            argument = expected
            out += [f"#### `{expected}`", ""]
        out += ["```py", code, "```", "", "```text", _message_block(str(error)), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def page_with(text: str, catalogue_text: str) -> str:
    """`text` (the page) with the catalogue between its markers replaced."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{catalogue_text}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite it in {PAGE.name}")
    args = parser.parse_args(argv)
    text = catalogue()
    if args.write:
        PAGE.write_text(page_with(PAGE.read_text(), text))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
