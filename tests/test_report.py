"""report.md / report.html from a cv folder and from a single run; the HTML renders in headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from finescope import report
from finescope.cli import main
from finescope.errors import FinescopeError
from finescope.oof import summarize_predictions
from finescope.report import write_report


def fake_cv(folder: Path, n=36, variants=("global", "fusion")) -> Path:
    """A cv folder holding only predictions.csv and history files (no training)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "group", "magnification", "true", "predicted", "prob_benign", "prob_malignant",
                    "fold", "variant"])
        for v in variants:
            for i in range(n):
                true = "benign" if i % 3 else "malignant"
                pb = float(np.clip((0.7 if true == "benign" else 0.3) + rng.normal(0, 0.25), 0.01, 0.99))
                w.writerow([f"im{i}.png", f"p{i // 4}", 100, true, "benign" if pb > 0.5 else "malignant", pb,
                            1 - pb, f"trial{i % 3}", v])
    for v in variants:
        for f in range(3):
            run = folder / "runs" / v / f"trial{f}"
            run.mkdir(parents=True)
            (run / "history.jsonl").write_text("".join(
                json.dumps({"epoch": e, "train_loss": 1 / (e + 1), "val_balanced_accuracy": 0.5 + e / 20}) + "\n"
                for e in range(4)))
    return folder


def test_report_from_cv_folder(tmp_path):
    md, page = write_report(fake_cv(tmp_path / "cv"), n_boot=50)
    text = md.read_text()
    for heading in ("Ablation table", "Paired comparison with 'global'", "Per magnification", "Confusion",
                    "ROC", "Reliability", "Training curves"):
        assert heading in text
    assert "| fusion − global |" in text
    for name in re.findall(r"\]\((report_files/[^)]+)\)", text):
        assert (md.parent / name).stat().st_size > 1000
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 4 and "http" not in html.replace("http-equiv", "")


def _single_run(folder: Path, variant: str, rows: list[list]) -> Path:
    """A run folder of ``variant`` whose test predictions (two classes, a and b) are ``rows``."""
    folder.mkdir()
    (folder / "config.yaml").write_text(f"model: {{variant: {variant}}}\n")
    with (folder / "predictions_test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group", "true", "predicted", "prob_a", "prob_b", "boxes"])
        w.writerows(rows)
    return folder


def test_report_of_a_single_run_and_cli(tmp_path, capsys):
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    assert main(["report", str(run)]) == 0
    assert "report written" in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert "| fusion |" in text and "## Test metrics" in text and "## Confusion matrix (the run's test split)" in text
    assert "fold" not in text.lower()  # one run: no folds to average over
    (run / "predictions_test.csv").rename(run / "predictions_val.csv")  # `report RUN` names the split it finds
    assert main(["report", str(run)]) == 0
    assert "## Validation metrics" in (run / "report.md").read_text()
    splits = {"train": {"images": 8, "groups": 3, "shared_groups": 0, "per_class": {"a": {"images": 4, "groups": 2}}}}
    assert report.split_table([("split", splits)], ["a"], folds=False) == (
        ["side", "images", "groups", "a img/grp", "shared groups"], [["train", "8", "3", "4/2", "0"]])
    assert main(["report", str(tmp_path / "nothing")]) == 2
    with pytest.raises(FinescopeError, match="neither a cv.s predictions.csv"):
        write_report(tmp_path)


def test_a_predict_csv_in_a_run_folder_is_not_taken_for_a_cv(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    header = ["path", "group", "true", "predicted", "prob_a", "prob_b", "boxes"]  # what train and predict write
    for name in ("predictions_test.csv", "predictions.csv"):  # `predict .` in the run: cv's table's name
        with (run / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for i in range(6):
                w.writerow([f"/x/{i}.png", f"g{i // 2}", "a" if i % 2 else "b", "a", 0.6, 0.4, ""])
    assert main(["report", str(run)]) == 0  # as evaluate, which writes this report too
    assert "## Test metrics" in (run / "report.md").read_text()


def test_report_of_a_run_does_not_take_a_predict_csv_for_its_test_split(tmp_path):
    """`report RUN` without predictions_test.csv took the first predictions_*.csv it found: a `predict --out
    RUN/predictions_new.csv` of other images (labelled by their class folders) came first, before evaluate's
    predictions_val.csv, and was reported as 'Test metrics ... On the run's test split'."""
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "predictions_test.csv").rename(run / "predictions_new.csv")
    with pytest.raises(FinescopeError, match="neither a cv.s predictions.csv"):
        write_report(run)
    shutil.copy(run / "predictions_new.csv", run / "predictions_val.csv")
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "## Validation metrics" in text and "Test metrics" not in text



@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_a_figure_that_cannot_be_written_whole_keeps_the_previous_one(tmp_path):
    """README: every file of a run is written whole or not at all. A report's figures (report_files/*.png) were
    written in place: a write stopped by a full disk (here a file size limit) left a truncated PNG that the
    previous report.md linked; the previous figure stays, and no temporary file is left beside it."""
    import errno
    import resource

    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    write_report(run)
    before = {p.name: p.read_bytes() for p in (run / "report_files").iterdir()}
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, limits[1]))  # the predictions fit; no figure does
    try:
        with pytest.raises(OSError) as e:
            write_report(run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert e.value.errno == errno.EFBIG
    assert {p.name: p.read_bytes() for p in (run / "report_files").iterdir()} == before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(tmp_path):
    _, page = write_report(fake_cv(tmp_path / "cv"), n_boot=50)
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = done.stdout
    assert 'data-images-ok="true"' in dom, done.stderr[-2000:]  # every embedded image decoded
    assert '<table class="ablation">' in dom and "<td>fusion</td>" in dom


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(",benign,", ",benin,", 1), "true class 'benin' is none of"),
    (lambda t: t.replace(",0.", ",x0.", 1), "not a probability in [0, 1]"),
    (lambda t: t[:t.index("\n", t.index("\n") + 1) + 20], "fewer fields than the header"),
    (lambda t: t.replace(",100,", ",100X,", 1), "magnification is '100X'"),
    (lambda t: t.replace(",variant", ",model", 1), "no column 'variant'"),
], ids=["class", "probability", "cut", "magnification", "column"])
def test_a_damaged_predictions_csv_is_one_line(tmp_path, capsys, edit, message):
    folder = fake_cv(tmp_path / "cv")
    csv_path = folder / "predictions.csv"
    csv_path.write_text(edit(csv_path.read_text()))
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "predictions.csv" in err[0]


