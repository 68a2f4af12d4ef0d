"""Accuracy table of vmf_dists.special against mpmath on the issue's (p, κ) grid.

    .venv/bin/python benchmarks/accuracy.py            # prints a markdown table (≈ 1 min on 2 cores)

For each dimension p it reports the worst error over κ ∈ {0, 1e-8, 1e-7, …, 1e8} of

* log C_p(κ): |ours − mpmath| / max(1, |log C_p|), in float64 and float32;
* A_p(κ) (= −d/dκ log C_p, what the backward returns): relative error, float64 and float32;
* A_p'(κ) (the backward of A_p): relative error, float64.

The references are mpmath.besseli at 50 significant digits (`maxterms` raised so it converges for
large orders at large arguments). The tests (tests/test_special.py) assert the same bounds.
"""

from __future__ import annotations

import mpmath as mp
import torch

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


if __name__ == "__main__":
    main()
