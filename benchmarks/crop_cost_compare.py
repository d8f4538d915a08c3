"""The table of a cross-commit ``crop_cost.py`` comparison: crop_align's median ms at two commits per round, and
their ratio, from ``DIR/round{R}_{COMMIT}.json`` (each written by ``crop_cost.py --in-step ... --out`` in a
process of its own, the commits alternated). Writes ``DIR/summary.md`` and prints it.

    python benchmarks/crop_cost_compare.py benchmarks/results/cpu_crop_cost_3578af4_vs_1a0c6b8 1a0c6b8 3578af4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarise(d: Path, old: str, new: str) -> str:
    rounds = sorted({int(p.name[5:].split("_")[0]) for p in d.glob(f"round*_{old}.json")})
    if not rounds:
        raise SystemExit(f"error: no round*_{old}.json in {d}: run crop_cost.py there first (see its run.sh)")
    missing = [f"round{r}_{new}.json" for r in rounds if not (d / f"round{r}_{new}.json").is_file()]
    if missing:
        raise SystemExit(f"error: no {', '.join(missing)} in {d}: is '{new}' the second commit's label?")
    R = {(r, c): json.loads((d / f"round{r}_{c}.json").read_text()) for r in rounds for c in (old, new)}
    named = ", ".join(str(r) for r in rounds)
    lines = [f"| input | B | boxes | {old} ms (rounds {named}) | {new} ms (rounds {named}) | {old} / {new} |",
             "| --- | --- | --- | --- | --- | --- |"]

    def medians(commit: str, part: str, i: int, key: str) -> list[float]:
        return [R[r, commit][part][i][key]["median"] for r in rounds]

    def spread(values: list[float], digits: int) -> str:
        return ", ".join(f"{v:.{digits}f}" for v in values)

    for i, row in enumerate(R[rounds[0], old]["rows"]):
        o, n = medians(old, "rows", i, "crop_align_ms"), medians(new, "rows", i, "crop_align_ms")
        ratios = [a / b for a, b in zip(o, n, strict=True)]
        lines.append(f"| {row['size']} | {row['batch']} | {row['boxes']} | {spread(o, 2)} | {spread(n, 2)} | "
                     f"{min(ratios):.2f}-{max(ratios):.2f} |")
    steps = R[rounds[0], old].get("steps") or []
    if steps:
        lines += ["", "Inside mobilenet_v2 fusion inference steps (the boxes the model selects):", "",
                  f"| input | B | crops {old} ms | crops {new} ms | step {old} ms | step {new} ms | "
                  f"step {old} / {new} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(steps):
        co, cn = medians(old, "steps", i, "crops_crop_align_ms"), medians(new, "steps", i, "crops_crop_align_ms")
        so, sn = medians(old, "steps", i, "step_crop_align_ms"), medians(new, "steps", i, "step_crop_align_ms")
        ratios = [a / b for a, b in zip(so, sn, strict=True)]
        lines.append(f"| {row['size']} | {row['batch']} | {spread(co, 2)} | {spread(cn, 2)} | {spread(so, 1)} | "
                     f"{spread(sn, 1)} | {min(ratios):.3f}-{max(ratios):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="the folder with round{R}_{COMMIT}.json")
    p.add_argument("old", help="the first commit's label in the file names")
    p.add_argument("new", help="the second commit's label")
    args = p.parse_args()
    text = summarise(args.dir, args.old, args.new)
    (args.dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
