"""Image decoding (onto a white background) and a map-style dataset that caches decoded images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .datasets import DatasetError, Split

# images decoded up front to estimate the cache size
_ESTIMATE_FROM = 8


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def decode_image(path: str | Path, *, max_side: int | None = None) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor.

    Transparency (RGBA, LA, PA, or a palette / RGB / L image with a transparent colour) is
    composited onto white; grayscale and palette images become three channels; 16-bit and float
    grayscale images are scaled to 8 bits (not clipped).

    Args:
        path: Image file.
        max_side: If given, downscale (antialiased) so that the shorter side is at most this.

    Returns:
        uint8 tensor of shape ``[3, H, W]``.

    Raises:
        ValueError: ``max_side`` is given and < 1.
        DatasetError: The file is missing or cannot be decoded (the message names the file).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
    try:
        with Image.open(path) as im:
            if max_side is not None and im.format == "JPEG":
                # let libjpeg decode at a reduced scale (never below the requested size): much faster
                w, h = im.size
                s = max_side / min(w, h)
                if s < 1:
                    im.draft("RGB", (max(1, round(w * s)), max(1, round(h * s))))
            im.load()
            im = _to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image {path}: {_one_line(exc)}") from None
    if max_side is not None:
        w, h = im.size
        if min(w, h) > max_side:
            s = max_side / min(w, h)
            size = (max_side, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), max_side)
            # PIL's bilinear filter widens with the scale factor, i.e. it is antialiased
            im = im.resize(size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit (``I;16``), 32-bit integer (``I``) or float (``F``) grayscale image as 8-bit ``L``.

    ``convert("RGB")`` would clip every value above 255 to white; the values are scaled instead:
    16-bit (and ``I`` images whose values exceed 255, as 16-bit PNGs may decode) by 255/65535, floats
    in [0, 1] by 255.
    """
    values = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
    else:
        top = 65535.0 if im.mode.startswith("I;16") or (values.size and values.max() > 255) else 255.0
    scaled = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8, 2-D: mode L


class ImageDataset(torch.utils.data.Dataset):
    """The images of a `Split` as ``(image, label)`` pairs, with an optional in-memory cache.

    The cache holds decoded uint8 images (after ``max_side`` downscaling, before ``transform``), so
    every epoch after the first skips decoding. It is filled lazily in the process that reads the
    images: with DataLoader worker processes each worker fills its own copy, so call `preload` before
    the workers start (forked workers then share it), or use ``persistent_workers=True``.

    Args:
        split: The images and labels.
        transform: Applied to the uint8 ``[3, H, W]`` image on every access (None: return it as is).
        max_side: If given, downscale on decode so the shorter side is at most this.
        cache: True caches every image, False never caches, None (default) caches if the size
            estimated from the first few images fits in ``cache_budget_bytes``.
        cache_budget_bytes: Memory budget of the automatic cache; never exceeded by it.

    Raises:
        ValueError: if ``max_side`` is not a positive int or None, or ``cache_budget_bytes`` < 0.
        DatasetError: if one of the first images (decoded to estimate the cache size) cannot be decoded.
    """

    def __init__(
        self,
        split: Split,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        max_side: int | None = None,
        cache: bool | None = None,
        cache_budget_bytes: int = 4 << 30,
    ) -> None:
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
            raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
        if cache_budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {cache_budget_bytes!r}")
        self.paths = split.paths
        self.labels = torch.tensor(split.labels, dtype=torch.long)
        self.transform = transform
        self.max_side = max_side
        self._cache: list[torch.Tensor | None] = [None] * len(self.paths)
        self._cached_bytes = 0
        self._budget: float | None = None  # None: no limit
        if cache is None:
            first = [self._load(i) for i in range(min(_ESTIMATE_FROM, len(self.paths)))]
            estimate = sum(x.numel() for x in first) / max(1, len(first)) * len(self.paths)
            self.cache = estimate <= cache_budget_bytes
            self._budget = cache_budget_bytes
            if self.cache:
                for i, x in enumerate(first):
                    self._store(i, x)
        else:
            self.cache = bool(cache)

    def _load(self, index: int) -> torch.Tensor:
        return decode_image(self.paths[index], max_side=self.max_side)

    def _store(self, index: int, image: torch.Tensor) -> None:
        # the estimate may be off (mixed image sizes): stop caching rather than overrun the budget
        if self._budget is not None and self._cached_bytes + image.numel() > self._budget:
            return
        self._cache[index] = image
        self._cached_bytes += image.numel()

    def image(self, index: int) -> torch.Tensor:
        """The decoded uint8 ``[3, H, W]`` image ``index`` (from the cache when it is there).

        Args:
            index: position in the split.

        Returns:
            uint8 tensor ``[3, H, W]`` (after ``max_side`` downscaling, before ``transform``).

        Raises:
            DatasetError: if the file cannot be decoded.
        """
        image = self._cache[index]
        if image is None:
            image = self._load(index)
            if self.cache:
                self._store(index, image)
        return image

    def preload(self) -> None:
        """Decode every image into the cache now (a no-op when caching is off).

        Raises:
            DatasetError: if a file cannot be decoded.
        """
        if self.cache:
            for i in range(len(self)):
                self.image(i)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
