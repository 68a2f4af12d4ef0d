r"""Softmax losses between vMF images and isotropic vMF proxies, with closed-form similarities.

An embedding $e_i$ is read as the distribution $\mathrm{vMF}(\mu_i, \kappa_i)$ with
$\mu_i = e_i/\|e_i\|$ and $\kappa_i = \|e_i\|$; class $c$ has a proxy $q_c = \mathrm{vMF}(\mu_c, \kappa_c)$
with a learnable direction (an unconstrained vector, normalised) and a learnable $\log\kappa_c$. A
similarity $s(\text{image}_i, q_c)$ divided by a learnable temperature $T$ (learnt as $\log T$)
gives the logits of a softmax cross-entropy over classes:

* ``el_vmf`` (`ELVMFLoss`): the tempered expected likelihood
  $\log \mathbb{E}_{x\sim\text{image}_i}[q_c(x)^{1/T}]$ (the temperature is inside the expectation);
* ``ppk_vmf`` (`PPKVMFLoss`): the log probability product kernel $\log\int \text{image}_i^\rho q_c^\rho$, over $T$;
* ``kl_vmf`` (`KLVMFLoss`): $-\mathrm{KL}(\text{image}_i \,\|\, q_c)$, over $T$.

All are exact (no sampling) and use one ``[B, p] × [p, C]`` matrix product; no ``[B, C, p]``
tensor is formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dml.losses.base import LossStats, ProxyLoss, check_nonnegative, check_positive, log_parameter, unit_rows
from vmf_dists import (
    VonMisesFisher,
    mean_resultant_length,
    pairwise_log_expected_likelihood,
    pairwise_log_probability_product_kernel,
    vmf_log_normalizer,
)

__all__ = ["ELVMFLoss", "KLVMFLoss", "PPKVMFLoss", "image_distributions"]


def image_distributions(embeddings: torch.Tensor) -> VonMisesFisher:
    r"""The images as vMFs: batch ``[B]``, direction $e_i/\|e_i\|$, concentration $\|e_i\|$ (no validation).

    Args:
        embeddings: ``[B, p]`` floating tensor (non-zero rows).

    Returns:
        A `vmf_dists.VonMisesFisher` with batch shape ``[B]`` and event shape ``[p]``, differentiable in
        ``embeddings``.
    """
    kappa = torch.linalg.vector_norm(embeddings, dim=-1)
    return VonMisesFisher(F.normalize(embeddings, dim=-1), kappa, validate_args=False)


class VMFProxyLoss(ProxyLoss):
    """Shared parts: vMF proxies (direction, log κ [C] or per dimension [C, p]), a log temperature, the
    cross-entropy and stats."""

    initial_norm_per_dim = 2.5

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        proxy_concentration: float,
        temperature: float,
        proxy_lr_mult: float,
        concentration_lr_mult: float,
        temperature_lr_mult: float,
        per_dimension: bool = False,
    ) -> None:
        super().__init__(num_classes, embed_dim, min_embed_dim=2)
        self.proxy_lr_mult = check_nonnegative("proxy_lr_mult", proxy_lr_mult)
        self.concentration_lr_mult = check_nonnegative("concentration_lr_mult", concentration_lr_mult)
        self.temperature_lr_mult = check_nonnegative("temperature_lr_mult", temperature_lr_mult)
        self.proxies = torch.nn.Parameter(unit_rows(num_classes, embed_dim))
        shape = (num_classes, embed_dim) if per_dimension else (num_classes,)
        self.log_concentration = log_parameter("proxy_concentration", proxy_concentration, shape)
        self.log_temperature = log_parameter("temperature", temperature)

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature $T = \\exp(\\log T)$."""
        return self.log_temperature.exp()

    @property
    def proxy_concentration(self) -> torch.Tensor:
        r"""The proxy concentrations $\kappa_c = \exp(\log\kappa_c)$, shape ``[C]`` (``[C, p]`` per dimension)."""
        return self.log_concentration.exp()

    def proxy_distributions(self, like: torch.Tensor | None = None) -> VonMisesFisher:
        """The proxies as a `VonMisesFisher` with batch ``[C]`` (in the dtype of ``like`` if given).

        Args:
            like: a tensor whose dtype the parameters are cast to (differentiably); None keeps theirs.

        Returns:
            ``VonMisesFisher(normalize(proxies), exp(log_concentration))`` without argument validation.
        """
        directions: torch.Tensor = self.proxies
        log_kappa: torch.Tensor = self.log_concentration
        if like is not None:
            directions, log_kappa = self._param(directions, like), self._param(log_kappa, like)
        return VonMisesFisher(F.normalize(directions, dim=-1), log_kappa.exp(), validate_args=False)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        return self._softmax_cross_entropy(
            self._logits(embeddings),
            labels,
            temperature=self.temperature,
            mean_image_kappa=torch.linalg.vector_norm(embeddings.detach(), dim=-1).mean(),
            mean_proxy_kappa=self.proxy_concentration.mean(),
        )

    def _lr_groups(self):
        return [
            ("proxies", [self.proxies], self.proxy_lr_mult),
            ("concentrations", [self.log_concentration], self.concentration_lr_mult),
            ("temperature", [self.log_temperature], self.temperature_lr_mult),
        ]


