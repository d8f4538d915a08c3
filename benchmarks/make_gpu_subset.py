"""Copy a BreakHis tree as JPEG (quality 90) for the GPU machine: same folders, same file names ending in .jpg.

    python benchmarks/make_gpu_subset.py ../shared/data/breakhis .gpu/breakhis

Only image files are converted; the folder layout (BreaKHis_v1/histology_slides/breast/...) is kept, so the
``breakhis`` source reads the copy exactly like the original. Prints the number of images and bytes written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def convert_tree(src: Path, dst: Path, quality: int = 90) -> tuple[int, int]:
    """Write every image under ``src`` as ``dst/<same relative path>.jpg``; return (images, bytes)."""
    if not src.is_dir():
        raise SystemExit(f"make_gpu_subset: source folder '{src}' not found; give the BreakHis folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:  # the copy's names are the source's
        raise SystemExit(f"make_gpu_subset: output folder '{dst}' is inside the source folder '{src}' (its JPEGs would "
                         "be written over, or read as source images); give a folder outside it")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise SystemExit(f"make_gpu_subset: no images under '{src}'")
    total = 0
    for path in files:
        out = dst / path.relative_to(src).with_suffix(".jpg")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"make_gpu_subset: cannot write '{out.parent}': {e.strerror or e}") from None
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as e:  # a damaged or truncated file (PIL's UnidentifiedImageError is one too)
            raise SystemExit(f"make_gpu_subset: '{path}' could not be read as an image ({type(e).__name__}: {e}); "
                             "replace or remove it") from None
        img.save(out, "JPEG", quality=quality)
        total += out.stat().st_size
    return len(files), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="BreakHis folder (holding BreaKHis_v1)")
    parser.add_argument("dst", type=Path, help="output folder")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality, 1 to 100")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality: give 1 to 100, not {args.quality}")
    n, size = convert_tree(args.src, args.dst, args.quality)
    print(f"wrote {n} JPEG images, {size / 2**20:.1f} MiB, to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
