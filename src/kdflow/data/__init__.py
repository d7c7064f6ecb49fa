"""Data: sources (`sources`, `s3`), transfer set-ups and hashed splits (`splits`), the prepared dataset and its
manifest (`dataset`), and batched augmentation (`augment`). The names below are the package's public API."""

from kdflow.data.dataset import (
    SPLITS,
    TASKS,
    Normalizer,
    load_imageset,
    load_split,
    prepare,
    read_manifest,
    tensor_hash,
)
from kdflow.data.sources import (
    TORCHVISION_SOURCES,
    ImageSet,
    load_digits_set,
    load_imagefolder,
    load_mnist_idx,
    load_source,
    load_torchvision,
    load_usps,
    read_idx,
    read_usps_libsvm,
    s3_cache_root,
)
from kdflow.data.splits import (
    apply_shift,
    build_tasks,
    conform,
    hashed_split,
    limit_per_class,
    sample_hashes,
    select_classes,
    split_task,
)
from kdflow.errors import DataError

__all__ = [
    "SPLITS",
    "TASKS",
    "TORCHVISION_SOURCES",
    "DataError",
    "ImageSet",
    "Normalizer",
    "apply_shift",
    "build_tasks",
    "conform",
    "hashed_split",
    "limit_per_class",
    "load_digits_set",
    "load_imagefolder",
    "load_imageset",
    "load_mnist_idx",
    "load_source",
    "load_split",
    "load_torchvision",
    "load_usps",
    "prepare",
    "read_idx",
    "read_manifest",
    "read_usps_libsvm",
    "sample_hashes",
    "s3_cache_root",
    "select_classes",
    "split_task",
    "tensor_hash",
]
