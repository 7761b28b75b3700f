"""The embedded `scenes` dataset and the shipped `photos`: determinism, splits, exact masks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from rmae.data import SHAPES, PhotosDataset, ScenesDataset, build_dataset, generate_scene


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = ScenesDataset("train", size=64, seed=3), ScenesDataset("train", size=64, seed=3)
    for i in (0, 7, 123):
        x, y = a[i], b[i]
        assert np.array_equal(x["image"], y["image"])
        assert np.array_equal(x["instances"], y["instances"])
        assert np.array_equal(x["instance_classes"], y["instance_classes"])
    # Order of access does not matter (no hidden sequential state).
    assert np.array_equal(a[5]["image"], ScenesDataset("train", seed=3)[5]["image"])
    # Another seed is another stream.
    assert not np.array_equal(a[0]["image"], ScenesDataset("train", seed=4)[0]["image"])


def test_splits_never_share_an_image():
    seen = {}
    for split in ("train", "val", "test"):
        ds = ScenesDataset(split, size=32)
        hashes = {_digest(ds[i]["image"]) for i in range(120)}
        assert len(hashes) == 120, f"duplicate images inside {split}"
        seen[split] = hashes
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_flat_scene_pixels_are_exactly_background_or_instance_colour():
    # With flat fills only, the image is fully explained by the background plus one colour per
    # instance: masks cover exactly the drawn pixels, no more, no fewer.
    for seed in range(40):
        sc = generate_scene(np.random.default_rng(seed), 64, fill_kinds=("flat",))
        bg = sc.instances == 0
        assert np.array_equal(sc.image[bg], sc.background[bg])
        for i, fill in enumerate(sc.fills, start=1):
            px = sc.image[sc.instances == i]
            assert (px == np.array(fill["colors"][0], np.uint8)).all(), f"seed {seed} instance {i}"


def test_scene_ground_truth_is_consistent():
    min_area = max(12, 64 * 64 // 100)
    for seed in range(60):
        sc = generate_scene(np.random.default_rng(seed), 64)
        n = len(sc.instance_classes)
        assert 2 <= n <= 6
        ids, counts = np.unique(sc.instances, return_counts=True)
        fg = ids > 0
        # ids are exactly 1..n and no object vanished under the others
        assert list(ids[fg]) == list(range(1, n + 1))
        assert counts[fg].min() >= min_area
        assert ((sc.instance_classes >= 1) & (sc.instance_classes <= len(SHAPES))).all()
        lut = np.concatenate([[0], sc.instance_classes])
        assert np.array_equal(sc.classes, lut[sc.instances])
        for i in range(1, n + 1):
            ys, xs = np.nonzero(sc.instances == i)
            assert tuple(sc.boxes[i - 1]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            fill = sc.fills[i - 1]
            px = sc.image[sc.instances == i]
            if fill["kind"] == "flat":
                assert (px == np.array(fill["colors"][0], np.uint8)).all()
            elif fill["kind"] in ("stripes", "checker"):
                c0, c1 = (np.array(c, np.uint8) for c in fill["colors"])
                assert ((px == c0).all(1) | (px == c1).all(1)).all()
        # outside every object the background shows untouched
        bg = sc.instances == 0
        assert np.array_equal(sc.image[bg], sc.background[bg])


def test_scenes_dataset_sample_contract_and_sizes(tmp_path):
    for size in (32, 96):
        s = ScenesDataset("val", size=size)[3]
        assert s["image"].shape == (size, size, 3) and s["image"].dtype == np.uint8
        assert s["instances"].shape == (size, size) and s["instances"].dtype == np.int32
        areas = np.bincount(s["instances"].ravel())[1:]
        assert s["label"] == s["instance_classes"][np.argmax(areas)] - 1
    ds = build_dataset("scenes:test:17", image_size=48)
    assert len(ds) == 17 and ds.split == "test" and ds[16]["image"].shape == (48, 48, 3)
    with pytest.raises(IndexError):
        ds[17]
    with pytest.raises(ValueError, match="size >= 16"):
        generate_scene(np.random.default_rng(0), 8)


def test_scenes_disk_cache_returns_the_same_scene(tmp_path):
    fresh = ScenesDataset("train", size=40)[9]
    cached = ScenesDataset("train", size=40, cache_dir=tmp_path)
    first = cached[9]
    files = list(tmp_path.rglob("9.npz"))
    assert len(files) == 1, "scene was not written to the cache"
    again = cached[9]  # read back from disk
    for k in ("image", "instances", "classes", "instance_classes", "boxes"):
        assert np.array_equal(first[k], fresh[k]) and np.array_equal(again[k], fresh[k])
    assert again["label"] == fresh["label"]


def test_photos_are_real_shipped_images():
    ds = PhotosDataset()
    assert len(ds) >= 10
    keys = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].dtype == np.uint8 and s["image"].ndim == 3 and s["image"].shape[2] == 3
        assert max(s["image"].shape[:2]) <= 512
        assert s["image"].std() > 10  # a photograph, not a blank
        keys.add(s["key"])
    assert len(keys) == len(ds)
    assert "instances" not in ds[0]
