"""Real files on disk: image decoding, the image-folder and COCO datasets, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rmae.data import (
    BadSampleError,
    CocoDataset,
    DataError,
    ImageFolderDataset,
    RegionDataset,
    RegionLoader,
    build_dataset,
    load_image,
    load_label_map,
)

RED, BLUE = (220, 30, 30), (20, 40, 200)


def _rgb(h: int, w: int, color=RED) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = color
    return a


# -- decoding ---------------------------------------------------------------------------------


def test_load_image_modes(tmp_path):
    # RGB PNG, exact
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(load_image(tmp_path / "rgb.png"), rgb)
    # grayscale → replicated channels
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.shape == (10, 20, 3) and np.array_equal(out[..., 1], gray)
    # 16-bit grayscale → 0..65535 mapped onto 0..255
    g16 = np.array([[0, 257 * 128, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert load_image(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 128, 255]
    # palette
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([*RED, *BLUE] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    out = load_image(tmp_path / "pal.png")
    assert tuple(out[0, 0]) == RED and tuple(out[0, 1]) == BLUE
    # RGBA: transparent pixels become white, opaque ones keep their colour
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = BLUE
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert tuple(out[0, 0]) == BLUE and tuple(out[1, 1]) == (255, 255, 255)
    # JPEG, BMP, WEBP (lossless), TIFF
    for ext, kw in ((".jpg", {"quality": 95}), (".bmp", {}), (".webp", {"lossless": True}), (".tif", {})):
        Image.fromarray(_rgb(16, 16)).save(tmp_path / f"x{ext}", **kw)
        out = load_image(tmp_path / f"x{ext}")
        assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - RED).max() <= 3


def test_exif_rotation_is_applied(tmp_path):
    a = _rgb(20, 40, (128, 128, 128))  # stored 40 wide × 20 high
    a[:5, :5] = RED  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)  # displayed upright: 20 wide × 40 high
    assert np.abs(out[1, 18].astype(int) - RED).max() < 40  # marker now top-right
    assert np.abs(out[1, 1].astype(int) - 128).max() < 40


def test_broken_files_raise_bad_sample_naming_the_file(tmp_path, monkeypatch):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.png").write_text("not an image")
    for name in ("trunc.jpg", "fake.png", "missing.png"):
        with pytest.raises(BadSampleError) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)
    # our pixel limit …
    with pytest.raises(BadSampleError, match="decompression bomb"):
        load_image(tmp_path / "full.jpg", max_pixels=64 * 64 - 1)
    # … and PIL's own bomb guards (warning and error) are both refusals
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 + 10)  # warning zone
    with pytest.raises(BadSampleError, match="decompression bomb"):
        load_image(tmp_path / "full.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # error zone
    with pytest.raises(BadSampleError, match="decompression bomb"):
        load_image(tmp_path / "full.jpg")


def test_label_maps_keep_values_above_255(tmp_path):
    lab = np.array([[0, 1, 300], [70000 % 65536, 65535, 2]], np.uint16)
    Image.fromarray(lab).save(tmp_path / "l16.png")
    assert np.array_equal(load_label_map(tmp_path / "l16.png"), lab.astype(np.int32))
    Image.fromarray(np.array([[0, 7], [255, 3]], np.uint8)).save(tmp_path / "l8.png")
    assert load_label_map(tmp_path / "l8.png").tolist() == [[0, 7], [255, 3]]
    col = np.zeros((2, 2, 3), np.uint8)
    col[0, 1] = RED
    col[1] = BLUE
    Image.fromarray(col).save(tmp_path / "lc.png")
    lc = load_label_map(tmp_path / "lc.png")
    assert lc[0, 0] == 0 and lc[0, 1] != lc[1, 0] and lc[1, 0] == lc[1, 1] > 0


# -- image folder -----------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path):
    """Two class folders with good images of many kinds, a truncated JPEG, a text file with an
    image extension, a .txt note and a hidden file."""
    root = tmp_path / "imgs"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(_rgb(30, 40)).save(root / "cats" / "a.png")
    Image.fromarray(_rgb(32, 32, BLUE)).save(root / "cats" / "deep" / "b.jpg")
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(root / "cats" / "c_gray.png")
    Image.fromarray(_rgb(8, 8)).save(root / "dogs" / "d_small.bmp")
    Image.fromarray(_rgb(48, 48)).save(root / "dogs" / "e.jpg")
    data = (root / "dogs" / "e.jpg").read_bytes()
    (root / "dogs" / "f_trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "dogs" / "g_fake.png").write_text("hello")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_text("x")
    return root


def test_folder_lists_recursively_with_class_labels(messy_folder):
    ds = ImageFolderDataset(messy_folder)
    assert ds.class_names == ["cats", "dogs"]
    assert ds.files == sorted(ds.files) and len(ds.files) == 7  # .txt and hidden file excluded
    assert "cats/deep/b.jpg" in ds.files and ds.ignored == 1
    s = ds[ds.files.index("cats/deep/b.jpg")]
    assert s["label"] == 0 and s["key"] == "cats/deep/b.jpg" and s["image"].shape == (32, 32, 3)
    assert ds[ds.files.index("dogs/e.jpg")]["label"] == 1
    assert ImageFolderDataset(messy_folder, class_folders=False).class_names is None
    # a loose image at the root turns auto-labelling off
    Image.fromarray(_rgb(8, 8)).save(messy_folder / "loose.png")
    assert ImageFolderDataset(messy_folder).class_names is None
    with pytest.raises(DataError, match="loose.png"):
        ImageFolderDataset(messy_folder, class_folders=True)


def test_folder_skips_bad_files_once_and_summarises(messy_folder, capsys):
    ds = ImageFolderDataset(messy_folder)
    i_trunc = ds.files.index("dogs/f_trunc.jpg")
    s = ds[i_trunc]  # truncated → fake → next good index (wraps to 0)
    assert s["index"] == 0 and s["key"] == ds.files[0]
    assert [p for p, _ in s["skipped"]] == [str(messy_folder / "dogs/f_trunc.jpg"),
                                            str(messy_folder / "dogs/g_fake.png")]
    for i in range(len(ds)):  # a full epoch never raises
        assert ds[i]["image"].ndim == 3
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "skipping" in ln]
    assert len(lines) == 2  # one line per bad file, however often it is hit
    assert "f_trunc.jpg" in lines[0] and "g_fake.png" in lines[1]
    assert ds.skips.count == 2
    assert "2 file(s) skipped" in ds.summary() and "1 non-image file(s) ignored" in ds.summary()


def test_folder_strict_mode_names_the_file(messy_folder):
    ds = ImageFolderDataset(messy_folder, strict=True)
    with pytest.raises(BadSampleError, match="f_trunc.jpg"):
        ds[ds.files.index("dogs/f_trunc.jpg")]


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*folder:"):
        build_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        build_dataset(f"folder:{tmp_path / 'empty'}")


def test_loader_workers_report_skips_to_the_main_process(messy_folder):
    base = ImageFolderDataset(messy_folder)
    ds = RegionDataset(base, source=None, image_size=16)
    loader = RegionLoader(ds, batch_size=7, num_workers=2, shuffle=False, drop_last=False)
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == 7
    assert batches[0]["images"].shape == (7, 3, 16, 16)
    # the 8×8 image was upsampled, the bad files were replaced, the labels came along
    assert batches[0]["label"].tolist()[:3] == [0, 0, 0]
    assert base.skips.count == 2, base.summary()  # recorded in workers, merged here


# -- COCO -------------------------------------------------------------------------------------


def _box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture
def coco_files(tmp_path):
    """Two images; annotations as polygon, uncompressed RLE, compressed RLE and a crowd;
    non-contiguous category ids 3, 7, 12; one image missing on disk."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    H, W = 40, 60
    Image.fromarray(_rgb(H, W)).save(img_dir / "a.jpg")
    Image.fromarray(_rgb(H, W, BLUE)).save(img_dir / "b.png")
    big = _box_mask(H, W, 5, 35, 5, 45)          # 30×40, compressed RLE
    small = _box_mask(H, W, 10, 20, 10, 20)      # 10×10, on top of big: must stay visible
    crowd = _box_mask(H, W, 0, 10, 50, 60)       # crowd
    rle_big = mask_utils.encode(np.asfortranarray(big))
    rle_big["counts"] = rle_big["counts"].decode("ascii")
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = small.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": rle_big,
         "bbox": [5, 5, 40, 30], "area": 1200},
        {"id": 2, "image_id": 1, "category_id": 12, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": runs}, "bbox": [10, 10, 10, 10], "area": 100},
        {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 1,
         "segmentation": mask_utils.encode(np.asfortranarray(crowd)) | {}, "bbox": [50, 0, 10, 10],
         "area": 100},
        # polygon (a triangle) on image 2
        {"id": 4, "image_id": 2, "category_id": 7, "iscrowd": 0,
         "segmentation": [[0, 0, 30, 0, 0, 30]], "bbox": [0, 0, 30, 30], "area": 450},
    ]
    anns[2]["segmentation"]["counts"] = anns[2]["segmentation"]["counts"].decode("ascii")
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W},
                   {"id": 3, "file_name": "gone.jpg", "height": H, "width": W}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "cup"}, {"id": 7, "name": "crowd-thing"},
                       {"id": 12, "name": "spoon"}],
    }
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps(doc))
    return img_dir, ann_path, big, small, crowd


