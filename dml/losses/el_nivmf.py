r"""EL-nivMF, the default loss: vMF images, non-isotropic vMF proxies, tempered expected likelihood.

This is the method of Kirchhof et al. (ECCV 2022) built on the exact distributions of `vmf_dists`:
the proxies are the normalised `vmf_dists.NonIsotropicVMF` (a proper density), the image samples
come from the exact vMF sampler with unbiased concentration gradients, and the pairwise kernel uses
two ``[S·B, p] × [p, C]`` matrix products instead of a loop over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dml.losses.base import LossStats, check_nonnegative, check_positive
from dml.losses.proxy_anchor import proxy_anchor_loss
from dml.losses.vmf import VMFProxyLoss, image_distributions
from vmf_dists import NonIsotropicVMF, pairwise_log_expected_likelihood

__all__ = ["ELNivMFLoss"]


class ELNivMFLoss(VMFProxyLoss):
    r"""Softmax over tempered expected likelihoods of vMF images under nivMF proxies, plus ProxyAnchor.

    Image $i$ is $\mathrm{vMF}(\mu_i, \kappa_i)$ with $\mu_i = e_i/\|e_i\|$, $\kappa_i = \|e_i\|$;
    class $c$ has the proxy $q_c = \mathrm{nivMF}(\mu_c, k_c)$ with a learnable direction (an
    unconstrained vector, normalised) and learnable per-dimension concentrations $\log k_c \in \mathbb{R}^p$.
    The logits are Monte-Carlo estimates of the tempered expected likelihood,

    $$
    \ell_{ic} = \log \frac1S \sum_{s=1}^S \exp\big(\log q_c(x_{is})/T\big), \qquad
    x_{is} \sim \mathrm{vMF}(\mu_i, \kappa_i),
    $$

    (`vmf_dists.pairwise_log_expected_likelihood`, reparameterised samples shared by all classes, a
    learnable $T$ learnt as $\log T$), and

    $$
    L = \mathrm{CE}(\ell, y) + w \cdot \mathrm{ProxyAnchor}(\mu_i, \mu_c;\ \alpha, \delta),
    $$

    the guidance term being `dml.losses.proxy_anchor.proxy_anchor_loss` on the cosine similarities of
    the image and proxy directions ($w = 0$ disables it).

    The estimate is biased low (Jensen's inequality: the log of a sample mean underestimates the log of
    the mean); by the delta method the bias is about
    $-\operatorname{Var}[e^{\log q(x)/T}]/(2S\,\mathbb{E}[e^{\log q(x)/T}]^2)$, so it shrinks as $1/S$,
    and it grows as $T$ decreases (the weights $e^{\log q/T}$ get more uneven). Each call draws fresh
    samples.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $p \ge 2$.
        proxy_concentration: initial value of every $k_{c,d}$ (default 10).
        temperature: initial $T > 0$ (default 1).
        num_samples: Monte-Carlo samples $S$ per image (default 5).
        guidance_weight: weight $w \ge 0$ of the ProxyAnchor guidance (default 1; 0 disables).
        guidance_alpha: ProxyAnchor scale $\alpha$ (default 32).
        guidance_delta: ProxyAnchor margin $\delta$ (default 0.1).
        proxy_lr_mult: learning-rate multiplier of the proxy directions (default 100).
        concentration_lr_mult: learning-rate multiplier of $\log k_c$ (default 100).
        temperature_lr_mult: learning-rate multiplier of $\log T$ (default 10; 0 keeps $T$ fixed).
        isotropic_proxies: the ablation with one concentration per class, $k_c = \kappa_c \mathbf{1}$
            (default False). A nivMF with equal concentrations is exactly $\mathrm{vMF}(\mu_c, \kappa_c)$,
            so this changes the proxy family only: the logits are the same Monte-Carlo estimate, the
            guidance term is unchanged.

    Raises:
        ValueError: if ``num_classes`` < 1, ``embed_dim`` < 2, ``num_samples`` is not a positive integer,
            ``proxy_concentration``, ``temperature`` or ``guidance_alpha`` is not a finite number > 0,
            ``guidance_weight`` or a multiplier is not a finite number ≥ 0, or ``isotropic_proxies`` is not
            a bool.

    References:
        * M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
          Deep Metric Learning", ECCV 2022.
        * S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020
          (the guidance term).
    """

    name = "el_nivmf"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        proxy_concentration: float = 10.0,
        temperature: float = 1.0,
        num_samples: int = 5,
        guidance_weight: float = 1.0,
        guidance_alpha: float = 32.0,
        guidance_delta: float = 0.1,
        proxy_lr_mult: float = 100.0,
        concentration_lr_mult: float = 100.0,
        temperature_lr_mult: float = 10.0,
        isotropic_proxies: bool = False,
    ) -> None:
        if not isinstance(isotropic_proxies, bool):
            raise ValueError(f"isotropic_proxies must be True or False, got {isotropic_proxies!r}")
        super().__init__(
            num_classes,
            embed_dim,
            proxy_concentration=proxy_concentration,
            temperature=temperature,
            proxy_lr_mult=proxy_lr_mult,
            concentration_lr_mult=concentration_lr_mult,
            temperature_lr_mult=temperature_lr_mult,
            per_dimension=not isotropic_proxies,
        )
        self.isotropic_proxies = isotropic_proxies
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = num_samples
        self.guidance_weight = check_nonnegative("guidance_weight", guidance_weight)
        self.guidance_alpha = check_positive("guidance_alpha", guidance_alpha)
        self.guidance_delta = float(guidance_delta)

    def proxy_distributions(self, like: torch.Tensor | None = None) -> NonIsotropicVMF:
        """The proxies as a `vmf_dists.NonIsotropicVMF` with batch ``[C]`` (in the dtype of ``like`` if given).

        Args:
            like: a tensor whose dtype the parameters are cast to (differentiably); None keeps theirs.

        Returns:
            ``NonIsotropicVMF(normalize(proxies), exp(log_concentration))``, batch shape ``[C]``, event
            shape ``[p]``, without argument validation (with ``isotropic_proxies``, each class's one
            concentration repeated over the ``p`` dimensions).
        """
        directions: torch.Tensor = self.proxies
        log_k: torch.Tensor = self.log_concentration
        if like is not None:
            directions, log_k = self._param(directions, like), self._param(log_k, like)
        if self.isotropic_proxies:
            log_k = log_k.unsqueeze(-1).expand_as(directions)
        return NonIsotropicVMF(F.normalize(directions, dim=-1), log_k.exp(), validate_args=False)

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return pairwise_log_expected_likelihood(
            image_distributions(embeddings),
            self.proxy_distributions(embeddings),
            num_samples=self.num_samples,
            temperature=self._param(self.log_temperature, embeddings).exp(),
        )

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        loss, stats = super()._loss(embeddings, labels)
        if self.guidance_weight > 0:
            directions = F.normalize(self._param(self.proxies, embeddings), dim=-1)
            cos_sim = F.normalize(embeddings, dim=-1) @ directions.T
            guidance = proxy_anchor_loss(cos_sim, labels, self.guidance_alpha, self.guidance_delta)
            loss = loss + self.guidance_weight * guidance
            stats.loss = loss.detach()
        return loss, stats
