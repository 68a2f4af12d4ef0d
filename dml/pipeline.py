"""How training batches and evaluation embeddings are produced: from images (fine-tuning the whole
network) or from cached features of a frozen trunk (head-only training, the CPU default)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from dml.data import EvalTransform, ImageDataset, Split, Splits, TrainTransform
from dml.models import EmbeddingModel

if TYPE_CHECKING:  # for the annotations only
    from dml.config import TrainConfig


def _labels(split: Split, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(split.labels, dtype=torch.long, device=device)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator for the augmentation of one training step (independent of the global RNG).

    Args:
        seed: the run's seed.
        epoch: the epoch (from 0).
        step: the step within the epoch (from 0).

    Returns:
        A `torch.Generator` seeded with ``(seed · 1000003 + epoch) · 1000033 + step``.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)


class Pipeline:
    """Interface used by the trainer: training batches, training embeddings and evaluation embeddings.

    Implemented by `ImagePipeline` (fine-tuning) and `FeaturePipeline` (frozen trunk); the methods
    here raise `NotImplementedError`.

    Attributes:
        model: the `dml.models.EmbeddingModel` being trained.
    """

    model: EmbeddingModel

    def train_batches(self, batches: Sequence[list[int]], epoch: int, start: int = 0
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` on the device for ``batches[start:]`` (lists of training indices).

        The augmentation of step ``s`` of epoch ``e`` draws from its own generator seeded with
        (seed, e, s), so a run resumed mid-epoch sees exactly the batches it would have seen.

        Args:
            batches: the epoch's batches, each a list of training-set indices.
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

    Raises:
        DatasetError: if an image cannot be decoded.
    """

    def __init__(self, model: EmbeddingModel, splits: Splits, config: TrainConfig, resolution: int, device: torch.device,
                 log: Callable[[str], None] = print):
        self.model, self.splits, self.config, self.device = model, splits, config, device
        self.resolution = resolution
        max_side = round(resolution * 256 / 224)  # the eval resize; random crops come from the same image
        self.train_set = ImageDataset(splits.train, None, max_side=max_side)
        self.eval_sets = {name: ImageDataset(getattr(splits, name), EvalTransform(resolution), max_side=max_side)
                          for name in ("val", "test")}
        self.train_labels = _labels(splits.train, device)

    def train_batches(self, batches, epoch, start=0):
        """See `Pipeline.train_batches`."""
        index = torch.as_tensor(batches, dtype=torch.long).to(self.device)
        for step in range(start, len(batches)):
            transform = TrainTransform(self.resolution, generator=step_generator(self.config.seed, epoch, step))
            images = torch.stack([transform(self.train_set.image(i)) for i in batches[step]])
            if self.device.type == "cuda":
                images = images.pin_memory()  # lets the copy overlap with the previous step's kernels
            yield images.to(self.device, non_blocking=True), self.train_labels[index[step]]

    def embed_train(self, inputs):
        """See `Pipeline.embed_train`."""
        return self.model(inputs)

    @torch.no_grad()
    def embed_split(self, name):
        """See `Pipeline.embed_split`."""
        was_training = self.model.training
        self.model.eval()
        chunks = []
        dataset = self.eval_sets[name]
        size = self.config.eval_batch_size
        for start in range(0, len(dataset), size):
            images = torch.stack([dataset[i][0] for i in range(start, min(start + size, len(dataset)))])
            chunks.append(self.model(images.to(self.device)).float())
        self.model.train(was_training)
        if not chunks:
            return torch.zeros(0, self.model.embed_dim, device=self.device), _labels(getattr(self.splits, name), self.device)
        return torch.cat(chunks), _labels(getattr(self.splits, name), self.device)

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

    Raises:
        DatasetError: if an image cannot be decoded.
    """

    def __init__(self, model: EmbeddingModel, splits: Splits, config: TrainConfig, resolution: int, device: torch.device,
                 log: Callable[[str], None] = print):
        self.model, self.splits, self.config, self.device = model, splits, config, device
        self.resolution = resolution
        self.views = max(1, int(config.feature_views))
        max_side = round(resolution * 256 / 224)
        generator = torch.Generator().manual_seed(10_007 * config.seed + 1)
        train_transform = TrainTransform(resolution, generator=generator)
        eval_transform = EvalTransform(resolution)
        raw_train = ImageDataset(splits.train, None, max_side=max_side)
        views = "the centre crop" if self.views == 1 else f"{self.views} views (centre crop + random crops)"
        log(f"caching frozen-trunk features: {len(raw_train)} training images × {views}, "
            f"{len(splits.val) + len(splits.test)} evaluation images, {resolution} px, on {device}")
        features = []
        for v in range(self.views):
            transform = eval_transform if v == 0 else train_transform  # view 0: the plain centre crop
            features.append(self._features(raw_train, transform))
        self.train_features = torch.stack(features, dim=1)  # [N, V, F]
        self.eval_features = {name: self._features(ImageDataset(getattr(splits, name), None, max_side=max_side),
                                                   eval_transform) for name in ("val", "test")}
        self.train_labels = _labels(splits.train, device)
        self.eval_labels = {name: _labels(getattr(splits, name), device) for name in ("val", "test")}

    @torch.no_grad()
    def _features(self, raw: ImageDataset, transform) -> torch.Tensor:
        self.model.eval()
        out = []
        size = self.config.eval_batch_size
        self.model.to(memory_format=torch.channels_last)  # 1.4-2x faster convolutions on CPU (oneDNN)
        for start in range(0, len(raw), size):
            images = torch.stack([transform(raw[i][0]) for i in range(start, min(start + size, len(raw)))])
            images = images.to(self.device).contiguous(memory_format=torch.channels_last)
            out.append(self.model.features(images).float())
        self.model.train()
        if not out:
            return torch.zeros(0, self.model.spec.feature_dim, device=self.device)
        return torch.cat(out)

    def train_batches(self, batches, epoch, start=0):
        """See `Pipeline.train_batches`."""
        # the whole epoch's indices and views go to the device at once: no per-step host-to-device copy
        index = torch.as_tensor(batches, dtype=torch.long).to(self.device)
        views = torch.randint(self.views, tuple(index.shape), generator=step_generator(self.config.seed, epoch, 0))
        views = views.to(self.device)
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
                "cached trunk features (the CPU default; on a GPU, or with --trunk finetune, the whole network "
                "is fine-tuned)")
