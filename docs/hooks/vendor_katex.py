"""MkDocs hook: copy KaTeX (installed from npm by scripts/setup.sh) into the built site, so the maths
renders offline — no CDN. Fails the build loudly when KaTeX is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
KATEX = ROOT / "node_modules" / "katex" / "dist"
FILES = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js", "fonts")


def on_post_build(config, **kwargs) -> None:
    if not (KATEX / "katex.min.js").is_file():
        raise PluginError(f"KaTeX not found at {KATEX}: run `bash scripts/setup.sh` (it runs `npm ci`)")
    target = Path(config["site_dir"]) / "vendor" / "katex"
    for name in FILES:
        source, dest = KATEX / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(source, dest)
    licence = KATEX.parent / "LICENSE"
    if licence.is_file():
        shutil.copy2(licence, target / "LICENSE")
