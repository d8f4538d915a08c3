"""The selection of 16 maps of 7x11 cells (benchmarks/selection_cost.py's maps) with an older commit's selection.py
and this checkout's, interleaved call by call in one process; the ratio is paired per repetition.

    PYTHONPATH=src python benchmarks/results/cpu_selection_peaks_a28f882_epyc/paired.py 2dda8fc
"""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from common import loadavg  # noqa: E402
from selection_cost import inputs, maps  # noqa: E402

from finescope.models import selection as new  # noqa: E402

base = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "old_selection.py"
    path.write_text(subprocess.run(["git", "show", f"{base}:src/finescope/models/selection.py"], check=True,
                                   capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("old_selection", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"load {loadavg()}, {torch.get_num_threads()} threads, {base} against {head}")
cases = {f"{base} exact": lambda a: old.select_boxes(*a, padded=False, components="exact"),
         "exact, peaks grid": lambda a: new.select_boxes(*a, padded=False, components="exact", peaks="grid"),
         "exact, peaks nodes": lambda a: new.select_boxes(*a, padded=False, components="exact", peaks="nodes"),
         "grid, peaks grid": lambda a: new.select_boxes(*a, padded=False, components="grid", peaks="grid")}
print("| maps | selection | ms per call (median) | paired ratio to the first |\n| --- | --- | --- | --- |")
for kind in ("smooth", "noisy"):
    a = inputs(maps(kind, 16, 7, 11, torch.device("cpu")))
    t = {c: [] for c in cases}
    for _ in range(400):
        for c, f in cases.items():
            s = time.perf_counter()
            f(a)
            t[c].append(time.perf_counter() - s)
    first = t[f"{base} exact"]
    for c in cases:
        ratio = statistics.median([y / x for x, y in zip(first, t[c])])
        print(f"| {kind} | {c} | {statistics.median(t[c]) * 1e3:.3f} | {ratio:.3f} |")
print(f"load {loadavg()}")
