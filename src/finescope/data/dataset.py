"""Records -> tensors: read images at full resolution and batch images of different sizes with padding.

The dataset only loads: it does not find files (see :mod:`finescope.data.sources`) or split them
(see :mod:`finescope.data.splits`). Images keep their own size; :func:`collate_padded` pads a batch to its
largest height and width and records each image's valid region, which the models turn into masks.

Example:
    >>> ds = ImageDataset(sample_set.samples, transform=build_transform("microscopy", train=True))
    >>> loader = DataLoader(ds, batch_size=8, collate_fn=collate_padded)
    >>> batch = next(iter(loader)).to("cuda")
    >>> batch.images.shape, batch.sizes[0]    # (B, 3, Hmax, Wmax), (h, w) of image 0
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import math
import mmap
import multiprocessing
import multiprocessing.util
import os
import re
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from finescope.config import MAX_SIDE, check_bit_depth
from finescope.data.records import Sample
from finescope.data.transforms import ColourJitter, apply_colour
from finescope.errors import SKIP_ADVICE, FinescopeError, FinescopeWarning

_TORCHVISION_EXTENSIONS = (".png", ".jpg", ".jpeg")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_intact(data: bytes) -> bool:
    """Whether PNG bytes have an intact chunk structure, every chunk's CRC right, up to IEND (a fraction of a
    millisecond for a BreakHis image). torchvision's libpng decoder ends the process (a segmentation fault, which no ``except``
    or ``data.on_error=skip`` can catch) on many corrupt PNGs; every one a fuzzer found failed this check."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    pos, view = len(_PNG_SIGNATURE), memoryview(data)  # slices of a view copy nothing
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = end
    return False


