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
"""

import importlib.util
import inspect
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("code", _cases())
def test_example_runs(code, monkeypatch):
    if (re.search(r"^\s*(import torch|from torch)", code, re.MULTILINE)
            and importlib.util.find_spec("torch") is None):
        import _torch_standin

        monkeypatch.setitem(sys.modules, "torch", _torch_standin)
    namespace = {"jax": jax, "jnp": jnp, "np": np, "eqx": eqx, "ebn": ebn}
    exec(compile(code, "<docstring example>", "exec"), namespace)


def _is_data_or_error(obj) -> bool:
    """Containers (NamedTuples, field-only modules) and exceptions: a description suffices."""
    if not inspect.isclass(obj):
        return False
    return (issubclass(obj, Exception) or issubclass(obj, tuple)
            or (issubclass(obj, eqx.Module) and "__call__" not in vars(obj)))


@pytest.mark.parametrize("name", public_names())
def test_public_name_is_documented_equinox_style(name):
    obj = getattr(ebn, name)
    if isinstance(obj, str):  # __version__-like constants
        return
    docs = dict(docstrings(name))
    assert docs[name].strip(), f"`{name}` has no docstring"
    if _is_data_or_error(obj):
        return
    text = "\n".join(docs.values())
    assert "!!! Example" in text or "!!! example" in text, f"`{name}` has no example"
    assert examples(text), f"`{name}`'s example has no ```python block"
    assert "**Arguments:**" in text, f"`{name}` lists no **Arguments:**"
    assert "**Returns:**" in text or inspect.isclass(obj), f"`{name}` has no **Returns:**"
