"""Check the built docs site in headless Chromium, as a reader at 1280 px sees it.

    uv run --extra docs mkdocs build --strict --site-dir site
    uv run python docs/tools/check_layout.py site                  # exit 1 on a problem
    uv run python docs/tools/check_layout.py site --screenshots out  # also PNGs to look at

For every page of the site, at a 1280-px-wide window:

- **maths is rendered**: MathJax has typeset every `arithmatex` element, and no raw
  `\\(`, `\\[` or `$$` is left in the rendered DOM (what `--dump-dom` returns);
- **nothing is wider than the page**: no table, code block or displayed equation needs a
  horizontal scroll bar, and the page itself does not scroll sideways.

The site is copied to a temporary folder, a small script that measures the rendered page
is added to each copy (after MathJax has finished), and the copy is served on 127.0.0.1.
Needs Debian's `chromium` (`apt-get install -y chromium`) or `--chromium PATH`.
"""

import argparse
import functools
import html.parser
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WIDTH, HEIGHT = 1280, 2000
REPORT_ID = "layout-check-report"
RAW_MATHS = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")

# Runs in the page: waits for MathJax (when the page has maths), then measures, and
# writes what it found into the DOM, where `--dump-dom` returns it.
_MEASURE = """
<script>
(function () {
  function overflowing(selector) {
    var found = [];
    document.querySelectorAll(selector).forEach(function (el) {
      var box = el.closest(".md-typeset__scrollwrap") || el.parentElement;
      var over = el.scrollWidth - el.clientWidth;  // clipped inside its own box
      var past = el.getBoundingClientRect().width - box.clientWidth;  // wider than its box
      var right = el.getBoundingClientRect().right - document.documentElement.clientWidth;
      var worst = Math.max(over, past, right);
      if (worst > 1) {
        var text = (el.textContent || "").replace(/\\s+/g, " ").trim().slice(0, 80);
        found.push({what: selector, by: Math.round(worst), text: text});
      }
    });
    return found;
  }
  function report(mathjax) {
    var maths = document.querySelectorAll(".arithmatex");
    var typeset = document.querySelectorAll(".arithmatex > mjx-container");
    var nested = document.querySelectorAll("mjx-container mjx-container");
    var blank = [].filter.call(typeset, function (el) {
      var box = el.getBoundingClientRect();
      return box.width < 1 || box.height < 1;  // glyphs are drawn by CSS: none, no size
    });
    var out = {
      mathjax: mathjax, arithmatex: maths.length, typeset: typeset.length,
      nested: nested.length, blank: blank.length,
      page_overflow: document.documentElement.scrollWidth
                     - document.documentElement.clientWidth,
      overflowing: [].concat(overflowing("article table"), overflowing("article pre > code"),
                             overflowing("article mjx-container[display='true']")),
    };
    var pre = document.createElement("pre");
    pre.id = "__REPORT_ID__";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  // Waits until MathJax's queue of typesets (startup.promise, which the site's own
  // script extends) stays the same across a wait: every typeset has finished.
  function settled(promise, tries) {
    setTimeout(function () {
      var now = window.MathJax && MathJax.startup && MathJax.startup.promise;
      if (!now) {
        if (tries > 0) { settled(null, tries - 1); } else { report("not loaded"); }
      } else if (now !== promise) {
        now.then(function () { settled(now, tries); },
                 function (e) { report("failed: " + e); });
      } else {
        report("loaded");
      }
    }, 200);
  }
  window.addEventListener("load", function () {
    if (!document.querySelector(".arithmatex")) { report("not needed"); return; }
    settled(null, 50);
  });
})();
</script>
""".replace("__REPORT_ID__", REPORT_ID)


