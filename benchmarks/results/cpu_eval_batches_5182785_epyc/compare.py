"""Per image, P(benign) of each predictions CSV here against the one evaluated one image at a time.

    python benchmarks/results/cpu_eval_batches_5182785_epyc/compare.py
"""
import csv
from pathlib import Path

here = Path(__file__).parent
alone = list(csv.DictReader(open(here / "predictions_5182785_batch_1.csv")))
for name in ("predictions_2982733_batch_default.csv", "predictions_5182785_batch_default.csv"):
    rows = list(csv.DictReader(open(here / name)))
    assert [r["path"] for r in rows] == [r["path"] for r in alone]
    diff = sorted(((abs(float(r["prob_benign"]) - float(a["prob_benign"])), Path(r["path"]).name, r["prob_benign"],
                    a["prob_benign"]) for r, a in zip(rows, alone)), reverse=True)
    flips = sum(r["predicted"] != a["predicted"] for r, a in zip(rows, alone))
    print(f"{name}: {sum(d > 1e-3 for d, *_ in diff)} of {len(rows)} images differ by more than 1e-3 in P(benign) "
          f"(largest {diff[0][0]:.3g}: {diff[0][1]}, {diff[0][2]} against {diff[0][3]} alone); "
          f"{flips} predicted classes differ")
