r"""Monte-Carlo estimators, each returning an estimate and its standard error.

For quantities without a closed form — the entropy of a `NonIsotropicVMF`, KL divergences and expected
likelihoods involving one — these average over ``num_samples`` exact samples. The standard error is the
sample standard deviation over $\sqrt{S}$ (for the entropy and the KL, the estimators are unbiased;
for the expected likelihood $\mathbb{E}_{x\sim p}[q(x)]$ too — it is its *logarithm* that the kernels in
`vmf_dists.kernels` estimate with a Jensen bias).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Distribution

from vmf_dists._checks import check_same_sphere

__all__ = ["MonteCarloEstimate", "entropy", "kl_divergence", "expected_likelihood"]


class MonteCarloEstimate(NamedTuple):
    r"""A Monte-Carlo estimate and its standard error (a named tuple).

    Attributes:
        value: the sample mean, a tensor of the distributions' (broadcast) batch shape.
        standard_error: the sample standard deviation over $\sqrt{S}$, same shape.
    """

    value: torch.Tensor
    standard_error: torch.Tensor


def _mean_and_standard_error(draws: torch.Tensor) -> MonteCarloEstimate:
    n = draws.shape[0]
    if n < 2:
        raise ValueError(f"num_samples must be at least 2 for a standard error, got {n}")
    return MonteCarloEstimate(draws.mean(0), draws.std(0) / math.sqrt(n))


def _check_samples(num_samples: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer ≥ 2, got {num_samples!r}")
    return num_samples


def entropy(d: Distribution, num_samples: int = 1000) -> MonteCarloEstimate:
    r"""$H[d] = -\mathbb{E}_{x\sim d}[\log d(x)]$ by $S$ samples.

    The estimate is $-\frac1S\sum_s \log d(x_s)$ with $x_s \sim d$ (unbiased); no gradient flows
    (``sample``, not ``rsample``).

    Args:
        d: any distribution of this package (or any with ``sample`` and ``log_prob``).
        num_samples: $S \ge 2$.

    Returns:
        `MonteCarloEstimate` of batch shape ``d.batch_shape``.

    Raises:
        ValueError: if ``num_samples`` is not an integer ≥ 2.

    Example:
        >>> import torch
        >>> from vmf_dists import NonIsotropicVMF, monte_carlo
        >>> d = NonIsotropicVMF(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 20.0, 5.0]))
        >>> estimate = monte_carlo.entropy(d, num_samples=2000)
        >>> estimate.value.shape, estimate.standard_error.shape
        (torch.Size([]), torch.Size([]))
    """
    x = d.sample((_check_samples(num_samples),))
    return _mean_and_standard_error(-d.log_prob(x))


def kl_divergence(p: Distribution, q: Distribution, num_samples: int = 1000) -> MonteCarloEstimate:
    r"""$\mathrm{KL}(p\|q) = \mathbb{E}_{x\sim p}[\log p(x) - \log q(x)]$ by $S$ samples of $p$.

    The estimate $\frac1S\sum_s [\log p(x_s) - \log q(x_s)]$, $x_s \sim p$, is unbiased (a single draw
    can be negative); no gradient flows.

    Args:
        p: the distribution sampled from (``sample`` and ``log_prob``).
        q: the other distribution on the same sphere (``log_prob``); batch shapes broadcast.
        num_samples: $S \ge 2$.

    Returns:
        `MonteCarloEstimate` of shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: if p and q live on spheres of different dimensions, or ``num_samples`` is not an
            integer ≥ 2.
    """
    check_same_sphere(p, q)
    x = p.sample((_check_samples(num_samples),))
    return _mean_and_standard_error(p.log_prob(x) - q.log_prob(x))


def expected_likelihood(p: Distribution, q: Distribution, num_samples: int = 1000) -> MonteCarloEstimate:
    r"""$\mathrm{EL}(p, q) = \int p\,q = \mathbb{E}_{x\sim p}[q(x)]$ (not its logarithm) by $S$ samples of $p$.

    The estimate $\frac1S\sum_s q(x_s)$, $x_s \sim p$, is unbiased; its logarithm, which
    `vmf_dists.log_expected_likelihood` returns, is not (Jensen). No gradient flows.

    Args:
        p: the distribution sampled from (``sample``).
        q: the distribution whose density is averaged (``log_prob``), on the same sphere; batch shapes
            broadcast.
        num_samples: $S \ge 2$.

    Returns:
        `MonteCarloEstimate` of shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: if p and q live on spheres of different dimensions, or ``num_samples`` is not an
            integer ≥ 2.

    References:
        T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).
    """
    check_same_sphere(p, q)
    x = p.sample((_check_samples(num_samples),))
    return _mean_and_standard_error(q.log_prob(x).exp())
