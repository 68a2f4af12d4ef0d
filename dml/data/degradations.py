r"""Image degradations that remove information: blur, downsampling and occlusion at a strength in [0, 1].

`dml.uncertainty.degradation_test` uses them to ask whether the embedding norm κ falls as images lose
information (Kirchhof et al., ECCV 2022); `dml.report` draws them. Every function takes ``[B, 3, H, W]``
float images in $[0, 1]$ on any device and returns new images of the same shape, dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEGRADATIONS", "blur", "downsample", "occlude", "degrade", "degradation_parameter"]

#: blur: σ at strength 1, as a fraction of the image's shorter side (7 px at 224 px)
BLUR_MAX_SIGMA_FRACTION = 1 / 32
#: downsample: the down-scaling factor at strength 1
DOWNSAMPLE_MAX_FACTOR = 8.0
#: occlude: the grey value of the occluder
OCCLUDE_FILL = 0.5


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """``images`` if it is a ``[B, 3, H, W]`` floating-point tensor.

    Args:
        images: the value to check.
        name: its name in the error message.

    Returns:
        ``images``.

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a [B, 3, H, W] torch.Tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating-point in [0, 1], got dtype {images.dtype}")
    return images


def check_strength(strength: object) -> float:
    """``strength`` as a float if it is a number in $[0, 1]$.

    Args:
        strength: the value to check.

    Returns:
        The strength.

    Raises:
        ValueError: otherwise.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    s = float(strength)
    if not 0 <= s <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return s


def degradation_parameter(kind: str, strength: float, height: int, width: int) -> float:
    r"""The physical parameter of a degradation of an ``height × width`` image at ``strength``.

    * ``blur``: the Gaussian σ in pixels, $\sigma = s \cdot \min(H, W) / 32$ (0 … 7 px at 224 px).
    * ``downsample``: the down-scaling factor $8^s$ (1, 1.68, 2.83, 4.76, 8 at the default levels;
      224 px → 28 px at $s = 1$).
    * ``occlude``: the occluded fraction of the area, $s$ itself (1: the whole image is grey).

    Args:
        kind: ``"blur"``, ``"downsample"`` or ``"occlude"``.
        strength: $s \in [0, 1]$.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        σ in pixels, the factor, or the area fraction.

    Raises:
        ValueError: for an unknown kind or a strength outside $[0, 1]$.
    """
    s = check_strength(strength)
    if kind == "blur":
        return s * min(height, width) * BLUR_MAX_SIGMA_FRACTION
    if kind == "downsample":
        return DOWNSAMPLE_MAX_FACTOR**s
    if kind == "occlude":
        return s
    raise ValueError(f"unknown degradation {kind!r}; valid: {', '.join(DEGRADATIONS)}")


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def blur(images: torch.Tensor, strength: float) -> torch.Tensor:
    r"""Gaussian blur with $\sigma = s \cdot \min(H, W)/32$ pixels (`degradation_parameter`).

    A separable Gaussian kernel truncated at $\lceil 3\sigma \rceil$ pixels and normalised to sum 1,
    with replicated borders; its frequency response $\approx e^{-\sigma^2\omega^2/2}$ removes ever
    more of the high frequencies as $s$ grows. Strength 0 returns an unchanged copy. Deterministic.

    Args:
        images: ``[B, 3, H, W]`` float images in $[0, 1]$ (any device).
        strength: $s \in [0, 1]$.

    Returns:
        The blurred images, same shape, dtype and device, in $[0, 1]$.

    Raises:
        ValueError: if ``images`` is not ``[B, 3, H, W]`` floating point or ``strength`` not in $[0, 1]$.
    """
    images = check_images(images)
    s = check_strength(strength)
    b, c, h, w = images.shape
    sigma = degradation_parameter("blur", s, h, w)
    if sigma == 0 or images.numel() == 0:
        return images.clone()
    k = _gaussian_kernel(sigma, images.dtype, images.device)
    r = (k.numel() - 1) // 2
    x = images.reshape(b * c, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w).clamp_(0, 1)


def downsample(images: torch.Tensor, strength: float) -> torch.Tensor:
    r"""Lose resolution: resize down by the factor $8^s$ (bilinear, antialiased), then back up (bilinear).

    The intermediate size is $\max(1, \mathrm{round}(H / 8^s)) \times \max(1, \mathrm{round}(W / 8^s))$
    (`degradation_parameter`). Strength 0 returns an unchanged copy. Deterministic.

    Args:
        images: ``[B, 3, H, W]`` float images in $[0, 1]$ (any device).
        strength: $s \in [0, 1]$.

    Returns:
        The degraded images, same shape, dtype and device, in $[0, 1]$.

    Raises:
        ValueError: if ``images`` is not ``[B, 3, H, W]`` floating point or ``strength`` not in $[0, 1]$.
    """
    images = check_images(images)
    s = check_strength(strength)
    b, c, h, w = images.shape
    factor = degradation_parameter("downsample", s, h, w)
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    if small == (h, w) or images.numel() == 0:
        return images.clone()
    x = F.interpolate(images, size=small, mode="bilinear", antialias=True, align_corners=False)
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=False, align_corners=False)
    return x.clamp_(0, 1)


def occlude(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Cover a fraction $s$ of every image with a grey (0.5) patch at a random position.

    The patch has the image's aspect ratio — a square for the square crops that the evaluation uses —
    of size $\mathrm{round}(\sqrt{s}\,H) \times \mathrm{round}(\sqrt{s}\,W)$, so it covers (up to
    rounding) the fraction $s$ of the area; $s = 1$ turns the whole image grey. Its top-left corner is
    uniform over the positions that keep it inside the image, drawn independently per image as
    $\lfloor u\,(H - h + 1) \rfloor$ with $u \sim U[0, 1)$ from ``generator``: the same generator state
    gives the same relative positions at every strength. Strength 0 returns an unchanged copy.

    Args:
        images: ``[B, 3, H, W]`` float images in $[0, 1]$ (any device).
        strength: $s \in [0, 1]$, the occluded fraction of the area.
        generator: a CPU `torch.Generator` for the positions (None: torch's global RNG). Deterministic
            for a given generator state.

    Returns:
        The occluded images, same shape, dtype and device, in $[0, 1]$.

    Raises:
        ValueError: if ``images`` is not ``[B, 3, H, W]`` floating point or ``strength`` not in $[0, 1]$.
    """
    images = check_images(images)
    s = check_strength(strength)
    b, _, h, w = images.shape
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64)  # drawn even at s = 0: same stream
    if s == 0 or images.numel() == 0:
        return images.clone()
    ph = min(h, max(1, round(math.sqrt(s) * h)))
    pw = min(w, max(1, round(math.sqrt(s) * w)))
    top = (u[:, 0] * (h - ph + 1)).floor().long().clamp_(max=h - ph).to(images.device)
    left = (u[:, 1] * (w - pw + 1)).floor().long().clamp_(max=w - pw).to(images.device)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + ph)  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + pw)  # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # [B, 1, H, W]
    return torch.where(mask, torch.full((), OCCLUDE_FILL, dtype=images.dtype, device=images.device), images)


#: name → degradation function (``occlude`` also takes a generator)
DEGRADATIONS: dict[str, Callable[..., torch.Tensor]] = {"blur": blur, "downsample": downsample, "occlude": occlude}


def degrade(kind: str, images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the degradation ``kind`` (`blur`, `downsample` or `occlude`) at ``strength``.

    Args:
        kind: a name of `DEGRADATIONS`.
        images: ``[B, 3, H, W]`` float images in $[0, 1]$.
        strength: $s \\in [0, 1]$.
        generator: for ``occlude`` (ignored by the deterministic ones).

    Returns:
        The degraded images.

    Raises:
        ValueError: for an unknown kind, or as the degradation.
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; valid: {', '.join(DEGRADATIONS)}")
    if kind == "occlude":
        return occlude(images, strength, generator)
    return DEGRADATIONS[kind](images, strength)