def test_coco_decodes_rle_and_polygons_into_maps(coco_files):
    img_dir, ann_path, big, small, crowd = coco_files
    ds = build_dataset(f"coco:{img_dir}:{ann_path}")
    assert isinstance(ds, CocoDataset) and len(ds) == 3
    assert ds.category_names == ["cup", "crowd-thing", "spoon"]  # contiguous ids 1, 2, 3
    s = ds[0]
    inst, cls = s["instances"], s["classes"]
    # larger object first → id 1, the small one on top → id 2 and fully visible
    assert np.array_equal(inst == 2, small.astype(bool))
    assert np.array_equal(inst == 1, big.astype(bool) & ~small.astype(bool))
    assert s["instance_classes"].tolist() == [1, 3]
    # crowd: its category in the class map, but not an instance
    assert (cls[crowd.astype(bool)] == 2).all() and (inst[crowd.astype(bool)] == 0).all()
    assert (cls[small.astype(bool)] == 3).all() and cls[0, 0] == 0
    assert s["boxes"].tolist() == [[5, 5, 45, 35], [10, 10, 20, 20]]
    # polygon
    t = ds[1]["instances"]
    assert t[2, 2] == 1 and t[25, 25] == 0 and 380 < (t == 1).sum() < 520
    # the missing file is skipped, not fatal
    assert ds[2]["index"] == 0 and ds.skips.count == 1


def test_coco_size_mismatch_and_errors(coco_files, tmp_path):
    img_dir, ann_path, *_ = coco_files
    Image.fromarray(_rgb(10, 10)).save(img_dir / "b.png")  # annotations say 60×40
    ds = CocoDataset(img_dir, ann_path, strict=True)
    with pytest.raises(BadSampleError, match=r"b\.png.*10x10.*60x40"):
        ds[1]
    with pytest.raises(DataError, match="annotation file .* does not exist"):
        build_dataset(f"coco:{img_dir}:{tmp_path / 'none.json'}")
    with pytest.raises(DataError, match="image directory .* does not exist"):
        build_dataset(f"coco:{tmp_path / 'noimgs'}:{ann_path}")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a COCO instances JSON"):
        build_dataset(f"coco:{img_dir}:{bad}")
