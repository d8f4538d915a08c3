"""Grouped stratified splits: no group on two sides, every class in train, seed dependence, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finescope.config import DataConfig
from finescope.data import (
    Sample,
    SampleSet,
    carve_validation,
    check_no_leak,
    kfold_groups,
    load_samples,
    load_splits,
    save_splits,
    split_groups,
    summarize_splits,
    trial_splits,
)
from finescope.data.splits import trial_seed
from finescope.errors import FinescopeError, FinescopeWarning

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
realdata = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")


def grouped_data(groups_per_class=(7, 4, 2, 1), seed=0):
    """Labels and groups with 1-6 samples per group; the groups of a class are numbered c<class>_g<k>."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, n_groups in enumerate(groups_per_class):
        for g in range(n_groups):
            n = int(rng.integers(1, 7))
            labels += [c] * n
            groups += [f"c{c}_g{g}"] * n
    order = rng.permutation(len(labels))  # samples of a group need not be adjacent
    return np.array(labels)[order], np.array(groups)[order]


def groups_on(idx, groups):
    return set(np.asarray(groups)[idx].tolist())


def assert_partition(parts, n):
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_split_groups_never_leaks_and_stays_stratified(val_fraction):
    for seed in range(40):
        labels, groups = grouped_data(seed=seed)
        splits = split_groups(labels, groups, test_fraction=0.3, val_fraction=val_fraction, seed=seed)
        assert set(splits) == {"train", "val", "test"}
        assert_partition(list(splits.values()), len(labels))
        check_no_leak(splits, groups)
        sides = [groups_on(v, groups) for v in splits.values()]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        for idx in splits.values():
            assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
        assert set(labels[splits["train"]]) == {0, 1, 2, 3}  # every class keeps a training group
        assert set(labels[splits["test"]]) == {0, 1, 2}  # classes with >= 2 groups are tested
        if val_fraction == 0:
            assert len(splits["val"]) == 0
        else:
            assert {0, 1} <= set(labels[splits["val"]])  # classes with >= 3 groups left after test


def test_split_groups_counts_per_class():
    labels, groups = grouped_data((10, 4))
    splits = split_groups(labels, groups, test_fraction=0.3, val_fraction=0.2, seed=1)
    n_test = [len({g for g in groups_on(splits["test"], groups) if g.startswith(f"c{c}_")}) for c in (0, 1)]
    n_val = [len({g for g in groups_on(splits["val"], groups) if g.startswith(f"c{c}_")}) for c in (0, 1)]
    assert n_test == [3, 1] and n_val == [2, 1]


def test_split_groups_seeds_differ_and_repeat():
    labels, groups = grouped_data((8, 6))
    a = split_groups(labels, groups, 0.3, 0.15, seed=0)
    b = split_groups(labels, groups, 0.3, 0.15, seed=1)
    again = split_groups(labels, groups, 0.3, 0.15, seed=0)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    assert not np.array_equal(a["test"], b["test"])
    tests = {tuple(split_groups(labels, groups, 0.3, 0.0, seed=s)["test"]) for s in range(10)}
    assert len(tests) >= 8


def test_split_groups_bad_fractions():
    labels, groups = grouped_data()
    with pytest.raises(FinescopeError, match="data.test_fraction"):
        split_groups(labels, groups, 1.2, 0.1, 0)
    with pytest.raises(FinescopeError, match="must be below 1"):
        split_groups(labels, groups, 0.6, 0.5, 0)


def test_kfold_is_grouped_stratified_partition():
    for seed in range(20):
        labels, groups = grouped_data((9, 5, 3), seed=seed)
        folds = kfold_groups(labels, groups, k=3, seed=seed)
        assert len(folds) == 3
        assert_partition(folds, len(labels))
        for f in folds:
            assert set(labels[f]) == {0, 1, 2}
            rest = np.setdiff1d(np.arange(len(labels)), f)
            check_no_leak({"train": rest, "test": f}, groups)


def test_kfold_depends_on_seed():
    labels, groups = grouped_data((9, 6))
    runs = {tuple(map(tuple, kfold_groups(labels, groups, 3, seed=s))) for s in range(6)}
    assert len(runs) > 1


