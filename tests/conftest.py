"""Shared fixtures for the distribution tests: the generic example table and mpmath references.

The table (`EXAMPLES`) plays the role of Pyro's ``tests/distributions/conftest.py``: every entry is a
recipe for one distribution (class, dimension, concentrations, batch shape, dtype) and drives the
generic checks in ``tests/test_distributions.py`` (shapes, support, expand, dtype, validation,
gradients, and log_prob / entropy / mean / variance against mpmath).

Reference values are computed here with mpmath at `DPS` digits from the *exact* binary inputs the
library sees (a float32 parameter is converted exactly, then normalised in mpmath); no number produced
by ``vmf_dists`` is ever used as a reference. This module has no side effects on global torch state.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from mpmath import mp

from vmf_dists import HypersphericalUniform, VonMisesFisher

# --------------------------------------------------------------------------------------------------
# tolerances

DPS = 50
WORK_DPS = DPS + 10
MAXTERMS = 10**6

#: relative tolerance of the library against mpmath, by dtype (acceptance spec)
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


# --------------------------------------------------------------------------------------------------
# mpmath references (independent of the library and of tests/oracle.py)


def mpf(x) -> mp.mpf:
    """Exact conversion of a Python/torch scalar (float32 values are exactly representable)."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    return mp.mpf(float(x)) if not isinstance(x, mp.mpf) else x


@functools.cache
def mp_log_c(p: int, kappa) -> mp.mpf:
    r"""log C_p(κ) = ν log κ − (p/2) log 2π − log I_ν(κ) (mpmath.besseli, maxterms 1e6); −log|S^{p−1}| at 0."""
    with mp.workdps(WORK_DPS):
        k = mpf(kappa)
        half = mp.mpf(p) / 2
        if k == 0:
            return mp.loggamma(half) - mp.log(2) - half * mp.log(mp.pi)
        nu = half - 1
        return nu * mp.log(k) - half * mp.log(2 * mp.pi) - mp.log(mp.besseli(nu, k, maxterms=MAXTERMS))


def mp_log_sphere_area(p: int) -> mp.mpf:
    with mp.workdps(WORK_DPS):
        return mp.log(2) + mp.mpf(p) / 2 * mp.log(mp.pi) - mp.loggamma(mp.mpf(p) / 2)


@functools.cache
def mp_mean_length(p: int, kappa) -> mp.mpf:
    """A_p(κ) = I_{p/2}(κ) / I_{p/2−1}(κ); 0 at κ = 0."""
    with mp.workdps(WORK_DPS):
        k = mpf(kappa)
        if k == 0:
            return mp.mpf(0)
        half = mp.mpf(p) / 2
        return mp.besseli(half, k, maxterms=MAXTERMS) / mp.besseli(half - 1, k, maxterms=MAXTERMS)


@functools.cache
def mp_mean_length_deriv(p: int, kappa) -> mp.mpf:
    """A_p'(κ) = 1 − A² − (p−1)A/κ (= Var μᵀx), 1/p at κ = 0; at 60 digits the cancellation is harmless."""
    with mp.workdps(WORK_DPS):
        k = mpf(kappa)
        if k == 0:
            return 1 / mp.mpf(p)
        a = mp_mean_length(p, kappa)
        return 1 - a * a - (p - 1) * a / k


def mp_a_over_kappa(p: int, kappa) -> mp.mpf:
    with mp.workdps(WORK_DPS):
        k = mpf(kappa)
        return 1 / mp.mpf(p) if k == 0 else mp_mean_length(p, kappa) / k


def mp_entropy(p: int, kappa) -> mp.mpf:
    """H = −log C_p(κ) − κ A_p(κ)."""
    with mp.workdps(WORK_DPS):
        return -mp_log_c(p, kappa) - mpf(kappa) * mp_mean_length(p, kappa)


def mp_unit(vec) -> list:
    """The exact float entries of ``vec`` (a 1-d tensor), normalised in mpmath."""
    with mp.workdps(WORK_DPS):
        v = [mpf(float(x)) for x in vec.tolist()]
        n = mp.sqrt(mp.fsum(x * x for x in v))
        return [x / n for x in v]


def mp_dot(a, b) -> mp.mpf:
    with mp.workdps(WORK_DPS):
        return mp.fsum(x * y for x, y in zip(a, b))


def mp_exact(vec) -> list:
    return [mpf(float(x)) for x in vec.tolist()]


def mp_kl_vmf_vmf(p, mu1, k1, mu2, k2) -> mp.mpf:
    """log C(κ₁) − log C(κ₂) + A(κ₁)(κ₁ − κ₂ μ₁ᵀμ₂) with unit mp vectors."""
    with mp.workdps(WORK_DPS):
        return mp_log_c(p, k1) - mp_log_c(p, k2) + mp_mean_length(p, k1) * (mpf(k1) - mpf(k2) * mp_dot(mu1, mu2))


