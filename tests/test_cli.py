"""The CLI through main([...]): every verb, and every bad input gives one line on stderr and exit 2."""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from finescope.cli import build_parser, main


def _one_error_line(capsys) -> str:
    """The one error line on stderr; warnings before it are one line each (``finescope: warning: ...``)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("finescope: warning: ")]
    assert len(err) == 1, err
    assert err[0].startswith("finescope: error: ")
    assert "Traceback" not in err[0]
    return err[0]


def _folder(root, classes=("a", "b"), n=3, size=(64, 80)):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size[::-1], (40 * i, 90, 160)).save(root / c / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def cli_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(out), "--quiet", "--set",
                 *tiny_overrides(synthetic_root, "fusion", 1)]) == 0
    return out


def test_models_lists_every_variant(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("global", "global-hires", "attention", "fusion", "fusion-nogate", "mobilenet_v2"):
        assert name in out


@pytest.mark.parametrize("args, unbuffered", [(["models"], "1"), (["models"], ""), (["--version"], "")])
def test_output_read_by_a_closed_pipe_is_no_traceback(args, unbuffered):
    """`finescope data ... | head` (or any reader that stops early): writing to a pipe whose reader has gone printed
    a BrokenPipeError traceback (output unbuffered), or 'Exception ignored ... BrokenPipeError' from Python's flush
    at exit with status 120 (buffered, as a pipe is by default). The command now ends quietly with the status a
    SIGPIPE death reads as (141), as other command-line tools do."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": unbuffered}
    try:
        proc = subprocess.run([sys.executable, "-m", "finescope", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141


def test_the_command_line_starts_without_torch():
    """`finescope` (the console script imports finescope.cli, so the package) imported torch, timm and the explain
    stack before main ran: Ctrl-C in those first seconds printed a traceback of the import (16-70 lines) and ended
    with -SIGINT, instead of the one line of an interrupted command. The package imports its model and explain API
    on first use; the command imports torch inside main, where an interruption is caught."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    code = ("import sys, finescope.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "from finescope import create_model, explain; assert callable(explain) and 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_train_evaluate_predict(cli_run, synthetic_root, tmp_path, capsys):
    assert (cli_run / "metrics.json").is_file()
    assert main(["evaluate", str(cli_run), "--out", str(tmp_path / "m.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["split"] == "test"
    assert (tmp_path / "m_predictions.csv").is_file() and (tmp_path / "m_report.html").is_file()
    assert "## Test metrics" in (tmp_path / "m_report.md").read_text()
    assert "## Training curves" in (tmp_path / "m_report.md").read_text()  # the run's, though written elsewhere
    assert main(["evaluate", str(cli_run), "--split", "val", "--device", "cpu"]) == 0
    text = (cli_run / "report_val.md").read_text()
    assert "## Validation metrics" in text and "## Confusion matrix (the run's validation split)" in text
    assert "report_val_files/" in text and (cli_run / "report_val.html").is_file()
    # --out DIR/metrics.json: its predictions are not named predictions.csv, which marks a cv folder
    assert main(["evaluate", str(cli_run), "--split", "val", "--device", "cpu", "--out",
                 str(tmp_path / "metrics.json")]) == 0
    assert not (tmp_path / "predictions.csv").exists() and (tmp_path / "predictions_val.csv").is_file()
    assert main(["predict", str(cli_run / "checkpoints" / "best.pt"), str(synthetic_root / "images"),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 41
    one = sorted((synthetic_root / "images").iterdir())[3]  # inside the folder too, and linked: one row each
    (tmp_path / "link.png").symlink_to(one)
    assert main(["predict", str(cli_run), str(one), str(synthetic_root / "images"), str(tmp_path / "link.png"),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    with (tmp_path / "p.csv").open() as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert len(paths) == 40 and paths.count(str(one)) == 1
    assert main(["predict", str(cli_run), str(tmp_path / "p.csv")]) == 2  # not an image


def test_file_names_that_are_not_utf8_are_written_and_read_back(cli_run, synthetic_root, tmp_path):
    """A Latin-1 file name (an old archive unpacked on Linux) is a str with a surrogate: predict and evaluate
    stopped on it with a UnicodeEncodeError traceback writing their CSV; they write its bytes, the report reads
    them back, and the paths still name the files."""
    header = (cli_run / "predictions_test.csv").read_text().splitlines()[0].split(",")
    for c in [h.removeprefix("prob_") for h in header if h.startswith("prob_")]:
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.open(synthetic_root / "images" / "typical_0000.png").save(os.fsdecode(os.fsencode(tmp_path / "d" / c)
                                                                                   + b"/caf\xe9.png"))
    assert main(["predict", str(cli_run), str(tmp_path / "d"), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    with (tmp_path / "p.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        assert [os.path.isfile(row["path"]) for row in csv.DictReader(f)] == [True, True]
    assert main(["evaluate", str(cli_run), "--device", "cpu", "--out", str(tmp_path / "m.json"), "--set",
                 "data.source=folder", f"data.root={tmp_path / 'd'}"]) == 0
    assert (tmp_path / "m_predictions.csv").is_file() and (tmp_path / "m_report.html").is_file()


def test_an_evaluate_interrupted_in_its_report_says_its_metrics_are_written_and_the_report_not(cli_run, tmp_path,
                                                                                                capsys, monkeypatch):
    """Ctrl-C while evaluate drew its report (a few seconds of bootstrap and figures, after the metrics and the
    predictions were written) said only 'finescope: interrupted': the new metrics stood beside the report of an
    earlier evaluation (of other --set overrides, other data), which looked complete."""
    out = tmp_path / "m.json"
    assert main(["evaluate", str(cli_run), "--out", str(out), "--device", "cpu"]) == 0  # an earlier report
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("finescope.report.write_report", interrupted)
    assert main(["evaluate", str(cli_run), "--out", str(out), "--device", "cpu"]) == 130
    assert capsys.readouterr().err == (f"finescope: interrupted after its metrics were written ('{out}', "
                                       "m_predictions.csv): its report (m_report.md, .html) is not, and the one there "
                                       "is an earlier evaluation's; rerun the same command to write it\n")
    (tmp_path / "m_report.html").unlink()
    assert main(["evaluate", str(cli_run), "--out", str(out), "--device", "cpu"]) == 130
    assert capsys.readouterr().err.endswith("): its report (m_report.md, .html) is not; rerun the same command to "
                                            "write it\n")


def test_evaluate_on_a_root_under_home_names_the_folder_it_read(cli_run, synthetic_root, tmp_path, monkeypatch,
                                                                capsys):
    """data.root '~/d' (as a YAML file writes it) is read from the home folder; metrics.json and the report named
    '<working folder>/~/d', a folder that does not exist."""
    header = (cli_run / "predictions_test.csv").read_text().splitlines()[0].split(",")
    for c in [h.removeprefix("prob_") for h in header if h.startswith("prob_")]:
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.open(synthetic_root / "images" / "typical_0000.png").save(tmp_path / "d" / c / "x.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["evaluate", str(cli_run), "--device", "cpu", "--out", str(tmp_path / "m.json"), "--set",
                 "data.source=folder", "data.root=~/d"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["data_root"] == str(tmp_path / "d")
    assert f"'{tmp_path / 'd'}'" in (tmp_path / "m_report.md").read_text()


def test_predict_in_a_cv_folder_keeps_its_out_of_fold_predictions(cli_run, synthetic_root, tmp_path, monkeypatch,
                                                                   capsys):
    """predict's default --out, predictions.csv, run inside a cv folder replaced the cv's out-of-fold predictions
    (report then refused the folder): refused, the file kept."""
    (tmp_path / "cv.json").write_text("{}")
    (tmp_path / "predictions.csv").write_text("image,group\n")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(cli_run), str(synthetic_root / "images" / "typical_0000.png"), "--device", "cpu"]) == 2
    assert "is the out-of-fold predictions of the cv folder" in _one_error_line(capsys)
    assert (tmp_path / "predictions.csv").read_text() == "image,group\n"



def test_predict_keeps_a_runs_own_predictions(cli_run, synthetic_root, tmp_path, capsys):
    """predict --out RUN/predictions_test.csv replaced the test predictions that train and evaluate wrote beside
    metrics.json with those of other images (report then refused the run): refused, as a cv's predictions.csv
    is, the file kept."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    before = (run / "predictions_test.csv").read_bytes()
    assert main(["predict", str(run), str(synthetic_root / "images" / "typical_0000.png"), "--device", "cpu",
                 "--out", str(run / "predictions_test.csv")]) == 2
    assert "is the test predictions of the run" in _one_error_line(capsys)
    assert (run / "predictions_test.csv").read_bytes() == before

def test_predict_fills_the_true_class_from_a_class_folder_and_normalises_paths(cli_run, synthetic_root, tmp_path):
    img = synthetic_root / "images" / "typical_0000.png"
    assert main(["predict", str(cli_run), str(img), "--out", str(tmp_path / "one.csv"), "--device", "cpu"]) == 0
    with (tmp_path / "one.csv").open() as f:
        header, row = list(csv.reader(f))
    classes = [c.removeprefix("prob_") for c in header if c.startswith("prob_")]
    assert row[header.index("true")] == "" and row[header.index("group")] == ""  # nothing says them
    (tmp_path / "in" / classes[1]).mkdir(parents=True)
    Image.open(img).save(tmp_path / "in" / classes[1] / "x.png")
    given = str(tmp_path / "in" / ".." / "in")
    assert main(["predict", str(cli_run), given, "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["true"] == classes[1]
    assert rows[0]["path"] == str(tmp_path / "in" / classes[1] / "x.png")  # absolute, without '..'


def test_predict_per_patient_pools_each_patients_images(cli_run, synthetic_root, tmp_path, capsys):
    """A pathologist predicting new cases wants one call per patient, not only per image: --per-patient writes
    OUT_patients.csv, each patient's mean probabilities, their argmax and the majority vote, the patient being the
    group its path says (class/P1/x.png; an image right in a class folder its own, as in training) or else the
    folder its images lie in."""
    import numpy as np

    images = sorted((synthetic_root / "images").glob("*.png"))[:8]
    with (cli_run / "predictions_test.csv").open() as f:
        names = [c.removeprefix("prob_") for c in next(csv.reader(f)) if c.startswith("prob_")]
    layout = {f"new/{names[0]}/P1/a.png": images[0], f"new/{names[0]}/P1/b.png": images[1],
              f"new/{names[1]}/P2/a.png": images[2], "new/P3/a.png": images[3], "new/P3/b.png": images[4],
              "new/P3/c.png": images[5], f"new/{names[1]}/x.png": images[6], f"new/{names[1]}/y.png": images[7]}
    for rel, img in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(img).save(tmp_path / rel)
    out = tmp_path / "p.csv"
    assert main(["predict", str(cli_run), str(tmp_path / "new"), "--out", str(out), "--per-patient",
                 "--device", "cpu"]) == 0
    assert f"per-patient predictions written to {tmp_path / 'p_patients.csv'}" in capsys.readouterr().out
    with out.open() as f:
        images_rows = list(csv.DictReader(f))
    with (tmp_path / "p_patients.csv").open() as f:
        patients = {r["patient"]: r for r in csv.DictReader(f)}
    keys = [r["group"] or (r["path"] if r["true"] else os.path.dirname(r["path"])) for r in images_rows]
    assert list(patients) == list(dict.fromkeys(keys))  # in the order of their first images
    assert {p: r["true"] for p, r in patients.items()} == {"P1": names[0], "P2": names[1],
                                                          str(tmp_path / "new" / "P3"): "",
                                                          **{str(tmp_path / "new" / names[1] / f): names[1]
                                                             for f in ("x.png", "y.png")}}
    for name, row in patients.items():
        mine = [r for r, key in zip(images_rows, keys, strict=True) if key == name]
        probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in mine])
        assert int(row["n_images"]) == len(mine)
        np.testing.assert_allclose([float(row[f"prob_{n}"]) for n in names], probs.mean(0), rtol=1e-6)
        assert row["predicted"] == names[int(probs.mean(0).argmax())]
        votes = np.bincount(probs.argmax(1), minlength=len(names))
        assert row["majority"] in [n for n, v in zip(names, votes, strict=True) if v == votes.max()]
    assert main(["predict", str(cli_run), str(tmp_path / "new"), "--out", str(tmp_path / "q.csv"),
                 "--device", "cpu"]) == 0
    assert not (tmp_path / "q_patients.csv").exists()  # only when asked


def test_predict_to_stdout_keeps_its_status_line_out_of_the_csv(cli_run, synthetic_root):
    """`finescope predict RUN IMG --out /dev/stdout | ...` printed 'predictions written to /dev/stdout' on stdout
    after the CSV: a reader of the pipe got it as a last row. That line now goes to stderr when OUT is stdout."""
    image = sorted((synthetic_root / "images").glob("*.png"))[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "finescope", "predict", str(cli_run), str(image), "--out",
                           "/dev/stdout", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(proc.stdout.splitlines()))
    assert len(rows) == 2 and rows[1][0] == str(image) and len(rows[1]) == len(rows[0])
    assert "predictions written to /dev/stdout" in proc.stderr


def test_predict_per_patient_refuses_an_out_that_is_no_file(cli_run, synthetic_root, tmp_path, capsys):
    """`--out /dev/null --per-patient` (only the patients wanted) or `--out /dev/stdout` put OUT_patients.csv
    'beside' a device: as root predict wrote /dev/null_patients.csv (in /dev, gone at the next boot), as anyone
    else it failed on /dev's permissions after predicting every image. It is refused before predicting."""
    image = sorted((synthetic_root / "images").glob("*.png"))[0]
    for out in ("/dev/null", "/dev/stdout"):  # /dev/stdout: a regular file where pytest captures it, as with '>'
        try:
            assert main(["predict", str(cli_run), str(image), "--out", out, "--per-patient", "--device",
                         "cpu"]) == 2
            line = _one_error_line(capsys)
            assert f"'{out}' is no file" in line and "--out predictions.csv" in line
            assert not os.path.lexists(f"{out}_patients.csv")
        finally:  # what predict wrote there before it refused
            if os.path.isfile(f"{out}_patients.csv") and not os.path.islink(f"{out}_patients.csv"):
                os.remove(f"{out}_patients.csv")
    assert main(["predict", str(cli_run), str(image), "--out", "/dev/null", "--device", "cpu"]) == 0  # one CSV
    if os.access("/dev/shm", os.W_OK):  # a folder of files in /dev: written beside as anywhere
        import shutil
        import tempfile

        shm = tempfile.mkdtemp(dir="/dev/shm")
        try:
            assert main(["predict", str(cli_run), str(image), "--out", f"{shm}/p.csv", "--per-patient", "--device",
                         "cpu"]) == 0
            assert os.path.isfile(f"{shm}/p_patients.csv")
        finally:
            shutil.rmtree(shm)


@pytest.mark.parametrize("pattern, says", [(r"^P\d+_", "has no capture group"), ("(P", "is not a valid regex")])
def test_predict_with_a_wrong_group_pattern_says_which_key(cli_run, synthetic_root, tmp_path, pattern, says,
                                                           capsys):
    """`predict --per-patient --set data.group_pattern=...` groups flat-named new cases (P11_1.png) into patients;
    a pattern without a capture group raised IndexError, one that is no regex re.error, each as a traceback."""
    image = tmp_path / "P11_1.png"
    Image.open(sorted((synthetic_root / "images").glob("*.png"))[0]).save(image)
    assert main(["predict", str(cli_run), str(image), "--out", str(tmp_path / "p.csv"), "--per-patient",
                 "--device", "cpu", "--set", f"data.group_pattern={pattern}"]) == 2
    line = _one_error_line(capsys)
    assert "data.group_pattern" in line and says in line


def test_files_outside_the_data_say_their_class_and_group():
    from finescope.config import DataConfig
    from finescope.data.sources import label_and_group_of

    name = "SOB_M_DC-14-12312-100-005.png"
    assert label_and_group_of(f"/x/{name}", DataConfig(source="breakhis", task="binary"), ["benign", "malignant"]) \
        == (1, "12312")
    subtypes = ["adenosis", "ductal_carcinoma"]
    assert label_and_group_of(name, DataConfig(source="breakhis", task="subtype"), subtypes) == (1, "12312")
    folder = DataConfig(source="folder", group_pattern=r"^H\d+_([^_]+)_")
    assert label_and_group_of("/d/H2/sub/H2_7a_3.jpg", folder, ["H1", "H2"]) == (1, "7a")
    assert label_and_group_of("/d/other/notes.png", folder, ["H1", "H2"]) == (-1, "")
    assert label_and_group_of("/d/H1/patient 7/a.png", DataConfig(source="folder"), ["H1"]) == (0, "patient 7")
    assert label_and_group_of("/d/H1/P7/a.png", DataConfig(source="folder", group_pattern="(P\\d)/"), ["H1"]) \
        == (0, "P7")
    assert label_and_group_of(f"/d/malignant/{name}", DataConfig(source="folder"), ["benign", "malignant"]) \
        == (1, "")


def test_numbered_patient_folders_in_numbered_class_folders_keep_their_class():
    """Classes 0/1 with patients numbered 1, 2, ...: patient folder '1' in class folder '0' is no class folder,
    below the model's data.root (the folder right under it) and elsewhere (a new cohort in the same layout)."""
    from finescope.config import DataConfig
    from finescope.data.sources import label_and_group_of

    classes = ["0", "1"]
    assert label_and_group_of("/d/0/1/a.png", DataConfig(source="folder", root="/d"), classes) == (0, "1")
    assert label_and_group_of("/new/0/1/a.png", DataConfig(source="folder", root="/d"), classes) == (0, "1")
    assert label_and_group_of("/new/1/0/a.png", DataConfig(source="folder", root="/d"), classes) == (1, "0")
    assert label_and_group_of("/1/d/0/7/a.png", DataConfig(source="folder", root="/1/d"), classes) == (0, "7")


def test_a_breakhis_file_outside_the_data_says_its_patient_beside_its_case():
    from finescope.config import DataConfig
    from finescope.data.sources import file_sample

    name = "SOB_B_A-14-22549AB-100-001.png"
    s = file_sample(f"/x/{name}", DataConfig(source="breakhis", task="binary"), ["benign", "malignant"])
    assert (s.label, s.group, s.patient) == (0, "22549", "22549AB")
    s = file_sample(f"/d/benign/{name}", DataConfig(source="folder"), ["benign", "malignant"])
    assert (s.label, s.patient) == (0, s.group)  # another source: the patient is the group


def test_a_breakhis_file_outside_the_data_says_its_magnification():
    """predict's CSV has a magnification column, as train's and evaluate's: a BreakHis model's predict reads it
    from the file name, as training does; other sources leave it unknown."""
    from finescope.config import DataConfig
    from finescope.data.sources import file_sample

    name = "SOB_B_A-14-22549AB-400-001.png"
    assert file_sample(f"/x/{name}", DataConfig(source="breakhis", task="binary"),
                       ["benign", "malignant"]).meta["magnification"] == 400
    assert "magnification" not in file_sample(f"/d/benign/{name}", DataConfig(source="folder"),
                                              ["benign", "malignant"]).meta


def test_a_link_outside_the_class_folders_takes_the_class_of_its_target(tmp_path):
    from finescope.config import DataConfig
    from finescope.data.sources import label_and_group_of

    (tmp_path / "data" / "H2" / "P3").mkdir(parents=True)
    (tmp_path / "data" / "H2" / "P3" / "x.png").write_bytes(b"")
    (tmp_path / "link.png").symlink_to(tmp_path / "data" / "H2" / "P3" / "x.png")
    assert label_and_group_of(tmp_path / "link.png", DataConfig(source="folder"), ["H1", "H2"]) == (1, "P3")


def test_data_command_reports_counts(tmp_path, capsys):
    _folder(tmp_path / "d")
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=folder",
                 f"data.root={tmp_path / 'd'}", "model.local_size=64", "--json", str(tmp_path / "new" / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "a" in out and "b" in out
    assert "groups: a/a_0.png, a/a_1.png, a/a_2.png, b/b_0.png, b/b_1.png, b/b_2.png\n" in out  # named, to check
    assert json.loads((tmp_path / "new" / "d.json").read_text())["n_images"] == 6  # its folder made, as --out's
    # images smaller than the crops are listed, and fail the check as train would
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=folder",
                 f"data.root={tmp_path / 'd'}", "model.local_size=72", "model.global_size=64"]) == 1
    out = capsys.readouterr().out
    assert "smaller than 72 px (model.local_size) on their short side: 6\n  a/a_0.png: 80x64" in out
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=folder",
                 f"data.root={tmp_path / 'd'}", "model.local_size=72", "model.variant=global"]) == 0


