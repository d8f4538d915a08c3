"""What finescope's malloc setting (``finescope.runtime.tune_allocator``) does to CPU steps: time, page faults and
peak resident memory of fusion steps, with glibc's default malloc and with the setting, each case in fresh
processes (the allocator's state depends on everything a process did before), the two alternated round by round
and compared per round.

    PYTHONPATH=src python benchmarks/malloc_cost.py --rounds 3 --out benchmarks/results/cpu_malloc_cost.json

A case is ``BACKBONE:HxW:BATCH:MODE`` (MODE ``infer`` or ``train``), a full fusion step as ``bench_model.py``
times it (channels-last weights, no autocast on the CPU). Each process warms up for two steps, then times
``--steps`` steps; it reports their median, the median of the minor page faults per step
(``getrusage``), and its peak resident memory (``ru_maxrss``, the whole process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
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
    parse_hw,
    parse_weights,
    require_counts,
    run_child,
    run_script,
)

from finescope.runtime import ENV  # noqa: E402

SETTINGS = {"default": "default", "finescope": "finescope"}  # the value of FINESCOPE_MALLOC in each process
DEFAULT_CASES = ["resnet18:460x700:16:infer", "resnet18:460x700:8:train", "mobilenet_v2:1536x2048:1:infer"]


def run_case(case: str, steps: int, weights: dict) -> dict:
    """One process's measurement of ``case`` (called in the child)."""
    allocator_as_the_cli()  # what the CLI does at start; FINESCOPE_MALLOC=default leaves glibc as it is
    import bench_model as bm

    backbone, size, batch, mode = case.split(":")
    args = argparse.Namespace(global_size=224, local_size=224, num_crops=4, weights=weights, cpu_amp="off")
    device = torch.device("cpu")
    data = bm.make_batch(tuple(int(v) for v in size.split("x")), int(batch), device)
    step = bm.model_case("fusion", "fusion", backbone, args, data, mode, device, True, True).step
    for _ in range(2):
        step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(times), "faults": statistics.median(faults),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="BACKBONE:HxW:BATCH:MODE")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per case and setting")
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--weights", nargs="*", default=[], metavar="BACKBONE=PATH")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help="JSON file for the results (a .md table beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, rounds=1, steps=1)
    make_out_folder(p, args.out)
    weights = parse_weights(p, args.weights)
    for case in args.cases:  # checked before the first case is timed
        parts = case.split(":")
        if len(parts) != 4 or not parts[2].isdigit() or int(parts[2]) < 1 or parts[3] not in ("infer", "train"):
            p.error(f"--cases: '{case}' is not BACKBONE:HxW:BATCH:MODE (BATCH 1 or more, MODE infer or train)")
        parse_hw(p, "--cases", parts[1])
    if args.child:
        print(json.dumps(run_case(args.child, args.steps, weights)))
        return {}
    result = {"environment": environment(torch.device("cpu")), "settings": vars(args), "cases": []}
    for case in args.cases:
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, value in SETTINGS.items():
                runs[name].append(run_child(__file__, ["--child", case, "--steps", str(args.steps),
                                                       *(["--weights", *args.weights] if args.weights else [])],
                                            {ENV: value}))
        ratios = [d["ms"] / f["ms"] for d, f in zip(runs["default"], runs["finescope"], strict=True)]
        result["cases"].append({"case": case, "runs": runs, "default_over_finescope": {
            "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}})
    result["environment"]["loadavg_end"] = loadavg()
    rows = []
    for c in result["cases"]:
        d, f, r = c["runs"]["default"], c["runs"]["finescope"], c["default_over_finescope"]

        def med(runs: list[dict], key: str) -> float:
            return statistics.median(run[key] for run in runs)

        rows.append([c["case"], f"{med(d, 'ms'):.1f}", f"{med(f, 'ms'):.1f}",
                     f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})", f"{med(d, 'faults'):.0f}",
                     f"{med(f, 'faults'):.0f}", f"{med(d, 'peak_mib'):.0f}", f"{med(f, 'peak_mib'):.0f}"])
    env = result["environment"]
    table = (f"device {env['cpu']} (cpu, {env['torch_threads']} threads), torch {env['torch']}, commit "
             f"{env['commit']}, load {env['loadavg_start']} -> {env['loadavg_end']}\n`{env['command']}`\n\n"
             + markdown_table(["case", "default ms", "finescope ms", "default / finescope", "faults/step default",
                               "faults/step finescope", "peak MiB default", "peak MiB finescope"], rows))
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    run_script(main)