class ELVMFLoss(VMFProxyLoss):
    r"""Softmax over tempered expected likelihoods of vMF images under vMF proxies.

    $$
    \ell_{ic} = \log \mathbb{E}_{x\sim\mathrm{vMF}(\mu_i,\kappa_i)}\big[\exp(\log q_c(x)/T)\big]
      = \frac{\log C_p(\kappa_c)}{T} + \log C_p(\kappa_i) - \log C_p\big(\|\kappa_i\mu_i + \kappa_c\mu_c/T\|\big),
    $$

    from the vMF moment generating function (exact; `vmf_dists.pairwise_log_expected_likelihood` with
    a tensor temperature, so $T$ gets its gradient). $L$ is the cross-entropy of $\ell$ over classes.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $p \ge 2$.
        proxy_concentration: initial $\kappa_c$ of every proxy (default 10).
        temperature: initial $T > 0$ (default 1).
        proxy_lr_mult: learning-rate multiplier of the proxy directions (default 100).
        concentration_lr_mult: learning-rate multiplier of $\log\kappa_c$ (default 100).
        temperature_lr_mult: learning-rate multiplier of $\log T$ (default 10; 0 keeps $T$ fixed).

    Raises:
        ValueError: if ``num_classes`` < 1, ``embed_dim`` < 2, ``proxy_concentration`` or
            ``temperature`` is not a finite number > 0, or a multiplier is not a finite number ≥ 0.

    References:
        M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
        Deep Metric Learning", ECCV 2022.
    """

    name = "el_vmf"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        proxy_concentration: float = 10.0,
        temperature: float = 1.0,
        proxy_lr_mult: float = 100.0,
        concentration_lr_mult: float = 100.0,
        temperature_lr_mult: float = 10.0,
    ) -> None:
        super().__init__(
            num_classes,
            embed_dim,
            proxy_concentration=proxy_concentration,
            temperature=temperature,
            proxy_lr_mult=proxy_lr_mult,
            concentration_lr_mult=concentration_lr_mult,
            temperature_lr_mult=temperature_lr_mult,
        )

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        temperature = self._param(self.log_temperature, embeddings).exp()
        return pairwise_log_expected_likelihood(
            image_distributions(embeddings), self.proxy_distributions(embeddings), temperature=temperature
        )


class PPKVMFLoss(VMFProxyLoss):
    r"""Softmax over log probability product kernels of vMF images and vMF proxies, over a temperature.

    $$
    \ell_{ic} = \frac1T \log\int \mathrm{vMF}(x;\mu_i,\kappa_i)^\rho\, q_c(x)^\rho\,dx
      = \frac1T\Big(\rho[\log C_p(\kappa_i) + \log C_p(\kappa_c)] - \log C_p(\rho\|\kappa_i\mu_i + \kappa_c\mu_c\|)\Big)
    $$

    (`vmf_dists.pairwise_log_probability_product_kernel`; $\rho = \tfrac12$ is the Bhattacharyya
    coefficient, $\rho = 1$ the expected likelihood). $L$ is the cross-entropy of $\ell$ over classes.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $p \ge 2$.
        proxy_concentration: initial $\kappa_c$ of every proxy (default 10).
        temperature: initial $T > 0$ (default 1).
        rho: the kernel exponent $\rho > 0$ (default 0.5).
        proxy_lr_mult: learning-rate multiplier of the proxy directions (default 100).
        concentration_lr_mult: learning-rate multiplier of $\log\kappa_c$ (default 100).
        temperature_lr_mult: learning-rate multiplier of $\log T$ (default 10; 0 keeps $T$ fixed).

    Raises:
        ValueError: if ``num_classes`` < 1, ``embed_dim`` < 2, ``proxy_concentration`` or
            ``temperature`` or ``rho`` is not a finite number > 0, or a multiplier is not a finite number ≥ 0.

    References:
        * M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
          Deep Metric Learning", ECCV 2022.
        * T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).
    """

    name = "ppk_vmf"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        proxy_concentration: float = 10.0,
        temperature: float = 1.0,
        rho: float = 0.5,
        proxy_lr_mult: float = 100.0,
        concentration_lr_mult: float = 100.0,
        temperature_lr_mult: float = 10.0,
    ) -> None:
        super().__init__(
            num_classes,
            embed_dim,
            proxy_concentration=proxy_concentration,
            temperature=temperature,
            proxy_lr_mult=proxy_lr_mult,
            concentration_lr_mult=concentration_lr_mult,
            temperature_lr_mult=temperature_lr_mult,
        )
        self.rho = check_positive("rho", rho)

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        log_ppk = pairwise_log_probability_product_kernel(
            image_distributions(embeddings), self.proxy_distributions(embeddings), self.rho
        )
        return log_ppk / self._param(self.log_temperature, embeddings).exp()


