"""Reading images, the dataset, padded batches, augmentation presets and the data summary."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from finescope.data import (
    Batch,
    ImageDataset,
    Sample,
    SampleSet,
    build_transform,
    collate_padded,
    describe_samples,
    format_description,
    read_image,
)
from finescope.data.dataset import DiskCache, SharedMemoryCache, _png_intact, shape_order
from finescope.errors import FinescopeError, FinescopeWarning

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
realdata = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")


def rgb_array(h: int = 10, w: int = 14, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(arr_or_img, path: Path, **kwargs) -> Path:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kwargs)
    return path


# ---------------------------------------------------------------------------------------------- read_image


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp", ".webp"])
def test_read_image_lossless_formats(tmp_path, ext):
    arr = rgb_array()
    kwargs = {"lossless": True} if ext == ".webp" else {}
    t = read_image(save(arr, tmp_path / f"x{ext}", **kwargs))
    assert t.dtype == torch.uint8 and t.shape == (3, 10, 14)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), arr)


def test_read_image_jpeg(tmp_path):
    t = read_image(save(rgb_array(16, 24), tmp_path / "x.JPG", quality=95))
    assert t.dtype == torch.uint8 and t.shape == (3, 16, 24)


def test_read_image_grey_rgba_la_palette(tmp_path):
    grey = rgb_array()[:, :, 0]
    t = read_image(save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    assert t.shape == (3, 10, 14) and all(np.array_equal(t[c].numpy(), grey) for c in range(3))
    rgba = np.concatenate([rgb_array(), np.zeros((10, 14, 1), np.uint8)], axis=2)  # fully transparent
    t = read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert np.array_equal(t.permute(1, 2, 0).numpy(), rgba[:, :, :3])
    t = read_image(save(Image.fromarray(grey, "L").convert("LA"), tmp_path / "la.png"))
    assert t.shape == (3, 10, 14) and np.array_equal(t[1].numpy(), grey)
    pal = Image.fromarray(rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    t = read_image(save(pal, tmp_path / "p.png"))
    assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(pal.convert("RGB")))
    t = read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.tif"))
    assert t.shape == (3, 10, 14)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_image_16bit_is_scaled_not_clipped(tmp_path, ext):
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # -> 0, 1, 128, 255
    t = read_image(save(Image.fromarray(arr), tmp_path / f"x{ext}"))
    assert t.dtype == torch.uint8 and t.shape == (3, 1, 4)
    assert t[0, 0].tolist() == [0, 1, 128, 255]


def test_read_image_float_tiff_in_zero_to_one_is_scaled_not_black(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)  # a 32-bit float export in [0, 1]
    assert read_image(save(Image.fromarray(arr), tmp_path / "f.tif"))[0, 0].tolist() == [0, 128, 255]
    arr = np.array([[0.0, 127.5, 255.0]], dtype=np.float32)  # float holding 8-bit values stays as it was
    assert read_image(save(Image.fromarray(arr), tmp_path / "g.tif"))[0, 0].tolist() == [0, 128, 255]


def test_read_image_float_tiff_a_little_above_one_is_still_zero_to_one(tmp_path):
    """A float export peaking at 1.0 was read as [0, 1] (x 255), one peaking at 1.02 (an overshoot of flat-field
    correction or interpolation) as 0..255, so it came out black. Float data within [0, 1.05], or whose 99.9th
    percentile is at most 1 (a few hot pixels above), is now [0, 1]; values above 1 are clipped to 255."""
    ramp = np.linspace(0.0, 1.02, 103, dtype=np.float32)[None, :]  # (1, 103): 0, 0.01, ..., 1.02
    t = read_image(save(Image.fromarray(ramp), tmp_path / "ramp.tif"))[0, 0]
    assert t[[0, 50, 100, 101, 102]].tolist() == [0, 128, 255, 255, 255]
    hot = np.full((40, 50), 0.5, dtype=np.float32)
    hot[0, 0] = 3.0  # one hot pixel in 2000, above the tolerance
    t = read_image(save(Image.fromarray(hot), tmp_path / "hot.tif"))[0]
    assert t[0, 0].item() == 255 and t[1, 1].item() == 128
    arr = np.array([[0.0, 1.5, 3.0]], dtype=np.float32)  # beyond [0, 1] throughout: 0..255 as before
    assert read_image(save(Image.fromarray(arr), tmp_path / "g.tif"))[0, 0].tolist() == [0, 2, 3]


def test_read_image_float_tiff_with_nan_or_inf_keeps_its_other_pixels(tmp_path):
    """A NaN (no data) or an inf pixel neither sets the range nor blackens the whole image: NaN is black, +inf
    white, the other pixels scaled by the finite values' range."""
    arr = np.array([[0.0, 0.5, 1.0, np.nan, np.inf]], dtype=np.float32)
    assert read_image(save(Image.fromarray(arr), tmp_path / "f.tif"))[0, 0].tolist() == [0, 128, 255, 0, 255]
    arr = np.array([[0.0, 127.5, 255.0, np.nan, -np.inf]], dtype=np.float32)
    assert read_image(save(Image.fromarray(arr), tmp_path / "g.tif"))[0, 0].tolist() == [0, 128, 255, 0, 0]


@pytest.mark.parametrize("ext,kwargs", [(".png", {}), (".jpg", {"quality": 90})])
def test_read_image_truncated_raises(tmp_path, ext, kwargs):
    full = save(rgb_array(64, 80), tmp_path / f"full{ext}", **kwargs)
    data = full.read_bytes()
    half = tmp_path / f"half{ext}"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(FinescopeError, match=rf"cannot read image '.*half\{ext}'.*data.on_error=skip"):
        read_image(half)


