"""The docs site: `mkdocs build --strict` succeeds, it covers every public name and page, its
maths renderer is served from the site, and in headless Chromium at 1280 px every page
renders its maths and fits (`docs/tools/check_layout.py`).

The browser is a system program, not a Python package: on a machine without Chromium the
browser tests are reported as skipped, with the command that enables them. Where a browser
is promised (`.ci/run` installs one and sets `EQX_BATCHNORM_REQUIRE_BROWSER=1`), a missing
one fails them instead."""

import json
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
from _scripts import loaded

import eqx_batchnorm as ebn

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REQUIRE_BROWSER = os.environ.get("EQX_BATCHNORM_REQUIRE_BROWSER") == "1"
NO_BROWSER = ("no Chromium on PATH, so the docs-layout check cannot run; enable it with "
              "`sudo apt-get install -y chromium` (Debian, Ubuntu)")

# End-to-end: `pytest -m "not slow"` leaves these out for a quick loop.
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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with `mkdocs build --strict` (asserted to succeed)."""
    site = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


def test_strict_build(site):
    api = (site / "api" / "index.html").read_text()
    for name in _public_names():
        assert f'id="eqx_batchnorm.{name}"' in api, f"{name} not rendered"
    # The docstrings' maths reaches MathJax, and their sections render as written.
    assert 'class="arithmatex"' in api
    assert "<strong>Arguments:</strong>" in api


def test_maths_renderer_is_served_from_the_site_not_a_cdn(site):
    home = (site / "index.html").read_text()
    scripts = re.findall(r'<script src="([^"]+)"', home)
    assert any(s.endswith("vendor/mathjax/tex-chtml.js") for s in scripts), scripts
    assert not [s for s in scripts if "//" in s], f"scripts from elsewhere: {scripts}"
    vendored = site / "vendor" / "mathjax"
    assert (vendored / "tex-chtml.js").stat().st_size > 500_000
    assert (vendored / "LICENSE").is_file()
    # What MathJax loads beside itself: the fonts of its HTML output, TeX extensions.
    assert list((vendored / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (vendored / "input" / "tex" / "extensions" / "ams.js").is_file()


# ---------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def layout():
    with loaded("docs/tools/check_layout.py", "check_layout") as module:
        yield module


def _page_html(page: str) -> str:
    return "index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html"


def _browser(layout, required: bool) -> str:
    """The browser's path; where there is none, a skip that says how to get one, or a
    failure where one is required."""
    chromium = layout.find_chromium()
    if chromium is None:
        if required:
            pytest.fail(f"EQX_BATCHNORM_REQUIRE_BROWSER=1, but {NO_BROWSER}")
        pytest.skip(NO_BROWSER)
    return chromium


def test_a_missing_browser_skips_with_the_fix_or_fails_where_required(layout, monkeypatch):
    monkeypatch.setattr(layout, "find_chromium", lambda given=None: None)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install -y chromium"):
        _browser(layout, required=False)
    with pytest.raises(pytest.fail.Exception, match=r"REQUIRE_BROWSER=1, but no Chromium"):
        _browser(layout, required=True)
    monkeypatch.setattr(layout, "find_chromium", lambda given=None: "/usr/bin/chromium")
    assert _browser(layout, required=True) == "/usr/bin/chromium"


@pytest.mark.parametrize("page", sorted(_nav_files(_config()["nav"])))
def test_page_renders_its_maths_and_fits_1280px_in_chromium(site, layout, page):
    chromium = _browser(layout, REQUIRE_BROWSER)
    problems = layout.check(site, chromium, only=[_page_html(page)])
    assert not problems, "\n".join(problems)


def test_layout_check_finds_raw_maths_and_overflow(layout):
    # The checker itself, on DOMs as Chromium would dump them: it must not pass blindly.
    def dom(maths: str, report: dict) -> str:
        full = {"mathjax": "loaded", "arithmatex": 1, "typeset": 1, "nested": 0,
                "blank": 0, "page_overflow": 0, "overflowing": []} | report
        return (f'<html><body><span class="arithmatex">{maths}</span>'
                f'<pre id="{layout.REPORT_ID}">{json.dumps(full)}</pre></body></html>')

    rendered = "<mjx-container><mjx-math>μ</mjx-math></mjx-container>"
    assert layout.problems_in_dom("p", dom(rendered, {})) == []
    assert "raw TeX" in layout.problems_in_dom("p", dom(r"\(\mu\)", {}))[0]
    assert "not typeset" in layout.problems_in_dom("p", dom(rendered, {"typeset": 0}))[0]
    assert "blank" in layout.problems_in_dom("p", dom(rendered, {"blank": 1}))[0]
    assert "MathJax not loaded" in layout.problems_in_dom(
        "p", dom(rendered, {"mathjax": "not loaded"}))[0]
    wide = {"what": "article table", "by": 120, "text": "mode | x"}
    assert "wider than the page by 120 px" in layout.problems_in_dom(
        "p", dom(rendered, {"overflowing": [wide]}))[0]
    assert "did not report" in layout.problems_in_dom("p", "<html><body></body></html>")[0]