class KLVMFLoss(VMFProxyLoss):
    r"""Softmax over negative KL divergences from vMF images to vMF proxies, over a temperature.

    $$
    \ell_{ic} = -\frac{\mathrm{KL}(\mathrm{vMF}(\mu_i,\kappa_i)\,\|\,\mathrm{vMF}(\mu_c,\kappa_c))}{T}, \quad
    \mathrm{KL} = \log C_p(\kappa_i) - \log C_p(\kappa_c) + A_p(\kappa_i)\,(\kappa_i - \kappa_c\,\mu_i^\top\mu_c),
    $$

    all pairs from one ``[B, p] × [p, C]`` product $\mu_i^\top\mu_c$; the elementwise part runs in
    float64 (`vmf_dists.vmf_log_normalizer`, `vmf_dists.mean_resultant_length`). $L$ is the
    cross-entropy of $\ell$ over classes.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $p \ge 2$.
        proxy_concentration: initial $\kappa_c$ of every proxy (default 10).
        temperature: initial $T > 0$ (default 1).
        proxy_lr_mult: learning-rate multiplier of the proxy directions (default 100).
        concentration_lr_mult: learning-rate multiplier of $\log\kappa_c$ (default 100).
        temperature_lr_mult: learning-rate multiplier of $\log T$ (default 10; 0 keeps $T$ fixed).

    Raises:
        ValueError: if ``num_classes`` < 1, ``embed_dim`` < 2, ``proxy_concentration`` or
            ``temperature`` is not a finite number > 0, or a multiplier is not a finite number ≥ 0.

    References:
        M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
        Deep Metric Learning", ECCV 2022.
    """

    name = "kl_vmf"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        proxy_concentration: float = 10.0,
        temperature: float = 1.0,
        proxy_lr_mult: float = 100.0,
        concentration_lr_mult: float = 100.0,
        temperature_lr_mult: float = 10.0,
    ) -> None:
        super().__init__(
            num_classes,
            embed_dim,
            proxy_concentration=proxy_concentration,
            temperature=temperature,
            proxy_lr_mult=proxy_lr_mult,
            concentration_lr_mult=concentration_lr_mult,
            temperature_lr_mult=temperature_lr_mult,
        )

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        dim = self.embed_dim
        directions = F.normalize(self._param(self.proxies, embeddings), dim=-1)
        cos = (F.normalize(embeddings, dim=-1) @ directions.T).to(torch.float64)  # [B, C]
        kappa_i = torch.linalg.vector_norm(embeddings, dim=-1).to(torch.float64)
        kappa_c = self.log_concentration.to(torch.float64).exp()
        log_c_i = vmf_log_normalizer(dim, kappa_i, validate_args=False)
        log_c_c = vmf_log_normalizer(dim, kappa_c, validate_args=False)
        a_i = mean_resultant_length(dim, kappa_i, validate_args=False)
        kl = log_c_i.unsqueeze(1) - log_c_c + a_i.unsqueeze(1) * (kappa_i.unsqueeze(1) - kappa_c * cos)
        temperature = self.log_temperature.to(torch.float64).exp()
        return (-kl / temperature).to(embeddings.dtype)