def test_read_image_damaged_png_is_an_error_not_a_crash(tmp_path):
    """torchvision 0.29's PNG decoder ends the process (SIGSEGV) on a PNG with one IDAT byte flipped; such a file
    must go to PIL and give the one clear error. Run in a child process, so a crash fails this test alone."""
    path = save(rgb_array(20, 30), tmp_path / "damaged.png")
    data = bytearray(path.read_bytes())
    assert _png_intact(bytes(data))
    data[60] ^= 0xFF  # inside the IDAT chunk
    path.write_bytes(bytes(data))
    assert not _png_intact(bytes(data)) and not _png_intact(bytes(data[:-20]))  # damaged, truncated
    code = ("from finescope.data import read_image\nfrom finescope.errors import FinescopeError\n"
            f"try:\n    read_image({str(path)!r})\nexcept FinescopeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert proc.returncode == 0, f"read_image died with {proc.returncode}: {proc.stderr[-500:]}"
    assert "damaged.png" in proc.stdout and "data.on_error=skip" in proc.stdout


def test_read_image_not_an_image_or_missing(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(FinescopeError, match=r"cannot read image '.*x\.png'"):
        read_image(tmp_path / "x.png")
    with pytest.raises(FinescopeError, match=r"cannot read image '.*gone\.tif'"):
        read_image(tmp_path / "gone.tif")


@pytest.mark.parametrize("name", ["empty.png", "empty.tif", "empty.jpg"])
def test_read_image_of_an_empty_file_says_it_is_empty(tmp_path, name):
    """A zero-byte file (an interrupted copy) was reported in PIL's words, 'cannot identify image file', which
    reads as a wrong format; it now says the file is empty, with the usual advice."""
    from finescope.errors import SKIP_ADVICE

    (tmp_path / name).write_bytes(b"")
    with pytest.raises(FinescopeError) as e:
        read_image(tmp_path / name)
    assert str(e.value) == f"cannot read image '{tmp_path / name}': the file is empty (0 bytes){SKIP_ADVICE}"


def test_a_png_whose_colour_profile_libpng_faults_prints_nothing(tmp_path, capfd):
    """torchvision's libpng printed "libpng warning: iCCP: ..." on stderr each time it decoded a PNG whose colour
    profile it finds fault with ("known incorrect sRGB profile" is common in PNGs that Photoshop wrote): a line
    per image per epoch, in every DataLoader worker, beside finescope's one-line messages. Neither decoder
    applies a profile, so it is left out before decoding; the pixels are those PIL reads."""
    import struct
    import zlib

    path = save(rgb_array(20, 30), tmp_path / "profiled.png")
    data = path.read_bytes()
    body = b"iCCP" + b"bad profile\x00\x00" + zlib.compress(bytes(200))  # too short for an ICC profile
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    path.write_bytes(data[:33] + chunk + data[33:])  # after the signature and IHDR
    capfd.readouterr()
    t = read_image(path)
    assert "libpng" not in capfd.readouterr().err
    with Image.open(path) as img:
        assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(img.convert("RGB")))


def test_a_tiffs_orientation_tag_is_applied_and_an_exif_orientation_is_not(tmp_path):
    """The README said that no command applies an orientation; Pillow turns a TIFF by its Orientation tag (a
    baseline TIFF tag) as it reads it, size included, so a TIFF's pixels, sizes and boxes are those of the picture
    turned upright, while a JPEG's or PNG's EXIF orientation is left unapplied (the file as stored)."""
    from finescope.data.dataset import _header_size

    arr = rgb_array(10, 14)
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored rows are to be turned 90 degrees clockwise for viewing
    for ext in (".jpg", ".png"):
        path = save(arr, tmp_path / f"x{ext}", exif=exif.tobytes())
        assert read_image(path).shape == (3, 10, 14) and _header_size(str(path)) == (10, 14)
    path = save(arr, tmp_path / "x.tif", exif=exif.tobytes())
    t = read_image(path)
    assert t.shape == (3, 14, 10) and _header_size(str(path)) == (14, 10)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), np.rot90(arr, -1))


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_an_image_above_pils_warning_size_is_read_without_pils_warning(tmp_path, monkeypatch, ext):
    """An image of 1 to 2 times PIL's MAX_IMAGE_PIXELS (89.5 to 179 MP: a stitched tile scan) is read, but every
    header read and TIFF decode printed PIL's DecompressionBombWarning as it is: two lines of PIL's source
    calling the user's own image a 'decompression bomb DOS attack', beside finescope's one-line messages."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 10x14 image (140 px) is 1.4 times the limit
    path = save(rgb_array(), tmp_path / f"x{ext}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageDataset([Sample(str(path), 0, "g")], cache="memory")  # reads the header
        assert ds[0]["image"].shape == (3, 10, 14)
        assert describe_samples(SampleSet(ds.samples, ["a"], root=str(tmp_path)))["image_sizes"] == {"14x10": 1}
    assert [str(w.message) for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_an_image_above_pils_limit_is_one_line_that_says_what_to_do(tmp_path, monkeypatch, ext):
    """An image of more than 2 x MAX_IMAGE_PIXELS (179 MP: a whole-slide scan or a large mosaic) was refused with
    PIL's words alone, 'could be decompression bomb DOS attack', which neither says that the file is the user's
    own nor what to do with it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # the 10x14 image (140 px) is 2.8 times the limit
    path = save(rgb_array(), tmp_path / f"x{ext}")
    with pytest.raises(FinescopeError) as caught:
        read_image(path)
    assert str(caught.value) == (
        f"cannot read image '{path}': 140 pixels, more than the 100 that finescope reads in one image (PIL's "
        "decompression-bomb limit, twice Image.MAX_IMAGE_PIXELS); cut it into tiles or downscale it (a whole-slide "
        "image: tile it first, e.g. with TIAToolbox or OpenSlide), or raise PIL.Image.MAX_IMAGE_PIXELS in your own "
        "script; fix or remove the file, or set data.on_error=skip")


# ----------------------------------------------------------------------------------------------- dataset


def make_samples(tmp_path: Path, sizes=((12, 20), (10, 20))) -> list[Sample]:
    """One PNG per (h, w) in ``sizes``; label = position."""
    out = []
    for i, (h, w) in enumerate(sizes):
        path = save(rgb_array(h, w, seed=i), tmp_path / f"img{i}.png")
        out.append(Sample(str(path), i % 2, f"g{i}"))
    return out


def test_dataset_item(tmp_path):
    samples = make_samples(tmp_path)
    seen_dtypes = []

    def transform(img):
        seen_dtypes.append(img.dtype)
        return img.flip(-1)

    ds = ImageDataset(samples, transform=transform)
    item = ds[1]
    assert len(ds) == 2 and item["label"] == 1 and item["index"] == 1
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 10, 20)  # float only on the device
    assert seen_dtypes == [torch.uint8]  # the transform sees the uint8 full-resolution image
    assert torch.equal(item["image"], read_image(samples[1].path).flip(-1))


def test_dataset_skip_mode_warns_once(tmp_path):
    samples = make_samples(tmp_path)
    Path(samples[0].path).write_bytes(b"\x89PNG broken")
    with pytest.raises(FinescopeError, match="img0.png"):
        ImageDataset(samples)[0]
    ds = ImageDataset(samples, on_error="skip")
    with pytest.warns(UserWarning, match="img0.png"):
        assert ds[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[0] is None  # no second warning for the same file
    assert ds[1] is not None


def test_dataset_min_side(tmp_path):
    ds = ImageDataset(make_samples(tmp_path), min_side=11)
    assert ds[0]["image"].shape == (3, 12, 20)
    # the crop size is the only size that must fit, and changing it is advice for training, not a way out
    with pytest.raises(FinescopeError, match=r"img1\.png' is 20x10.*model.local_size 11 px; a model to train on it "
                       r"needs model.local_size <= 10\); fix or remove the file, or set data.on_error=skip$"):
        ds[1]


def test_dataset_memory_cache(tmp_path):
    samples = make_samples(tmp_path)
    ds = ImageDataset(samples, cache="memory")
    first = ds[0]["image"]
    Path(samples[0].path).unlink()
    assert torch.equal(ds[0]["image"], first)
    with pytest.raises(FinescopeError, match="data.cache"):
        ImageDataset(samples, cache="ssd")
    with pytest.raises(FinescopeError, match="data.on_error"):
        ImageDataset(samples, on_error="ignore")


def test_memory_cache_is_shared_by_forked_workers(tmp_path):
    """An image decoded by one worker is served to every other from the shared memory: after one epoch the
    files can go, and the second epoch (shuffled, so each worker asks for images another one decoded) still
    delivers every image, unchanged. With one cache per worker this fails on the images it never read."""
    samples = make_samples(tmp_path, sizes=[(12 + i % 3, 20 + i) for i in range(12)])
    expected = [read_image(x.path) for x in samples]
    ds = ImageDataset(samples, cache="memory")
    loader = DataLoader(ds, batch_size=1, num_workers=2, persistent_workers=True, shuffle=True,
                        multiprocessing_context="fork", collate_fn=lambda items: items[0])
    assert sorted(item["index"] for item in loader) == list(range(12))
    for x in samples:
        Path(x.path).unlink()
    for item in loader:
        assert torch.equal(item["image"], expected[item["index"]])
    assert not ds._cache  # the main process holds no copy of its own either
    assert torch.equal(ds[3]["image"], expected[3])


def test_shared_memory_cache_declines_what_it_cannot_share():
    cache = SharedMemoryCache([(2, 3), None])
    assert cache.get(0) is None and not cache.put(0, torch.ones(3, 3, 3, dtype=torch.uint8))  # wrong size
    assert not cache.put(1, torch.ones(3, 2, 3, dtype=torch.uint8))  # header unreadable: no slot
    assert cache.put(0, torch.full((3, 2, 3), 7, dtype=torch.uint8)) and int(cache.get(0).sum()) == 7 * 18
    spawned = pickle.loads(pickle.dumps(cache))  # what a spawned worker gets: no mapping, the caller keeps copies
    assert spawned.get(0) is None and not spawned.put(0, torch.zeros(3, 2, 3, dtype=torch.uint8))
    assert cache.get(-1) is None and cache.get(2) is None  # out of range: a miss, never a pixel read as a flag
    cache._lock.acquire()  # as if a worker had died holding it: one warning, then this process stops sharing
    with pytest.warns(UserWarning, match="dead process"):
        assert cache.get(0) is None
    assert not cache.put(0, torch.zeros(3, 2, 3, dtype=torch.uint8))


def test_memory_cache_too_large_is_one_clear_error():
    with pytest.raises(FinescopeError, match=r"data.cache=memory.*GiB.*data.cache=disk"):
        SharedMemoryCache([(2**24, 2**24)])  # 768 TiB


def test_memory_cache_negative_index(tmp_path):
    samples = make_samples(tmp_path)
    ds = ImageDataset(samples, cache="memory")
    last = ds[-1]
    assert last["index"] == 1 and torch.equal(last["image"], read_image(samples[1].path))
    assert torch.equal(ds[-1]["image"], ds[1]["image"])  # now from the cache


# ------------------------------------------------------------------------------------------------- collate


def test_collate_pads_two_sizes(tmp_path):
    ds = ImageDataset(make_samples(tmp_path, sizes=((23, 35), (22, 35))))  # 700x460 / 700x456 in miniature
    batch = collate_padded([ds[0], None, ds[1]])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 23, 35) and batch.images.dtype == torch.uint8
    assert batch.sizes.tolist() == [[23, 35], [22, 35]] and batch.sizes.dtype == torch.long
    assert batch.labels.tolist() == [0, 1] and batch.indices.tolist() == [0, 1]
    assert torch.equal(batch.images[1, :, :22], ds[1]["image"])
    assert batch.images[1, :, 22:].abs().sum() == 0  # bottom padding is zero
    x = batch.model_input("cpu", channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, batch.images.float() / 255)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images)


