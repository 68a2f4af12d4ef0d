"""Check the built docs in a real browser: serve the site on localhost, load pages in headless Chromium
(after JavaScript ran), and assert that the maths was rendered by the vendored KaTeX — no raw TeX left
in the visible text — and that the API page lists the distributions. Saves a screenshot as an artifact.

Usage: python docs/scripts/browser_check.py SITE_DIR [--screenshot PATH]
(Debian's `chromium`; the CI installs it.)
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path

# pages with maths in prose and in docstrings, and the API page whose symbols are checked
PAGES = ("index.html", "numerics/index.html", "nonisotropic/index.html", "api/distributions/index.html",
         "api/kernels/index.html", "dml/index.html", "maths/index.html")
MUST_LIST = {"api/distributions/index.html": ("VonMisesFisher", "NonIsotropicVMF", "HypersphericalUniform")}
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000")


class VisibleText(HTMLParser):
    """Text a reader sees: outside code, scripts, styles, and KaTeX's hidden MathML copy of the source."""

    HIDDEN = {"script", "style", "code", "pre", "annotation", "textarea"}

    def __init__(self):
        super().__init__()
        self.depth, self.katex_mathml, self.parts, self.katex_nodes = 0, 0, [], 0
        self.stack: list[tuple[str, bool, bool]] = []

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        hidden = tag in self.HIDDEN
        mathml = "katex-mathml" in classes
        self.katex_nodes += "katex" in classes
        self.stack.append((tag, hidden, mathml))
        self.depth += hidden
        self.katex_mathml += mathml

    def handle_endtag(self, tag):
        while self.stack:
            name, hidden, mathml = self.stack.pop()
            self.depth -= hidden
            self.katex_mathml -= mathml
            if name == tag:
                break

    def handle_data(self, data):
        if self.depth == 0 and self.katex_mathml == 0:
            self.parts.append(data)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("error: no chromium on PATH (Debian: apt-get install chromium)")


def run_browser(browser: str, profile: str, *args: str) -> str:
    cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"error: chromium failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshot", type=Path, default=Path("build/docs-screenshot.png"))
    args = parser.parse_args()
    browser = chromium()
    server, base = serve(args.site)
    failures = []
    with tempfile.TemporaryDirectory() as profile:
        for page in PAGES:
            if not (args.site / page).is_file():
                failures.append(f"{page}: not in the built site")
                continue
            dom = run_browser(browser, profile, "--dump-dom", base + page)
            text = VisibleText()
            text.feed(dom)
            visible = "".join(text.parts)
            raw = RAW_TEX.findall(visible)
            status = f"{page}: {text.katex_nodes} KaTeX nodes, {len(raw)} raw TeX delimiters"
            print(status)
            if text.katex_nodes == 0:
                failures.append(f"{page}: no formula rendered (KaTeX did not run)")
            if raw:
                where = visible.find(raw[0])
                failures.append(f"{page}: raw TeX left in the page, e.g. …{visible[max(0, where - 40):where + 40]!r}…")
            for symbol in MUST_LIST.get(page, ()):
                if symbol not in visible:
                    failures.append(f"{page}: does not list {symbol}")
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        run_browser(browser, profile, f"--screenshot={args.screenshot.resolve()}", "--window-size=1280,1400",
                    base + "numerics/index.html")
    server.shutdown()
    print(f"screenshot: {args.screenshot}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
