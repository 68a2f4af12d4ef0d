"""Data for the deep-metric-learning trainer: class-disjoint splits, image decoding and caching,
torch-only transforms, image degradations, the data fingerprint of a run and class-balanced batch
sampling."""

from .datasets import DATASETS, DatasetError, Split, Splits, default_emoji_root, load_splits
from .device_augment import DeviceImageBank, center_crop, random_resized_crop
from .fingerprint import data_changes, data_fingerprint
from .images import ImageDataset, decode_image
from .sampler import ClassBalancedBatchSampler
from .transforms import EvalTransform, TrainTransform, eval_resize

__all__ = [
    "DATASETS",
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
