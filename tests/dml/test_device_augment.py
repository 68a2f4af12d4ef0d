"""dml.data.device_augment: batched crops on the device against the per-image transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dml.data import DeviceImageBank, EvalTransform, Split, center_crop, decode_image, random_resized_crop


def _images(b=6, h=20, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def test_full_crop_without_flip_is_the_identity():
    x = _images()
    out = random_resized_crop(x, 20, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(out, x.float() / 255, rtol=0, atol=1e-6)


def test_flip_mirrors_about_half_of_the_batch():
    x = _images(b=400, h=8, w=8)
    out = random_resized_crop(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True,
                              generator=torch.Generator().manual_seed(1))
    plain, mirrored = x.float() / 255, torch.flip(x, dims=[-1]).float() / 255
    is_plain = torch.isclose(out, plain, atol=1e-6).flatten(1).all(1)
    is_mirror = torch.isclose(out, mirrored, atol=1e-6).flatten(1).all(1)
    assert bool((is_plain ^ is_mirror).all())
    # Binomial(400, 1/2): mean 200, s.d. 10; 5 s.d. either side
    assert 150 <= int(is_mirror.sum()) <= 250


def test_crop_geometry_matches_the_sampled_area_and_ratio():
    """On a horizontal ramp, the values a crop spans are its width; on a vertical ramp its height."""
    side = 64
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    horizontal = ramp.view(1, 1, 1, side).expand(300, 3, side, side).contiguous()
    g = torch.Generator().manual_seed(3)
    out = random_resized_crop(horizontal, 32, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), flip=False, generator=g)
    width = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) * side / (side - 1)  # fraction of the side (ramp slope 1/(side-1))
    # sampled width = sqrt(area * ratio) within [sqrt(0.16 * 3/4), 1]; the sampling grid loses < 1 px per side
    assert float(width.min()) > (0.16 * 0.75) ** 0.5 - 2 / side
    assert float(width.max()) <= 1.0 + 1e-6
    assert float(width.std()) > 0.1  # it varies


def test_deterministic_for_a_seeded_generator():
    x = _images()
    a = random_resized_crop(x, 12, generator=torch.Generator().manual_seed(5))
    b = random_resized_crop(x, 12, generator=torch.Generator().manual_seed(5))
    c = random_resized_crop(x, 12, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, 12, 12) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1


@pytest.mark.parametrize("size", [32, 24])
def test_bank_centre_crop_equals_the_eval_transform(tmp_path, size):
    paths = []
    for i, (h, w) in enumerate([(40, 60), (64, 48), (50, 50)]):
        # smooth content: the two paths may place the crop half a pixel apart (rounding of the offsets)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([128 + 100 * np.sin(xx / 9 + c) * np.cos(yy / 11 - c) for c in range(3)], axis=-1)
        p = tmp_path / f"{i}.png"
        Image.fromarray(img.round().astype(np.uint8)).save(p)
        paths.append(str(p))
    split = Split(paths=tuple(paths), labels=(0, 0, 1), class_names=("a", "b"))
    side = round(size * 256 / 224)
    bank = DeviceImageBank(split, side, "cpu")
    assert bank.images.shape == (3, 3, side, side) and bank.images.dtype == torch.uint8
    ours = center_crop(bank.images, size)
    reference = torch.stack([EvalTransform(size)(decode_image(p, max_side=side)) for p in paths])
    # uint8 storage (1/255) plus at most a one-pixel offset in x and in y of a pattern whose slope is at most
    # 100 (1/9 + 1/11) / 255 per original pixel, i.e. that times (shorter side / side) per resized pixel
    shrink = max(min(h, w) for h, w in [(40, 60), (64, 48), (50, 50)]) / side
    torch.testing.assert_close(ours, reference, rtol=0, atol=1 / 255 + 100 * (1 / 9 + 1 / 11) / 255 * shrink)
    assert bank.labels.tolist() == [0, 0, 1]