def test_data_names_the_csv_manifest_it_read(tmp_path, capsys):
    """With a CSV manifest, data printed 'root: <the CSV's folder>', as if it had read every image under that folder;
    it now names the manifest and the folder its relative paths are read from (the JSON has both)."""
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (80, 64), (i * 40, 10, 10)).save(root / "img" / f"{i}.png")
    (root / "list.csv").write_text("path,label,group\n" + "".join(f"img/{i}.png,{lab},p{i}\n"
                                                                   for i, lab in enumerate("abab")))
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=csv", f"data.root={root / 'list.csv'}",
                 "model.local_size=64", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"manifest: {root / 'list.csv'} (its relative paths are read from {root})"
    written = json.loads((tmp_path / "d.json").read_text())
    assert (written["manifest"], written["root"]) == (str(root / "list.csv"), str(root))
    _folder(tmp_path / "f")  # a folder source: its root, the folder read
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=folder", f"data.root={tmp_path / 'f'}",
                 "model.local_size=64", "--no-read"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"root: {tmp_path / 'f'}"


@pytest.mark.parametrize("where", ["folder", "new/", "notes.txt/d.json"])
def test_data_refuses_a_json_it_cannot_write_before_reading_the_images(tmp_path, capsys, where):
    """data --json DIR (or new/, or notes.txt/d.json with notes.txt a file) read and described every image and
    only then stopped on 'Is a directory' (naming the folder above) or 'File exists'; such a --json is now
    refused first, as predict's and evaluate's --out are."""
    _folder(tmp_path / "d")
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=folder", f"data.root={tmp_path / 'd'}",
                 "--json", f"{tmp_path}/{where}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and (tmp_path / "notes.txt").read_text() == "mine"  # no description: no image read
    assert err.startswith("finescope: error: --json") and len(err.strip().splitlines()) == 1


def _train_args(root, tmp_path, *extra):
    return ["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r"), "--quiet", "--set",
            "data.source=folder", f"data.root={root}", "data.num_workers=0", "model.backbone=tiny",
            "model.global_size=32", "model.local_size=32", "train.epochs=1", "train.device=cpu", *extra]


def test_missing_root(tmp_path, capsys):
    assert main(_train_args(tmp_path / "nowhere", tmp_path)) == 2
    assert "nowhere" in _one_error_line(capsys)


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(_train_args(tmp_path / "empty", tmp_path)) == 2
    assert "no class sub-folders" in _one_error_line(capsys)


def test_one_class_folder_says_where_the_classes_are(tmp_path, capsys):
    _folder(tmp_path / "d" / "dataset")  # root/dataset/<class>/<image>: one folder too high
    assert main(_train_args(tmp_path / "d", tmp_path)) == 2
    line = _one_error_line(capsys)
    assert "holds one class (dataset)" in line and f"set data.root={tmp_path / 'd' / 'dataset'}" in line
    assert not (tmp_path / "r").exists()


