"""dml.data: dataset splits on tiny synthetic trees (the emoji benchmark: test_emoji.py), image
decoding and caching, transforms, and the class-balanced batch sampler."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dml.data import (
    DATASETS,
    ClassBalancedBatchSampler,
    DatasetError,
    EvalTransform,
    ImageDataset,
    Split,
    TrainTransform,
    decode_image,
    load_splits,
)

# --------------------------------------------------------------------------------------------------
# helpers


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array, mode).save(path)
    return path


def class_tree(root: Path, n_classes: int, per_class: int = 3, ext: str = ".png") -> list[str]:
    names = [f"{i + 1:03d}.class_{i + 1}" for i in range(n_classes)]
    for i, name in enumerate(names):
        for j in range(per_class):
            write_image(root / name / f"img_{j}{ext}", seed=100 * i + j)
    return names


def check_splits(s, expect_val: bool = True) -> None:
    """Disjoint classes, contiguous labels, absolute paths, no image in two splits."""
    parts = [s.train, s.val, s.test]
    for part in parts:
        assert isinstance(part, Split)
        assert len(part.paths) == len(part.labels) == len(part)
        assert set(part.labels) == set(range(part.num_classes))
        assert all(Path(p).is_absolute() for p in part.paths)
    names = [set(p.class_names) for p in parts]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    paths = [set(p.paths) for p in parts]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert s.train.num_classes >= 1 and s.test.num_classes >= 1
    assert (s.val.num_classes >= 1) == expect_val


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------------
# folder


def test_folder_split(tmp_path):
    names = class_tree(tmp_path, 10)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / ".hidden").mkdir()
    write_image(tmp_path / ".hidden" / "x.png")
    (tmp_path / names[0] / "notes.txt").write_text("not an image")
    (tmp_path / names[0] / ".thumb.png").write_bytes(b"")
    write_image(tmp_path / names[1] / "upper.JPEG", seed=7)

    s = load_splits("folder", tmp_path, val_fraction=0.2, split_seed=0)
    check_splits(s)
    assert s.name == "folder" and s.notice == ""
    all_names = set(s.train.class_names) | set(s.val.class_names) | set(s.test.class_names)
    assert all_names == set(names)  # empty and hidden classes ignored
    assert s.test.num_classes == 5 and s.val.num_classes == 1 and s.train.num_classes == 4
    n_images = sum(len(p) for p in (s.train, s.val, s.test))
    assert n_images == 31  # 30 + upper-case .JPEG; .txt and hidden files ignored
    # labels follow the class names
    for part in (s.train, s.val, s.test):
        for path, label in zip(part.paths, part.labels):
            assert Path(path).parent.name == part.class_names[label]

    again = load_splits("folder", str(tmp_path), val_fraction=0.2, split_seed=0)
    assert again == s
    others = [load_splits("folder", tmp_path, split_seed=k) for k in range(1, 6)]
    assert any(o.test.class_names != s.test.class_names for o in others)

    no_val = load_splits("folder", tmp_path, val_fraction=0.0)
    check_splits(no_val, expect_val=False)
    assert len(no_val.val) == 0


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as e:
        load_splits("folder", missing)
    assert str(missing) in one_line(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as e:
        load_splits("folder", empty)
    assert str(empty) in one_line(e)

    class_tree(tmp_path / "one", 1)
    with pytest.raises(DatasetError, match="at least 2"):
        load_splits("folder", tmp_path / "one")

    class_tree(tmp_path / "two", 2)
    check_splits(load_splits("folder", tmp_path / "two", val_fraction=0), expect_val=False)
    with pytest.raises(DatasetError, match="val_fraction"):
        load_splits("folder", tmp_path / "two", val_fraction=0.2)  # 1 training class: nothing to carve

    with pytest.raises(DatasetError, match="val_fraction"):
        load_splits("folder", tmp_path / "two", val_fraction=1.0)
    with pytest.raises(DatasetError, match="data_root"):
        load_splits("folder", None)
    with pytest.raises(DatasetError) as e:
        load_splits("imagenet", tmp_path)
    assert "imagenet" in one_line(e)
    assert issubclass(DatasetError, ValueError)
    assert DATASETS == ("emoji", "folder", "cub200", "cars196", "sop")


# --------------------------------------------------------------------------------------------------
# CUB-200-2011 and Cars196


@pytest.mark.parametrize("nested", [False, True])
def test_cub200(tmp_path, nested):
    top = tmp_path / "CUB_200_2011" if nested else tmp_path
    names = class_tree(top / "images", 8, per_class=2, ext=".jpg")
    s = load_splits("cub200", tmp_path, val_fraction=0.25, split_seed=3)
    check_splits(s)
    assert s.test.class_names == tuple(names[4:])  # second half by sorted name
    assert sorted(s.train.class_names + s.val.class_names) == names[:4]
    assert s.val.num_classes == 1
    assert "CUB-200-2011" in s.notice
    assert load_splits("cub200", tmp_path, val_fraction=0.25, split_seed=3) == s

    with pytest.raises(DatasetError) as e:
        load_splits("cub200", tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere") in one_line(e)


def test_cars196_class_dirs(tmp_path):
    names = class_tree(tmp_path / "images", 6, per_class=2, ext=".jpg")
    s = load_splits("cars196", tmp_path, val_fraction=0.4, split_seed=0)
    check_splits(s)
    assert s.test.class_names == tuple(names[3:])
    assert sorted(s.train.class_names + s.val.class_names) == names[:3]


def write_cars_annos(root: Path, classes: list[int]) -> None:
    """A cars_annos.mat shaped like the original: 1×N struct array + 1×C cell of class names."""
    from scipy.io import savemat

    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O")]
    ann = np.zeros((1, len(classes)), dtype=fields + [("class", "O"), ("test", "O")])
    for i, c in enumerate(classes):
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_image(root / rel, seed=i)
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 9, 7)]
        ann[0, i] = (rel, *box, np.array([[c]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    names = np.empty((1, max(classes)), dtype=object)
    names[0, :] = [f"Make Model {c} 2012" for c in range(1, max(classes) + 1)]
    savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})


def test_cars196_mat(tmp_path):
    classes = [1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 6, 3]
    write_cars_annos(tmp_path, classes)
    s = load_splits("cars196", tmp_path, val_fraction=0.2, split_seed=0)
    check_splits(s)
    assert s.test.class_names == ("4 Make Model 4 2012", "5 Make Model 5 2012", "6 Make Model 6 2012")
    assert len(s.test) == 6 and len(s.train) + len(s.val) == 6
    assert sorted(s.train.class_names + s.val.class_names)[0] == "1 Make Model 1 2012"
    for path in s.test.paths:
        assert Path(path).parent.name == "car_ims" and Path(path).is_file()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError) as e:
        load_splits("cars196", bad)
    assert str(bad / "cars_annos.mat") in one_line(e)
    with pytest.raises(DatasetError) as e:
        load_splits("cars196", tmp_path / "car_ims")  # neither layout
    assert "cars_annos.mat" in one_line(e)


# --------------------------------------------------------------------------------------------------
# Stanford Online Products


def write_sop(root: Path) -> None:
    header = "image_id class_id super_class_id path\n"
    lines = {"train": [], "test": []}
    image_id = 0
    for c in range(1, 11):
        which = "train" if c <= 6 else "test"
        for j in range(c % 3 + 2):
            image_id += 1
            rel = f"bicycle_final/{c}_{j}.JPG"
            write_image(root / rel, seed=image_id, size=(8, 8))
            lines[which].append(f"{image_id} {c} 1 {rel}\n")
    for which, ls in lines.items():
        (root / f"Ebay_{which}.txt").write_text(header + "".join(ls))


def test_sop(tmp_path):
    write_sop(tmp_path)
    s = load_splits("sop", tmp_path, val_fraction=0.34, split_seed=1)
    check_splits(s)
    assert s.test.class_names == ("7", "8", "9", "10")
    assert sorted(s.train.class_names + s.val.class_names, key=int) == [str(c) for c in range(1, 7)]
    assert s.val.num_classes == 2
    assert all(Path(p).is_file() for p in s.test.paths)

    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError) as e:
        load_splits("sop", tmp_path)
    assert str(tmp_path / "Ebay_test.txt") in one_line(e)


# --------------------------------------------------------------------------------------------------
# decoding and ImageDataset


def test_decode_modes(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = decode_image(tmp_path / "rgba.png")
    assert x.dtype == torch.uint8 and x.shape == (3, 4, 6)
    assert (x[:, :2] == torch.tensor([200, 0, 0], dtype=torch.uint8)[:, None, None]).all()
    assert (x[:, 2:] == 255).all()

    p = Image.new("P", (5, 3), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    x = decode_image(tmp_path / "p.png")
    assert x.shape == (3, 3, 5)
    assert x[:, 0, 0].tolist() == [255, 255, 255]  # transparent palette entry → white
    assert x[:, 1, 1].tolist() == [10, 20, 30]

    Image.fromarray(np.full((3, 4), 77, dtype=np.uint8), "L").save(tmp_path / "l.png")
    x = decode_image(tmp_path / "l.png")
    assert x.shape == (3, 3, 4) and (x == 77).all()

    la = Image.fromarray(np.stack([np.full((2, 2), 0, np.uint8), np.full((2, 2), 0, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert (decode_image(tmp_path / "la.png") == 255).all()

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DatasetError) as e:
        decode_image(tmp_path / "broken.jpg")
    assert str(tmp_path / "broken.jpg") in one_line(e)
    with pytest.raises(DatasetError, match="missing.png"):
        decode_image(tmp_path / "missing.png")


def test_decode_max_side(tmp_path):
    write_image(tmp_path / "wide.jpg", size=(120, 40))
    x = decode_image(tmp_path / "wide.jpg", max_side=20)
    assert x.shape == (3, 20, 60)
    write_image(tmp_path / "tall.png", size=(30, 90))
    assert decode_image(tmp_path / "tall.png", max_side=10).shape == (3, 30, 10)
    assert decode_image(tmp_path / "tall.png", max_side=100).shape == (3, 90, 30)  # never upscales


def test_image_dataset_cache(tmp_path):
    paths = tuple(str(write_image(tmp_path / f"{i}.png", seed=i, size=(20 + i, 16))) for i in range(6))
    split = Split(paths, (0, 0, 1, 1, 2, 2), ("a", "b", "c"))
    on = ImageDataset(split, cache=True)
    off = ImageDataset(split, cache=False)
    auto = ImageDataset(split)  # tiny: fits the default budget
    tiny = ImageDataset(split, cache_budget_bytes=100)  # does not fit: decode on every access
    assert auto.cache and not tiny.cache and on.cache and not off.cache
    assert on.labels.dtype == torch.long and on.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(len(split)):
        a, ya = on[i]
        b, yb = off[i]
        c, _ = auto[i]
        d, _ = tiny[i]
        assert ya == yb == split.labels[i] and isinstance(ya, int)
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d) and a.dtype == torch.uint8
    assert all(x is not None for x in on._cache) and all(x is None for x in off._cache)
    assert on[2][0] is on[2][0]  # served from the cache

    budget = ImageDataset(split, cache=None, cache_budget_bytes=3 * 16 * 25 * 3)
    budget.preload()
    assert budget._cached_bytes <= 3 * 16 * 25 * 3

    tf = EvalTransform(8)
    x, _ = ImageDataset(split, tf, max_side=8)[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert ImageDataset(split, max_side=8)[5][0].shape == (3, 8, 12)  # 25×16 → 12.5×8, rounded


# --------------------------------------------------------------------------------------------------
# transforms


def test_eval_transform():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=g)
    tf = EvalTransform(32)
    assert tf.resize == round(32 * 256 / 224)
    out = tf(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, tf(image))
    # centre crop without resizing: the exact centre pixels
    same = EvalTransform(20, resize=40)(image)
    assert torch.allclose(same, image[:, 10:30, 20:40].float() / 255)
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(32, resize=16)
    with pytest.raises(ValueError, match="size"):
        EvalTransform(0)


def test_train_transform():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    outs = [TrainTransform(24, generator=torch.Generator().manual_seed(5))(image) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (3, 24, 24) and outs[0].dtype == torch.float32
    assert 0 <= outs[0].min() and outs[0].max() <= 1

    tf = TrainTransform(24, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(tf(image), tf(image))
    # global RNG when no generator: reproducible under torch.manual_seed
    torch.manual_seed(3)
    a = TrainTransform(24)(image)
    torch.manual_seed(3)
    assert torch.equal(a, TrainTransform(24)(image))

    # crops respect scale / ratio; the flip happens about half the time
    g = torch.Generator().manual_seed(7)
    tf = TrainTransform(8, generator=g)
    for _ in range(200):
        top, left, h, w = tf.crop_box(50, 70)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert 0.16 * 3500 * 0.9 <= h * w <= 3500
    # a left-right gradient image: flipped outputs decrease left to right
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(3, 64, 64).contiguous()
    flip_tf = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(8))
    flips = 0
    n = 400
    for _ in range(n):
        out = flip_tf(ramp)
        flips += bool(out[0, 0, 0] > out[0, 0, -1])
    assert abs(flips - n / 2) < 4 * math.sqrt(n / 4)
    no_flip = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert all(no_flip(ramp)[0, 0, 0] < no_flip(ramp)[0, 0, -1] for _ in range(20))
    # fallback central crop when no try fits (extreme aspect ratio)
    fallback = TrainTransform(8, scale=(0.99, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert fallback.crop_box(10, 100) == (0, 45, 10, 10)
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(8, scale=(0.5, 0.2))


# --------------------------------------------------------------------------------------------------
# sampler


def imbalanced_labels(seed: int = 0, n_classes: int = 23) -> list[int]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, size=n_classes)
    labels = np.repeat(np.arange(n_classes) * 3 + 5, counts)  # non-contiguous label values
    return rng.permutation(labels).tolist()


@pytest.mark.parametrize("m,batch", [(2, 8), (4, 16), (3, 12), (1, 5)])
def test_sampler_balance_and_coverage(m, batch):
    labels = imbalanced_labels()
    sampler = ClassBalancedBatchSampler(labels, batch, m, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    counts = Counter(labels)
    num_groups = sum(math.ceil(n / m) for n in counts.values())
    assert len(sampler) == math.ceil(num_groups / (batch // m))
    seen = Counter()
    n_classes_ok = len(counts) >= batch // m
    for b in batches:
        assert len(b) == batch
        groups = [b[k : k + m] for k in range(0, batch, m)]
        for grp in groups:
            assert len({labels[i] for i in grp}) == 1
        if n_classes_ok:
            assert len({labels[grp[0]] for grp in groups}) == len(groups)  # no class twice in a batch
        seen.update(b)
    assert set(seen) == set(range(len(labels)))  # every image at least once
    extra = sum(seen.values()) - len(labels)
    pad = sum(-n % m for n in counts.values())
    top_up = (len(sampler) * (batch // m) - num_groups) * m
    assert extra == pad + top_up
    # repeats within a class: only its last group's fill-up (and the top-up groups)
    assert sum(v - 1 for v in seen.values()) == extra


def test_sampler_determinism_and_epochs():
    labels = imbalanced_labels(1)
    a = ClassBalancedBatchSampler(labels, 8, 2, seed=3)
    b = ClassBalancedBatchSampler(torch.tensor(labels), 8, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    e1 = list(a)
    assert e1 != list(b)
    b.set_epoch(1)
    assert e1 == list(b)
    c = ClassBalancedBatchSampler(labels, 8, 2, seed=4)
    c.set_epoch(1)
    assert list(c) != e1


def test_sampler_replicas():
    labels = imbalanced_labels(2)
    full = ClassBalancedBatchSampler(labels, 12, 3, seed=0)
    full.set_epoch(2)
    reference = list(full)
    for replicas in (2, 3, 4):
        parts = []
        for r in range(replicas):
            s = ClassBalancedBatchSampler(labels, 12, 3, seed=0, num_replicas=replicas, rank=r)
            s.set_epoch(2)
            assert len(s) == len(full)
            parts.append(list(s))
        for k, global_batch in enumerate(reference):
            pieces = [parts[r][k] for r in range(replicas)]
            assert all(len(p) == 12 // replicas for p in pieces)
            assert sum(pieces, []) == global_batch
    # groups stay whole when the per-rank batch is a multiple of m
    s = ClassBalancedBatchSampler(labels, 12, 3, seed=0, num_replicas=2, rank=1)
    for b in s:
        assert len({labels[i] for i in b[:3]}) == 1 and len({labels[i] for i in b[3:]}) == 1


def test_sampler_small_classes_and_few_classes():
    # fewer classes than groups per batch: repeats are unavoidable but batches stay well formed
    labels = [0, 0, 0, 1, 2, 2]
    s = ClassBalancedBatchSampler(labels, 8, 2, seed=0)
    batches = list(s)
    assert len(batches) == math.ceil((2 + 1 + 1) / 4)
    for b in batches:
        assert len(b) == 8
        assert all(labels[b[k]] == labels[b[k + 1]] for k in range(0, 8, 2))
    # a class with a single image fills its group with itself
    s = ClassBalancedBatchSampler([0, 1, 1, 1, 1], 4, 4)
    groups = [tuple(b[:4]) for b in s] + [tuple(b[4:]) for b in s]
    assert (0, 0, 0, 0) in groups


def test_sampler_large_class_spread():
    """A class with as many groups as there are batches appears in every batch exactly once."""
    labels = [0] * 10 + [c for c in range(1, 16) for _ in range(2)]
    s = ClassBalancedBatchSampler(labels, 8, 2, seed=0)  # 20 groups, 4 per batch → 5 batches
    for epoch in range(5):
        s.set_epoch(epoch)
        for b in s:
            assert sum(labels[i] == 0 for i in b) == 2


def test_sampler_validation():
    with pytest.raises(ValueError, match="labels"):
        ClassBalancedBatchSampler([], 4, 2)
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassBalancedBatchSampler([0, 1], 4, 0)
    with pytest.raises(ValueError, match="batch_size"):
        ClassBalancedBatchSampler([0, 1], 6, 4)
    with pytest.raises(ValueError, match="num_replicas"):
        ClassBalancedBatchSampler([0, 1], 8, 2, num_replicas=3)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler([0, 1], 8, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler([0, 1], 8, 2, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="epoch"):
        ClassBalancedBatchSampler([0, 1], 8, 2).set_epoch(-1)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16) used to decode to an all-white image: convert("RGB") clips at 255 (issue #13)."""
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 … 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    x = decode_image(tmp_path / "g16.png")
    assert x.shape == (3, 32, 32) and (x[0] == x[1]).all() and (x[1] == x[2]).all()
    expected = torch.from_numpy(np.round(ramp / 257.0).astype(np.uint8))
    assert (x[0].int() - expected.int()).abs().max() <= 1
    assert x.float().std() > 50  # a ramp, not a white square
    floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "F")
    floats.save(tmp_path / "f.tiff")
    y = decode_image(tmp_path / "f.tiff")
    assert y[0, 0, 0] == 0 and y[0, 3, 3] == 255