def test_cv_report_follows_predictions_csv_not_a_stale_summary(tmp_path):
    """summary.json of other predictions (predictions.csv written again or edited since) is computed again, with
    the cv's reference, resamples and seed from cv.json."""
    from finescope.cv import _summary

    folder = fake_cv(tmp_path / "cv")
    (folder / "cv.json").write_text(json.dumps({"reference": "fusion", "n_boot": 30, "settings": {"config": {
        "seed": 3}}}))
    _summary(folder, "fusion", 30, 3)
    text = (folder / "predictions.csv").read_text()
    rows = [r.split(",") for r in text.splitlines()]
    for r in rows[1:]:  # global now predicts every image right
        if r[-1] == "global":
            r[4], r[5], r[6] = r[3], *(("0.9", "0.1") if r[3] == "benign" else ("0.1", "0.9"))
    (folder / "predictions.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    md, _ = write_report(folder, n_boot=50)
    table = md.read_text()
    assert "| global | 1.000 [1.000, 1.000]" in table and "global − fusion" in table
    fresh = json.loads(json.dumps(summarize_predictions(folder / "predictions.csv", "fusion", 30, 3)))
    assert report.ablation_table(fresh)[1][0][1] in table and report.comparison_table(fresh)[1][0][1] in table


def test_a_cv_reports_training_curves_of_its_own_variants_only(tmp_path, monkeypatch):
    """A cv folder rerun with fewer variants (`--variants global` where global,fusion were trained: the same
    settings, so allowed) reported the ablation table of global beside training curves of fusion as well, whose
    runs it holds from before but no longer compares (found in review)."""
    folder = fake_cv(tmp_path / "cv", variants=("global",))
    shutil.copytree(folder / "runs" / "global", folder / "runs" / "fusion")
    drawn = []
    monkeypatch.setattr(report, "_fig_curves", lambda histories, order: drawn.append(sorted(histories)) or None)
    write_report(folder, n_boot=20)
    assert drawn == [["global"]]


def test_evaluate_report_of_a_checkpoint_beside_a_runs_folder_is_a_run_report(tmp_path):
    """`evaluate model.pt` in a project folder holding runs/ and predict's default predictions.csv reports the
    predictions it wrote, not the folder as a cv."""
    (tmp_path / "runs").mkdir()
    header = ["path", "group", "true", "predicted", "prob_a", "prob_b", "boxes"]
    for name in ("predictions.csv", "predictions_all.csv"):  # predict's default --out; evaluate's all images
        with (tmp_path / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for i in range(6):
                w.writerow([f"/x/{i}.png", f"g{i // 2}", "a" if i % 2 else "b", "a", 0.6, 0.4, ""])
    md, _ = write_report(tmp_path, n_boot=20, predictions=tmp_path / "predictions_all.csv", split="all",
                         out=tmp_path / "report_all.md")
    assert "## All-image metrics" in md.read_text()


def test_reliability_diagram_bins_give_the_ece_of_its_legend(tmp_path, monkeypatch):
    """The diagram's points are the bins of the ECE its legend (and the tables) show."""
    drawn = []

    def recording(*args, **kwargs):
        drawn.append(report_reliability(*args, **kwargs))
        return drawn[-1]

    report_reliability = report.reliability_curve
    monkeypatch.setattr(report, "reliability_curve", recording)
    folder = fake_cv(tmp_path / "cv", variants=("global",))
    write_report(folder, n_boot=20)
    rc = drawn[0]
    count = np.array(rc["bin_count"])
    gaps = [abs(a - c) for a, c in zip(rc["bin_accuracy"], rc["bin_confidence"], strict=True) if c is not None]
    ece = float(np.dot(count[count > 0], gaps) / count.sum())
    expected = summarize_predictions(folder / "predictions.csv", n_boot=20)["variants"]["global"]["pooled"]["ece"]
    assert ece == pytest.approx(expected["value"])


def test_report_says_why_an_interval_is_missing(tmp_path):
    """A test split of 4 patients: the intervals were drawn from the few resamples 4 patients allow (width 0 where
    every resample scores alike); the report now says n/a and why."""
    trues = ["a" if i // 3 % 2 else "b" for i in range(12)]
    run = _single_run(tmp_path / "run", "global", [[f"/x/{i}.png", f"g{i // 3}", t, t,
                                                    *((0.8, 0.2) if t == "a" else (0.2, 0.8)), ""]
                                                   for i, t in enumerate(trues)])
    md, _ = write_report(run, n_boot=50)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| global |"))
    assert row.count("[n/a (only 4 patients)]") == len(report.TABLE_METRICS) and "1.000, 1.000" not in row


def test_a_summary_from_before_few_patient_intervals_were_withheld_is_computed_again(tmp_path):
    """summary.json of a cv over 4 patients, written before such intervals were withheld, held them (here one of
    width 0) and matched predictions.csv, so cv's rerun and the report reused it: its made_from lacks the rule."""
    from finescope.cv import _summary

    folder = fake_cv(tmp_path / "cv", n=16)  # p0 .. p3
    summary = _summary(folder, "global", 30, 0)
    assert summary["made_from"]["ci_min_groups"] == 5
    assert summary["variants"]["global"]["pooled"]["auc"]["ci_note"] == "only 4 patients"
    del summary["made_from"]["ci_min_groups"]
    for cell in summary["variants"]["global"]["pooled"].values():
        if isinstance(cell, dict) and "low" in cell:
            cell.update(low=0.5, high=0.5, n_boot=30)
            del cell["ci_note"]
    (folder / "summary.json").write_text(json.dumps(summary))
    md, _ = write_report(folder, n_boot=30)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| global |"))
    assert "[0.500, 0.500]" not in row and "[n/a (only 4 patients)]" in row
    assert _summary(folder, "global", 30, 0)["variants"]["global"]["pooled"]["auc"]["ci_note"] == "only 4 patients"


def test_a_summary_from_before_a_metric_changed_is_computed_again(tmp_path):
    """summary.json of a cv written before a metric's definition changed (patients of several classes, equal
    patient ids in two groups) matched predictions.csv, so cv's rerun and the report read its old values back."""
    from finescope.cv import _summary

    folder = fake_cv(tmp_path / "cv", n=40)
    summary = _summary(folder, "global", 30, 0)
    value = summary["variants"]["global"]["pooled"]["patient_accuracy_majority"]["value"]
    summary["made_from"]["metrics_version"] = 1
    summary["variants"]["global"]["pooled"]["patient_accuracy_majority"]["value"] = 0.123
    (folder / "summary.json").write_text(json.dumps(summary))
    md, _ = write_report(folder, n_boot=30)
    assert "0.123" not in md.read_text()
    assert _summary(folder, "global", 30, 0)["variants"]["global"]["pooled"]["patient_accuracy_majority"]["value"] == value


def test_class_names_with_dollar_signs_are_drawn_as_written_not_typeset(tmp_path, monkeypatch):
    """matplotlib read the '$...$' of a class name in the confusion matrix's ticks and the ROC legend as mathtext:
    'cost $5 and $6' came out typeset, and 'a$\\foo$' ended the report in a ParseFatalException traceback."""
    from matplotlib.text import Text

    names = ("cost $5 and $6", "a$\\foo$")
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", names[i % 2], names[0], 0.6, 0.4, ""]
                                                   for i in range(12)])
    (run / "predictions_test.csv").write_text((run / "predictions_test.csv").read_text()
                                              .replace("prob_a,prob_b", ",".join(f'"prob_{n}"' for n in names)))
    drawn = []
    draw = Text.draw
    monkeypatch.setattr(Text, "draw", lambda self, renderer: drawn.append(self) or draw(self, renderer))
    assert main(["report", str(run)]) == 0
    shown = [t for t in drawn if any(n in t.get_text() for n in names)]
    assert shown and not any(t.get_parse_math() for t in shown)  # the ticks and the legend, as written


@pytest.mark.parametrize("summary", [5, {"train": {"images": 8, "groups": 3}}, {"train": [1, 2]}])
def test_a_split_summary_of_another_shape_is_left_out_with_a_warning(tmp_path, capsys, summary):
    """A splits.json whose summary is not the one finescope writes (edited, another tool's) ended report in an
    AttributeError or KeyError traceback; it is left out with a warning, as a splits.json that is no JSON is."""
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "splits.json").write_text(json.dumps({"summary": summary}))
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "splits.json' holds no split summary that finescope wrote" in err and "Traceback" not in err
    text = (run / "report.md").read_text()
    assert "## Test metrics" in text and "Split summary" not in text


