"""How training batches and evaluation embeddings are produced: from images (fine-tuning the whole
network), from cached activations of the trunk's frozen part (its last part and the head train) or from
cached features of a frozen trunk (head-only training). The CPU default is the partial trunk.

Under DDP (`dml.distributed`) a pipeline takes the *global* batches and keeps its process's contiguous
part of each (the split `dml.data.ClassBalancedBatchSampler` makes), drawing the augmentation as a single
process drawing the whole global batch would; the fine-tuning pipeline shares the evaluation batches out
over the processes and gathers the embeddings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dml.checkpoint import save_checkpoint
from dml.data import (
    DeviceImageBank,
    EvalTransform,
    ImageDataset,
    Split,
    Splits,
    TrainTransform,
    center_crop,
    eval_resize,
    random_resized_crop,
)
from dml.distributed import DistContext
from dml.models import EmbeddingModel, to_channels_last

if TYPE_CHECKING:  # for the annotations only
    from dml.config import TrainConfig


def _labels(split: Split, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(split.labels, dtype=torch.long, device=device)


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one training step's augmentation: ``(seed · 1000003 + epoch) · 1000033 + step``."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + step


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator for the augmentation of one training step (independent of the global RNG).

    Args:
        seed: the run's seed.
        epoch: the epoch (from 0).
        step: the step within the epoch (from 0).

    Returns:
        A `torch.Generator` seeded with ``(seed · 1000003 + epoch) · 1000033 + step``.
    """
    return torch.Generator().manual_seed(step_seed(seed, epoch, step))


def local_part(batch_size: int, rank: int, world_size: int) -> slice:
    """The positions of process ``rank``'s part of a global batch (as `dml.data.ClassBalancedBatchSampler`
    splits it: ``world_size`` contiguous equal parts).

    Args:
        batch_size: the global batch size (a multiple of ``world_size``).
        rank: the process's rank.
        world_size: the number of processes.

    Returns:
        ``slice(rank · b, (rank + 1) · b)`` with ``b = batch_size // world_size``.
    """
    part = batch_size // world_size
    return slice(rank * part, (rank + 1) * part)


def _skip_train_transform(transform: TrainTransform, height: int, width: int) -> None:
    """Consume exactly the random draws `TrainTransform.__call__` makes for an image of this size
    (the crop box, then the flip), without touching any pixel."""
    transform.crop_box(height, width)
    if transform.flip:
        torch.rand(1, generator=transform.generator)