def test_kfold_too_few_groups():
    labels, groups = grouped_data((6, 2))
    with pytest.raises(FinescopeError, match=r"class 'malignant' has only 2 groups.*--folds 2 or fewer"):
        kfold_groups(labels, groups, k=3, seed=0, class_names=["benign", "malignant"])
    labels, groups = grouped_data((2, 2))
    with pytest.raises(FinescopeError, match=r"only 4 groups, fewer than the 5 folds"):
        kfold_groups(labels, groups, k=5, seed=0)
    with pytest.raises(FinescopeError, match="at least 2 folds"):
        kfold_groups(labels, groups, k=1, seed=0)


def test_trial_splits_spanhol_protocol():
    labels, groups = grouped_data((10, 8))
    trials = trial_splits(labels, groups, n_trials=5, test_fraction=0.3, seed=3)
    assert len(trials) == 5
    assert len({tuple(t) for t in trials}) == 5
    for t, test in enumerate(trials):
        assert np.array_equal(test, split_groups(labels, groups, 0.3, 0.0, trial_seed(3, t))["test"])
        check_no_leak({"train": np.setdiff1d(np.arange(len(labels)), test), "test": test}, groups)


def test_trials_of_neighbouring_seeds_share_no_trial():
    """Trial t drew with seed + t, so cv --trials 3 with seed 1 repeated seed 0's trials 1 and 2 exactly (their test
    and, through seed + 1000 + t, their validation sides): of the 9 trials of seeds 0, 1 and 2 on BreakHis, 5
    were distinct, while RESULTS.md counted them as 'other trial splits'."""
    labels, groups = grouped_data((10, 8))
    drawn = [tuple(map(tuple, trial_splits(labels, groups, 5, 0.3, seed))) for seed in range(4)]
    assert len({t for trials in drawn for t in trials}) == 20
    assert drawn[0] == tuple(map(tuple, trial_splits(labels, groups, 5, 0.3, 0)))  # still the seed's own


def test_carve_validation_takes_training_groups_only():
    labels, groups = grouped_data((8, 6))
    splits = split_groups(labels, groups, 0.3, 0.0, seed=0)
    train, val = carve_validation(splits["train"], labels, groups, val_fraction=0.25, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, val])), splits["train"])
    assert len(val) > 0 and set(labels[val]) == {0, 1}
    check_no_leak({"train": train, "val": val, "test": splits["test"]}, groups)
    same, empty = carve_validation(splits["train"], labels, groups, 0.0, seed=0)
    assert np.array_equal(same, splits["train"]) and len(empty) == 0


def test_check_no_leak_names_group_and_sides():
    groups = np.array(["a", "a", "b", "c"])
    with pytest.raises(FinescopeError, match=r"group 'a' is on both 'train' and 'test'"):
        check_no_leak({"train": np.array([0, 2]), "test": np.array([1, 3])}, groups)
    with pytest.raises(FinescopeError, match=r"sample 2 is on both"):
        check_no_leak({"train": np.array([2]), "val": np.array([2])}, groups)
    check_no_leak({"train": np.array([0, 1]), "test": np.array([2, 3])}, groups)


# ---------------------------------------------------------------------------------------------- save / load


def sample_set(root: Path, n: int = 12) -> SampleSet:
    samples = [Sample(str(root / f"c{i % 2}" / f"img{i:02d}.png"), i % 2, f"g{i // 2}") for i in range(n)]
    return SampleSet(samples, ["a", "b"], root=str(root))


def test_save_load_round_trip(tmp_path):
    ss = sample_set(tmp_path / "data")
    splits = split_groups(ss.labels, ss.groups, 0.3, 0.2, seed=0)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, splits, ss, extra={"seed": 0})
    raw = json.loads(path.read_text())
    assert raw["counts"] == {k: len(v) for k, v in splits.items()}
    assert raw["extra"] == {"seed": 0}
    assert all(not p.startswith("/") and "/" in p for v in raw["splits"].values() for p in v)
    loaded = load_splits(path, ss)
    assert all(np.array_equal(loaded[k], splits[k]) for k in splits)
    moved = sample_set(tmp_path / "elsewhere")  # same relative paths under another root
    assert all(np.array_equal(load_splits(path, moved)[k], splits[k]) for k in splits)


