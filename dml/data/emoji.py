"""The cross-artist emoji benchmark: one class per emoji, one image per artist's rendering of it.

Four artists, each an npm package that ``scripts/setup.sh`` installs into ``node_modules`` (nothing
downloads at run time):

| artist | package | images | licence |
|---|---|---|---|
| ``google`` | ``emoji-datasource-google`` 16.0.0 | Noto Emoji, PNG 64 px | Apache-2.0 |
| ``twitter`` | ``emoji-datasource-twitter`` 16.0.0 | Twemoji, PNG 64 px | CC-BY-4.0 |
| ``openmoji`` | ``openmoji`` 17.0.0 | OpenMoji, SVG (``color/svg/<code points>.svg``) | CC-BY-SA-4.0 |
| ``fluent`` | ``fluentui-emoji`` 1.3.0 | Microsoft Fluent Emoji flat, SVG (``icons/flat/<name>.svg``) | MIT |

The classes are the emoji of emoji-datasource's ``emoji.json`` without their skin-tone variants.
Renderings are matched by code-point sequence (U+FE0F, the emoji presentation selector, ignored):
emoji-datasource's ``unified`` field and OpenMoji's file names are code points; Fluent's file names
are CLDR short names (``a-button-blood-type``), mapped to code points through the CLDR annotations of
OpenMoji's ``data/openmoji.csv``, so nothing is matched by hand (names without a unique match are
counted and left out). An emoji with fewer than three renderings (of two artists chosen: fewer than
two) is dropped and counted. Emoji whose renderings are byte-identical within one artist are one
picture under two labels, so each such set keeps only its oldest emoji.

The SVGs are rendered once to 64 × 64 PNG, the size of the other two artists' images, by resvg
(PyPI ``resvg-py``: a self-contained Rust wheel, no system library such as cairo; deterministic, and
system fonts are skipped so that no machine's fonts change a picture) and cached in
``node_modules/.cache/dml-emoji/`` (or ``$DML_CACHE_DIR/emoji/``), one folder per artist, package
version, size and renderer version.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .datasets import DatasetError, Splits, _abs, _build, _half_split, _require_dir


@dataclass(frozen=True)
class Artist:
    """One artist's emoji set.

    Attributes:
        name: the name used in ``--emoji-artists``.
        package: the npm package that holds the images.
        attribution: the licence and credit line written to ``NOTICE.txt``.
    """

    name: str
    package: str
    attribution: str


ARTISTS: dict[str, Artist] = {a.name: a for a in (
    Artist("google", "emoji-datasource-google",
           "Google Noto Emoji (https://github.com/googlefonts/noto-emoji), Apache License 2.0"),
    Artist("twitter", "emoji-datasource-twitter",
           "Twitter Twemoji (https://github.com/twitter/twemoji), Copyright Twitter, Inc and other contributors, "
           "CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/)"),
    Artist("openmoji", "openmoji",
           "OpenMoji (https://openmoji.org), the open-source emoji and icon project, CC-BY-SA-4.0 "
           "(https://creativecommons.org/licenses/by-sa/4.0/); rendered to 64 px PNG by resvg"),
    Artist("fluent", "fluentui-emoji",
           "Microsoft Fluent Emoji, flat style (https://github.com/microsoft/fluentui-emoji), Copyright Microsoft "
           "Corporation, MIT License, via the npm package fluentui-emoji by Mohammad Abu Mattar (MIT); rendered to "
           "64 px PNG by resvg"),
)}

#: every artist (a class's images come in the order of ``--emoji-artists``)
EMOJI_ARTISTS: tuple[str, ...] = tuple(ARTISTS)
#: the artists of the default benchmark
DEFAULT_EMOJI_ARTISTS: tuple[str, ...] = EMOJI_ARTISTS
#: the package whose ``emoji.json`` lists the emoji (names, skin tones, Unicode version)
_LIST_PACKAGE = "emoji-datasource-google"
#: the package whose ``data/openmoji.csv`` maps CLDR names to code points (for Fluent's file names)
_NAMES_PACKAGE = "openmoji"
#: side of the rendered SVGs, that of the emoji-datasource images
RENDER_SIZE = 64
#: Fluent's skin-tone file-name suffixes (the ``-default`` file is the emoji itself)
_FLUENT_TONES = ("-light", "-medium-light", "-medium", "-medium-dark", "-dark")

SETUP_HINT = "run `bash scripts/setup.sh` (it runs `npm ci`) or pass --data-root"


def parse_artists(value: str | Sequence[str]) -> tuple[str, ...]:
    """The artists named by ``--emoji-artists``: a comma-separated string or a sequence of names.

    Args:
        value: e.g. ``"google,twitter"`` or ``("google", "openmoji", "fluent")``.

    Returns:
        The names, in the order given.

    Raises:
        DatasetError: an unknown or repeated name, or fewer than two artists (nothing to retrieve).
    """
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in ARTISTS]
    if unknown:
        raise DatasetError(f"emoji_artists: unknown artist {unknown[0]!r}; choose from {', '.join(EMOJI_ARTISTS)}")
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetError(f"emoji_artists: {repeated[0]!r} is named twice")
    if len(names) < 2:
        raise DatasetError(f"emoji_artists: need at least two artists (a query and another artist's rendering to "
                           f"find), got {','.join(names) or 'none'}")
    return tuple(names)


def _packages(artists: Iterable[str]) -> list[str]:
    needed = [_LIST_PACKAGE] + [ARTISTS[a].package for a in artists]
    if "fluent" in artists:
        needed.append(_NAMES_PACKAGE)
    return list(dict.fromkeys(needed))


def _holds(path: Path, packages: Sequence[str]) -> bool:
    return all((path / p / "package.json").is_file() for p in packages)


def find_node_modules(path: Path, artists: Sequence[str] = DEFAULT_EMOJI_ARTISTS) -> Path | None:
    """``path`` or ``path/node_modules``, whichever holds the packages of ``artists``, else None."""
    packages = _packages(artists)
    for cand in (path, path / "node_modules"):
        if _holds(cand, packages):
            return cand
    return None


def default_emoji_root(artists: Sequence[str] = DEFAULT_EMOJI_ARTISTS) -> Path | None:
    """Where the emoji packages are installed, or None if nowhere.

    ``$DML_EMOJI_ROOT`` if set (None if it lacks the packages), else ``<repo>/node_modules`` (``<repo>``
    is the directory that holds the ``dml`` package), then ``./node_modules``: the first that holds the
    packages of ``artists`` (and ``emoji-datasource-google``, whose ``emoji.json`` lists the emoji).

    Args:
        artists: the artists whose packages must be there.

    Returns:
        The ``node_modules`` directory, or None.
    """
    if os.environ.get("DML_EMOJI_ROOT"):  # the user's choice: never silently replaced by another tree
        found = find_node_modules(Path(os.environ["DML_EMOJI_ROOT"]).expanduser(), artists)
        return None if found is None else found.absolute()
    candidates = [Path(__file__).resolve().parents[2] / "node_modules"]
    candidates.append(Path.cwd() / "node_modules")
    for cand in candidates:
        found = find_node_modules(cand, artists)
        if found is not None:
            return found.absolute()
    return None


# --------------------------------------------------------------------------------------------------
# matching by code points


def code_point_key(code_points: str) -> str:
    """The matching key of a code-point sequence: upper-case hex joined by ``-``, without U+FE0F.

    ``"263a-fe0f"``, ``"263A"`` and ``"263A-FE0F"`` all give ``"263A"``.
    """
    return "-".join(p for p in code_points.upper().replace("_", "-").split("-") if p and p != "FE0F")


def cldr_slug(name: str) -> str:
    """A CLDR short name as Fluent's file names spell it: ASCII, lower case, apostrophes dropped and
    every other run of non-alphanumerics one ``-`` (``"A button (blood type)"`` → ``a-button-blood-type``,
    ``"piñata"`` → ``pinata``)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = ascii_name.replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")