def test_a_run_inside_the_folder_data_is_refused_before_it_writes(tmp_path, capsys, monkeypatch):
    """'cd mydata; finescope train' with data.root '.' and the default --out runs/<name>: the run folder would
    become a class 'runs' (the error used to say so, of a folder the user never made); refused, nothing written,
    by train and by cv."""
    root = _folder(tmp_path / "d")
    config = os.path.abspath("configs/demo.yaml")
    monkeypatch.chdir(root)
    args = _train_args(".", tmp_path)
    args[args.index("--config") + 1], args[args.index("--out") + 1] = config, "runs/mine"
    assert main(args) == 2
    assert "--out '" + str(root / "runs" / "mine") + "' lies inside data.root" in _one_error_line(capsys)
    assert main(["cv", "--config", config, "--folds", "2", "--out", "runs/cv", "--quiet", "--set",
                 "data.source=folder", "data.root=."]) == 2
    assert "lies inside data.root" in _one_error_line(capsys)
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]


def test_train_into_a_cv_folder_and_cv_into_a_run_are_refused_before_they_write(tmp_path, capsys):
    """train --out a cv folder wrote its splits.json and report.md over the cv's (its rerun then stopped: not a cv
    splits file), and cv --out a run wrote its splits.json over the run's (evaluate then stopped: the folds of a
    cv run). Each is refused in one line naming the folder; nothing in it changes."""
    root = _folder(tmp_path / "d")
    cv_dir, run_dir = tmp_path / "cv", tmp_path / "run"
    for folder, names in ((cv_dir, ("cv.json", "splits.json", "report.md")),
                          (run_dir, ("config.yaml", "splits.json", "history.jsonl", "checkpoints/last.pt"))):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"the {name} of {folder.name}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    args = _train_args(root, tmp_path)
    args[args.index("--out") + 1] = str(cv_dir)
    assert main(args) == 2
    assert f"--out '{cv_dir}' is a cv folder (it holds cv.json)" in _one_error_line(capsys)
    assert main(["cv", "--config", "configs/demo.yaml", "--folds", "2", "--out", str(run_dir), "--quiet", "--set",
                 "data.source=folder", f"data.root={root}"]) == 2
    assert f"--out '{run_dir}' holds a training run" in _one_error_line(capsys)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_data_prints_a_file_name_that_is_not_utf8_under_a_strict_utf8_terminal(tmp_path, monkeypatch):
    """Under a UTF-8 locale (en_US.UTF-8) stdout refuses surrogates: 'finescope data' on a patient folder with a
    Latin-1 name ended in a UnicodeEncodeError traceback at its print; the name is printed escaped instead."""
    import io

    for c in ("a", "b"):
        _folder(tmp_path / "d" / c, classes=(os.fsdecode(b"Jos\xe9"), "Ana"))  # root/<class>/<patient>/<image>
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdout", out)
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=folder",
                 f"data.root={tmp_path / 'd'}", "model.local_size=64"]) == 0
    out.flush()
    assert "groups: Ana, Jos\\udce9" in out.buffer.getvalue().decode()