def _autocast(model: EmbeddingModel, dtype: torch.dtype | None) -> torch.autocast:
    """The autocast context of the network's forward passes (a no-op when ``dtype`` is None)."""
    device_type = "cuda" if model.head.weight.is_cuda else "cpu"
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _layout(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


#: images per forward pass of `network_outputs` on a CPU
CPU_FORWARD_IMAGES = 64


@torch.no_grad()
def network_outputs(model: EmbeddingModel, images_of: Callable[[int, int], torch.Tensor], count: int, *,
                    batch_size: int, starts: Sequence[int] | None = None, autocast_dtype: torch.dtype | None = None,
                    channels_last: bool = False, features: bool = False, prefix: bool = False) -> torch.Tensor:
    """The network's outputs for images ``0 .. count - 1`` in batches of ``batch_size`` (model in eval mode).

    The one place where evaluation images go through the network: the pipelines and ``dml.evaluate``
    all call it, so the same model gives the same embeddings everywhere. On a CPU each batch goes
    through the network in parts of `CPU_FORWARD_IMAGES` images (less memory, the same numbers).

    Args:
        model: the embedding model (its training mode is restored afterwards).
        images_of: ``images_of(start, stop)`` returns images ``start:stop`` on the model's device.
        count: the number of images.
        batch_size: images per batch.
        starts: the batches to run, by their first image (default: all, in order).
        autocast_dtype: autocast dtype of the forward pass (None: off).
        channels_last: feed the images in channels-last memory format.
        features: return the pooled trunk features instead of the embeddings.
        prefix: return the activations of the trunk's frozen part under ``--trunk partial``
            (`dml.models.EmbeddingModel.prefix_activations`) instead.

    Returns:
        ``[n, embed_dim]`` (or ``[n, feature_dim]``, or ``[n, C, h, w]`` activations) float32 outputs of
        the batches run, concatenated (activations in channels-last memory format).
    """
    was_training = model.training
    model.eval()
    chunks = []
    device = model.head.weight.device
    # on a CPU the network runs on at most CPU_FORWARD_IMAGES images at once: the same numbers (per-image
    # results do not depend on the batch), a quarter of the activation memory of a batch of 256
    step = CPU_FORWARD_IMAGES if device.type == "cpu" else batch_size
    for start in range(0, count, batch_size) if starts is None else starts:
        images = _layout(images_of(start, min(start + batch_size, count)), channels_last)
        for part in images.split(step):
            with _autocast(model, autocast_dtype):
                if prefix:
                    chunks.append(model.prefix_activations(part).float())
                else:
                    chunks.append((model.features(part) if features else model(part)).float())
    model.train(was_training)
    if not chunks:
        if prefix:
            raise ValueError("network_outputs: no image to compute prefix activations of")
        width = model.spec.feature_dim if features else model.embed_dim
        return torch.zeros(0, width, device=device)
    if prefix:
        return torch.cat(chunks).contiguous(memory_format=torch.channels_last)
    return torch.cat(chunks)


def _loader(dataset: ImageDataset, device: torch.device,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[int, int], torch.Tensor]:
    def images_of(start: int, stop: int) -> torch.Tensor:
        pictures = [dataset[i][0] for i in range(start, stop)]
        return torch.stack([transform(p) for p in pictures] if transform else pictures).to(device)

    return images_of


def split_features(model: EmbeddingModel, split: Split, resolution: int, device: torch.device,
                   batch_size: int, *, prefix: bool = False) -> torch.Tensor:
    """Pooled trunk features of the evaluation crops of a split, as the frozen-trunk pipeline caches them
    (with ``prefix``: the activations of the trunk's frozen part, as the partial pipeline caches them).

    The model is put in channels-last memory format (1.4-2x faster convolutions on CPU with oneDNN).

    Args:
        model: the embedding model, on ``device``.
        split: the images.
        resolution: the crop size.
        device: the model's device.
        batch_size: images per batch.
        prefix: return the prefix activations instead of the pooled features.

    Returns:
        ``[N, feature_dim]`` float32 features (``[N, C, h, w]`` activations with ``prefix``).
    """
    to_channels_last(model)
    dataset = ImageDataset(split, EvalTransform(resolution), max_side=eval_resize(resolution), cache=False)
    return network_outputs(model, _loader(dataset, device), len(dataset), batch_size=batch_size,
                           channels_last=True, features=not prefix, prefix=prefix)


@torch.no_grad()
def embeddings_from_prefix(model: EmbeddingModel, activations: torch.Tensor, batch_size: int, *,
                           features: bool = False) -> torch.Tensor:
    """Embeddings (or pooled features) of cached prefix activations, in batches (model in eval mode).

    The one place where cached activations of ``--trunk partial`` are finished: the partial pipeline and
    ``dml.evaluate`` both call it, so they get the same numbers.

    Args:
        model: the embedding model.
        activations: ``[N, C, h, w]`` activations (`split_features` with ``prefix=True``).
        batch_size: activations per batch.
        features: return the pooled trunk features instead of the embeddings.

    Returns:
        ``[N, embed_dim]`` (or ``[N, feature_dim]``) float32 outputs.
    """
    if not activations.numel():  # an empty split (cached as an empty tensor)
        return torch.zeros(0, model.spec.feature_dim if features else model.embed_dim, device=activations.device)
    was_training = model.training
    model.eval()
    out = []
    for part in activations.split(batch_size):
        pooled = model.features_from_prefix(part.contiguous(memory_format=torch.channels_last))
        out.append((pooled if features else model.embed(pooled)).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluation_embeddings(model: EmbeddingModel, split: Split, *, frozen: bool, resolution: int,
                          device: torch.device, batch_size: int, autocast_dtype: torch.dtype | None = None,
                          channels_last: bool = False, partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of a split exactly as a single-process training run evaluates it.

    Frozen trunk: the head on `split_features` (what `FeaturePipeline` caches); partial: the trunk's
    trained part and the head on its cached prefix activations (what `PartialPipeline` runs); fine-tuning:
    the whole network on the evaluation crops (what `ImagePipeline` runs). ``dml.evaluate`` uses it to reproduce
    the training run's numbers.

    Args:
        model: the embedding model, on ``device``.
        split: the images.
        frozen: whether the run trained with a frozen trunk.
        resolution: the crop size.
        device: the model's device.
        batch_size: images per batch (the run's ``eval_batch_size``).
        autocast_dtype: the run's autocast dtype (fine-tuning).
        channels_last: the run's memory format (fine-tuning).
        partial: whether the run trained the trunk in part (``--trunk partial``).

    Returns:
        ``(embeddings [N, embed_dim] float32, labels [N] int64)`` on ``device``.
    """
    if partial:
        activations = split_features(model, split, resolution, device, batch_size, prefix=True)
        embeddings = embeddings_from_prefix(model, activations, batch_size)
    elif frozen:
        embeddings = model.eval().embed(split_features(model, split, resolution, device, batch_size))
    else:
        dataset = ImageDataset(split, EvalTransform(resolution), max_side=eval_resize(resolution), cache=False)
        embeddings = network_outputs(model, _loader(dataset, device), len(dataset), batch_size=batch_size,
                                     autocast_dtype=autocast_dtype, channels_last=channels_last)
    return embeddings, _labels(split, device)


class Pipeline:
    """Interface used by the trainer: training batches, training embeddings and evaluation embeddings.

    Implemented by `ImagePipeline` (fine-tuning), `PartialPipeline` (partial trunk) and `FeaturePipeline`
    (frozen trunk); the methods
    here raise `NotImplementedError`.

    Attributes:
        model: the `dml.models.EmbeddingModel` being trained.
        dist: the `dml.distributed.DistContext` (a single process unless the trainer runs under DDP).
    """

    model: EmbeddingModel
    dist: DistContext
    #: bf16 autocast for the network's forward passes (``--amp``); None: off
    autocast_dtype: torch.dtype | None
    #: feed images in channels-last memory format (``--channels-last``)
    channels_last: bool

    def __init__(self, model: EmbeddingModel, splits: Splits, config: TrainConfig, resolution: int,
                 device: torch.device, *, log: Callable[[str], None] = print, dist: DistContext | None = None,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False):
        """Keep the state every pipeline shares, then let the subclass prepare its data (`_prepare`).

        Args:
            model: the embedding model (moved to ``device`` by the caller).
            splits: the dataset's train / val / test splits.
            config: the run's `dml.config.TrainConfig` (``seed``, ``eval_batch_size``, ``feature_views`` …).
            resolution: the crop size in pixels.
            device: where batches and embeddings live.
            log: receives progress lines.
            dist: the `dml.distributed.DistContext` (default: a single process).
            autocast_dtype: autocast dtype of the network's forward passes (None: off).
            channels_last: feed images in channels-last memory format.
        """
        self.model, self.splits, self.config, self.device = model, splits, config, device
        self.dist = dist or DistContext()
        self.resolution = resolution
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        self._prepare(log)

    def _prepare(self, log: Callable[[str], None]) -> None:
        """Decode, cache or compute what the pipeline needs (a subclass's data); nothing here."""

    def _autocast(self) -> torch.autocast:
        return _autocast(self.model, self.autocast_dtype)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return _layout(images, self.channels_last)

    def train_batches(self, batches: Sequence[list[int]], epoch: int, start: int = 0
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` on the device for ``batches[start:]`` (lists of training indices).

        The augmentation of step ``s`` of epoch ``e`` draws from its own generator seeded with
        (seed, e, s), so a run resumed mid-epoch sees exactly the batches it would have seen. Under DDP
        the batches are the global ones; this process yields its part (`local_part`), augmented exactly
        as the same images are in a single process that trains on the whole global batch.

        Args:
            batches: the epoch's (global) batches, each a list of training-set indices, all of one length.
            epoch: the epoch (seeds the augmentation).
            start: the first step to produce (a resumed epoch skips the earlier ones).

        Yields:
            ``(inputs, labels)``: images ``[B, 3, S, S]`` or cached features ``[B, feature_dim]``, and
            ``[B]`` int64 labels, on the device.
        """
        raise NotImplementedError

    def embed_train(self, inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings of one training batch's inputs (with gradient).

        Args:
            inputs: the inputs yielded by `train_batches`.

        Returns:
            ``[B, embed_dim]`` embeddings.
        """
        raise NotImplementedError

    def embed_split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of every image of the ``val`` or ``test`` split (model in eval mode).

        Under DDP every process calls it (it may communicate) and gets all ``N`` embeddings.

        Args:
            name: ``"val"`` or ``"test"``.

        Returns:
            ``(embeddings [N, embed_dim], labels [N])`` on the device (float32 and int64).
        """
        raise NotImplementedError

    def calibration_features(self) -> torch.Tensor:
        """Pooled trunk features of some training images, to set the initial embedding norm.

        Returns:
            ``[N, feature_dim]`` features (`dml.models.EmbeddingModel.calibrate_head` takes them).
        """
        raise NotImplementedError

    @staticmethod
    def describe(model: EmbeddingModel, config: TrainConfig, resolution: int, device: torch.device) -> str:
        """The line printed at the start of a run (before any feature is cached).

        Args:
            model: the embedding model.
            config: the run's configuration.
            resolution: the crop size in pixels.
            device: the run's device.

        Returns:
            One line saying what trains, at which resolution, on which device.
        """
        raise NotImplementedError


class ImagePipeline(Pipeline):
    """Images decoded once (cached in memory where they fit), augmented on the fly; the whole network trains.

    Training images get `dml.data.TrainTransform` (random resized crop and flip), evaluation images
    `dml.data.EvalTransform` (resize and centre crop); images are downscaled on decode to
    ``round(resolution · 256/224)`` on the shorter side.

    Args:
        model: the embedding model (moved to ``device`` by the caller).
        splits: the dataset's train / val / test splits.
        config: the run's `dml.config.TrainConfig` (``seed``, ``eval_batch_size``).
        resolution: the crop size in pixels.
        device: where batches and embeddings live.
        log: receives progress lines (unused here).
        dist: the `dml.distributed.DistContext` (default: a single process). Under DDP the evaluation
            batches (of ``eval_batch_size`` images, as in a single process) are dealt round-robin to the
            processes and the embeddings gathered, so they are the single-process embeddings.

    Raises:
        DatasetError: if an image cannot be decoded.
    """

    def _prepare(self, log: Callable[[str], None]) -> None:
        splits, resolution = self.splits, self.resolution
        self._sizes: dict[int, tuple[int, int]] = {}  # training image sizes seen (DDP: to skip others' draws)
        max_side = eval_resize(resolution)  # the eval resize; random crops come from the same image
        self.train_set = ImageDataset(splits.train, None, max_side=max_side)
        self.eval_sets = {name: ImageDataset(getattr(splits, name), EvalTransform(resolution), max_side=max_side)
                          for name in ("val", "test")}
        self.train_labels = _labels(splits.train, self.device)

    def train_batches(self, batches, epoch, start=0):
        """See `Pipeline.train_batches`."""
        index = torch.as_tensor(batches, dtype=torch.long).to(self.device)
        mine = local_part(index.shape[1] if len(batches) else 0, self.dist.rank, self.dist.world_size)
        for step in range(start, len(batches)):
            transform = TrainTransform(self.resolution, generator=step_generator(self.config.seed, epoch, step))
            for i in batches[step][: mine.start]:  # the parts of lower ranks: draw their crops, skip the pixels
                _skip_train_transform(transform, *self._size(i))
            images = torch.stack([transform(self.train_set.image(i)) for i in batches[step][mine]])
            if self.device.type == "cuda":
                images = images.pin_memory()  # lets the copy overlap with the previous step's kernels
            yield self._layout(images.to(self.device, non_blocking=True)), self.train_labels[index[step, mine]]

    def _size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of decoded training image ``index`` (decoded once if not cached)."""
        size = self._sizes.get(index)
        if size is None:
            image = self.train_set.image(index)
            size = self._sizes[index] = (int(image.shape[-2]), int(image.shape[-1]))
        return size

    def embed_train(self, inputs):
        """See `Pipeline.embed_train`."""
        with self._autocast():
            return self.model(inputs)

    @torch.no_grad()
    def embed_split(self, name):
        """See `Pipeline.embed_split`."""
        count = len(getattr(self.splits, name))
        size = self.config.eval_batch_size
        starts = list(range(0, count, size))
        world, rank = self.dist.world_size, self.dist.rank
        local = network_outputs(self.model, lambda a, b: self._eval_images(name, a, b), count, batch_size=size,
                                starts=starts[rank::world], autocast_dtype=self.autocast_dtype,
                                channels_last=self.channels_last)  # a single process: every batch
        labels = _labels(getattr(self.splits, name), self.device)
        if world == 1:
            return local, labels
        # batch k was embedded by rank k % world as its (k // world)-th batch; only the very last batch of
        # the split can be short, so within a rank batch j starts at row j * size
        parts = self.dist.all_gather_rows(local)
        out = [parts[k % world][(k // world) * size:(k // world) * size + min(size, count - start)]
               for k, start in enumerate(starts)]
        embeddings = torch.cat(out) if out else torch.zeros(0, self.model.embed_dim, device=self.device)
        return embeddings, labels

    def _eval_images(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Evaluation images ``start:stop`` of split ``name`` on the device, float in [0, 1]."""
        dataset = self.eval_sets[name]
        return torch.stack([dataset[i][0] for i in range(start, stop)]).to(self.device)

    @torch.no_grad()
    def calibration_features(self):
        """See `Pipeline.calibration_features`."""
        was_training = self.model.training
        self.model.eval()
        n = min(len(self.train_set), self.config.eval_batch_size)
        dataset = ImageDataset(self.splits.train, EvalTransform(self.resolution))
        images = torch.stack([dataset[i][0] for i in range(n)]).to(self.device)
        features = self.model.features(images)
        self.model.train(was_training)
        return features

    @staticmethod
    def describe(model: EmbeddingModel, config: TrainConfig, resolution: int, device: torch.device) -> str:
        """See `Pipeline.describe`."""
        return f"trunk: fine-tuning the whole {model.spec.name} at {resolution} px on {device}"


class DeviceImagePipeline(ImagePipeline):
    """`ImagePipeline` with the images on the device: every split decoded once into a uint8
    `dml.data.DeviceImageBank` (shorter side resized to ``round(resolution · 256/224)``, centre-cropped to a
    square), random-resized crops and flips of a whole batch by one ``grid_sample``
    (`dml.data.random_resized_crop`), evaluation views by `dml.data.center_crop`. No per-image Python
    work and no host-to-device copy in the training step. The trainer uses it on CUDA when the banks fit
    (``--device-augment auto``).

    The crops of step ``s`` of epoch ``e`` come from a device generator seeded as in `step_seed`; under
    DDP every process draws the parameters of the whole global batch and uses its part, so the crops
    equal a single process's. They differ from `ImagePipeline`'s CPU crops (another generator, and
    crops are clipped rather than redrawn when out of range).

    Args:
        model: the embedding model (moved to ``device`` by the caller).
        splits: the dataset's train / val / test splits.
        config: the run's `dml.config.TrainConfig` (``seed``, ``eval_batch_size``).
        resolution: the crop size in pixels.
        device: where the banks, batches and embeddings live.
        log: receives progress lines.
        dist: the `dml.distributed.DistContext` (default: a single process).
    """

    def _prepare(self, log: Callable[[str], None]) -> None:  # not ImagePipeline's CPU datasets
        splits, device = self.splits, self.device
        side = eval_resize(self.resolution)
        log(f"decoding {len(splits.train) + len(splits.val) + len(splits.test)} images into uint8 banks on {device} "
            f"({side} px)")
        self.banks = {name: DeviceImageBank(getattr(splits, name), side, device) for name in ("train", "val", "test")}
        self.train_labels = self.banks["train"].labels

    @staticmethod
    def fits(splits: Splits, resolution: int, device: torch.device, fraction: float = 0.4) -> bool:
        """Whether the three banks take less than ``fraction`` of the free memory of CUDA ``device``."""
        if device.type != "cuda":
            return False
        side = eval_resize(resolution)
        needed = DeviceImageBank.nbytes(len(splits.train) + len(splits.val) + len(splits.test), side)
        free, _ = torch.cuda.mem_get_info(device)
        return needed < fraction * free

    def train_batches(self, batches, epoch, start=0):
        """See `Pipeline.train_batches`."""
        index = torch.as_tensor(batches, dtype=torch.long).to(self.device)
        total = index.shape[1] if len(batches) else 0
        mine = local_part(total, self.dist.rank, self.dist.world_size)
        generator = torch.Generator(device=self.device)
        for step in range(start, len(batches)):
            generator.manual_seed(step_seed(self.config.seed, epoch, step))
            part = index[step, mine]
            images = random_resized_crop(self.banks["train"].images[part], self.resolution, generator=generator,
                                         draws=(total, mine.start))
            yield self._layout(images), self.train_labels[part]

    def _eval_images(self, name: str, start: int, stop: int) -> torch.Tensor:
        return center_crop(self.banks[name].images[start:stop], self.resolution)

    @torch.no_grad()
    def calibration_features(self):
        """See `Pipeline.calibration_features`."""
        was_training = self.model.training
        self.model.eval()
        n = min(len(self.splits.train), self.config.eval_batch_size)
        with self._autocast():
            features = self.model.features(self._layout(self._eval_images("train", 0, n))).float()
        self.model.train(was_training)
        return features

    @staticmethod
    def describe(model: EmbeddingModel, config: TrainConfig, resolution: int, device: torch.device) -> str:
        """See `Pipeline.describe`."""
        return (f"trunk: fine-tuning the whole {model.spec.name} at {resolution} px on {device}, images and "
                "augmentation on the device")


class FeaturePipeline(Pipeline):
    """Frozen trunk: pooled features of ``feature_views`` augmented views of every training image (and of
    the evaluation crops) are computed once; training then only runs the embedding head and the loss.

    View 0 is the evaluation centre crop; with ``feature_views`` > 1 the others are random-resized crops
    with flips, and a batch picks one cached view of each image at random (on emoji, extra views
    measured worse than the centre crop alone, hence the default of 1). The views are drawn from a
    generator seeded with the run's seed: a resumed run recomputes exactly the same features.

    Args:
        model: the embedding model (moved to ``device`` by the caller).
        splits: the dataset's train / val / test splits.
        config: the run's `dml.config.TrainConfig` (``seed``, ``eval_batch_size``, ``feature_views``).
        resolution: the crop size in pixels.
        device: where batches and embeddings live.
        log: receives progress lines (one line saying what is cached).
        dist: the `dml.distributed.DistContext` (default: a single process). Under DDP every process
            caches all features itself (the same ones) and embeds every evaluation image itself.

    Raises:
        DatasetError: if an image cannot be decoded.
    """

    #: what is cached: the pooled trunk features (False) or the prefix activations (`PartialPipeline`)
    _prefix = False

    def _cached(self, split: Split) -> torch.Tensor:
        """The cached outputs of a split's evaluation crops (an empty tensor for an empty split)."""
        if not len(split):
            return torch.zeros(0, device=self.device)
        return split_features(self.model, split, self.resolution, self.device, self.config.eval_batch_size,
                              prefix=self._prefix)

    def _prepare(self, log: Callable[[str], None]) -> None:
        splits, config, resolution, device = self.splits, self.config, self.resolution, self.device
        self.views = max(1, int(config.feature_views))
        generator = torch.Generator().manual_seed(10_007 * config.seed + 1)
        train_transform = TrainTransform(resolution, generator=generator)
        cache = self._cache_path(splits, config, resolution)
        what = "the frozen part's activations" if self._prefix else "frozen-trunk features"
        if cache is not None and cache.is_file():
            log(f"loading cached {what} from {cache}")
            stored = torch.load(cache, map_location=device, weights_only=True)
            self.train_features, self.eval_features = stored["train"], {k: stored[k] for k in ("val", "test")}
        else:
            views = "the centre crop" if self.views == 1 else f"{self.views} views (centre crop + random crops)"
            log(f"caching {what}: {len(splits.train)} training images × {views}, "
                f"{len(splits.val) + len(splits.test)} evaluation images, {resolution} px, on {device}")
            features = [self._cached(splits.train)]
            raw_train = ImageDataset(splits.train, None, max_side=eval_resize(resolution))
            for _ in range(1, self.views):  # view 0 (above): the plain centre crop
                features.append(self._features(raw_train, train_transform))
            self.train_features = torch.stack(features, dim=1)  # [N, V, F] or [N, V, C, h, w]
            self.eval_features = {name: self._cached(getattr(splits, name)) for name in ("val", "test")}
            if cache is not None and self.dist.is_main:
                save_checkpoint(cache, {"train": self.train_features.cpu(),
                                        **{k: v.cpu() for k, v in self.eval_features.items()}})
                log(f"saved the features to {cache}")
        self.train_labels = _labels(splits.train, device)
        self.eval_labels = {name: _labels(getattr(splits, name), device) for name in ("val", "test")}

    def _cache_path(self, splits: Splits, config: TrainConfig, resolution: int) -> Path | None:
        """``feature_cache/<key>.pt`` for these features, or None without ``--feature-cache``.

        The key hashes everything the features depend on: the image paths, the backbone and its weights
        file (path, size and modification time), pooling, resolution, views (and the seed when there are
        random views) and the torch version.
        """
        cache_dir = config.feature_cache
        if not cache_dir:
            return None
        weights = config.weights
        if weights not in (None, "none", "default") and Path(weights).is_file():
            stat = Path(weights).stat()
            weights = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        key = {
            "paths": [list(getattr(splits, n).paths) for n in ("train", "val", "test")],
            "backbone": config.backbone, "weights": weights, "pooling": config.pooling, "resolution": resolution,
            "views": self.views, "seed": config.seed if self.views > 1 else None, "torch": torch.__version__,
        }
        if self._prefix:  # older keys unchanged: their cached files stay valid
            key["prefix"] = "partial"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return Path(cache_dir) / f"{splits.name}-{config.backbone}-{resolution}px-{digest}.pt"

    def _features(self, raw: ImageDataset, transform: TrainTransform) -> torch.Tensor:
        """Features of one random view of every image of ``raw`` (the transform draws the crops in order)."""
        to_channels_last(self.model)
        return network_outputs(self.model, _loader(raw, self.device, transform), len(raw),
                               batch_size=self.config.eval_batch_size, channels_last=True, features=not self._prefix,
                               prefix=self._prefix)

    def train_batches(self, batches, epoch, start=0):
        """See `Pipeline.train_batches`."""
        # the whole epoch's indices and views go to the device at once: no per-step host-to-device copy
        # (the views are drawn for the global batches; a process keeps the columns of its part)
        index = torch.as_tensor(batches, dtype=torch.long).to(self.device)
        views = torch.randint(self.views, tuple(index.shape), generator=step_generator(self.config.seed, epoch, 0))
        views = views.to(self.device)
        mine = local_part(index.shape[1] if len(batches) else 0, self.dist.rank, self.dist.world_size)
        if self.dist.world_size > 1:
            index, views = index[:, mine], views[:, mine]
        for step in range(start, len(batches)):
            yield self.train_features[index[step], views[step]], self.train_labels[index[step]]

    def embed_train(self, inputs):
        """See `Pipeline.embed_train`."""
        return self.model.embed(inputs)

    @torch.no_grad()
    def embed_split(self, name):
        """See `Pipeline.embed_split`."""
        return self.model.embed(self.eval_features[name]), self.eval_labels[name]

    def calibration_features(self):
        """See `Pipeline.calibration_features`."""
        return self.train_features[:, 0]

    @staticmethod
    def describe(model: EmbeddingModel, config: TrainConfig, resolution: int, device: torch.device) -> str:
        """See `Pipeline.describe`."""
        return (f"trunk: FROZEN {model.spec.name} at {resolution} px on {device}: only the embedding head trains, on "
                "cached trunk features (--trunk partial, the CPU default, also trains the trunk's last stage, "
                "--trunk finetune the whole network)")


class PartialPipeline(FeaturePipeline):
    """Partial trunk (``--trunk partial``): the activations of the trunk's frozen part are cached once, and
    training runs its last part (`dml.models.EmbeddingModel.features_from_prefix`: on EfficientNet-Lite0
    the last stage and the head convolution), the pooling and the head on them.

    The caching is `FeaturePipeline`'s (the same views, the same ``--feature-cache`` folder under another
    key), so a run costs one pass of the frozen part over the data and then a few small convolutions per
    step: on a CPU the trunk's last stage adapts to the data at a small fraction of fine-tuning's cost (the
    CPU default: on the emoji benchmark 3 points of test R@1 above the frozen trunk; see the DML guide).
    Evaluation embeds the cached activations of the evaluation crops (`embeddings_from_prefix`, also used
    by ``dml.evaluate``).

    Args:
        model: the embedding model, built with ``partial_trunk=True`` (moved to ``device`` by the caller).
        splits: the dataset's train / val / test splits.
        config: the run's `dml.config.TrainConfig`.
        resolution: the crop size in pixels.
        device: where batches and embeddings live.
        log: receives progress lines.
        dist: the `dml.distributed.DistContext` (default: a single process).

    Raises:
        DatasetError: if an image cannot be decoded.
    """

    _prefix = True

    def embed_train(self, inputs):
        """See `Pipeline.embed_train`."""
        return self.model.embed(self.model.features_from_prefix(inputs.contiguous(memory_format=torch.channels_last)))

    def embed_split(self, name):
        """See `Pipeline.embed_split`."""
        return embeddings_from_prefix(self.model, self.eval_features[name], self.config.eval_batch_size), \
            self.eval_labels[name]

    def calibration_features(self):
        """See `Pipeline.calibration_features`."""
        return embeddings_from_prefix(self.model, self.train_features[:, 0], self.config.eval_batch_size,
                                      features=True)

    @staticmethod
    def describe(model: EmbeddingModel, config: TrainConfig, resolution: int, device: torch.device) -> str:
        """See `Pipeline.describe`."""
        trained = sum(p.numel() for p in model.trunk.parameters() if p.requires_grad)
        return (f"trunk: PARTIAL {model.spec.name} at {resolution} px on {device}: its last part "
                f"({trained / 1e6:.2f} M parameters) and the embedding head train, on cached activations of the "
                "frozen part (the CPU default; --trunk finetune trains the whole network, --trunk frozen only the "
                "head)")
