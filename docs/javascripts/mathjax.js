// MathJax for pymdownx.arithmatex (generic mode): $...$ and $$...$$ in the pages and the
// docstrings. MathJax itself is served from the site (vendor/mathjax, see mkdocs.yml).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// MathJax typesets the first page itself when it starts. A page that Material swaps in
// later (instant navigation re-emits document$) is typeset once MathJax is ready. Not the
// first page again: clearing the output cache would drop the CSS that draws its glyphs,
// leaving its formulas blank.
let firstPage = true;
document$.subscribe(() => {
  if (firstPage) {
    firstPage = false;
    return;
  }
  const startup = MathJax.startup;
  startup.promise = startup.promise.then(() => {
    startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    return MathJax.typesetPromise();
  });
});