def test_collate_all_none_and_loader(tmp_path):
    empty = collate_padded([None, None])
    assert len(empty) == 0 and empty.images.shape == (0, 3, 0, 0) and empty.sizes.shape == (0, 2)
    ds = ImageDataset(make_samples(tmp_path, sizes=((8, 6), (6, 8), (7, 7))))
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_padded))
    assert [len(b) for b in batches] == [2, 1]
    assert batches[0].images.shape == (2, 3, 8, 8)


def _collate_in_worker(items):
    """collate_padded as a worker runs it, with what the batch's storage is (the worker cannot send it back
    without moving it to shared memory)."""
    batch = collate_padded(items)
    return batch, batch.images.untyped_storage().is_shared()


def test_collate_in_a_worker_writes_shared_memory_and_zero_padding(tmp_path):
    """Inside a worker the padded batch is allocated in shared memory (nothing to copy when it is sent) and
    uninitialised: every padding cell must still come out 0, next to rotated (transposed-view) images."""
    torch.manual_seed(0)
    rotated = torch.rot90(torch.randint(1, 256, (3, 5, 9), dtype=torch.uint8), 1, dims=(1, 2))  # a (3, 9, 5) view
    assert not rotated.is_contiguous()
    plain = torch.randint(1, 256, (3, 4, 7), dtype=torch.uint8)
    ds = [{"image": rotated, "label": 0, "index": 0}, {"image": plain, "label": 1, "index": 1}]
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=_collate_in_worker, multiprocessing_context="fork")
    (batch, shared), = list(loader)
    assert shared
    assert batch.images.shape == (2, 3, 9, 7) and batch.sizes.tolist() == [[9, 5], [4, 7]]
    assert torch.equal(batch.images[0, :, :, :5], rotated) and torch.equal(batch.images[1, :, :4], plain)
    assert batch.images[0, :, :, 5:].abs().sum() == 0 and batch.images[1, :, 4:].abs().sum() == 0
    assert not collate_padded(ds).images.untyped_storage().is_shared()  # in the main process: ordinary memory


def test_collate_zeroes_padding_in_a_dirty_buffer(monkeypatch):
    import finescope.data.dataset as dataset

    monkeypatch.setattr(dataset, "_batch_buffer", lambda shape, dtype: torch.full(shape, 255, dtype=dtype))
    small, wide = torch.ones(3, 2, 3, dtype=torch.uint8), torch.ones(3, 1, 5, dtype=torch.uint8)
    batch = collate_padded([{"image": small, "label": 0, "index": 0}, {"image": wide, "label": 0, "index": 1}])
    expected = torch.zeros(2, 3, 2, 5, dtype=torch.uint8)
    expected[0, :, :2, :3] = 1
    expected[1, :, :1, :5] = 1
    assert torch.equal(batch.images, expected)


# ---------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", ["none", "geometric", "microscopy", "strong"])
def test_transforms_keep_dtype_and_shape(name):
    torch.manual_seed(0)
    img = torch.from_numpy(rgb_array(12, 20)).permute(2, 0, 1).contiguous()
    shapes = set()
    for _ in range(20):
        out = build_transform(name, train=True)(img)
        assert out.dtype == torch.uint8 and out.shape[0] == 3
        shapes.add(tuple(out.shape[1:]))
    assert shapes <= {(12, 20), (20, 12)}
    if name != "none":
        assert shapes == {(12, 20), (20, 12)}  # 90-degree rotations happen
    assert torch.equal(build_transform(name, train=False)(img), img)


def test_transform_unknown_name():
    with pytest.raises(FinescopeError, match="none, geometric, microscopy, strong"):
        build_transform("heavy", train=True)


# ------------------------------------------------------------------------------------------------- summary


def test_describe_samples(tmp_path):
    samples = make_samples(tmp_path, sizes=((10, 20), (10, 20), (12, 20)))
    (tmp_path / "copy.png").write_bytes(Path(samples[0].path).read_bytes())
    samples.append(Sample(str(tmp_path / "copy.png"), 0, "g9", {"magnification": 40}))
    Path(samples[2].path).write_bytes(b"broken")
    d = describe_samples(SampleSet(samples, ["a", "b"], root=str(tmp_path)))
    assert d["n_images"] == 4 and d["n_groups"] == 4
    assert d["per_class"] == {"a": {"images": 3, "groups": 3}, "b": {"images": 1, "groups": 1}}
    assert d["image_sizes"] == {"20x10": 3}
    assert [Path(p).name for p, _ in d["unreadable"]] == ["img2.png"]
    assert d["per_magnification"] == {40: 1}
    assert d["duplicates_across_groups"] == 1 and d["duplicates_joined"] == 0
    text = format_description(d)
    assert "img2.png" in text and "20x10: 3" in text and "copy.png" in text
    assert "image_sizes" not in describe_samples(SampleSet(samples, ["a", "b"]), read_images=False)
    assert d["almost_black"] == []


def test_describe_samples_names_the_groups_that_hold_several_classes(tmp_path):
    samples = make_samples(tmp_path, sizes=((10, 20),) * 4)
    samples = [Sample(s.path, label, group) for s, label, group in zip(samples, (0, 1, 0, 1), ("p1", "p1", "p2", "p3"))]
    d = describe_samples(SampleSet(samples, ["a", "b"], root=str(tmp_path)), read_images=False)
    assert d["mixed_groups"] == {"p1": ["a", "b"]}
    text = format_description(d)
    assert ("groups holding two or more classes: 1 of 3 (p1: a, b); the patient accuracies (patient_accuracy_*) "
            "score such a group once per class, on its images of it") in text
    one_class = [Sample(s.path, 0, s.group) for s in samples]
    d = describe_samples(SampleSet(one_class, ["a", "b"], root=str(tmp_path)), read_images=False)
    assert d["mixed_groups"] == {} and "two or more classes" not in format_description(d)


def test_describe_samples_lists_12_bit_data_in_16_bit_files_as_almost_black(tmp_path):
    from PIL import Image

    twelve = (np.random.default_rng(0).random((16, 24)) * 4095).astype(np.uint16)  # a 12-bit camera's range
    Image.fromarray(twelve).save(tmp_path / "dark.png")  # 16-bit greyscale PNG
    Image.fromarray((twelve.astype(np.uint32) * 16).astype(np.uint16)).save(tmp_path / "full.png")  # the full range
    samples = [Sample(str(tmp_path / "dark.png"), 0, "a"), Sample(str(tmp_path / "full.png"), 1, "b")]
    d = describe_samples(SampleSet(samples, ["a", "b"], root=str(tmp_path)))
    assert d["almost_black"] == [[str(tmp_path / "dark.png"), 16]]  # 4094 * 255 / 65535, rounded
    assert "almost black (brightest value at most 16 of 255): 1;" in format_description(d)
    assert "set data.bit_depth to the camera's bits (--set data.bit_depth=12, or 14)" in format_description(d)
    d = describe_samples(SampleSet(samples, ["a", "b"], root=str(tmp_path)), bit_depth=12)
    assert d["almost_black"] == [] and d["bit_depth"] == 12  # read as the camera's 12 bits, dark.png is not


def _twelve_bit(tmp_path: Path) -> tuple[np.ndarray, list[Path]]:
    """A 12-bit camera's values 0..4095 (and one above, which 12 bits clip) in a 16-bit PNG and a 16-bit TIFF."""
    values = np.linspace(0, 4095, 16 * 24).astype(np.uint16).reshape(16, 24)
    values[0, 0] = 4200  # read as 16 of 255 under bit_depth 0, 261 clipped to 255 under 12
    files = [tmp_path / "cam.png", tmp_path / "cam.tif"]
    for f in files:
        Image.fromarray(values).save(f)
    return values, files


