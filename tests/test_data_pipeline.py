"""Joint augmentation, region sampling, the training view, batching and data specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from rmae.data import (
    DataError,
    JointCenterCrop,
    JointRandomResizedCrop,
    RegionDataset,
    RegionLoader,
    build_dataset,
    collate_regions,
    denormalize,
    parse_data_spec,
    sample_regions,
    to_tensor,
)
from rmae.data.transforms import random_resized_crop_box

RED = np.array([230, 20, 20])
GRAY = np.array([120, 120, 120])


def _planted(h=80, w=100, box=(20, 50, 10, 40)):
    """Gray image with a red square at rows y0:y1, cols x0:x1, and its label map (1 = square,
    2 = the rest). Placed off-centre so a missed flip or a shifted crop shows."""
    y0, y1, x0, x1 = box
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GRAY
    img[y0:y1, x0:x1] = RED
    lab = np.full((h, w), 2, np.int32)
    lab[y0:y1, x0:x1] = 1
    return img, lab


def _check_aligned(img: np.ndarray, region: np.ndarray) -> None:
    """Interior pixels (2 px from any edge, where bicubic ringing cannot reach) of the region
    are red, interior pixels of its complement gray."""
    inside = ndimage.binary_erosion(region, iterations=2)
    outside = ndimage.binary_erosion(~region, iterations=2)
    assert np.abs(img[inside].astype(int) - RED).max(initial=0) <= 12
    assert np.abs(img[outside].astype(int) - GRAY).max(initial=0) <= 12


def test_crop_and_flip_keep_image_and_maps_aligned():
    img, lab = _planted()
    t = JointRandomResizedCrop(64)
    flips = hits = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        out, maps = t(img, {"regions": lab[None], "instances": (lab == 1).astype(np.int32)}, rng)
        assert out.shape == (64, 64, 3) and maps["regions"].shape == (1, 64, 64)
        square = maps["regions"][0] == 1
        assert np.array_equal(square, maps["instances"] == 1)  # every map moved alike
        assert set(np.unique(maps["regions"])) <= {1, 2}  # nearest: no invented labels
        _check_aligned(out, square)
        hits += ndimage.binary_erosion(square, iterations=2).sum() > 20
        # the crop box and flip decision the transform drew
        rng = np.random.default_rng(seed)
        random_resized_crop_box(80, 100, rng)
        flips += rng.random() < 0.5
    assert hits >= 20 and 5 <= flips <= 35  # the square was seen, both flip states occurred


def test_eval_transform_is_deterministic_and_centred():
    img, lab = _planted()
    t = JointCenterCrop(64, crop_pct=1.0)
    a, ma = t(img, {"m": lab})
    b, mb = t(img, {"m": lab})
    assert np.array_equal(a, b) and np.array_equal(ma["m"], mb["m"])
    _check_aligned(a, ma["m"] == 1)
    # crop_pct=1 keeps the whole short side: the square's rows 20..50 of 80 map to 16..40 of 64
    rows = np.nonzero((ma["m"] == 1).any(1))[0]
    assert abs(rows.min() - 16) <= 1 and abs(rows.max() + 1 - 40) <= 1


def test_small_images_are_upsampled_to_the_crop():
    img = np.random.default_rng(0).integers(0, 255, (10, 7, 3), np.uint8)
    out, maps = JointRandomResizedCrop(64)(img, {"m": np.ones((10, 7), np.int32)},
                                           np.random.default_rng(1))
    assert out.shape == (64, 64, 3) and maps["m"].shape == (64, 64)


def _maps(n_segments: int, h=16, w=16) -> np.ndarray:
    lab = np.zeros((1, h, w), np.int32)
    flat = lab.reshape(-1)
    flat[:] = np.arange(flat.size) % n_segments + 1 if n_segments else 0
    return lab


def test_sampling_gives_k_distinct_maps_when_enough_segments():
    k = 8
    regions, n = sample_regions(_maps(20), k, np.random.default_rng(0))
    assert regions.shape == (8, 16, 16) and regions.dtype == np.uint8 and n == 20
    assert set(np.unique(regions)) <= {0, 1}
    assert len({r.tobytes() for r in regions}) == k  # without replacement


def test_sampling_repeats_when_fewer_segments_than_k():
    k = 8
    for n_seg in (1, 3, 5):
        maps = _maps(n_seg)
        segs = {(maps[0] == i).astype(np.uint8).tobytes() for i in range(1, n_seg + 1)}
        for seed in range(10):
            regions, n = sample_regions(maps, k, np.random.default_rng(seed))
            assert regions.shape[0] == k and n == n_seg
            got = [r.tobytes() for r in regions]
            assert set(got) <= segs  # only real segments
            counts = [got.count(s) for s in segs]
            # tile c = ceil(k/n) copies, shuffle, truncate c·n − k: each segment appears at
            # most c times and loses at most the truncated ones (official R-MAE rule)
            c = -(-k // n_seg)
            assert sum(counts) == k and max(counts) <= c
            assert min(counts) >= max(0, c - (c * n_seg - k))
    # all scales are pooled
    two = np.concatenate([_maps(2), _maps(4)])
    regions, n = sample_regions(two, 6, np.random.default_rng(0))
    assert n == 6 and len({r.tobytes() for r in regions}) == 6
    # no segment at all: k empty maps
    regions, n = sample_regions(_maps(0), 4, np.random.default_rng(0))
    assert n == 0 and regions.shape == (4, 16, 16) and regions.sum() == 0


def test_sampling_min_size_and_min_patches():
    lab = np.ones((1, 32, 32), np.int32)
    lab[0, :2, :2] = 2            # 4 px, one patch
    lab[0, 16:, :] = 3            # 512 px, 8 patches of 8
    regions, n = sample_regions(lab, 4, np.random.default_rng(0), min_size=10)
    assert n == 2 and not any(r[:2, :2].all() and r.sum() == 4 for r in regions)
    regions, n = sample_regions(lab, 4, np.random.default_rng(0), min_patches=2, patch_size=8)
    assert n == 2
    # filters that remove everything fall back to all segments
    regions, n = sample_regions(lab, 4, np.random.default_rng(0), min_size=10_000)
    assert n == 3


def test_region_dataset_items_and_collate(tmp_path):
    base = build_dataset("scenes:train:16", image_size=64)
    ds = RegionDataset(base, source="fh", cache=tmp_path, num_regions=8, image_size=64)
    items = [ds[i] for i in range(4)]
    b = collate_regions(items)
    assert b["images"].shape == (4, 3, 64, 64) and b["images"].dtype == torch.float32
    assert b["regions"].shape == (4, 8, 64, 64) and b["regions"].dtype == torch.float32
    assert set(torch.unique(b["regions"]).tolist()) <= {0.0, 1.0}
    assert b["instances"].shape == (4, 64, 64) and b["instances"].dtype == torch.long
    assert b["classes"].shape == (4, 64, 64) and b["label"].shape == (4,)
    assert b["index"].tolist() == [0, 1, 2, 3] and b["skipped"] == []
    # every region map is a union-free single segment of one scale: never empty with FH
    assert (b["regions"].flatten(2).sum(-1) > 0).all()
    # normalised with ImageNet statistics, and denormalize undoes it
    assert b["images"].min() < 0
    raw = denormalize(b["images"])
    assert raw.min() >= 0 and raw.max() <= 1
    t = to_tensor(base[0]["image"])
    assert torch.allclose(denormalize(t), torch.from_numpy(base[0]["image"]).permute(2, 0, 1) / 255,
                          atol=1e-5)
    # no source: no regions (MAE)
    plain = RegionDataset(base, source=None, normalize=False)[0]
    assert "regions" not in plain and 0 <= plain["image"].min() and plain["image"].max() <= 1


def test_region_dataset_is_reproducible_and_epochs_differ(tmp_path):
    base = build_dataset("scenes:train:8", image_size=64)
    a = RegionDataset(base, source="gt", seed=1)
    b = RegionDataset(base, source="gt", seed=1)
    x, y = a[3], b[3]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["regions"], y["regions"])
    b.set_epoch(1)
    assert not torch.equal(a[3]["image"], b[3]["image"])  # a new crop next epoch
    ev = RegionDataset(base, source="gt", train=False)
    assert torch.equal(ev[2]["image"], ev[2]["image"])


def test_loader_batches_do_not_depend_on_worker_count():
    base = build_dataset("scenes:train:12", image_size=32)
    ds = RegionDataset(base, source="gt", num_regions=4, image_size=32, seed=5)

    def epochs(workers):
        loader = RegionLoader(ds, batch_size=4, num_workers=workers, seed=7)
        return [[(b["index"].tolist(), b["images"].sum().item(), b["regions"].sum().item())
                 for b in loader] for _ in range(2)]

    single, double = epochs(0), epochs(2)
    assert single == double
    assert single[0] != single[1]  # epochs shuffle and augment differently


def test_data_spec_parsing_and_errors(tmp_path):
    assert str(parse_data_spec("scenes")) == "scenes:train"
    s = parse_data_spec("scenes:val:1000")
    assert (s.kind, s.split, s.length) == ("scenes", "val", 1000)
    assert parse_data_spec("scenes:500").length == 500
    c = parse_data_spec("coco:/d/a:b/val2017:/d/ann.json")
    assert (c.path, c.annotations) == ("/d/a:b/val2017", "/d/ann.json")
    assert parse_data_spec("folder:/x/y").path == "/x/y"
    for bad, msg in (("scenes:dev", "neither a split"), ("coco:/only", "image folder and a JSON"),
                     ("folder:", "needs a path"), ("imagenet", "unknown kind 'imagenet'"),
                     ("", "empty"), ("photos:3", "no arguments")):
        with pytest.raises(DataError, match=msg) as err:
            parse_data_spec(bad)
        assert "Valid forms" in str(err.value)
    with pytest.raises(DataError, match=f"write folder:{tmp_path}"):
        parse_data_spec(str(tmp_path))
    photos = build_dataset("photos")
    assert len(photos) > 5
