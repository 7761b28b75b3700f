"""Data and regions for R-MAE: datasets, region sources with an on-disk cache, joint
augmentation, region sampling and batching.

Typical use::

    from rmae.data import build_dataset, RegionDataset, RegionLoader
    base = build_dataset("scenes:train", image_size=64)           # or folder:…, coco:…:…
    ds = RegionDataset(base, source="fh", num_regions=8, image_size=64)
    for batch in RegionLoader(ds, batch_size=64, num_workers=2, seed=0):
        images, regions = batch["images"], batch["regions"]        # [B,3,H,W], [B,k,H,W]
    print(ds.summary())                                             # skipped files, if any

Modules: ``specs`` (spec strings → datasets), ``scenes``, ``photos``, ``folder``, ``coco``
(datasets), ``imageio`` (robust decoding), ``regions`` (sources), ``cache``, ``precompute``,
``transforms``, ``sampling``, ``pipeline``, ``cli`` (``rmae regions precompute``).
"""

from .base import BadSampleError, BaseDataset, DataError, SkipLog
from .cache import RegionCache, default_cache_dir
from .coco import CocoDataset
from .folder import ImageFolderDataset
from .imageio import IMAGE_EXTENSIONS, load_image, load_label_map
from .photos import PhotosDataset
from .pipeline import RegionDataset, RegionLoader, collate_regions, evaluation_loader, seed_worker
from .precompute import PrecomputeStats, precompute_regions
from .regions import (
    FelzenszwalbSource,
    GroundTruthSource,
    LabelMapSource,
    PanopticSource,
    RegionSource,
    SlicSource,
    parse_region_source,
)
from .sampling import sample_regions
from .scenes import SHAPES, ScenesDataset, generate_scene
from .specs import DataSpec, build_dataset, parse_data_spec
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JointCenterCrop,
    JointRandomResizedCrop,
    denormalize,
    to_tensor,
)

__all__ = [
    "BadSampleError", "BaseDataset", "DataError", "SkipLog",
    "RegionCache", "default_cache_dir",
    "CocoDataset", "ImageFolderDataset", "PhotosDataset", "ScenesDataset", "SHAPES",
    "generate_scene", "IMAGE_EXTENSIONS", "load_image", "load_label_map",
    "RegionDataset", "RegionLoader", "collate_regions", "evaluation_loader", "seed_worker",
    "PrecomputeStats", "precompute_regions",
    "RegionSource", "FelzenszwalbSource", "SlicSource", "GroundTruthSource", "PanopticSource",
    "LabelMapSource", "parse_region_source", "sample_regions",
    "DataSpec", "build_dataset", "parse_data_spec",
    "IMAGENET_MEAN", "IMAGENET_STD", "JointCenterCrop", "JointRandomResizedCrop",
    "denormalize", "to_tensor",
]