def mp_kl_vmf_uniform(p, k) -> mp.mpf:
    with mp.workdps(WORK_DPS):
        return mp_log_c(p, k) + mpf(k) * mp_mean_length(p, k) + mp_log_sphere_area(p)


def mp_kl_uniform_vmf(p, k) -> mp.mpf:
    with mp.workdps(WORK_DPS):
        return mp_log_c(p, 0.0) - mp_log_c(p, k)


def mp_log_ppk(p, mu1, k1, mu2, k2, rho) -> mp.mpf:
    r"""ρ[log C(κ₁) + log C(κ₂)] − log C(ρ‖κ₁μ₁ + κ₂μ₂‖), straight from mpmath Bessels."""
    with mp.workdps(WORK_DPS):
        r = mpf(rho)
        s = [mpf(k1) * a + mpf(k2) * b for a, b in zip(mu1, mu2)]
        norm = mp.sqrt(mp.fsum(x * x for x in s))
        return r * (mp_log_c(p, k1) + mp_log_c(p, k2)) - mp_log_c(p, r * norm)


def rel_err(got: float, ref) -> float:
    ref = float(ref)
    if ref == 0.0:
        return abs(got)
    return abs(got - ref) / abs(ref)


# --------------------------------------------------------------------------------------------------
# the generic table


def unit_vectors(shape, p: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Deterministic random unit vectors [*shape, p], normalised in float64, rounded once to dtype."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(tuple(shape) + (p,), generator=g, dtype=torch.float64)
    return (v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)).to(dtype)


#: concentration regimes; an example takes the first prod(batch_shape) values
KAPPA_REGIMES = {
    "zero": (0.0,) * 6,
    "small": (1e-3, 1e-6, 0.02, 0.3, 1e-8, 0.05),
    "moderate": (5.0, 0.7, 30.0, 2.5, 12.0, 80.0),
    "large": (1e4, 1e3, 1e6, 3e3, 5e4, 2e5),
}
DIMS = (2, 3, 5, 64)
BATCH_SHAPES = ((), (3,), (2, 3))
DTYPES = (torch.float32, torch.float64)
_DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One entry of the generic table: a recipe that builds the distribution on demand."""

    kind: str  # "vmf" | "uniform"
    dim: int
    batch_shape: tuple
    dtype: torch.dtype
    regime: str = ""
    seed: int = 0

    @property
    def id(self) -> str:
        b = "x".join(map(str, self.batch_shape)) or "scalar"
        extra = f"-{self.regime}" if self.kind == "vmf" else ""
        return f"{self.kind}-p{self.dim}{extra}-b{b}-{_DTYPE_NAMES[self.dtype]}"

    @property
    def numel(self) -> int:
        return math.prod(self.batch_shape)

    def loc(self) -> torch.Tensor:
        return unit_vectors(self.batch_shape, self.dim, self.seed, self.dtype)

    def concentration(self) -> torch.Tensor:
        values = KAPPA_REGIMES[self.regime][: self.numel]
        return torch.tensor(values, dtype=torch.float64).to(self.dtype).reshape(self.batch_shape)

    def make(self, validate_args=None, requires_grad: bool = False):
        if self.kind == "uniform":
            return HypersphericalUniform(self.dim, self.batch_shape, dtype=self.dtype, validate_args=validate_args)
        loc, kappa = self.loc(), self.concentration()
        if requires_grad:
            loc.requires_grad_(True)
            kappa.requires_grad_(True)
        return VonMisesFisher(loc, kappa, validate_args=validate_args)

    # exact references for batch element i (flat index)
    def mp_params(self, i: int):
        """(unit loc as mp vector, κ as float) of flat batch element i (exact inputs)."""
        if self.kind == "uniform":
            return None, 0.0
        loc = self.loc().reshape(-1, self.dim)[i]
        kappa = float(self.concentration().reshape(-1)[i])
        return mp_unit(loc), kappa


def _build_examples() -> list[Example]:
    out = []
    seed = 0
    for p in DIMS:
        for regime in KAPPA_REGIMES:
            for batch in BATCH_SHAPES:
                for dtype in DTYPES:
                    seed += 1
                    out.append(Example("vmf", p, batch, dtype, regime, seed))
        for batch in BATCH_SHAPES:
            for dtype in DTYPES:
                out.append(Example("uniform", p, batch, dtype))
    return out


EXAMPLES = _build_examples()
VMF_EXAMPLES = [e for e in EXAMPLES if e.kind == "vmf"]


@pytest.fixture(params=EXAMPLES, ids=lambda e: e.id)
def example(request) -> Example:
    return request.param


@pytest.fixture(params=VMF_EXAMPLES, ids=lambda e: e.id)
def vmf_example(request) -> Example:
    return request.param


@pytest.fixture
def seeded():
    """Seed torch's global RNG (the library samples from it)."""
    torch.manual_seed(20240607)
    yield


@pytest.fixture
def default_dtype_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