def test_a_manifests_images_outside_its_folder_keep_their_split_when_they_move(tmp_path):
    """A CSV manifest listing absolute paths outside its folder: splits.json names the images relative to the CSV's
    folder ('../scope1/c0/img00.png'), so after the images moved and the manifest was rewritten with their new
    paths, train --resume, evaluate and cv refused the run's split ('listed images are not in data.root', the very
    data.root it trained on). Images that keep their places relative to each other keep their split, and the
    split's digest (what a checkpoint records); data of other images still does not match."""
    from finescope.data.splits import split_digest, split_digests

    def listed(images: Path, skipped=()) -> SampleSet:  # as read from tmp_path/proj/manifest.csv
        ss = sample_set(images)
        kept = [s for s in ss.samples if s.path not in skipped]
        return SampleSet(kept, ss.class_names, root=str(tmp_path / "proj"), skipped=[(p, "truncated") for p in skipped])

    before = listed(tmp_path / "scope1" / "data")
    splits = split_groups(before.labels, before.groups, 0.3, 0.2, seed=0)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, splits, before)
    assert json.loads(path.read_text())["splits"]["train"][0].startswith("../scope1/data/")  # as it always was
    moved = listed(tmp_path / "disk2" / "scope")
    loaded = load_splits(path, moved, own=True)
    assert all(np.array_equal(loaded[k], splits[k]) for k in splits)
    assert split_digest(loaded, moved) == split_digest(splits, before)
    legacy = split_digests(splits, before) - {split_digest(splits, before)}  # checkpoints from before: still theirs
    assert len(legacy) == 1 and legacy <= split_digests(loaded, before)
    gone = moved.samples[0].path
    with pytest.warns(FinescopeWarning, match="1 listed image was skipped"):
        less = load_splits(path, listed(tmp_path / "disk2" / "scope", skipped=[gone]), own=True)
    assert sum(map(len, less.values())) == len(moved) - 1
    fewer = SampleSet(moved.samples[2:], moved.class_names, root=moved.root)  # other data: refused as before
    with pytest.raises(FinescopeError, match="listed images are not in data.root"):
        load_splits(path, fewer, own=True)
    inside = SampleSet(sample_set(tmp_path / "proj" / "images").samples, ["a", "b"], root=str(tmp_path / "proj"))
    save_splits(path, splits, inside)  # in the manifest's own folder: named and matched as before
    assert json.loads(path.read_text())["splits"]["train"][0].startswith("images/")
    with pytest.raises(FinescopeError, match="listed images are not in data.root"):
        load_splits(path, SampleSet(sample_set(tmp_path / "proj" / "other").samples, ["a", "b"], root=inside.root))


def test_an_image_added_outside_a_manifests_moved_images_is_the_one_named(tmp_path):
    """A CSV manifest listing images outside its folder; the images moved (disk2/scope) and an image was added
    beside them (disk2/extra/new.png). load_splits matched no listed image any more (their innermost common folder
    was disk2, no longer disk2/scope) and said '12 listed images are not in data.root ..., e.g.
    ../scope1/data/c0/img00.png', the run's old images, not the new one that did not fit. The listed images are
    matched where they moved, and the new one is named as in no split, with what to do; evaluate --split all of
    that data counts the run's training images among them (it counted none)."""
    from finescope.data.splits import _match, trained_on

    def listed(images: Path, added: tuple[Path, ...] = ()) -> SampleSet:  # as read from tmp_path/proj/manifest.csv
        samples = [*sample_set(images).samples, *(Sample(str(p), 0, f"new{i}") for i, p in enumerate(added))]
        return SampleSet(sorted(samples, key=lambda s: s.path), ["a", "b"], root=str(tmp_path / "proj"))

    before = listed(tmp_path / "scope1" / "data")
    splits = split_groups(before.labels, before.groups, 0.3, 0.2, seed=0)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, splits, before)
    new = tmp_path / "disk2" / "extra" / "new.png"
    with pytest.raises(FinescopeError, match=r"^splits file '.*splits\.json' does not match the data: 1 image in "
                       r"data\.root is in no split, e\.g\. '.*disk2/extra/new\.png' \(added since the split was "
                       r"made\?\); leave them out of the data .*, or point data\.root at the data") as e:
        load_splits(path, listed(tmp_path / "disk2" / "scope", (new,)), own=True,
                    fix="point data.root at the data this run was trained on")
    assert "scope1" not in str(e.value) and "\n" not in str(e.value)
    with_new = listed(tmp_path / "disk2" / "scope", (new,))  # the run's images are found where they moved
    index = _match([p for v in json.loads(path.read_text())["splits"].values() for p in v], with_new)[0]
    assert sorted(with_new.samples[i].path for i in index.values()) == sorted(
        s.path for s in listed(tmp_path / "disk2" / "scope").samples)
    n_seen = len(splits["train"]) + len(splits["val"])
    assert f"{n_seen} of the 13 images" in trained_on(path, with_new)  # was None: no warning, split_leak null


