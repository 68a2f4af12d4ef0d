// Render the maths that pymdownx.arithmatex (generic mode) leaves as \( … \) and \[ … \], with the
// KaTeX copy served from this site (vendor/katex, copied from npm at build time): no CDN.
function renderMath(root) {
  renderMathInElement(root, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => renderMath(body));  // mkdocs-material's instant navigation
} else {
  document.addEventListener("DOMContentLoaded", () => renderMath(document.body));
}
