"""The emoji benchmark (dml.data.emoji): four artists matched by code points, SVGs rendered once and
deterministically, emoji with too few renderings dropped and counted, identical renderings merged; on a
synthetic package tree, and on the installed packages when `npm ci` has run."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dml.config import ConfigError, config_from_dict, saved_run_config
from dml.data import DatasetError, decode_image, default_emoji_root, load_splits
from dml.data import emoji as emoji_module
from dml.data.emoji import cldr_slug, code_point_key, parse_artists, render_svg
from tests.dml.tiny_runs import run_cli

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("resvg_py")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8), "RGBA").save(path)


def _svg(path: Path, colour: str, size: int = 72) -> None:
    """A square SVG: a ``colour`` disc on a transparent canvas (the colour makes each picture distinct)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    half = size / 2
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}">'
                    f'<circle cx="{half}" cy="{half}" r="{half * 0.8}" fill="{colour}"/></svg>')


def _package(folder: Path, name: str, version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text(json.dumps({"name": name, "version": version}))


def fake_tree(node_modules: Path) -> None:
    """Twelve emoji 1F600..1F60B named emoji_k, with the CLDR names "face k" (Fluent: face-k.svg).

    All have Google and Twitter images except emoji_1 (no Twitter); OpenMoji lacks emoji_2 and
    emoji_3; Fluent lacks emoji_3 and emoji_4 and draws emoji_5 with skin tones (face-5-default.svg
    and tone variants). So emoji_3 has two renderings (dropped with three or four artists).
    """
    entries = [{"unified": f"1F6{k:02X}", "short_name": f"emoji_{k}", "image": f"1f6{k:02x}.png",
                "has_img_google": True, "has_img_twitter": k != 1, "added_in": "1.0"} for k in range(12)]
    entries[0]["skin_variations"] = {"1F3FB": {"unified": "1F600-1F3FB", "image": "1f600-1f3fb.png",
                                               "has_img_google": True, "has_img_twitter": True}}
    entries[6]["unified"] = "1F606-FE0F"  # the presentation selector is ignored in matching
    for style in ("google", "twitter"):
        pkg = node_modules / f"emoji-datasource-{style}"
        _package(pkg, pkg.name, "16.0.0")
        (pkg / "emoji.json").write_text(json.dumps(entries))
        for k, e in enumerate(entries):
            if e[f"has_img_{style}"]:
                _png(pkg / "img" / style / "64" / e["image"], seed=k + (50 if style == "twitter" else 0))
        _png(pkg / "img" / style / "64" / "1f600-1f3fb.png", seed=99)

    openmoji = node_modules / "openmoji"
    _package(openmoji, "openmoji", "17.0.0")
    rows = ["emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,skintone,"
            "skintone_combination,skintone_base_emoji,skintone_base_hexcode,unicode,order"]
    rows += [f"x,1F6{k:02X},smileys-emotion,face,face {k},,,,,,,,,1,{k}" for k in range(12)]
    rows.append("x,1F605-1F3FB,smileys-emotion,face,face 5: light skin tone,,,,,1,,,,1,99")  # a tone: ignored
    rows.append("x,E000,extras-openmoji,x,face 11,,,,,,,,,,100")  # OpenMoji's own extra of that name: ignored
    (openmoji / "data").mkdir()
    (openmoji / "data" / "openmoji.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for k in range(12):
        if k not in (2, 3):
            _svg(openmoji / "color" / "svg" / f"1F6{k:02X}.svg", f"#{20 * k:02x}8040")

    fluent = node_modules / "fluentui-emoji"
    _package(fluent, "fluentui-emoji", "1.3.0")
    flat = fluent / "icons" / "flat"
    for k in range(12):
        if k not in (3, 4):
            _svg(flat / (f"face-{k}-default.svg" if k == 5 else f"face-{k}.svg"), f"#40{20 * k:02x}80", size=32)
    for tone in ("light", "medium-light", "medium", "medium-dark", "dark"):
        _svg(flat / f"face-5-{tone}.svg", "#000000", size=32)
    _svg(flat / "not-an-emoji-name.svg", "#123456", size=32)


def _all_names(s) -> set[str]:
    return set(s.train.class_names) | set(s.val.class_names) | set(s.test.class_names)


def _artist_of(path: str) -> str:
    parts = Path(path).parts
    return parts[-3] if parts[-2] == "64" else parts[-2].split("-")[0]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.delenv("DML_CACHE_DIR", raising=False)
    monkeypatch.delenv("DML_EMOJI_ROOT", raising=False)
    node_modules = tmp_path / "node_modules"
    fake_tree(node_modules)
    return node_modules


def test_four_artists_matched_by_code_points(tree):
    s = load_splits("emoji", tree, val_fraction=0.2, split_seed=0)
    # emoji_3 has only Google and Twitter: dropped; every other emoji has at least three renderings
    assert _all_names(s) == {f"emoji_{k}" for k in range(12)} - {"emoji_3"}
    images: dict[str, list[str]] = {}
    for part in (s.train, s.val, s.test):
        for path, label in zip(part.paths, part.labels):
            images.setdefault(part.class_names[label], []).append(_artist_of(path))
    assert images["emoji_0"] == ["google", "twitter", "openmoji", "fluent"]  # in the artists' order
    assert images["emoji_1"] == ["google", "openmoji", "fluent"]
    assert images["emoji_2"] == ["google", "twitter", "fluent"]
    assert images["emoji_4"] == ["google", "twitter", "openmoji"]
    assert images["emoji_5"] == ["google", "twitter", "openmoji", "fluent"]  # Fluent's -default file
    assert images["emoji_6"] == ["google", "twitter", "openmoji", "fluent"]  # FE0F ignored
    assert not any("1f3fb" in p.lower() for part in (s.train, s.val, s.test) for p in part.paths)
    assert "11 emoji drawn by 4 artists" in s.summary
    assert "8 with 4 renderings, 3 with 3 renderings" in s.summary
    assert "1 emoji with fewer than 3 renderings dropped" in s.summary
    assert "Fluent names without a CLDR match: 1" in s.summary  # not-an-emoji-name; tone variants are not names
    for needle in ("Noto", "Apache License 2.0", "Twemoji", "CC-BY-4.0", "OpenMoji", "CC-BY-SA-4.0", "Fluent",
                   "Microsoft", "MIT", "iamcal", "16.0.0", "17.0.0", "1.3.0"):
        assert needle in s.notice, needle
    # node_modules itself or a directory containing it; the split depends on the seed only
    assert load_splits("emoji", tree.parent, split_seed=0) == load_splits("emoji", tree, split_seed=0)
    assert any(load_splits("emoji", tree, split_seed=k).test != s.test for k in range(1, 6))


def test_two_artists_need_both(tree):
    s = load_splits("emoji", tree, emoji_artists="google,twitter")
    assert _all_names(s) == {f"emoji_{k}" for k in range(12)} - {"emoji_1"}
    assert "1 emoji with fewer than 2 renderings dropped" in s.summary
    for part in (s.train, s.val, s.test):
        assert Counter(part.labels) == Counter({y: 2 for y in range(part.num_classes)})
    assert "OpenMoji" not in s.notice and "Fluent" not in s.notice
    three = load_splits("emoji", tree, emoji_artists=["openmoji", "fluent", "google"])
    assert _all_names(three) == {f"emoji_{k}" for k in (0, 1, 5, 6, 7, 8, 9, 10, 11)}


def test_svgs_rendered_once_deterministically_and_atomically(tree, monkeypatch):
    """Rendered once (a second load renders nothing), byte for byte as a fresh render, into the cache
    folder of the artist, package version and renderer; a failed write leaves nothing behind."""
    calls: list[Path] = []
    real = emoji_module.render_svg
    monkeypatch.setattr(emoji_module, "render_svg", lambda path, size=64: calls.append(path) or real(path, size))
    first = load_splits("emoji", tree)
    assert len(calls) == 10 + 10  # OpenMoji and Fluent draw 10 emoji each; tones and unknown names not rendered
    cache = tree / ".cache" / "dml-emoji"
    folders = sorted(p.name for p in cache.iterdir())
    assert folders[0].startswith("fluent-1.3.0-64px-resvg-") and folders[1].startswith("openmoji-17.0.0-64px-resvg-")
    pngs = [p for p in cache.rglob("*") if p.is_file()]
    assert len(pngs) == 20 and not any(p.name.startswith(".") for p in pngs)  # no temporary file left
    calls.clear()
    assert load_splits("emoji", tree) == first and calls == []  # reused, not rendered again
    for png in pngs:  # and the cached file is the picture, byte for byte as rendered afresh
        svg = (tree / "openmoji" / "color" / "svg" / f"{png.stem}.svg") if png.parent.name.startswith("openmoji") \
            else None
        if svg is not None:
            assert real(svg) == png.read_bytes()
    with Image.open(pngs[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGBA"

    monkeypatch.setenv("DML_CACHE_DIR", str(tree.parent / "elsewhere"))
    load_splits("emoji", tree)
    assert len(list((tree.parent / "elsewhere" / "emoji").rglob("*.png"))) == 20

    # a render that fails between writing and renaming leaves neither a PNG nor a temporary file
    monkeypatch.setenv("DML_CACHE_DIR", str(tree.parent / "failing"))

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(emoji_module.os, "replace", no_rename)
    with pytest.raises(DatasetError, match="No space left"):
        load_splits("emoji", tree)
    assert [p for p in (tree.parent / "failing").rglob("*") if p.is_file()] == []


def test_cached_pngs_follow_the_svg_not_the_name_table(tree):
    """Renderings are cached under their SVG's name: when the CLDR name table maps a Fluent file to
    another emoji, that emoji gets the file's picture, never a stale one cached under its code points."""
    first = load_splits("emoji", tree, emoji_artists="google,fluent")
    csv_path = tree / "openmoji" / "data" / "openmoji.csv"
    text = csv_path.read_text(encoding="utf-8")
    csv_path.write_text(text.replace("face 6,", "face X,").replace("face 7,", "face 6,").replace("face X,", "face 7,"),
                        encoding="utf-8")
    second = load_splits("emoji", tree, emoji_artists="google,fluent")

    def fluent_picture(s, name):
        for part in (s.train, s.val, s.test):
            for path, label in zip(part.paths, part.labels):
                if part.class_names[label] == name and "/fluent-" in path:
                    return Path(path).read_bytes()
        raise AssertionError(name)

    assert fluent_picture(second, "emoji_6") == fluent_picture(first, "emoji_7")
    assert fluent_picture(second, "emoji_7") == fluent_picture(first, "emoji_6")
    assert fluent_picture(second, "emoji_6") == render_svg(tree / "fluentui-emoji" / "icons" / "flat" / "face-7.svg")


def test_unwritable_cache_is_one_clear_error(tree, monkeypatch):
    blocker = tree.parent / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DML_CACHE_DIR", str(blocker))
    with pytest.raises(DatasetError) as err:
        load_splits("emoji", tree)
    assert "DML_CACHE_DIR" in str(err.value) and "\n" not in str(err.value)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tree.parent / "locked"
        locked.mkdir(mode=0o500)
        monkeypatch.setenv("DML_CACHE_DIR", str(locked))
        with pytest.raises(DatasetError, match="DML_CACHE_DIR"):
            load_splits("emoji", tree)


def test_render_draws_the_svg_geometry(tmp_path):
    """An independent check of the renderer: a red left half and a blue right half over the top three
    quarters of a 72-unit canvas, rendered at 64 px, are red / blue / transparent where they should be."""
    path = tmp_path / "halves.svg"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
                    '<rect x="0" y="0" width="36" height="54" fill="#ff0000"/>'
                    '<rect x="36" y="0" width="36" height="54" fill="#0000ff"/></svg>')
    png = tmp_path / "halves.png"
    png.write_bytes(render_svg(path))
    with Image.open(png) as im:
        rgba = np.asarray(im.convert("RGBA"))
    assert rgba.shape == (64, 64, 4)
    # at 64/72 scale the halves meet at x = 32 and the rectangles end at y = 48
    assert (rgba[:47, :31] == [255, 0, 0, 255]).all()
    assert (rgba[:47, 33:] == [0, 0, 255, 255]).all()
    assert (rgba[49:, :, 3] == 0).all()
    assert render_svg(path) == png.read_bytes()  # deterministic
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg")
    with pytest.raises(DatasetError, match="cannot render .*bad.svg"):
        render_svg(bad)


def test_identical_renderings_merged(tree):
    """Two emoji with the same picture in one artist's set are one class (the older one is kept)."""
    svg = tree / "openmoji" / "color" / "svg"
    (svg / "1F608.svg").write_bytes((svg / "1F607.svg").read_bytes())
    s = load_splits("emoji", tree)
    assert "emoji_7" in _all_names(s) and "emoji_8" not in _all_names(s)  # same age: the first name
    assert "1 merged (identical renderings)" in s.summary
    for style in ("google", "twitter"):
        path = tree / f"emoji-datasource-{style}" / "emoji.json"
        entries = json.loads(path.read_text())
        entries[8]["added_in"] = "0.6"
        path.write_text(json.dumps(entries))
    s = load_splits("emoji", tree)
    assert "emoji_8" in _all_names(s) and "emoji_7" not in _all_names(s)


def test_names_and_keys():
    assert code_point_key("263a-fe0f") == code_point_key("263A") == "263A"
    assert code_point_key("0023-FE0F-20E3") == "0023-20E3"
    assert cldr_slug("A button (blood type)") == "a-button-blood-type"
    assert cldr_slug("man’s shoe") == "mans-shoe" and cldr_slug("piñata") == "pinata"
    assert cldr_slug("1st place medal") == "1st-place-medal"


@pytest.mark.parametrize("value, message", [
    ("google,bogus", "unknown artist 'bogus'"), ("google,google", "named twice"), ("fluent", "at least two"),
    ("", "at least two"),
])
def test_bad_artists_are_refused(value, message, tree):
    with pytest.raises(DatasetError, match=message):
        parse_artists(value)
    with pytest.raises(DatasetError, match=message):
        load_splits("emoji", tree, emoji_artists=value)
    with pytest.raises(ConfigError, match=f"--emoji-artists: .*{message}"):
        config_from_dict({"emoji_artists": value})


def test_runs_saved_before_the_option_keep_their_two_artists():
    """A run whose config.json predates --emoji-artists trained on Google and Twitter: resuming or
    re-evaluating it uses those two, while a new configuration gets all four; the option belongs to the
    emoji dataset only."""
    assert config_from_dict({}).emoji_artists == "google,twitter,openmoji,fluent"
    assert saved_run_config({"dataset": "emoji"}).emoji_artists == "google,twitter"
    assert saved_run_config({"emoji_artists": "openmoji,fluent"}).emoji_artists == "openmoji,fluent"
    assert saved_run_config({"dataset": "folder", "data_root": "x"}).dataset == "folder"
    with pytest.raises(ConfigError, match="emoji only"):
        config_from_dict({"dataset": "folder", "emoji_artists": "google,twitter"})


def test_missing_packages_named(tmp_path, tree):
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError) as err:
        load_splits("emoji", tmp_path / "other")
    message = str(err.value)
    assert "openmoji" in message and "scripts/setup.sh" in message and "--data-root" in message
    with pytest.raises(DatasetError, match="does not exist"):
        load_splits("emoji", tmp_path / "images_not_here")
    with pytest.raises(DatasetError, match="emoji dataset only"):
        load_splits("folder", tmp_path, emoji_artists="google,twitter")


def test_default_root_from_environment(tree, monkeypatch):
    monkeypatch.setenv("DML_EMOJI_ROOT", str(tree.parent))
    assert default_emoji_root() == tree
    assert load_splits("emoji", None, split_seed=0) == load_splits("emoji", tree, split_seed=0)
    # a $DML_EMOJI_ROOT without the packages is an error, not a silent fall-back to the repository's
    monkeypatch.setenv("DML_EMOJI_ROOT", str(tree.parent / "nothing_here"))
    assert default_emoji_root() is None
    with pytest.raises(DatasetError, match="DML_EMOJI_ROOT="):
        load_splits("emoji", None)


def test_training_run_reports_cross_artist_metrics(tree, tmp_path):
    """A tiny run on the four-artist tree: the log says what the data kept, final_metrics.json and the
    report carry the cross-domain (cross-artist) metrics, and dml.evaluate reproduces them."""
    out = tmp_path / "run"
    args = ["--output-dir", out, "--dataset", "emoji", "--data-root", tree, "--backbone", "tiny", "--weights", "none",
            "--embed-dim", "8", "--batch-size", "4", "--samples-per-class", "2", "--device", "cpu", "--epochs", "1",
            "--val-fraction", "0.25", "--eval-batch-size", "16", "--degradation-images", "0"]
    env = {"DML_CACHE_DIR": str(tmp_path / "cache")}
    trained = run_cli("dml.train", *args, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "data: 11 emoji drawn by 4 artists" in trained.stdout
    final = json.loads((out / "final_metrics.json").read_text())
    test_images = 5 * 4  # 5 of the 11 emoji in test, with 3 or 4 renderings each
    assert final["num_queries"] <= test_images and 0 < final["num_queries_cross_domain"] <= test_images
    for key in ("recall@1_cross_domain", "recall@8_cross_domain", "map@r_cross_domain", "r_precision_cross_domain"):
        assert 0.0 <= final[key] <= 1.0, key
    assert "R@1 (cross-domain)" in (out / "report.md").read_text()
    assert "cross-domain R@1" in trained.stdout
    evaluated = run_cli("dml.evaluate", "--run", out, "--device", "cpu", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    again = json.loads((out / "final_metrics.json").read_text())["evaluate"]
    assert all(again[k] == final[k] for k in final if k.endswith("_cross_domain"))


# --------------------------------------------------------------------------------------------------
# the installed packages


REAL = REPO / "node_modules"


@pytest.mark.skipif(not (REAL / "fluentui-emoji").is_dir(), reason="emoji packages not installed (npm ci)")
def test_real_emoji_benchmark():
    s = load_splits("emoji", REAL)
    n = len(_all_names(s))
    assert 1800 <= n <= 1911 and abs(s.test.num_classes - n / 2) <= 1
    per_class: Counter[int] = Counter()
    for part in (s.train, s.val, s.test):
        per_class.update(Counter(part.labels).values())
    assert set(per_class) <= {3, 4} and per_class[4] >= 1500  # Fluent lacks most flags
    # known matches through the CLDR names: grinning face, A button (blood type), 1st place medal
    fluent = {part.class_names[label]: Path(path).stem for part in (s.train, s.val, s.test)
              for path, label in zip(part.paths, part.labels) if "/fluent-" in path}
    assert fluent["grinning"] == "grinning-face" and fluent["a"] == "a-button-blood-type"
    assert fluent["first_place_medal"] == "1st-place-medal" and fluent["mans_shoe"] == "mans-shoe"
    for needle in ("CC-BY-4.0", "CC-BY-SA-4.0", "Microsoft", "16.0.0", "17.0.0", "1.3.0"):
        assert needle in s.notice
    # a rendered SVG decodes as the PNGs do: 64 px, transparent corners on white
    path = next(p for p in s.train.paths if "/openmoji-" in p)
    image = decode_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert (image[:, 0, 0] == 255).all()
    two = load_splits("emoji", REAL, emoji_artists="google,twitter")
    assert 1800 <= len(_all_names(two)) <= 1911
    assert all(len(part) == 2 * part.num_classes for part in (two.train, two.val, two.test))