def test_the_images_a_run_trained_on_are_counted_after_a_manifests_images_outside_its_folder_moved(tmp_path):
    """A CSV manifest listing images outside its folder keeps its split after they moved (the manifest rewritten
    with their new paths), but evaluate --split all of that data counted none of them as trained on (trained_on
    None: no warning, split_leak null in metrics_all.json): splits.json names them '../scope1/data/c0/img00.png',
    found by the path relative to the root only. They are counted as load_splits finds them."""
    from finescope.data.splits import trained_on

    def listed(images: Path) -> SampleSet:  # as read from tmp_path/proj/manifest.csv
        return SampleSet(sample_set(images).samples, ["a", "b"], root=str(tmp_path / "proj"))

    before = listed(tmp_path / "scope1" / "data")
    splits = split_groups(before.labels, before.groups, 0.3, 0.2, seed=0)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, splits, before)
    n_seen = len(splits["train"]) + len(splits["val"])  # groups of 2 images, none on two sides
    assert f"{n_seen} of the 12 images" in trained_on(path, before)
    assert f"{n_seen} of the 12 images" in trained_on(path, listed(tmp_path / "disk2" / "scope"))


def test_explained_files_a_run_trained_on_are_found_after_a_manifests_images_outside_its_folder_moved(tmp_path):
    """explain RUN FILES where the run's data cannot be read (its images outside the manifest's folder moved, the
    manifest not rewritten, or the run handed on without it) counts the files it trained on by the place of its
    splits.json's train and val images; for those the file names '../scope1/data/c0/img00.png' it counted none
    of them moved to disk2/scope/c0 (trained_on 0, no warning). They are found by their path below the innermost
    folder holding the listed images, as load_splits finds them in moved data."""
    from finescope.data.splits import trained_files

    before = SampleSet(sample_set(tmp_path / "scope1" / "data").samples, ["a", "b"], root=str(tmp_path / "proj"))
    splits = split_groups(before.labels, before.groups, 0.3, 0.2, seed=0)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, splits, before)
    moved = sample_set(tmp_path / "disk2" / "scope")
    seen = sorted(moved.samples[i].path for side in ("train", "val") for i in splits[side])
    assert sorted(trained_files(path, [s.path for s in moved.samples])) == seen


def test_a_split_is_found_in_data_whose_names_are_in_another_unicode_normal_form(tmp_path):
    """A run's splits.json lists 'Müller/img00.png' as Linux and Windows write it (one character); the same data
    copied from a Mac names it 'u' + a combining diaeresis. evaluate then found the split "does not match the
    data" and scored every image, and its count of the images of patients the run trained on (trained_on) missed
    every one so named: training images scored as unseen ones, unsaid."""
    import unicodedata

    from finescope.data.splits import trained_on

    def named(root: Path, form: str) -> SampleSet:
        ss = sample_set(root)
        paths = [unicodedata.normalize(form, s.path.replace("/c0/", "/Müller/")) for s in ss.samples]
        samples = [Sample(p, s.label, s.group) for p, s in zip(paths, ss.samples)]
        return SampleSet(samples, ss.class_names, root=ss.root)

    linux = named(tmp_path / "data", "NFC")
    splits = split_groups(linux.labels, linux.groups, 0.3, 0.2, seed=0)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, splits, linux)
    mac = named(tmp_path / "mac", "NFD")
    assert mac.samples[0].path != linux.samples[0].path.replace("/data/", "/mac/")  # the names differ as text
    loaded = load_splits(path, mac)
    assert all(np.array_equal(loaded[k], splits[k]) for k in splits)
    seen = {mac.groups[i] for side in ("train", "val") for i in splits[side]}
    assert f"{sum(g in seen for g in mac.groups)} of the 12 images" in trained_on(path, mac)


def test_load_splits_mismatch(tmp_path):
    ss = sample_set(tmp_path)
    splits = split_groups(ss.labels, ss.groups, 0.3, 0.0, seed=0)
    path = tmp_path / "splits.json"
    save_splits(path, splits, ss)
    smaller = SampleSet(ss.samples[:-3], ss.class_names, root=ss.root)
    with pytest.raises(
        FinescopeError,
        match=r"does not match the data: 3 listed images are not in data.root.*leaving data.splits empty",
    ):
        load_splits(path, smaller)
    bigger = sample_set(tmp_path, n=14)
    with pytest.raises(FinescopeError, match=r"2 images in data.root are in no split, e.g. '.*img12.png'"):
        load_splits(path, bigger)
    with pytest.raises(FinescopeError, match=r"splits file '.*nope.json' not found"):
        load_splits(tmp_path / "nope.json", ss)
    with pytest.raises(FinescopeError, match=r"is a folder; point data.splits at a splits.json in it"):
        load_splits(tmp_path, ss)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FinescopeError, match=r"bad.json' is not valid JSON"):
        load_splits(tmp_path / "bad.json", ss)