def test_a_cameras_12_bit_data_in_16_bit_files_is_scaled_by_data_bit_depth(tmp_path):
    """Microscope cameras store 12- or 14-bit values in 16-bit TIFF/PNG; scaled by 65535 they reached the model as
    0..16 of 255, nearly black, about 17 grey levels. data.bit_depth=12 scales them by 4095 (clipped to 255), in
    both decoders (torchvision for the PNG, PIL for the TIFF); 0 keeps the file's own range, 8-bit files are
    read as they are, and a bit depth outside 0, 9..16 is refused naming the valid ones."""
    values, files = _twelve_bit(tmp_path)
    want = np.clip(np.round(values.astype(np.float64) * 255 / 4095), 0, 255).astype(np.uint8)
    for f in files:
        assert int(read_image(f).max()) == 16  # the file's own range: almost black
        img = read_image(f, bit_depth=12)  # (3, H, W)
        assert img.dtype == torch.uint8 and np.array_equal(img[0].numpy(), want), f
        assert int(img[0, 0, 0]) == 255 and len(np.unique(img.numpy())) > 200
        assert np.array_equal(read_image(f, bit_depth=16).numpy(), read_image(f).numpy())
    eight = tmp_path / "eight.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(eight)
    assert np.array_equal(read_image(eight, bit_depth=12).numpy(), read_image(eight).numpy())
    for bad in (8, 17, -1):
        with pytest.raises(FinescopeError, match=r"^config key 'data.bit_depth' is .*; choose 0 .*: 9, 10, 11, 12, "
                                                 r"13, 14, 15, 16$"):
            read_image(files[0], bit_depth=bad)
        with pytest.raises(FinescopeError, match="data.bit_depth"):
            ImageDataset([Sample(str(files[0]), 0, "a")], bit_depth=bad)


@pytest.mark.parametrize("planar", ["contig", "separate"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_16_bit_rgb_tiff_is_read_at_16_bits_through_tifffile(tmp_path, planar, compression):
    """Pillow reads a 16-bit RGB TIFF as its high bytes (12-bit data kept 16 levels of each colour under
    data.bit_depth=12) and an uncompressed planar one as garbage; tifffile reads all 16 bits, so every value
    scales by 255/4095 (or 255/65535) like a 16-bit PNG's."""
    tifffile = pytest.importorskip("tifffile")
    values = np.linspace(0, 4095, 8 * 8 * 3).astype(np.uint16).reshape(8, 8, 3)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, values if planar == "contig" else values.transpose(2, 0, 1), photometric="rgb",
                     planarconfig=planar, compression=compression)
    for depth, top in ((12, 4095), (0, 65535)):
        want = np.round(values.astype(np.float64) * 255 / top).astype(np.uint8).transpose(2, 0, 1)
        assert np.array_equal(read_image(path, bit_depth=depth).numpy(), want), depth
    assert len(np.unique(read_image(path, bit_depth=12).numpy())) > 100


def test_every_16_bit_value_reads_the_same_from_an_rgb_tiff_as_from_a_png(tmp_path):
    """The RGB TIFF (tifffile, numpy) and the PNG (torchvision, torch) scale 16-bit values by the same float32
    steps, so no value rounds to another byte in one than in the other, whatever data.bit_depth."""
    tifffile = pytest.importorskip("tifffile")
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "rgb.tif", np.repeat(values[:, :, None], 3, axis=2), photometric="rgb")
    for depth in (0, 12, 14):
        png, tif = read_image(tmp_path / "grey.png", depth), read_image(tmp_path / "rgb.tif", depth)
        assert np.array_equal(png.numpy(), tif.numpy()), depth


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow's, opening the cut file
def test_tiffs_that_pillow_cannot_identify_are_read_through_tifffile(tmp_path, monkeypatch):
    """Float RGB(A), float16/float64 grey and 16-bit grey-with-alpha TIFFs (flat-field corrected or stain-normalised
    exports) were 'cannot identify image file': Pillow has no mode for them. They are read through tifffile and
    scaled as Pillow's float and 16-bit images are: float in [0, 1] by 255, other floats by their range, NaN
    black; 16-bit by data.bit_depth; turned by their Orientation; their header size is known before decoding."""
    from finescope.data.dataset import _header_size

    tifffile = pytest.importorskip("tifffile")
    unit = np.linspace(0, 1, 6 * 7 * 3).reshape(6, 7, 3)
    want = np.round(unit * 255).astype(np.uint8)
    cases = {
        "rgb32.tif": (unit.astype(np.float32), {"photometric": "rgb"}, want),
        "rgba32.tif": (np.dstack([unit, unit[:, :, :1]]).astype(np.float32),
                       {"photometric": "rgb", "extrasamples": ["unassalpha"]}, want),
        "rgb255.tif": ((unit * 255).astype(np.float32), {"photometric": "rgb"}, want),  # 0..255 floats: range
        "grey16f.tif": (unit[:, :, 0].astype(np.float16), {"photometric": "minisblack"},
                        np.round(unit[:, :, :1].astype(np.float16).astype(np.float64) * 255).astype(np.uint8)),
        "grey64.tif": (unit[:, :, 0], {"photometric": "minisblack"}, want[:, :, :1]),
        "la16.tif": (np.dstack([unit[:, :, 0] * 4095, unit[:, :, 1] * 4095]).round().astype(np.uint16),
                     {"photometric": "minisblack", "extrasamples": ["unassalpha"]}, want[:, :, :1]),
    }
    for name, (data, kwargs, expected) in cases.items():
        tifffile.imwrite(tmp_path / name, data, **kwargs)
        got = read_image(tmp_path / name, bit_depth=12 if name == "la16.tif" else 0).permute(1, 2, 0).numpy()
        assert np.array_equal(got, np.broadcast_to(expected, (6, 7, 3))), name
        assert _header_size(str(tmp_path / name)) == (6, 7), name
    holes = unit.astype(np.float32)
    holes[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", holes, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    got = read_image(tmp_path / "nan.tif").permute(1, 2, 0).numpy()
    assert got.shape == (7, 6, 3) and _header_size(str(tmp_path / "nan.tif")) == (7, 6)
    assert np.array_equal(got, np.rot90(np.where(np.isnan(holes), 0, want), -1))  # NaN black, turned upright
    (tmp_path / "cut.tif").write_bytes((tmp_path / "rgb32.tif").read_bytes()[:200])
    with pytest.raises(FinescopeError, match=r"cannot read image '.*cut\.tif': .*data.on_error=skip"):
        read_image(tmp_path / "cut.tif")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 42 pixels: more than twice the limit, refused as Pillow does
    with pytest.raises(FinescopeError, match=r"rgb32\.tif': 42 pixels, more than the 40 that finescope reads"):
        read_image(tmp_path / "rgb32.tif")


def test_a_16_bit_rgba_tiff_drops_alpha_and_reads_its_first_page(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    values = np.linspace(0, 4095, 6 * 7 * 3).astype(np.uint16).reshape(6, 7, 3)
    want = np.round(values.astype(np.float64) * 255 / 4095).astype(np.uint8).transpose(2, 0, 1)
    rgba = np.dstack([values, np.full((6, 7, 1), 4095, np.uint16)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(read_image(tmp_path / "rgba.tif", bit_depth=12).numpy(), want)
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([values, 4095 - values]), photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "pages.tif", bit_depth=12).numpy(), want)


def test_a_16_bit_rgb_tiffs_orientation_is_applied_as_pillow_applies_an_8_bit_ones(tmp_path):
    """Pillow turns a TIFF by its Orientation tag and finescope's header sizes follow it; the 16-bit RGB TIFFs that
    tifffile reads are turned the same way, for every orientation."""
    from finescope.data.dataset import _header_size

    tifffile = pytest.importorskip("tifffile")
    arr = rgb_array(10, 14)
    for orientation in range(1, 9):
        tags = [(274, "H", 1, orientation, True)]
        tifffile.imwrite(tmp_path / "8.tif", arr, photometric="rgb", extratags=tags)
        tifffile.imwrite(tmp_path / "16.tif", arr.astype(np.uint16) * 257, photometric="rgb", extratags=tags)
        eight, sixteen = read_image(tmp_path / "8.tif"), read_image(tmp_path / "16.tif")
        assert np.array_equal(sixteen.numpy(), eight.numpy()), orientation
        assert _header_size(str(tmp_path / "16.tif")) == tuple(sixteen.shape[1:]), orientation


def test_a_damaged_or_undecodable_16_bit_rgb_tiff_is_one_line(tmp_path, monkeypatch):
    """A truncated compressed 16-bit RGB TIFF raised zlib's own error through tifffile; a compression that
    tifffile decodes only with imagecodecs (LZW, PackBits, JPEG) says to install it."""
    tifffile = pytest.importorskip("tifffile")
    values = np.random.default_rng(0).integers(0, 65536, (64, 48, 3)).astype(np.uint16)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, values, photometric="rgb", compression="zlib", rowsperstrip=8)
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FinescopeError, match=r"cannot read image '.*cut\.tif': .*data.on_error=skip") as e:
        read_image(cut)
    assert "\n" not in str(e.value)

    def needs_imagecodecs(self, *args, **kwargs):
        raise KeyError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")  # tifffile's words

    monkeypatch.setattr(tifffile.TiffPage, "asarray", needs_imagecodecs)
    with pytest.raises(FinescopeError, match=r"'.*rgb\.tif' at its own bit depth: .*pip install imagecodecs"):
        read_image(path, bit_depth=12)