class _MathsText(html.parser.HTMLParser):
    """The text inside `arithmatex` elements of a rendered page, and the report."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 inside an arithmatex element
        self.maths: list[str] = []
        self.in_report = False
        self.report = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if self.depth:
            self.depth += 1
        elif "arithmatex" in (attributes.get("class") or "").split():
            self.depth = 1
            self.maths.append("")
        self.in_report = attributes.get("id") == REPORT_ID

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1
        self.in_report = False

    def handle_data(self, data):
        if self.depth:
            self.maths[-1] += data
        if self.in_report:
            self.report += data


def problems_in_dom(page: str, dom: str) -> list[str]:
    """What is wrong with one page, from the DOM Chromium rendered."""
    parser = _MathsText()
    parser.feed(dom)
    if not parser.report:
        return [f"{page}: the measuring script did not report (page did not load?)"]
    report = json.loads(parser.report)
    found = []
    if report["mathjax"] not in ("loaded", "not needed"):
        found.append(f"{page}: MathJax {report['mathjax']}")
    if report["typeset"] < report["arithmatex"]:
        found.append(f"{page}: {report['arithmatex'] - report['typeset']} of "
                     f"{report['arithmatex']} maths elements not typeset")
    if report["blank"]:
        found.append(f"{page}: {report['blank']} typeset formulas drawn blank (no size)")
    if report["nested"]:
        found.append(f"{page}: {report['nested']} formulas typeset twice (one rendering "
                     "nested in another)")
    for text in parser.maths:
        if RAW_MATHS.search(text):
            found.append(f"{page}: raw TeX left in the page: {text.strip()[:80]!r}")
    if report["page_overflow"] > 1:
        found.append(f"{page}: the page scrolls sideways by {report['page_overflow']} px")
    for item in report["overflowing"]:
        found.append(f"{page}: {item['what']} wider than the page by {item['by']} px: "
                     f"{item['text']!r}")
    return found


def find_chromium(given: str | None = None) -> str | None:
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def _chromium(chromium: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
         f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=20000", *args],
        capture_output=True, text=True, timeout=120)


@contextmanager
def _served(root: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def pages(site: Path) -> list[str]:
    """Every page of the site, as a path relative to it (`index.html`, `api/index.html`)."""
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("index.html")
                  if p.relative_to(site).parts[0] not in ("vendor", "assets", "search"))


def check(site: Path, chromium: str, screenshots: Path | None = None,
          only: list[str] | None = None) -> list[str]:
    """Problems on the pages of `site` (those in `only`, if given)."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "site"
        shutil.copytree(site, copy)
        for page in pages(copy):
            path = copy / page
            path.write_text(path.read_text().replace("</body>", _MEASURE + "</body>"))
        with _served(copy) as url:
            for page in only or pages(copy):
                profile = tempfile.mkdtemp(dir=tmp)
                proc = _chromium(chromium, profile, "--dump-dom", f"{url}/{page}")
                if proc.returncode != 0:
                    found.append(f"{page}: chromium exited {proc.returncode}: "
                                 f"{proc.stderr[-500:]}")
                    continue
                found += problems_in_dom(page, proc.stdout)
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    name = page.removesuffix("index.html").strip("/").replace("/", "_")
                    target = screenshots / f"{name or 'home'}.png"
                    _chromium(chromium, tempfile.mkdtemp(dir=tmp),
                              f"--screenshot={target.resolve()}", f"{url}/{page}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build --site-dir)")
    parser.add_argument("--chromium", help="the browser to run (default: found on PATH)")
    parser.add_argument("--screenshots", type=Path, help="also save a PNG of each page here")
    parser.add_argument("--page", action="append", dest="pages",
                        help="check only this page (e.g. benchmarks/index.html); repeatable")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("no chromium found: `apt-get install -y chromium`, or pass --chromium",
              file=sys.stderr)
        return 2
    found = check(args.site, chromium, args.screenshots, args.pages)
    for problem in found:
        print(problem)
    print(f"{len(args.pages or pages(args.site))} pages checked at {WIDTH} px: "
          f"{len(found) or 'no'} problem{'s' if len(found) != 1 else ''}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
