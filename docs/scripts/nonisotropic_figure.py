"""Render docs/img/nonisotropic_s2.png: two non-isotropic vMFs on S² and an isotropic vMF.

    .venv/bin/python docs/scripts/nonisotropic_figure.py [--out docs/img/nonisotropic_s2.png]

Two equirectangular maps (longitude −180°…180° left to right, latitude 90°…−90° top to bottom, a grey
graticule every 30°), one above the other, all with μ = (1, 1, 1)/√3:

* top: NonIsotropicVMF(μ, k) with k = (2, 20, 80) (strongly anisotropic);
* middle: NonIsotropicVMF(μ, k) with k = (10, 20, 40) (mildly anisotropic);
* bottom: VonMisesFisher(μ, ‖Kμ‖) for the top panel's K, the isotropic vMF with the same direction and
  the same base concentration.

Colour is the log density (viridis), clipped to the 12 nats below the largest maximum, on the same scale
in all panels; red dots are 300 samples from ``rsample``; the white cross marks μ. The script also prints the
integral of each density over the sphere (quadrature on a fine grid; it should be 1) and, for comparison,
the mass of the unnormalised form that uses −log‖θ‖ in place of the Jacobian term −p log‖Kx‖.

matplotlib is not a dependency of this project, so the PNG is written with numpy and zlib.
"""

from __future__ import annotations

import argparse
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from vmf_dists import NonIsotropicVMF, VonMisesFisher, vmf_log_normalizer

VIRIDIS = np.array(
    [
        (68, 1, 84),
        (72, 40, 120),
        (62, 74, 137),
        (49, 104, 142),
        (38, 130, 142),
        (31, 158, 137),
        (53, 183, 121),
        (109, 205, 89),
        (180, 222, 44),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 array as an 8-bit RGB PNG (no filtering, zlib level 9)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def colormap(t: np.ndarray) -> np.ndarray:
    """t in [0, 1] → uint8 RGB by piecewise-linear viridis."""
    pos = np.clip(t, 0.0, 1.0) * (len(VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    return np.round(VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac).astype(np.uint8)


def sphere_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell-centre points [H, W, 3] of an equirectangular grid, their longitudes and latitudes (radians)."""
    lon = (np.arange(width) + 0.5) / width * 2 * math.pi - math.pi
    lat = math.pi / 2 - (np.arange(height) + 0.5) / height * math.pi
    lon2, lat2 = np.meshgrid(lon, lat)
    points = np.stack([np.cos(lat2) * np.cos(lon2), np.cos(lat2) * np.sin(lon2), np.sin(lat2)], axis=-1)
    return points, lon2, lat2


def to_pixel(points: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    lon = np.arctan2(points[:, 1], points[:, 0])
    lat = np.arcsin(np.clip(points[:, 2], -1, 1))
    col = np.floor((lon + math.pi) / (2 * math.pi) * width).astype(int).clip(0, width - 1)
    row = np.floor((math.pi / 2 - lat) / math.pi * height).astype(int).clip(0, height - 1)
    return row, col


def integral(log_density, width: int = 2400, height: int = 1200) -> float:
    """∫_{S²} exp(log_density(x)) dx by the midpoint rule in (longitude, latitude)."""
    points, _, lat = sphere_grid(width, height)
    values = np.exp(log_density(torch.from_numpy(points)).numpy())
    cell = (2 * math.pi / width) * (math.pi / height)
    return float((values * np.cos(lat)).sum() * cell)


def panel(log_density: np.ndarray, samples: np.ndarray, mu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    height, width = log_density.shape
    img = colormap((log_density - lo) / (hi - lo))
    for deg in range(-150, 181, 30):  # meridians
        col = int(round((deg + 180) / 360 * width))
        if 0 <= col < width:
            img[:, col] = (img[:, col] // 2 + 64).astype(np.uint8)
    for deg in (-60, -30, 0, 30, 60):  # parallels
        row = int(round((90 - deg) / 180 * height))
        img[row, :] = (img[row, :] // 2 + 64).astype(np.uint8)
    rows, cols = to_pixel(samples, width, height)
    for r, c in zip(rows, cols):
        img[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = (230, 30, 30)
    (r,), (c,) = to_pixel(mu[None], width, height)
    for d in range(-6, 7):
        img[min(max(r + d, 0), height - 1), c] = (255, 255, 255)
        img[r, min(max(c + d, 0), width - 1)] = (255, 255, 255)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "img" / "nonisotropic_s2.png"))
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--k", type=float, nargs=3, default=[2.0, 20.0, 80.0])
    parser.add_argument("--k-mild", type=float, nargs=3, default=[10.0, 20.0, 40.0])
    args = parser.parse_args()
    width, height = args.width, args.width // 2

    torch.manual_seed(0)
    mu = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3.0)
    k = torch.tensor(args.k, dtype=torch.float64)
    k_mild = torch.tensor(args.k_mild, dtype=torch.float64)
    theta_norm = torch.linalg.vector_norm(k * mu)
    dists = {
        f"NonIsotropicVMF(μ, k = {tuple(args.k)})": NonIsotropicVMF(mu, k),
        f"NonIsotropicVMF(μ, k = {tuple(args.k_mild)})": NonIsotropicVMF(mu, k_mild),
        f"VonMisesFisher(μ, ‖Kμ‖ = {theta_norm.item():.2f})": VonMisesFisher(mu, theta_norm),
    }

    def paper_form(x: torch.Tensor) -> torch.Tensor:  # −log‖θ‖ instead of the Jacobian's −p log‖Kx‖
        kx = k * x
        kx_norm = torch.linalg.vector_norm(kx, dim=-1)
        theta = k * mu
        return vmf_log_normalizer(3, theta_norm) + (kx @ theta) / kx_norm + torch.log(k).sum() - torch.log(theta_norm)

    print("μ = (1, 1, 1)/√3")
    for name, d in dists.items():
        print(f"∫ {name} = {integral(d.log_prob):.6f}")
    print(f"∫ exp(log C(‖θ‖) + θᵀKx/‖Kx‖ + Σ log k − log ‖θ‖), k = {tuple(args.k)}: "
          f"{integral(paper_form):.4f} (unnormalised form)")

    points, _, _ = sphere_grid(width, height)
    grid = torch.from_numpy(points)
    log_densities = [d.log_prob(grid).numpy() for d in dists.values()]
    hi = max(ld.max() for ld in log_densities)
    lo = hi - 12.0
    for name, ld in zip(dists, log_densities):
        (r,), (c,) = np.unravel_index([ld.argmax()], ld.shape)
        _, lon, lat = sphere_grid(width, height)
        print(f"{name}: max log density {ld.max():.2f} at lon {math.degrees(lon[r, c]):.0f}°, "
              f"lat {math.degrees(lat[r, c]):.0f}°")
    mu_lat = math.degrees(math.asin(1 / math.sqrt(3)))
    print(f"colour range [{lo:.2f}, {hi:.2f}]; μ is at lon 45°, lat {mu_lat:.1f}°")
    gap = np.full((8, width, 3), 255, dtype=np.uint8)
    panels = []
    for d, ld in zip(dists.values(), log_densities):
        panels += [panel(ld, d.rsample((args.samples,)).numpy(), mu.numpy(), lo, hi), gap]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(out, np.concatenate(panels[:-1], axis=0))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