def test_the_disk_cache_keeps_images_decoded_with_another_bit_depth_apart(tmp_path):
    """An image cached on disk with data.bit_depth=0 was not to be read back by a run with data.bit_depth=12 (nor
    the other way): the bit depth is part of every entry's key, and the default keeps the keys it had."""
    _, files = _twelve_bit(tmp_path)
    samples = [Sample(str(f), 0, "a") for f in files]
    cache = tmp_path / "cache"
    for depth, top in ((0, 16), (12, 255), (0, 16)):
        ds = ImageDataset(samples, cache="disk", cache_dir=str(cache), bit_depth=depth)
        assert [int(ds[i]["image"].max()) for i in range(2)] == [top] * 2, depth
        assert [int(ds[i]["image"].max()) for i in range(2)] == [top] * 2, depth  # from the cache
    assert len(list(cache.glob("*/*.npy"))) == 4
    assert DiskCache(cache).entry(files[0]) != DiskCache(cache, 12).entry(files[0])
    memory = ImageDataset(samples, cache="memory", bit_depth=12)
    assert int(memory[0]["image"].max()) == 255 and int(memory[0]["image"].max()) == 255


def test_dark_sixteen_bit_samples_headers_and_decodes_only_16_bit_files(tmp_path, monkeypatch):
    """train's check for 12-bit data in 16-bit files reads the headers of at most 8 images and decodes only the
    16-bit ones; it names the first almost black one, and none once data.bit_depth reads them right."""
    from finescope.data import dataset, summary

    _, files = _twelve_bit(tmp_path)
    eights = [tmp_path / f"e{i}.png" for i in range(30)]
    for e in eights:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(e)  # black, but 8-bit: not this problem
    decoded = []
    monkeypatch.setattr(summary, "read_image", lambda p, b=0: decoded.append(p) or dataset.read_image(p, b))
    assert summary.dark_sixteen_bit([str(e) for e in eights]) is None and decoded == []
    paths = [str(p) for p in [*eights[:3], files[1], *eights[3:]]]  # every 3rd of 31 is read: 0, 3, ...
    assert summary.dark_sixteen_bit(paths) == (str(files[1]), 16)
    assert decoded == [str(files[1])]
    assert summary.dark_sixteen_bit(paths, bit_depth=12) is None
    assert [dataset.is_sixteen_bit(f) for f in (*files, eights[0])] == [True, True, False]


# ------------------------------------------------------------------------------------------------ real data


@realdata
@pytest.mark.realdata
def test_real_breakhis_png_decodes():
    path = next((SHARED_DATA / "breakhis").rglob("SOB_*-100-*.png"))
    t = read_image(path)
    assert t.dtype == torch.uint8 and t.shape[0] == 3 and t.shape[2] == 700 and t.shape[1] in (460, 456)
    first = SHARED_DATA / "breakhis/BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis"
    t = read_image(sorted(first.rglob("*.png"))[0])
    assert t.shape == (3, 460, 700)


def test_seeded_augmentation_depends_on_epoch_and_image_only(tmp_path):
    from finescope.data.transforms import build_transform

    samples = make_samples(tmp_path, sizes=((16, 24), (16, 24)))
    ds = ImageDataset(samples, transform=build_transform("strong", train=True), seed=7)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    cuda_seed = torch.cuda.initial_seed() if torch.cuda.is_available() else None
    first = ds[(1, 3)]["image"]
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's dropout stream is untouched
    if cuda_seed is not None:  # and the GPU's generator is not reseeded either
        assert torch.cuda.initial_seed() == cuda_seed
    assert ImageDataset(samples, transform=build_transform("strong", train=True), seed=-3)[(0, 0)] is not None
    torch.manual_seed(999)
    assert torch.equal(ds[(1, 3)]["image"], first)
    assert ds[(1, 3)]["index"] == 1
    others = [ds[(1, e)]["image"] for e in range(4, 12)]
    assert any(o.shape != first.shape or not torch.equal(o, first) for o in others)


