"""What one parallel operation in a second Python thread costs every later parallel operation of the process.

With GNU OpenMP (libgomp, which torch's Linux wheels use), a thread that enters a parallel region gets an
OpenMP team of its own; once the process has more OpenMP threads than cores, libgomp's idle workers stop
spinning at their barriers and sleep, and each parallel region then waits for futex wake-ups. finescope cut its
CPU crops in strips on a Python thread pool from 22d08a5 to 985437b; this measures what that did.

Each case runs in fresh processes (the team lives as long as the process), rounds alternated. A process times
the backbone passes of a fusion inference step (one 224x299 view and four 224x224 crops, channels-last weights,
no grad), lets a Python thread run one parallel operation and then wait (as a thread pool's idle worker does), and times
the passes again:

    plain        the thread as Python makes it: libgomp gives it a team of its own
    one-thread   the thread first kept to one OpenMP thread (``omp_set_num_threads(1)`` on the loaded runtime)
    none         no thread: the same passes timed twice

    PYTHONPATH=src python benchmarks/openmp_cost.py --rounds 3 --out benchmarks/results/cpu_openmp_cost.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    parse_weights,
    report_header,
    require_counts,
    run_child,
    run_script,
    save_report,
)

from finescope.models import create_backbone  # noqa: E402

CASES = ("none", "plain", "one-thread")


def openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded in this process, as ``/proc/self/maps`` lists it (Linux), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith(("libgomp", "libomp", "libiomp5")):
            return ctypes.CDLL(path)
    return None


def os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def run_case(backbone: str, case: str, reps: int, weights: str) -> dict:
    """One process's measurement (called in the child)."""
    allocator_as_the_cli()
    trunk = create_backbone(backbone, weights=weights).eval().to(memory_format=torch.channels_last)
    view, crops = torch.rand(1, 3, 224, 299), torch.rand(4, 3, 224, 224)

    def passes_ms() -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            trunk(view)
            trunk(crops)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    with torch.no_grad():
        passes_ms()  # warm-up
        before, threads_before = passes_ms(), os_threads()
        stop, done = threading.Event(), threading.Event()
        if case != "none":
            runtime = openmp_runtime() if case == "one-thread" else None
            if case == "one-thread" and runtime is None:
                raise SystemExit("no OpenMP runtime found in /proc/self/maps")

            def work() -> None:  # like a thread pool's worker: it stays, and its OpenMP team with it
                if runtime is not None:
                    torch.get_num_threads()  # ATen sets the thread's team size at its first parallel call
                    runtime.omp_set_num_threads(1)
                torch.rand(4_000_000).sum()  # one parallel operation
                done.set()
                stop.wait()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            done.wait()
        after, threads_after = passes_ms(), os_threads()
        stop.set()
    return {"before_ms": before, "after_ms": after, "os_threads_before": threads_before,
            "os_threads_after": threads_after, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet18"])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per backbone and case")
    p.add_argument("--reps", type=int, default=15, help="timed passes before and after, per process")
    p.add_argument("--weights", nargs="*", default=[], metavar="BACKBONE=PATH")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON file for the results (a .md table beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, rounds=1, reps=1)
    make_out_folder(p, args.out)
    weights = parse_weights(p, args.weights)
    if args.child:
        backbone, case = args.child.split(":")
        print(json.dumps(run_case(backbone, case, args.reps, weights.get(backbone, ""))))
        return {}
    result = {"environment": environment(torch.device("cpu")), "settings": vars(args), "groups": []}
    for backbone in args.backbones:
        runs: dict[str, list[dict]] = {case: [] for case in CASES}
        for _ in range(args.rounds):
            for case in CASES:
                runs[case].append(run_child(__file__, ["--child", f"{backbone}:{case}", "--reps", str(args.reps),
                                                       *(["--weights", *args.weights] if args.weights else [])]))
        result["groups"].append({"backbone": backbone, "runs": runs})
    result["environment"]["loadavg_end"] = loadavg()
    rows = []
    for g in result["groups"]:
        for case, runs in g["runs"].items():
            ratios = [r["after_ms"] / r["before_ms"] for r in runs]
            rows.append([g["backbone"], case, f"{statistics.median(r['before_ms'] for r in runs):.1f}",
                         f"{statistics.median(r['after_ms'] for r in runs):.1f}",
                         f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                         f"{runs[0]['os_threads_before']} -> {runs[0]['os_threads_after']}"])
    table = markdown_table(["backbone", "second thread", "passes ms before", "passes ms after", "after / before",
                            "OS threads"], rows)
    save_report(args.out, result, f"{report_header(result['environment'])}\n\n{table}\n")
    return result

if __name__ == "__main__":
    run_script(main)
