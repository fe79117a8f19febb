"""Data loading: images, masks and the ``meta.json`` datasets."""
from crane.data.dataset import CraneDataset, DatasetError
from crane.data.image import OPENAI_MEAN, OPENAI_STD, ImageInput, ImageReadError, load_mask, load_rgb, preprocess

__all__ = [
    "CraneDataset",
    "DatasetError",
    "ImageInput",
    "ImageReadError",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "load_mask",
    "load_rgb",
    "preprocess",
]
