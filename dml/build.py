r"""From a configuration to the parts of a run: data, model, loss, pipeline, sampler, optimizer, scheduler.

Nothing here changes the configuration it is given (`dml.config.resolve` returns the resolved copy
that the parts are built from), trains, or touches the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dml.checkpoint import seed_everything
from dml.config import ConfigError, TrainConfig, resolve
from dml.data import ClassBalancedBatchSampler, DatasetError, Splits, load_splits
from dml.distributed import DistContext
from dml.losses import ProxyLoss, build_loss
from dml.models import EmbeddingModel, backbone_spec, build_model, to_channels_last
from dml.pipeline import DeviceImagePipeline, FeaturePipeline, ImagePipeline, PartialPipeline, Pipeline


@dataclass
class RunParts:
    """Everything a `dml.trainer.Trainer` works with, built by `build_run`.

    Attributes:
        config: the resolved configuration the parts were built from.
        device: the run's device.
        splits: the train / val / test splits.
        model: the embedding model, on ``device``.
        loss: the proxy loss, on ``device``.
        pipeline: produces training batches and evaluation embeddings.
        sampler: the class-balanced batch sampler of the training split.
        optimizer: over the model's and the loss's parameter groups.
        scheduler: the per-step learning-rate schedule.
        resolution: the input crop size in pixels.
    """

    config: TrainConfig
    device: torch.device
    splits: Splits
    model: EmbeddingModel
    loss: ProxyLoss
    pipeline: Pipeline
    sampler: ClassBalancedBatchSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    resolution: int


def load_data(config: TrainConfig) -> Splits:
    """The run's splits, checked for what training and evaluation need.

    Args:
        config: supplies ``dataset``, ``data_root``, ``emoji_artists``, ``val_fraction``, ``split_seed`` and
            ``batch_size``.

    Returns:
        The splits.

    Raises:
        DatasetError: the data cannot be loaded, the val or test split has no class with two images, or
            the batch is larger than the training split (every image would repeat within a batch).
    """
    splits = load_splits(config.dataset, config.data_root, val_fraction=config.val_fraction,
                         split_seed=config.split_seed,
                         emoji_artists=config.emoji_artists if config.dataset == "emoji" else None)
    for name in ("val", "test"):
        split = getattr(splits, name)
        if len(split) and max(Counter(split.labels).values()) < 2:
            raise DatasetError(f"the {name} split of {config.dataset} ({config.data_root}) has no class with two "
                               "or more images: nothing can be retrieved")
    if config.batch_size > len(splits.train):
        raise DatasetError(f"--batch-size {config.batch_size} is larger than the {len(splits.train)} training images "
                           f"of {config.dataset}: every image would repeat about "
                           f"{config.batch_size / len(splits.train):.0f} times per batch; use at most "
                           f"{len(splits.train) // config.samples_per_class * config.samples_per_class}")
    return splits


def precision(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """The network's autocast dtype and memory format on ``device`` (``--amp``, ``--channels-last``).

    Args:
        config: supplies ``amp`` and ``channels_last``.
        device: the run's device.

    Returns:
        ``(autocast dtype or None, channels_last)``.
    """
    cuda = device.type == "cuda"
    amp = config.amp == "bf16" or (config.amp == "auto" and cuda)
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and cuda)
    return (torch.bfloat16 if amp else None), channels_last


def make_model(config: TrainConfig, *, weights: str | None = None) -> EmbeddingModel:
    """The run's embedding model on the CPU (backbone, embedding dimension, pooling, BatchNorm / trunk mode).

    Args:
        config: a resolved configuration.
        weights: backbone weights to load (default: ``config.weights``; ``"none"`` for a model whose
            weights come from a checkpoint).

    Returns:
        The model.

    Raises:
        ModelError: unknown backbone or unusable weights.
    """
    return build_model(config.backbone, config.embed_dim, weights=config.weights if weights is None else weights,
                       pooling=config.pooling, freeze_batchnorm=config.freeze_batchnorm,
                       freeze_trunk=config.trunk == "frozen", partial_trunk=config.trunk == "partial")


def build_optimizer(config: TrainConfig, model: EmbeddingModel, loss: ProxyLoss) -> torch.optim.Optimizer:
    """AdamW/Adam over the network's groups (with weight decay) and the loss's groups (without).

    Args:
        config: supplies ``optimizer``, ``lr``, ``head_lr_mult``, ``trunk_lr_mult`` and ``weight_decay``.
        model: the embedding model (`dml.models.EmbeddingModel.parameter_groups`).
        loss: the loss module (`dml.losses.ProxyLoss.param_groups`: proxies, concentrations,
            temperature with their own learning-rate multipliers).

    Returns:
        The optimizer; every group keeps its ``name``.
    """
    groups = model.parameter_groups(config.lr, head_lr_mult=config.head_lr_mult, trunk_lr_mult=config.trunk_lr_mult)
    for g in groups:
        g["weight_decay"] = config.weight_decay
    for g in loss.param_groups(config.lr):
        groups.append({**g, "weight_decay": 0.0})
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer]
    return optimizer(groups, lr=config.lr)


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    r"""Per-step schedule: linear warm-up, then cosine decay to zero (or constant).

    With $N$ = ``epochs × steps_per_epoch`` steps and $W$ = ``round(warmup_epochs × steps_per_epoch)``
    (at most $N - 1$) warm-up steps, the learning rates of all groups are multiplied at step $s$ by

    $$
    \lambda(s) = \frac{s + 1}{W} \ (s < W), \qquad
    \lambda(s) = \frac12\Big(1 + \cos\big(\pi \min(1, \tfrac{s - W}{\max(1, N - W)})\big)\Big) \ (s \ge W),
    $$

    or $\lambda(s) = 1$ after the warm-up for ``scheduler="constant"``. Call ``step()`` after every
    optimizer step. The factor depends on $N$, so a run extended to more epochs (``--resume DIR --epochs
    N``) continues on the longer cosine: at the step where it stopped, the learning rate is the one the
    longer schedule has there.

    Args:
        config: supplies ``epochs``, ``warmup_epochs`` and ``scheduler``.
        optimizer: the optimizer whose learning rates are scheduled.
        steps_per_epoch: optimizer steps per epoch.

    Returns:
        A `torch.optim.lr_scheduler.LambdaLR`.

    References:
        I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017
        (cosine decay).
    """
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(config.warmup_epochs * steps_per_epoch)))
    constant = config.scheduler == "constant"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


#: the share of the machine's memory that ``--trunk auto`` lets the partial trunk's activation cache take
AUTO_PARTIAL_MEMORY_FRACTION = 0.25


def machine_memory_bytes() -> int | None:
    """The machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def partial_cache_bytes(config: TrainConfig, splits: Splits) -> int:
    """Bytes of the activation cache of ``--trunk partial``: ``--feature-views`` per training image and
    one per evaluation image, float32 (`dml.models.BackboneSpec.prefix_bytes`)."""
    spec = backbone_spec(config.backbone)
    images = len(splits.train) * max(1, int(config.feature_views)) + len(splits.val) + len(splits.test)
    return images * spec.prefix_bytes(config.resolution or spec.resolution)


