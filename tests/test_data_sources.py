"""Sources: BreakHis (official tree and flat folder), folder, CSV and synthetic on tiny generated files."""

from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finescope.config import DataConfig
from finescope.data import SUPPORTED_EXTENSIONS, load_samples, split_groups
from finescope.data.sources import parse_breakhis_name
from finescope.errors import FinescopeError, FinescopeWarning

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
realdata = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")

# (class folder, subtype folder, subtype code, patient, magnification, index)
BREAKHIS_FILES = [
    ("benign", "adenosis", "A", "22549AB", 100, 1),
    ("benign", "adenosis", "A", "22549AB", 100, 2),
    ("benign", "adenosis", "A", "22549AB", 40, 1),
    ("benign", "adenosis", "A", "22549CD", 100, 1),
    ("benign", "fibroadenoma", "F", "29960AB", 100, 1),
    ("malignant", "ductal_carcinoma", "DC", "12312", 100, 1),
    ("malignant", "ductal_carcinoma", "DC", "12312", 400, 3),
    ("malignant", "papillary_carcinoma", "PC", "15687B", 100, 7),
]


def tiny_png(path: Path, size: tuple[int, int] = (8, 6), value: int = 128) -> Path:
    """A small RGB image (size = (w, h)); the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def breakhis_name(cls: str, code: str, patient: str, mag: int, idx: int) -> str:
    return f"SOB_{cls[0].upper()}_{code}-14-{patient}-{mag}-{idx:03d}.png"


def make_breakhis_tree(root: Path) -> Path:
    """The official layout: BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<patient>/<mag>X/<file>."""
    for cls, subtype, code, patient, mag, idx in BREAKHIS_FILES:
        folder = (
            root
            / "BreaKHis_v1/histology_slides/breast"
            / cls
            / "SOB"
            / subtype
            / f"SOB_{cls[0].upper()}_{code}_14-{patient}"
        )
        tiny_png(folder / f"{mag}X" / breakhis_name(cls, code, patient, mag, idx))
    return root


def make_breakhis_flat(root: Path) -> Path:
    for cls, _, code, patient, mag, idx in BREAKHIS_FILES:
        tiny_png(root / breakhis_name(cls, code, patient, mag, idx))
    return root


def make_folder(root: Path) -> Path:
    """root/<class>/<class>_<source>_<n>.png in the DeFungi style; one nested sub-folder."""
    for cls, sources in {"H2": ["10a", "10b"], "H1": ["7a", "8b", "9c"]}.items():
        for src in sources:
            for n in (1, 2):
                tiny_png(root / cls / f"{cls}_{src}_{n}.png")
    tiny_png(root / "H1" / "nested" / "H1_9c_3.PNG")
    return root


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def make_csv(root: Path, with_split: bool = True) -> Path:
    rows = []
    for i, (label, group, split) in enumerate(
        [("cat", "p1", "train"), ("dog", "p2", "train"), ("cat", "p3", "test"), ("dog", "p4", "val")]
    ):
        tiny_png(root / "img" / f"{i:02d}.png")
        rows.append([f"img/{i:02d}.png", label, group] + ([split] if with_split else []) + [f"stain{i}"])
    header = ["path", "label", "group"] + (["split"] if with_split else []) + ["stain"]
    return write_csv(root / "manifest.csv", header, rows[::-1])  # unsorted on purpose


# ------------------------------------------------------------------------------------------------ breakhis


def test_parse_breakhis_name():
    info = parse_breakhis_name("SOB_B_A-14-22549AB-100-001.png")
    assert info == {
        "tumor_class": "benign",
        "subtype": "adenosis",
        "year": 14,
        "patient": "22549AB",
        "case": "22549",
        "magnification": 100,
        "index": 1,
    }
    assert parse_breakhis_name("SOB_M_PC-14-15687B-400-012.png")["case"] == "15687"
    assert parse_breakhis_name("SOB_M_A-14-22549AB-100-001.png") is None  # benign subtype filed as malignant
    assert parse_breakhis_name("holiday.png") is None


@pytest.mark.parametrize("make", [make_breakhis_tree, make_breakhis_flat], ids=["official-tree", "flat"])
def test_breakhis_binary(tmp_path, make):
    root = make(tmp_path / "bh")
    ss = load_samples(DataConfig(source="breakhis", root=str(root)))
    assert ss.class_names == ["benign", "malignant"]
    assert len(ss) == len(BREAKHIS_FILES)
    assert [s.path for s in ss.samples] == sorted(s.path for s in ss.samples)
    assert sorted(ss.labels) == [0] * 5 + [1] * 3
    by_patient = {s.meta["patient"]: s.group for s in ss.samples}
    assert by_patient == {
        "22549AB": "22549",
        "22549CD": "22549",
        "29960AB": "29960",
        "12312": "12312",
        "15687B": "15687",
    }
    first = next(s for s in ss.samples if s.path.endswith("SOB_B_A-14-22549AB-100-001.png"))
    assert first.meta == {
        "patient": "22549AB",
        "magnification": 100,
        "subtype": "adenosis",
        "tumor_class": "benign",
    }
    assert Path(ss.root) == root.resolve()


def test_breakhis_tree_and_flat_agree(tmp_path):
    def key(ss):
        return sorted((Path(s.path).name, s.label, s.group) for s in ss.samples)

    tree = load_samples(DataConfig(source="breakhis", root=str(make_breakhis_tree(tmp_path / "a"))))
    flat = load_samples(DataConfig(source="breakhis", root=str(make_breakhis_flat(tmp_path / "b"))))
    assert key(tree) == key(flat)


def test_breakhis_subtype_and_magnification_filter(tmp_path):
    root = make_breakhis_tree(tmp_path)
    cfg = DataConfig(source="breakhis", root=str(root), task="subtype", magnifications=(100,))
    with pytest.raises(FinescopeError, match="class 'phyllodes_tumor' has no images"):
        load_samples(cfg)
    ss = load_samples(cfg, require_all_classes=False)
    assert len(ss.class_names) == 8 and ss.class_names[0] == "adenosis"
    assert {s.meta["magnification"] for s in ss.samples} == {100}
    assert len(ss) == 6
    assert {ss.class_names[s.label] for s in ss.samples} == {
        "adenosis",
        "fibroadenoma",
        "ductal_carcinoma",
        "papillary_carcinoma",
    }


def test_breakhis_subset_without_a_subtype_says_how_to_train_on_the_others(tmp_path):
    """'remove the class' cannot be done for BreakHis, whose classes data.task sets: the line says what can."""
    root = make_breakhis_flat(tmp_path / "bh")
    with pytest.raises(FinescopeError, match=r"class 'phyllodes_tumor' has no images .*data\.task sets the BreakHis "
                                             r"classes: add images of it, or list .* \(data\.source=csv\)"):
        load_samples(DataConfig(source="breakhis", root=str(root), task="subtype"))


def test_breakhis_bad_magnification(tmp_path):
    root = make_breakhis_flat(tmp_path)
    with pytest.raises(FinescopeError, match="data.magnifications"):
        load_samples(DataConfig(source="breakhis", root=str(root), magnifications=(50,)))


def test_breakhis_bad_name_raises_or_skips(tmp_path):
    root = make_breakhis_flat(tmp_path)
    tiny_png(root / "scan_0001.png")
    with pytest.raises(FinescopeError, match=r"scan_0001\.png.*SOB_<B\|M>"):
        load_samples(DataConfig(source="breakhis", root=str(root)))
    with pytest.warns(UserWarning, match="scan_0001.png"):
        ss = load_samples(DataConfig(source="breakhis", root=str(root), on_error="skip"))
    assert len(ss) == len(BREAKHIS_FILES)
    assert [Path(p).name for p, _ in ss.skipped] == ["scan_0001.png"]


def test_breakhis_source_on_other_data_says_to_change_source(tmp_path):
    tiny_png(tmp_path / "benign" / "p1" / "0.png")  # a folder layout read with data.source=breakhis
    with pytest.raises(FinescopeError, match=r"none of the 1 images under .* has a BreakHis file name .*set "
                       "data.source to folder or csv"):
        load_samples(DataConfig(source="breakhis", root=str(tmp_path), on_error="skip"))


def test_class_names_fix_label_order(tmp_path):
    root = make_breakhis_flat(tmp_path)
    ss = load_samples(DataConfig(source="breakhis", root=str(root)), class_names=["malignant", "benign"])
    assert ss.class_names == ["malignant", "benign"]
    assert all((s.label == 1) == (s.meta["tumor_class"] == "benign") for s in ss.samples)
    with pytest.raises(FinescopeError, match=r"label 'malignant'.*benign, other"):
        load_samples(DataConfig(source="breakhis", root=str(root)), class_names=["benign", "other"])


def test_missing_root_and_no_images(tmp_path):
    with pytest.raises(FinescopeError, match=r"data.root '.*nowhere' does not exist"):
        load_samples(DataConfig(source="breakhis", root=str(tmp_path / "nowhere")))
    # a run's relative root, evaluated from another folder: the line says where it was looked for
    with pytest.raises(FinescopeError, match=r"data.root 'fold1' does not exist \(a relative path: read from "
                       + re.escape(os.getcwd()) + r"\)"):
        load_samples(DataConfig(source="folder", root="fold1"))
    (tmp_path / "empty" / "A").mkdir(parents=True)
    (tmp_path / "empty" / "A" / "notes.txt").write_text("x")
    with pytest.raises(FinescopeError, match=r"found 0 images under .*empty.*\.png"):
        load_samples(DataConfig(source="folder", root=str(tmp_path / "empty")))
    with pytest.raises(FinescopeError, match="found 0 images"):
        load_samples(DataConfig(source="breakhis", root=str(tmp_path / "empty")))


def test_supported_extensions_any_case(tmp_path):
    for i, ext in enumerate(SUPPORTED_EXTENSIONS):
        tiny_png(tmp_path / "cls" / f"img{i}{ext.upper() if i % 2 else ext}")
    (tmp_path / "cls" / ".hidden.png").write_bytes(b"")
    (tmp_path / "cls" / "readme.md").write_text("x")
    ss = load_samples(DataConfig(source="folder", root=str(tmp_path)))
    assert len(ss) == len(SUPPORTED_EXTENSIONS)


# -------------------------------------------------------------------------------------------------- folder


def test_folder_with_group_pattern(tmp_path):
    root = make_folder(tmp_path / "fungi")
    ss = load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^H\d+_([^_]+)_"))
    assert ss.class_names == ["H1", "H2"]
    assert len(ss) == 11
    assert [s.path for s in ss.samples] == sorted(s.path for s in ss.samples)
    nested = next(s for s in ss.samples if s.path.endswith("H1_9c_3.PNG"))
    assert nested.group == "9c" and ss.class_names[nested.label] == "H1"
    assert sorted(set(ss.groups)) == ["10a", "10b", "7a", "8b", "9c"]


def test_magnifications_a_folder_cannot_keep_by_say_so(tmp_path):
    """data.magnifications with data.source folder (a BreakHis config read as class folders) kept every image
    without a word; it says so now, and still reads them all (runs trained so are read as they were)."""
    root = make_folder(tmp_path / "fungi")
    with pytest.warns(FinescopeWarning, match=r"data.magnifications \[100\] keeps no image out: data.source folder "
                      "reads no magnification"):
        ss = load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^H\d+_([^_]+)_",
                                     magnifications=(100,)))
    assert len(ss) == 11
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^H\d+_([^_]+)_"))
    assert not [w for w in caught if "data.magnifications" in str(w.message)]


def test_folder_default_group_is_the_sub_folder_or_the_image(tmp_path):
    root = make_folder(tmp_path)
    with pytest.warns(FinescopeWarning, match="10 of the 11 images under .* lie directly in their class folder, each "
                      "its own group, beside images in patient sub-folders"):
        ss = load_samples(DataConfig(source="folder", root=str(root)))
    assert sorted(set(ss.groups)) == sorted(["nested"] + [f"H{c}/H{c}_{s}_{n}.png" for c, srcs in
                                                          {1: ["7a", "8b", "9c"], 2: ["10a", "10b"]}.items()
                                                          for s in srcs for n in (1, 2)])


def test_folder_patient_sub_folders_are_the_groups(tmp_path, recwarn):
    for cls, patients in {"benign": ["P1", "P2"], "malignant": ["P3", "P1"]}.items():
        for p in patients:
            for n in (1, 2):
                tiny_png(tmp_path / cls / p / "40X" / f"img_{n}.png")
    ss = load_samples(DataConfig(source="folder", root=str(tmp_path)))
    assert ss.groups == ["P1", "P1", "P2", "P2", "P1", "P1", "P3", "P3"]  # P1 under both classes: one group
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]
    # a pattern that does not match the file names is searched in the path below the class folder
    by_magnification = load_samples(DataConfig(source="folder", root=str(tmp_path), group_pattern=r"(\d+)X/"))
    assert set(by_magnification.groups) == {"40"}


def test_folder_groups_that_look_like_no_patients_say_how_to_group_by_patient(tmp_path, recwarn):
    """data.source=folder on the BreakHis tree at breast/ made 'SOB' (each class's only sub-folder) the one group
    of every image, and root/<class>/40X/<patient>/... made the magnifications the groups (one patient on two sides
    of a split): neither said a word at load time. Each now warns in one line how the images are grouped and how
    to group them by patient."""
    breast = make_breakhis_tree(tmp_path / "bh") / "BreaKHis_v1/histology_slides/breast"
    with pytest.warns(FinescopeWarning, match=r"^data\.source=folder groups the images by the first sub-folder below "
                      r"each class folder, and the group 'SOB' holds the images of 5 BreakHis patients \(4 case "
                      r"numbers, .*data\.source=breakhis .*data\.group_pattern .*data\.source=csv\)$"):
        load_samples(DataConfig(source="folder", root=str(breast)))
    for cls, patients in {"benign": ["P1", "P2"], "malignant": ["P3", "P4"]}.items():
        for mag in ("40X", "100X"):
            for p in patients:
                tiny_png(tmp_path / "mags" / cls / mag / p / "img_1.png")
        for n in range(20):  # 20 patients' folders in each class's 'images' folder
            tiny_png(tmp_path / "shared" / cls / "images" / f"{cls}{n}" / "img_1.png")
    with pytest.warns(FinescopeWarning, match=r"the groups '100X', '40X' read as magnifications, not patients") as w:
        load_samples(DataConfig(source="folder", root=str(tmp_path / "mags")))
    assert "breakhis" not in str(w[0].message) and "'^[^/]+/([^/]+)/'" in str(w[0].message)
    with pytest.warns(FinescopeWarning, match=r"the group 'images' holds every image of class benign and images of "
                      r"every other class too \(40 images\): a folder such as this is rarely one patient"):
        load_samples(DataConfig(source="folder", root=str(tmp_path / "shared")))
    recwarn.clear()  # grouped by patient as the warnings say: no word
    ss = load_samples(DataConfig(source="folder", root=str(tmp_path / "mags"), group_pattern=r"^[^/]+/([^/]+)/"))
    assert sorted(set(ss.groups)) == ["P1", "P2", "P3", "P4"]
    load_samples(DataConfig(source="breakhis", root=str(breast)))
    load_samples(DataConfig(source="folder", root=str(breast),
                            group_pattern=r"-(\d+)[A-Z]*-\d+-\d+\.png$"))  # the case number
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]


def test_folder_without_groups_warns_that_splits_are_image_level(tmp_path):
    for cls in ("a", "b"):
        for n in (1, 2):
            tiny_png(tmp_path / cls / f"{n}.png")
    with pytest.warns(FinescopeWarning, match=r"no root/<class>/<patient>/ sub-folders\) and data.group_pattern "
                      r"is empty, so each of the 4 images is its own group"):
        load_samples(DataConfig(source="folder", root=str(tmp_path)))


def test_folder_pattern_matching_nothing_says_so(tmp_path):
    root = make_folder(tmp_path)
    with pytest.raises(FinescopeError, match=r"does not match data.group_pattern '\^P\(\\d\+\)'; fix "
                       "data.group_pattern, or set data.on_error=skip to leave such files out$"):
        load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^P(\d+)"))
    with pytest.warns(FinescopeWarning), pytest.raises(FinescopeError, match=r"^all 11 images under .* were "
                                                       "skipped, the first: 'H1_7a_1.png' \\(below class folder"):
        load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^P(\d+)", on_error="skip"))


def test_classes_differing_only_in_case_are_refused(tmp_path):
    for cls in ("Benign", "benign", "malignant"):
        tiny_png(tmp_path / "img" / f"{cls}.png")
    write_csv(tmp_path / "m.csv", ["path", "label", "group"],
              [[f"img/{c}.png", c, c] for c in ("Benign", "benign", "malignant")])
    with pytest.raises(FinescopeError, match=r"classes 'Benign' and 'benign' differ only in letter case \(e.g. "
                       r"'.*img/Benign.png' and '.*img/benign.png' under"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))


def test_folder_deterministic(tmp_path):
    root = make_folder(tmp_path)
    cfg = DataConfig(source="folder", root=str(root), group_pattern=r"_(\w+?)_")
    assert load_samples(cfg) == load_samples(cfg)


def test_folder_pattern_errors(tmp_path):
    root = make_folder(tmp_path)
    tiny_png(root / "H2" / "odd-name.png")
    with pytest.raises(FinescopeError, match=r"odd-name\.png.*data.group_pattern"):
        load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^H\d+_([^_]+)_"))
    with pytest.raises(FinescopeError, match=r"data.group_pattern.*not a valid regex"):
        load_samples(DataConfig(source="folder", root=str(root), group_pattern="^H(["))
    with pytest.raises(FinescopeError, match=r"data.group_pattern.*no capture group"):
        load_samples(DataConfig(source="folder", root=str(root), group_pattern=r"^H\d+"))


def test_folder_empty_class_and_no_class_folders(tmp_path):
    root = make_folder(tmp_path / "a")
    (root / "H9").mkdir()
    with pytest.raises(FinescopeError, match="class 'H9' has no images"):
        load_samples(DataConfig(source="folder", root=str(root)))
    assert (
        load_samples(DataConfig(source="folder", root=str(root)), require_all_classes=False).class_names[-1]
        == "H9"
    )
    tiny_png(tmp_path / "flat" / "x.png")
    with pytest.raises(FinescopeError, match="no class sub-folders"):
        load_samples(DataConfig(source="folder", root=str(tmp_path / "flat")))


@pytest.mark.parametrize("sides", [("train", "test"), ("Train", "Validation", "Test")])
def test_folder_whose_class_folders_are_the_sides_of_a_split_says_so(tmp_path, sides):
    """A dataset shipped as root/train/<class>/... and root/test/<class>/... read with data.root=root gave a model of
    the classes 'test' and 'train', without a word (found in review): it is one line naming the folder to read."""
    for side in sides:
        for c in ("benign", "malignant"):
            tiny_png(tmp_path / side / c / f"{side}_{c}.png")
    with pytest.raises(FinescopeError, match=rf"data.root '{re.escape(str(tmp_path))}' holds the folders "
                                             rf"{', '.join(sorted(sides))}, the sides of a split, not classes; point "
                                             rf"data.root at the folder whose sub-folders are the classes, e.g. "
                                             rf"{re.escape(str(tmp_path / sides[0]))} "):
        load_samples(DataConfig(source="folder", root=str(tmp_path)))


# ----------------------------------------------------------------------------------------------------- csv


def test_csv_with_split_column(tmp_path):
    manifest = make_csv(tmp_path / "set")
    ss = load_samples(DataConfig(source="csv", root=str(manifest)))
    assert ss.class_names == ["cat", "dog"]
    assert [Path(s.path).name for s in ss.samples] == ["00.png", "01.png", "02.png", "03.png"]
    assert ss.preset_splits == ["train", "train", "test", "val"]
    assert ss.groups == ["p1", "p2", "p3", "p4"]
    assert ss.labels == [0, 1, 0, 1]
    assert ss.samples[2].meta == {"stain": "stain2"}
    assert Path(ss.root) == manifest.parent.resolve()
    assert load_samples(DataConfig(source="csv", root=str(manifest.parent))) == ss  # folder with manifest.csv


def test_csv_without_a_magnification_column_under_data_magnifications_says_it_has_none(tmp_path):
    """A BreakHis config (magnifications: [100]) switched to a CSV of no magnification column was told the CSV
    'lists no image at data.magnifications [100] in its magnification column', a column it does not have."""
    manifest = make_csv(tmp_path / "set")
    with pytest.raises(FinescopeError, match="has no 'magnification' column.*data.magnifications=\\[\\]"):
        load_samples(DataConfig(source="csv", root=str(manifest), magnifications=(100,)))


def test_csv_without_group_or_split(tmp_path):
    tiny_png(tmp_path / "a.png")
    tiny_png(tmp_path / "sub" / "b.png")
    manifest = write_csv(tmp_path / "list.csv", ["path", "label"], [["sub/b.png", "y"], ["a.png", "x"]])
    with pytest.warns(FinescopeWarning, match=r"list.csv' has no 'group' or 'patient' column \(add one naming each image's "
                      r"patient or specimen\), so each of the 2 images is its own group"):
        ss = load_samples(DataConfig(source="csv", root=str(manifest)))
    assert ss.groups == ["a.png", "sub/b.png"] and ss.preset_splits is None
    named = write_csv(tmp_path / "named.csv", ["path", "label", "patient_id", "stain"],
                      [["sub/b.png", "y", "P1", "HE"], ["a.png", "x", "P1", "HE"]])
    with pytest.warns(FinescopeWarning, match=r"named.csv' has no 'group' or 'patient' column \(its other columns: patient_id, "
                      r"stain; rename the patient or specimen column to 'group'\)"):
        load_samples(DataConfig(source="csv", root=str(named)))


def test_a_csv_whose_group_column_looks_like_no_patients_says_so(tmp_path, recwarn):
    """A CSV manifest whose group or patient column held magnifications ('40X', '100X') or one name for every
    image ('SOB') was read without a word, where the same grouping by folders warns: one patient's images then sat
    on both sides of a split. It now warns in one line naming the CSV and its column, and what to write there."""
    breast = make_breakhis_tree(tmp_path / "bh") / "BreaKHis_v1/histology_slides/breast"
    images = sorted(breast.rglob("*.png"))
    rows = [[p.relative_to(tmp_path).as_posix(), p.parts[len(breast.parts)], parse_breakhis_name(p.name)]
            for p in images]
    sob = write_csv(tmp_path / "sob.csv", ["path", "label", "group"], [[p, c, "SOB"] for p, c, _ in rows])
    with pytest.warns(FinescopeWarning, match=r"^CSV manifest '.*sob\.csv' groups the images by its 'group' column, "
                      r"and the group 'SOB' holds the images of 5 BreakHis patients \(4 case numbers, .*"
                      r"data\.source=breakhis .*write each image's case number in the 'group' column of '.*sob\.csv'"):
        load_samples(DataConfig(source="csv", root=str(sob)))
    mags = write_csv(tmp_path / "mags.csv", ["path", "label", "patient"],
                     [[p, c, f"{info['magnification']}X"] for p, c, info in rows])
    with pytest.warns(FinescopeWarning, match=r"^CSV manifest '.*mags\.csv' groups the images by its 'patient' "
                      r"column, and the groups '100X', '400X', '40X' read as magnifications, not patients") as w:
        load_samples(DataConfig(source="csv", root=str(mags)))
    assert "group_pattern" not in str(w[0].message) and "data.source=folder" not in str(w[0].message)
    assert "'magnification' column" in str(w[0].message)
    recwarn.clear()  # the patients' case numbers, or the patients with their case as the group: no word
    cases = write_csv(tmp_path / "cases.csv", ["path", "label", "patient"], [[p, c, i["case"]] for p, c, i in rows])
    load_samples(DataConfig(source="csv", root=str(cases)))
    both = write_csv(tmp_path / "both.csv", ["path", "label", "group", "patient"],
                     [[p, c, i["case"], i["patient"]] for p, c, i in rows])
    load_samples(DataConfig(source="csv", root=str(both)))
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]

def test_groups_that_differ_only_in_letter_case_say_so(tmp_path, recwarn):
    """A spreadsheet's 'P01' and 'p01' (one patient typed two ways?) were two groups without a word, which a split
    may put on two sides. A CSV column or patient folders so named now warn in one line, and keep them apart."""
    rows = [["0.png", "a", "P01"], ["1.png", "a", "p01"], ["2.png", "b", "P02"], ["3.png", "b", "P03"]]
    for name, label, group in rows:
        tiny_png(tmp_path / name)
        tiny_png(tmp_path / "f" / label / group / name)
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "group"], rows)
    with pytest.warns(FinescopeWarning, match=r"^CSV manifest '.*m\.csv' groups the images by its 'group' column, "
                      r"and the groups 'P01' and 'p01' differ only in letter case: .* two sides; .*write each "
                      r"patient's id alike in every row of the 'group' column of '.*m\.csv'"):
        sample_set = load_samples(DataConfig(source="csv", root=str(manifest)))
    assert len(set(sample_set.groups)) == 4
    with pytest.warns(FinescopeWarning, match=r"^data\.source=folder groups the images by the first sub-folder below "
                      r"each class folder, and the groups 'P01' and 'p01' differ only in letter case: .*name each "
                      r"patient's folders alike"):
        load_samples(DataConfig(source="folder", root=str(tmp_path / "f")))
    recwarn.clear()
    rows[1][2] = "P04"
    load_samples(DataConfig(source="csv", root=str(write_csv(tmp_path / "apart.csv", ["path", "label", "group"], rows))))
    assert not [w for w in recwarn if "letter case" in str(w.message)]


@pytest.mark.parametrize("source", ["breakhis", "folder", "synthetic"])
def test_a_csv_given_as_data_root_of_another_source_says_to_set_data_source_csv(tmp_path, source):
    """data.root=my.csv under a config of another source (the default synthetic one, a BreakHis or a folder
    config) said it needs a folder, and the synthetic source 'give a new or empty one', which would train on
    generated images: none said that data.source=csv reads a CSV manifest."""
    manifest = make_csv(tmp_path / "set")
    with pytest.raises(FinescopeError, match=rf"^data\.root '.*manifest\.csv' is a file; data\.source={source} .*; "
                       r"to read the images this CSV manifest lists, set data\.source=csv$"):
        load_samples(DataConfig(source=source, root=str(manifest)))

def test_csv_errors(tmp_path):
    tiny_png(tmp_path / "a.png")
    bad = write_csv(tmp_path / "nolabel.csv", ["path", "group"], [["a.png", "g"]])
    with pytest.raises(FinescopeError, match=r"nolabel\.csv.*'label' column"):
        load_samples(DataConfig(source="csv", root=str(bad)))
    missing = write_csv(tmp_path / "missing.csv", ["path", "label"], [["a.png", "x"], ["gone.png", "y"]])
    with pytest.raises(FinescopeError, match=r"gone\.png.*missing\.csv"):
        load_samples(DataConfig(source="csv", root=str(missing)))
    with pytest.warns(UserWarning, match="gone.png"):
        ss = load_samples(
            DataConfig(source="csv", root=str(missing), on_error="skip"), require_all_classes=False
        )
    assert len(ss) == 1 and len(ss.skipped) == 1
    split = write_csv(tmp_path / "split.csv", ["path", "label", "split"], [["a.png", "x", "holdout"]])
    with pytest.raises(FinescopeError, match=r"split\.csv.*'holdout'.*train, val, test"):
        load_samples(DataConfig(source="csv", root=str(split)))
    dup = write_csv(tmp_path / "dup.csv", ["path", "label"], [["a.png", "x"], ["./a.png", "y"]])
    with pytest.raises(FinescopeError, match=r"dup\.csv' line 3 lists './a\.png' again, with label 'y'"):
        load_samples(DataConfig(source="csv", root=str(dup)))
    with pytest.raises(FinescopeError, match="without manifest.csv"):
        load_samples(DataConfig(source="csv", root=str(tmp_path)))
    tiny_png(tmp_path / "b.png")
    blank = write_csv(tmp_path / "blank.csv", ["path", "label", "group"], [["a.png", "x", "P1"], ["b.png", "x", ""]])
    with pytest.raises(FinescopeError, match=r"blank\.csv' line 3 has an empty group; give every row its patient"):
        load_samples(DataConfig(source="csv", root=str(blank)))
    blank.write_text("path,label,group\n\na.png,x,P1\n\nb.png,x,\n")  # blank lines: the file's own line numbers
    with pytest.raises(FinescopeError, match=r"blank\.csv' line 5 has an empty group"):
        load_samples(DataConfig(source="csv", root=str(blank)))
    latin = tmp_path / "latin.csv"  # Excel's plain "CSV" on Windows: cp1252
    latin.write_bytes("path,label,group\na.png,x,Patient é\n".encode("cp1252"))
    with pytest.raises(FinescopeError, match=r"latin\.csv': it is not UTF-8 .*; save it as UTF-8"):
        load_samples(DataConfig(source="csv", root=str(latin)))


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_reads_generated_manifest(tmp_path, monkeypatch):
    import finescope.data.synthetic as synthetic

    calls = []

    def fake_ensure(root, per_class, size, seed):
        calls.append((Path(root), per_class, size, seed))
        rows = []
        for i in range(2 * per_class):
            tiny_png(Path(root) / "images" / f"{i:02d}.png", size=(size, size))
            rows.append([f"images/{i:02d}.png", ["a", "b"][i % 2], f"g{i}"])
        return write_csv(Path(root) / "manifest.csv", ["path", "label", "group"], rows)

    monkeypatch.setattr(synthetic, "ensure_synthetic", fake_ensure)
    cfg = DataConfig(source="synthetic", root=str(tmp_path / "syn"), synthetic_per_class=3, synthetic_size=8)
    ss = load_samples(cfg)
    assert calls == [(tmp_path / "syn", 3, 8, 0)]
    assert len(ss) == 6 and ss.class_names == ["a", "b"]


def test_the_demo_set_is_read_without_a_word(synthetic_root, recwarn):
    cfg = DataConfig(source="synthetic", root=str(synthetic_root), synthetic_per_class=20, synthetic_size=128)
    assert len(load_samples(cfg)) == 40
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]


# ------------------------------------------------------------------------------------------------ real data


@realdata
@pytest.mark.realdata
@pytest.mark.parametrize("task,n_classes", [("binary", 2), ("subtype", 8)])
def test_real_breakhis(task, n_classes, recwarn):
    ss = load_samples(DataConfig(source="breakhis", root=str(SHARED_DATA / "breakhis"), task=task))
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]
    assert len(ss) == 296 and len(ss.class_names) == n_classes
    assert len({s.meta["patient"] for s in ss.samples}) == 18
    assert len(set(ss.groups)) == 14
    if task == "binary":
        assert np.bincount(ss.labels).tolist() == [168, 128]
    assert {s.group for s in ss.samples if s.meta["patient"] in ("22549AB", "22549CD", "22549G")} == {"22549"}


@realdata
@pytest.mark.realdata
def test_a_csv_of_the_real_breakhis_images_by_case_number_is_read_without_a_word(tmp_path, recwarn):
    """The CSV grouping check on real data: BreakHis images listed with their case number as the group (and
    their patient) give no warning; by patient folder alone (22549AB, 22549CD: one case) they are named."""
    images = sorted((SHARED_DATA / "breakhis").rglob("*.png"))
    rows = [(str(p), parse_breakhis_name(p.name)) for p in images]
    both = write_csv(tmp_path / "both.csv", ["path", "label", "group", "patient"],
                     [[p, i["tumor_class"], i["case"], i["patient"]] for p, i in rows])
    assert len(set(load_samples(DataConfig(source="csv", root=str(both))).groups)) == 14
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]
    patients = write_csv(tmp_path / "patients.csv", ["path", "label", "patient"],
                         [[p, i["tumor_class"], i["patient"]] for p, i in rows])
    with pytest.warns(FinescopeWarning, match=r"by its 'patient' column, and the BreakHis case number \d+ .*lies in "
                      r"the groups .*write each image's case number in a 'group' column"):
        load_samples(DataConfig(source="csv", root=str(patients)))

@realdata
@pytest.mark.realdata
def test_real_defungi_sources_stay_on_one_side(recwarn):
    cfg = DataConfig(source="folder", root=str(SHARED_DATA / "defungi"), group_pattern=r"^H\d+_([^_]+)_")
    ss = load_samples(cfg)
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]  # the groups look like patients
    assert ss.class_names == ["H1", "H2", "H3", "H5", "H6"] and len(ss) == 6440
    assert np.bincount(ss.labels).tolist() == [2927, 1829, 567, 580, 537]
    splits = split_groups(ss.labels, ss.groups, 0.3, 0.15, seed=0)
    side_of = {}
    for side, idx in splits.items():
        for i in idx:
            source = re.match(r"^H\d+_([^_]+)_", Path(ss.samples[i].path).name).group(1)
            assert side_of.setdefault(source, side) == side
    assert sum(len(v) for v in splits.values()) == 6440


def test_a_split_that_parts_groups_merge_duplicates_joined_says_why(tmp_path):
    """A CSV's split column that puts an image on one side and its byte-identical copy, of another group, on the
    other, under data.merge_duplicates: the error said "group 's1+s2' is on both 'train' and 'test'", not why two
    groups were one. It names the groups the merge joined and why; a given data.splits file says the same."""
    from finescope.config import load_config
    from finescope.data import save_splits
    from finescope.trainer import resolve_splits

    rows = [["0.png", "a", "s1", "train", 10], ["1.png", "a", "s2", "test", 10], ["2.png", "a", "s3", "train", 99],
            ["3.png", "b", "s4", "train", 50], ["4.png", "b", "s5", "test", 60], ["5.png", "b", "s6", "train", 70]]
    for name, *_, colour in rows:
        Image.new("RGB", (8, 8), (colour, 0, 0)).save(tmp_path / name)
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "group", "split"], [r[:4] for r in rows])
    cfg = load_config(None, ["data.source=csv", f"data.root={manifest}", "data.merge_duplicates=true"])
    sample_set = load_samples(cfg.data)
    why = (r"group 's1\+s2' is on both 'train' and 'test'.*; 's1\+s2' is the data's groups 's1', 's2', joined in one "
           r"by data\.merge_duplicates because they hold byte-identical images: put their images on one side")
    with pytest.raises(FinescopeError, match=r"^the split column of '.*m\.csv': split leak: " + why):
        resolve_splits(cfg, sample_set, tmp_path / "run", resume=False)
    plain = load_samples(load_config(None, ["data.source=csv", f"data.root={manifest}"]).data)
    save_splits(tmp_path / "splits.json", {side: np.array([i for i, r in enumerate(rows) if r[3] == side])
                                           for side in ("train", "test")}, plain)
    given = load_config(None, ["data.source=csv", f"data.root={manifest}", "data.merge_duplicates=true",
                               f"data.splits={tmp_path / 'splits.json'}"])
    with pytest.raises(FinescopeError, match=r"^splits file '.*splits\.json': split leak: " + why):
        resolve_splits(given, sample_set, tmp_path / "run", resume=False)


def test_merge_duplicates_joins_groups_of_identical_files(tmp_path):
    from PIL import Image

    from finescope.config import DataConfig

    for cls, name, colour in (("a", "a_s1_1.png", 10), ("a", "a_s2_1.png", 10), ("a", "a_s3_1.png", 99),
                              ("b", "b_s4_1.png", 50), ("b", "b_s5_1.png", 60)):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (colour, 0, 0)).save(tmp_path / cls / name)
    cfg = DataConfig(source="folder", root=str(tmp_path), group_pattern=r"^[ab]_(s\d)_")
    plain = load_samples(cfg)
    assert len(set(plain.groups)) == 5
    merged = load_samples(DataConfig(**{**cfg.__dict__, "merge_duplicates": True}))
    groups = {Path(s.path).name: s.group for s in merged.samples}
    assert groups["a_s1_1.png"] == groups["a_s2_1.png"] == "s1+s2"
    assert len(set(merged.groups)) == 4
    assert merged.samples[0].meta["source_group"] in ("s1", "s2")


@realdata
@pytest.mark.realdata
def test_real_defungi_duplicates_never_span_groups_when_merged():
    from finescope.config import load_config
    from finescope.data.summary import describe_samples, format_description

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "defungi.yaml", [f"data.root={SHARED_DATA / 'defungi'}"])
    assert cfg.data.merge_duplicates
    d = describe_samples(load_samples(cfg.data), read_images=True)
    assert d["duplicates"] and d["duplicates_across_groups"] == 0
    # the sets the merge joined, which the config's comment counts (finescope data said 0 spanning two groups)
    assert d["duplicates_joined"] == 19 and "(19 spanned two of the data's groups" in format_description(d)


def test_synthetic_generation_resumes_an_interrupted_one_and_refuses_other_folders(tmp_path):
    from finescope.data.synthetic import ensure_synthetic, generate

    root = tmp_path / "syn"
    generate(root, per_class=2, size=64)
    (root / "spec.json").unlink()  # a generation killed before its last file
    (root / "manifest.csv").unlink()
    assert ensure_synthetic(root, per_class=2, size=64).is_file()
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "images" / "slide_01.png").write_bytes(b"x")
    with pytest.raises(FinescopeError, match="not a finescope synthetic set"):
        ensure_synthetic(other, per_class=2, size=64)
    assert sorted(p.name for p in (other / "images").iterdir()) == ["slide_01.png"]


def test_a_generation_with_other_settings_stopped_midway_is_not_taken_for_the_earlier_set(tmp_path, monkeypatch):
    """A set generated again with other settings into the same root (`demo --quick`, then `train --config
    configs/demo.yaml`, both runs/demo/data) and stopped after its first image left the earlier set's spec.json and
    manifest.csv over images of both settings: the earlier settings then read that mix as their complete set."""
    from PIL import Image

    from finescope.data.synthetic import ensure_synthetic, generate

    root = tmp_path / "syn"
    generate(root, per_class=2, size=64)
    real_save, saved = Image.Image.save, []

    def save_then_stop(self, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(real_save(self, *args, **kwargs))

    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, per_class=2, size=96)
    monkeypatch.undo()
    ensure_synthetic(root, per_class=2, size=64)
    assert {Image.open(p).size for p in (root / "images").iterdir()} == {(64, 64)}

def test_images_in_keeps_each_image_once_in_the_order_given(tmp_path):
    from finescope.data.sources import images_in

    root = make_folder(tmp_path / "fungi")
    one = root / "H2" / "H2_10a_1.png"
    (tmp_path / "link.png").symlink_to(one)
    got = images_in([one, root, tmp_path / "link.png"])
    assert got[0] == (one, root / "H2") and len(got) == 11 and [f for f, _ in got].count(one) == 1
    with pytest.raises(FinescopeError, match="is not an image file"):
        images_in([tmp_path / "fungi" / "H1"] + [make_csv(tmp_path / "set")])


def test_images_in_a_folder_leave_out_the_figures_finescope_wrote_there_and_say_so(tmp_path):
    """predict RUN FOLDER (and explain RUN FOLDER) of a folder holding finescope's outputs (a run folder with its
    report_files/ and explain_test/) read its report figures and explain's gallery as images to predict (231 in
    a walkthrough's run). Figures finescope wrote, beside what marks them (REPORT.md or .html; explain's
    faithfulness.json; the demo's demo_results.json), are left out with one warning saying how many and why;
    the same names without those marks, and a figure given by name, are read."""
    from finescope.data.sources import images_in

    root = tmp_path / "project"
    scans = [tiny_png(root / "scans" / "a.png"), tiny_png(root / "run" / "page_files" / "figure_1.png"),
             tiny_png(root / "mine" / "images" / "00001_b.png")]  # no report.md / faithfulness.json beside them
    (root / "run" / "report.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "run" / "report.md").write_text("# report\n")
    (root / "run" / "explain_test").mkdir()
    (root / "run" / "explain_test" / "faithfulness.json").write_text("{}")
    (root / "demo_results.json").write_text("{}")
    figures = [tiny_png(root / "run" / "report_files" / "figure_1.png"),
               tiny_png(root / "run" / "explain_test" / "images" / "00000_a.png"),
               tiny_png(root / "run" / "explain_test" / "evidence" / "typical" / "01.png"),
               tiny_png(root / "run" / "explain_test" / "faithfulness.png"), tiny_png(root / "attention_overlay.png")]
    with pytest.warns(FinescopeWarning, match=r"left out 5 figures finescope wrote under '.*project'"):
        got = images_in([root])
    assert sorted(f for f, _ in got) == sorted(scans)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [f for f, _ in images_in([figures[1]])] == [figures[1]]  # given by name: read
    with pytest.raises(FinescopeError, match="found no images .*left out 3 figures finescope wrote"), \
            pytest.warns(FinescopeWarning):
        images_in([root / "run" / "explain_test"])


def test_a_path_given_to_predict_that_does_not_exist_is_said_not_to_exist(tmp_path):
    """predict RUN typo.jpg was told "'typo.jpg' is neither an image file nor a folder", as if it were a pipe."""
    from finescope.data.sources import images_in

    with pytest.raises(FinescopeError, match="'.*H1_100a_1.jpg' does not exist; check the path"):
        images_in([make_folder(tmp_path / "fungi") / "H1" / "H1_100a_1.jpg"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_named_like_an_image_is_no_image(tmp_path):
    """A named pipe (or socket, device) called x.png in a folder was listed as an image: predict, data and train
    then blocked for ever opening it. Only regular files (and links, also broken ones, said unreadable later)
    are images; a folder's pipe is left out."""
    from finescope.data.sources import find_images, images_in

    good = tiny_png(tmp_path / "in" / "a.png")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    (tmp_path / "in" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    assert find_images(tmp_path / "in") == [good, good.parent / "broken.png"]
    assert [f for f, _ in images_in([tmp_path / "in"])] == [good, good.parent / "broken.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_listed_in_a_csv_manifest_is_named_as_no_regular_file(tmp_path):
    """A named pipe listed in a CSV manifest was reported as 'does not exist', though `ls` shows it there."""
    tiny_png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "m.csv").write_text("path,label,group\na.png,x,p1\npipe.png,y,p2\n")
    with pytest.raises(FinescopeError, match=r"'.*pipe.png' listed in CSV manifest '.*m.csv' line 3 is not a "
                                             r"regular file \(a named pipe, socket or device\)"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))


