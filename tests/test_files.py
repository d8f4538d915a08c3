"""Files written whole or not at all."""

import json
import os
import signal

import pytest

from finescope.files import atomic_open, write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    write_text(path, "new ünïcode")
    assert path.read_text(encoding="utf-8") == "new ünïcode"


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_a_special_file_is_written_directly_not_replaced():
    write_text("/dev/null", "x")  # a rename would replace the device node
    assert not os.path.isfile("/dev/null")


def test_damaged_records_are_one_line_or_left_out(tmp_path):
    """A cv.json or splits.json cut short (a kill before they were written whole, or an edit) is an error naming
    the file (cv) or a part left out of the report, not a JSON traceback."""
    from finescope.cv import check_rerun
    from finescope.errors import FinescopeError, FinescopeWarning
    from finescope.report import _split_summaries

    (tmp_path / "cv.json").write_text('{"settings": {')
    with pytest.raises(FinescopeError, match="cv.json' is damaged"):
        check_rerun(tmp_path, None, None)
    (tmp_path / "splits.json").write_text('{"splits": {')
    with pytest.warns(FinescopeWarning, match="splits.json' is not valid JSON"):
        assert _split_summaries(tmp_path, is_cv=False, class_names=["a", "b"]) == []


def test_links_are_written_through_and_modes_kept(tmp_path):
    """A symbolic link (such as /dev/stdout) or a hard link is written through, as open() would, not replaced
    by a file; a replaced file keeps its permissions; a long name still fits (the temporary name is short)."""
    target = tmp_path / "target.csv"
    target.write_text("old")
    (tmp_path / "link.csv").symlink_to(target)
    write_text(tmp_path / "link.csv", "new")
    assert (tmp_path / "link.csv").is_symlink() and target.read_text() == "new"
    os.link(target, tmp_path / "hard.csv")
    write_text(target, "both")
    assert (tmp_path / "hard.csv").read_text() == "both"
    alone = tmp_path / "alone.csv"
    alone.write_text("x")
    alone.chmod(0o640)
    write_text(alone, "y")
    assert alone.read_text() == "y" and (alone.stat().st_mode & 0o777) == 0o640
    long = tmp_path / ("y" * 250)
    write_text(long, "fits")
    assert long.read_text() == "fits"


