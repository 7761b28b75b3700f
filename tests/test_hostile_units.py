"""Known answers for the guards the hostile corpus (test_hostile_engine.py) relies on: the exact
parameter count behind the model-size bound, the image and segmentation size bounds, the COCO
RLE reader, loop-safe folder walks, verified cache entries, run-folder identity and locks."""

from __future__ import annotations

import itertools
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import rmae
from rmae.layouts import _find_key
from rmae.data import BaseDataset, DataError, FelzenszwalbSource, PanopticSource, RegionDataset, RegionLoader
from rmae.data import coco as coco_mod
from rmae.data import imageio
from rmae.data.cache import RegionCache
from rmae.data.folder import list_images
from rmae.io import atomic_write_text
from rmae.models.config import config_from_name
from rmae.runfolder import LOCK, RunFolder, RunFolderError


@pytest.mark.parametrize("family,variant", list(itertools.product(("mae", "rae", "rmae"), ("length", "batch", "channel"))))
def test_parameter_count_is_exact_without_building(family, variant):
    """The size bound counts weights from the config alone; it must equal the built model's."""
    for kw in (dict(img_size=32), dict(img_size=(32, 48), mlp_ratio=2.7, decoder_depth=0, region_neck_depth=0,
                                       in_chans=1, region_dec_depth=3, num_regions=5)):
        config = config_from_name(f"{family}_vit_tiny_patch8", depth=2, region_variant=variant, **kw)
        model = rmae.create_model(f"{family}_vit_tiny_patch8", depth=2, region_variant=variant, **kw)
        assert config.num_parameters() == sum(t.numel() for t in model.state_dict().values())


def test_nested_config_search_is_bounded():
    deep: dict = {"num_region": 4}
    for _ in range(20_000):  # deeper than Python's recursion limit
        deep = {"x": deep}
    assert _find_key(deep, "num_region") is None  # gives up at depth 8 instead of RecursionError
    assert _find_key({"a": {"b": {"num_region": 4}}}, "num_region") == 4


# -- image and segmentation size --------------------------------------------------------------------


@pytest.mark.parametrize("h,w,limit,factor", [(9000, 9000, 1 << 24, 3), (4096, 4096, 1 << 24, 1),
                                              (4097, 4096, 1 << 24, 2), (10, 20, 50, 2), (48, 64, 300, 4)])
def test_reduction_factor_is_the_smallest_that_fits(h, w, limit, factor):
    assert imageio.reduction_factor(h, w, limit) == factor
    fits = lambda f: -(-h // f) * -(-w // f) <= limit  # noqa: E731
    assert fits(factor) and (factor == 1 or not fits(factor - 1))


def test_large_images_are_reduced_on_load_with_a_box_filter(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_WORKING_PIXELS", 50)
    checker = (np.indices((10, 20)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "c.png")
    img = imageio.load_image(tmp_path / "c.png")
    assert img.shape == (5, 10, 3) and np.abs(img.astype(int) - 127.5).max() <= 1  # averaged, not sampled
    labels = (np.arange(200).reshape(10, 20) % 7).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "l.png")
    lm = imageio.load_label_map(tmp_path / "l.png")
    assert lm.shape == (5, 10) and set(np.unique(lm)) <= set(np.unique(labels))  # nearest: labels survive
    small = np.random.default_rng(0).integers(0, 255, (5, 10, 3), np.uint8)
    Image.fromarray(small).save(tmp_path / "s.png")
    assert np.array_equal(imageio.load_image(tmp_path / "s.png"), small)  # within the bound: untouched


def test_large_jpegs_are_decoded_reduced(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "MAX_WORKING_PIXELS", 300)
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "j.jpg")
    assert imageio.load_image(tmp_path / "j.jpg").shape == (12, 16, 3)


def _halves(size: int) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = (200, 30, 30)
    img[:, size // 2:] = (20, 40, 220)
    return img


def test_segmentation_runs_on_at_most_max_pixels_and_labels_come_back_full_size():
    src = FelzenszwalbSource((50,), relative=False)
    src.max_pixels = 256  # a 64² image is segmented at 16²
    seen = []
    segment = src.segment
    src.segment = lambda sample: (seen.append(sample["image"].shape), segment(sample))[1]
    labels = src.compute({"image": _halves(64)})
    assert seen == [(16, 16, 3)] and labels.shape == (1, 64, 64)
    left, right = np.unique(labels[0, :, :32]), np.unique(labels[0, :, 32:])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]  # the two halves, exactly aligned
    assert "max_pixels" in src.params()  # part of the cache key


def test_panoptic_reduces_the_instances_with_the_image():
    src = PanopticSource(scale=50, relative=False)
    src.max_pixels = 256
    inst = np.zeros((64, 64), np.int32)
    inst[8:24, 40:56] = 1
    labels = src.compute({"image": _halves(64), "instances": inst})
    assert labels.shape == (1, 64, 64) and np.array_equal(labels[0] == 1, inst == 1)


# -- COCO ----------------------------------------------------------------------------------------------


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_rle_strings_are_read_as_pycocotools_writes_them():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((23, 31)) < rng.random()).astype(np.uint8)
        encoded = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        counts = coco_mod._rle_string_counts(encoded)
        assert sum(counts) == mask.size and counts[: len(_runs(mask))] == _runs(mask)[: len(counts)]
        assert np.array_equal(mask_utils.decode(coco_mod._rle({"size": [23, 31], "counts": encoded}, 23, 31)), mask)
    with pytest.raises(coco_mod._Bad, match="ends in the middle"):
        coco_mod._rle_string_counts("0k")  # 'k' has the continuation bit set


