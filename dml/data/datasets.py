"""Class-disjoint retrieval splits (train / val / test) of the supported image datasets.

Every loader returns a `Splits`: three `Split`s whose classes never overlap. The validation classes
are always carved from the training classes by a permutation seeded with ``split_seed`` (independent
of the training seed), so a split is reproducible and never depends on the filesystem's order.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("emoji", "folder", "cub200", "cars196", "sop")

#: file extensions (lower case) that the folder-style loaders treat as images
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

# how many image paths the big-list loaders check up front (SOP has 120k files)
_PROBE = 5


class DatasetError(ValueError):
    """A dataset cannot be loaded: bad argument, missing path or malformed annotation (one-line message)."""


@dataclass(frozen=True)
class Split:
    """The images of one split and their labels.

    Attributes:
        paths: Absolute image paths.
        labels: Label of each image, contiguous ``0 .. num_classes - 1`` within this split.
        class_names: Name of each class; the index is the label.
        domains: The domain of each image where a dataset has them (the artist of an emoji picture), for
            the cross-domain metrics; empty otherwise.

    Raises:
        DatasetError: if ``paths`` and ``labels`` (or non-empty ``domains``) differ in length or a label
            is outside ``0 .. len(class_names) - 1``.
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    domains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"Split has {len(self.paths)} paths but {len(self.labels)} labels")
        if self.domains and len(self.domains) != len(self.paths):
            raise DatasetError(f"Split has {len(self.paths)} paths but {len(self.domains)} domains")
        if any(not 0 <= y < len(self.class_names) for y in self.labels):
            raise DatasetError(f"Split labels must lie in 0..{len(self.class_names) - 1}")

    @property
    def num_classes(self) -> int:
        """Number of classes in this split."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Splits:
    """The class-disjoint train / val / test splits of one dataset.

    Attributes:
        name: Dataset name (one of `DATASETS`).
        train: Training split.
        val: Validation split (classes carved from the training classes; may be empty).
        test: Test split.
        notice: Licence / attribution text to print and save with results (``''`` if none).
        summary: What the loader kept and left out, for the run's log (``''`` if nothing to say).
    """

    name: str
    train: Split
    val: Split
    test: Split
    notice: str
    summary: str = ""


# --------------------------------------------------------------------------------------------------
# class splitting


def _seeded_order(names: Sequence[str], seed: int) -> list[str]:
    """A permutation of ``names`` that depends only on (seed, the names themselves).

    Sorting by a keyed hash is stable across Python / numpy / torch versions and platforms, and
    it does not depend on the input order.
    """
    return sorted(sorted(names), key=lambda n: hashlib.sha256(f"{seed}\0{n}".encode()).digest())


def _val_count(n_train: int, val_fraction: float) -> int:
    if val_fraction == 0:
        return 0
    if n_train < 2:
        raise DatasetError(
            f"val_fraction={val_fraction} needs at least 2 training classes to carve validation classes from; "
            f"there are {n_train}"
        )
    # at least one validation class, at least one training class left
    return min(max(1, math.floor(val_fraction * n_train + 0.5)), n_train - 1)


def _carve_val(train_names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(remaining train names, val names), both in the input order."""
    n_val = _val_count(len(train_names), val_fraction)
    val = set(_seeded_order(train_names, seed)[:n_val])
    return [n for n in train_names if n not in val], [n for n in train_names if n in val]


