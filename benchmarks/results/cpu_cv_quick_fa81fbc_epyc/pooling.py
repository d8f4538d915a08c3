"""Pooled PRR of a cv's predictions.csv with a patient scored once per trial (since 42dc373) and once overall (before).

    PYTHONPATH=src python benchmarks/results/cpu_cv_quick_fa81fbc_epyc/pooling.py PREDICTIONS_CSV
"""

import sys

from finescope.metrics import bootstrap_ci, patient_index
from finescope.oof import as_arrays, patients_of, read_oof_csv

rows, names = read_oof_csv(sys.argv[1])
for variant in sorted({r["variant"] for r in rows}):
    vr = [r for r in rows if r["variant"] == variant]
    y, p, g = as_arrays(vr, names)
    overall = patient_index([r["group"] for r in vr], [r.get("patient") or r["group"] for r in vr])
    for label, patients in (("once per trial", patients_of(vr)), ("once overall", overall)):
        ci = bootstrap_ci(y, p, g, "patient_recognition_rate", n_boot=1000, seed=0, patients=patients)
        print(f"{variant:10s} {label:15s} PRR {ci['value']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
