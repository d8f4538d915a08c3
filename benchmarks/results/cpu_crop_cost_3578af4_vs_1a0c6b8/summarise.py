"""The table of run.sh's four files: crop_align's median ms at 1a0c6b8 and 3578af4 per round, and the ratio.
    python benchmarks/results/cpu_crop_cost_3578af4_vs_1a0c6b8/summarise.py"""
import json
from pathlib import Path

d = Path(__file__).resolve().parent
R = {(r, c): json.loads((d / f"round{r}_{c}.json").read_text()) for r in (1, 2) for c in ("1a0c6b8", "3578af4")}
lines = ["| input | B | boxes | 1a0c6b8 ms (rounds 1, 2) | 3578af4 ms (rounds 1, 2) | 1a0c6b8 / 3578af4 |",
         "| --- | --- | --- | --- | --- | --- |"]
for i, row in enumerate(R[1, "1a0c6b8"]["rows"]):
    old = [R[r, "1a0c6b8"]["rows"][i]["crop_align_ms"]["median"] for r in (1, 2)]
    new = [R[r, "3578af4"]["rows"][i]["crop_align_ms"]["median"] for r in (1, 2)]
    ratios = [o / n for o, n in zip(old, new)]
    lines.append(f"| {row['size']} | {row['batch']} | {row['boxes']} | {old[0]:.2f}, {old[1]:.2f} | "
                 f"{new[0]:.2f}, {new[1]:.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")
lines += ["", "Inside mobilenet_v2 fusion inference steps (the boxes the model selects):", "",
          "| input | B | crops 1a0c6b8 ms | crops 3578af4 ms | step 1a0c6b8 ms | step 3578af4 ms | step 1a0c6b8 / 3578af4 |",
          "| --- | --- | --- | --- | --- | --- | --- |"]


def medians(commit: str, i: int, key: str) -> list[float]:
    return [R[r, commit]["steps"][i][key]["median"] for r in (1, 2)]


for i, row in enumerate(R[1, "1a0c6b8"]["steps"]):
    co, cn = medians("1a0c6b8", i, "crops_crop_align_ms"), medians("3578af4", i, "crops_crop_align_ms")
    so, sn = medians("1a0c6b8", i, "step_crop_align_ms"), medians("3578af4", i, "step_crop_align_ms")
    ratios = [o / n for o, n in zip(so, sn)]
    lines.append(f"| {row['size']} | {row['batch']} | {co[0]:.2f}, {co[1]:.2f} | {cn[0]:.2f}, {cn[1]:.2f} | "
                 f"{so[0]:.1f}, {so[1]:.1f} | {sn[0]:.1f}, {sn[1]:.1f} | {min(ratios):.3f}-{max(ratios):.3f} |")
text = "\n".join(lines) + "\n"
(d / "summary.md").write_text(text)
print(text)