@pytest.mark.skipif(os.sep != "/", reason="a backslash is a separator where os.sep is one")
def test_a_csv_path_written_with_backslashes_is_read_with_slashes(tmp_path):
    """A manifest made on Windows (path 'sub\\a.png') was refused with "does not exist: it is written with '\\'
    ...; write it as 'sub/a.png'", though what it meant was plain: such a path that names no file here is now read
    with '/'; one that names no file either way, or a Windows drive path, says what to write."""
    tiny_png(tmp_path / "sub dir" / "a.png")
    tiny_png(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("path,label,group\nsub dir\\a.png,x,p1\n.\\b.png,y,p2\n")
    ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert [s.path for s in ss.samples] == [str(tmp_path / "b.png"), str(tmp_path / "sub dir" / "a.png")]
    (tmp_path / "gone.csv").write_text("path,label,group\nsub\\gone.png,x,p1\n")  # not there either way: as before
    with pytest.raises(FinescopeError, match=r"line 2 does not exist; fix or remove the file"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "gone.csv")))
    (tmp_path / "drive.csv").write_text("path,label,group\nC:\\Users\\lab\\a.png,x,p1\n")
    with pytest.raises(FinescopeError, match=r"line 2 does not exist: it is a Windows path; write it relative to "
                                             r"the CSV's folder or as a path on this machine"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "drive.csv")))


