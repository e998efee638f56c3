"""Load a script of the repository (a demo, a benchmark) as a module, for the tests."""

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def loaded(relative_path: str, name: str) -> Iterator[ModuleType]:
    """The script at `relative_path`, imported as module `name` for the block's length
    (registered in `sys.modules`: dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