def _dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and rotations of a (3, H, W) image: rot90 by k, then optionally a horizontal flip."""
    rots = [torch.rot90(img, k, dims=(-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


def test_one_orientation_per_step_keeps_every_flip_and_rotation(tmp_path):
    """Under ``one_orientation`` every non-square image of a step has the step's orientation (so a batch of
    one-size images is not padded to a square), both orientations occur, a square image is left as drawn, and
    each image still gets each of the 8 flips and rotations about 1/8 of the time."""
    samples = make_samples(tmp_path, sizes=((6, 10), (10, 6), (7, 7)))  # landscape, portrait, square
    originals = [read_image(x.path) for x in samples]
    transform = build_transform("geometric", train=True)
    ds = ImageDataset(samples, transform=transform, seed=5, one_orientation=True)
    plain = ImageDataset(samples, transform=transform, seed=5)
    counts = np.zeros((2, 8), dtype=int)
    orientations = set()
    mixed = 0
    for epoch, step in ((e, s) for e in range(120) for s in range(4)):
        items = [ds[(i, epoch, step)]["image"] for i in range(3)]
        shapes = {tuple(t.shape[-2:]) for t in items[:2]}
        assert len(shapes) == 1, f"epoch {epoch} step {step}: {shapes}"
        (h, w), = shapes
        assert (h > w) == ds.portrait(epoch, step)
        orientations.add(h > w)
        assert torch.equal(items[2], plain[(2, epoch, step)]["image"])  # a square image is not touched
        mixed += plain[(0, epoch, step)]["image"].shape != plain[(1, epoch, step)]["image"].shape
        for i in range(2):
            match = [k for k, t in enumerate(_dihedral(originals[i])) if t.shape == items[i].shape
                     and torch.equal(t, items[i])]
            assert len(match) == 1  # a flip or rotation of the image, nothing else
            counts[i, match[0]] += 1
    assert orientations == {False, True}
    assert len({ds.portrait(0, s) for s in range(16)}) == 2  # both orientations within one epoch
    assert mixed > 100  # without the option, half the pairs differ in shape
    assert counts.min() >= 30 and counts.max() <= 90, counts  # 60 expected each (binomial sd 7.2)


def test_one_orientation_only_for_training_with_rotations(tmp_path):
    from finescope.config import config_from_dict
    from finescope.trainer import make_dataset

    samples = make_samples(tmp_path, sizes=((6, 10), (10, 6)))
    sample_set = SampleSet(samples, ["a", "b"])
    for augment, mode, compile_, train, expected in (
            ("microscopy", "on", "off", True, True), ("geometric", True, "off", True, True),  # YAML's on = True
            ("none", "on", "off", True, False), ("microscopy", "off", "default", True, False),
            ("microscopy", "on", "off", False, False), ("microscopy", "auto", "off", True, False),
            ("microscopy", "auto", "reduce-overhead", True, True), ("none", "auto", "default", True, False)):
        cfg = config_from_dict({"data": {"augment": augment, "one_orientation": mode, "num_workers": 0},
                                "train": {"device": "cpu", "compile": compile_},
                                "model": {"global_size": 4, "local_size": 4}})
        assert make_dataset(sample_set, [0, 1], cfg, train).one_orientation is expected, (augment, mode, compile_)
    with pytest.raises(FinescopeError, match="data.one_orientation"):
        config_from_dict({"data": {"one_orientation": "sometimes"}})


def test_training_loader_under_compile_gives_one_orientation_per_batch(tmp_path):
    """Through the trainer's loader (the sampler's step tags, workers, collate): under train.compile the
    default ``auto`` gives every batch one orientation, with batches of both, so no batch is padded to a
    square; eager training keeps mixed batches."""
    from finescope.config import config_from_dict
    from finescope.trainer import make_loader

    samples = make_samples(tmp_path, sizes=[(6, 10)] * 8 + [(10, 6)] * 8)
    sample_set = SampleSet(samples, ["a", "b"])
    for compile_, one in (("default", True), ("off", False)):
        cfg = config_from_dict({"data": {"augment": "geometric", "num_workers": 1},
                                "train": {"device": "cpu", "compile": compile_, "batch_size": 2},
                                "model": {"global_size": 4, "local_size": 4}})
        orientations, mixed = [], 0
        for epoch in range(2):
            loader = make_loader(sample_set, list(range(16)), cfg, train=True, epoch=epoch)
            for batch in loader:
                portrait = {bool(h > w) for h, w in batch.sizes.tolist()}
                mixed += len(portrait) > 1
                orientations += list(portrait)
                if len(portrait) == 1:
                    assert tuple(batch.images.shape[-2:]) in ((6, 10), (10, 6))  # not padded to a square
        if one:
            assert mixed == 0 and set(orientations) == {False, True}
        else:
            assert mixed > 0  # 16 batches of 2 with orientations drawn per image


def _fixed_jitter(b=1.0, c=1.0, s=1.0, h=0.0):
    from finescope.data.transforms import ColourJitter

    jitter = ColourJitter(0.1, 0.1, 0.1, 0.05)
    values = iter([b, c, s, h])
    jitter._factor = lambda spread, centre=1.0: next(values)
    return jitter


@pytest.mark.parametrize(
    ("factors", "reference"),
    [({"b": 1.15}, lambda im: TF.adjust_brightness(im, 1.15)), ({"c": 0.8}, lambda im: TF.adjust_contrast(im, 0.8)),
     ({"s": 1.2}, lambda im: TF.adjust_saturation(im, 1.2)), ({}, lambda im: im)],
)
def test_colour_jitter_matches_torchvision_brightness_contrast_saturation(factors, reference):
    img = torch.from_numpy(rgb_array(30, 40, seed=3)).permute(2, 0, 1).contiguous()
    out = _fixed_jitter(**factors)(img)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    assert (out.int() - reference(img).int()).abs().max() <= 1  # rounding only


def test_colour_jitter_hue_rotates_chroma_and_keeps_grey():
    grey = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    assert torch.equal(_fixed_jitter(h=0.05)(grey), grey)
    img = torch.from_numpy(rgb_array(30, 40, seed=4)).permute(2, 0, 1).contiguous()
    out = _fixed_jitter(h=0.05)(img)
    luma = torch.tensor([0.299, 0.587, 0.114])
    inside = ((out > 0) & (out < 255)).all(dim=0)  # pixels not clipped
    assert (torch.einsum("c,chw->hw", luma, out.float() - img.float())[inside]).abs().max() <= 1.0
    assert (out.int() - img.int()).abs().float().mean() > 2  # the colours did move


def test_disk_cache_decodes_once_and_notices_edits(tmp_path, monkeypatch):
    import finescope.data.dataset as dataset_module

    samples = make_samples(tmp_path, sizes=((10, 14), (12, 16)))
    cache = tmp_path / "cache"
    decoded = []
    real_read = dataset_module.read_image
    monkeypatch.setattr(dataset_module, "read_image", lambda p, *a: decoded.append(p) or real_read(p, *a))
    first = ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"]
    again = ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"]  # another run, same cache
    assert torch.equal(first, again) and torch.equal(first, real_read(samples[0].path))
    assert decoded == [samples[0].path]
    assert len(list(cache.rglob("*.npy"))) == 1 and not list(cache.rglob("*.tmp"))
    save(rgb_array(10, 14, seed=99), Path(samples[0].path))  # the file changes: decoded again
    edited = ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"]
    assert not torch.equal(edited, first) and len(decoded) == 2
    entry = next(iter(cache.rglob("*.npy")))
    entry.write_bytes(b"damaged")  # a damaged entry is decoded again, not an error
    assert ImageDataset(samples, cache="disk", cache_dir=str(cache))[1]["image"].shape == (3, 12, 16)


def test_disk_cache_entry_with_a_damaged_header_is_decoded_again(tmp_path):
    """One damaged byte in an entry's header (``(3, 10, 14)`` read as ``(#, 10, 14)``) made numpy's header
    parser raise tokenize.TokenError, which ended training with a traceback; it is decoded again."""
    samples, cache = make_samples(tmp_path), tmp_path / "cache"
    first = ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"]
    entry = next(iter(cache.rglob("*.npy")))
    data = bytearray(entry.read_bytes())
    data[data.index(b"'shape': (") + len(b"'shape': (")] = ord("#")
    entry.write_bytes(bytes(data))
    assert torch.equal(ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"], first)
    assert torch.equal(torch.from_numpy(np.load(entry)), first)  # and rewritten


def test_disk_cache_entry_whose_header_names_a_smaller_shape_is_decoded_again(tmp_path):
    """A damaged digit of an entry's shape (``(3, 10, 14)`` read as ``(3, 10, 13)``) still parses, and numpy reads
    that many bytes and leaves the rest: the entry was served as another, smaller image (garbage, or 'smaller than
    the model's crops' naming an intact file). An entry whose data is not all read is damaged: decoded again."""
    samples, cache = make_samples(tmp_path, sizes=((10, 14),)), tmp_path / "cache"
    first = ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"]
    entry = next(iter(cache.rglob("*.npy")))
    entry.write_bytes(entry.read_bytes().replace(b"(3, 10, 14)", b"(3, 10, 13)", 1))
    assert np.load(entry).shape == (3, 10, 13)  # numpy reads it without a complaint
    assert torch.equal(ImageDataset(samples, cache="disk", cache_dir=str(cache))[0]["image"], first)
    assert torch.equal(torch.from_numpy(np.load(entry)), first)  # and rewritten


def test_disk_cache_notices_a_replaced_file_of_the_same_size_and_modification_time(tmp_path):
    """``cp -p``, ``rsync -a`` and ``tar`` keep a file's modification time, and an uncompressed BMP or TIFF of one
    image size has one file size: a file replaced so is still decoded again, not served from the cache."""
    path = save(np.zeros((10, 14, 3), np.uint8), tmp_path / "a.bmp")
    samples, cache = [Sample(str(path), 0, "g0")], str(tmp_path / "cache")
    assert ImageDataset(samples, cache="disk", cache_dir=cache)[0]["image"].max() == 0
    st = path.stat()
    new = save(np.full((10, 14, 3), 200, np.uint8), tmp_path / "new.bmp")
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert ImageDataset(samples, cache="disk", cache_dir=cache)[0]["image"].min() == 200


def test_disk_cache_dir_expands_home_as_data_root_does(tmp_path, monkeypatch):
    """``data.cache_dir: ~/cache`` (YAML and --set do not expand it) is the home folder's, not a "~" folder in
    the working one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    ImageDataset(make_samples(tmp_path), cache="disk", cache_dir="~/cache")[0]
    assert list((tmp_path / "home" / "cache").rglob("*.npy")) and not (tmp_path / "~").exists()


def _no_home(monkeypatch) -> None:
    """No home folder, as for a container's user id without a passwd entry and HOME unset."""
    def home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(home))


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_dataset_without_a_disk_cache_needs_no_home_folder(tmp_path, monkeypatch, cache):
    """The default cache folder is under the home folder; without a disk cache it is not asked for (a user
    without a home folder got a RuntimeError traceback from every dataset)."""
    samples = make_samples(tmp_path)
    _no_home(monkeypatch)
    ds = ImageDataset(samples, cache=cache)
    assert ds.cache_dir is None and ds[0]["image"].shape[0] == 3


def test_disk_cache_without_a_home_folder_says_to_set_cache_dir(tmp_path, monkeypatch):
    """A disk cache with no folder given and no home folder is one line naming data.cache_dir, not a
    RuntimeError; a folder given needs no home."""
    samples = make_samples(tmp_path)
    _no_home(monkeypatch)
    with pytest.raises(FinescopeError, match="set data.cache_dir to a writable folder"):
        ImageDataset(samples, cache="disk")
    assert ImageDataset(samples, cache="disk", cache_dir=str(tmp_path / "cache"))[0]["image"].shape[0] == 3
    # '~' left as it is by expanduser (no HOME, no passwd entry) would make a folder named '~' in the working one
    import pwd

    monkeypatch.delenv("HOME", raising=False)
    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FinescopeError, match=r"data.cache_dir '~/cache': '~' names no home folder"):
        ImageDataset(samples, cache="disk", cache_dir="~/cache")
    assert not (tmp_path / "~").exists()


