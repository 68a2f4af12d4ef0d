"""vmf-dists: exact, fast von Mises–Fisher distributions for PyTorch and Pyro."""

from vmf_dists.special import (
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    mean_resultant_length,
    vmf_log_normalizer,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "bessel_iv_ratio",
    "inverse_mean_resultant_length",
    "log_bessel_iv",
    "mean_resultant_length",
    "vmf_log_normalizer",
]