def fit_auto_trunk(requested: TrainConfig, resolved: TrainConfig, splits: Splits, device_type: str,
                   processes: int = 1, log: Callable[[str], None] = print) -> TrainConfig:
    """``--trunk auto`` resolved to ``partial`` (a CPU), checked against the machine's memory.

    The partial trunk caches activations of its frozen part, ~37 KB per image for EfficientNet-Lite0 at
    224 px and ~800 KB for ResNet-50; while the cache is assembled it is held twice, by every process.
    If that exceeds `AUTO_PARTIAL_MEMORY_FRACTION` of the memory, the run takes the frozen trunk (pooled
    features, a few KB per image) instead and says why; ``--trunk partial`` asks for it regardless.

    Args:
        requested: the configuration as given (``trunk`` ``"auto"`` for the check to apply).
        resolved: ``dml.config.resolve(requested, device_type)``.
        splits: the loaded splits.
        device_type: the run's device type.
        processes: the processes on this machine that each hold the cache.
        log: receives the line that explains a fallback.

    Returns:
        ``resolved``, or ``requested`` resolved with the frozen trunk.
    """
    if requested.trunk != "auto" or resolved.trunk != "partial":
        return resolved
    memory = machine_memory_bytes()
    if memory is None:
        return resolved
    needed = 2 * processes * partial_cache_bytes(resolved, splits)
    if needed <= AUTO_PARTIAL_MEMORY_FRACTION * memory:
        return resolved
    log(f"trunk: auto chose FROZEN, not partial: the partial trunk's cached activations would take "
        f"{needed / 2**30:.1f} GiB while they are assembled, over {AUTO_PARTIAL_MEMORY_FRACTION:.0%} of this "
        f"machine's {memory / 2**30:.1f} GiB (--trunk partial asks for it regardless)")
    return resolve(dataclasses.replace(requested, trunk="frozen"), device_type)


