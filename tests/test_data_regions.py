"""Region sources, the on-disk cache, parallel precompute and the `regions` CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from rmae.data import (
    BadSampleError,
    DataError,
    FelzenszwalbSource,
    GroundTruthSource,
    LabelMapSource,
    PanopticSource,
    RegionCache,
    RegionDataset,
    ScenesDataset,
    SlicSource,
    build_dataset,
    parse_region_source,
    precompute_regions,
)
from rmae.data.cli import add_regions_subcommand, main as cli_main
from rmae.data.regions import FH_AREA_EXPONENT, FH_REFERENCE_AREA


@pytest.fixture(scope="module")
def scene():
    return ScenesDataset("train", size=64)[0]


def test_fh_is_multiscale_and_matches_skimage(scene):
    from skimage.segmentation import felzenszwalb

    src = FelzenszwalbSource()
    maps = src(scene)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.int32
    assert maps.min() >= 1  # FH puts every pixel in a segment; 0 is reserved for "none"
    counts = [len(np.unique(m)) for m in maps]
    assert counts[0] >= counts[1] >= counts[2] >= 1  # larger scale, fewer segments
    s = 1000 * (64 * 64 / FH_REFERENCE_AREA) ** FH_AREA_EXPONENT
    assert src.effective_scales(64, 64)[1] == pytest.approx(s)
    ref = felzenszwalb(scene["image"], scale=s, min_size=round(s)) + 1
    assert np.array_equal(maps[1], ref)
    paper = parse_region_source("fh:paper")
    assert paper.effective_scales(64, 64) == (500.0, 1000.0, 1500.0)
    assert parse_region_source("fh:1000:abs").scales == (1000.0,) and not parse_region_source(
        "fh:1000:abs").relative


def test_slic_gt_panoptic(scene):
    slic = SlicSource((8, 32))(scene)
    assert slic.shape == (2, 64, 64) and len(np.unique(slic[1])) > len(np.unique(slic[0])) > 1
    gt = GroundTruthSource()(scene)
    assert np.array_equal(gt[0], scene["instances"])
    pan = PanopticSource()(scene)[0]
    inst = scene["instances"]
    n = inst.max()
    assert np.array_equal(pan[inst > 0], inst[inst > 0])  # instances untouched
    stuff = pan[inst == 0]
    assert (stuff[stuff > 0] > n).all() and len(np.unique(stuff[stuff > 0])) >= 1
    with pytest.raises(DataError, match="needs instances"):
        GroundTruthSource()({"image": scene["image"], "key": "photo"})


def test_cache_hit_is_identical_and_parameters_invalidate(scene, tmp_path):
    cache = RegionCache(tmp_path)
    src = FelzenszwalbSource()
    first = src(scene, cache)
    assert cache.misses == 1 and cache.hits == 0
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 1 and not list(tmp_path.rglob("*.tmp"))  # atomic: no temp left
    again = src(scene, cache)
    assert cache.hits == 1 and np.array_equal(first, again)
    # a changed parameter is another key: never the stale map
    other = FelzenszwalbSource((250, 500))
    assert other.cache_key(scene) != src.cache_key(scene)
    o = other(scene, cache)
    assert cache.misses == 2 and o.shape[0] == 2 and len(list(tmp_path.rglob("*.npz"))) == 2
    assert FelzenszwalbSource(sigma=0.5).cache_key(scene) != src.cache_key(scene)
    # a changed image is another key too
    changed = dict(scene, image=scene["image"].copy())
    changed["image"][0, 0, 0] ^= 1
    assert src.cache_key(changed) != src.cache_key(scene)
    # a corrupt entry is a miss, recomputed and rewritten
    files[0].write_bytes(b"garbage")
    assert np.array_equal(src(scene, cache), first) and cache.misses == 3


def test_cache_keeps_labels_beyond_255_and_16_bits(tmp_path):
    cache = RegionCache(tmp_path)
    labels = np.arange(1, 1 + 2 * 40 * 40, dtype=np.int32).reshape(2, 40, 40)  # up to 3200
    cache.put("x", "ab12", labels)
    assert np.array_equal(cache.get("x", "ab12", (40, 40)), labels)
    with np.load(cache.path("x", "ab12")) as z:
        assert z["labels"].dtype == np.uint16  # compact, but never uint8
    big = labels + 70_000
    cache.put("x", "cd34", big)
    assert np.array_equal(cache.get("x", "cd34", (40, 40)), big)


def test_label_map_source_matches_by_path_and_stem(tmp_path):
    imgs, labs = tmp_path / "imgs", tmp_path / "imgs_labelmaps"
    (imgs / "sub").mkdir(parents=True)
    (labs / "sub").mkdir(parents=True)
    (labs / "elsewhere").mkdir()
    for name in ("sub/a.jpg", "b.png", "c.png", "d.png"):
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(imgs / name)
    lab = np.zeros((20, 30), np.uint16)
    lab[:, 16:] = 1000  # > 255: needs 16 bits
    Image.fromarray(lab).save(labs / "sub" / "a.png")               # same relative path
    Image.fromarray(lab).save(labs / "elsewhere" / "b.png")         # same stem only
    Image.fromarray(lab[::2, ::2].copy()).save(labs / "c.png")      # half size, same aspect
    base = build_dataset(f"folder:{imgs}")
    src = parse_region_source("labelmaps", data_root=imgs)  # default: <root>_labelmaps
    assert isinstance(src, LabelMapSource) and src.root == labs
    for key in ("sub/a.jpg", "b.png", "c.png"):
        maps = src(base[base.files.index(key)])
        assert maps.shape == (1, 20, 30), key
        assert (maps[0, :, :16] == 0).all() and (maps[0, :, 16:] == 1000).all(), key
    with pytest.raises(BadSampleError, match="no label map"):
        src(base[base.files.index("d.png")])
    # through the training view: the image without a map is skipped, not fatal
    ds = RegionDataset(base, source=src, num_regions=2, image_size=16, cache=None)
    item = ds[base.files.index("d.png")]
    assert item["regions"].shape == (2, 16, 16) and base.skips.count == 1
    with pytest.raises(DataError, match="does not exist"):
        parse_region_source(f"labelmaps:{tmp_path / 'nowhere'}")


def test_region_source_spec_errors():
    with pytest.raises(DataError, match="unknown region source 'felz'.*fh"):
        parse_region_source("felz")
    with pytest.raises(DataError, match="comma-separated numbers"):
        parse_region_source("fh:big")
    with pytest.raises(DataError, match="positive"):
        parse_region_source("slic:0")
    with pytest.raises(DataError, match="needs a directory"):
        parse_region_source("labelmaps")
    assert parse_region_source(None) is None and parse_region_source("none") is None
    assert parse_region_source("slic:10,20").n_segments == (10, 20)


def test_precompute_fills_the_cache_that_training_reads(tmp_path):
    stats = precompute_regions("scenes:train:12", "fh", tmp_path, workers=2, progress=False)
    assert stats.computed == 12 and stats.cached == 0 and not stats.skipped
    assert len(list((tmp_path / "fh").rglob("*.npz"))) == 12
    again = precompute_regions("scenes:train:12", "fh", tmp_path, workers=1, progress=False)
    assert again.computed == 0 and again.cached == 12
    # the training view computes the same keys: every read is a hit
    ds = RegionDataset(build_dataset("scenes:train:12"), source="fh", cache=tmp_path)
    for i in range(12):
        ds[i]
    assert ds.cache.hits == 12 and ds.cache.misses == 0


def test_precompute_skips_bad_files_and_strict_stops(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), np.uint8)).save(
            root / f"{i}.png")
    (root / "bad.jpg").write_text("nope")
    stats = precompute_regions(f"folder:{root}", "slic", tmp_path / "c", workers=2,
                               progress=False)
    assert stats.computed == 3 and list(stats.skipped) == [str(root / "bad.jpg")]
    with pytest.raises(BadSampleError, match="bad.jpg"):
        precompute_regions(f"folder:{root}", "slic", tmp_path / "c", workers=2, strict=True,
                           progress=False)


def test_regions_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rmae")
    add_regions_subcommand(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["regions", "precompute", "--help"])
    helptext = capsys.readouterr().out
    assert "--source" in helptext and "examples:" in helptext and "fh:paper" in helptext
    args = parser.parse_args(["regions", "precompute", "--data", "scenes:val:4", "--source",
                              "fh:500,1000", "--cache", str(tmp_path), "--workers", "1",
                              "--no-progress"])
    assert args.func(args) == 0
    assert "4 computed" in capsys.readouterr().out
    assert len(list((tmp_path / "fh").rglob("*.npz"))) == 4
    code = cli_main(["regions", "precompute", "--data", f"folder:{tmp_path / 'missing'}",
                     "--no-progress"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
