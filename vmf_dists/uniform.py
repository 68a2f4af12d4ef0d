r"""The uniform distribution on the unit sphere $S^{p-1} \subset \mathbb{R}^p$."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints

from vmf_dists._checks import broadcast_shapes, check_sample_on_sphere
from vmf_dists.special import _check_dim, log_sphere_area

__all__ = ["HypersphericalUniform", "log_sphere_area"]


def _default_device() -> torch.device:
    """torch's default device (``torch.set_default_device``), also under torch.compile, which cannot
    trace ``torch.get_default_device`` (it returns no tensor) but can read a new tensor's device."""
    get = getattr(torch, "get_default_device", None)
    if get is None or torch.compiler.is_compiling():
        return torch.empty(0).device
    device: torch.device = get()
    return device


class HypersphericalUniform(TorchDistribution):
    r"""Uniform distribution on the unit sphere $S^{p-1} \subset \mathbb{R}^p$.

    Density $1/|S^{p-1}|$ with $|S^{p-1}| = 2\pi^{p/2}/\Gamma(p/2)$; it is the von Mises–Fisher
    distribution with $\kappa = 0$. Samples are normalised standard Gaussians (Muller 1959).
    Moments: $\mathbb{E}[x] = 0$, $\operatorname{Cov}[x] = I/p$. The mode is undefined (NaN).

    Args:
        dim: the ambient dimension $p \ge 2$ (samples have event shape ``[p]``).
        batch_shape: batch shape of the distribution.
        dtype: floating dtype of samples and log-densities (default: torch's default dtype).
        device: device of samples (default: torch's default device); ``log_prob`` follows the value's
            device.
        validate_args: check samples passed to ``log_prob`` lie on the sphere.

    Raises:
        ValueError: if ``dim`` is not an integer ≥ 2.

    References:
        M. E. Muller, "A note on a method for generating points uniformly on n-dimensional spheres",
        *Commun. ACM* 2 (1959).

    Example:
        >>> from vmf_dists import HypersphericalUniform
        >>> u = HypersphericalUniform(3)
        >>> u.sample((2,)).shape
        torch.Size([2, 3])
        >>> round(u.entropy().item(), 4)  # log(4π)
        2.531
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.sphere
    has_rsample = True

    def __init__(self, dim: int, batch_shape: torch.Size | tuple[int, ...] = (), *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, validate_args: bool | None = None):
        self.dim = _check_dim(dim)
        self._dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else _default_device()
        super().__init__(torch.Size(batch_shape), torch.Size([self.dim]), validate_args=validate_args)

    @classmethod
    def infer_shapes(  # type: ignore[override]  # Pyro's base is the catch-all (**arg_shapes); this names them
        cls, dim: int, batch_shape: tuple[int, ...] = ()
    ) -> tuple[torch.Size, torch.Size]:
        """(batch_shape, event_shape) of ``HypersphericalUniform(dim, batch_shape)`` (Pyro's protocol; this
        distribution has no tensor parameters, so it takes the constructor's own arguments).

        Args:
            dim: the ambient dimension $p$.
            batch_shape: the batch shape.

        Returns:
            ``(batch_shape, [p])``.
        """
        return torch.Size(batch_shape), torch.Size([_check_dim(dim)])

    def _validate_sample(self, value: torch.Tensor) -> None:
        check_sample_on_sphere(self, value)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of samples and log-densities."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device on which samples, the entropy and the moments are created."""
        return self._device

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: HypersphericalUniform | None = None
    ) -> HypersphericalUniform:
        """The same distribution with its batch shape expanded (what Pyro's ``plate`` calls).

        Args:
            batch_shape: the new batch shape, to which the current one broadcasts.
            _instance: for subclasses (torch.distributions' ``expand`` protocol).

        Returns:
            A `HypersphericalUniform` with batch shape ``batch_shape`` and the same dimension, dtype,
            device and validation setting.

        Raises:
            ValueError: if the current batch shape does not broadcast to ``batch_shape``.
        """
        batch_shape = torch.Size(batch_shape)
        try:
            compatible = torch.broadcast_shapes(batch_shape, self.batch_shape) == batch_shape
        except RuntimeError:
            compatible = False
        if not compatible:
            raise ValueError(f"cannot expand batch shape {tuple(self.batch_shape)} to {tuple(batch_shape)}")
        new: HypersphericalUniform = self._get_checked_instance(HypersphericalUniform, _instance)
        new.dim = self.dim
        new._dtype = self._dtype
        new._device = self._device
        super(HypersphericalUniform, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        r"""Uniform samples on the sphere: normalised standard Gaussians $g/\|g\|$ (Muller 1959).

        There are no parameters, so nothing carries a gradient.

        Args:
            sample_shape: leading shape of independent draws.

        Returns:
            Unit vectors of shape ``sample_shape + batch_shape + [p]`` with this distribution's dtype
            and device.
        """
        shape = self._extended_shape(sample_shape)
        g = torch.randn(shape, dtype=self._dtype, device=self._device)
        norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp(min=torch.finfo(self._dtype).tiny)
        unit: torch.Tensor = g / norm
        return unit

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""The constant log density $-\log|S^{p-1}|$ (`log_sphere_area`).

        Args:
            value: points of shape ``[..., p]``, ``value.shape[:-1]`` broadcastable with ``batch_shape``.

        Returns:
            $-\log|S^{p-1}|$, shape ``broadcast(value.shape[:-1], batch_shape)``, on ``value``'s device,
            in the promoted dtype of ``value`` and this distribution.

        Raises:
            ValueError: with validation, if ``value`` does not lie on the unit sphere.
        """
        if self._validate_args:
            check_sample_on_sphere(self, value)
        shape = broadcast_shapes(value.shape[:-1], self.batch_shape)
        dtype = torch.promote_types(value.dtype, self._dtype) if value.is_floating_point() else self._dtype
        return torch.full(shape, -log_sphere_area(self.dim), dtype=dtype, device=value.device)

    def entropy(self) -> torch.Tensor:
        r"""The entropy $H = \log|S^{p-1}|$, the largest of any distribution on the sphere.

        Returns:
            Tensor of shape ``batch_shape``.
        """
        return torch.full(self.batch_shape, log_sphere_area(self.dim), dtype=self._dtype, device=self._device)

    @property
    def mean(self) -> torch.Tensor:
        r"""The mean $\mathbb{E}[x] = 0$, shape ``batch_shape + [p]``."""
        return torch.zeros(self._extended_shape(), dtype=self._dtype, device=self._device)

    @property
    def mode(self) -> torch.Tensor:
        """Undefined (every point is a mode): NaN, shape ``batch_shape + [p]``."""
        return torch.full(self._extended_shape(), math.nan, dtype=self._dtype, device=self._device)

    @property
    def variance(self) -> torch.Tensor:
        r"""Per-coordinate variances $1/p$ (the diagonal of $\operatorname{Cov}[x] = I/p$), shape
        ``batch_shape + [p]``."""
        return torch.full(self._extended_shape(), 1.0 / self.dim, dtype=self._dtype, device=self._device)

    def __repr__(self) -> str:
        return f"HypersphericalUniform(dim: {self.dim}, batch_shape: {tuple(self.batch_shape)})"
