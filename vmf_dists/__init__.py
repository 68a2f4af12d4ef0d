"""vmf-dists: exact, fast von Mises–Fisher distributions for PyTorch and Pyro."""

from vmf_dists import kl as _kl  # noqa: F401  (registers the KL divergences)
from vmf_dists import monte_carlo
from vmf_dists.kernels import (
    log_bhattacharyya_coefficient,
    log_expected_likelihood,
    log_probability_product_kernel,
    pairwise_log_expected_likelihood,
    pairwise_log_probability_product_kernel,
)
from vmf_dists.nonisotropic import NonIsotropicVMF
from vmf_dists.special import (
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    mean_resultant_length,
    vmf_log_normalizer,
)
from vmf_dists.uniform import HypersphericalUniform
from vmf_dists.von_mises_fisher import VonMisesFisher

__version__ = "0.1.0.dev0"

__all__ = [
    "HypersphericalUniform",
    "NonIsotropicVMF",
    "VonMisesFisher",
    "bessel_iv_ratio",
    "inverse_mean_resultant_length",
    "log_bessel_iv",
    "log_bhattacharyya_coefficient",
    "log_expected_likelihood",
    "log_probability_product_kernel",
    "mean_resultant_length",
    "monte_carlo",
    "pairwise_log_expected_likelihood",
    "pairwise_log_probability_product_kernel",
    "vmf_log_normalizer",
]