def test_polygons_near_the_image_decode_as_pycocotools_does():
    h, w = 30, 40
    poly = [-5, -3, 44, 2, 30, 33, 2, 20]  # a little outside: common in real annotations
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)
    assert np.array_equal(coco_mod._decode([poly], h, w), expected)
    with pytest.raises(coco_mod._Bad, match="far outside"):
        coco_mod._decode([[0, 0, 3 * w, 0, 5, 5]], h, w)


# -- folders and caches --------------------------------------------------------------------------------


def test_folder_walk_lists_each_image_once_through_symlink_loops(tmp_path):
    for sub in ("", "a", "a/b"):
        (tmp_path / sub).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / sub / "x.png")
    (tmp_path / "loop").symlink_to(tmp_path)
    (tmp_path / "a" / "b" / "up").symlink_to("../..")
    (tmp_path / "z").symlink_to(tmp_path / "a")  # a second way into a/: walked once, at a/
    assert list_images(tmp_path) == (["a/b/x.png", "a/x.png", "x.png"], 0)


def test_cache_entries_are_checked_from_their_header(tmp_path, monkeypatch):
    cache = RegionCache(tmp_path)
    cache.put("fh", "ab12", np.ones((3, 8, 8), np.int32))
    assert cache.valid("fh", "ab12", (8, 8)) and not cache.valid("fh", "ab12", (8, 9))
    cache.put("fh", "cd34", np.ones((3, 8, 8), np.int32))
    with open(cache.path("fh", "cd34"), "wb") as f:
        np.savez_compressed(f, labels=np.ones((3, 8, 8), np.float32))  # the right shape, not labels
    assert not cache.valid("fh", "cd34", (8, 8))
    monkeypatch.setattr("rmae.data.cache.load_npz", lambda path: pytest.fail("read an unverified entry"))
    assert cache.get("fh", "ab12", (8, 9)) is None and cache.get("fh", "cd34", (8, 8)) is None


def test_worker_errors_arrive_as_themselves(tmp_path):
    class Broken(BaseDataset):
        def __len__(self):
            return 4

        def load(self, index):
            raise DataError(f"item {index} has no file")

    loader = RegionLoader(RegionDataset(Broken(), source=None, cache=None, image_size=8), num_workers=2)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(err.value).startswith("item ") and "Traceback" not in str(err.value) and "\n" not in str(err.value)


# -- run folders and writes ----------------------------------------------------------------------------


def test_a_users_config_yaml_does_not_make_a_run(tmp_path, run_factory):
    (tmp_path / "config.yaml").write_text("my: settings\n")
    assert not RunFolder(tmp_path).is_run()
    with pytest.raises(RunFolderError, match="not an rmae run"):
        RunFolder(tmp_path).refuse_foreign()
    run = run_factory("r")
    (run / ".rmae-run").unlink()  # a run from before the marker: rmae's config.yaml still says so
    assert RunFolder(run).is_run()


def test_a_failed_writer_leaves_no_empty_run_folder(tmp_path):
    with pytest.raises(ValueError), RunFolder(tmp_path / "new").lock():
        raise ValueError("the config was wrong")
    assert not (tmp_path / "new").exists()
    with RunFolder(tmp_path / "kept").lock() as run:
        run.create("pretrain")
    assert (tmp_path / "kept" / ".rmae-run").is_file() and (tmp_path / "kept" / LOCK).is_file()


def test_atomic_writes_keep_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640


def test_resume_refuses_weights_of_another_model(tmp_path):
    from rmae.train.trainer import _load_resume_weights
    from rmae.errors import CheckpointError

    rmae.save_model(rmae.create_model("mae_vit_tiny_patch8", img_size=32, depth=2), tmp_path / "w.safetensors")
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=32, depth=2)
    with pytest.raises(CheckpointError, match=r"does not fit the model of this run's config \(\d+ keys differ"):
        _load_resume_weights(model, tmp_path / "w.safetensors", torch.device("cpu"))


def test_a_link_planted_at_a_region_cache_entry_is_not_written_through(tmp_path, capsys):
    cache = RegionCache(tmp_path / "cache")
    entry = cache.path("fh", "k1")
    entry.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    os.symlink(victim, entry)
    cache.put("fh", "k1", np.zeros((1, 8, 8), np.int32))
    assert victim.read_text() == "mine" and entry.is_symlink()
    assert not cache.writable and "is a symbolic link" in capsys.readouterr().err
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no temp file left behind