def _without_profile(data: bytes) -> bytes:
    """Intact PNG bytes without their colour profile (the iCCP chunk, before the first IDAT), which neither decoder
    applies: libpng prints "libpng warning: iCCP: ..." on stderr each time it decodes a profile it finds fault with
    ("known incorrect sRGB profile" is common in PNGs that Photoshop wrote), once per image read."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"iCCP":
            return data[:pos] + data[pos + 12 + length :]
        if kind == b"IDAT":
            break
        pos += 12 + length
    return data


def _encoded_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header, or None when the bytes do not say."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return struct.unpack_from(">II", data, 16)
    pos = 2
    while data.startswith(b"\xff\xd8") and pos + 9 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _decode_torchvision(path: Path) -> torch.Tensor:
    """Decode an intact PNG or a JPEG with torchvision (libpng/libjpeg, faster than PIL): (C, H, W) uint8 or
    uint16. Anything else, a damaged PNG included, raises ValueError, and PIL reads it or says why not."""
    from torchvision.io import ImageReadMode, decode_image

    data = path.read_bytes()
    if _png_intact(data):
        data = _without_profile(data)
    elif not data.startswith(b"\xff\xd8\xff"):
        raise ValueError("not an intact PNG or a JPEG")
    size = _encoded_size(data)
    if size is not None and size[0] * size[1] > 2 * (Image.MAX_IMAGE_PIXELS or float("inf")):
        raise ValueError("larger than PIL's decompression-bomb limit")  # PIL says so, naming the size, and the
        # decoder is not asked to allocate it (libtorch prints a stack dump when an allocation fails)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` without PIL's DecompressionBombWarning, which it gives an image of 1 to 2 times
    ``Image.MAX_IMAGE_PIXELS`` (89.5 to 179 MP, a stitched tile scan): such a file is the user's own and is read,
    and PIL's warning is two lines of its source calling it a "decompression bomb DOS attack". Larger images
    still raise PIL's DecompressionBombError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def sixteen_bit_top(bit_depth: int) -> float:
    """The value that a 16-bit sample scales to 255 under ``data.bit_depth`` (0: 65535, the file's own range;
    12: 4095, a 12-bit camera's); larger values are clipped to 255.

    Raises:
        FinescopeError: a bit depth other than 0 or 9..16.
    """
    check_bit_depth(bit_depth)
    return float(2 ** (bit_depth or 16) - 1)


def _tiff_bits(img: Image.Image) -> tuple[int, ...]:
    """A TIFF's BitsPerSample (tag 258), () for other formats."""
    bits = img.tag_v2.get(258, ()) if img.format == "TIFF" and hasattr(img, "tag_v2") else ()
    return tuple(bits) if isinstance(bits, (tuple, list)) else (int(bits),)


def is_sixteen_bit(path: str | Path) -> bool:
    """Whether an image file holds 16-bit samples, from its header (a PNG's IHDR, else what PIL opens without
    decoding: a TIFF's BitsPerSample); False when it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
        if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
            return head[24] == 16
        with open_image(path) as img:
            return img.mode.startswith("I;16") or 16 in _tiff_bits(img)
    except (OSError, ValueError, TypeError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
        return False


FLOAT_ONE_TOLERANCE = 0.05  # float data peaking at most this far above 1 is still [0, 1] (an overshoot)


def _float_in_zero_to_one(arr: np.ndarray, peak: float) -> bool:
    """Whether float data ``arr`` (H, W) of finite maximum ``peak`` is in [0, 1]: its values at most
    1 + :data:`FLOAT_ONE_TOLERANCE` (the overshoot of flat-field correction or interpolation), or its 99.9th
    percentile at most 1 (a few hot pixels above); else it is read as 0..255 (or its own range)."""
    if peak <= 1.0 + FLOAT_ONE_TOLERANCE:
        return True
    finite = arr[np.isfinite(arr)]
    return bool(np.percentile(finite, 99.9) <= 1.0)


def _multi_sample_tiff16(img: Image.Image) -> bool:
    """Whether PIL opened a TIFF of 16-bit samples with more than one sample per pixel (RGB, RGBA, grey with
    alpha), which Pillow reduces to 8 bits on reading (its high byte; a planar one wrongly, uncompressed)."""
    return img.format == "TIFF" and 16 in _tiff_bits(img) and int(img.tag_v2.get(277, 1)) > 1  # SamplesPerPixel


def _read_tiff_page(path: Path) -> tuple[np.ndarray, int]:
    """The first page of a TIFF through tifffile, at its own sample type: (H, W, S) samples and its Orientation
    (tag 274). For what Pillow cannot read as it is: 16-bit samples with several per pixel (RGB, RGBA, grey with
    alpha), float ones (32-bit RGB, 16- or 64-bit grey).

    Raises:
        FinescopeError: its compression needs the imagecodecs package (LZW, PackBits, JPEG...), which is not
            installed.
        ValueError: a damaged file, or a page that is not one image of samples (tifffile's own layout names
            another).
    """
    import tifffile  # a dependency; imported here as only the TIFFs that Pillow cannot read need it

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            h, w, orientation = _page_geometry(page)
            if Image.MAX_IMAGE_PIXELS and h * w > 2 * Image.MAX_IMAGE_PIXELS:  # as Pillow refuses a larger one
                raise Image.DecompressionBombError(f"Image size ({h * w} pixels) exceeds limit")
            arr, axes = page.asarray(), page.axes
    except Image.DecompressionBombError:
        raise
    except Exception as e:  # a damaged file raises what its codec does (zlib.error, struct.error, ...)
        # tifffile: "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"; Zstandard wants Python 3.14's module
        if "imagecodecs" not in str(e) and not isinstance(e, ImportError):
            raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        raise FinescopeError(f"cannot read image '{path}' at its own bit depth: its compression needs the imagecodecs "
                             "package; install it (pip install 'finescope[tiff]', or pip install imagecodecs)") from None
    layouts = {"YX": lambda a: a[:, :, None], "YXS": lambda a: a, "SYX": lambda a: np.moveaxis(a, 0, -1)}
    if axes not in layouts or arr.dtype.kind not in "uif":
        raise ValueError(f"a TIFF page of axes {axes!r} and samples {arr.dtype}, not one image of numbers (YXS)")
    return layouts[axes](arr), orientation


def _page_geometry(page) -> tuple[int, int, int]:
    """A tifffile page's stored (H, W) (1 for an axis it lacks) and its Orientation (tag 274; 1 when absent)."""
    h, w = (page.shape[page.axes.index(a)] if a in page.axes else 1 for a in "YX")
    tag = page.tags.get(274)
    return h, w, int(tag.value) if tag is not None else 1


_ORIENTED = {  # TIFF Orientation (tag 274) -> the stored (H, W, S) rows turned upright, as Pillow turns them
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _range_top(arr: np.ndarray, peak: float, is_float: bool) -> float:
    """The value that reads as 255 in data of no known range (32-bit integers, floats): 1 for float data in
    [0, 1] (:func:`_float_in_zero_to_one`), else 255, 65535 or its own ``peak``, whichever first holds it."""
    if is_float and _float_in_zero_to_one(arr, peak):
        return 1.0
    return 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(peak)


def _scaled_to_uint8(arr: np.ndarray, top: float) -> np.ndarray:
    """``arr`` x 255 / ``top``, rounded and clipped to uint8; NaN black, +inf white."""
    arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0)
    return np.round(np.clip(arr * (255.0 / top), 0, 255)).astype(np.uint8)


def _samples_to_rgb(arr: np.ndarray, orientation: int, bit_depth: int) -> np.ndarray:
    """(H, W, S) samples from :func:`_read_tiff_page` -> (H, W, 3) uint8, scaled as PIL's images of that type
    are (:func:`_pil_to_array`): 16-bit by :func:`sixteen_bit_top` of ``bit_depth`` (in float32, as
    :func:`_to_rgb_uint8` scales a 16-bit PNG), other types by :func:`_range_top`; grey (with alpha) repeated,
    alpha dropped, turned upright by its TIFF ``orientation`` as Pillow turns a TIFF."""
    colour = arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, :1]
    if colour.dtype == np.uint8:
        out = colour
    elif colour.dtype == np.uint16:
        out = colour.astype(np.float32)  # 4 bytes a sample, not 8
        out *= np.float32(255.0 / sixteen_bit_top(bit_depth))
        out = np.round(np.clip(out, 0, 255, out=out), out=out).astype(np.uint8)
    else:
        values = colour.astype(np.float64)
        peak = values.max(initial=0, where=np.isfinite(values))  # NaN (no data) and inf left out
        out = _scaled_to_uint8(values, _range_top(values, peak, colour.dtype.kind == "f"))
    rgb = np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out
    return np.ascontiguousarray(_ORIENTED.get(orientation, lambda a: a)(rgb))


