"""The public docstrings and the docs pages: every name is documented, and every code
example runs.

Examples are the ```` ```python ```` blocks of a docstring (Equinox puts them under
`!!! Example`), in the docstrings of every public name of `eqx_batchnorm` and of the
`__init__` / `__call__` its classes define, and in the pages under `docs/`. Each block runs
on its own, as a reader would paste it, with only `jax`, `jnp`, `np`, `eqx` and `ebn`
imported: anything else it uses (Flax, PyTorch, data) it must import or build itself. PyTorch
is no dependency: where it is absent, an example that imports it runs against a NumPy
stand-in for the calls it makes (`tests/_torch_standin.py`); `tests/record_torch_golden.py
--check` runs those examples against real PyTorch.

What an example's comments claim is checked too, so that an example cannot run and still
say something false:

- `value = ...  # == expression`: `value` equals `expression` (to float32 rounding);
- `expression  # (16,)`: a bare expression equals the literal in the comment;
- `value = ...  # (batch, C, H, W)`: `value` has one axis per name, and the size given
  wherever the comment gives a number or a name the example defines as an int;
- `value = ...  # axis=1, momentum=0.9`: `value` has these attribute values;
- `value = ...  # [Conv2d, Lambda, Linear]`: the layers of `value` have these types.

Any other comment is prose.
"""

import ast
import importlib.util
import inspect
import io
import re
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scripts import loaded

import eqx_batchnorm as ebn

DOCS = Path(__file__).resolve().parent.parent / "docs"
_FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def public_names() -> list[str]:
    return sorted(n for n, v in vars(ebn).items()
                  if not n.startswith("_") and not inspect.ismodule(v))


