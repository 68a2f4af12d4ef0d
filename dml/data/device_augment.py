r"""Batched augmentation on the device: images kept as uint8 tensors on the GPU, random-resized crops and
flips done by one ``affine_grid`` + ``grid_sample`` per batch (no per-image Python work, no host sync).

`DeviceImageBank` decodes a split once into a ``[N, 3, R, R]`` uint8 tensor on the device
(shorter side resized to $R$, centre-cropped: the region the evaluation transform also sees), and
`random_resized_crop` draws, for every image of a batch, an area fraction $s \sim U(\text{scale})$ and a
log-uniform aspect ratio $r$, giving a crop of width $\sqrt{s r}$ and height $\sqrt{s/r}$ (in units of
the image side, clipped to 1) at a uniform position, mirrored with probability ½ — the distribution of
`dml.data.TrainTransform` without its rejection loop (out-of-range sizes are clipped instead of
redrawn). Bilinear sampling without antialiasing: crops are upsampled or mildly downsampled
(the bank is stored at $R = \mathrm{round}(256/224 \cdot S)$ for output size $S$, as the evaluation
resize of `dml.data.EvalTransform`, so `center_crop` of the bank is its evaluation view).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .datasets import Split
from .images import decode_image

__all__ = ["DeviceImageBank", "center_crop", "random_resized_crop"]


def _square(image: torch.Tensor, side: int) -> torch.Tensor:
    """Resize the shorter side to ``side`` (antialiased) and centre-crop to ``side × side`` (uint8 in, uint8 out)."""
    _, h, w = image.shape
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return resized[:, top:top + side, left:left + side].round().clamp(0, 255).to(torch.uint8)


class DeviceImageBank:
    """All images of a split as one uint8 tensor ``[N, 3, R, R]`` on ``device``.

    Args:
        split: the images (`dml.data.Split`).
        side: the stored side $R$.
        device: where the tensor lives (a GPU: about $3R^2$ bytes per image, 0.2 MB at $R = 256$).

    Attributes:
        images: the uint8 tensor ``[N, 3, R, R]``.
        labels: int64 labels ``[N]`` on the device.
    """

    def __init__(self, split: Split, side: int, device: torch.device | str):
        if side < 1:
            raise ValueError(f"side must be a positive integer, got {side}")
        images = torch.empty((len(split), 3, side, side), dtype=torch.uint8)
        for i, path in enumerate(split.paths):
            images[i] = _square(decode_image(path, max_side=side), side)
        self.images = images.to(device)
        self.labels = torch.as_tensor(split.labels, dtype=torch.long, device=device)

    @staticmethod
    def nbytes(num_images: int, side: int) -> int:
        """Memory the bank of ``num_images`` images at side ``side`` needs."""
        return num_images * 3 * side * side


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def random_resized_crop(images: torch.Tensor, size: int, *, scale: tuple[float, float] = (0.16, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                        generator: torch.Generator | None = None,
                        draws: tuple[int, int] | None = None) -> torch.Tensor:
    """Random-resized crops (+ horizontal flips) of a batch, as float32 ``[B, 3, size, size]`` in [0, 1].

    Args:
        images: ``[B, 3, H, W]`` uint8 (or float in [0, 1]) on any device.
        size: output side $S$.
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
        flip: mirror each crop with probability ½.
        generator: a generator on ``images.device`` (seeded for reproducible crops); default: the global RNG.
        draws: ``(total, offset)``: draw the parameters of ``total`` crops and use those from ``offset`` on —
            so a process holding part of a global batch gets the crops a single process would give
            those images (default: ``(B, 0)``).

    Returns:
        Float32 tensor ``[B, 3, S, S]`` in [0, 1].
    """
    b = images.shape[0]
    device = images.device
    total, offset = draws if draws is not None else (b, 0)
    window = slice(offset, offset + b)
    u = torch.rand((4, total), generator=generator, device=device, dtype=torch.float32)[:, window]
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (u[2] * (1 - width) + width / 2) * 2 - 1  # centre in [-1, 1] coordinates
    cy = (u[3] * (1 - height) + height / 2) * 2 - 1
    sign = torch.ones(b, device=device)
    if flip:
        mirror = torch.rand(total, generator=generator, device=device)[window] < 0.5
        sign = torch.where(mirror, -sign, sign)
    theta = torch.zeros((b, 2, 3), device=device, dtype=torch.float32)
    theta[:, 0, 0] = width * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    out = F.grid_sample(_to_float(images), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of bank images: the central ``224/256`` of the side resized to ``size``.

    Args:
        images: ``[B, 3, R, R]`` uint8 (or float in [0, 1]).
        size: output side $S$.

    Returns:
        Float32 ``[B, 3, S, S]`` in [0, 1].
    """
    side = images.shape[-1]
    crop = min(side, round(side * 224 / 256))
    top = (side - crop) // 2
    window = _to_float(images[..., top:top + crop, top:top + crop])
    if crop == size:
        return window
    return F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