def test_data_says_that_train_would_stop_at_one_class(tmp_path, capsys):
    _folder(tmp_path / "d" / "dataset")  # one folder too high: one class, 'dataset'
    assert main(["data", "--config", "configs/demo.yaml", "--no-read", "--set", "data.source=folder",
                 f"data.root={tmp_path / 'd'}"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("train would stop here:") and f"set data.root={tmp_path / 'd' / 'dataset'}" in last


def test_class_without_images(tmp_path, capsys):
    root = _folder(tmp_path / "d")
    (root / "c").mkdir()
    assert main(_train_args(root, tmp_path)) == 2
    assert "'c'" in _one_error_line(capsys)


def test_truncated_image_named_then_skipped(tmp_path, capsys):
    root = _folder(tmp_path / "d", n=4)
    data = (root / "a" / "a_1.png").read_bytes()
    (root / "a" / "a_1.png").write_bytes(data[: len(data) // 2])
    assert main(_train_args(root, tmp_path, "data.test_fraction=0.25", "data.val_fraction=0")) == 2
    assert "a_1.png" in _one_error_line(capsys)
    assert main(_train_args(root, tmp_path, "data.on_error=skip", "data.test_fraction=0.25",
                            "data.val_fraction=0", "--out", str(tmp_path / "r2"))) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "a_1.png" in line]
    # named once, as one line (not hidden with torch's own warnings, no source line), without the advice to skip
    assert len(warned) == 1 and warned[0].startswith("finescope: warning: skipped: cannot read image '")
    assert "data.on_error=skip" not in warned[0]
    test = json.loads((tmp_path / "r2" / "splits.json").read_text())["splits"]["test"]
    broken = root / test[0]
    broken.write_bytes(broken.read_bytes()[:100])  # a test image broken after training
    assert main(["evaluate", str(tmp_path / "r2"), "--device", "cpu", "--out", str(tmp_path / "m.json")]) == 0
    assert f"(n={len(test) - 1}, 1 skipped (unreadable or too small))" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["skipped"] == [str(broken)] and metrics["n_images"] == len(test) - 1  # in the split, not metrics


def test_image_smaller_than_crop(tmp_path, capsys):
    root = _folder(tmp_path / "d", size=(40, 40))
    assert main(_train_args(root, tmp_path, "model.local_size=64")) == 2
    line = _one_error_line(capsys)
    assert "40" in line and "local_size" in line


@pytest.mark.parametrize("key, value", [("model.backbone", "resnet1000"), ("model.variant", "fusionx")])
def test_unknown_backbone_or_variant(tmp_path, capsys, key, value):
    root = _folder(tmp_path / "d")
    assert main(_train_args(root, tmp_path, f"{key}={value}")) == 2
    assert value in _one_error_line(capsys)


def test_weights_that_do_not_fit(tmp_path, capsys):
    root = _folder(tmp_path / "d")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "w.pth")
    assert main(_train_args(root, tmp_path, "model.backbone=resnet18", f"model.weights={tmp_path / 'w.pth'}")) == 2
    assert "does not fit backbone 'resnet18'" in _one_error_line(capsys)


def test_train_fine_tunes_from_a_run_of_other_classes(cli_run, tmp_path, capsys, monkeypatch):
    """model.weights=RUN starts the new run's backbone from the run's trained one (it was refused as 'a finescope
    checkpoint'), for another class count; the heads are new. A resume reads last.pt, not the earlier run."""
    import copy
    import shutil

    from finescope import trainer
    from finescope.checkpoint import load_checkpoint

    (tmp_path / "src" / "checkpoints").mkdir(parents=True)
    shutil.copy(cli_run / "checkpoints" / "best.pt", tmp_path / "src" / "checkpoints" / "best.pt")
    built, build = [], trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a: built.append(copy.deepcopy(m := build(*a))) or m)
    root = _folder(tmp_path / "d", classes=("x", "y", "z"), n=4)
    assert main(_train_args(root, tmp_path, f"model.weights={tmp_path / 'src'}")) == 0
    trained, start = load_checkpoint(cli_run)["model"], built[0].state_dict()  # step 0 of the new run
    keys = [k for k in trained if k.startswith("backbone.")]
    assert keys and all(torch.equal(start[k], trained[k]) for k in keys)
    assert load_checkpoint(tmp_path / "r")["class_names"] == ["x", "y", "z"]
    shutil.rmtree(tmp_path / "src")  # moved, or on another machine
    assert main(_train_args(root, tmp_path, f"model.weights={tmp_path / 'src'}", "train.epochs=2") + ["--resume"]) == 0


def test_fine_tuning_from_a_run_of_another_backbone_or_a_damaged_one(cli_run, tmp_path, capsys):
    root = _folder(tmp_path / "d")
    assert main(_train_args(root, tmp_path, "model.backbone=mobilenet_v2", f"model.weights={cli_run}")) == 2
    line = _one_error_line(capsys)
    assert "backbone 'tiny'" in line and "'mobilenet_v2'" in line
    (tmp_path / "cut.pt").write_bytes((cli_run / "checkpoints" / "best.pt").read_bytes()[:5000])
    assert main(_train_args(root, tmp_path, f"model.weights={tmp_path / 'cut.pt'}")) == 2
    assert "cut.pt' could not be read" in (line := _one_error_line(capsys)) and "damaged" in line


def test_fine_tuning_on_patients_the_earlier_run_trained_on_says_so(tmp_path, capsys):
    """A run fine-tuned from an earlier one on the same data with a split drawn anew (the README's binary ->
    subtype example) tested on patients the backbone had trained on, without a word; reusing the earlier run's
    split (data.splits, as the warning says) leaves none of them on the test side."""
    root = _folder(tmp_path / "d", n=6)
    first = ["--out", str(tmp_path / "a")]
    assert main(_train_args(root, tmp_path)[:3] + first + _train_args(root, tmp_path)[5:]) == 0
    capsys.readouterr()
    assert main(_train_args(root, tmp_path, f"model.weights={tmp_path / 'a'}", "seed=1")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "its backbone has seen them" in line]
    assert len(warned) == 1 and f"data.splits={tmp_path / 'a' / 'splits.json'}" in warned[0]
    reused = ["--out", str(tmp_path / "b")]
    assert main(_train_args(root, tmp_path)[:3] + reused + _train_args(
        root, tmp_path, f"model.weights={tmp_path / 'a'}", f"data.splits={tmp_path / 'a' / 'splits.json'}")[5:]) == 0
    assert "its backbone has seen them" not in capsys.readouterr().err
    given = ["--out", str(tmp_path / "c")]  # a split given that tests them (a cv's fold): not data.splits advice
    assert main(_train_args(root, tmp_path)[:3] + given + _train_args(
        root, tmp_path, f"model.weights={tmp_path / 'a'}", f"data.splits={tmp_path / 'r' / 'splits.json'}")[5:]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "its backbone has seen them" in line]
    assert len(warned) == 1 and "the split given (data.splits, a cv's fold) tests them" in warned[0]


def test_checkpoint_from_other_class_list(cli_run, tmp_path, capsys):
    root = _folder(tmp_path / "d", classes=("cats", "dogs"))
    assert main(["evaluate", str(cli_run), "--device", "cpu", "--set", "data.source=folder", f"data.root={root}"]) == 2
    assert "cats" in _one_error_line(capsys)


@pytest.mark.parametrize("given", ["a/a_0.png", "config.yaml", "metrics.json"])
def test_an_image_or_a_runs_file_given_as_the_checkpoint_is_named_so_not_damaged(tmp_path, capsys, given):
    # predict IMAGE RUN (the arguments swapped) or evaluate RUN/config.yaml said the checkpoint 'could not be read
    # ... or damaged (a copy cut short?)' and to copy it again or train anew (found in review)
    root = _folder(tmp_path / "d")
    (root / "config.yaml").write_text("name: x\n")
    (root / "metrics.json").write_text("{}")
    for command in (["predict", str(root / given), str(root)], ["evaluate", str(root / given)]):
        assert main(command) == 2
        line = _one_error_line(capsys)
        assert "damaged" not in line and "not a checkpoint" in line and "a run directory or a .pt" in line


def test_pretrained_offline_says_to_pass_weights(tmp_path, capsys, monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(*args, **kwargs):  # what torch.hub raises without a network (URLError is an OSError)
        raise OSError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    root = _folder(tmp_path / "d")
    assert main(_train_args(root, tmp_path, "model.backbone=mobilenet_v2", "model.pretrained=true")) == 2
    assert "model.weights" in _one_error_line(capsys)


def test_demo_quick(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "attention_overlay.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert set(results) == {"global", "fusion"}
    assert not any(m["resumed"] for m in results.values())
    monkeypatch.chdir(tmp_path)  # the same folder spelled relative: fusion's data.splits named global's absolute
    assert main(["demo", "--quick", "--quiet", "--out", "demo"]) == 0, capsys.readouterr().err
    assert all(m["resumed"] for m in json.loads((tmp_path / "demo" / "demo_results.json").read_text()).values())


@pytest.mark.parametrize("quick", [True, False])
def test_a_demo_folder_of_the_other_quick_says_to_rerun_it_as_it_was(tmp_path, capsys, quick):
    """finescope demo after demo --quick in the same --out (both default to runs/demo) was refused with
    '--resume: ... resume with the run's own settings (its config.yaml)': no --resume nor config to give. The line
    now says which demo the folder holds and what to do; nothing is written."""
    from finescope.config import override, save_config
    from finescope.demo import demo_config

    out = tmp_path / "demo"
    (out / "global" / "checkpoints").mkdir(parents=True)
    save_config(override(demo_config(out, quick=not quick), model={"variant": "global"}),
                out / "global" / "config.yaml")
    (out / "global" / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    before = sorted(out.rglob("*"))
    assert main(["demo", "--quiet", "--out", str(out)] + (["--quick"] if quick else [])) == 2
    was, now = ("with", "without") if not quick else ("without", "with")
    assert _one_error_line(capsys) == (f"finescope: error: '{out}' holds a demo run {was} --quick ('{out / 'global'}'"
                                       f"); rerun {was} --quick to continue it, or give another --out (or delete "
                                       f"'{out}') to run the demo {now} it")
    assert sorted(out.rglob("*")) == before


def test_a_demo_another_process_runs_says_to_rerun_it(tmp_path, capsys):
    """A second demo into a folder whose run another demo trains was refused with train's advice, 'then
    --resume', an option the demo does not have: it continues its runs when the same command is run again."""
    import fcntl

    run = tmp_path / "demo" / "global"
    run.mkdir(parents=True)
    with open(run / ".lock", "w") as held:  # the other demo, training global
        held.write("pid 123 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")]) == 2
    assert _one_error_line(capsys) == (f"finescope: error: '{run}' is being trained by another process (pid 123 on "
                                       "elsewhere); wait for it to end or stop it, then rerun the same command, or "
                                       "choose another --out")


def test_demo_table_says_which_seconds_are_after_a_resume():
    from finescope.demo import format_table

    row = {"image_accuracy": 0.9, "balanced_accuracy": 0.9, "auc": 0.95, "n_images": 10, "train_seconds": 3.0}
    fresh = format_table({"global": {**row, "resumed": False}, "fusion": {**row, "resumed": False}})
    assert "resumed" not in fresh
    table = format_table({"global": {**row, "resumed": False}, "fusion": {**row, "resumed": True}})
    assert [line.endswith("(resumed)") for line in table.splitlines()[2:4]] == [False, True]
    assert "seconds after the resume only" in table


@pytest.mark.parametrize("args, names", [
    (["--set", "data.group_pattern=[a-z]+_([0-9]+)"], None),  # a regex is taken as written, not parsed as YAML
    (["--set", "train.epochs=.inf"], "train.epochs"),
    (["--set", "train.epochs=1/0"], "train.epochs"),
    (["--set", "train.epochs=true"], "train.epochs"),
    (["--set", "seed=-1"], "seed"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.lr=.nan"], "train.lr"),
    (["--set", "train.label_smoothing=2"], "train.label_smoothing"),
    (["--set", "model.dropout=1.5"], "model.dropout"),
    (["--set", "data.num_workers=-1"], "data.num_workers"),
    (["--set", "model.global_size=100000"], "model.global_size"),
    (["--set", "train.device=mps"], "train.device"),
    (["--set", "train.channels_last=5"], "train.channels_last"),
    (["--set", "model.attn_dim=0"], "model.attn_dim"),
])
def test_bad_set_values_are_one_line_naming_the_key(tmp_path, capsys, args, names):
    root = _folder(tmp_path / "imgs")
    code = main(["data", "--config", "configs/demo.yaml", "--no-read", "--set", "data.source=folder",
                 f"data.root={root}", *args])
    if names is None:
        assert code == 0
        return
    assert code == 2
    assert names in _one_error_line(capsys)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"1: 2\n", b"model: {1: 2}\n"])
def test_bad_config_files_are_one_line(tmp_path, capsys, content):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    for verb in (["data", "--config", str(cfg)], ["cv", "--config", str(cfg), "--out", str(tmp_path / "cv")]):
        assert main(verb) == 2
        _one_error_line(capsys)


@pytest.mark.parametrize("text", ["protocol: [1, 2]\n", "protocol: {folds: abc}\n", "profiles: {quick: 5}\n"])
def test_bad_cv_protocols_are_one_line(tmp_path, capsys, text):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(text)
    assert main(["cv", "--config", str(cfg), "--profile", "quick" if "profiles" in text else "",
                 "--out", str(tmp_path / "cv")]) == 2
    _one_error_line(capsys)


def test_cv_refuses_zero_folds(tmp_path, capsys):
    assert main(["cv", "--config", "configs/demo.yaml", "--folds", "0", "--out", str(tmp_path / "cv")]) == 2
    assert "--folds" in _one_error_line(capsys)
    assert main(["cv", "--config", "configs/demo.yaml", "--folds", "3", "--trials", "2", "--out",
                 str(tmp_path / "cv")]) == 2
    assert "give one of them" in _one_error_line(capsys) and not (tmp_path / "cv").exists()


def test_synthetic_source_never_writes_into_someone_elses_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.csv").write_text("path,label\nx.png,a\n")
    assert main(["data", "--config", "configs/demo.yaml", "--no-read", "--set", f"data.root={mine}"]) == 2
    assert "data.source" in _one_error_line(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.csv"]
    assert (mine / "manifest.csv").read_text() == "path,label\nx.png,a\n"


def test_out_paths_that_cannot_be_written_or_would_replace_the_model(cli_run, synthetic_root, tmp_path, capsys):
    best = cli_run / "checkpoints" / "best.pt"
    before = best.read_bytes()
    img = str(synthetic_root / "images" / "typical_0000.png")
    assert main(["predict", str(cli_run), img, "--out", str(best), "--device", "cpu"]) == 2
    assert "checkpoint" in _one_error_line(capsys)
    assert main(["evaluate", str(best), "--out", str(best), "--device", "cpu"]) == 2
    _one_error_line(capsys)
    assert best.read_bytes() == before
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert main(["predict", str(cli_run), img, "--out", str(a_file / "p.csv"), "--device", "cpu"]) == 2
    assert "f.txt" in _one_error_line(capsys)


def test_evaluate_with_changed_architecture_names_the_override(cli_run, capsys):
    assert main(["evaluate", str(cli_run), "--device", "cpu", "--set", "model.proj_dim=8"]) == 2
    assert "model.proj_dim" in _one_error_line(capsys)


def test_evaluate_out_of_a_csv_is_refused_before_the_model_runs(cli_run, tmp_path, capsys):
    """evaluate --out results.csv wrote the metrics JSON under that name, its predictions beside it as
    results_predictions.csv: a user asking for the predictions in results.csv got JSON there. Refused, naming
    where each goes and the .json to give; nothing is written."""
    out = tmp_path / "results.csv"
    assert main(["evaluate", str(cli_run), "--device", "cpu", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "names the metrics JSON" in line and "results_predictions.csv" in line and "results.json" in line
    assert not list(tmp_path.iterdir())


def test_evaluate_refuses_an_out_that_is_no_file(cli_run, capsys):
    """`evaluate RUN --out /dev/null` (the console line wanted, no files) wrote its predictions and report 'beside'
    the device: as root /dev/null_predictions.csv, /dev/null_report.md, ... (in /dev, gone at the next boot), as
    anyone else it failed on /dev's permissions after evaluating. It is refused before the model runs."""
    made = ["/dev/null_predictions.csv", "/dev/null_report.md", "/dev/null_report.html"]
    try:
        assert main(["evaluate", str(cli_run), "--device", "cpu", "--out", "/dev/null"]) == 2
        line = _one_error_line(capsys)
        assert "'/dev/null' is no file" in line and "--out metrics.json" in line
        assert not any(os.path.lexists(path) for path in made)
    finally:  # what evaluate wrote there before it refused
        for path in made:
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
        shutil.rmtree("/dev/null_report_files", ignore_errors=True)


def test_predict_skips_small_images_by_name_and_fails_when_none_is_read(cli_run, synthetic_root, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (128, 4)).save(folder / "thin.png")
    assert main(["predict", str(cli_run), str(folder), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("finescope: warning: skipped: image '") and "thin.png" in err[0]
    assert "global_size" not in err[0] and "data.on_error" not in err[0]  # nothing to change in a trained model
    assert err[1].startswith("finescope: error: ") and "none of the 1 images" in err[1]
    assert "smaller than the model's crops" in err[1]  # read, but too small: not 'could not be read'
    Image.open(synthetic_root / "images" / "typical_0000.png").save(folder / "ok.png")
    assert main(["predict", str(cli_run), str(folder), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "thin.png" in line][0].startswith("finescope: warning: skipped: image '")
    # the closing count is a warning as the others are (it went through logging, with no prefix)
    assert err[-1].startswith("finescope: warning: skipped 1 of 2 files"), err
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 2


def test_predict_reads_each_image_once_without_the_runs_cache(cli_run, synthetic_root, tmp_path):
    cache = tmp_path / "cache"  # as a run trained with data.cache=disk would have it
    assert main(["predict", str(cli_run), str(synthetic_root / "images"), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--set", "data.cache=disk", f"data.cache_dir={cache}"]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 41 and not list(cache.rglob("*.npy"))


def test_predict_and_evaluate_refuse_an_out_that_names_an_image_or_the_model(cli_run, synthetic_root, tmp_path,
                                                                            capsys):
    img = tmp_path / "slide.PNG"
    img.write_bytes((synthetic_root / "images" / "typical_0000.png").read_bytes())
    before = img.read_bytes()
    assert main(["predict", str(cli_run), str(img), "--out", str(img), "--device", "cpu"]) == 2
    assert "is an image name" in _one_error_line(capsys) and img.read_bytes() == before
    assert main(["evaluate", str(cli_run), "--out", str(tmp_path / "m.tif"), "--device", "cpu"]) == 2
    assert "is an image name" in _one_error_line(capsys) and not (tmp_path / "m.tif").exists()
    best = cli_run / "checkpoints" / "best.pt"
    assert main(["predict", str(cli_run), str(img), "--out", str(best), "--device", "cpu"]) == 2
    assert "checkpoint name" in _one_error_line(capsys)


def test_predict_and_evaluate_refuse_an_out_that_is_a_folder_before_any_work(cli_run, synthetic_root, tmp_path,
                                                                              capsys):
    """evaluate --out DIR predicted the whole split, wrote DIR_predictions.csv beside the folder, then stopped at
    writing the metrics into the folder ("Is a directory"): the work was lost and a stray file left."""
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["evaluate", str(cli_run), "--out", str(folder), "--device", "cpu"]) == 2
    assert "is a folder" in _one_error_line(capsys) and not (tmp_path / "results_predictions.csv").exists()
    assert main(["predict", str(cli_run), str(synthetic_root / "images"), "--out", str(folder), "--device", "cpu"]) == 2
    assert "is a folder" in _one_error_line(capsys)


def test_predict_and_evaluate_refuse_an_out_named_as_a_folder_not_there_yet(cli_run, synthetic_root, tmp_path,
                                                                            capsys):
    """predict --out new/ (a folder to be made) wrote the predictions into a file named 'new', evaluate --out new/
    its metrics into 'new' and its predictions into 'new_predictions.csv', all without a word."""
    img = str(synthetic_root / "images" / "typical_0000.png")
    assert main(["predict", str(cli_run), img, "--out", f"{tmp_path / 'new'}/", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "names a folder" in line and f"--out {tmp_path / 'new' / 'results.csv'}" in line
    assert main(["evaluate", str(cli_run), "--out", f"{tmp_path / 'new'}/", "--device", "cpu"]) == 2
    assert "names a folder" in _one_error_line(capsys) and list(tmp_path.iterdir()) == []


def test_predict_and_evaluate_refuse_an_out_inside_a_file_before_any_work(cli_run, synthetic_root, tmp_path, capsys,
                                                                          monkeypatch):
    """predict --out notes.txt/p.csv (a file where its folder would be) predicted every image, then stopped on
    'File exists: notes.txt', the work lost; evaluate too."""
    from finescope import trainer

    (tmp_path / "notes.txt").write_text("the user's")
    monkeypatch.setattr(trainer, "load_trained", lambda *a, **k: pytest.fail("worked before refusing"))
    for args in (["predict", str(cli_run), str(synthetic_root / "images")], ["evaluate", str(cli_run)]):
        assert main([*args, "--out", str(tmp_path / "notes.txt" / "sub" / "p.csv"), "--device", "cpu"]) == 2
        assert f"'{tmp_path / 'notes.txt'}' is a file, not a folder" in _one_error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "the user's"


def test_explain_option_ranges(cli_run, synthetic_root, tmp_path, capsys):
    img = str(synthetic_root / "images" / "typical_0000.png")
    for bad in (["--limit", "-5"], ["--percentile", "200"], ["--tolerance", "-1"], ["--steps", "1"]):
        assert main(["explain", str(cli_run), img, "--out", str(tmp_path / "e"), *bad]) == 2
        assert bad[0] in _one_error_line(capsys)


def test_explain_refuses_a_tolerance_that_is_no_distance(cli_run, synthetic_root, tmp_path, capsys):
    """--tolerance nan and inf passed the check (>= 0 only refused negatives): the pointing game then scored every
    map 0 (nan) or 1 (inf), whatever it pointed at, with nothing said."""
    img = str(synthetic_root / "images" / "typical_0000.png")
    for bad in ("nan", "inf"):
        assert main(["explain", str(cli_run), img, "--out", str(tmp_path / "e"), "--tolerance", bad]) == 2
        assert f"--tolerance must be >= 0 pixels, got {bad}" in _one_error_line(capsys)
    assert not (tmp_path / "e").exists()


def test_a_timm_model_without_a_feature_map_is_refused_up_front(tmp_path, capsys):
    pytest.importorskip("timm")
    root = _folder(tmp_path / "imgs")
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r"), "--quiet", "--set",
                 "data.source=folder", f"data.root={root}", "model.backbone=vit_tiny_patch16_224",
                 "data.num_workers=0"]) == 2
    assert "feature map" in _one_error_line(capsys)


def test_one_class_is_named_with_its_root(tmp_path, capsys):
    root = _folder(tmp_path / "one", classes=("a",))
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r"), "--quiet", "--set",
                 "data.source=folder", f"data.root={root}", "data.num_workers=0"]) == 2
    assert str(root) in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_csv_split_column_without_training_images_names_the_column(tmp_path, capsys):
    rows = ["path,label,group,split"]
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},g{i},test")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r"), "--quiet", "--set",
                 "data.source=csv", f"data.root={tmp_path / 'm.csv'}", "data.num_workers=0"]) == 2
    assert "split column" in _one_error_line(capsys)


def test_a_run_being_trained_is_not_trained_again_meanwhile(tmp_path, capsys):
    import fcntl

    root = _folder(tmp_path / "d")
    (tmp_path / "r").mkdir()
    with open(tmp_path / "r" / ".lock", "w") as held:  # another process training it
        held.write("pid 123 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(_train_args(root, tmp_path)) == 2
        assert "is being trained by another process (pid 123 on elsewhere); wait" in _one_error_line(capsys)
        assert not (tmp_path / "r" / "config.yaml").exists()
    assert main(_train_args(root, tmp_path)) == 0  # released when that process ends
    assert (tmp_path / "r" / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert main(_train_args(root, tmp_path, "train.epochs=2") + ["--resume"]) == 0  # this one let it go
    with open(tmp_path / "r" / ".lock") as held:  # held while the run has checkpoints: the holder is named
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(_train_args(root, tmp_path)) == 2
        assert "is being trained by another process (pid" in _one_error_line(capsys)


def test_a_run_that_fails_before_writing_leaves_no_folder_and_no_lock_still_trains(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    assert main(_train_args(tmp_path / "nowhere", tmp_path)) == 2
    assert "nowhere" in _one_error_line(capsys) and not (tmp_path / "r").exists()
    assert main(_train_args(tmp_path / "nowhere", tmp_path, "--out", str(tmp_path / "new" / "deep" / "r"))) == 2
    assert not (tmp_path / "new").exists()  # the folders it made, when left empty
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert main(_train_args(tmp_path / "nowhere", tmp_path, "--out", str(tmp_path / "mine"))) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]  # a user's folder as it was
    capsys.readouterr()

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a file system without flock
    assert main(_train_args(_folder(tmp_path / "d"), tmp_path)) == 0
    assert "finescope: warning: cannot lock" in capsys.readouterr().err


def test_a_run_split_under_another_grouping_is_still_evaluated_and_resumed(tmp_path, capsys):
    """A run whose split puts one patient on two sides under today's grouping (trained when finescope grouped
    the data otherwise) is evaluated and resumed with a warning, and its report says so; a new run refuses it."""
    root = tmp_path / "d"
    for c in ("a", "b"):
        for p in range(4):
            for i in range(2):
                (root / c / f"P{c}{p}").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (80, 64), (40 * i + 10 * p, 90, 160)).save(root / c / f"P{c}{p}" / f"{i}.png")
    run = tmp_path / "r"
    assert main(_train_args(root, tmp_path, "data.test_fraction=0.25", "data.val_fraction=0")) == 0
    splits_file = run / "splits.json"
    raw = json.loads(splits_file.read_text())
    moved = next(p for p in raw["splits"]["train"] if p.endswith("/0.png"))
    raw["splits"]["train"].remove(moved)  # one image of a training patient on the test side, as an image-level
    raw["splits"]["test"].append(moved)  # split drawn before patients were sub-folders would put it
    splits_file.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert "is on both 'train' and 'test' as finescope groups this data now" in capsys.readouterr().err
    assert "Warning: split leak: group" in (run / "report.md").read_text()
    assert main(["report", str(run)]) == 0  # a report made again keeps it (from metrics_test.json)
    assert "Warning: split leak: group" in (run / "report.md").read_text()
    (run / "checkpoints" / ".last.pt.99999.tmp").write_bytes(b"half a checkpoint")  # a killed save's leftover
    assert main(_train_args(root, tmp_path, "data.test_fraction=0.25", "data.val_fraction=0", "train.epochs=2")
                + ["--resume"]) == 0
    assert "its metrics are not patient-level" in capsys.readouterr().err
    assert "split leak" in json.loads((run / "metrics.json").read_text())["split_leak"]
    assert not list((run / "checkpoints").glob(".*.tmp"))  # cleaned once the resumed run held the lock
    assert main(_train_args(root, tmp_path, f"data.splits={splits_file}", "--out", str(tmp_path / "new"))) == 2
    assert "split leak" in _one_error_line(capsys)


def test_a_report_made_before_more_training_is_made_again_when_it_ends(tmp_path):
    """A finished run resumed to train on wrote new test predictions and metrics.json, and left the report.md
    that evaluate or report had written of the earlier best.pt (its metrics, one epoch of curves)."""
    from finescope.report import write_report

    root = _folder(tmp_path / "d", n=4)
    split = ["data.test_fraction=0.25", "data.val_fraction=0"]
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    assert main(["report", str(run)]) == 0
    before = (run / "report.html").read_text()
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    _, again = write_report(run, out=tmp_path / "again.md")  # what report RUN writes now
    assert (run / "report.html").read_text() == again.read_text() != before


def test_evaluations_of_an_earlier_best_pt_are_named_when_training_on_ends(tmp_path, capsys):
    """A finished run resumed to train on left the metrics_<split>.json, predictions and report that evaluate had
    made of the earlier best.pt, with nothing to tell them from the new run's files."""
    root = _folder(tmp_path / "d", n=4)
    split = ["data.test_fraction=0.25", "data.val_fraction=0"]
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    assert main(["evaluate", str(run), "--split", "train", "--device", "cpu"]) == 0
    assert main(["evaluate", str(run), "--split", "all", "--device", "cpu"]) == 0
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0  # metrics_test.json: made again by the run itself
    assert main(["explain", str(run), "--split", "test", "--no-faithfulness", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "earlier best.pt" in line]
    assert len(warned) == 1 and warned[0].startswith("finescope: warning: explain_test/, metrics_all.json, "
                                                     "metrics_train.json in")
    assert f"finescope explain {run} --split test --no-faithfulness;" in warned[0]
    assert f"finescope evaluate {run} --split all --set data.root={root};" in warned[0]
    assert warned[0].endswith(f"finescope evaluate {run} --split train")
    assert main(["evaluate", str(run), "--split", "train", "--device", "cpu"]) == 0  # made again: no longer named
    assert main(["evaluate", str(run), "--split", "all", "--device", "cpu"]) == 0
    assert main(["explain", str(run), "--split", "test", "--no-faithfulness", "--device", "cpu"]) == 0
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0  # nothing to train
    assert "earlier best.pt" not in capsys.readouterr().err


def test_an_explanation_of_other_data_made_before_training_on_is_named_with_its_data(tmp_path, capsys):
    """explain RUN --split all (or a side of other data) --set data.root=OTHER writes RUN/explain_all/; once the run
    trained on, its warning said 'finescope explain RUN --split all' makes it again, which explains the run's own
    data there instead, where evaluate's line for metrics_all.json names the data.root (--set data.root=OTHER):
    faithfulness.json records the data_root explained, as metrics_<split>.json does, and the line names it."""
    root = _folder(tmp_path / "d", n=4)
    other = _folder(tmp_path / "other", n=2)
    split = ["data.test_fraction=0.25", "data.val_fraction=0"]
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    assert main(["explain", str(run), "--split", "all", "--set", f"data.root={other}", "--no-faithfulness",
                 "--device", "cpu", "--quiet"]) == 0
    assert json.loads((run / "explain_all_other" / "faithfulness.json").read_text())["data_root"] == str(other)
    capsys.readouterr()
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "earlier best.pt" in line]
    assert len(warned) == 1 and warned[0].endswith(f"finescope explain {run} --split all --no-faithfulness --set data.root={other}")


def test_the_commands_that_make_evaluations_of_other_data_again_read_it_as_they_did(tmp_path, capsys):
    """evaluate and explain RUN --split all of a CSV manifest (--set data.source=csv data.root=X.csv
    data.magnifications=[100]) were named, once the run trained on, with '--set data.root=X.csv' alone: the run's
    folder source then read the manifest as a folder and failed. The settings that read the data are recorded
    (data_overrides) and named, so that the command pasted makes the same evaluation of the new best.pt."""
    root = _folder(tmp_path / "d", n=4)
    other = _folder(tmp_path / "other", n=3)
    manifest = other / "other list.csv"
    manifest.write_text("path,label,group,magnification\n" + "".join(
        f"{c}/{c}_{i}.png,{c},p{i},{100 if i else 40}\n" for c in "ab" for i in range(3)))
    data = ["--set", "data.source=csv", f"data.root={manifest}", "data.magnifications=[100]"]
    split = ["data.test_fraction=0.25", "data.val_fraction=0"]
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    assert main(["evaluate", str(run), "--split", "all", *data, "--device", "cpu"]) == 0
    assert main(["explain", str(run), "--split", "all", *data, "--no-faithfulness", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    warned = next(line for line in capsys.readouterr().err.splitlines() if "earlier best.pt" in line)
    commands = warned.split("make them again with ")[1].split("; ")
    assert len(commands) == 2 and all(f"--set data.source=csv 'data.root={manifest}' 'data.magnifications=[100]'"
                                      in command for command in commands)
    assert main(["evaluate", str(run), "--split", "all", *data, "--device", "cpu", "--out", str(tmp_path / "m.json")])\
        == 0  # the evaluation of the new best.pt, as the user made the first one
    for command in commands:
        assert main(shlex.split(command)[1:] + ["--device", "cpu", "--quiet"] * command.startswith("finescope explain")
                    + ["--no-faithfulness"] * command.startswith("finescope explain")) == 0
    again = json.loads((run / "metrics_all_other-other-list_magnifications=100.json").read_text())
    assert again["n_images"] == 4 and again == json.loads((tmp_path / "m.json").read_text())
    assert len((run / "explain_all_other-other-list_magnifications=100" / "results.csv").read_text().splitlines()) == 5
    rm = json.loads((run / "metrics_all_other-other-list_magnifications=100.json").read_text())
    del rm["data_overrides"]  # evaluate's file of an older version, named so: its data.root named, as before
    (run / "metrics_all.json").write_text(json.dumps(rm))
    later = (run / "metrics_all.json").stat().st_mtime_ns + 10**9
    os.utime(run / "checkpoints" / "best.pt", ns=(later, later))
    from finescope.checkpoint import earlier_evaluations

    assert earlier_evaluations(run)["metrics_all.json"].endswith(f"--split all --set 'data.root={manifest}'")


def test_evaluations_of_two_other_data_sets_and_other_settings_keep_their_own_files(tmp_path, capsys):
    """evaluate RUN --set data.root=HOSPITAL_B after --set data.root=HOSPITAL_A (external validation at two sites)
    replaced A's metrics_all.json, predictions_all.csv and report_all.md with B's; explain RUN --split test --set
    model.threshold=0.9 replaced the run's explain_test/. Each is named by its data or settings now, and report
    RUN --predictions reads each with its own metrics."""
    root = _folder(tmp_path / "d", n=4)
    sites = {name: _folder(tmp_path / name, n=2) for name in ("hospital_a", "hospital_b")}
    assert main(_train_args(root, tmp_path, "data.test_fraction=0.25", "data.val_fraction=0")) == 0
    run = tmp_path / "r"
    for name, folder in sites.items():
        assert main(["evaluate", str(run), "--set", f"data.root={folder}", "--device", "cpu"]) == 0
        assert f"metrics written to {run / f'metrics_all_{name}.json'}" in capsys.readouterr().out
    for name, folder in sites.items():
        assert json.loads((run / f"metrics_all_{name}.json").read_text())["data_root"] == str(folder)
        assert (run / f"predictions_all_{name}.csv").is_file() and (run / f"report_all_{name}.md").is_file()
        assert main(["report", str(run), "--predictions", f"predictions_all_{name}.csv"]) == 0
        assert str(folder) in (run / f"report_all_{name}.md").read_text()
    assert not (run / "metrics_all.json").exists()
    assert main(["explain", str(run), "--split", "test", "--no-faithfulness", "--device", "cpu", "--quiet"]) == 0
    assert main(["explain", str(run), "--split", "test", "--no-faithfulness", "--device", "cpu", "--quiet",
                 "--set", "model.threshold=0.9"]) == 0
    assert json.loads((run / "explain_test" / "faithfulness.json").read_text())["model_overrides"] == {}
    changed = json.loads((run / "explain_test_threshold=0.9" / "faithfulness.json").read_text())
    assert changed["model_overrides"] == {"model.threshold": 0.9}


def test_the_commands_that_make_evaluations_again_run_the_model_as_they_did(tmp_path, capsys):
    """evaluate RUN --split train --set model.threshold=0.9 (recorded in model_overrides) was named, once the run
    trained on, as 'finescope evaluate RUN --split train': pasted, it wrote metrics_train.json of the model as
    trained under the name of the one evaluated with threshold 0.9."""
    root = _folder(tmp_path / "d", n=4)
    split = ["data.test_fraction=0.25", "data.val_fraction=0"]
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    assert main(["evaluate", str(run), "--split", "train", "--set", "model.threshold=0.9", "data.bit_depth=12",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    warned = next(line for line in capsys.readouterr().err.splitlines() if "earlier best.pt" in line)
    command = warned.split("make them again with ")[1]
    assert command == f"finescope evaluate {run} --split train --set data.bit_depth=12 model.threshold=0.9"
    assert main(shlex.split(command)[1:] + ["--device", "cpu"]) == 0
    made = json.loads((run / "metrics_train_threshold=0.9_bit_depth=12.json").read_text())
    assert made["model_overrides"] == {"model.threshold": 0.9, "data.bit_depth": 12}


def test_the_command_that_makes_an_explanation_again_gives_its_options(tmp_path, capsys):
    """explain RUN --split test --limit 1 --no-faithfulness (a quick look at a large split) was named, once the run
    trained on, as 'finescope explain RUN --split test': pasted, it explained every image with the slow
    deletion/insertion curves, other maps and numbers under the same name. Its options are named now."""
    root = _folder(tmp_path / "d", n=4)
    split = ["data.test_fraction=0.5", "data.val_fraction=0"]
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    options = ["--method", "gradcam", "layercam", "--no-faithfulness", "--grid", "4", "--top", "2", "--limit", "1"]
    assert main(["explain", str(run), "--split", "test", *options, "--device", "cpu", "--quiet"]) == 0
    before = json.loads((run / "explain_test" / "faithfulness.json").read_text())
    capsys.readouterr()
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    warned = next(line for line in capsys.readouterr().err.splitlines() if "earlier best.pt" in line)
    command = warned.split("make them again with ")[1]
    assert command == f"finescope explain {run} --split test {' '.join(options)}"
    assert main(shlex.split(command)[1:] + ["--device", "cpu", "--quiet"]) == 0
    again = json.loads((run / "explain_test" / "faithfulness.json").read_text())
    assert again["settings"] == before["settings"] and again["images"] == 1


def test_a_report_of_evaluate_predictions_of_an_earlier_best_pt_says_so(tmp_path, capsys):
    """report RUN of a run without a test side reports evaluate's predictions_val.csv; when training on (a resume
    stopped in its new epochs) has written best.pt again since, it showed the earlier model's predictions beside the
    new curves without a word."""
    root = _folder(tmp_path / "d", n=4)
    assert main(_train_args(root, tmp_path, "data.test_fraction=0")) == 0
    run = tmp_path / "r"
    assert main(["evaluate", str(run), "--split", "val", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "earlier best.pt" not in capsys.readouterr().err
    later = (run / "metrics_val.json").stat().st_mtime_ns + 10**9
    os.utime(run / "checkpoints" / "best.pt", ns=(later, later))  # written again by the training since
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "predictions_val.csv' holds the predictions of an earlier best.pt" in err
    assert f"finescope evaluate {run} --split val makes them again" in err


def test_test_metrics_made_before_more_training_are_made_again_with_the_test_predictions(tmp_path):
    """evaluate RUN writes metrics_test.json beside predictions_test.csv; a finished run resumed to train on wrote
    new test predictions (of the new best.pt) and left metrics_test.json of the earlier one: the pair disagreed."""
    root = _folder(tmp_path / "d", n=4)
    split = ["data.test_fraction=0.25", "data.val_fraction=0"]  # no validation: best.pt is the last epoch
    assert main(_train_args(root, tmp_path, *split)) == 0
    run = tmp_path / "r"
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    finished, tested = (json.loads((run / name).read_text()) for name in ("metrics.json", "metrics_test.json"))
    assert tested["loss"] == finished["loss"] and tested["ece"] == finished["ece"]
    assert tested["split"] == "test" and "data_root" in tested and "best_epoch" not in tested


def test_an_attention_no_loss_reaches_is_named_before_training(tmp_path, capsys):
    """model.image_feature=avg: the global head reads the mean of the cells and the crops are chosen without
    gradient, so the attention kept its initial weights and picked the crops at random, without a word."""
    root = _folder(tmp_path / "d", n=4)
    assert main(_train_args(root, tmp_path, "model.image_feature=avg", "data.test_fraction=0")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "model.image_feature is avg" in line]
    assert len(warned) == 1 and "picks the crops at random" in warned[0]
    evidence = ["model.image_feature=avg", "model.select_from=evidence", "data.test_fraction=0"]
    assert main(_train_args(root, tmp_path / "e", *evidence)) == 0
    assert "model.image_feature is avg" not in capsys.readouterr().err


def test_a_strip_whose_global_view_would_be_huge_is_named_not_read(tmp_path, capsys):
    """A 2x400 image (a scan line, a mis-cut file) gave a global view 200 times as long as its short side, 32x6400
    at model.global_size=32, which a large global_size turns into gigabytes of activations: it is now refused
    like an image too small for the crops, named, and skipped under data.on_error=skip (predict, explain)."""
    root = _folder(tmp_path / "d", n=4)
    assert main(_train_args(root, tmp_path, "model.variant=global", "model.global_size=64", "data.test_fraction=0")) == 0
    strip = tmp_path / "in" / "strip.png"
    strip.parent.mkdir()
    Image.new("RGB", (400, 2), (90, 90, 160)).save(strip)  # 400x2: a view of 64x12800, above 8192 px
    Image.new("RGB", (80, 64), (90, 90, 160)).save(tmp_path / "in" / "fine.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "r"), str(tmp_path / "in"), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "strip.png' is 400x2 (WxH)" in err and "global view" in err and "12800" in err
    assert [r["path"] for r in csv.DictReader((tmp_path / "p.csv").open())] == [str(tmp_path / "in" / "fine.png")]
    assert main(["explain", str(tmp_path / "r"), str(tmp_path / "in"), "--out", str(tmp_path / "x"),
                 "--no-faithfulness", "--device", "cpu"]) == 0
    assert "strip.png' is 400x2 (WxH)" in capsys.readouterr().err


def test_finescope_data_lists_the_images_train_would_refuse_as_too_thin(tmp_path, capsys):
    """finescope data lists what train stops at; a strip whose global view would be too long was not listed."""
    root = _folder(tmp_path / "d", n=2)
    Image.new("RGB", (400, 2), (90, 90, 160)).save(root / "a" / "strip.png")
    args = ["data", "--config", "configs/demo.yaml", "--json", str(tmp_path / "d.json"), "--set", "data.source=folder",
            f"data.root={root}", "model.global_size=64", "model.variant=global"]  # no crops: nothing too small
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "so thin that the global view (a short side of 64 px) would be longer than 8192 px: 1" in out
    assert "a/strip.png: 400x2" in out
    assert json.loads((tmp_path / "d.json").read_text())["too_thin"] == [[str(root / "a" / "strip.png"), "400x2"]]
    assert main([*args, "data.on_error=skip"]) == 0
    assert main([*args, "model.variant=global-hires"]) == 0  # it reads the image itself: no view to refuse


def test_finescope_data_under_on_error_skip_does_not_advise_setting_it(tmp_path, capsys):
    """finescope data with data.on_error=skip ended each unreadable file's line in 'fix or remove the file, or set
    data.on_error=skip', the setting it was given; it now says that train skips them, and the JSON alike."""
    root = _folder(tmp_path / "d", n=2)
    (root / "a" / "broken.png").write_bytes((root / "a" / "a_0.png").read_bytes()[:60])
    args = ["data", "--config", "configs/demo.yaml", "--json", str(tmp_path / "d.json"), "--set", "data.source=folder",
            f"data.root={root}", "model.local_size=32"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "a/broken.png: cannot read image" in out and out.count("or set data.on_error=skip") == 1
    assert main([*args, "data.on_error=skip"]) == 0
    out = capsys.readouterr().out
    assert "unreadable: 1 (data.on_error=skip: train, evaluate and predict skip them)" in out
    assert "a/broken.png: cannot read image" in out and "data.on_error=skip;" not in out
    assert "or set data.on_error=skip" not in out
    (reason,) = [r for _, r in json.loads((tmp_path / "d.json").read_text())["unreadable"]]
    assert reason.startswith("cannot read image") and "data.on_error" not in reason


def test_a_csv_split_column_that_leaks_names_the_csv(tmp_path, capsys):
    root = _folder(tmp_path / "d", n=4)
    rows = [f"{c}/{c}_{i}.png,{c},{c}{i // 2},{'test' if i == 1 else ['train', 'test'][i // 2]}"
            for c in ("a", "b") for i in range(4)]  # a0 holds images 0 (train) and 1 (test)
    (root / "m.csv").write_text("path,label,group,split\n" + "\n".join(rows) + "\n")
    assert main(_train_args(root / "m.csv", tmp_path, "data.source=csv")) == 2
    assert f"the split column of '{root / 'm.csv'}': split leak: group 'a0'" in _one_error_line(capsys)


def test_evaluating_an_empty_split_names_the_others(tmp_path, capsys):
    assert main(_train_args(_folder(tmp_path / "d", n=4), tmp_path, "data.test_fraction=0")) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), "--device", "cpu"]) == 2  # a run trained without a test side
    assert "the 'test' split of" in (line := _one_error_line(capsys)) and "give --split train or val or all" in line


def test_resume_needs_no_initial_weights_file(tmp_path, capsys):
    """last.pt holds every weight: a resume (and its test pass) never reads model.weights again."""
    import torch

    from finescope.models import create_backbone

    weights = tmp_path / "tiny.pt"
    torch.save(create_backbone("tiny").trunk.state_dict(), weights)
    root = _folder(tmp_path / "d", n=4)
    assert main(_train_args(root, tmp_path, f"model.weights={weights}")) == 0
    weights.unlink()  # moved, or on a machine that does not have it
    assert main(_train_args(root, tmp_path, f"model.weights={weights}", "train.epochs=2") + ["--resume"]) == 0
    assert len((tmp_path / "r" / "history.jsonl").read_text().splitlines()) == 2


def test_a_runs_config_trains_again_from_any_folder(tmp_path, monkeypatch, capsys):
    """config.yaml stored model.weights as given, relative to the folder the run was started in (data.root was
    stored absolute): train --config RUN/config.yaml --out NEW, which the README gives for the run's settings,
    stopped at 'model.weights file ... not found' from any other folder. A resume from the first folder with the
    relative path is still the same config."""
    import torch

    from finescope.models import create_backbone

    (tmp_path / "w").mkdir()
    torch.save(create_backbone("tiny").trunk.state_dict(), tmp_path / "w" / "tiny.pt")
    root = _folder(tmp_path / "d", n=4)
    args = _train_args(root, tmp_path, "model.weights=tiny.pt")
    args[2] = str(Path(__file__).resolve().parents[1] / args[2])  # configs/demo.yaml
    monkeypatch.chdir(tmp_path / "w")
    assert main(args) == 0
    monkeypatch.chdir(tmp_path / "d")
    assert main(["train", "--config", str(tmp_path / "r" / "config.yaml"), "--out", str(tmp_path / "r2"), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path / "w")
    assert main([*args, "train.epochs=2", "--resume"]) == 0


def test_train_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "r").write_text("notes")
    assert main(_train_args(_folder(tmp_path / "d"), tmp_path)) == 2
    assert f"--out '{tmp_path / 'r'}' is a file; give a folder for the run" in _one_error_line(capsys)
    assert (tmp_path / "r").read_text() == "notes"


def test_set_may_come_before_the_paths():
    from finescope.cli import _one_set_each

    assert _one_set_each(["predict", "RUN", "--set", "a=1", "b=2", "img.png", "--out", "p.csv", "--set", "c=3"]) == [
        "predict", "RUN", "--set=a=1", "--set=b=2", "img.png", "--out", "p.csv", "--set=c=3"]
    assert _one_set_each(["train", "--set"]) == ["train", "--set"]  # left for argparse to refuse
    assert _one_set_each(["x", "--set", "a=1", "--", "--set", "b=2"]) == ["x", "--set=a=1", "--", "--set", "b=2"]
    assert _one_set_each(["x", "--set", "a=1", "--set=a=2", "--set", "a=3"]) == [
        "x", "--set=a=1", "--set=a=2", "--set=a=3"]  # in order: the last one wins
    assert _one_set_each(["predict", "RUN", "--set", "data.cache=none", "in/dose=5uM.png", "../x=1.png"]) == [
        "predict", "RUN", "--set=data.cache=none", "in/dose=5uM.png", "../x=1.png"]  # paths holding '='
    args, extra = build_parser().parse_known_args(_one_set_each(["explain", "RUN", "--method", "gradcam", "--set",
                                                                 "a=1", "img.png", "--set", "lr=-1"]))
    assert args.method == ["gradcam"] and extra == ["img.png"] and args.overrides == ["a=1", "lr=-1"]


def test_predict_with_set_before_its_paths(cli_run, synthetic_root, tmp_path, capsys):
    img = sorted((synthetic_root / "images").iterdir())[0]
    assert main(["predict", str(cli_run), "--set", "model.predict_with=mean", str(img), "--out",
                 str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 2
    # explain's paths after options (--method's list ended by --set): the image is explained, not a method
    assert main(["explain", str(cli_run), "--method", "gradcam", "--set", "train.device=cpu", str(img),
                 "--out", str(tmp_path / "ex"), "--no-faithfulness", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((tmp_path / "ex" / "faithfulness.json").read_text())["images"] == 1
    with pytest.raises(SystemExit):
        main(["data", "--config", "configs/demo.yaml", "stray"])  # no paths to take it: refused as before
    assert "unrecognized arguments: stray" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "predict", "explain"])
def test_set_help_of_a_command_on_a_trained_model_gives_an_example_it_takes(command, capsys):
    """evaluate, predict and explain --help gave train's example, --set model.variant=global, which a trained
    model refuses (its architecture is the checkpoint's), and did not say where a changed model setting goes."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "model.variant=global" not in text and "recorded as model_overrides" in text


def test_a_path_taken_for_a_set_item_says_so(cli_run, synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = sorted((synthetic_root / "images").iterdir())[0]
    (tmp_path / "a=b.png").write_bytes(img.read_bytes())
    assert main(["predict", str(cli_run), str(img), "--set", "train.device=cpu", "a=b.png", "--out", "p.csv"]) == 2
    assert "unknown config key 'a'" in (line := _one_error_line(capsys)) and "give paths before --set" in line
    assert main(["predict", str(cli_run), "a=b.png", "--set", "train.device=cpu", "--out", "p.csv"]) == 0


@pytest.mark.parametrize("rank", ["0", "1"])
def test_commands_other_than_train_refuse_torchrun(tmp_path, capsys, monkeypatch, rank):
    """Under torchrun every process would do the whole job and write the same files: each says so in a line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert main(["data", "--config", "configs/demo.yaml", "--set", f"data.root={tmp_path}"]) == 2
    who = "finescope: error: " if rank == "0" else "finescope: error (rank 1): "
    assert capsys.readouterr().err == (f"{who}finescope data runs in one process; run it without torchrun (train "
                                       "is the command that shares its work between processes; WORLD_SIZE is set "
                                       "in this environment)\n")
    monkeypatch.setenv("WORLD_SIZE", "x")  # not a number: not torchrun
    assert main(["models"]) == 0


def test_system_errors_are_one_line_naming_the_file(cli_run, synthetic_root, tmp_path, capsys):
    """A full disk, a name too long, a run folder without best.pt: one line, never a traceback."""
    image = str(sorted((synthetic_root / "images").iterdir())[0])
    if os.path.exists("/dev/full"):
        assert main(["predict", str(cli_run), image, "--out", "/dev/full", "--device", "cpu"]) == 2
        assert "No space left on device" in _one_error_line(capsys)
    long = tmp_path / ("a" * 300)
    assert main(["predict", str(cli_run), image, "--out", str(long / "p.csv"), "--device", "cpu"]) == 2
    assert "File name too long" in _one_error_line(capsys)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "last.pt").write_bytes((cli_run / "checkpoints" / "last.pt").read_bytes())
    assert main(["evaluate", str(unfinished), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "has no checkpoints/best.pt yet" in line and "last.pt" in line


def test_an_interrupted_first_epoch_says_to_start_again(synthetic_root, tmp_path, capsys, monkeypatch):
    from finescope import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_run_epoch", interrupted)
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r"), "--quiet", "--set",
                 *tiny_overrides(synthetic_root, "global", 1)]) == 130
    assert capsys.readouterr().err == ("finescope: interrupted; no epoch had finished: start it again (without "
                                       "--resume)\n")
    from finescope import distributed

    # under torchrun, while the processes (of other machines too) join: a run that has not started yet
    monkeypatch.setattr(distributed, "init_from_env", interrupted)
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r2"), "--quiet", "--set",
                 *tiny_overrides(synthetic_root, "global", 1)]) == 130
    assert capsys.readouterr().err == ("finescope: interrupted; no epoch had finished: start it again (without "
                                       "--resume)\n")


def test_an_interruption_before_the_run_starts_says_to_run_the_same_command(tmp_path, capsys, monkeypatch):
    """Ctrl-C while train still imports torch or reads its config (seconds at start): no run folder was
    touched, so neither --resume (nothing to resume) nor dropping it (a run being resumed needs it) is advised."""
    from finescope import config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "load_config", interrupted)
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r"), "--resume"]) == 130
    said = capsys.readouterr().err
    assert said == "finescope: interrupted; nothing was written: run the same command again\n"


def test_a_yaml_syntax_error_names_its_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  source: folder\nmodel: {variant: [fusion\n")
    assert main(["data", "--config", str(cfg)]) == 2
    assert "is not valid YAML (line 4, column 1): expected ',' or ']', but got '<stream end>'" in _one_error_line(capsys)


def test_a_class_whose_training_images_are_all_unreadable_stops_the_run(tmp_path, capsys):
    """data.on_error=skip skips unreadable images, but not a whole class: a model trained without it would
    still be scored on it."""
    root = _folder(tmp_path / "d", n=4)
    for f in (root / "b").iterdir():
        f.write_bytes(b"not an image")
    assert main(_train_args(root, tmp_path, "data.on_error=skip", "data.test_fraction=0.25",
                            "data.val_fraction=0")) == 2
    assert "none of the training images of class 'b' could be read" in _one_error_line(capsys)


def test_training_images_all_unreadable_stop_the_run(tmp_path, capsys):
    """Every class unreadable at once gives the epoch no batch at all: the run stops as for one class, rather
    than writing a run trained on no image and exiting 0."""
    root = _folder(tmp_path / "d", n=4)
    for f in root.rglob("*.png"):
        f.write_bytes(b"not an image")
    assert main(_train_args(root, tmp_path, "data.on_error=skip", "data.test_fraction=0",
                            "data.val_fraction=0")) == 2
    assert "none of the training images of class 'a', 'b' could be read" in _one_error_line(capsys)


def test_a_folder_in_a_csv_and_a_breakhis_root_that_is_a_file_say_so(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "m.csv").write_text("path,label\nsub,a\n")
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=csv",
                 f"data.root={tmp_path / 'm.csv'}"]) == 2
    assert "line 2 is a folder, not an image" in _one_error_line(capsys)
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=breakhis",
                 f"data.root={tmp_path / 'm.csv'}"]) == 2
    assert "is a file; data.source=breakhis needs the BreakHis folder" in _one_error_line(capsys)


def test_a_runs_own_config_yaml_from_before_a_key_reads_as_trained(tmp_path):
    """--config RUN/config.yaml of a run written before model.selection_norm existed gives its selection back."""
    import yaml

    from finescope.config import load_config

    raw = yaml.safe_load(open("configs/demo.yaml"))
    raw.setdefault("model", {}).pop("selection_norm", None)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**raw, "_provenance": {"finescope_version": "0.1.0"}}))
    assert load_config(tmp_path / "config.yaml").model.selection_norm == "max"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(raw))  # not a run's: today's default
    assert load_config(tmp_path / "other.yaml").model.selection_norm == "minmax"


