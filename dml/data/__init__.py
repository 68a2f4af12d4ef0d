"""Data for the deep-metric-learning trainer: class-disjoint splits (the emoji benchmark of four artists
among them), image decoding and caching,
torch-only transforms, image degradations, the data fingerprint of a run and class-balanced batch
sampling."""

from .datasets import DATASETS, DatasetError, Split, Splits, load_splits
from .device_augment import DeviceImageBank, center_crop, random_resized_crop
from .emoji import DEFAULT_EMOJI_ARTISTS, EMOJI_ARTISTS, default_emoji_root
from .fingerprint import data_changes, data_fingerprint
from .images import ImageDataset, decode_image
from .sampler import ClassBalancedBatchSampler
from .transforms import EvalTransform, TrainTransform, eval_resize

__all__ = [
    "DATASETS",
    "DEFAULT_EMOJI_ARTISTS",
    "EMOJI_ARTISTS",
    "ClassBalancedBatchSampler",
    "DatasetError",
    "DeviceImageBank",
    "EvalTransform",
    "ImageDataset",
    "Split",
    "Splits",
    "TrainTransform",
    "center_crop",
    "data_changes",
    "data_fingerprint",
    "decode_image",
    "default_emoji_root",
    "eval_resize",
    "load_splits",
    "random_resized_crop",
]