def test_disk_cache_removes_the_temporary_file_of_a_killed_writer(tmp_path):
    """A DataLoader worker killed (SIGKILL) while writing an entry leaves its temporary file, which stayed in
    the cache forever; the next cache of the folder (in a new process) removes it once it is an hour old, and
    keeps a fresh one (a live writer's, in a cache that two runs share) and files that are not its own."""
    import signal

    samples = make_samples(tmp_path)
    cache = tmp_path / "cache"
    code = ("import os, signal, sys\n"
            "import numpy as np\n"
            "from finescope.data import read_image\n"
            "from finescope.data.dataset import DiskCache\n"
            "def killed(f, arr, **kw):\n"
            "    f.write(b'\\x93NUMPY half an entry')\n"
            "    f.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "np.save = killed\n"
            "cache = DiskCache(sys.argv[1])\n"
            "cache.put(cache.entry(sys.argv[2]), read_image(sys.argv[2]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(cache), samples[0].path], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-500:]
    (left,) = cache.rglob("*.tmp")  # the killed writer's
    folder = left.parent
    fresh, other = folder / "tmplive.tmp", folder / "notes.txt"  # a live writer's; not a temporary file
    fresh.write_bytes(b"x")
    other.write_bytes(b"x")
    two_hours_ago = left.stat().st_mtime - 2 * 3600
    for path in (left, other):
        os.utime(path, (two_hours_ago, two_hours_ago))
    ImageDataset(samples, cache="disk", cache_dir=str(cache))  # this process has not opened the folder yet
    assert not left.exists() and fresh.exists() and other.exists()


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_disk_cache_that_cannot_be_written_warns_once_and_loses_no_image(tmp_path, on_error):
    """The cache only saves decoding: a cache folder that is a file, or a full disk, is one warning naming the
    folder, and every image is still read (it stopped training before, even with data.on_error=skip). An
    unwritable folder is found when the dataset is made, before the loader's workers fork: one warning, not
    one per worker and dataset."""
    import errno

    samples = make_samples(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.warns(FinescopeWarning, match=re.escape(f"cannot write the image cache '{blocker}': a file")) as w:
        ds = ImageDataset(samples, cache="disk", cache_dir=str(blocker), on_error=on_error)
        images = [ds[i]["image"] for i in range(len(ds))]
        ImageDataset(samples, cache="disk", cache_dir=str(blocker), on_error=on_error)[0]  # the val side's
    assert len([x for x in w if "image cache" in str(x.message)]) == 1
    assert all(torch.equal(img, read_image(s.path)) for img, s in zip(images, samples, strict=True))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = tmp_path / "cache"
    ds = ImageDataset(samples, cache="disk", cache_dir=str(cache), on_error=on_error)
    with pytest.MonkeyPatch.context() as m, pytest.warns(FinescopeWarning, match="No space left") as w:
        m.setattr(np, "save", full)
        images = [ds[i]["image"] for i in range(len(ds))]
    assert len([x for x in w if "image cache" in str(x.message)]) == 1
    assert all(torch.equal(img, read_image(s.path)) for img, s in zip(images, samples, strict=True))
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.npy"))
    assert torch.equal(ds[0]["image"], images[0]) and list(cache.rglob("*.npy"))  # space again: cached


def test_disk_cache_writer_whose_temporary_file_was_swept_loses_no_image_and_says_so(tmp_path):
    """A writer paused for over an hour (a suspended process, a slow network folder) has its temporary file removed
    by another process's sweep of killed writers' files; its rename then failed and it warned "cannot write the
    image cache ...: No such file or directory; set data.cache_dir to a writable folder", and kept quiet about
    the cache's real failures from then on. The image is returned, the warning says what happened, and the next
    read caches it."""
    import errno

    samples = make_samples(tmp_path)
    cache = tmp_path / "cache"
    ds = ImageDataset(samples, cache="disk", cache_dir=str(cache))
    real_save = np.save

    def swept_meanwhile(f, arr, **kwargs):
        real_save(f, arr, **kwargs)
        os.unlink(f.name)  # remove_stale of another process, while this one was paused

    with pytest.MonkeyPatch.context() as m, pytest.warns(FinescopeWarning) as w:
        m.setattr(np, "save", swept_meanwhile)
        image = ds[0]["image"]
    assert torch.equal(image, read_image(samples[0].path))
    assert [str(x.message) for x in w] == [
        f"cache entry for '{samples[0].path}' not written: its temporary file was removed meanwhile (a writer paused "
        "for over 60 minutes is taken for a killed one); it will be written next time"]
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.npy"))
    assert torch.equal(ds[0]["image"], image) and len(list(cache.rglob("*.npy"))) == 1  # written next time

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as m, pytest.warns(FinescopeWarning, match="No space left"):
        m.setattr(np, "save", full)  # a real failure later is still warned about
        ds[1]["image"]


def test_colour_on_device_matches_colour_in_workers(tmp_path):
    """data.colour_on=device: the dataset draws the jitter's factors (after the geometric steps, from the same
    seeded stream) and the batch applies them on the device. The batch equals the worker-side jitter up to
    its rounding to uint8 levels, and the padding stays 0."""
    from finescope.data import colour_jitter

    samples = make_samples(tmp_path, sizes=((12, 20), (18, 14), (12, 20)))  # mixed orientations: padding
    keys = [(i, 3) for i in range(len(samples))]
    in_workers = ImageDataset(samples, transform=build_transform("microscopy", True), seed=5)
    on_device = ImageDataset(samples, transform=build_transform("microscopy", True, colour=False), seed=5,
                             colour=colour_jitter("microscopy", True))
    a = collate_padded([in_workers[k] for k in keys])
    b = collate_padded([on_device[k] for k in keys])
    assert a.colour is None and b.colour.shape == (3, 10)
    assert torch.equal(a.sizes, b.sizes) and not (a.sizes == a.sizes[:1]).all()  # same flips and rotations
    x, y = a.model_input("cpu"), b.model_input("cpu", channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (x - y).abs().max() <= 1 / 255 + 1e-6
    assert (y - b.images.float() / 255).abs().max() > 0.01  # the colours did move
    for img, (h, w) in zip(y, b.sizes.tolist(), strict=True):
        assert not img[:, h:].any() and not img[:, :, w:].any()
    assert torch.equal(b.to("cpu").colour, b.colour) and a.to("cpu").colour is None


def test_colour_jitter_split_per_preset():
    """Only a jitter that is its preset's last step moves to the device: microscopy's. strong blurs after its
    jitter, so it keeps both in the workers, in order, whatever ``colour`` says."""
    from finescope.data import colour_jitter
    from finescope.data.transforms import ColourJitter

    assert colour_jitter("microscopy", True).brightness == 0.1
    for name, train in (("geometric", True), ("strong", True), ("none", True), ("microscopy", False)):
        assert colour_jitter(name, train) is None
    for colour in (True, False):
        steps = [type(t).__name__ for t in build_transform("strong", True, colour=colour).transforms]
        assert steps[-2:] == ["ColourJitter", "RandomApply"]
    assert not any(isinstance(t, ColourJitter) for t in build_transform("microscopy", True, colour=False).transforms)


def test_colour_on_device_with_float_images():
    """A float batch in [0, 1] is not divided by 255 again, and the batch itself is left unchanged."""
    from finescope.data import colour_jitter

    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 10)
    params = torch.stack([colour_jitter("microscopy", True).sample() for _ in range(2)])
    batch = Batch(images.clone(), torch.tensor([[8, 10], [8, 10]]), torch.tensor([0, 1]), torch.tensor([0, 1]),
                  params)
    out = batch.model_input("cpu")
    assert torch.equal(batch.images, images)
    assert 0.5 < out.max() <= 1 and (out - images).abs().max() < 0.5


def test_shape_order_batches_images_of_one_view_shape_together():
    """Landscape (and square) images first, then portrait ones, each by aspect ratio and size; an image whose
    header cannot be read goes last; ties keep the dataset order."""
    sizes = [(460, 700), (700, 460), None, (456, 700), (460, 700), (224, 224), (800, 400)]
    order = shape_order(sizes)
    assert order == [5, 0, 4, 3, 1, 6, 2]  # 460x700 (aspect 1.52) before 456x700 (1.54)
    assert sorted(order) == list(range(len(sizes)))


def test_evaluation_loader_reads_images_of_one_shape_in_one_batch(tmp_path):
    """An evaluation loader over interleaved landscape and portrait images reads each orientation in its own
    batches (none padded to a square), every image once; predictions come back in dataset order."""
    from finescope.config import load_config
    from finescope.engine import predict_loader
    from finescope.models import create_model
    from finescope.trainer import make_loader

    samples = []
    for i in range(6):
        shape = (64, 96) if i % 2 == 0 else (96, 64)
        samples.append(Sample(str(save(rgb_array(*shape, seed=i), tmp_path / f"{i}.png")), label=i % 2,
                              group=str(i)))
    sample_set = SampleSet(samples, ["a", "b"])
    cfg = load_config(None, ["data.num_workers=0", "train.batch_size=3", "model.backbone=tiny",
                             "model.global_size=32", "model.local_size=24"])
    loader = make_loader(sample_set, np.arange(6), cfg, train=False)
    batches = list(loader)
    assert [b.indices.tolist() for b in batches] == [[0, 2, 4], [1, 3, 5]]
    assert [tuple(b.images.shape[-2:]) for b in batches] == [(64, 96), (96, 64)]
    torch.manual_seed(0)
    model = create_model(cfg.model, 2).eval()
    preds = predict_loader(model, loader, torch.device("cpu"), amp="off")
    assert preds.indices.tolist() == list(range(6))
    assert preds.labels.tolist() == [0, 1, 0, 1, 0, 1]
    with torch.no_grad():  # row i is image i's prediction: image 1 was read second in the portrait batch
        alone = model(batches[1].images.float() / 255, batches[1].sizes).probabilities()
    assert np.allclose(preds.probs[[1, 3, 5]], alone.numpy(), atol=1e-6)


def test_an_images_evaluation_does_not_depend_on_its_batch_mates(tmp_path):
    """Images whose views differ by a few pixels (BreakHis' 700x460 and 700x456) are evaluated in batches of
    their own view shape: none is padded to a larger batch-mate's, which changed its attention and, through the
    threshold, its boxes (a BreakHis image's probability went from 0.53 alone to 0.01 in a mixed batch; found in
    review). Each image's prediction and boxes are those it gets evaluated alone."""
    from finescope.config import load_config
    from finescope.engine import predict_loader
    from finescope.models import create_model
    from finescope.trainer import make_loader

    shapes = [(46, 70), (45, 70), (46, 70), (45, 70), (46, 70)]
    samples = [Sample(str(save(rgb_array(*s, seed=i), tmp_path / f"{i}.png")), label=i % 2, group=str(i))
               for i, s in enumerate(shapes)]
    sample_set = SampleSet(samples, ["a", "b"])
    cfg = load_config(None, ["data.num_workers=0", "train.batch_size=8", "model.backbone=tiny",
                             "model.global_size=45", "model.local_size=24", "model.num_crops=2"])
    loader = make_loader(sample_set, np.arange(5), cfg, train=False)
    assert sorted(b.indices.tolist() for b in loader) == [[0, 2, 4], [1, 3]]
    torch.manual_seed(0)
    model = create_model(cfg.model, 2).eval()
    together = predict_loader(model, loader, torch.device("cpu"), amp="off")
    for i in range(5):
        alone = predict_loader(model, make_loader(sample_set, [i], cfg, train=False), torch.device("cpu"), amp="off")
        np.testing.assert_allclose(together.probs[i], alone.probs[0], atol=1e-6)
        np.testing.assert_allclose(together.boxes[i], alone.boxes[0], atol=0.01)  # batched arithmetic



def test_images_of_unknown_size_are_evaluated_each_in_its_own_batch(tmp_path, monkeypatch):
    """An image whose header cannot be read (size None) has no known view shape: such images shared evaluation
    batches, padded to the largest of them, so an image's prediction depended on which others were unreadable
    (found in review). Each is now its own batch, and predicted as it is alone."""
    from finescope.config import load_config
    from finescope.data import dataset as ds
    from finescope.engine import predict_loader
    from finescope.models import create_model
    from finescope.trainer import make_loader

    shapes = [(46, 70), (45, 70), (46, 70), (60, 40)]
    samples = [Sample(str(save(rgb_array(*s, seed=i), tmp_path / f"{i}.png")), label=i % 2, group=str(i))
               for i, s in enumerate(shapes)]
    sample_set = SampleSet(samples, ["a", "b"])
    monkeypatch.setattr(ds, "_header_size", lambda path: None if not path.endswith("0.png") else (46, 70))
    cfg = load_config(None, ["data.num_workers=0", "train.batch_size=8", "model.backbone=tiny",
                             "model.global_size=45", "model.local_size=24", "model.num_crops=2"])
    loader = make_loader(sample_set, np.arange(4), cfg, train=False)
    assert sorted(b.indices.tolist() for b in loader) == [[0], [1], [2], [3]]
    torch.manual_seed(0)
    model = create_model(cfg.model, 2).eval()
    together = predict_loader(model, loader, torch.device("cpu"), amp="off")
    for i in range(4):
        alone = predict_loader(model, make_loader(sample_set, [i], cfg, train=False), torch.device("cpu"), amp="off")
        np.testing.assert_allclose(together.probs[i], alone.probs[0], atol=1e-6)
        np.testing.assert_allclose(together.boxes[i], alone.boxes[0], atol=0.01)  # batched arithmetic


def test_a_registered_full_resolution_variant_batches_images_of_one_file_size(tmp_path, monkeypatch):
    """A variant registered with ``hires`` (as global-hires is) reads the image itself, not a view: its evaluation
    batches hold images of one file size, whatever the variant is called. 100x200 and 50x100 images share a view
    (45x90) but not a size; batched together the smaller one would be padded to the larger."""
    from finescope.config import load_config
    from finescope.models import registry
    from finescope.trainer import make_loader

    monkeypatch.setitem(registry._VARIANTS, "plain-hires", ("the image itself", {"use_attention": False,
                                                                                  "use_crops": False, "hires": True}))
    shapes = [(100, 200), (50, 100), (100, 200), (50, 100)]
    samples = [Sample(str(save(rgb_array(*s, seed=i), tmp_path / f"{i}.png")), label=i % 2, group=str(i))
               for i, s in enumerate(shapes)]
    sample_set = SampleSet(samples, ["a", "b"])
    for variant in ("global-hires", "plain-hires"):
        cfg = load_config(None, ["data.num_workers=0", "train.batch_size=8", "model.backbone=tiny",
                                 "model.global_size=45", f"model.variant={variant}"])
        loader = make_loader(sample_set, np.arange(4), cfg, train=False)
        assert sorted(b.indices.tolist() for b in loader) == [[0, 2], [1, 3]], variant


def test_shape_pool_training_loader_batches_images_of_one_aspect(tmp_path):
    """data.shape_pool: a training loader over interleaved aspect ratios reads batches of one aspect ratio (here a
    pool is the whole epoch), every image once; without it the shuffled batches mix them."""
    from finescope.config import load_config
    from finescope.trainer import make_loader

    samples = [Sample(str(save(rgb_array(*((64, 96) if i % 2 else (64, 64)), seed=i), tmp_path / f"{i}.png")),
                      label=i % 2, group=str(i)) for i in range(8)]
    sample_set = SampleSet(samples, ["a", "b"])
    base = ["data.num_workers=0", "train.batch_size=4", "data.augment=none", "model.backbone=tiny",
            "model.global_size=32", "model.local_size=24"]
    pooled = make_loader(sample_set, np.arange(8), load_config(None, [*base, "data.shape_pool=2"]), train=True)
    batches = [b.indices.tolist() for b in pooled]
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len({i % 2 for i in b}) == 1 for b in batches)
    mixed = make_loader(sample_set, np.arange(8), load_config(None, base), train=True)
    assert any(len({i % 2 for i in b.indices.tolist()}) == 2 for b in mixed)


def _raised_in(filename: str, error: BaseException) -> tuple:
    """The exc_info of ``error`` raised by code that claims to live in ``filename``."""
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except BaseException:
        return sys.exc_info()
    raise AssertionError("not raised")


@pytest.mark.parametrize(("filename", "error", "reported"), [
    ("/usr/lib/python3/multiprocessing/resource_sharer.py", ConnectionResetError(104, "reset"), False),
    ("/usr/lib/python3/multiprocessing/resource_sharer.py", EOFError(), False),
    ("/usr/lib/python3/multiprocessing/resource_sharer.py", BrokenPipeError(32, "pipe"), False),
    ("/usr/lib/python3/multiprocessing/resource_sharer.py", KeyError(3), True),  # a real fault of the handover
    ("/work/dataset.py", EOFError(), True),  # not the handover
])
def test_a_worker_keeps_quiet_only_about_a_handover_its_main_process_broke(monkeypatch, filename, error, reported):
    """When the main process stops (SIGTERM to the process group) in the middle of taking a batch, the worker's
    resource_sharer thread printed the start of a traceback after train's one line (1 fresh-clone CI run in 3).
    A worker's excepthook drops exactly that: a broken connection inside resource_sharer."""
    import signal

    from finescope.data.dataset import leave_sigterm_to_main

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *info: seen.append(info[0]))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # this process keeps its own SIGTERM handler
    leave_sigterm_to_main(0)
    sys.excepthook(*_raised_in(filename, error))
    assert seen == ([type(error)] if reported else [])