@pytest.mark.parametrize("line", ['{"epoch": "3", "train_loss": 0.5}', '{"epoch": null}', '{"epoch": 1.5}'])
def test_a_history_line_whose_epoch_is_no_whole_number_is_skipped_with_a_warning(tmp_path, capsys, line):
    """The training curves added 1 to each line's epoch: an epoch of '3' or null (an edited history.jsonl) ended
    report in a TypeError traceback. Such a line is skipped with a warning, as a line that is no JSON is."""
    folder = fake_cv(tmp_path / "cv", n=24)
    with (folder / "runs" / "global" / "trial0" / "history.jsonl").open("a") as fh:
        fh.write(line + "\n")
    assert main(["report", str(folder)]) == 0
    assert "history.jsonl: line 5 is not an epoch record" in capsys.readouterr().err
    assert "## Training curves" in (folder / "report.md").read_text()


@pytest.mark.parametrize("record", [{"n_boot": 0}, {"n_boot": -5}, {"settings": {"config": {"seed": -1}}}])
def test_a_cv_json_whose_resamples_or_seed_are_out_of_range_is_no_record(tmp_path, record):
    """The report computes a cv's summary with cv.json's n_boot and seed: an edited n_boot of 0 or seed of -1 ended
    it in numpy's or the bootstrap's ValueError traceback. Such a value is taken as unrecorded, as one of another
    type is."""
    folder = fake_cv(tmp_path / "cv", n=24)
    (folder / "cv.json").write_text(json.dumps(record))
    md, _ = write_report(folder, n_boot=20)
    assert "| fusion − global |" in md.read_text()


