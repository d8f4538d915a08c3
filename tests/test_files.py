"""Files written whole or not at all."""

import os

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
        assert _split_summaries(tmp_path, is_cv=False) == []