def _half_split(names: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """(train names, test names): a seeded half of the classes go to test; both sorted."""
    n_test = len(names) // 2
    order = _seeded_order(names, seed)
    return sorted(order[n_test:]), sorted(order[:n_test])


def _make_split(names: Sequence[str], items: dict[str, list[str]], domain_of: dict[str, str] | None = None) -> Split:
    """A `Split` of the classes ``names`` (label = position in ``names``); ``domain_of`` maps paths to domains."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        paths.extend(items[name])
        labels.extend([label] * len(items[name]))
    domains = tuple(domain_of[p] for p in paths) if domain_of else ()
    return Split(tuple(paths), tuple(labels), tuple(names), domains)


def _build(
    name: str,
    items: dict[str, list[str]],
    train_names: Sequence[str],
    test_names: Sequence[str],
    val_fraction: float,
    split_seed: int,
    notice: str,
    summary: str = "",
    domain_of: dict[str, str] | None = None,
) -> Splits:
    train_names, val_names = _carve_val(train_names, val_fraction, split_seed)
    return Splits(
        name=name,
        train=_make_split(train_names, items, domain_of),
        val=_make_split(val_names, items, domain_of),
        test=_make_split(test_names, items, domain_of),
        notice=notice,
        summary=summary,
    )


# --------------------------------------------------------------------------------------------------
# small filesystem helpers


def _abs(path: str | Path) -> str:
    return str(Path(path).absolute())


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a directory")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _class_dirs(root: Path) -> dict[str, list[str]]:
    """{class dir name: sorted absolute image paths} of the non-hidden subdirectories that hold images."""
    items = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(_abs(p) for p in d.iterdir() if _is_image(p))
        if images:
            items[d.name] = images
    return items


def _need_classes(items: dict[str, list[str]], where: Path, at_least: int = 2) -> None:
    if len(items) < at_least:
        raise DatasetError(
            f"{where} has {len(items)} classes with images ({'/'.join(sorted(IMAGE_EXTENSIONS))}); "
            f"need at least {at_least}"
        )


# --------------------------------------------------------------------------------------------------
# folder, CUB-200-2011, Cars196, Stanford Online Products


def _load_folder(root: Path, val_fraction: float, split_seed: int) -> Splits:
    _require_dir(root, "data_root")
    items = _class_dirs(root)
    _need_classes(items, root)
    train, test = _half_split(list(items), split_seed)
    return _build("folder", items, train, test, val_fraction, split_seed, "")


def _natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers ("class_2" < "class_10"); zero-padded names keep their order."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _first_half(name: str, items: dict[str, list[str]], val_fraction: float, split_seed: int, notice: str) -> Splits:
    """The standard protocol: sorted classes, first half train (val carved from it), second half test."""
    names = sorted(items, key=_natural_key)  # "2" before "10": unpadded numbered folders keep their order
    n_train = len(names) - len(names) // 2
    return _build(name, items, names[:n_train], names[n_train:], val_fraction, split_seed, notice)


_CUB_NOTICE = (
    "CUB-200-2011 (Wah, Branson, Welinder, Perona, Belongie; Caltech 2011): images from Flickr, "
    "for non-commercial research and educational purposes only."
)
_CARS_NOTICE = (
    "Cars196 / Stanford Cars (Krause, Stark, Deng, Fei-Fei; 3dRR 2013): images from the web, "
    "for non-commercial research purposes only."
)
_SOP_NOTICE = (
    "Stanford Online Products (Oh Song, Xiang, Jegelka, Savarese; CVPR 2016): product images from eBay, "
    "for non-commercial research purposes only."
)


def _load_cub(root: Path, val_fraction: float, split_seed: int) -> Splits:
    _require_dir(root, "data_root")
    for images in (root / "images", root / "CUB_200_2011" / "images"):
        if images.is_dir():
            break
    else:
        raise DatasetError(f"data_root {root} has neither images/ nor CUB_200_2011/images/ (CUB-200-2011 layout)")
    items = _class_dirs(images)
    _need_classes(items, images)
    return _first_half("cub200", items, val_fraction, split_seed, _CUB_NOTICE)


def _mat_scalar(value):
    """The single element of a (possibly nested) loadmat value."""
    import numpy as np

    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"expected one element, got shape {value.shape}")
        value = value.reshape(-1)[0]
    return value


def _load_cars_mat(root: Path, mat: Path, val_fraction: float, split_seed: int) -> Splits:
    from scipy.io import loadmat

    try:
        m = loadmat(str(mat))
        annotations = m["annotations"].reshape(-1)
        rel = [str(_mat_scalar(a["relative_im_path"])) for a in annotations]
        cls = [int(_mat_scalar(a["class"])) for a in annotations]
        raw_names = [str(_mat_scalar(c)) for c in m["class_names"].reshape(-1)] if "class_names" in m else []
    except Exception as exc:  # noqa: BLE001 - any malformed file is reported the same way
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"cannot read annotations (relative_im_path, class) from {mat}: {msg}") from None
    if not rel:
        raise DatasetError(f"{mat} has no annotations")
    # relative_im_path is "car_ims/000001.jpg" in the original; accept it relative to car_ims/ too
    base = root if (root / rel[0]).is_file() else root / "car_ims"
    for r in rel[:_PROBE]:
        _require_file(base / r, "image")
    ids = sorted(set(cls))
    width = len(str(ids[-1]))
    names = {
        c: (f"{c:0{width}d} {raw_names[c - 1]}" if 0 < c <= len(raw_names) else f"{c:0{width}d}") for c in ids
    }
    items: dict[str, list[str]] = {names[c]: [] for c in ids}
    for r, c in zip(rel, cls):
        items[names[c]].append(_abs(base / r))
    ordered = [names[c] for c in ids]  # by class id (1..196), which is also the sorted name order
    _need_classes(items, mat)
    n_train = len(ordered) - len(ordered) // 2
    return _build("cars196", items, ordered[:n_train], ordered[n_train:], val_fraction, split_seed, _CARS_NOTICE)


def _load_cars(root: Path, val_fraction: float, split_seed: int) -> Splits:
    _require_dir(root, "data_root")
    if (root / "images").is_dir():
        items = _class_dirs(root / "images")
        _need_classes(items, root / "images")
        return _first_half("cars196", items, val_fraction, split_seed, _CARS_NOTICE)
    if (root / "cars_annos.mat").is_file():
        return _load_cars_mat(root, root / "cars_annos.mat", val_fraction, split_seed)
    raise DatasetError(
        f"data_root {root} has neither images/<class dirs> nor cars_annos.mat + car_ims/ (Cars196 layouts)"
    )


def _read_ebay(path: Path) -> dict[int, list[str]]:
    """{class_id: [relative image paths]} of one Ebay_*.txt file."""
    _require_file(path, "SOP annotation file")
    items: dict[int, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        header = f.readline().split()
        if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
            raise DatasetError(f"{path} does not start with the header 'image_id class_id super_class_id path'")
        for lineno, line in enumerate(f, start=2):
            fields = line.split()
            if not fields:
                continue
            try:
                items.setdefault(int(fields[1]), []).append(fields[3])
            except (IndexError, ValueError):
                raise DatasetError(f"{path}:{lineno}: expected 'image_id class_id super_class_id path'") from None
    if not items:
        raise DatasetError(f"{path} lists no images")
    return items


def _load_sop(root: Path, val_fraction: float, split_seed: int) -> Splits:
    _require_dir(root, "data_root")
    parts = {which: _read_ebay(root / f"Ebay_{which}.txt") for which in ("train", "test")}
    overlap = parts["train"].keys() & parts["test"].keys()
    if overlap:
        raise DatasetError(f"{root}: class_id {min(overlap)} is in both Ebay_train.txt and Ebay_test.txt")
    # check a few images only: SOP has 120k files
    for part in parts.values():
        for rel in list(part.values())[0][:_PROBE]:
            _require_file(root / rel, "image")
    items: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    for which, part in parts.items():
        names[which] = [str(c) for c in sorted(part)]
        for c in sorted(part):
            items[str(c)] = [_abs(root / rel) for rel in part[c]]
    return _build("sop", items, names["train"], names["test"], val_fraction, split_seed, _SOP_NOTICE)


# --------------------------------------------------------------------------------------------------


def load_splits(
    dataset: str,
    data_root: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    emoji_artists: str | Sequence[str] | None = None,
) -> Splits:
    """Load the class-disjoint train / val / test splits of a dataset.

    Protocols: ``emoji`` and ``folder`` put a seeded half of the classes in test; ``cub200`` and
    ``cars196`` use the first half of the (sorted) classes for training and the second for test;
    ``sop`` uses ``Ebay_train.txt`` / ``Ebay_test.txt``. In every case the validation classes are a
    seeded ``val_fraction`` of the training classes (at least one when ``val_fraction > 0``).

    Args:
        dataset: One of `DATASETS`.
        data_root: Dataset directory. For ``emoji`` the ``node_modules`` directory (or one containing
            it); None looks it up with `default_emoji_root`. Required for the other datasets.
        val_fraction: Fraction of the training classes moved to validation, in ``[0, 1)``.
        split_seed: Seed of the class permutations (independent of the training seed).
        emoji_artists: ``emoji`` only: the artists whose renderings are a class's images (names from
            `dml.data.emoji.EMOJI_ARTISTS`, a comma-separated string or a sequence; None: all four).

    Returns:
        The splits and the dataset's licence / attribution notice.

    Raises:
        DatasetError: Unknown dataset, bad argument, or a missing / malformed path (one-line message).
    """
    if dataset not in DATASETS:
        raise DatasetError(f"dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise DatasetError(f"split_seed must be an int, got {split_seed!r}")
    if dataset == "emoji":
        from .emoji import DEFAULT_EMOJI_ARTISTS, load_emoji  # emoji builds on this module

        return load_emoji(data_root, val_fraction, split_seed,
                          DEFAULT_EMOJI_ARTISTS if emoji_artists is None else emoji_artists)
    if emoji_artists is not None:
        raise DatasetError(f"emoji_artists applies to the emoji dataset only, not {dataset!r}")
    if data_root is None:
        raise DatasetError(f"data_root is required for dataset {dataset!r} (pass --data-root)")
    loader = {"folder": _load_folder, "cub200": _load_cub, "cars196": _load_cars, "sop": _load_sop}[dataset]
    return loader(Path(data_root).expanduser(), val_fraction, split_seed)
