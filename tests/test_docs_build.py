"""The docs site: `mkdocs build --strict` succeeds, and it covers every public name and page."""

import os
import re
import subprocess
import sys
from pathlib import Path

# The docs toolchain is a test dependency: a missing package fails here, loudly.
import mkdocs  # noqa: F401
import mkdocstrings_handlers.python  # noqa: F401
import pytest
import yaml

import eqx_batchnorm as ebn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# End-to-end and minutes long: CI's extra environments run the other tests (-m "not slow").
pytestmark = pytest.mark.slow


def _public_names() -> set[str]:
    return {n for n, v in vars(ebn).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, type))}


def _nav_files(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_files(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_nav_files(v) for v in nav))
    return set()


def _config() -> dict:
    # mkdocs.yml may hold `!!python/name:` tags; this loader ignores any tag.
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_api_page_documents_every_public_name():
    documented = set(re.findall(r"^::: eqx_batchnorm\.(\w+)", (DOCS / "api.md").read_text(),
                                flags=re.MULTILINE))
    assert documented == _public_names()


def test_every_page_is_in_the_nav():
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    nav = _nav_files(_config()["nav"])
    assert nav <= pages, f"nav entries without a page: {sorted(nav - pages)}"
    assert pages <= nav, f"pages missing from the nav in mkdocs.yml: {sorted(pages - nav)}"


def test_strict_build(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (site / "api" / "index.html").read_text()
    for name in _public_names():
        assert f'id="eqx_batchnorm.{name}"' in api, f"{name} not rendered"
    # The docstrings' maths reaches MathJax, and their sections render as written.
    assert 'class="arithmatex"' in api
    assert "<strong>Arguments:</strong>" in api
