"""Accuracy table of vmf_dists.special against mpmath on the issue's (p, κ) grid.

    .venv/bin/python benchmarks/accuracy.py            # prints a markdown table (≈ 1 min on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --parts    # the Bessel kernel's five parts, in ulps (≈ 10 s)

For each dimension p it reports the worst error over κ ∈ {0, 1e-8, 1e-7, …, 1e8} of

* log C_p(κ): |ours − mpmath| / max(1, |log C_p|), in float64 and float32;
* A_p(κ) (= −d/dκ log C_p, what the backward returns): relative error, float64 and float32;
* A_p'(κ) (the backward of A_p): relative error, float64.

The references are mpmath.besseli at 50 significant digits (`maxterms` raised so it converges for
large orders at large arguments). The tests (tests/test_special.py) assert the same bounds.

``--parts`` measures the float64 kernel underneath (`vmf_dists._bessel_table.bessel_parts`) directly, for
orders ν from 0 to 1023 and 193 log-spaced x in [1e-6, 1e6] plus four points around the seam of its two
expansions (√(ν² + x²) = 24), in units of 2⁻⁵² (one ulp at 1): L = log I_ν(x) − ν log x − x relative to
max(1, |L|); R = I_{ν+1}/I_ν, 1 − R, R' = dR/dx and G = log ₀F₁(;ν+1;x²/4) relative to themselves. Two
paths: the per-order table (a Python-number order, what every distribution uses) and the expansions it is
built from (a tensor of orders).
"""

from __future__ import annotations

import argparse
import math

import mpmath as mp
import torch

from vmf_dists._bessel_table import bessel_parts
from vmf_dists.special import mean_resultant_length, vmf_log_normalizer

DIMS = [2, 3, 4, 5, 7, 8, 16, 31, 64, 100, 128, 255, 256, 512, 1000, 1024, 2048, 4096, 8192]
KAPPAS = [0.0] + [10.0**e for e in range(-8, 9)]


def reference(dim: int, kappa: float) -> tuple[float, float, float]:
    """(log C_p, A_p, A_p') at 50 digits."""
    with mp.workdps(50):
        nu = mp.mpf(dim) / 2 - 1
        if kappa == 0:
            log_c = mp.loggamma(mp.mpf(dim) / 2) - mp.log(2) - mp.mpf(dim) / 2 * mp.log(mp.pi)
            return float(log_c), 0.0, float(1 / mp.mpf(dim))
        k = mp.mpf(kappa)
        i_nu = mp.besseli(nu, k, maxterms=10**6)
        i_next = mp.besseli(nu + 1, k, maxterms=10**6)
        log_c = nu * mp.log(k) - mp.mpf(dim) / 2 * mp.log(2 * mp.pi) - mp.log(i_nu)
        a = i_next / i_nu
        a_prime = 1 - a**2 - (dim - 1) * a / k
        return float(log_c), float(a), float(a_prime)


def errors(dim: int) -> dict[str, float]:
    refs = [reference(dim, k) for k in KAPPAS]
    out = {}
    for dtype, tag in [(torch.float64, "f64"), (torch.float32, "f32")]:
        kappa = torch.tensor(KAPPAS, dtype=dtype, requires_grad=True)
        log_c = vmf_log_normalizer(dim, kappa)
        (grad,) = torch.autograd.grad(log_c.sum(), kappa)
        a = mean_resultant_length(dim, kappa)
        out[f"logC {tag}"] = max(abs(log_c[i].item() - r[0]) / max(1.0, abs(r[0])) for i, r in enumerate(refs))
        out[f"A {tag}"] = max(abs(a[i].item() - r[1]) / r[1] for i, r in enumerate(refs) if r[1] > 0)
        out[f"dlogC {tag}"] = max(abs(-grad[i].item() - r[1]) / r[1] for i, r in enumerate(refs) if r[1] > 0)
        if tag == "f64":
            kappa = torch.tensor(KAPPAS, dtype=dtype, requires_grad=True)
            (a_prime,) = torch.autograd.grad(mean_resultant_length(dim, kappa).sum(), kappa)
            out["A' f64"] = max(abs(a_prime[i].item() - r[2]) / r[2] for i, r in enumerate(refs))
        for key, value in out.items():
            assert value == value, f"NaN error for {key} at p = {dim}"
    return out


