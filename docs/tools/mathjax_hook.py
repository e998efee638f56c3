"""MkDocs hook: serve MathJax from the built site instead of a CDN.

The files come from the `django-static-mathjax` package (MathJax 3.2.2 as released, no
Django needed), pinned in the `docs` extra, so the maths renders on a site read offline
or from a machine that cannot reach a CDN. `mkdocs.yml` loads
`vendor/mathjax/tex-chtml.js` after the configuration in `javascripts/mathjax.js`;
MathJax loads what else it needs (TeX extensions, fonts, the menu) from beside it.
"""

from pathlib import Path

import mathjax  # the `django-static-mathjax` distribution
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

SOURCE = Path(mathjax.__file__).resolve().parent / "static" / "mathjax"
DEST = "vendor/mathjax"
# The one combined component the site loads: TeX in, HTML out. Not `tex-mml-chtml.js`:
# its MathML input would find the MathML that MathJax adds for screen readers and render
# it again, nested in the formula, whenever a page is typeset a second time. The other
# combined components and the Node.js entry point are never requested by a browser.
ENTRY = "tex-chtml.js"


def _vendored() -> list[tuple[str, Path]]:
    """(path in the site, file) for the license, the entry point and what it loads."""
    es5 = SOURCE / "es5"
    found = [(f"{DEST}/LICENSE", SOURCE / "LICENSE"), (f"{DEST}/{ENTRY}", es5 / ENTRY)]
    for path in sorted(es5.rglob("*")):
        relative = path.relative_to(es5)
        if path.is_file() and len(relative.parts) > 1:  # a11y/, input/, output/, sre/, ui/
            found.append((f"{DEST}/{relative.as_posix()}", path))
    return found


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    for uri, path in _vendored():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: is django-static-mathjax==3.2.2.1 installed?")
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