def test_an_error_names_the_file_asked_for_not_the_temporary(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        write_text(tmp_path / "nodir" / "x.json", "{}")
    assert e.value.filename == str(tmp_path / "nodir" / "x.json")


def test_a_checkpoint_that_fills_the_disk_is_a_full_disk_error(tmp_path, monkeypatch):
    """torch's writer says 'unexpected pos' when the disk fills; the save says ENOSPC and leaves no temporary."""
    import errno
    import shutil

    import torch

    from finescope import checkpoint

    def cut_short(state, f):
        open(f, "wb").write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1247872 vs 1247764")

    monkeypatch.setattr(torch, "save", cut_short)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint({"model": {}}, tmp_path / "last.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_checkpoint_write_stopped_by_a_signal_leaves_the_previous_one_and_no_temporary(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM (train raises a BaseException for it) while torch writes a checkpoint left its partial
    temporary file, as large as a checkpoint, beside the previous one until the run was started again."""
    import torch

    from finescope import checkpoint

    checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    real_save = torch.save

    def stopped(state, f):
        real_save(state, f)
        raise stop

    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(stop):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["model"]["w"].tolist() == [1.0, 1.0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a descriptor's file through /proc")
def test_a_checkpoint_reaches_the_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    """Renamed before its data were written out, a checkpoint can be an empty file after a power loss."""
    import torch

    from finescope import checkpoint

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save_checkpoint({"model": {}}, tmp_path / "last.pt")
    assert len(events) == 2 and events[0][0] == "fsync" and events[1] == ("replace", events[0][1])
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"model": {}}


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_a_checkpoint_refused_with_space_left_on_the_disk_says_why(tmp_path):
    """A disk quota (or a file size limit) stops torch's writer with the disk far from full: its 'unexpected pos'
    RuntimeError ended training with a traceback. The save says the system's reason, naming the checkpoint."""
    import errno
    import resource

    import torch

    from finescope import checkpoint

    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, limits[1]))  # writes past 64 KiB fail with EFBIG
    try:
        with pytest.raises(OSError) as e:
            checkpoint.save_checkpoint({"model": {"w": torch.zeros(2**18)}}, tmp_path / "last.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert e.value.errno == errno.EFBIG and e.value.filename == str(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def _strict_json(text: str):
    """json.loads as a strict parser (or jq) reads: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_non_finite_values_as_null():
    """NaN and infinities, Python's and NumPy's, nested in dicts, lists and tuples, are null; the rest is as
    json.dumps writes it."""
    import numpy as np

    from finescope.files import finite_json, json_text

    obj = {"loss": float("inf"), "curve": [0.5, np.float32("nan"), (1, -np.inf)], "n": 3, "name": "a",
           "ok": np.float64(0.25), "none": None}
    text = json_text(obj, indent=2)
    assert _strict_json(text) == {"loss": None, "curve": [0.5, None, [1, None]], "n": 3, "name": "a", "ok": 0.25,
                                  "none": None}
    assert finite_json(obj)[1] == {"loss": "inf", "curve.1": "nan", "curve.2.1": "-inf"}
    finite = {"a": [1.5, 2], "b": {"c": "d"}}
    assert json_text(finite, indent=1) == json.dumps(finite, indent=1)


def test_every_json_file_of_the_package_is_written_through_json_text():
    """json.dumps writes NaN and Infinity, which are not JSON: every writer goes through json_text."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "finescope"
    direct = [f"{p.relative_to(src)}:{n}" for p in sorted(src.rglob("*.py")) if p.name != "files.py"
              for n, line in enumerate(p.read_text().splitlines(), 1) if "json.dump" in line]
    assert direct == []


def test_evaluated_files_are_named_by_their_data_and_model_settings():
    """The suffix of evaluate's files and explain's folder: empty for the model as trained on its own data (and for
    another data.root evaluated by its run's split: the run's own data, moved), the other data's folder or CSV name
    for all of its images, the model settings as --set gives them; no path separator, and cut with a digest when
    long, so that two long ones stay apart."""
    from finescope.checkpoint import evaluated_suffix

    assert evaluated_suffix({}, {}, "test") == evaluated_suffix(None, None, "all") == ""
    assert evaluated_suffix({}, {"data.root": "/data/moved"}, "test") == ""
    assert evaluated_suffix({}, {"data.root": "/data/hospital b/"}, "all") == "_hospital-b"
    assert evaluated_suffix({}, {"data.source": "csv", "data.root": "/x/site 2.csv"}, "all") == "_x-site-2"
    assert evaluated_suffix({}, {"data.root": "/a/manifest.csv"}, "all") != evaluated_suffix(
        {}, {"data.root": "/b/manifest.csv"}, "all")  # the usual name of every list: told apart by its folder
    assert evaluated_suffix({"model.threshold": 0.9, "data.bit_depth": 12}, {"data.num_workers": 0}, "all") \
        == "_threshold=0.9_bit_depth=12"
    assert evaluated_suffix({"model.weights_note": "a/b"}, {}, "val") == "_weights_note=a-b"
    long = [evaluated_suffix({"model.threshold": t / 7}, {"data.root": "/d/" + "x" * 40}, "all") for t in (1, 2)]
    assert all(len(s) == 60 and "/" not in s for s in long) and long[0] != long[1]


def test_evaluated_files_of_a_subset_of_the_data_are_named_by_it():
    """evaluate RUN --set data.magnifications=[40] (the run's data at one magnification: all its images, as its
    splits.json no longer matches) wrote metrics_all.json, over evaluate RUN --split all's of every image, and each
    magnification's over the one before (found in review): the data settings that choose other images or other
    groups name the files too; the loader's (data.num_workers, data.cache) do not."""
    from finescope.checkpoint import evaluated_suffix

    assert evaluated_suffix({}, {"data.magnifications": [40]}, "all") == "_magnifications=40"
    assert evaluated_suffix({}, {"data.magnifications": [40, 100], "data.num_workers": 0}, "all") \
        == "_magnifications=40+100"
    assert evaluated_suffix({"model.threshold": 0.9}, {"data.root": "/d/site", "data.task": "subtype"}, "all") \
        == "_site_task=subtype_threshold=0.9"
    assert evaluated_suffix({}, {"data.num_workers": 0, "data.cache": "memory"}, "all") == ""
    assert evaluated_suffix({}, {"data.magnifications": [40]}, None) == ""  # explain's files: named by the user


def test_an_older_versions_evaluation_of_other_data_is_named_once_trained_on(tmp_path):
    """metrics_all.json and explain_all/ of other data that a version before its data named the files wrote
    (recording data_overrides) were left out of the warning once the run trained on, their data's suffix no longer
    matching their name (found in review): they are named, with the command that
    makes them again (into the files named by their data)."""
    import os

    from finescope.checkpoint import earlier_evaluations

    best = tmp_path / "checkpoints" / "best.pt"
    best.parent.mkdir()
    best.write_bytes(b"")
    recorded = {"split": "all", "checkpoint": str(best), "data_root": "/d/hospital_b",
                "data_overrides": {"data.root": "/d/hospital_b"}, "model_overrides": {}}
    (tmp_path / "metrics_all.json").write_text(json.dumps(recorded))
    (tmp_path / "explain_all").mkdir()
    (tmp_path / "explain_all" / "results.csv").write_text("path\n")
    (tmp_path / "explain_all" / "faithfulness.json").write_text(json.dumps(recorded))
    later = (tmp_path / "metrics_all.json").stat().st_mtime_ns + 10**9
    os.utime(best, ns=(later, later))
    earlier = earlier_evaluations(tmp_path)
    assert earlier["metrics_all.json"] == (f"finescope evaluate {tmp_path} --split all --set data.root=/d/hospital_b")
    assert earlier["explain_all/"] == (f"finescope explain {tmp_path} --split all --set data.root=/d/hospital_b")