def test_a_csv_path_relative_to_the_working_folder_not_the_csvs_says_so(tmp_path, monkeypatch):
    """A manifest written from a notebook's working folder (paths relative to it) and saved in another folder
    said only "... does not exist; fix or remove the file, or set data.on_error=skip": skipping would leave out
    every row. The line now says that relative paths are read from the CSV's folder (found in review)."""
    tiny_png(tmp_path / "img" / "a.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("path,label,group\nimg/a.png,x,p1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FinescopeError, match=r"m\.csv' line 2 does not exist: relative paths are read from the "
                                             r"CSV's folder '.*lists', and 'img/a\.png' names a file in the working "
                                             r"folder; write the paths relative to the CSV's folder, or absolute"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "lists" / "m.csv")))


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_with_semicolons_or_tabs_is_read_by_its_header(tmp_path, sep):
    """European Excel saves 'CSV UTF-8' with ';' between cells (a BOM and CRLF too), and 'Text' with tabs: such
    a manifest was refused with "has no 'path' column (columns: path;label;group)"; its header now names the
    separator, and a ',' inside a cell stays in the cell."""
    make_csv(tmp_path)
    rows = ["path;label;group;note", "img/00.png;cat;p1;big, round", "img/01.png;dog;p2;x"]
    (tmp_path / "m.csv").write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").replace(";", sep).encode())
    ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert [(s.group, s.meta["note"]) for s in ss.samples] == [("p1", "big, round"), ("p2", "x")]
    excel = tmp_path / "excel.csv"  # a 'sep=' line before the header, as Excel writes and reads it
    excel.write_text(f"sep={sep}\r\n" + "\r\n".join(rows).replace(";", sep) + "\r\n")
    assert load_samples(DataConfig(source="csv", root=str(excel))).samples == ss.samples