def main() -> None:
    cols = ["logC f64", "A f64", "dlogC f64", "A' f64", "logC f32", "A f32"]
    print(f"mpmath {mp.__version__}, torch {torch.__version__}; worst over κ ∈ {{0, 1e-8, …, 1e8}}")
    print()
    print("| p | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    worst = dict.fromkeys(cols, 0.0)
    for dim in DIMS:
        e = errors(dim)
        worst = {c: max(worst[c], e[c]) for c in cols}
        print(f"| {dim} | " + " | ".join(f"{e[c]:.1e}" for c in cols) + " |")
    print("| **worst** | " + " | ".join(f"**{worst[c]:.1e}**" for c in cols) + " |")


PART_ORDERS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 7.5, 11.0, 15.0, 20.0, 23.0, 23.5, 24.0, 31.0, 63.0, 127.0,
               255.0, 1023.0]
PARTS = ["L", "R", "1 − R", "R'", "G"]


def part_references(nu: float, x: float) -> list[float]:
    """L, R, 1 − R, R', G at 40 digits."""
    with mp.workdps(40):
        n, xm = mp.mpf(nu), mp.mpf(x)
        i_nu = mp.besseli(n, xm, maxterms=10**6)
        ratio = mp.besseli(n + 1, xm, maxterms=10**6) / i_nu
        return [
            float(mp.log(i_nu) - n * mp.log(xm) - xm),
            float(ratio),
            float(1 - ratio),
            float(1 - ratio**2 - (2 * n + 1) * ratio / xm),
            float(mp.log(i_nu) - n * mp.log(xm / 2) + mp.loggamma(n + 1)),
        ]


def part_errors(nu: float, tabulated: bool) -> list[float]:
    """Worst error of each part over the x grid, in units of 2⁻⁵²."""
    xs = [10.0 ** (e / 16) for e in range(-96, 97)]
    if nu < 24.0:
        xs += [math.sqrt(24.0**2 - nu**2) * f for f in (0.98, 0.999, 1.001, 1.02)]
    x = torch.tensor(xs, dtype=torch.float64)
    order = nu if tabulated else torch.tensor(nu, dtype=torch.float64)
    parts = bessel_parts(order, x, log_scaled=True, ratio=True, complement=True, derivative=True, log_series=True)
    ours = torch.stack(list(parts), dim=-1).tolist()
    worst = [0.0] * len(PARTS)
    for row, xv in zip(ours, xs):
        ref = part_references(nu, xv)
        for j, (value, exact) in enumerate(zip(row, ref)):
            scale = max(1.0, abs(exact)) if j == 0 else abs(exact)
            worst[j] = max(worst[j], abs(value - exact) / scale / 2.0**-52)
    return worst


def main_parts() -> None:
    print(f"mpmath {mp.__version__}, torch {torch.__version__}; worst over x ∈ [1e-6, 1e6], in units of 2⁻⁵²")
    print()
    cols = [f"{part} {path}" for path in ("table", "expansions") for part in PARTS]
    print("| ν | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    worst = [0.0] * len(cols)
    for nu in PART_ORDERS:
        errs = part_errors(nu, True) + part_errors(nu, False)
        worst = [max(a, b) for a, b in zip(worst, errs)]
        print(f"| {nu:g} | " + " | ".join(f"{e:.1f}" for e in errs) + " |")
    print("| **worst** | " + " | ".join(f"**{e:.1f}**" for e in worst) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", action="store_true", help="the Bessel kernel's parts in ulps instead")
    if parser.parse_args().parts:
        main_parts()
    else:
        main()