def test_a_failed_start_leaves_the_folders_files(tmp_path, capsys):
    """Nothing in an --out folder is touched before the run's data and settings are checked."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "history.jsonl").write_text("{}\n")
    (out / ".finescope-abc.tmp").write_text("x")
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(out), "--set", "data.source=csv",
                 f"data.root={tmp_path / 'missing.csv'}"]) == 2
    _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".finescope-abc.tmp", "history.jsonl"]


def test_a_csv_with_an_unclosed_quote_says_so(tmp_path, capsys):
    _folder(tmp_path / "imgs")
    (tmp_path / "m.csv").write_text('path,label\nimgs/a/a_0.png,a\n"imgs/b/b_0.png,b\nimgs/b/b_1.png,b\n')
    assert main(["data", "--config", "configs/demo.yaml", "--set", "data.source=csv",
                 f"data.root={tmp_path / 'm.csv'}"]) == 2
    line = _one_error_line(capsys)
    assert "the row from line 3: unexpected end of data (a quote opened and never closed?)" in line, line


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_a_folder_one_cannot_write_is_one_line_that_says_where_else(tmp_path, capsys, monkeypatch, command):
    import errno

    import finescope.trainer

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "metrics_test.json"))

    monkeypatch.setattr(finescope.trainer, command, refused)
    args = [command, str(tmp_path / "run")] if command == "evaluate" else \
        ["train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert line.startswith("finescope: error: Permission denied: ") and "check its permissions" in line
    assert ("--out" in line) == (command == "evaluate")


def test_cv_table_without_an_interval():
    """A pooled metric of a single patient has no interval (low/high None): cv's table says n/a, no TypeError; a
    long reason for it widens its column, which stays aligned."""
    from finescope.cli import _cv_table

    cell = {"value": 0.5, "low": None, "high": None, "n_boot": 0}
    table = _cv_table({"variants": {"global": {"pooled": {"patient_recognition_rate": cell, "image_accuracy": cell}}}})
    assert "0.500 [n/a, n/a]" in table.splitlines()[1]
    cell = {**cell, "ci_note": "only 4 patient groups"}
    table = _cv_table({"variants": {"global": {"pooled": {"patient_recognition_rate": cell, "image_accuracy": cell}},
                                    "fusion": {"pooled": {"patient_recognition_rate": cell, "image_accuracy": cell}}}})
    lines = table.splitlines()
    assert lines[1].count("0.500 [n/a (only 4 patient groups)]") == 2
    # the columns stay aligned where a cell is wider than its header's 28 characters (they ran on)
    assert len({line.index("0.500 [n/a", 20) for line in lines[1:]} | {lines[0].index("image acc")}) == 1


def test_a_run_trained_on_a_relative_data_root_is_read_from_any_folder(synthetic_root, tmp_path, monkeypatch,
                                                                       capsys):
    """data.root was stored as typed ('data/manifest.csv'): evaluate RUN, explain RUN and --resume from another
    folder read it from there and failed; a new run stores it absolute. A run stored before with a relative root
    still loads from where it was trained, and from elsewhere says to pass --set data.root=."""
    from finescope.checkpoint import load_checkpoint, save_checkpoint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data").symlink_to(synthetic_root)
    monkeypatch.chdir(tmp_path / "a")
    overrides = [o for o in tiny_overrides(synthetic_root, "fusion", 1) if not o.startswith("data.root=")]
    assert main(["train", "--config", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                   "demo.yaml")),
                 "--out", "run", "--quiet", "--set", "data.root=data/manifest.csv", *overrides]) == 0
    run = tmp_path / "a" / "run"
    assert (run / "config.yaml").read_text().count(f"root: {tmp_path / 'a' / 'data' / 'manifest.csv'}\n") == 1
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "m.json")]) == 0
    assert main(["explain", str(run), "--split", "test", "--device", "cpu", "--method", "attention", "--limit", "2",
                 "--out", str(tmp_path / "ex")]) == 0
    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume", "--quiet", "--set",
                 "train.epochs=2"]) == 0
    # a run from before, its root as typed
    for ckpt in (run / "checkpoints").glob("*.pt"):
        state = load_checkpoint(ckpt)
        state["config"]["data"]["root"] = "data/manifest.csv"
        save_checkpoint(state, ckpt)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace(str(tmp_path / "a" / "data" / "manifest.csv"), "data/manifest.csv"))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "m2.json")]) == 2
    line = _one_error_line(capsys)
    assert "data.root 'data/manifest.csv' does not exist" in line and "--set data.root=" in line
    monkeypatch.chdir(tmp_path / "a")
    assert main(["evaluate", "run", "--device", "cpu", "--out", str(tmp_path / "m3.json")]) == 0


@pytest.mark.slow
def test_a_sigterm_ends_a_single_process_run_in_one_line_and_it_resumes(synthetic_root, tmp_path, capsys):
    """A scheduler's pre-emption (SLURM sends SIGTERM) of a run in one process ended it without a word (killed by
    the signal). It now says so in one line naming the checkpoint kept and how to continue, exits 128+15, and the
    run resumes from that checkpoint."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from finescope.checkpoint import load_checkpoint, read_history

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "finescope", "train", "--config", "configs/demo.yaml", "--out", str(out), "--quiet",
           "--set", *tiny_overrides(synthetic_root, "global", 100)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / "checkpoints" / "last.pt").is_file(), proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = out / "checkpoints" / "last.pt"
    assert err.splitlines() == [
        "finescope: stopped by SIGTERM (a scheduler's pre-emption or time limit, or a kill); the run's last checkpoint "
        f"is kept ('{last}'): continue it with the same command and --resume"], err[-3000:]
    epoch = load_checkpoint(last)["epoch"]  # the last epoch that finished
    # the same command with --resume (one more epoch, so that the test ends soon): it continues from last.pt
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(out), "--resume", "--set",
                 *tiny_overrides(synthetic_root, "global", epoch + 2)]) == 0
    assert f"resuming {out} after epoch {epoch + 1} of {epoch + 2}" in capsys.readouterr().out
    assert [row["epoch"] for row in read_history(out / "history.jsonl")] == list(range(epoch + 2))
    assert (out / "metrics.json").is_file() and not list((out / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, 130), ("sigterm", 143)])