def docstrings(name: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of `name` and of the methods its class defines."""
    obj = getattr(ebn, name)
    yield name, inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        for method in ("__init__", "__call__"):
            if method in vars(obj) and vars(obj)[method].__doc__:
                yield f"{name}.{method}", inspect.cleandoc(vars(obj)[method].__doc__)


def examples(doc: str) -> list[str]:
    return [textwrap.dedent(m.group(2)) for m in _FENCE.finditer(doc)]


def _cases() -> list:
    cases = []
    for name in public_names():
        for where, doc in docstrings(name):
            for i, code in enumerate(examples(doc)):
                cases.append(pytest.param(code, id=f"{where}[{i}]"))
    for page in sorted(DOCS.rglob("*.md")):
        for i, code in enumerate(examples(page.read_text())):
            cases.append(pytest.param(code, id=f"docs/{page.relative_to(DOCS)}[{i}]"))
    return cases


def test_examples_are_collected():
    # A silently empty collection would make every example test vanish.
    assert len(_cases()) >= 3
    assert examples("Text.\n\n!!! Example\n\n    ```python\n    a = 1\n    ```\n") == ["a = 1\n"]


def _comments(code: str) -> dict[int, str]:
    """Line number -> text of the comment that ends that line (tokenize: no `#` in strings)."""
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return {t.start[0]: t.string[1:].strip() for t in tokens if t.type == tokenize.COMMENT}


def _attribute_values(comment: str) -> dict | None:
    """`{"axis": 1, "momentum": 0.9}` for "axis=1, momentum=0.9"; None unless every
    item is `name=<Python literal>`."""
    values = {}
    for item in comment.split(","):
        name, _, literal = item.partition("=")
        if not name.strip().isidentifier():
            return None
        try:
            values[name.strip()] = ast.literal_eval(literal.strip())
        except (ValueError, SyntaxError):
            return None
    return values


def _claim(statement: ast.stmt, comment: str) -> str | None:
    """The check a comment on `statement` claims, as a call of the helpers below, or None
    for a comment that is prose."""
    if isinstance(statement, ast.Assign):
        target = statement.targets[0]
        value = ast.unparse(target.elts[0] if isinstance(target, ast.Tuple) else target)
    elif isinstance(statement, ast.Expr):
        value = ast.unparse(statement.value)
    else:
        return None
    if comment.startswith("=="):
        return f"_claim_equal({value}, {comment[2:].strip()}, {comment!r})"
    attributes = _attribute_values(comment)
    if attributes is not None:
        return f"_claim_attributes({value}, {attributes!r}, {comment!r})"
    if re.fullmatch(r"\[\w+(, \w+)*\]", comment):
        names = [n.strip() for n in comment[1:-1].split(",")]
        return f"_claim_layer_types({value}, {names!r}, {comment!r})"
    if not re.fullmatch(r"\(([^()]*)\)", comment):
        return None
    if isinstance(statement, ast.Expr):
        return f"_claim_value({value}, {comment}, {comment!r})"
    dims = [d.strip() for d in comment[1:-1].split(",") if d.strip()]
    return f"_claim_shape({value}, {dims!r}, globals(), {comment!r})"


def with_claims_checked(code: str) -> tuple[str, int]:
    """`code` with a check after each statement whose comment makes a claim, and the
    number of checks."""
    comments = _comments(code)
    checks = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Assign | ast.Expr) and node.end_lineno in comments:
            check = _claim(node, comments[node.end_lineno])
            if check is not None:
                checks.append((node.end_lineno, " " * node.col_offset + check))
    lines = code.splitlines()
    for line, check in sorted(checks, reverse=True):
        lines.insert(line, check)
    return "\n".join(lines) + "\n", len(checks)


def _as_numpy(value):
    value = value.detach() if hasattr(value, "detach") else value  # a PyTorch tensor
    return np.asarray(value, dtype=np.float64)


def _claim_equal(value, expected, comment):
    np.testing.assert_allclose(_as_numpy(value), _as_numpy(expected), rtol=1e-5, atol=1e-5,
                               err_msg=f"the example's comment `# {comment}` is false")


def _claim_value(value, expected, comment):
    assert value == expected, f"the example's comment `# {comment}` is false: got {value!r}"


def _claim_shape(value, dims, namespace, comment):
    shape = np.shape(value)
    assert len(shape) == len(dims), f"`# {comment}` is false: shape {shape}"
    for size, dim in zip(shape, dims, strict=True):
        expected = int(dim) if dim.isdigit() else namespace.get(dim)
        if isinstance(expected, int):
            assert size == expected, f"`# {comment}` is false: shape {shape}"


def _claim_attributes(value, expected, comment):
    got = {name: getattr(value, name) for name in expected}
    assert got == expected, f"the example's comment `# {comment}` is false: got {got}"


def _claim_layer_types(value, expected, comment):
    got = [type(layer).__name__ for layer in getattr(value, "layers", value)]
    assert got == expected, f"the example's comment `# {comment}` is false: got {got}"


_CLAIM_HELPERS = ("_claim_equal", "_claim_value", "_claim_shape", "_claim_attributes",
                  "_claim_layer_types")


def test_claims_are_found_and_checked():
    # Without this, a parser that finds no claim would make every example pass unchecked.
    code = ("x = jnp.ones((2, 3))   # (batch, 3)\n"
            "x.shape                # (2, 3)\n"
            "y = x * 2              # == x + x\n"
            "bn = ebn.BatchNorm(3)  # axis=-1, momentum=0.99\n"
            "seq = eqx.nn.Sequential([eqx.nn.Lambda(jnp.sin)])  # [Lambda]\n"
            "z = x                  # prose, not a claim\n"
            "z = x                  # axis_name=None: also prose\n")
    checked, count = with_claims_checked(code)
    assert count == 5
    namespace = {"jnp": jnp, "np": np, "eqx": eqx, "ebn": ebn}
    namespace |= {f: globals()[f] for f in _CLAIM_HELPERS}
    exec(checked, dict(namespace))
    for false in ("x.shape  # (3, 2)", "y = x * 2  # == x", "x = jnp.ones((2, 3))  # (2, 4)",
                  "x = jnp.ones((2, 3))  # (batch,)", "bn = ebn.BatchNorm(3)  # axis=0",
                  "seq = eqx.nn.Sequential([eqx.nn.Lambda(jnp.sin)])  # [Linear]"):
        with pytest.raises(AssertionError):
            exec(with_claims_checked(code + false + "\n")[0], dict(namespace))
    # The examples shipped today make claims of every kind.
    shipped = "".join(with_claims_checked(c.values[0])[0] for c in _cases())
    for helper in _CLAIM_HELPERS:
        assert helper + "(" in shipped, helper


@pytest.mark.parametrize("code", _cases())
def test_example_runs(code, monkeypatch):
    if (re.search(r"^\s*(import torch|from torch)", code, re.MULTILINE)
            and importlib.util.find_spec("torch") is None):
        import _torch_standin

        monkeypatch.setitem(sys.modules, "torch", _torch_standin)
    checked, _ = with_claims_checked(code)
    namespace = {"jax": jax, "jnp": jnp, "np": np, "eqx": eqx, "ebn": ebn}
    namespace |= {f: globals()[f] for f in _CLAIM_HELPERS}
    exec(compile(checked, "<docstring example>", "exec"), namespace)


def _is_data_or_error(obj) -> bool:
    """Containers (NamedTuples, field-only modules) and exceptions: a description suffices."""
    if not inspect.isclass(obj):
        return False
    return (issubclass(obj, Exception) or issubclass(obj, tuple)
            or (issubclass(obj, eqx.Module) and "__call__" not in vars(obj)))


@pytest.mark.parametrize("name", public_names())
def test_public_name_is_documented_equinox_style(name):
    obj = getattr(ebn, name)
    docs = dict(docstrings(name))
    assert docs[name].strip(), f"`{name}` has no docstring"
    if _is_data_or_error(obj):
        return
    text = "\n".join(docs.values())
    assert "!!! Example" in text or "!!! example" in text, f"`{name}` has no example"
    assert examples(text), f"`{name}`'s example has no ```python block"
    assert "**Arguments:**" in text, f"`{name}` lists no **Arguments:**"
    assert "**Returns:**" in text or inspect.isclass(obj), f"`{name}` has no **Returns:**"


# ---------------------------------------------------------------- the error catalogue

PACKAGE = Path(ebn.__file__).resolve().parent


@pytest.fixture(scope="module")
def catalogue_tool():
    with loaded("docs/tools/error_catalogue.py", "error_catalogue") as module:
        yield module


def test_error_catalogue_on_the_contract_page_is_what_the_library_prints(catalogue_tool):
    # Each trigger must raise an error naming its argument (catalogue() checks), and the
    # page must hold exactly the messages printed today.
    page = (DOCS / "contract.md").read_text()
    expected = catalogue_tool.page_with(page, catalogue_tool.catalogue())
    assert page == expected, (
        "docs/contract.md's error catalogue is out of date: run "
        "`uv run python docs/tools/error_catalogue.py --write`")


def test_error_catalogue_covers_every_argument_the_checks_name(catalogue_tool):
    # Arguments named literally at a `fail("...")` call; names passed through variables are
    # the constructor's and call's own arguments, covered by the catalogue's sections.
    named = set()
    for source in PACKAGE.glob("*.py"):
        named |= set(re.findall(r"\bfail\(\s*\"(\w+)\"", source.read_text()))
    assert len(named) >= 15, named  # the scan itself works
    documented = {argument for _, argument, _ in catalogue_tool.TRIGGERS}
    assert named <= documented, f"errors with no catalogue entry: {sorted(named - documented)}"