def test_csv_column_names_are_read_in_any_case(tmp_path):
    """A spreadsheet's header 'Path,Label,Group,Split' was refused ("has no 'path' column (columns: Path, ...)");
    finescope's own columns are now read in any letter case, other columns keep theirs, and two columns that
    name one in different cases are refused, naming both."""
    make_csv(tmp_path)
    (tmp_path / "m.csv").write_text("PATH,Label,Group,Split,Stain\nimg/00.png,cat,p1,Train,HE\nimg/01.png,dog,p2,test,x\n")
    ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert [(s.group, s.meta) for s in ss.samples] == [("p1", {"Stain": "HE"}), ("p2", {"Stain": "x"})]
    assert ss.preset_splits == ["train", "test"]
    (tmp_path / "two.csv").write_text("path,label,Label\nimg/00.png,cat,dog\n")
    with pytest.raises(FinescopeError, match=r"two\.csv' has the columns 'label' and 'Label'; keep one"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "two.csv")))


def test_a_csv_patient_column_is_the_group_when_there_is_no_group_column(tmp_path, recwarn):
    """A spreadsheet with a 'Patient' column but no 'group' one split images of one patient across train and
    test (each image its own group, with a warning to rename the column); the patient column is now the group,
    and an empty patient cell is refused as an empty group is."""
    make_csv(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,Patient\nimg/00.png,cat,A\nimg/01.png,dog,A\nimg/02.png,cat,B\n")
    ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert [(s.group, s.patient) for s in ss.samples] == [("A", "A"), ("A", "A"), ("B", "B")]
    assert not [w for w in recwarn if issubclass(w.category, FinescopeWarning)]
    (tmp_path / "e.csv").write_text("path,label,patient\nimg/00.png,cat,A\nimg/01.png,dog,\n")
    with pytest.raises(FinescopeError, match=r"e\.csv' line 3 has an empty patient; give every row its patient"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "e.csv")))