def test_a_stop_while_the_workers_shut_down_after_the_last_epoch_ends_the_run(synthetic_root, tmp_path, capsys,
                                                                             monkeypatch, stop, status):
    """torch stops a DataLoader's workers in its iterator's __del__, where Python only prints an exception
    ('Exception ignored in ...'): a Ctrl-C (or train's SIGTERM) there, after the last epoch, was printed as a
    traceback and the run went on to its test and exit status 0 (or, SIGTERM being ignored once taken, ended with
    no word of it). It now stops the run, in its one line."""
    import signal

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    real = _MultiProcessingDataLoaderIter._shutdown_workers
    calls = []

    def interrupted(self):
        real(self)
        if not calls:  # the first shut down: the training loader's, after the last epoch
            calls.append(self)
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise stop

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_shutdown_workers", interrupted)
    out = tmp_path / "r"
    overrides = [o for o in tiny_overrides(synthetic_root, "global", 1) if not o.startswith("data.num_workers")]
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(out), "--quiet", "--set",
                 "data.num_workers=1", *overrides]) == status
    err = capsys.readouterr().err
    assert calls and "Exception ignored" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("finescope: interrupted" if status == 130 else "finescope: stopped by SIGTERM"), err
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("stop, status, said_as", [(KeyboardInterrupt, 130, "interrupted"),
                                                   ("sigterm", 143, "stopped by SIGTERM")])