def test_a_damaged_run_predictions_csv_is_named_with_its_own_line(tmp_path, capsys):
    """A run's report named the copy it reads (report_files/predictions_oof.csv) and that copy's line, which is
    another where rows without a true class are left out, not the predictions_test.csv to write again."""
    rows = [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6, 0.4, ""] for i in range(12)]
    rows[0][2] = ""  # an image without a true class: not in the copy
    rows[2][4] = "1.7"  # line 4 of predictions_test.csv, line 3 of the copy
    run = _single_run(tmp_path / "run", "fusion", rows)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{run / 'predictions_test.csv'}' line 4: prob_a is '1.7'" in err[0]


def test_predictions_saved_with_a_byte_order_mark_are_read(tmp_path):
    """A predictions CSV saved again as Excel's 'CSV UTF-8' starts with a byte order mark: the report read its
    first column as '\\ufeffpath' ('\\ufeffimage' in a cv's) and said the file had no column 'path', which it has;
    it is read as the data manifest is."""
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    folder = fake_cv(tmp_path / "cv", n=24)
    for path in (run / "predictions_test.csv", folder / "predictions.csv"):
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    assert "## Test metrics" in write_report(run, n_boot=20)[0].read_text()
    assert "| fusion − global |" in write_report(folder, n_boot=20)[0].read_text()


def test_evaluate_report_takes_no_split_leak_from_another_evaluations_metrics(tmp_path):
    # evaluate RUN --set data.root=CLEAN --out y.json passes no warning (split_leak null): its report must not take
    # the split_leak that an earlier evaluate of other data left in the run's metrics_all.json (found in review)
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "metrics_all.json").write_text(json.dumps({"split_leak": "25 of the 45 images evaluated are of 4 groups",
                                                      "model_overrides": {}}))
    preds = shutil.copy(run / "predictions_test.csv", tmp_path / "y_predictions.csv")
    md, _ = write_report(run, predictions=Path(preds), split="all", out=tmp_path / "y_report.md",
                         warning=None, model_overrides={})
    assert "25 of the 45" not in md.read_text()


def test_report_of_a_run_reads_the_metrics_beside_a_last_checkpoints_predictions(tmp_path):
    # report RUN of a run whose only predictions are evaluate RUN/checkpoints/last.pt --split val --set ...:
    # the override and the leak are recorded in metrics_val_last.json, not metrics_val.json (found in review)
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "predictions_test.csv").rename(run / "predictions_val_last.csv")
    (run / "metrics_val_last.json").write_text(json.dumps({
        "split_leak": "3 of the 12 images leak", "model_overrides": {"model.selection_components": "grid"}}))
    md, _ = write_report(run)
    text = md.read_text()
    assert "Evaluated with --set model.selection_components=grid" in text and "3 of the 12 images leak" in text


def test_report_of_a_run_names_the_other_data_its_evaluate_recorded(tmp_path):
    # report RUN of a run whose predictions are evaluate RUN --set data.root=OTHER's (predictions_all.csv): the
    # report evaluate wrote says 'all 12 images of OTHER'; written again by `report RUN` it lost the folder, so it
    # no longer said which data its metrics are of (found in review)
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "predictions_test.csv").rename(run / "predictions_all.csv")
    (run / "metrics_all.json").write_text(json.dumps({"data_root": "/data/other_hospital", "split_leak": None,
                                                      "model_overrides": {}}))
    assert "all 12 images of '/data/other_hospital'" in write_report(run, n_boot=20)[0].read_text()