def _version(root: Path, package: str) -> str:
    try:
        return str(json.loads((root / package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _datasource_images(root: Path, style: str, entries: list[dict]) -> dict[str, Path]:
    files = {}
    for e in entries:
        image = e.get("image")
        if image and e.get("unified") and e.get(f"has_img_{style}"):
            path = root / f"emoji-datasource-{style}" / "img" / style / "64" / image
            if path.is_file():
                files[code_point_key(e["unified"])] = path
    return files


def _openmoji_svgs(root: Path) -> dict[str, Path]:
    folder = root / "openmoji" / "color" / "svg"
    _require_dir(folder, "OpenMoji's SVG folder")
    return {code_point_key(p.stem): p for p in sorted(folder.glob("*.svg"))}


def cldr_names(root: Path) -> dict[str, str]:
    """{`cldr_slug` of a CLDR short name: code-point key} from OpenMoji's ``data/openmoji.csv``.

    Only Unicode emoji without skin tone (OpenMoji's own extras left out); a slug shared by two emoji
    is ambiguous and left out.
    """
    path = root / _NAMES_PACKAGE / "data" / "openmoji.csv"
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the emoji names table {path}: {exc}") from None
    keys: dict[str, set[str]] = {}
    for row in rows:
        if row.get("skintone") or str(row.get("group", "")).startswith("extras") or not row.get("hexcode"):
            continue
        keys.setdefault(cldr_slug(str(row.get("annotation", ""))), set()).add(code_point_key(row["hexcode"]))
    return {slug: next(iter(k)) for slug, k in keys.items() if slug and len(k) == 1}


def _fluent_svgs(root: Path) -> tuple[dict[str, Path], list[str]]:
    """({code-point key: flat SVG}, Fluent names without a CLDR match), skin-tone variants left out."""
    folder = root / "fluentui-emoji" / "icons" / "flat"
    _require_dir(folder, "Fluent's SVG folder")
    stems = {p.stem: p for p in sorted(folder.glob("*.svg"))}
    names = cldr_names(root)
    files: dict[str, Path] = {}
    unmatched = []
    for stem, path in stems.items():
        if stem.endswith("-default"):
            base = stem[: -len("-default")]
        elif any(stem.endswith(t) and stem[: -len(t)] + "-default" in stems for t in _FLUENT_TONES):
            continue  # a skin-tone variant of an emoji whose base is its "-default" file
        else:
            base = stem
        if base in names:
            files[names[base]] = path
        else:
            unmatched.append(base)
    return files, unmatched


# --------------------------------------------------------------------------------------------------
# rendering


def render_cache_dir(root: Path) -> Path:
    """Where rendered SVGs are kept: ``$DML_CACHE_DIR/emoji`` if set, else ``<node_modules>/.cache/dml-emoji``."""
    if os.environ.get("DML_CACHE_DIR"):
        return Path(os.environ["DML_CACHE_DIR"]) / "emoji"
    return root / ".cache" / "dml-emoji"


def _resvg():  # type: ignore[no-untyped-def]
    try:
        import resvg_py
    except ImportError:
        raise DatasetError("the openmoji and fluent emoji are SVGs, rendered by the resvg-py package: "
                           "pip install resvg-py (the dml extra has it), or --emoji-artists google,twitter") from None
    return resvg_py


def render_svg(path: Path, size: int = RENDER_SIZE) -> bytes:
    """One SVG as a ``size`` × ``size`` PNG (resvg; transparent background, no system fonts).

    Raises:
        DatasetError: the file cannot be read or rendered.
    """
    resvg_py = _resvg()
    try:
        return bytes(resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size, skip_system_fonts=True))
    except Exception as exc:  # resvg raises plain exceptions for unreadable or malformed SVGs
        raise DatasetError(f"cannot render {path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                           ) from None


def rendered(svgs: dict[str, Path], folder: Path, what: str) -> dict[str, Path]:
    """PNG renderings of ``svgs`` in ``folder``, made once: files already there are reused.

    Each PNG is named after its SVG file (not the emoji it is matched to, so a changed name table never
    reuses another emoji's picture), written to a temporary name and renamed, so an interrupted or
    concurrent render never leaves a partial file behind. A progress bar shows on a terminal.

    Args:
        svgs: {key: SVG path}.
        folder: the cache folder of this artist, package version, size and renderer.
        what: the label of the progress bar.

    Returns:
        {key: PNG path} for every key of ``svgs``.

    Raises:
        DatasetError: the folder cannot be written, or an SVG cannot be rendered.
    """
    targets = {k: folder / f"{svg.stem}.png" for k, svg in svgs.items()}
    todo = [k for k in svgs if not targets[k].is_file()]
    if todo:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetError(f"cannot create the rendered-emoji cache {folder}: {err.strerror}; set $DML_CACHE_DIR "
                               "to a writable directory") from None
        from tqdm import tqdm

        for k in tqdm(todo, desc=what, unit="image", file=sys.stderr, leave=False, disable=None):
            png = render_svg(svgs[k])
            partial = targets[k].with_name(f".{targets[k].stem}.{os.getpid()}.tmp")
            try:
                partial.write_bytes(png)
                os.replace(partial, targets[k])
            except OSError as err:
                raise DatasetError(f"cannot write {targets[k]}: {err.strerror}; set $DML_CACHE_DIR to a writable "
                                   "directory") from None
            finally:  # also on Ctrl-C between the write and the rename
                partial.unlink(missing_ok=True)
    return targets


def _renderer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resvg-py")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# the benchmark


def _version_key(added_in: object) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(added_in).split("."))
    except ValueError:
        return (1 << 30,)


def merge_identical_renderings(
    names: list[str], files: dict[str, dict[str, Path]], added_in: dict[str, object]
) -> list[str]:
    """Keep one class of each set whose renderings are byte-identical within some artist.

    Several emoji share one picture in an artist's set (e.g. ``fr`` / ``flag-cp`` / ``flag-mf``, or
    the gendered family emoji in Twemoji): an identical image under two labels is pure label noise
    for retrieval, so each such set keeps only its oldest emoji (by ``added_in``, then name). The
    SVG artists are compared by their rendered PNGs (the renderer is deterministic: identical pictures
    give identical files).

    Args:
        names: the class names.
        files: {name: {artist: image}}; an artist may be missing for a class.
        added_in: {name: the Unicode emoji version that added it}.

    Returns:
        The names kept, in the order given.
    """
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for artist in EMOJI_ARTISTS:
        first: dict[bytes, str] = {}
        for n in names:
            if artist not in files[n]:
                continue
            digest = hashlib.sha256(files[n][artist].read_bytes()).digest()
            if digest in first:
                a, b = sorted((find(first[digest]), find(n)), key=lambda k: (_version_key(added_in[k]), k))
                parent[b] = a
            else:
                first[digest] = n
    return [n for n in names if find(n) == n]


def _notice(versions: dict[str, str]) -> str:
    """The attribution of the artists in ``versions`` ({artist: its package's version})."""
    lines = ["Emoji images:"]
    for a, version in versions.items():
        lines.append(f"- {ARTISTS[a].attribution} (npm {ARTISTS[a].package} {version}).")
    if {"google", "twitter"} & set(versions):
        lines.append("- The Google and Twitter images via the npm packages emoji-datasource-google / -twitter by "
                     "iamcal (https://github.com/iamcal/emoji-data), MIT License.")
    if "fluent" in versions:
        lines.append("- Fluent's emoji names matched to code points through OpenMoji's CLDR annotations "
                     "(data/openmoji.csv, CC-BY-SA-4.0).")
    return "\n".join(lines)


def _locate(data_root: str | Path | None, artists: Sequence[str]) -> Path:
    if data_root is None:
        root = default_emoji_root(artists)
        if root is None:
            where = (f"$DML_EMOJI_ROOT={os.environ['DML_EMOJI_ROOT']}" if os.environ.get("DML_EMOJI_ROOT")
                     else "<repo>/node_modules, ./node_modules")
            raise DatasetError(f"emoji packages ({', '.join(_packages(artists))}) not found in {where}: {SETUP_HINT}")
        return root
    given = Path(data_root).expanduser()
    _require_dir(given, "data_root")
    root = find_node_modules(given, artists)
    if root is None:
        raise DatasetError(f"data_root {given} holds neither the emoji packages ({', '.join(_packages(artists))}) "
                           f"nor node_modules/ with them: {SETUP_HINT}")
    return root


def load_emoji(
    data_root: str | Path | None,
    val_fraction: float,
    split_seed: int,
    artists: str | Sequence[str] = DEFAULT_EMOJI_ARTISTS,
) -> Splits:
    """The emoji benchmark's splits: half of the classes (seeded) in test, validation carved from training.

    Args:
        data_root: the ``node_modules`` directory (or one containing it); None: `default_emoji_root`.
        val_fraction: fraction of the training classes moved to validation.
        split_seed: seed of the class permutations.
        artists: the artists whose renderings are a class's images (`parse_artists`).

    Returns:
        The splits; ``summary`` says how many emoji were kept, dropped and merged; each split's
        ``domains`` are the artists of its images (for the cross-artist metrics).

    Raises:
        DatasetError: unknown artists, missing packages, an unreadable list or SVG, or fewer than two classes.
    """
    chosen = parse_artists(artists)
    root = _locate(data_root, chosen)
    json_path = root / _LIST_PACKAGE / "emoji.json"
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {json_path}: {str(exc).splitlines()[0]}") from None

    images: dict[str, dict[str, Path]] = {}
    unmatched: list[str] = []
    versions = {a: _version(root, ARTISTS[a].package) for a in chosen}
    cache = render_cache_dir(root)
    renderer = _renderer_version()
    wanted = {code_point_key(e["unified"]) for e in entries if e.get("unified")}  # only these are rendered
    for a in chosen:
        if a in ("google", "twitter"):
            images[a] = _datasource_images(root, a, entries)
            continue
        svgs, missed = _fluent_svgs(root) if a == "fluent" else (_openmoji_svgs(root), [])
        unmatched += missed
        svgs = {k: p for k, p in svgs.items() if k in wanted}
        folder = cache / f"{a}-{versions[a]}-{RENDER_SIZE}px-resvg-{renderer}"
        images[a] = rendered(svgs, folder, f"rendering {a} emoji once")

    need = min(3, len(chosen))
    files: dict[str, dict[str, Path]] = {}
    added_in: dict[str, object] = {}
    dropped = 0
    for e in entries:  # the base image of each entry: skin-tone variants (e["skin_variations"]) are left out
        if not e.get("unified") or not e.get("image"):
            continue
        key = code_point_key(e["unified"])
        found = {a: images[a][key] for a in chosen if key in images[a]}
        if len(found) < need:
            dropped += 1
            continue
        name = e.get("short_name") or e["unified"]
        if name in files:  # never seen in the data, but keep classes unique if it happens
            name = f"{name} ({e['unified']})"
        files[name] = found
        added_in[name] = e.get("added_in")
    names = merge_identical_renderings(sorted(files), files, added_in)
    if len(names) < 2:
        raise DatasetError(f"{json_path} lists {len(names)} emoji with renderings by at least {need} of the artists "
                           f"{','.join(chosen)}; need at least 2")
    items = {n: [_abs(files[n][a]) for a in chosen if a in files[n]] for n in names}
    artist_of = {_abs(files[n][a]): a for n in names for a in files[n]}
    counts = Counter(len(items[n]) for n in names)
    summary = (f"{len(names)} emoji drawn by {len(chosen)} artists ({', '.join(chosen)}): "
               + ", ".join(f"{counts[k]} with {k} renderings" for k in sorted(counts, reverse=True))
               + f"; {dropped} emoji with fewer than {need} renderings dropped, {len(files) - len(names)} merged "
               "(identical renderings)")
    if unmatched:
        summary += f"; Fluent names without a CLDR match: {len(unmatched)}"
    train, test = _half_split(names, split_seed)
    return _build("emoji", items, train, test, val_fraction, split_seed, _notice(versions), summary, artist_of)