@pytest.mark.parametrize("where", ["test", "report"])
def test_an_interruption_after_training_says_what_was_written(synthetic_root, tmp_path, capsys, monkeypatch, where,
                                                              stop, status, said_as):
    """Ctrl-C (or SIGTERM) once training had ended (while the test predictions or the report were written) said
    'continue it with the same command and --resume', as if epochs were left. It now says what the run holds and
    what it lacks."""
    import signal

    from finescope import report, trainer

    out = tmp_path / "r"
    args = ["train", "--config", "configs/demo.yaml", "--out", str(out), "--quiet", "--set",
            *tiny_overrides(synthetic_root, "global", 1)]
    if where == "report":  # a report made before is written again after metrics.json
        assert main(args) == 0
        assert main(["report", str(out)]) == 0
        args = [*args[:5], "--resume", *args[5:], "train.epochs=2"]
    capsys.readouterr()

    def interrupted(*a, **k):
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(*(trainer, "write_predictions") if where == "test" else (report, "write_report"), interrupted)
    assert main(args) == status
    said = capsys.readouterr().err
    if where == "test":
        assert said == (f"finescope: {said_as} after training ended: its checkpoints are written "
                        f"('{out / 'checkpoints' / 'best.pt'}', last.pt), its test is not (metrics.json, "
                        "predictions_test.csv): the same command with --resume tests it\n")
        monkeypatch.undo()
        assert main([*args[:5], "--resume", *args[5:]]) == 0
        assert (out / "metrics.json").is_file()
    else:
        assert said == (f"finescope: {said_as} after training ended: the run is written ('{out / 'metrics.json'}'), "
                        f"its report.md made before is not written again: finescope report {out} makes it\n")