def test_report_of_a_working_folder_is_neither_a_cv_nor_a_run(tmp_path, capsys):
    """`finescope report .` in a working folder where train made runs/ and predict wrote its default
    predictions.csv took the folder for a cv (runs/ beside a predictions.csv) and said 'predictions.csv has no
    column 'image' ... write it again with finescope cv' (found in the walkthrough); it says what the folder is not."""
    from finescope.cli import main

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "predictions.csv").write_text("path,group,patient,magnification,true,predicted,prob_a,prob_b,boxes,"
                                              "model_overrides\n/x/1.png,,,,,a,0.6,0.4,,\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds neither a cv's predictions.csv nor predictions_<split>.csv" in err


def test_report_of_a_run_prefers_the_model_as_trained_to_one_evaluated_with_other_settings(tmp_path):
    """`report RUN` without predictions_test.csv took the first predictions_test_*.csv by name: evaluate's of
    --set data.bit_depth=16 (predictions_test_bit_depth=16.csv) before last.pt's predictions_test_last.csv, which
    README puts first; another model's report became the run's report.md (found in review)."""
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "predictions_test.csv").rename(run / "predictions_test_bit_depth=16.csv")
    (run / "metrics_test_bit_depth=16.json").write_text(json.dumps({"model_overrides": {"data.bit_depth": 16}}))
    assert "data.bit_depth=16" in write_report(run, n_boot=20)[0].read_text()  # the only one: said so
    shutil.copy(run / "predictions_test_bit_depth=16.csv", run / "predictions_test_last.csv")
    assert "data.bit_depth=16" not in write_report(run, n_boot=20)[0].read_text()


def test_report_of_a_run_prefers_its_own_sides_to_evaluations_of_all_images(tmp_path):
    """`report RUN` of a run trained without a test side (data.test_fraction=0) holding evaluate's predictions_val.csv
    (its validation side) and predictions_all.csv (evaluate RUN --set data.root=OTHER: other data) reported the
    other data as the run's report.md, 'all' coming first in alphabetical order; the run's own sides come first
    (test, val, train; best.pt's before last.pt's), all images of other data last (found in the walkthrough)."""
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    (run / "predictions_test.csv").rename(run / "predictions_all.csv")
    for name in ("predictions_val_last.csv", "predictions_train.csv", "predictions_val.csv"):
        shutil.copy(run / "predictions_all.csv", run / name)
    assert "## Validation metrics" in write_report(run, n_boot=20)[0].read_text()
    (run / "predictions_val.csv").unlink()
    assert "## Validation metrics" in write_report(run, n_boot=20)[0].read_text()  # last.pt's val before train
    (run / "predictions_val_last.csv").unlink()
    assert "## Training-split metrics" in write_report(run, n_boot=20)[0].read_text()
    (run / "predictions_train.csv").unlink()
    assert "all 12 images" in write_report(run, n_boot=20)[0].read_text()


def test_training_curves_mark_whole_epochs_only(monkeypatch):
    """The curves of a 3-epoch run had epochs 1.0, 1.5, ... 3.0 on their x axis, epochs that do not exist (a 1-epoch
    run's, 0.96 to 1.04); the ticks are whole epochs."""
    figures = []
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or b"")
    hist = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_balanced_accuracy": 0.5 + 0.1 * e} for e in range(3)]
    report._fig_curves({"global": {"fold0": hist, "fold1": hist}, "fusion": {"fold0": hist[:1]}}, ["global"])
    axes = figures[0].axes
    assert len(axes) == 4
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    import matplotlib.pyplot as plt

    plt.close(figures[0])


def test_a_figure_of_classes_named_in_chinese_prints_no_glyph_warnings():
    """Class folders named in Chinese, Japanese or Korean (良性, 恶性): every report figure that names the classes
    printed two lines of matplotlib's "Glyph 33391 (\\N{CJK UNIFIED IDEOGRAPH-826F}) missing from font(s) DejaVu
    Sans" per character the font lacks, beside finescope's one-line messages; the tables show the names as text."""
    import warnings

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title("良性 / 恶性")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert report._png(fig).startswith(b"\x89PNG")
    assert [str(w.message) for w in caught if "missing from font" in str(w.message)] == []


def test_report_figures_are_numbered_from_one_in_cv_and_run_reports(tmp_path):
    """Figures were named after their block's place in the report, tables counted: a cv report's began at
    figure_2 (its ablation and comparison tables first; figure_3 with a magnification table too), a run's at
    figure_1. Both now number their figures 1, 2, ... in order."""
    md, _ = write_report(fake_cv(tmp_path / "cv"), n_boot=20)
    linked = re.findall(r"\]\(report_files/([^)]+)\)", md.read_text())
    assert linked == ["figure_1.png", "figure_2.png", "figure_3.png", "figure_4.png"]
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    md, _ = write_report(run, n_boot=20)
    linked = re.findall(r"\]\(report_files/([^)]+)\)", md.read_text())
    assert linked == ["figure_1.png", "figure_2.png", "figure_3.png"]


def test_a_report_written_again_leaves_no_figure_of_the_earlier_one(tmp_path):
    """report_files/ kept the figures of an earlier report that had more (figure_4.png of a cv report, or those a
    report numbered from 2 before), no longer linked from report.md; a report now removes the figure_N.png it did
    not write, and nothing else there."""
    cv = fake_cv(tmp_path / "cv")
    (cv / "report_files").mkdir()
    (cv / "report_files" / "figure_9.png").write_bytes(b"an earlier report's")
    (cv / "report_files" / "notes.png").write_bytes(b"the user's")
    md, _ = write_report(cv, n_boot=20)
    linked = re.findall(r"\]\(report_files/([^)]+)\)", md.read_text())
    assert sorted(p.name for p in (cv / "report_files").iterdir()) == sorted([*linked, "notes.png"])


