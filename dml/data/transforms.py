"""Torch-only image transforms: uint8 ``[3, H, W]`` in, float32 ``[3, S, S]`` in ``[0, 1]`` out.

Random draws come from the given ``torch.Generator`` or, without one, from torch's global RNG, so
that a trainer restoring its saved RNG state reproduces the augmentations exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _to_float(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3:
        raise ValueError(f"image must have shape [C, H, W], got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255)
    return image.to(torch.float32)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float [C, H, W] image; clamped to [0, 1]."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp_(0, 1)


class TrainTransform:
    """RandomResizedCrop to ``size × size`` followed by a random horizontal flip.

    The crop follows the standard algorithm: up to 10 tries of an area fraction uniform in ``scale``
    and an aspect ratio log-uniform in ``ratio``; if none fits, a central crop with the aspect ratio
    clamped to ``ratio``.

    Args:
        size: Output side S.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).
        flip: Flip horizontally with probability 0.5.
        generator: Source of randomness; None uses torch's global RNG.

    Raises:
        ValueError: if ``size`` is not a positive int, or ``scale`` / ``ratio`` are not increasing
            ranges with ``0 < scale[0]`` and ``scale[1] <= 1``, resp. ``0 < ratio[0]``.

    References:
        C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015 (the random-resized-crop
        augmentation).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.16, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _check_size("size", size)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {tuple(scale)!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {tuple(ratio)!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = flip
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=self.generator))

    def _randint(self, high: int) -> int:
        """Uniform in 0 .. high (inclusive)."""
        return int(torch.randint(0, high + 1, (1,), generator=self.generator))

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw a crop ``(top, left, h, w)`` for an image of the given size.

        Args:
            height: image height in pixels.
            width: image width in pixels.

        Returns:
            ``(top, left, h, w)`` of a crop inside the image.
        """
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return self._randint(height - h), self._randint(width - w), h, w
        # fallback: the largest central crop whose aspect ratio lies in `ratio`
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Crop, resize and maybe flip one image.

        Args:
            image: uint8 ``[3, H, W]`` (or float in ``[0, 1]``).

        Returns:
            float32 ``[3, size, size]`` in ``[0, 1]``.

        Raises:
            ValueError: if ``image`` is not 3-D.
        """
        x = _to_float(image)
        top, left, h, w = self.crop_box(x.shape[-2], x.shape[-1])
        x = _resize(x[:, top : top + h, left : left + w], self.size, self.size)
        if self.flip and float(torch.rand(1, generator=self.generator)) < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


def eval_resize(size: int) -> int:
    """The shorter side images are resized to before a central ``size × size`` crop: ``round(size · 256/224)``
    (the usual ImageNet ratio; 256 for 224-pixel crops). Also the side images are decoded and stored at."""
    return round(size * 256 / 224)


class EvalTransform:
    """Resize the shorter side to ``resize``, then take the central ``size × size`` crop.

    Args:
        size: Output side S.
        resize: Shorter side after resizing; default ``round(size * 256 / 224)`` (the usual ImageNet
            ratio). Must be at least ``size``.

    Raises:
        ValueError: if ``size`` or ``resize`` is not a positive int, or ``resize < size``.
    """

    def __init__(self, size: int, resize: int | None = None) -> None:
        self.size = _check_size("size", size)
        self.resize = eval_resize(size) if resize is None else _check_size("resize", resize)
        if self.resize < self.size:
            raise ValueError(f"resize must be >= size ({self.size}), got {self.resize}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop one image.

        Args:
            image: uint8 ``[3, H, W]`` (or float in ``[0, 1]``).

        Returns:
            float32 ``[3, size, size]`` in ``[0, 1]``.

        Raises:
            ValueError: if ``image`` is not 3-D.
        """
        x = _to_float(image)
        height, width = x.shape[-2:]
        if height <= width:
            new_h, new_w = self.resize, max(self.resize, round(width * self.resize / height))
        else:
            new_h, new_w = max(self.resize, round(height * self.resize / width)), self.resize
        x = _resize(x, new_h, new_w)
        top = int(round((new_h - self.size) / 2))
        left = int(round((new_w - self.size) / 2))
        return x[:, top : top + self.size, left : left + self.size].contiguous()

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize={self.resize})"
