"""Damaged image files against the decoders: how many kill the process (a signal, which no ``except`` catches).

    PYTHONPATH=src python benchmarks/decode_fuzz.py [--n 200] [--seed 1] [--where header|anywhere]

Makes ``--n`` damaged copies of small seeded PNG and JPEG images (1-4 random bytes replaced, in the first 200
bytes or anywhere), then decodes every file in child processes with two readers: torchvision's
``decode_image`` called directly, and finescope's ``read_image`` (which sends only intact PNGs and JPEGs to
torchvision). A child that dies is restarted after the file that killed it. Printed per reader and format:
files, files decoded, clean errors, process deaths.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table  # noqa: E402

CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
reader = sys.argv[1]
if reader == "torchvision":
    from torchvision.io import ImageReadMode, decode_image, read_file
    def read(p): decode_image(read_file(p), mode=ImageReadMode.RGB)
else:
    from finescope.data import read_image as read
for p in sys.argv[2:]:
    print("start", p, flush=True)
    try:
        read(p)
        print("ok", p, flush=True)
    except Exception as e:
        print("error", p, type(e).__name__, flush=True)
"""


def make_files(folder: Path, n: int, seed: int, where: str) -> list[Path]:
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    bases = {}
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, format=fmt)
        bases[ext] = buf.getvalue()
    files = []
    for i in range(n):
        ext = pick.choice(sorted(bases))
        data = bytearray(bases[ext])
        for _ in range(pick.randint(1, 4)):
            data[pick.randrange(min(len(data), 200) if where == "header" else len(data))] = pick.randrange(256)
        path = folder / f"{i:05d}{ext}"
        path.write_bytes(bytes(data))
        files.append(path)
    return files


def run_reader(reader: str, files: list[Path]) -> dict[Path, str]:
    """Outcome per file: ok, error or death (the child was killed while decoding it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    outcome: dict[Path, str] = {}
    todo = list(files)
    while todo:
        proc = subprocess.run([sys.executable, "-c", CHILD, reader, *map(str, todo)], capture_output=True,
                              text=True, env=env)
        started = None
        for line in proc.stdout.splitlines():
            kind, path = line.split()[:2]
            if kind == "start":
                started = Path(path)
            else:
                outcome[Path(path)] = kind
        if proc.returncode == 0:
            break
        if started is None or started in outcome:  # died outside a decode: report and stop
            raise SystemExit(f"{reader} child failed with {proc.returncode}: {proc.stderr[-500:]}")
        outcome[started] = f"death (signal {-proc.returncode})"
        todo = todo[todo.index(started) + 1:]
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--where", default="header", choices=("header", "anywhere"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="finescope_fuzz_") as tmp:
        files = make_files(Path(tmp), args.n, args.seed, args.where)
        for reader in ("torchvision", "read_image"):
            outcome = run_reader(reader, files)
            for ext in (".png", ".jpg"):
                kinds = Counter(v.split()[0] for f, v in outcome.items() if f.suffix == ext)
                rows.append([reader, ext, sum(kinds.values()), kinds["ok"], kinds["error"], kinds["death"]])
    import torchvision

    print(f"torchvision {torchvision.__version__}, {args.n} files, seed {args.seed}, bytes replaced: {args.where}\n"
          f"`PYTHONPATH=src {' '.join(['python', *sys.argv])}`\n")
    print(markdown_table(["reader", "format", "files", "decoded", "clean errors", "process deaths"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