def test_csv_rows_with_every_cell_empty_are_skipped(tmp_path):
    """Excel exports the formatted but empty rows below a table as ',,' (or ';;'): such a manifest was refused
    with "line 4 has an empty path or label"; a row whose cells are all empty is now skipped like a blank line,
    and a row with only its path or only its label still names its line."""
    make_csv(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,group\r\nimg/00.png,cat,p1\r\nimg/01.png,dog,p2\r\n,,\r\n , ,\r\n,,\r\n")
    assert len(load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))) == 2
    (tmp_path / "half.csv").write_text("path,label,group\nimg/00.png,cat,p1\nimg/01.png,,p2\n,,\n")
    with pytest.raises(FinescopeError, match=r"half\.csv' line 3 has an empty path or label"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "half.csv")))


def test_csv_image_listed_twice_is_kept_once_when_the_rows_agree(tmp_path):
    """An image listed twice (a row pasted twice) was refused even where both rows say the same; it is now read
    once with a warning naming both lines, and refused, naming both lines and what differs, where the rows give
    it two labels, groups or splits (which one is meant cannot be told)."""
    make_csv(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,group\nimg/00.png,cat,p1\nimg/01.png,dog,p2\n./img/00.png,cat,p1\n")
    with pytest.warns(FinescopeWarning, match=r"m\.csv' lists 'img/00\.png' on lines 2 and 4, with the same label, "
                                              r"group and split; read once"):
        ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert [Path(s.path).name for s in ss.samples] == ["00.png", "01.png"]
    (tmp_path / "two.csv").write_text("path,label,group\nimg/00.png,cat,p1\nimg/01.png,dog,p2\nimg/00.png,dog,p1\n")
    with pytest.raises(FinescopeError, match=r"two\.csv' line 4 lists 'img/00\.png' again, with label 'dog' where "
                                             r"line 2 has 'cat'; remove the wrong row"):
        load_samples(DataConfig(source="csv", root=str(tmp_path / "two.csv")))


def test_a_multi_page_tiff_in_a_manifest_is_named_by_finescope_data(tmp_path):
    """A microscope's multi-page TIFF (a z-stack, channels or a pyramid) was read as its first page without a
    word; `finescope data` now lists such files with their page counts, and says that only the first is read."""
    from finescope.data import describe_samples, format_description

    pages = [Image.new("RGB", (16, 12), (v, v, v)) for v in (60, 120, 180)]
    pages[0].save(tmp_path / "stack.TIF", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "one.tif")
    (tmp_path / "m.csv").write_text("path,label,group\nstack.TIF,x,p1\none.tif,y,p2\n")
    d = describe_samples(load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv"))))
    assert d["multi_page"] == [[str(tmp_path / "stack.TIF"), 3]]
    assert "multi-page files, read as their first page only: 1\n  stack.TIF: 3 pages" in format_description(d)


def test_a_csv_manifest_given_to_predict_says_that_evaluate_reads_it(tmp_path):
    """`finescope predict RUN manifest.csv` said only "is not an image file; supported: .png, ...", leaving a
    user with a spreadsheet of labelled images no way on; it now names the command that scores them."""
    from finescope.data.sources import images_in

    with pytest.raises(FinescopeError, match=r"manifest\.csv' is not an image file but a table: predict reads images and "
                                             r"folders; evaluate RUN --set data.source=csv data.root=.*manifest\.csv "
                                             r"scores the images a CSV manifest lists"):
        images_in([make_csv(tmp_path / "set"), tmp_path / "set" / "img"])


def test_the_evaluate_that_predict_names_for_a_csv_reads_a_path_with_spaces_as_one(tmp_path):
    """The command named for a manifest in a folder with a space ('my data/list.csv') was written unquoted: pasted,
    the shell cut data.root at the space and evaluate took the rest for another argument."""
    import shlex

    from finescope.data.sources import images_in

    with pytest.raises(FinescopeError) as e:
        images_in([make_csv(tmp_path / "my set")])
    command = str(e.value).split("; ")[1].removesuffix(" scores the images a CSV manifest lists")
    assert shlex.split(command) == ["evaluate", "RUN", "--set", "data.source=csv",
                                    f"data.root={tmp_path / 'my set' / 'manifest.csv'}"]


def test_a_csv_saved_as_excel_unicode_text_is_read(tmp_path):
    """Excel's "Unicode Text" saves UTF-16 with a BOM and tabs between cells: such a manifest was refused as
    "not UTF-8"; a UTF-16 file (it starts with its BOM) is now decoded as such."""
    make_csv(tmp_path)
    text = "\ufeffpath\tlabel\tgroup\r\nimg/00.png\tcat\tMüller\r\nimg/01.png\tdog\tp2\r\n"
    (tmp_path / "m.csv").write_bytes(text.encode("utf-16-le"))
    (tmp_path / "be.csv").write_bytes(text.encode("utf-16-be"))
    for name in ("m.csv", "be.csv"):
        ss = load_samples(DataConfig(source="csv", root=str(tmp_path / name)))
        assert [s.group for s in ss.samples] == ["Müller", "p2"]


def test_csv_labels_that_are_one_number_written_two_ways_are_warned_about(tmp_path):
    """Labels 1 and 1.0 (a number column a spreadsheet exported in two formats) became two classes without a
    word; they stay two classes (finescope cannot tell whether they are one), with a warning naming them."""
    make_csv(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,group\nimg/00.png,0,p1\nimg/01.png,1,p2\nimg/02.png,1.0,p3\n")
    with pytest.warns(FinescopeWarning, match=r"m\.csv' has the labels '1' and '1\.0', one number written two ways, "
                                              r"read as two classes; write each class's label alike"):
        ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert ss.class_names == ["0", "1", "1.0"]


def test_a_csv_path_in_another_unicode_normal_form_is_found(tmp_path):
    """A folder copied from a Mac keeps its names decomposed ('u' + combining diaeresis), where Excel writes
    'ü' as one character: the manifest's 'Müller/a.png' was refused as "does not exist", though `ls` shows it;
    a path that names no file is now also looked up in the other normal form (NFC or NFD)."""
    import unicodedata

    tiny_png(tmp_path / unicodedata.normalize("NFD", "Müller") / "a.png")
    (tmp_path / "m.csv").write_text(unicodedata.normalize("NFC", "path,label,group\nMüller/a.png,x,p1\n"))
    ss = load_samples(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    assert [os.path.isfile(s.path) for s in ss.samples] == [True]


def test_class_folders_in_another_unicode_normal_form_are_the_runs_classes(tmp_path):
    """A run trained on class folders named 'bénin' as Linux and Windows write it (one character) refused the same
    data copied from a Mac, which names them 'e' + a combining accent: "has label 'bénin', which is not a known
    class (bénin, malin)", two names that print alike; predict and explain left such an image's true class empty.
    A class folder is now the run's class in either normal form."""
    import unicodedata

    from finescope.data.sources import label_and_group_of

    nfc, nfd = (unicodedata.normalize(form, "bénin") for form in ("NFC", "NFD"))
    for cls in (nfd, "malin"):
        tiny_png(tmp_path / "mac" / cls / "p1" / "a.png")
    ss = load_samples(DataConfig(source="folder", root=str(tmp_path / "mac")), class_names=[nfc, "malin"])
    assert ss.class_names == [nfc, "malin"] and [s.label for s in ss.samples] == [0, 1]
    elsewhere = DataConfig(source="folder", root=str(tmp_path / "trained_here"))
    assert label_and_group_of(tmp_path / "mac" / nfd / "p1" / "a.png", elsewhere, [nfc, "malin"]) == (0, "p1")
    inside = DataConfig(source="folder", root=str(tmp_path / "mac"))
    assert label_and_group_of(tmp_path / "mac" / nfd / "p1" / "a.png", inside, [nfc, "malin"]) == (0, "p1")


def test_a_manifests_split_may_be_written_out_in_full(tmp_path):
    """A spreadsheet's split column often says 'Training', 'Validation' and 'Testing'; they were refused with the
    list of train, val, test, though their meaning is plain. They are read as those three."""
    for name in ("a.png", "b.png", "c.png"):
        tiny_png(tmp_path / name)
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "group", "split"],
                         [["a.png", "x", "P1", "Training"], ["b.png", "x", "P2", "validation"],
                          ["c.png", "x", "P3", "TESTING"]])
    assert load_samples(DataConfig(source="csv", root=str(manifest))).preset_splits == ["train", "val", "test"]


@pytest.mark.parametrize("source", ["csv", "folder"])
def test_whole_number_labels_are_ordered_by_value(tmp_path, source):
    """Labels 1, 2, 10 are classes 0, 1, 2 (not the text order 1, 10, 2); other labels stay in text order."""
    for labels, order in ((["10", "2", "1"], ["1", "2", "10"]), (["10", "2", "b1"], ["10", "2", "b1"])):
        root = tmp_path / "_".join(labels)
        rows = []
        for label in labels:
            tiny_png(root / label / "p" / "0.png")
            rows.append([f"{label}/p/0.png", label, f"p{label}"])
        write_csv(root / "manifest.csv", ["path", "label", "group"], rows)
        ss = load_samples(DataConfig(source=source, root=str(root)))
        assert ss.class_names == order
        assert all(ss.class_names[s.label] == Path(s.path).parts[-3] for s in ss.samples)


def test_in_class_order_keeps_a_runs_stored_order(tmp_path):
    """A run trained when 1, 10, 2 was the order reads the same data with its labels indexing that order."""
    from finescope.data.sources import in_class_order

    root = tmp_path / "d"
    write_csv(root / "manifest.csv", ["path", "label", "group"],
              [[f"{c}.png", c, f"p{c}"] for c in ("1", "2", "10") if tiny_png(root / f"{c}.png")])
    ss = load_samples(DataConfig(source="csv", root=str(root)))
    old = in_class_order(ss, ["1", "10", "2"])
    assert old.class_names == ["1", "10", "2"]
    assert [old.class_names[s.label] for s in old.samples] == [ss.class_names[s.label] for s in ss.samples]
    assert in_class_order(ss, ["1", "2", "3"]) is ss  # other classes: left for the caller to name


def test_csv_with_group_and_patient_columns_needs_every_patient_or_none(tmp_path):
    """With both columns the group splits and the patient is what patient-level metrics score: a row whose
    patient cell is empty, beside rows that name theirs, would be scored as a patient named after its group."""
    root = tmp_path / "d"
    rows = [[f"{i}.png", "ab"[i % 2], f"case{i % 2}", f"P{i}"] for i in range(4) if tiny_png(root / f"{i}.png")]
    write_csv(root / "manifest.csv", ["path", "label", "group", "patient"], rows)
    ss = load_samples(DataConfig(source="csv", root=str(root)))
    assert [(s.group, s.patient) for s in ss.samples] == [(f"case{i % 2}", f"P{i}") for i in range(4)]
    rows[2][3] = ""
    write_csv(root / "manifest.csv", ["path", "label", "group", "patient"], rows)
    with pytest.raises(FinescopeError, match=r"manifest.csv' line 4 has an empty patient, where other rows name "
                                             r"theirs"):
        load_samples(DataConfig(source="csv", root=str(root)))
    for row in rows:  # a patient column left empty throughout: every image's patient is its group
        row[3] = ""
    write_csv(root / "manifest.csv", ["path", "label", "group", "patient"], rows)
    ss = load_samples(DataConfig(source="csv", root=str(root)))
    assert [s.patient for s in ss.samples] == [f"case{i % 2}" for i in range(4)]


@pytest.mark.parametrize("source", ["folder", "pattern", "csv"])
def test_a_patient_named_in_two_unicode_forms_is_one_group(tmp_path, source):
    """A patient folder 'Müller' copied from a Mac ('u' + a combining diaeresis) beside the same patient's folder
    written on Linux (one character), merged under one root, made two groups: the patient could sit on both sides
    of a split. Group ids are now in one Unicode normal form (NFC) wherever a source makes them; paths are kept."""
    import unicodedata

    from finescope.data.sources import label_and_group_of

    nfc, nfd = (unicodedata.normalize(form, "Müller") for form in ("NFC", "NFD"))
    rows = []
    for cls in ("x", "y"):
        for i, patient in enumerate([nfc, nfd] if cls == "x" else []):
            rows.append([tiny_png(tmp_path / cls / patient / f"{patient}_{i}.png"), cls, patient])
        for p in range(6):
            for i in range(2):
                rows.append([tiny_png(tmp_path / cls / f"P{cls}{p}" / f"P{cls}{p}_{i}.png"), cls, f"P{cls}{p}"])
    if source == "csv":
        manifest = write_csv(tmp_path / "m.csv", ["path", "label", "group"],
                             [[str(p.relative_to(tmp_path)), c, g] for p, c, g in rows])
        cfg = DataConfig(source="csv", root=str(manifest))
    else:
        cfg = DataConfig(source="folder", root=str(tmp_path),
                         group_pattern=r"^([^_]+)_" if source == "pattern" else "")
    ss = load_samples(cfg)
    mueller = [s for s in ss.samples if "ller" in s.path]
    assert len(mueller) == 2 and {s.group for s in mueller} == {nfc}
    assert {s.path for s in mueller} == {str(p) for p, _, g in rows if g in (nfc, nfd)}  # paths as found
    groups = np.array(ss.groups)
    for seed in range(20):
        splits = split_groups(ss.labels, ss.groups, test_fraction=0.3, val_fraction=0.2, seed=seed)
        sides = [side for side, idx in splits.items() if nfc in set(groups[idx])]
        assert len(sides) == 1, (seed, sides)
    if source != "csv":
        assert label_and_group_of(tmp_path / "x" / nfd / f"{nfd}_1.png", cfg, ["x", "y"]) == (0, nfc)


def test_a_patient_cell_written_in_two_unicode_forms_is_one_patient(tmp_path):
    """A manifest with group and patient columns NFC-normalised its group cells but kept the patient cells as
    written: two rows of group P1 naming 'Müller' once in NFC and once in NFD (a Mac's spelling) were scored as
    two patients by the patient-level metrics. Patient cells are now in NFC like group ids."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "Müller") for form in ("NFC", "NFD"))
    rows = [[tiny_png(tmp_path / f"a{i}.png").name, "x", "P1", p] for i, p in enumerate([nfc, nfd])]
    rows += [[tiny_png(tmp_path / f"b{i}.png").name, "y", "P2", "Bob"] for i in range(2)]
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "group", "patient"], rows)
    ss = load_samples(DataConfig(source="csv", root=str(manifest)))
    assert {s.patient for s in ss.samples} == {nfc, "Bob"}