@pytest.mark.slow
def test_a_sigterm_to_a_runs_processes_with_their_workers_is_one_line(synthetic_root, tmp_path):
    """SLURM's pre-emption and a kill of the process group send SIGTERM to the DataLoader workers too: a worker
    that died of it first raised torch's 'DataLoader worker (pid N) is killed by signal: Terminated' in the main
    process, a traceback (exit 1, or 143 after the tracebacks). The workers leave SIGTERM to the main process,
    which stops them: one line, 143."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_root, "global", 100) if not o.startswith("data.num_workers")]
    cmd = [sys.executable, "-m", "finescope", "train", "--config", "configs/demo.yaml", "--out", str(out), "--quiet",
           "--set", "data.num_workers=2", *overrides]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / "checkpoints" / "last.pt").is_file(), proc.communicate(timeout=60)[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # the run's process and its workers, as a scheduler does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("finescope: stopped by SIGTERM"), err[-3000:]


@pytest.mark.parametrize(("command", "target", "advice"), [
    (["cv", "--config", "configs/breakhis_protocol.yaml"], "finescope.cv.run_cv",
     "rerun the same command to resume its folds"),
    (["demo", "--out", "DEMO"], "finescope.demo.run_demo", "rerun the same command to continue"),
])
def test_a_sigterm_during_cv_or_demo_is_one_line(tmp_path, monkeypatch, capsys, command, target, advice):
    """cv and demo train in one process too, under the same schedulers as train; a SIGTERM there ended them
    without a word (killed by the signal). They now say so in one line, with what continues them, and exit 143."""
    import signal
    import time

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(target, terminated)
    before = signal.getsignal(signal.SIGTERM)
    argv = [str(tmp_path / "demo") if a == "DEMO" else a for a in command]
    assert main(argv) == 143
    assert capsys.readouterr().err == (f"finescope: stopped by SIGTERM (a scheduler's pre-emption or time limit, or "
                                       f"a kill); {advice}\n")
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_run_that_ordered_whole_number_classes_as_text_keeps_its_order(tmp_path, capsys):
    """Classes 1, 2, 10 are now in that order; a run trained when they were 1, 10, 2 (its checkpoints and
    splits.json store that order) is still evaluated, resumed and predicted with its own indices."""
    from finescope.checkpoint import load_checkpoint, save_checkpoint

    root, run = _folder(tmp_path / "d", classes=("1", "2", "10"), n=4), tmp_path / "r"
    split = ("data.test_fraction=0.5", "data.val_fraction=0")
    assert main(_train_args(root, tmp_path, *split)) == 0
    assert json.loads((run / "metrics.json").read_text())["class_names"] == ["1", "2", "10"]
    old = ["1", "10", "2"]
    for path in (run / "checkpoints").glob("*.pt"):
        state = load_checkpoint(path)
        state.pop("path", None)
        save_checkpoint({**state, "class_names": old}, path)
    raw = json.loads((run / "splits.json").read_text())
    (run / "splits.json").write_text(json.dumps({**raw, "class_names": old}))
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((run / "predictions_test.csv").open()))
    assert [r["true"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    assert [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{n}" for n in old]
    assert main(_train_args(root, tmp_path, *split, "train.epochs=2") + ["--resume"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["class_names"] == old
    assert json.loads((run / "metrics.json").read_text())["class_names"] == old
