// MathJax 3 set-up for pymdownx.arithmatex (generic mode): only elements of class
// "arithmatex" are typeset. MathJax itself is served from this site (docs/hooks.py).
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
    enableMenu: false,
  },
  svg: { fontCache: "global" },
};