def _pipeline_type(config: TrainConfig, splits: Splits, resolution: int,
                   device: torch.device) -> type[FeaturePipeline] | type[ImagePipeline]:
    if config.trunk == "frozen":
        return FeaturePipeline
    if config.trunk == "partial":
        return PartialPipeline
    if config.device_augment == "on" or (config.device_augment == "auto"
                                         and DeviceImagePipeline.fits(splits, resolution, device)):
        return DeviceImagePipeline
    return ImagePipeline


def build_run(config: TrainConfig, splits: Splits, device: torch.device, *, dist: DistContext | None = None,
              calibrate: bool = True, log: Callable[[str], None] = print) -> RunParts:
    """Build the parts of a run from a resolved configuration and its loaded splits.

    Seeds every generator with ``config.seed`` first, so that the same configuration builds the same
    initial model and loss. A frozen- or partial-trunk pipeline computes (or loads) its cached features here.

    Args:
        config: a resolved configuration (`dml.config.resolve`); it is not changed.
        splits: the splits from `load_data`.
        device: the run's device.
        dist: the `dml.distributed.DistContext` (default: a single process).
        calibrate: scale the embedding head to the initial norm (``init_norm``, or the loss's default) —
            a new run; a resumed run restores its weights instead.
        log: receives progress lines.

    Returns:
        The `RunParts`.

    Raises:
        ConfigError: an unknown loss option, or a global batch that the processes cannot share.
        ModelError: unknown backbone or unusable weights.
        DatasetError: an image cannot be decoded.
    """
    dist = dist or DistContext()
    if dist.world_size > 1 and config.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
                          f"number of processes ({dist.world_size})")
    seed_everything(config.seed)
    model = make_model(config).to(device)
    if dist.enabled and config.trunk in ("finetune", "partial") and not config.freeze_batchnorm:
        if device.type == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all processes
            log("BatchNorm: SyncBatchNorm (statistics over the global batch)")
        else:
            log("BatchNorm: per-process batch statistics (SyncBatchNorm needs CUDA); the running statistics "
                "of rank 0 are broadcast before every step")
    try:
        loss = build_loss(config.loss, num_classes=splits.train.num_classes, embed_dim=config.embed_dim,
                          **config.loss_options).to(device)
    except (TypeError, ValueError) as err:  # an unknown or bad loss option: a usage error
        raise ConfigError(str(err)) from None
    resolution = config.resolution or model.spec.resolution
    autocast_dtype, channels_last = precision(config, device)
    if channels_last:
        to_channels_last(model)
    if config.compile:
        model.trunk.forward = torch.compile(model.trunk.forward)  # state-dict keys unchanged
    pipeline_type = _pipeline_type(config, splits, resolution, device)
    log(f"data: {splits.name}: {splits.train.num_classes} train / {splits.val.num_classes} val / "
        f"{splits.test.num_classes} test classes ({len(splits.train)} / {len(splits.val)} / {len(splits.test)} images)")
    if splits.summary:
        log(f"data: {splits.summary}")
    log(pipeline_type.describe(model, config, resolution, device))
    if config.trunk in ("frozen", "partial") and config.weights == "none":
        log(f"warning: --weights none with a {config.trunk} trunk trains on features of a random network")
    if dist.world_size > 1:
        part = config.batch_size // dist.world_size
        split_groups = "" if part % config.samples_per_class == 0 else (
            f"; --samples-per-class {config.samples_per_class} groups are split between processes")
        log(f"DDP: {dist.world_size} processes, global batch {config.batch_size} = {dist.world_size} x {part}"
            f"{split_groups}")
    pipeline = pipeline_type(model, splits, config, resolution, device, log=log, dist=dist,
                             autocast_dtype=autocast_dtype, channels_last=channels_last)
    sampler = ClassBalancedBatchSampler(splits.train.labels, config.batch_size, config.samples_per_class,
                                        seed=config.seed, num_replicas=dist.world_size, rank=dist.rank)
    if calibrate:
        target = config.init_norm or loss.initial_norm_per_dim * config.embed_dim
        if target > 0:
            model.calibrate_head(pipeline.calibration_features(), target)
    optimizer = build_optimizer(config, model, loss)
    scheduler = build_scheduler(config, optimizer, len(sampler))
    return RunParts(config=config, device=device, splits=splits, model=model, loss=loss, pipeline=pipeline,
                    sampler=sampler, optimizer=optimizer, scheduler=scheduler, resolution=resolution)
