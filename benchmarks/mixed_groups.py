"""Do a group's images of different classes come from one specimen? Colour statistics of each group's classes.

    PYTHONPATH=src python benchmarks/mixed_groups.py --config configs/defungi.yaml \
        --set data.root=../shared/data/defungi --out benchmarks/results/cpu_mixed_groups_defungi/mixed_groups.json

``finescope data`` lists the groups that hold images of two or more classes. Whether such a group is one
specimen (a patient with a benign and a malignant slide) or an id that the data numbers per class (two unrelated
micrographs that share a number) changes what a patient-level figure means. This reads the config's samples,
describes every image by the mean and standard deviation of its RGB channels (a 32x32 thumbnail), and averages
those per unit, a unit being one class of one group. It then compares three distances between units' means:

- ``halves``: the two random halves of one unit (the images of one specimen and class), the scale of "same";
- ``same group``: the classes of one mixed group, pair by pair;
- ``other groups``: for each such pair, the same two classes taken from two different groups (a seeded draw).

When ``same group`` is near ``halves``, the classes of a group look alike (one specimen, one stain and light);
when it is near ``other groups``, the group's id joins images that look no more alike than unrelated ones.
Colour is a weak cue (one specimen's classes can differ in colour; different specimens can share a stain), so
this is evidence for the data's documentation, not a rule the package applies.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment,
    loadavg,
    make_out_folder,
    markdown_table,
    report_header,
    run_script,
    save_report,
)

from finescope.config import load_config  # noqa: E402
from finescope.data.sources import load_samples  # noqa: E402

THUMB = 32


def colour_stats(path: str) -> np.ndarray:
    """Mean and standard deviation of the R, G and B channels of a 32x32 thumbnail, in [0, 1] (6,)."""
    with Image.open(path) as im:
        im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a reduced scale
        a = np.asarray(im.convert("RGB").resize((THUMB, THUMB)), dtype=np.float32) / 255
    return np.concatenate([a.mean((0, 1)), a.std((0, 1))])


def distances(units: dict[tuple[str, str], list[np.ndarray]], seed: int) -> dict[str, list[float]]:
    """The three lists of distances of the module's docstring, over the units {(group, class): [stats]}."""
    rng = random.Random(seed)
    mean = {u: np.mean(v, 0) for u, v in units.items()}
    classes_of: dict[str, list[str]] = defaultdict(list)
    groups_of: dict[str, list[str]] = defaultdict(list)
    for group, cls in sorted(units):
        classes_of[group].append(cls)
        groups_of[cls].append(group)
    out: dict[str, list[float]] = {"halves": [], "same group": [], "other groups": []}
    for unit in sorted(units):
        stats = units[unit]
        if len(stats) >= 4:
            order = rng.sample(range(len(stats)), len(stats))
            half = len(stats) // 2
            a, b = (np.mean([stats[i] for i in part], 0) for part in (order[:half], order[half:]))
            out["halves"].append(float(np.linalg.norm(a - b)))
    for group, classes in sorted(classes_of.items()):
        for i, c1 in enumerate(classes):
            for c2 in classes[i + 1:]:
                out["same group"].append(float(np.linalg.norm(mean[(group, c1)] - mean[(group, c2)])))
                others = [(g1, g2) for g1 in groups_of[c1] for g2 in groups_of[c2] if g1 != g2 and group not in (g1, g2)]
                if others:
                    g1, g2 = rng.choice(others)
                    out["other groups"].append(float(np.linalg.norm(mean[(g1, c1)] - mean[(g2, c2)])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a finescope YAML config (its data section is read)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as finescope's")
    p.add_argument("--seed", type=int, default=0, help="the draw of the halves and of the other groups")
    p.add_argument("--out", help="JSON file for the results (a .md table beside it)")
    args = p.parse_args(argv)
    make_out_folder(p, args.out)
    env = environment(torch.device("cpu"))
    cfg = load_config(args.config, args.set)
    samples = load_samples(cfg.data)
    units: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for s in samples.samples:
        units[(s.group, samples.class_names[s.label])].append(colour_stats(s.path))
    n_classes = defaultdict(int)
    for group, _ in units:
        n_classes[group] += 1
    mixed = sorted(g for g, n in n_classes.items() if n > 1)
    if not mixed:
        print(f"no group of {args.config} holds two or more classes: nothing to compare")
        return 0
    found = distances(units, args.seed)
    rows = [[name, len(v), f"{np.median(v):.4f}", f"{np.mean(v):.4f}"] for name, v in found.items() if v]
    table = markdown_table(["distance between", "pairs", "median", "mean"], rows)
    head = (f"{len(samples)} images, {len(n_classes)} groups, {len(units)} (group, class) units; {len(mixed)} groups "
            f"hold two or more classes")
    env["loadavg_end"] = loadavg()
    result = {"env": env, "images": len(samples), "groups": len(n_classes), "units": len(units),
              "mixed_groups": len(mixed), "distances": found,
              "medians": {k: float(np.median(v)) for k, v in found.items() if v}}
    save_report(args.out, result, report_header(env) + "\n\n" + head + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