def test_load_splits_refuses_unknown_sides_and_cv_files(tmp_path):
    ss = sample_set(tmp_path)
    path = tmp_path / "splits.json"
    save_splits(path, {"train": np.arange(0, 6), "validation": np.arange(6, 8), "test": np.arange(8, 12)}, ss)
    with pytest.raises(FinescopeError, match="has a side 'validation'; name the sides train, val, test"):
        load_splits(path, ss)  # its images were in no side: neither trained on nor validated, without a word
    path.write_text(json.dumps({"folds": [{"name": "t0", "splits": {}}]}))
    with pytest.raises(FinescopeError, match="holds the folds of a cv run; give one fold's folds/<fold>/splits.json"):
        load_splits(path, ss)


def test_load_splits_rejects_leak(tmp_path):
    ss = sample_set(tmp_path)
    path = tmp_path / "splits.json"
    save_splits(path, {"train": np.arange(0, 7), "test": np.arange(7, 12)}, ss)  # g3 = samples 6, 7
    with pytest.raises(FinescopeError, match=r"^splits file '.*splits.json': .*group 'g3' is on both 'train' and 'test'"):
        load_splits(path, ss)
    # a run's own split (one trained when its data was grouped otherwise) is read, with a warning
    with pytest.warns(FinescopeWarning, match="group 'g3' is on both 'train' and 'test' as finescope groups this "
                      "data now .*its metrics are not patient-level; train it again"):
        own = load_splits(path, ss, own=True)
    assert own["train"].tolist() == list(range(7))



def test_load_splits_names_an_image_listed_on_two_sides(tmp_path):
    """An edited splits.json that lists one image on two sides said 'sample 6 is on both ...', an index into
    finescope's own list that names no file: the error names the image as the file lists it."""
    ss = sample_set(tmp_path)
    path = tmp_path / "splits.json"
    save_splits(path, {"train": np.arange(0, 7), "test": np.arange(6, 12)}, ss)  # sample 6 on both sides
    with pytest.raises(FinescopeError, match=r"^splits file '.*splits.json' lists 'c0/img06.png' on both 'train' "
                       r"and 'test'; .*leaving data.splits empty"):
        load_splits(path, ss)

def test_summarize_splits(tmp_path):
    ss = sample_set(tmp_path)
    summary = summarize_splits({"train": np.arange(0, 8), "test": np.arange(8, 12)}, ss)
    assert summary["train"]["images"] == 8 and summary["train"]["groups"] == 4
    assert summary["test"]["per_class"] == {"a": {"images": 2, "groups": 2}, "b": {"images": 2, "groups": 2}}
    assert summary["train"]["shared_groups"] == 0
    leaky = summarize_splits({"train": np.arange(0, 7), "test": np.arange(7, 12)}, ss)
    assert leaky["test"]["shared_groups"] == 1


# ------------------------------------------------------------------------------------------------ real data


@realdata
@pytest.mark.realdata
def test_real_breakhis_cases_stay_together():
    ss = load_samples(DataConfig(source="breakhis", root=str(SHARED_DATA / "breakhis")))
    labels, groups = np.array(ss.labels), np.array(ss.groups)
    patients = np.array([s.meta["patient"] for s in ss.samples])
    seen = set()
    for seed in range(10):
        splits = split_groups(labels, groups, 0.3, 0.15, seed)
        check_no_leak(splits, groups)
        side = {p: k for k, idx in splits.items() for p in patients[idx]}
        assert side["22549AB"] == side["22549CD"] == side["22549G"]
        assert side["21998AB"] == side["21998CD"] and side["29960AB"] == side["29960CD"]
        assert set(labels[splits["test"]]) == {0, 1} and set(labels[splits["train"]]) == {0, 1}
        seen.add(tuple(splits["test"]))
    assert len(seen) > 1
    folds = kfold_groups(labels, groups, 3, seed=0)
    assert_partition(folds, len(labels))