def _is_tiff(path: Path) -> bool:
    """Whether a file starts as a TIFF or BigTIFF does (byte order, then 42 or 43)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _pil_to_array(img: Image.Image, bit_depth: int = 0) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8: palette/grey/alpha/CMYK -> RGB, 16/32-bit and float scaled to 0..255
    (16-bit by :func:`sixteen_bit_top` of ``bit_depth``)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max(initial=0, where=np.isfinite(arr))  # a float image's NaN (no data) and inf left out
        if img.mode.startswith("I;16") or (bit_depth and img.mode == "I" and img.format == "PNG"):
            top = sixteen_bit_top(bit_depth)  # (older Pillows read a 16-bit PNG as "I")
        else:  # float ([0, 1] as image software exports it) or 32-bit int: else guess the range from the data
            top = _range_top(arr, peak, img.mode == "F")
        return np.repeat(_scaled_to_uint8(arr, top)[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def _decode_pil(path: Path, bit_depth: int = 0) -> torch.Tensor:
    """Decode any format PIL reads (first frame), fully, so that truncated files raise: (3, H, W) uint8 (16-bit
    data scaled as ``data.bit_depth`` says, :func:`sixteen_bit_top`)."""
    try:
        with open_image(path) as img:
            if _multi_sample_tiff16(img):  # Pillow keeps their high bytes
                arr = _samples_to_rgb(*_read_tiff_page(path), bit_depth)
            else:
                img.load()
                arr = _pil_to_array(img, bit_depth)
    except UnidentifiedImageError:
        if not _is_tiff(path):
            raise
        arr = _samples_to_rgb(*_read_tiff_page(path), bit_depth)  # float RGB, 16-bit grey with alpha...
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W), a writable copy


def _to_rgb_uint8(t: torch.Tensor, bit_depth: int = 0) -> torch.Tensor:
    """(C, H, W) uint8/uint16 -> (3, H, W) uint8; 16-bit is scaled (x * 255 / 65535, or by the top of
    ``bit_depth``'s range, :func:`sixteen_bit_top`, and clipped to 255)."""
    if t.dtype == torch.uint16:
        scale = 255.0 / sixteen_bit_top(bit_depth)
        t = torch.round(torch.clamp(t.to(torch.float32) * scale, 0, 255)).to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise TypeError(f"unexpected image dtype {t.dtype}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    # the decoders give an (H, W, C) buffer seen as (C, H, W); numpy makes it contiguous ~40x faster than
    # torch's strided uint8 copy when the intra-op thread pool is contended
    return torch.from_numpy(np.ascontiguousarray(t[:3].numpy()))


def read_image(path: str | Path, bit_depth: int = 0) -> torch.Tensor:
    """Read an image file at full resolution.

    Intact PNG and JPEG files go through torchvision's decoders; TIFF, BMP, WebP, damaged PNGs (which crash
    torchvision's decoder, see :func:`_png_intact`) and anything torchvision refuses through PIL. Grey becomes
    3 channels, alpha is dropped, palettes are expanded and 16-bit data is scaled to 8 bits.

    Args:
        path: the image file.
        bit_depth: ``data.bit_depth``: 0 scales 16-bit data by 255/65535; 9..16, the bits a camera stored in
            the 16-bit file, by 255/(2**bit_depth - 1), clipped to 255 (:func:`sixteen_bit_top`). 8-bit files
            are read as they are.

    Returns:
        (3, H, W) uint8 tensor.

    Raises:
        FinescopeError: the file is missing, truncated or not an image.
    """
    path = Path(path)
    sixteen_bit_top(bit_depth)  # a bad value is the config's error, not the file's
    t = None
    if path.suffix.lower() in _TORCHVISION_EXTENSIONS:
        try:
            t = _decode_torchvision(path)
        except (RuntimeError, ValueError, OSError, ImportError):
            t = None  # PIL below reads it or says why it cannot
    try:
        if t is None:
            t = _decode_pil(path, bit_depth)
        return _to_rgb_uint8(t, bit_depth)
    except (
        OSError,
        ValueError,
        TypeError,
        SyntaxError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
    ) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, Image.DecompressionBombError):
            reason = _too_large(reason)
        elif _is_empty_file(path):  # an interrupted copy, not 'cannot identify image file' (PIL's words)
            reason = "the file is empty (0 bytes)"
        raise FinescopeError(f"cannot read image '{path}': {reason}{SKIP_ADVICE}") from None


def _is_empty_file(path: Path) -> bool:
    """Whether ``path`` is a regular file of 0 bytes."""
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def _too_large(pil_reason: str) -> str:
    """What to do with an image PIL refuses as a decompression bomb (over 2 x ``Image.MAX_IMAGE_PIXELS``, 179 MP):
    a user's own whole-slide scan or mosaic, not an attack, as PIL's words have it."""
    found = re.search(r"\((\d+) pixels\)", pil_reason)
    size = f"{found[1]} pixels" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (f"{size}, more than the {limit} that finescope reads in one image (PIL's decompression-bomb limit, twice "
            "Image.MAX_IMAGE_PIXELS); cut it into tiles or downscale it (a whole-slide image: tile it first, e.g. with "
            "TIAToolbox or OpenSlide), or raise PIL.Image.MAX_IMAGE_PIXELS in your own script")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/finescope/decoded`` (``~/.cache/finescope/decoded`` when XDG_CACHE_HOME is unset).

    Raises:
        FinescopeError: XDG_CACHE_HOME is unset and there is no home folder (HOME unset and no passwd entry, as
            for a container's arbitrary user id).
    """
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "finescope" / "decoded"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # RuntimeError since Python 3.10; KeyError (from pwd) before
        raise FinescopeError("data.cache=disk: no folder for the image cache (HOME and XDG_CACHE_HOME are unset "
                             "and this user has no home folder); set data.cache_dir to a writable folder, or "
                             "data.cache=none") from None
    return home / ".cache" / "finescope" / "decoded"


class DiskCache:
    """Decoded images as raw uint8 ``.npy`` files, so PNG/JPEG/TIFF decoding is paid once per file, not per read.

    An entry is keyed by the image's absolute path, size, modification time, inode and status-change time: an
    edited or replaced file is decoded again, also one whose size and modification time the copy kept (``cp -p``,
    ``rsync -a``, ``tar``; uncompressed TIFF/BMP of one image size have one file size). Entries are written to a temporary name and renamed, so concurrent workers and killed runs
    never leave a partial entry; an unreadable entry is decoded again and rewritten. A cache that cannot be
    written (a folder that is not writable, a full disk) is warned about once per process and its entries are
    not stored: the cache only saves decoding, and the run goes on with the decoded images. The folder is tried
    when the cache is made, in the process that then forks the DataLoader's workers, so that an unwritable one
    is one warning, not one per worker (entries already there are still read; each new one is tried). A writer
    killed mid-write (a DataLoader worker's SIGKILL, the out-of-memory killer) leaves its temporary file; the
    first cache of a folder in a process removes the stale ones (:meth:`remove_stale`).

    Args:
        root: the cache folder (created here).
        bit_depth: ``data.bit_depth`` the images are decoded with, part of every key (an entry decoded with
            another is not read).
    """

    _unwritable: set[Path] = set()  # the folders this process warned about (each dataset has its cache)
    _swept: set[Path] = set()  # the folders whose stale temporary files this process removed
    STALE_SECONDS = 3600  # a temporary file not modified for this long was left by a killed writer

    def __init__(self, root: str | Path, bit_depth: int = 0) -> None:
        self.root = Path(root)
        self.bit_depth = bit_depth
        self._warned = False  # about an entry that could not be written
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as e:
            self._warn(e)
            return
        if self.root not in DiskCache._swept:  # once per process: a cv run makes a cache per fold and side
            DiskCache._swept.add(self.root)
            self.remove_stale()

    def remove_stale(self) -> int:
        """Remove the temporary files that killed writers left (:meth:`put` writes ``tmp*.tmp`` beside the
        entry, in the two-character folders); return how many went.

        Only those not modified for :attr:`STALE_SECONDS` go. Another process may be writing into this cache at
        the same moment (a second run, or DDP ranks, sharing it), and its file is seconds old at most: an entry
        is a few MB written at once, each write refreshing the file's mtime. The writer's process id would not
        be safer: a cache in a shared folder is written from other machines and containers, whose ids mean
        nothing here (or name a live process of this one). A writer stopped for longer than the hour loses its
        entry (its rename finds no file; :meth:`put` says so and the image is cached next time), never an image.
        """
        cutoff, removed = time.time() - self.STALE_SECONDS, 0
        try:
            with os.scandir(self.root) as it:
                folders = [d.path for d in it if len(d.name) == 2 and d.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for folder in folders:
            try:
                names = [f for f in os.listdir(folder) if f.startswith("tmp") and f.endswith(".tmp")]
            except OSError:
                continue
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if os.lstat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except OSError:  # gone meanwhile (another process's sweep), or not ours to remove
                    pass
        return removed

    VERSION = 5  # part of every key: bump it when read_image decodes differently (2: float images in [0, 1];
    # 3: NaN and inf in float images; 4: float images a little above 1 are in [0, 1]; 5: 16-bit RGB TIFF at 16 bits)

    def entry(self, path: str | Path) -> Path | None:
        """Where the decoded ``path`` is (or would be) stored; None when the file cannot be read (no such file)."""
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError:
            return None
        # the kernel sets ctime on every write or rename; no tool sets it back, as they do mtime
        stamp = f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
        depth = f"|bits{self.bit_depth}" if self.bit_depth else ""  # 0 (the default) keeps the keys it had
        key = hashlib.sha1(f"v{self.VERSION}|{path}|{stamp}{depth}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    @staticmethod
    def get(entry: Path | None) -> torch.Tensor | None:
        """The (3, H, W) uint8 image stored at ``entry``, or None (no entry, not stored yet, or damaged)."""
        if entry is None or not entry.is_file():
            return None
        try:
            with open(entry, "rb") as f:
                arr = np.load(f, allow_pickle=False)
                # a damaged shape in the header that still parses, and names fewer bytes than the file holds
                whole = f.tell() == os.fstat(f.fileno()).st_size
        except Exception:  # any damage: numpy's header parser also raises TokenError, TypeError, MemoryError
            return None
        if not whole or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] != 3:
            return None
        return torch.from_numpy(arr)

    def put(self, entry: Path, img: torch.Tensor, source: str | Path | None = None) -> None:
        """Store a decoded image at ``entry`` (from :meth:`entry`, taken before decoding, so a file edited
        meanwhile is decoded again next time). When it cannot be written, nothing is stored and the first
        failure in this process is warned about.

        A temporary file removed before its rename (this writer was paused for over :attr:`STALE_SECONDS` and
        another process's :meth:`remove_stale` took it for a killed writer's) is no fault of the folder: the
        entry is not stored, a warning naming ``source`` (the image file) says so, and the next read of the
        image caches it. The caller keeps the decoded image either way."""
        tmp = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            # tmp*.tmp: the names that remove_stale looks for
            with tempfile.NamedTemporaryFile(dir=entry.parent, prefix="tmp", suffix=".tmp", delete=False) as f:
                tmp = f.name
                np.save(f, img.numpy(), allow_pickle=False)
            os.replace(tmp, entry)
        except FileNotFoundError as e:
            if tmp is None or os.path.lexists(tmp):  # not the temporary file that went missing
                self._failed(e, tmp)
                return
            warnings.warn(f"cache entry for '{source or entry}' not written: its temporary file was removed meanwhile "
                          f"(a writer paused for over {self.STALE_SECONDS // 60} minutes is taken for a killed one); "
                          "it will be written next time", FinescopeWarning, stacklevel=3)
        except OSError as e:
            self._failed(e, tmp)

    def _failed(self, e: OSError, tmp: str | None) -> None:
        """An entry that could not be written: remove its temporary file, warn about the first in this process."""
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not self._warned:
            self._warn(e)

    def _warn(self, e: OSError) -> None:
        self._warned = True
        if self.root in DiskCache._unwritable:
            return
        DiskCache._unwritable.add(self.root)
        reason = "a file, not a folder" if self.root.is_file() else e.strerror or e
        warnings.warn(f"cannot write the image cache '{self.root}': {reason}; images not cached yet are decoded "
                      "on every read; set data.cache_dir to a writable folder or data.cache=none",
                      FinescopeWarning, stacklevel=4)


def _header_size(path: str) -> tuple[int, int] | None:
    """(H, W) from an image file's header, without decoding it; None when it cannot be read."""
    try:
        with open_image(path) as img:
            w, h = img.size
    except UnidentifiedImageError:  # a TIFF that Pillow cannot read (float RGB...): tifffile reads its header
        return _tiff_header_size(Path(path)) if _is_tiff(Path(path)) else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return h, w


def _tiff_header_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of a TIFF's first page as :func:`_read_tiff_page` turns it upright; None when it cannot be read."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            h, w, orientation = _page_geometry(page)
    except Exception:  # damaged: whatever tifffile's parser raises
        return None
    if "Y" not in page.axes or "X" not in page.axes:
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # 5-8 turn the picture a quarter


def check_view_side(path: str, size: tuple[int, int], view_side: int) -> None:
    """Raise when the global view of an image of ``size`` (H, W), resized to a short side of ``view_side`` (0:
    no view, nothing to check), would be longer than ``finescope.config.MAX_SIDE``: a strip (a scan line, a
    mis-cut file) whose view would take the memory of hundreds of images."""
    h, w = size
    long = max(h, w) * view_side / max(1, min(h, w))
    if view_side > 0 and long > MAX_SIDE:
        raise FinescopeError(f"image '{path}' is {w}x{h} (WxH), {max(h, w) / max(1, min(h, w)):.0f} times as long as "
                             f"it is wide: its global view (a short side of model.global_size {view_side} px) would be "
                             f"{long:.0f} px long, above {MAX_SIDE}; crop or tile it{SKIP_ADVICE}")


def aspect_key(size: tuple[int, int] | None) -> tuple[float, int]:
    """An image's place among images of like shape whatever its orientation: its aspect ratio (long / short
    side, which alone sets the size of its global view) and then its pixels; an unknown size (None) last."""
    if size is None:
        return (math.inf, 0)
    h, w = size
    return (max(h, w) / max(1, min(h, w)), h * w)


def shape_order(sizes: Sequence[tuple[int, int] | None]) -> list[int]:
    """Positions of ``sizes`` ((H, W) each, None when unknown) in the order that batches images of one shape
    together: landscape and square images, then portrait ones, each by :func:`aspect_key`; unknown ones last.

    Evaluation reads its images in this order (:func:`finescope.trainer.make_loader`) and cuts a batch wherever
    the view shape changes, so the images of one view shape fill as few batches as they can. Before it was
    ordered (3d27cec), a batch in file order was padded to its largest view (on a folder of many sizes,
    ``benchmarks/shape_count.py``: 1.87 times the pixels of the images' own views, and evaluation took 1.2
    times as long on a CPU); each distinct batch shape costs CUDA a set-up of its convolutions once per process.
    Predictions are put back in dataset order (:func:`finescope.engine.predict_loader`).
    """
    def key(i: int) -> tuple:
        size = sizes[i]
        return (2 if size is None else int(size[0] > size[1]), *aspect_key(size), i)

    return sorted(range(len(sizes)), key=key)


class SharedMemoryCache:
    """Decoded images of a dataset in one anonymous shared memory mapping, so that an image decoded by any
    DataLoader worker (or the main process) is read by all the others, and held once.

    The mapping is made when the dataset is built, before the loader forks its workers, with a slot per image
    sized from its file header (the kernel commits the whole size up front, but pages take memory only when
    written; it is not a /dev/shm file, so a container's small /dev/shm does not limit it). A slot is marked
    ready after its image is written, under a lock shared by the processes. When the workers are spawned
    rather than forked (the mapping cannot travel), for an image whose header was unreadable or whose decoded
    size differs, and in a process that once waited a second for the lock (its holder was killed; warned
    once), :meth:`get` misses and :meth:`put` declines, and the caller keeps its own copy.

    Args:
        shapes: per sample, its (H, W) or None.

    Raises:
        FinescopeError: the mapping cannot be made (more than the machine can commit).
    """

    def __init__(self, shapes: list[tuple[int, int] | None]) -> None:
        self.shapes = list(shapes)
        sizes = [3 * s[0] * s[1] if s is not None else 0 for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) + len(sizes)  # after the flags
        self._lock = multiprocessing.get_context("fork" if _can_fork() else None).Lock()
        try:
            self._map: mmap.mmap | None = mmap.mmap(-1, max(1, int(self.offsets[-1])))
        except (OSError, ValueError, OverflowError) as e:  # more than the commit limit or the address space
            raise FinescopeError(
                f"data.cache=memory: the {len(sizes)} decoded images need {sum(sizes) / 2**30:.1f} GiB, which "
                f"this machine cannot reserve ({e}); use data.cache=disk or data.cache=none"
            ) from None

    def __getstate__(self) -> dict:  # pickled for spawned workers: they cannot share the mapping
        return {**self.__dict__, "_map": None, "_lock": None}

    def _shared(self, i: int) -> bool:
        return self._map is not None and 0 <= i < len(self.shapes) and self.shapes[i] is not None

    def _ready(self, i: int, mark: bool = False) -> bool:
        if not self._lock.acquire(timeout=1.0):  # its holder was killed: stop sharing in this process
            self._map = None
            warnings.warn("the shared image cache's lock is held by a dead process; this process keeps its "
                          "own copies of the images from now on", FinescopeWarning, stacklevel=4)
            return False
        try:  # the lock orders the image's bytes before its ready flag, on any CPU
            if mark:
                self._map[i] = 1
            return bool(self._map[i])
        finally:
            self._lock.release()

    def _slot(self, i: int) -> torch.Tensor:
        h, w = self.shapes[i]
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=3 * h * w, offset=int(self.offsets[i]))
        return flat.view(3, h, w)

    def get(self, i: int) -> torch.Tensor | None:
        """Image ``i`` (3, H, W) uint8, a view of the shared memory, or None when it is not stored."""
        if not self._shared(i) or not self._ready(i):
            return None
        return self._slot(i)

    def put(self, i: int, img: torch.Tensor) -> bool:
        """Store decoded image ``i``; False when it cannot be shared (the caller keeps it itself)."""
        if not self._shared(i) or tuple(img.shape) != (3, *self.shapes[i]):
            return False
        self._slot(i).copy_(img)
        return self._ready(i, mark=True)


def _can_fork() -> bool:
    """Whether DataLoader workers can be forked safely: Linux (macOS offers fork, but its system frameworks
    are not fork-safe, which is why Python spawns there)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def worker_context(cache: str, num_workers: int) -> str | None:
    """The DataLoader ``multiprocessing_context`` for ``data.cache``: ``"fork"`` when workers share a memory
    cache and can be forked (Python 3.14 starts them with forkserver on Linux, and they would get a copy of the
    dataset instead of its memory), else None (the default)."""
    return "fork" if cache == "memory" and num_workers > 0 and _can_fork() else None


def leave_sigterm_to_main(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: ignore SIGTERM, which the main process takes (train prints its
    line) and then stops its workers itself. A scheduler's pre-emption (SLURM) or a kill of the process group
    sends it to the workers too; a worker that died of it first raised torch's "DataLoader worker (pid N) is
    killed by signal: Terminated" in the main process, a traceback instead of the line. A worker left without
    its main process still ends: torch's worker loop watches for it.

    It also keeps quiet the one report a stop makes a worker print: a worker hands each batch's tensors to the
    main process through multiprocessing's ``resource_sharer`` thread, which prints any error of a handover
    with ``sys.excepthook``. When the main process stops in the middle of one, the worker's end of that
    connection breaks and the start of a traceback followed train's line (:func:`_quiet_broken_handover`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = functools.partial(_quiet_broken_handover, sys.excepthook)


def _end_workers_at_exit() -> None:
    """At exit, end with SIGKILL the DataLoader workers that are still alive, before multiprocessing's own exit
    handler (registered before this one, so it runs after) terminates them with SIGTERM, which
    :func:`leave_sigterm_to_main` ignores, and waits for them forever.

    A loader's workers outlive it after a worker's error (an unreadable image under ``data.on_error=raise``):
    torch re-raises it from a frame that holds it, a cycle that keeps the loader's iterator alive, and even
    when it is collected its workers do not take the stop it sends them, and torch falls back on SIGTERM too.
    The process printed its line and never ended; under torchrun the other processes waited for it in a
    collective. Only daemonic children are ended (DataLoader workers are), as multiprocessing would end them."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


atexit.register(_end_workers_at_exit)


def _quiet_broken_handover(hook, kind: type[BaseException], error: BaseException, tb) -> None:
    """``sys.excepthook`` of a DataLoader worker: drop a broken connection (``EOFError``, ``OSError``) raised in
    ``multiprocessing.resource_sharer``, which only means that the receiving process went away while a batch
    was handed over (it reports its own stop); pass everything else to ``hook``."""
    frames = traceback.extract_tb(tb)
    if issubclass(kind, (EOFError, OSError)) and any(f.filename.endswith("resource_sharer.py") for f in frames):
        return
    hook(kind, error, tb)


class ImageDataset(Dataset):
    """Loads samples as uint8 images at their own size.

    Images stay uint8 until they reach the model's device (:meth:`Batch.model_input`): a quarter of the bytes
    of float32 through worker processes, pinned memory and the host-to-device copy.

    Args:
        samples: the records to load (e.g. one side of a split).
        transform: a callable on (3, H, W) uint8 tensors (see :func:`~finescope.data.transforms.build_transform`),
            applied at full resolution.
        on_error: ``raise`` or ``skip``: with ``skip`` an unreadable image gives None (warned once per file in
            each loader process), which :func:`collate_padded` drops.
        min_side: when > 0, an image whose short side is smaller raises (the crops of the model need it).
        view_side: when > 0, the short side of the model's global view: an image whose view would be longer
            than ``finescope.config.MAX_SIDE`` raises (:func:`check_view_side`).
        cache: ``none``; ``memory``: keep decoded uint8 images after the first read, in memory shared by the
            DataLoader's forked workers (see :class:`SharedMemoryCache`); ``disk``: store each decoded image as a
            raw ``.npy`` in ``cache_dir`` (see :class:`DiskCache`), shared by workers, runs and folds.
        cache_dir: the folder of the disk cache ("" = :func:`default_cache_dir`).
        seed: when set, the transform of sample ``i`` in epoch ``e`` (keys ``(i, e)`` or ``(i, e, step)``, see
            :class:`~finescope.distributed.ShardSampler`) draws from a generator seeded by (seed, e, i): the
            augmentation does not depend on the worker count, on which worker reads the sample, on the number of
            DDP processes, or on whether the run was resumed. The caller's random state is left untouched.
        colour: a colour jitter whose factors are drawn here, after ``transform``, and applied to the batch on
            the training device (``data.colour_on: device``); each item then carries them as ``"colour"``.
        one_orientation: for a ``transform`` that rotates by 90 degrees (``data.one_orientation``): after it, a
            non-square image whose orientation (portrait or landscape) is not its step's is transposed. A step's
            orientation is a coin drawn from (seed, epoch, step), the global step in the epoch that the sampler
            gives with each key (:class:`~finescope.distributed.ShardSampler`; the same for any number of
            ranks), so the images of a batch share it and a batch of same-size images is not padded to a square,
            while every epoch has batches of both orientations. Transposing is one more flip of the dihedral
            group: when the transform draws each image's flips and rotation uniformly, every image still gets
            each of the 8 with probability 1/8.
        bit_depth: ``data.bit_depth``, how 16-bit files are scaled to 8 bits (:func:`read_image`); part of the
            disk cache's keys.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_error: str = "raise",
        min_side: int = 0,
        view_side: int = 0,
        cache: str = "none",
        seed: int | None = None,
        cache_dir: str = "",
        colour: ColourJitter | None = None,
        one_orientation: bool = False,
        bit_depth: int = 0,
    ) -> None:
        sixteen_bit_top(bit_depth)  # refused before any image is read
        if on_error not in ("raise", "skip"):
            raise FinescopeError(f"config key 'data.on_error' is '{on_error}'; choose one of: raise, skip")
        if cache not in ("none", "memory", "disk"):
            raise FinescopeError(f"config key 'data.cache' is '{cache}'; choose one of: none, memory, disk")
        self.samples = list(samples)
        self.transform = transform
        self.colour = colour
        self.on_error = on_error
        self.min_side, self.view_side = min_side, view_side
        self.cache = cache
        self.seed = seed
        self.one_orientation = one_orientation
        self.bit_depth = bit_depth
        self._cache: dict[int, torch.Tensor] = {}  # memory-cached images that the shared cache declined
        self._header_sizes: list[tuple[int, int] | None] | None = None
        self._shared = SharedMemoryCache(self.header_sizes()) if cache == "memory" else None
        # the disk cache's folder (None without one: the default needs a home folder, which a user without a
        # disk cache need not have); "~" as data.root takes it: YAML and --set leave it to us (a literal "~"
        # folder in the working one else)
        self.cache_dir = None
        if cache == "disk":
            self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
            if self.cache_dir.parts[0].startswith("~"):  # no home folder to expand it to
                raise FinescopeError(f"data.cache_dir '{cache_dir}': '~' names no home folder for this user; set "
                                     "data.cache_dir to a folder without '~'")
        self._disk = DiskCache(self.cache_dir, bit_depth) if self.cache_dir is not None else None
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def header_sizes(self) -> list[tuple[int, int] | None]:
        """(H, W) of each image from its file header (None where it cannot be read), read once."""
        if self._header_sizes is None:
            self._header_sizes = [_header_size(x.path) for x in self.samples]
        return self._header_sizes

    def _load(self, i: int) -> torch.Tensor | None:
        """The (3, H, W) uint8 image of sample ``i``, or None when unreadable and ``on_error='skip'``."""
        if i in self._cache:
            return self._cache[i]
        img = self._shared.get(i) if self._shared is not None else None
        if img is not None:
            return img
        path = self.samples[i].path
        entry = self._disk.entry(path) if self._disk is not None else None
        img = self._disk.get(entry) if entry is not None else None
        try:
            if img is not None:
                self._check_size(path, img)
                return img
            img = read_image(path, self.bit_depth)
            self._check_size(path, img)
        except FinescopeError as e:
            if self.on_error == "raise":
                raise
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipped: {str(e).removesuffix(SKIP_ADVICE)}", FinescopeWarning, stacklevel=1)
            return None
        if self.cache == "memory" and not self._shared.put(i, img):
            self._cache[i] = img
        elif entry is not None:
            self._disk.put(entry, img, path)
        return img

    def _check_size(self, path: str, img: torch.Tensor) -> None:
        h, w = img.shape[-2:]
        if self.min_side > 0 and min(h, w) < self.min_side:
            # a trained model keeps its crop size: changing it is advice for training only
            raise FinescopeError(
                f"image '{path}' is {w}x{h} (WxH), smaller on its short side than the model's crops "
                f"(model.local_size {self.min_side} px; a model to train on it needs model.local_size <= "
                f"{min(h, w)}){SKIP_ADVICE}"
            )
        check_view_side(path, (h, w), self.view_side)

    def __getitem__(self, key: int | tuple[int, ...]) -> dict | None:
        """Sample ``key`` (an index, ``(index, epoch)`` or ``(index, epoch, step)``) as ``{"image": (3, H, W)
        uint8, "label": int, "index": index}``, or None (skip mode)."""
        i, epoch, step = (tuple(key) + (0,))[:3] if isinstance(key, tuple) else (key, 0, 0)
        i = int(i) + (len(self) if int(i) < 0 else 0)  # ds[-1], as with a list
        img = self._load(i)
        if img is None:
            return None
        item = {"label": int(self.samples[i].label), "index": i}
        if self.seed is not None and (self.transform is not None or self.colour is not None):
            with torch.random.fork_rng(devices=[]):  # restores the CPU generator, the only one reseeded here
                seed = np.random.SeedSequence([self.seed % 2**32, epoch, i]).generate_state(1)[0]
                torch.random.default_generator.manual_seed(int(seed))  # torch.manual_seed would reseed CUDA too
                img = self._augment(img, item)
        else:
            img = self._augment(img, item)
        h, w = img.shape[-2:]
        if self.one_orientation and h != w and (h > w) != self.portrait(epoch, step):
            img = img.transpose(-2, -1)
        return {"image": img, **item}

    def portrait(self, epoch: int, step: int = 0) -> bool:
        """The orientation of every non-square training image of global step ``step`` of ``epoch`` under
        ``one_orientation``: True = portrait (H > W). A coin drawn from (seed, epoch, step), independent of the
        images' own draws."""
        state = np.random.SeedSequence([(self.seed or 0) % 2**32, epoch, step, 2**32 - 1]).generate_state(1)[0]
        return bool(state & 1)

    def _augment(self, img: torch.Tensor, item: dict) -> torch.Tensor:
        if self.transform is not None:
            img = self.transform(img)
        if self.colour is not None:
            item["colour"] = self.colour.sample()
        return img


@dataclass
class Batch:
    """A padded batch of images of different sizes.

    Attributes:
        images: (B, 3, Hmax, Wmax) uint8, each image at the top-left, zero-padded at the bottom/right.
        sizes: (B, 2) long, the (h, w) of each image's valid region.
        labels: (B,) long class indices.
        indices: (B,) long dataset indices.
        colour: (B, 10) float colour maps that :meth:`model_input` applies on the device
            (:func:`~finescope.data.transforms.apply_colour`), or None.
    """

    images: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    colour: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def model_input(self, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
        """The images as the models take them: float32 in [0, 1] on ``device``, converted there.

        Args:
            device: the model's device; the uint8 batch is copied without blocking (from pinned memory when
                the loader pins it).
            channels_last: the NHWC memory format (faster convolutions on CUDA).
        """
        images = self.images.to(device, non_blocking=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if self.colour is not None:  # the colour jitter, on the device
            uint8 = self.images.dtype == torch.uint8  # a new float tensor, divided in place; float stays as it is
            images = images.to(torch.float32).div_(255.0) if uint8 else images.to(torch.float32)
            return apply_colour(images, self.colour, self.sizes).contiguous(memory_format=fmt)
        images = images.to(dtype=torch.float32, memory_format=fmt)
        return images.div_(255.0) if self.images.dtype == torch.uint8 else images

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(t if t is None else t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(*(t if t is None else t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.images, self.sizes, self.labels, self.indices, self.colour


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a collated batch: in shared memory inside a DataLoader worker, as
    ``default_collate`` allocates it, so that sending the batch to the main process does not copy it there."""
    if torch.utils.data.get_worker_info() is None or not hasattr(torch.UntypedStorage, "_new_shared"):
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate_padded(items: list[dict | None]) -> Batch:
    """Stack images of different sizes by zero-padding to the largest height and width.

    In a DataLoader worker the batch is written straight into shared memory, and only the padding is zeroed.
    Images are copied with numpy, which copies the transposed views that 90-degree rotations leave about twice
    as fast as torch's ``copy_`` (0.30 against 0.55 ms for a 700x460 image on one core).

    Args:
        items: ``ImageDataset`` items; None items (skipped images) are dropped.

    Returns:
        A :class:`Batch`; with no valid item, B = 0 and images of shape (0, 3, 0, 0).
    """
    items = [it for it in items if it is not None]
    if not items:
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 2, dtype=torch.long), empty, empty.clone())
    sizes = torch.tensor([list(it["image"].shape[-2:]) for it in items], dtype=torch.long)  # (B, 2)
    h_max, w_max = (int(v) for v in sizes.max(dim=0).values)
    images = _batch_buffer((len(items), 3, h_max, w_max), items[0]["image"].dtype)  # (B, 3, Hmax, Wmax)
    out = images.numpy()
    for b, it in enumerate(items):
        h, w = it["image"].shape[-2:]
        np.copyto(out[b, :, :h, :w], it["image"].numpy())
        out[b, :, h:] = 0
        out[b, :, :h, w:] = 0
    labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
    indices = torch.tensor([it["index"] for it in items], dtype=torch.long)
    colour = torch.stack([it["colour"] for it in items]) if "colour" in items[0] else None
    return Batch(images, sizes, labels, indices, colour)


__all__ = ["Batch", "DiskCache", "ImageDataset", "SharedMemoryCache", "collate_padded", "default_cache_dir",
           "aspect_key", "check_view_side", "is_sixteen_bit", "open_image", "read_image", "shape_order",
           "sixteen_bit_top", "worker_context"]