def _md_tables(text: str) -> list[tuple[list[list[str]], str]]:
    """Each Markdown table of ``text`` as its rows' cells, split at the pipes GFM splits at ('\\|' is a pipe within
    a cell, '\\\\' a backslash), and the line after it."""
    lines = text.splitlines() + [""]
    tables, rows = [], []
    for line in lines:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)((?:\\\\)*)\|", line.strip()[1:-1])  # a pipe after an even run of backslashes
            merged = [cells[0]]
            for run, cell in zip(cells[1::2], cells[2::2], strict=True):
                merged[-1] += run
                merged.append(cell)
            rows.append([re.sub(r"\\(.)", r"\1", c.strip()) for c in merged])
        elif rows:
            tables.append((rows, line))
            rows = []
    return tables


@pytest.mark.parametrize(("name", "shown"), [("a|b", "a|b"), ("a\nb", "a b"), ("a\\|b", "a\\|b")])
def test_class_names_with_pipes_or_newlines_keep_the_markdown_tables_whole(tmp_path, name, shown):
    """A class named 'a|b' (a folder name) went into the split summary's Markdown header as written: its '|' split
    the cell in two, so the header had one column more than its rows; a newline broke the table in two. Cells of
    the Markdown tables escape '|' and '\\' and show a line break as a space; the HTML shows the name as it is."""
    names = (name, "c")
    run = _single_run(tmp_path / "run", "fusion", [])
    with (run / "predictions_test.csv").open("w", newline="") as fh:  # the classes as csv writes them, quoted
        w = csv.writer(fh)
        w.writerow(["path", "group", "true", "predicted", *(f"prob_{n}" for n in names), "boxes"])
        w.writerows([f"/x/{i}.png", f"g{i // 3}", names[i % 2], names[0], 0.6, 0.4, ""] for i in range(12))
    side = {"images": 6, "groups": 2, "shared_groups": 0, "per_class": {n: {"images": 3, "groups": 1} for n in names}}
    (run / "splits.json").write_text(json.dumps({"summary": {"train": side, "test": side}}))
    md, page = write_report(run, n_boot=20)
    tables = _md_tables(md.read_text())
    assert all(len(r) == len(rows[0]) for rows, _ in tables for r in rows) and all(a == "" for _, a in tables)
    split_rows = next(rows for rows, _ in tables if rows[0][0] == "side")
    assert split_rows[0] == ["side", "images", "groups", f"{shown} img/grp", "c img/grp", "shared groups"]
    assert split_rows[2] == ["train", "6", "2", "3/1", "3/1", "0"]
    assert f"<th>{html.escape(name)} img/grp</th>" in page.read_text()


