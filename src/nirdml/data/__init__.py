"""Datasets, zero-shot splits, class-balanced samplers, transforms, downloads and caching.

``load_dataset(name, root)`` returns the class-disjoint train/test (and optional
validation) splits of the paper's protocol (method.md sections 5-6), transformed with the
dataset's preset. The datasets are listed once, in :mod:`nirdml.data.registry`.

The names are imported lazily (PEP 562), so config validation reads the torch-free
registry without importing torch.
"""

from __future__ import annotations

from nirdml.runtime import lazy_attributes

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "DatasetSplits": "nirdml.data.base",
    "RetrievalDataset": "nirdml.data.base",
    "build_cache": "nirdml.data.cache",
    "cached": "nirdml.data.cache",
    "load_image_folder": "nirdml.data.custom",
    "fetch_dataset": "nirdml.data.download",
    "CorruptImageError": "nirdml.data.errors",
    "DatasetLayoutError": "nirdml.data.errors",
    "MissingImageError": "nirdml.data.errors",
    "SamplerConfigError": "nirdml.data.errors",
    "auto_val_classes": "nirdml.data.load",
    "default_transform_preset": "nirdml.data.registry",
    "file_reader": "nirdml.data.load",
    "load_dataset": "nirdml.data.load",
    "DATASETS": "nirdml.data.registry",
    "ClassBalancedBatchSampler": "nirdml.data.samplers",
    "carve_validation": "nirdml.data.splits",
    "split_class_names": "nirdml.data.splits",
    "build_transforms": "nirdml.data.transforms",
    "VerifyReport": "nirdml.data.verify",
    "verify": "nirdml.data.verify",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DATASETS",
    "ClassBalancedBatchSampler",
    "CorruptImageError",
    "DatasetLayoutError",
    "DatasetSplits",
    "MissingImageError",
    "RetrievalDataset",
    "SamplerConfigError",
    "VerifyReport",
    "auto_val_classes",
    "build_cache",
    "build_transforms",
    "cached",
    "carve_validation",
    "fetch_dataset",
    "default_transform_preset",
    "file_reader",
    "load_dataset",
    "load_image_folder",
    "split_class_names",
    "verify",
]