def test_a_mean_over_fewer_folds_than_all_says_how_many(tmp_path):
    """The AUC of a fold of one class is undefined, and the mean ± std over folds averaged the others without a
    word: 'AUC (0.9 ± 0.0)' of 2 folds read as of all 3. summary.json's n is now shown where it is fewer than the
    variant's folds, in the Markdown and the HTML; a metric of every fold is shown as before."""
    folder = fake_cv(tmp_path / "cv", n=24)
    with (folder / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # two patients per fold, of both classes; trial0's images all benign: no AUC there
        r["fold"] = f"trial{int(r['group'][1:]) % 3}"
        r["true"] = "benign" if r["fold"] == "trial0" else r["true"]
    with (folder / "predictions.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md, page = write_report(folder, n_boot=20)
    summary = summarize_predictions(folder / "predictions.csv", n_boot=20)
    assert summary["variants"]["global"]["mean_std"]["auc"]["n"] == 2
    rows = next(rows for rows, _ in _md_tables(md.read_text()) if rows[0][0] == "variant")
    auc = rows[0].index("AUC")
    for row in rows[2:]:
        assert all(("of 3 folds" in c) == (i == auc) for i, c in enumerate(row))
        assert re.search(r"\(\d\.\d{3} ± \d\.\d{3}, 2 of 3 folds\)$", row[auc])
    assert page.read_text().count(", 2 of 3 folds)</td>") == 2


def test_a_single_runs_report_bootstraps_with_the_runs_seed(tmp_path):
    """`report RUN` and evaluate's report drew their intervals with seed 0 whatever the run's seed, where cv's use
    its config's: they now use the seed of the run's config.yaml (0 where it records none)."""
    trues = ["a" if i % 3 else "b" for i in range(40)]
    rows = [[f"/x/{i}.png", f"g{i // 2}", t, "a", *((0.7, 0.3) if (i % 5) else (0.4, 0.6)), ""]
            for i, t in enumerate(trues)]
    run = _single_run(tmp_path / "run", "fusion", rows)
    (run / "config.yaml").write_text("seed: 7\nmodel: {variant: fusion}\n")

    def table(seed: int) -> list[str]:
        return report.ablation_table(summarize_predictions(run / "report_files" / "predictions_oof.csv",
                                                           n_boot=30, seed=seed), folds=False)[1][0]

    md, _ = write_report(run, n_boot=30)
    assert table(7) != table(0)
    assert "| " + " | ".join(table(7)) + " |" in md.read_text()
    md, _ = write_report(run, n_boot=30, predictions=run / "predictions_test.csv", out=run / "other.md")  # evaluate's
    assert "| " + " | ".join(table(7)) + " |" in md.read_text()
    (run / "config.yaml").write_text("model: {variant: fusion}\n")
    md, _ = write_report(run, n_boot=30)
    assert "| " + " | ".join(table(0)) + " |" in md.read_text()


def test_figure_links_of_a_report_whose_name_holds_spaces_or_brackets_resolve(tmp_path):
    """`evaluate --out 'new data (2).json'` names its report 'new data (2)_report.md' and the figures' folder after
    it: report.md linked them as '](new data (2)_report_files/figure_1.png)', a link destination that Markdown ends
    at the space (CommonMark, GFM), so no figure showed. The links are now percent-encoded, and each reads back to
    its file; the alt text, which may hold the data folder's name, escapes its brackets."""
    from urllib.parse import unquote

    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    md, _ = write_report(run, n_boot=20, predictions=run / "predictions_test.csv", split="all",
                         data_root="/d/[x]", out=tmp_path / "new data (2)_report.md")
    text = md.read_text()
    links = re.findall(r"!\[((?:[^\[\]\\]|\\.)*)\]\(([^)\s]*)\)", text)  # CommonMark: no space in a bare destination
    assert len(links) == text.count("![") == 3
    assert all((md.parent / unquote(target)).is_file() for _, target in links)
    assert "all 12 images of '/d/\\[x\\]'" in links[0][0]


def test_the_comparisons_p_value_has_three_decimals_and_a_bound_where_no_resample_crossed_0():
    """p was shown to 2 decimals, so 0.046 and 0.054 both read p=0.05, and a p of 0 (no resample on the other side
    of 0) read p=0.00, a certainty 1000 resamples cannot give: it is below 2 / 1000."""
    def cell(p, **extra):
        d = {"diff": 0.1, "low": 0.05, "high": 0.15, "p_value": p, "ci_note": None, **extra}
        summary = {"n_boot": 1000, "comparisons": [{"variant": "fusion", "reference": "global",
                                                    "metrics": {m: d for m in report.TABLE_METRICS}}]}
        return report.comparison_table(summary)[1][0][1]

    assert cell(0.046).endswith("(p=0.046)") and cell(0.054).endswith("(p=0.054)")
    assert cell(0.0).endswith("(p<0.002)")  # a summary from before n_boot was recorded: the cv's resamples
    assert cell(0.0, n_boot=400).endswith("(p<0.005)")  # the resamples that defined the difference
    assert cell(None).endswith("(p=n/a)")


def test_a_single_runs_report_shows_its_magnifications_when_it_has_two_or_more(tmp_path):
    """`report RUN` filled every row's magnification with '' although predictions_<split>.csv may say it (BreakHis
    names, a manifest's magnification column), so a run over 40X and 100X images never showed the per-magnification
    table that a cv shows. It now does, with each magnification's values (computed as the cv computes them); one
    magnification, none, or a CSV from before the column, gives no table."""
    def run_of(name, mags):
        run = tmp_path / name
        run.mkdir()
        with (run / "predictions_test.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "group", "patient", *(["magnification"] if mags else []), "true", "predicted",
                        "prob_a", "prob_b", "boxes", "model_overrides"])
            for i in range(24):  # the 40X images all right, the 100X ones right when their class is a
                mag = mags[i % len(mags)] if mags else None
                right = mag != "100" or i % 4 < 2
                true = "a" if i % 4 < 2 else "b"
                pa = 0.8 if (true == "a") == right else 0.2
                w.writerow([f"/x/{i}.png", f"g{i // 4}", f"g{i // 4}", *([mag] if mags else []), true,
                            "a" if pa > 0.5 else "b", pa, 1 - pa, "", ""])
        return run

    md, page = write_report(run_of("two", ["40", "100"]), n_boot=20)
    table = next(rows for rows, _ in _md_tables(md.read_text()) if "magnification" in rows[0])
    assert table == [["variant", "magnification", "PRR", "image acc", "bal. acc"], ["---"] * 5,
                     ["model", "40X", "1.000", "1.000", "1.000"], ["model", "100X", "0.500", "0.500", "0.500"]]
    assert "## Per magnification" in md.read_text() and "<td>100X</td>" in page.read_text()
    for name, mags in (("one", ["100"]), ("none", [""]), ("old", None)):
        text = write_report(run_of(name, mags), n_boot=20)[0].read_text()
        assert "## Test metrics" in text and "magnification" not in text.lower(), name


def test_report_predictions_reports_that_file_beside_it_as_evaluate_named_its_report(tmp_path, monkeypatch, capsys):
    """`report RUN` picks its predictions by its own order (test first): evaluate's predictions of other data
    (predictions_all.csv, or M_predictions.csv of evaluate --out M.json) could be reported again only by evaluating
    again. `report RUN --predictions FILE` reports that file (absolute, or relative to the working folder or to
    RUN) with what evaluate recorded beside it, into the report evaluate wrote for it; report.md stays."""
    rows = [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6, 0.4, ""] for i in range(12)]
    run = _single_run(tmp_path / "run", "fusion", rows)
    shutil.copy(run / "predictions_test.csv", run / "predictions_all.csv")
    (run / "metrics_all.json").write_text(json.dumps({"split": "all", "data_root": "/data/other_hospital",
                                                      "split_leak": "3 of the 12 images leak", "model_overrides": {}}))
    monkeypatch.chdir(tmp_path)
    for given in ("predictions_all.csv", "run/predictions_all.csv", str(run / "predictions_all.csv")):
        (run / "report_all.md").unlink(missing_ok=True)
        assert main(["report", str(run), "--predictions", given]) == 0, given
        assert "report_all.md and " in capsys.readouterr().out
        text = (run / "report_all.md").read_text()
        assert "all 12 images of '/data/other_hospital'" in text and "3 of the 12 images leak" in text, given
    assert not (run / "report.md").exists()
    shutil.copy(run / "predictions_test.csv", tmp_path / "y_predictions.csv")  # evaluate --out y.json
    (tmp_path / "y.json").write_text(json.dumps({"split": "val", "model_overrides": {"model.threshold": 0.9}}))
    assert main(["report", str(run), "--predictions", "y_predictions.csv"]) == 0
    text = (tmp_path / "y_report.md").read_text()
    assert "## Validation metrics" in text and "Evaluated with --set model.threshold=0.9" in text
    shutil.copy(run / "predictions_test.csv", run / "predictions_val_last.csv")  # its name says its side
    assert main(["report", str(run), "--predictions", "predictions_val_last.csv"]) == 0
    assert "## Validation metrics" in (run / "report_val_last.md").read_text()
    shutil.copy(run / "predictions_test.csv", run / "new.csv")  # predict --out RUN/new.csv: no side of the run
    assert main(["report", str(run), "--predictions", "new.csv"]) == 0
    text = (run / "new_report.md").read_text()
    assert "all 12 images (not a split of the run)" in text and "test split" not in text
    assert main(["report", str(run)]) == 0  # without it, as before: the run's test side, report.md
    assert "## Test metrics" in (run / "report.md").read_text()
    shutil.copy(run / "predictions_test.csv", run / "predictions.csv")  # predict's default name, in the run
    assert main(["report", str(run), "--predictions", "predictions.csv"]) == 0
    assert "## Test metrics" in (run / "report.md").read_text()  # the run's report stays
    assert "all 12 images (not a split of the run)" in (run / "predictions_report.md").read_text()
    other = _single_run(tmp_path / "other", "global", rows)  # another run's: its report.md would show this run's
    before = (other / "predictions_test.csv").read_bytes()
    capsys.readouterr()
    assert main(["report", str(run), "--predictions", str(other / "predictions_test.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"finescope report {other} --predictions" in err[0] and not (other / "report.md").exists()
    assert (other / "predictions_test.csv").read_bytes() == before


def test_the_report_commands_named_for_predictions_of_another_run_or_a_cv_read_paths_with_spaces(tmp_path):
    """report RUN --predictions of another run's file (or of a cv's out-of-fold table) names the report command to
    run instead, with the folder unquoted: pasted for a folder with a space ('other run'), the shell cut it."""
    import shlex

    rows = [[f"/x/{i}.png", f"g{i}", "a", "a", 0.6, 0.4, ""] for i in range(4)]
    run, other = _single_run(tmp_path / "run", "fusion", rows), _single_run(tmp_path / "other run", "fusion", rows)
    with pytest.raises(FinescopeError) as e:
        report.given_predictions(run, other / "predictions_test.csv")
    assert shlex.split(str(e.value).split("run: ")[-1]) == ["finescope", "report", str(other), "--predictions",
                                                            "predictions_test.csv"]
    (tmp_path / "my cv").mkdir()
    (tmp_path / "my cv" / "predictions.csv").write_text("image,group,true,predicted,prob_a,prob_b,fold,variant\n")
    with pytest.raises(FinescopeError) as e:
        report.given_predictions(run, tmp_path / "my cv" / "predictions.csv")
    assert shlex.split(str(e.value).split("--predictions: ")[-1]) == ["finescope", "report", str(tmp_path / "my cv")]


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "not found"),
    ("metrics_all.json", '{"split": "all"}', "no finescope predictions CSV"),
    ("empty.csv", "", "no finescope predictions CSV"),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "no finescope predictions CSV"),
    ("folder", "dir", "is a folder"),
    ("predictions.csv", "image,group,true,predicted,prob_a,prob_b,fold,variant\nx.png,g,a,a,1,0,f0,global\n",
     "out-of-fold predictions of a cv"),
    ("report_files/predictions_oof.csv", "image,group,true,predicted,prob_a,prob_b,fold,variant\nx.png,g,a,a,1,0,"
     "test,model\n", "the copy of a run's predictions"),
], ids=["missing", "json", "empty", "binary", "folder", "cv", "report copy"])
def test_report_predictions_that_are_missing_or_no_predictions_csv_is_one_line(tmp_path, monkeypatch, capsys,
                                                                                name, content, message):
    run = _single_run(tmp_path / "run", "fusion", [[f"/x/{i}.png", f"g{i // 3}", "a" if i % 2 else "b", "a", 0.6,
                                                     0.4, ""] for i in range(12)])
    if content == "dir":
        (run / name).mkdir()
    elif isinstance(content, bytes):
        (run / name).write_bytes(content)
    elif content is not None:
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run), "--predictions", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and name in err[0], err
    assert "finescope evaluate" in err[0] or "without --predictions" in err[0], err
    assert not (run / "report.md").exists()
