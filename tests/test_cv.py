"""Cross-validation: folds are grouped and stratified, all variants share them, resumable, bad input is one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finescope.cli import main
from finescope.config import load_config, save_config, to_dict
from finescope.cv import Protocol, load_cv_splits, load_protocol, make_folds, make_protocol, run_cv
from finescope.data import Sample, SampleSet, check_no_leak, kfold_groups, load_samples
from finescope.errors import FinescopeError, FinescopeWarning
from finescope.metrics import compute_metrics, patient_recognition_rate

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
realdata = pytest.mark.skipif(not (SHARED_DATA / "breakhis").is_dir(), reason=f"{SHARED_DATA}/breakhis is absent")


def toy_set(groups_per_class=(6, 4), per_group=3, mags=(None,)) -> SampleSet:
    samples = []
    for mag in mags:
        for c, n in enumerate(groups_per_class):
            for g in range(n):
                for i in range(per_group):
                    meta = {} if mag is None else {"magnification": mag}
                    samples.append(Sample(f"/d/{mag}/c{c}_g{g}_{i}.png", c, f"c{c}_g{g}", meta))
    return SampleSet(sorted(samples, key=lambda s: s.path), ["a", "b"], root="/d")


def groups_of(sample_set, idx):
    return {sample_set.samples[i].group for i in idx}


@pytest.mark.parametrize("protocol", [Protocol(folds=3), Protocol(folds=0, trials=4, test_fraction=0.3)])
def test_folds_are_grouped_stratified_and_val_comes_from_training_groups(protocol):
    s = toy_set()
    folds = make_folds(s, protocol, seed=0, val_fraction=0.2)
    assert len(folds) == (protocol.folds or protocol.trials)
    for f in folds:
        check_no_leak(f.splits, [x.group for x in s.samples])
        assert sorted(np.concatenate(list(f.splits.values())).tolist()) == list(range(len(s)))
        for side in ("train", "test"):  # every class on both sides
            assert {s.samples[i].label for i in f.splits[side]} == {0, 1}
        assert len(f.splits["val"]) > 0
    if protocol.folds:  # k-fold: every image tested exactly once
        tested = np.concatenate([f.splits["test"] for f in folds])
        assert sorted(tested.tolist()) == list(range(len(s)))


def test_a_per_magnification_fold_of_a_csv_reads_the_images_of_its_magnification(tmp_path):
    """cv --per-magnification trains each fold with data.magnifications=[its own]: the csv source ignored that
    key, read every image, and the fold's splits.json then 'did not match the data' (18 images in no split)."""
    from PIL import Image

    from finescope.cv import fold_config

    rows = ["path,label,group,magnification"]
    for i in range(16):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},p{i % 4},{'40X' if i < 8 else 100}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(overrides=["data.source=csv", f"data.root={tmp_path / 'm.csv'}"])
    fold = make_folds(load_samples(cfg.data), Protocol(folds=2, per_magnification=True), seed=0, val_fraction=0.0)[0]
    read = load_samples(fold_config(cfg, "global", fold, tmp_path / "splits.json").data)
    assert fold.magnification == 40 and sorted(int(Path(x.path).stem) for x in read.samples) == list(range(8))
    with pytest.raises(FinescopeError, match=r"m\.csv' lists no image at data\.magnifications \[200\]"):
        load_samples(load_config(base=to_dict(cfg), overrides=["data.magnifications=[200]"]).data)


def test_two_seeds_give_two_partitions():
    s = toy_set()
    a = make_folds(s, Protocol(folds=3), seed=0, val_fraction=0.0)
    b = make_folds(s, Protocol(folds=3), seed=1, val_fraction=0.0)
    part = [lambda fs: sorted(tuple(sorted(groups_of(s, f.splits["test"]))) for f in fs)]
    assert part[0](a) != part[0](b)


def test_per_magnification_folds_stay_within_their_magnification():
    s = toy_set(mags=(40, 100))
    folds = make_folds(s, Protocol(folds=2, per_magnification=True), seed=0, val_fraction=0.0)
    assert [f.magnification for f in folds] == [40, 40, 100, 100]
    for f in folds:
        assert {s.samples[i].meta["magnification"] for side in f.splits.values() for i in side} == {f.magnification}


def test_per_magnification_folds_from_a_csv_magnification_column(tmp_path):
    """A manifest's magnification column written as on the slides ('40X') gives the folds of BreakHis numbers
    (int('40X') was a traceback); a value that is no magnification is one line when the manifest is read, not at
    the end of a cv that trained every fold (an empty cell is none)."""
    from PIL import Image

    rows = ["path,label,group,magnification"]
    for i in range(16):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},p{i % 4},{'40X' if i < 8 else '100x'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    s = load_samples(load_config(overrides=["data.source=csv", f"data.root={tmp_path / 'm.csv'}"]).data)
    folds = make_folds(s, Protocol(folds=2, per_magnification=True), seed=0, val_fraction=0.0)
    assert [f.magnification for f in folds] == [40, 40, 100, 100]
    (tmp_path / "m.csv").write_text("\n".join(rows).replace("100x", "NA", 1).replace("100x", "") + "\n")
    with pytest.raises(FinescopeError, match=r"m\.csv' line 10 has magnification 'NA'; write it as a number"):
        load_samples(load_config(overrides=["data.source=csv", f"data.root={tmp_path / 'm.csv'}"]).data)
    (tmp_path / "m.csv").write_text("\n".join(rows).replace("100x", "") + "\n")
    s = load_samples(load_config(overrides=["data.source=csv", f"data.root={tmp_path / 'm.csv'}"]).data)
    with pytest.warns(FinescopeWarning, match=r"per-magnification: 8 of the 16 images have no magnification"):
        folds = make_folds(s, Protocol(folds=2, per_magnification=True), seed=0, val_fraction=0.0)
    assert [f.magnification for f in folds] == [None, None]  # not every image has one: said, not silently pooled


def test_per_magnification_on_data_without_magnifications_says_it_pools_them():
    """cv --per-magnification (the BreakHis protocol's default) on data with no magnifications (DeFungi, a folder
    of one microscope's images) made folds of all the images without a word."""
    import warnings

    s = toy_set()
    with pytest.warns(FinescopeWarning, match=r"of the \d+ images have no magnification .* all images together"):
        assert [f.magnification for f in make_folds(s, Protocol(folds=2, per_magnification=True), seed=0,
                                                    val_fraction=0.0)] == [None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FinescopeWarning)
        make_folds(s, Protocol(folds=2), seed=0, val_fraction=0.0)


@realdata
def test_breakhis_seeds_differ_and_stay_grouped_stratified():
    """sklearn's StratifiedGroupKFold(shuffle=True) gave one partition for every seed on these cases."""
    cfg = load_config(overrides=["data.source=breakhis", f"data.root={SHARED_DATA / 'breakhis'}"])
    s = load_samples(cfg.data)
    labels, groups = np.array(s.labels), np.array([x.group for x in s.samples])
    parts = []
    for seed in (0, 1, 2):
        folds = kfold_groups(labels, groups, 4, seed, s.class_names)
        for test in folds:
            assert set(labels[test].tolist()) == {0, 1}
            check_no_leak({"train": np.setdiff1d(np.arange(len(s)), test), "test": test}, groups)
        parts.append(sorted(tuple(sorted(set(groups[t]))) for t in folds))
    assert len({tuple(p) for p in parts}) > 1


@realdata
def test_breakhis_subtype_kfold_error_names_the_single_group_class():
    cfg = load_config(overrides=["data.source=breakhis", f"data.root={SHARED_DATA / 'breakhis'}", "data.task=subtype"])
    s = load_samples(cfg.data)
    with pytest.raises(FinescopeError, match=r"'phyllodes_tumor'.*only 1 group.*--trials"):
        make_folds(s, Protocol(folds=2), seed=0, val_fraction=0.0)


@pytest.mark.parametrize(
    "protocol, message",
    [
        ({"variants": "global,nope"}, "unknown variant 'nope'.*choose from"),
        ({"folds": 1}, "at least 2 folds"),
        ({"reference": "fusion", "variants": "global"}, "reference variant 'fusion'"),
        ({"typo": 1}, "unknown key 'protocol.typo'"),
        ({"n_boot": 0}, "'protocol.n_boot' is 0; .*at least 1"),
        ({"folds": float("inf")}, "'protocol.folds' must be a int, got inf"),  # folds: .inf ended in OverflowError
        ({"trials": float("nan")}, "'protocol.trials' must be a int, got nan"),
        ({"n_boot": float("inf")}, "'protocol.n_boot' must be a int, got inf"),
        ({"variants": None}, "'protocol.variants' must be a list of variant names"),  # variants: (empty), TypeError
        ({"variants": 5}, "'protocol.variants' must be a list of variant names"),
    ],
)
def test_bad_protocol_is_one_clear_line(protocol, message):
    with pytest.raises(FinescopeError, match=message):
        make_protocol(protocol)


def test_a_whole_number_written_as_a_float_is_that_many_folds():
    """protocol: {folds: 3.0} passed the check as 3.0 and drawing the folds ended in a TypeError traceback."""
    s = toy_set()
    assert len(make_folds(s, make_protocol({"folds": 3.0}), seed=0, val_fraction=0.2)) == 3
    assert len(make_folds(s, make_protocol({"folds": 0, "trials": 2.0}), seed=0, val_fraction=0.2)) == 2


def test_too_few_groups_for_the_folds():
    s = toy_set(groups_per_class=(6, 2))
    with pytest.raises(FinescopeError, match=r"class 'b' has only 2 groups.*--folds 2 or fewer"):
        make_folds(s, Protocol(folds=3), seed=0, val_fraction=0.0)
    # it said 'use --folds 8 or fewer', and --folds 8 was then refused for class b's 2 groups (found in review)
    with pytest.raises(FinescopeError, match=r"only 8 groups, fewer than --folds 9; use --folds 2 or fewer \(class "
                                             r"'b' has 2 groups of its own\)"):
        make_folds(s, Protocol(folds=9), seed=0, val_fraction=0.0)


def test_a_class_with_one_group_of_its_own_is_pointed_to_trials():
    """k-fold deals a group to the fold of its majority class (BreakHis case 29960: fibroadenoma and adenosis
    images). A class with two groups holding its images but one of its own passed the cv check and stopped at
    kfold_groups' own, which said to use '--folds 1 or fewer' (refused: k-fold needs 2)."""
    samples = [Sample(f"/d/{g}_{c}_{i}.png", c, g, {}) for g, c, n in (("g1", 0, 3), ("g2", 0, 1), ("g2", 1, 3),
                                                                         ("g3", 1, 3), ("g4", 1, 3))
               for i in range(n)]
    s = SampleSet(sorted(samples, key=lambda x: x.path), ["a", "b"], root="/d")
    with pytest.raises(FinescopeError, match=r"'a' has only 1 group.*--trials") as e:
        make_folds(s, Protocol(folds=2), seed=0, val_fraction=0.0)
    assert "--folds 1" not in str(e.value)
    assert "'a' has only 1 group of its own (a group counts for the class most of its images have" in str(e.value)


def test_a_class_in_other_classes_groups_only_is_not_said_to_have_one_group():
    """Class 'c' lies in 3 groups, each mostly of class 'a': k-fold said "class 'c' has only 1 group", which
    neither finescope data (3 groups) nor the dealing (none of its own) counts."""
    spec = [(f"a{g}", 0, 3) for g in range(3)] + [(f"a{g}", 2, 1) for g in range(3)] + [(f"b{g}", 1, 3)
                                                                                        for g in range(3)]
    samples = [Sample(f"/d/{g}_{c}_{i}.png", c, g, {}) for g, c, n in spec for i in range(n)]
    s = SampleSet(sorted(samples, key=lambda x: x.path), ["a", "b", "c"], root="/d")
    with pytest.raises(FinescopeError, match=r"class 'c' has no group of its own \(a group counts for the class "
                                             r"most of its images have.*--trials") as e:
        make_folds(s, Protocol(folds=2), seed=0, val_fraction=0.0)
    assert "only 1 group" not in str(e.value)


def test_trials_of_single_group_classes_are_refused_before_training():
    """Every class one group (e.g. a folder source with one patient folder per class): each trial's test side was
    empty, so cv trained every run and then stopped on a missing predictions_test.csv."""
    with pytest.raises(FinescopeError, match="the data: every class has a single group, so no trial holds out"):
        make_folds(toy_set(groups_per_class=(1, 1)), Protocol(folds=0, trials=2), seed=0, val_fraction=0.0)
    with pytest.warns(FinescopeWarning, match="class 'a' is in no trial's test side"):
        assert len(make_folds(toy_set(groups_per_class=(1, 2)), Protocol(folds=0, trials=2), 0, 0.0)) == 2


def test_a_class_no_trial_tests_is_one_finescope_warning():
    """The warning went to the 'finescope' logger, which printed it bare on stderr ('the data: class b has a
    single group ...'), without the 'finescope: warning:' of every other warning, and said 'has a single group'
    of several classes at once."""
    with pytest.warns(FinescopeWarning, match=r"^the data: class 'b' is in no trial's test side \(a class with a "
                                              r"single group of its own"):
        make_folds(toy_set(groups_per_class=(6, 1)), Protocol(folds=0, trials=2), 0, 0.0)
    with pytest.warns(FinescopeWarning, match=r"^the data: classes 'b', 'c' are in no trial's test side"):
        s = toy_set(groups_per_class=(6, 1, 1))
        make_folds(SampleSet(s.samples, ["a", "b", "c"], s.root), Protocol(folds=0, trials=2), 0, 0.0)



def test_a_fold_whose_validation_side_lacks_a_class_is_one_warning_per_fold_set():
    """Validation is carved from a fold's training groups, one group of a class only once it has 3 there: with 2
    groups of class b, no fold's validation side held b, so early stopping and best.pt judged every fold by a alone,
    and neither cv nor the folds' training said so (train warns of a test side without a class, not of this)."""
    import warnings

    s = toy_set(groups_per_class=(6, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_folds(s, Protocol(folds=2), seed=0, val_fraction=0.2)
    said = [str(w.message) for w in caught if issubclass(w.category, FinescopeWarning)]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("the validation side of 2 of 2 folds holds no image of a class (fold0: b; fold1: b)")
    assert "early stopping and best.pt judge those folds by the other classes only" in said[0]
    with warnings.catch_warnings(record=True) as caught:  # val_fraction 0 asks for no validation side: no warning
        warnings.simplefilter("always")
        make_folds(s, Protocol(folds=2), seed=0, val_fraction=0.0)
        make_folds(toy_set(groups_per_class=(6, 6)), Protocol(folds=2), seed=0, val_fraction=0.2)
    assert not [w for w in caught if issubclass(w.category, FinescopeWarning)]

def test_protocol_file_profiles(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train: {epochs: 9}\nprotocol: {trials: 5}\nprofiles:\n  quick:\n    protocol: {trials: 2}\n"
                    "    train: {epochs: 3}\n")
    cfg, p = load_protocol(path, "quick", ["train.batch_size=4"], {"variants": "global,fusion", "folds": None})
    assert (cfg.train.epochs, cfg.train.batch_size, p.trials, p.variants) == (3, 4, 2, ("global", "fusion"))
    with pytest.raises(FinescopeError, match="no profile 'slow'; profiles: quick"):
        load_protocol(path, "slow")
    cfg, p = load_protocol(ROOT / "configs" / "breakhis_protocol.yaml", "quick")
    assert p.variants == ("global", "attention", "fusion") and p.per_magnification



def test_set_data_test_fraction_is_the_trials_test_fraction(tmp_path):
    """cv --trials 5 --set data.test_fraction=0.2 held out the protocol's 0.3 of the groups (the shipped
    protocol's), without a word. The --set is read as --test-fraction (the command line wins over the config
    file's protocol and profiles); both at other values are one line; under k-fold, which does not read it, a
    warning says so."""
    path = tmp_path / "p.yaml"
    path.write_text("protocol: {trials: 5, test_fraction: 0.3}\nprofiles:\n  quick:\n    protocol: {test_fraction: 0.4}\n")
    for profile in ("", "quick"):
        assert load_protocol(path, profile, ["data.test_fraction=0.2"])[1].test_fraction == 0.2
    assert load_protocol(path, "", ["data.test_fraction=0.2"], {"test_fraction": 0.2})[1].test_fraction == 0.2
    with pytest.raises(FinescopeError, match=r"--test-fraction 0.25 and --set data.test_fraction=0.2: give one"):
        load_protocol(path, "", ["data.test_fraction=0.2"], {"test_fraction": 0.25})
    with pytest.warns(FinescopeWarning, match=r"k-fold \(--folds 3\) tests 1/3 of the groups in each fold and does not "
                                              r"read data.test_fraction"):
        load_protocol(path, "", ["data.test_fraction=0.2"], {"folds": 3, "trials": 0})


def test_set_model_variant_is_refused_for_the_variants_flag(tmp_path, capsys):
    """cv --set model.variant=global (the example of cv's own --help for --set) trained global, attention and
    fusion, the protocol's variants, without a word: each fold's variant is --variants'. It is one line before
    anything is trained, naming the flag to use (found in review)."""
    path = tmp_path / "p.yaml"
    path.write_text(f"data: {{source: folder, root: {tmp_path / 'data'}}}\nprotocol: {{folds: 2}}\n")
    for flags in ([], ["--variants", "global,fusion"]):
        assert main(["cv", "--config", str(path), *flags, "--out", str(tmp_path / "cv"), "--set",
                     "model.variant=attention"]) == 2
        assert capsys.readouterr().err.startswith("finescope: error: cv trains each variant of --variants (here "
                                                  "global, ")
    assert main(["cv", "--config", str(path), "--variants", "fusion", "--out", str(tmp_path / "cv"), "--set",
                 "model.variant=fusion"]) == 2  # the variant given both ways: only the --set is to go
    assert capsys.readouterr().err.rstrip().endswith("--set model.variant=fusion; leave the --set out")
    assert not (tmp_path / "cv").exists()
    with pytest.raises(SystemExit):
        main(["cv", "--help"])
    assert "model.variant" not in capsys.readouterr().out


def test_a_test_fraction_flag_under_k_fold_is_said_not_to_be_read(tmp_path):
    """cv --folds 5 --test-fraction 0.2 (or a config whose protocol is k-fold) tested 1/5 of the groups per fold and
    dropped --test-fraction without a word, as it did --set data.test_fraction."""
    path = tmp_path / "p.yaml"
    path.write_text("protocol: {folds: 3}\n")
    for flags in ({"test_fraction": 0.2}, {"folds": 3, "trials": 0, "test_fraction": 0.2}):
        with pytest.warns(FinescopeWarning, match=r"^k-fold \(--folds 3\) tests 1/3 of the groups in each fold and "
                                                  r"does not read --test-fraction 0.2"):
            load_protocol(path, "", None, flags)

def test_a_runs_config_yaml_is_a_cv_config(tmp_path):
    """`finescope train --config RUN/config.yaml` reads a run's resolved config; cv stopped at its provenance
    entry ("unknown config key '_provenance'")."""
    cfg = load_config(overrides=["model.backbone=tiny", "train.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    loaded, p = load_protocol(tmp_path / "config.yaml", "", None, {"variants": "global,fusion", "folds": 2})
    assert loaded == load_config(tmp_path / "config.yaml") and (p.folds, p.variants) == (2, ("global", "fusion"))


# ---------------------------------------------------------------------------------------------- end to end
def tiny_cfg(tmp_path: Path, **extra):
    sets = [f"data.root={tmp_path / 'data'}", "data.synthetic_per_class=8", "data.synthetic_size=96",
            "data.num_workers=0", "data.augment=none", "model.backbone=tiny", "model.global_size=48",
            "model.local_size=48", "model.num_crops=2", "model.min_box_fraction=0.5", "train.epochs=1",
            "train.batch_size=8", "train.device=cpu", "data.val_fraction=0"]
    return load_config(overrides=sets + [f"{k}={v}" for k, v in extra.items()])


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cv_end_to_end_summary_recomputes_from_predictions(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    p = Protocol(variants=("global", "fusion"), folds=2, n_boot=50)
    out = tmp_path / "cv"
    summary = run_cv(cfg, p, out, progress=False)
    rows = read_rows(out / "predictions.csv")
    s = load_samples(cfg.data)
    for v in p.variants:  # k-fold: every image exactly once per variant
        assert sorted(r["image"] for r in rows if r["variant"] == v) == sorted(
            str(Path(x.path).relative_to(s.root)) for x in s.samples)
    folds = json.loads((out / "splits.json").read_text())["folds"]
    for f in load_cv_splits(out / "splits.json", s, per_magnification=False):  # no group on two sides
        assert not groups_of(s, f.splits["train"]) & groups_of(s, f.splits["test"])
    assert all(side["shared_groups"] == 0 for f in folds for side in f["summary"].values())
    names = summary["class_names"]
    for v in p.variants:  # the summary's mean over folds, by hand from predictions.csv
        per_fold = []
        for f in folds:
            fr = [r for r in rows if r["variant"] == v and r["fold"] == f["name"]]
            acc = np.mean([r["true"] == r["predicted"] for r in fr])
            y = [names.index(r["true"]) for r in fr]
            yp = [names.index(r["predicted"]) for r in fr]
            per_fold.append((acc, patient_recognition_rate(y, yp, [r["group"] for r in fr])))
        ms = summary["variants"][v]["mean_std"]
        assert ms["image_accuracy"]["mean"] == pytest.approx(np.mean([a for a, _ in per_fold]))
        assert ms["patient_recognition_rate"]["mean"] == pytest.approx(np.mean([b for _, b in per_fold]))
        assert ms["image_accuracy"]["std"] == pytest.approx(np.std([a for a, _ in per_fold], ddof=1))
    assert summary["comparisons"][0]["variant"] == "fusion"
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    run = out / "runs" / "fusion" / "fold0"  # `finescope evaluate` also writes a report
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path / "ev" / "metrics_test.json")]) == 0
    assert (tmp_path / "ev" / "report.html").is_file()

    # a rerun resumes: finished folds are not trained again
    import finescope.trainer

    monkeypatch.setattr(finescope.trainer, "train", lambda *a, **k: pytest.fail("a finished fold was retrained"))
    import finescope.oof

    real_summarize = finescope.oof.summarize_predictions
    monkeypatch.setattr(finescope.oof, "summarize_predictions",
                        lambda *a, **k: pytest.fail("the summary of the same predictions was computed again"))
    again = run_cv(cfg, p, out, progress=False)
    assert again == summary
    # where the cache is, how the data is read and how fast may change, as train --resume allows: a cv moved to a
    # node with other cores or a GPU, or rerun with data.on_error=skip as an unreadable image's error says
    other = tiny_cfg(tmp_path, **{"data.num_workers": 1, "data.on_error": "skip", "train.eval_batch_size": 4,
                                  "train.device": "auto", "data.cache": "memory"})
    assert run_cv(other, p, out, progress=False) == summary
    # other bootstrap settings on the same predictions: computed again
    monkeypatch.setattr(finescope.oof, "summarize_predictions", real_summarize)
    p20 = Protocol(variants=("global", "fusion"), folds=2, n_boot=20)
    assert run_cv(cfg, p20, out, progress=False)["made_from"]["n_boot"] == 20

    # other settings in the same folder: one line, nothing lost
    before = sorted(x.name for x in (out / "runs" / "global").iterdir())
    with pytest.raises(FinescopeError, match="other settings: train.epochs"):
        run_cv(tiny_cfg(tmp_path, **{"train.epochs": 2}), p, out, progress=False)
    assert sorted(x.name for x in (out / "runs" / "global").iterdir()) == before

    # the saved folds are reusable: same folds in a new folder, a mismatching data set is refused
    monkeypatch.undo()
    p1 = Protocol(variants=("global",), folds=2, n_boot=20)
    run_cv(cfg, p1, tmp_path / "cv2", splits_file=str(out / "splits.json"), progress=False)
    again = json.loads((tmp_path / "cv2" / "splits.json").read_text())["folds"]
    assert [f["splits"] for f in again] == [f["splits"] for f in folds]
    other = SampleSet(s.samples[:-2], s.class_names, root=s.root)
    with pytest.raises(FinescopeError, match="does not match the data"):
        load_cv_splits(out / "splits.json", other, per_magnification=False)


def test_cli_cv_bad_variant_and_bad_splits(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"data: {{root: {tmp_path / 'data'}, synthetic_per_class: 8, synthetic_size: 96}}\n"
                        "model: {backbone: tiny}\n")
    assert main(["cv", "--config", str(cfg_path), "--variants", "global,fuson", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown variant 'fuson'" in err[0]
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"format": "finescope-cv-splits/1", "class_names": ["atypical", "typical"],
                               "folds": [{"name": "fold0", "splits": {"train": [], "test": ["images/nope.png"]}}]}))
    assert main(["cv", "--config", str(cfg_path), "--splits", str(bad), "--folds", "2",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the data" in err[0] and "images/nope.png" in err[0]
    assert not (tmp_path / "o" / "runs").exists()


def test_cli_cv_splits_given_a_folder_says_which_file_to_pass(tmp_path, capsys):
    """cv --splits CVFOLDER (the cv folder, not its splits.json) said '--splits ... not found' of a folder that is
    there (found in review): it names the folder as such and the file in it to pass."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"data: {{root: {tmp_path / 'data'}, synthetic_per_class: 8, synthetic_size: 96}}\n"
                        "model: {backbone: tiny}\n")
    (tmp_path / "earlier_cv").mkdir()
    assert main(["cv", "--config", str(cfg_path), "--splits", str(tmp_path / "earlier_cv"), "--folds", "2",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" not in err[0], err
    assert f"--splits '{tmp_path / 'earlier_cv'}' is a folder" in err[0]
    assert f"'{tmp_path / 'earlier_cv' / 'splits.json'}'" in err[0]
    assert not (tmp_path / "o" / "runs").exists()


def _two_class_folders(root):
    """Class folders a and b of three patient folders each, one 64 x 64 image in each patient folder."""
    from PIL import Image

    for c in ("a", "b"):
        for g in range(3):
            (root / c / f"{c}{g}").mkdir(parents=True)
            Image.new("RGB", (64, 64), (40 * g, 90, 200) if c == "a" else (200, 40 * g, 60)).save(
                root / c / f"{c}{g}" / "x.png")
    return root


def _tiny_cv_args(tmp_path, root, data_extra: str, batch_size: int) -> list[str]:
    """A 2-fold cv of the tiny global model on the folder ``root`` (config ``tmp_path/c.yaml``, out ``tmp_path/o``)."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"data: {{source: folder, root: {root}, num_workers: 0, augment: none{data_extra}}}\n"
                        "model: {backbone: tiny, global_size: 32, local_size: 32}\n"
                        f"train: {{epochs: 1, batch_size: {batch_size}, device: cpu}}\n")
    return ["cv", "--config", str(cfg_path), "--variants", "global", "--folds", "2", "--out", str(tmp_path / "o"),
            "--quiet"]


def test_cv_of_one_class_writes_nothing_and_runs_once_a_class_is_added(tmp_path, capsys):
    """Data of one class was refused only by the first fold's training, after cv.json and splits.json were
    written: the same command, rerun once the data had a second class, was refused by those files ('--splits ...
    is for classes [...]', an option never given). It is refused first, as train refuses it, and writes nothing."""
    root = _two_class_folders(tmp_path / "data")
    only_a = tmp_path / "only_a"
    (only_a / "a").parent.mkdir()
    (root / "a").rename(only_a / "a")
    args = _tiny_cv_args(tmp_path, only_a, "", batch_size=4)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds one class (a)" in err[0]
    assert not (tmp_path / "o").exists()
    (root / "b").rename(only_a / "b")
    assert main(args) == 0
    assert (tmp_path / "o" / "summary.json").is_file()


def test_a_fold_another_process_trains_says_to_rerun_the_cv(tmp_path, capsys):
    """A second cv into a folder whose fold another process trains (the same job started twice, a requeued job
    while the first still runs) was refused with train's advice, 'then --resume', an option cv does not have."""
    import fcntl

    root = _two_class_folders(tmp_path / "data")
    args = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8)
    fold = tmp_path / "o" / "runs" / "global" / "fold0"
    fold.mkdir(parents=True)
    with open(fold / ".lock", "w") as held:  # the other cv, training the fold
        held.write("pid 123 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"finescope: error: '{fold}' is being trained by another process (pid 123 on elsewhere); wait for "
                   "it to end or stop it, then rerun the same command, or choose another --out"]
    assert main(args) == 0  # the same command, once it has ended
    assert (tmp_path / "o" / "summary.json").is_file()


def test_cv_says_it_does_not_read_data_splits(tmp_path, capsys):
    """cv --set data.splits=runs/x/splits.json (README: 'a splits.json to reuse instead of drawing splits') drew
    new folds without a word; cv reads folds from --splits only, and now says so in one line."""
    root = _two_class_folders(tmp_path / "data")
    shutil.rmtree(root / "b")  # one class: refused before anything is trained
    assert main([*_tiny_cv_args(tmp_path, root, ", splits: runs/x/splits.json", batch_size=4)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("finescope: error: ")
    assert err[0].startswith("finescope: warning: cv draws its own folds and does not read data.splits "
                             "'runs/x/splits.json'") and "--splits" in err[0]


@pytest.mark.parametrize("fix", ["remove", "skip"])
def test_a_cv_stopped_before_any_checkpoint_runs_again_once_the_data_is_fixed(tmp_path, capsys, fix):
    """An unreadable image stopped the first fold ('fix or remove the file, or set data.on_error=skip'); the
    same command rerun after either fix was refused by what the stopped cv had recorded and trained nothing on:
    its splits.json ('--splits ... does not match the data', an option never given) or its cv.json
    (data.on_error was 'raise'). A cv folder without a checkpoint has nothing to lose: the rerun starts again."""
    root = _two_class_folders(tmp_path / "data")
    bad = root / "a" / "a0" / "y.png"
    bad.write_text("not an image")
    args = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8)
    assert main(args) == 2
    assert "y.png" in capsys.readouterr().err
    if fix == "remove":
        bad.unlink()
    else:
        args += ["--set", "data.on_error=skip"]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "summary.json").is_file()


def test_a_rerun_on_changed_data_names_the_cv_folders_own_folds_not_splits(tmp_path, capsys):
    """A cv with trained folds, rerun after an image was removed from the data: the error said '--splits
    OUT/splits.json does not match the data ... or leave --splits out', an option the command never had. It
    names the cv folder's own folds and says that the data changed since they were drawn."""
    root = _two_class_folders(tmp_path / "data")
    args = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8)
    assert main(args) == 0
    capsys.readouterr()
    (root / "a" / "a0" / "x.png").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--splits" not in err[0], err
    assert f"this cv folder's splits file '{tmp_path / 'o' / 'splits.json'}' does not match the data" in err[0]
    assert "the data changed since its folds were drawn" in err[0]


def test_a_cv_goes_on_after_its_data_moved_with_the_new_data_root(tmp_path, capsys, monkeypatch):
    """A cv whose data folder moved, rerun with --set data.root=NEW: refused ('other settings: data.root ...;
    rerun with the same settings'), settings whose folder is gone, so its folds could go on only once the data
    was moved back. Its folds name their images relative to the root, and a finished fold's predictions (the old
    root's paths) are matched by their place under the root its config.yaml names: nothing is trained again and
    the out-of-fold predictions are those of before."""
    import finescope.trainer

    root = _two_class_folders(tmp_path / "data")
    args = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8)
    assert main(args) == 0
    before = (tmp_path / "o" / "predictions.csv").read_text()
    shutil.move(root, tmp_path / "moved")
    capsys.readouterr()
    monkeypatch.setattr(finescope.trainer, "train", lambda *a, **k: pytest.fail("a finished fold was retrained"))
    assert main([*args, "--set", f"data.root={tmp_path / 'moved'}"]) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "predictions.csv").read_text() == before
    assert json.loads((tmp_path / "o" / "cv.json").read_text())["settings"]["config"]["data"]["root"] == str(
        tmp_path / "moved")


def test_a_cv_of_a_manifest_listing_images_outside_its_folder_goes_on_after_they_moved(tmp_path, capsys,
                                                                                     monkeypatch):
    """A cv of a CSV manifest that lists its images by absolute paths outside the CSV's folder, rerun after the
    images moved and the manifest was rewritten with their new paths (the same data.root): refused, its folds
    naming the images relative to the CSV's folder ('../data/a/a0/x.png'). They keep their places relative to each
    other: nothing is trained again and the out-of-fold predictions are those of before, of the images named
    where they are now."""
    import finescope.trainer

    def manifest(images: Path) -> None:
        rows = [f"{images / c / f'{c}{g}' / 'x.png'},{c},{c}{g}" for c in ("a", "b") for g in range(3)]
        (tmp_path / "proj" / "manifest.csv").write_text("\n".join(["path,label,group", *rows]) + "\n")

    root = _two_class_folders(tmp_path / "data")
    (tmp_path / "proj").mkdir()
    manifest(root)
    args = _tiny_cv_args(tmp_path, tmp_path / "proj" / "manifest.csv", ", val_fraction: 0, source: csv", batch_size=8)
    args[2] = str(tmp_path / "c2.yaml")
    (tmp_path / "c2.yaml").write_text((tmp_path / "c.yaml").read_text().replace("source: folder, ", ""))
    assert main(args) == 0, capsys.readouterr().err
    before = (tmp_path / "o" / "predictions.csv").read_text()
    shutil.move(root, tmp_path / "disk2")
    manifest(tmp_path / "disk2")
    capsys.readouterr()
    monkeypatch.setattr(finescope.trainer, "train", lambda *a, **k: pytest.fail("a finished fold was retrained"))
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "predictions.csv").read_text() == before.replace("../data/", "../disk2/")  # named now


def test_compute_metrics_matches_summary_pooled(tmp_path):
    """Pooled values in summary.json equal compute_metrics over all out-of-fold rows of a variant."""
    from finescope.oof import as_arrays, read_oof_csv, summarize_predictions

    path = tmp_path / "predictions.csv"
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "group", "magnification", "true", "predicted", "prob_a", "prob_b", "fold", "variant"])
        for v in ("global", "fusion"):
            for i in range(40):
                pa = rng.random()
                true = "a" if i % 2 else "b"
                w.writerow([f"{i}.png", f"g{i // 4}", 100, true, "a" if pa > 0.5 else "b", pa, 1 - pa,
                            f"fold{i % 2}", v])
    summary = summarize_predictions(path, n_boot=100)
    rows, names = read_oof_csv(path)
    y, p, g = as_arrays([r for r in rows if r["variant"] == "fusion"], names)
    ref = compute_metrics(y, p, g, names)
    pooled = summary["variants"]["fusion"]["pooled"]
    for m in ("image_accuracy", "patient_recognition_rate", "auc", "balanced_accuracy"):
        assert pooled[m]["value"] == pytest.approx(ref[m])
        assert pooled[m]["low"] <= pooled[m]["value"] <= pooled[m]["high"]
    assert summary["comparisons"][0]["metrics"]["image_accuracy"]["diff"] == pytest.approx(
        ref["image_accuracy"] - summary["variants"]["global"]["pooled"]["image_accuracy"]["value"])
    assert set(summary["variants"]["fusion"]["per_magnification"]) == {"100"}


def test_splits_file_that_is_not_a_cv_file(tmp_path):
    s = toy_set()
    for text in ("{not json", json.dumps({"format": "finescope-splits/1", "splits": {}})):
        (tmp_path / "x.json").write_text(text)
        with pytest.raises(FinescopeError, match="is not a finescope cv splits file"):
            load_cv_splits(tmp_path / "x.json", s, per_magnification=False)


@pytest.mark.parametrize("damage", [
    lambda raw: raw["folds"][0].pop("splits"),
    lambda raw: raw["folds"].__setitem__(0, 5),
    lambda raw: raw.pop("class_names"),
    lambda raw: raw["folds"][0]["splits"].__setitem__("testing", raw["folds"][0]["splits"].pop("test")),
    lambda raw: raw["folds"][0]["splits"]["train"].extend(raw["folds"][0]["splits"].pop("test")),
    lambda raw: raw["folds"][0].__setitem__("name", "../../elsewhere"),  # trained outside the cv folder
    lambda raw: raw["folds"][1].__setitem__("name", raw["folds"][0]["name"]),  # taken as the first, finished
    lambda raw: raw["folds"][0].__setitem__("name", ""),
    lambda raw: raw["folds"][0].__setitem__("magnification", [40]),  # a TypeError traceback
    lambda raw: raw["folds"].clear(),  # cv trained nothing, then "'predictions.csv' holds no predictions"
], ids=["no-splits", "not-a-fold", "no-class-names", "renamed-side", "no-test-side", "path-name", "same-name",
        "no-name", "magnification-list", "no-fold"])
def test_a_hand_edited_cv_splits_file_is_one_clear_error(tmp_path, damage):
    from finescope.cv import save_cv_splits

    s = toy_set()
    save_cv_splits(tmp_path / "splits.json", make_folds(s, Protocol(folds=2), 0, 0.0), s, extra={})
    raw = json.loads((tmp_path / "splits.json").read_text())
    damage(raw)
    (tmp_path / "splits.json").write_text(json.dumps(raw))
    with pytest.raises(FinescopeError, match="splits.json"):
        load_cv_splits(tmp_path / "splits.json", s, per_magnification=False)


@pytest.mark.parametrize("own", [False, True])
def test_folds_reused_on_data_grouped_otherwise_name_the_file_and_the_fold(tmp_path, own):
    """cv --splits FILE (or a cv rerun) on data whose groups changed since (a CSV's group column edited so that
    two patients are one) said only "split leak: group 'c0_g0' is on both 'train' and 'test'", naming neither the
    file nor the fold nor what to do."""
    from dataclasses import replace

    from finescope.cv import save_cv_splits

    s = toy_set()
    folds = make_folds(s, Protocol(folds=2), 0, 0.0)
    save_cv_splits(tmp_path / "splits.json", folds, s, extra={})
    test0 = groups_of(s, folds[0].splits["test"])
    a, b = sorted(test0)[0], sorted(groups_of(s, folds[0].splits["train"]) - test0)[0]  # one on each side
    merged = SampleSet([replace(x, group=a if x.group == b else x.group) for x in s.samples], s.class_names, s.root)
    with pytest.raises(FinescopeError) as e:
        load_cv_splits(tmp_path / "splits.json", merged, per_magnification=False, own=own)
    message = str(e.value)
    assert str(tmp_path / "splits.json") in message and f"fold {folds[0].name}" in message
    assert f"group '{a}'" in message
    assert ("restore it, or run this cv into a new --out folder" if own else "leave --splits out") in message


def test_folds_reused_on_data_with_an_image_added_name_the_image(tmp_path):
    """cv --splits FILE (or a rerun) on a folder that gained an image said only "fold fold0 covers 30 images but the
    data has 31 for it", leaving the user to find which of thousands of images is new."""
    from finescope.cv import save_cv_splits

    s = toy_set()
    save_cv_splits(tmp_path / "splits.json", make_folds(s, Protocol(folds=2), 0, 0.0), s, extra={})
    added = SampleSet(sorted([*s.samples, Sample("/d/None/new.png", 0, "new")], key=lambda x: x.path),
                      s.class_names, s.root)
    with pytest.raises(FinescopeError, match=r"covers 30 images but the data has 31 for it: e\.g\. 'None/new\.png' "
                                             r"is in none of its sides"):
        load_cv_splits(tmp_path / "splits.json", added, per_magnification=False)


def test_resuming_with_a_splits_file_checks_it_first(tmp_path):
    """A cv folder that already has its folds, rerun with --splits: a missing or broken file is one line; the same
    folds resume, other folds are refused."""
    from finescope.cv import resolve_folds, save_cv_splits

    s, cfg, p = toy_set(), load_config(), Protocol(folds=2)
    folds = make_folds(s, p, 0, 0.0)
    save_cv_splits(tmp_path / "out" / "splits.json", folds, s, extra={})
    save_cv_splits(tmp_path / "same.json", folds, s, extra={"note": "a copy"})
    save_cv_splits(tmp_path / "other.json", make_folds(s, p, 1, 0.0), s, extra={})
    (tmp_path / "broken.json").write_text("{not json")
    for name, message in (("absent.json", "not found"), ("broken.json", "is not a finescope cv splits file"),
                          ("other.json", "already holds other folds")):
        with pytest.raises(FinescopeError, match=message):
            resolve_folds(tmp_path / "out", s, cfg, p, str(tmp_path / name))
    got = resolve_folds(tmp_path / "out", s, cfg, p, str(tmp_path / "same.json"))
    assert [f.splits["test"].tolist() for f in got] == [f.splits["test"].tolist() for f in folds]


def test_a_finished_fold_is_checked_against_a_rerun_whose_cv_json_was_removed(tmp_path):
    """cv.json removed and the cv rerun with other settings: the folds finished before were kept as they were and
    counted under the new settings, which the new cv.json then named. Refused, naming the fold and the key, before
    cv.json is written again; the same settings pass, also with --out spelled otherwise (another data.splits)."""
    from finescope.config import save_config
    from finescope.cv import fold_config

    cfg, p, out = tiny_cfg(tmp_path), Protocol(variants=("global",), folds=2), tmp_path / "cv"
    fold = make_folds(load_samples(cfg.data), p, cfg.seed, cfg.data.val_fraction)[0]
    run = out / "runs" / "global" / fold.name
    run.mkdir(parents=True)
    save_config(fold_config(cfg, "global", fold, out / "folds" / fold.name / "splits.json"), run / "config.yaml")
    (run / "metrics.json").write_text("{}")
    (run / "predictions_test.csv").write_text("path\n")
    with pytest.raises(FinescopeError, match=rf"'{run}' is a finished fold trained with other settings than this "
                                             r"cv's: train.lr \(was 0.0003, now 0.5\); .*delete"):
        run_cv(tiny_cfg(tmp_path, **{"train.lr": 0.5}), p, out, progress=False)
    assert not (out / "cv.json").exists()
    from finescope.cv import _check_finished_config

    _check_finished_config(run, fold_config(cfg, "global", fold, Path("elsewhere") / "splits.json"))


def test_an_interrupted_fold_resumes_whichever_way_out_is_spelled(tmp_path, monkeypatch, capsys):
    """The same cv rerun with --out absolute where it was relative: the interrupted fold was refused ('--resume:
    ... trained with another config: data.splits'), as its config names the fold's splits file by the old path."""
    monkeypatch.chdir(tmp_path)
    cfg, p = tiny_cfg(tmp_path), Protocol(variants=("global",), folds=2, n_boot=10)
    run_cv(cfg, p, "cv", progress=False, report=False)
    for name in ("metrics.json", "predictions_test.csv"):  # as if killed in the last epoch's test
        (tmp_path / "cv" / "runs" / "global" / "fold0" / name).unlink()
    run_cv(cfg, p, tmp_path / "cv", progress=True, report=False)
    assert "cv: global fold0 resumed" in capsys.readouterr().out


def test_a_cv_folder_refuses_folds_drawn_with_another_protocol_when_cv_json_was_removed(tmp_path):
    """Without cv.json (removed) a rerun with --folds 3 went on with the 2 folds the folder holds, and its new
    cv.json said 3. The folds' own record (splits.json's extra) is compared: another protocol or seed is one line."""
    from dataclasses import asdict

    from finescope.cv import resolve_folds, save_cv_splits

    s, cfg, p = toy_set(), load_config(), Protocol(folds=2)
    save_cv_splits(tmp_path / "splits.json", make_folds(s, p, cfg.seed, 0.0), s, extra={"seed": cfg.seed, **asdict(p)})
    assert len(resolve_folds(tmp_path, s, cfg, Protocol(folds=2, variants=("fusion",), n_boot=7))) == 2
    for other, message in ((Protocol(folds=3), "--folds 2, not 3"), (Protocol(folds=0, trials=2), "--folds 2, not 0")):
        with pytest.raises(FinescopeError, match=f"holds folds drawn with {message}; rerun with the settings"):
            resolve_folds(tmp_path, s, cfg, other)
    with pytest.raises(FinescopeError, match="drawn with seed 0, not 5"):
        resolve_folds(tmp_path, s, load_config(overrides=["seed=5"]), p)


def test_summary_scores_patients_and_resamples_their_case(tmp_path):
    """predictions.csv's patient column: PRR over patient folders (method.md), intervals over case groups; a file
    without the column scores each group as one patient."""
    from finescope.oof import summarize_predictions

    rows = [("22549", "22549AB", "benign")] * 4 + [("22549", "22549CD", "malignant")] * 2 + [
        ("3411", "3411F", "benign")] * 2 + [("13412", "13412", "malignant")] * 2
    path = tmp_path / "predictions.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "group", "patient", "magnification", "true", "predicted", "prob_benign",
                    "prob_malignant", "fold", "variant"])
        for i, (group, patient, pred) in enumerate(rows):
            w.writerow([f"{i}.png", group, patient, 100, "benign" if i < 8 else "malignant", pred,
                        0.8 if pred == "benign" else 0.2, 0.2 if pred == "benign" else 0.8, "trial0", "global"])
    summary = summarize_predictions(path, n_boot=50)["variants"]["global"]
    assert summary["folds"]["trial0"]["patient_recognition_rate"] == pytest.approx(3 / 4)  # 22549CD wrong
    assert summary["folds"]["trial0"]["n_groups"] == 4  # the patients the metrics scored
    pooled = summary["pooled"]
    assert pooled["patient_recognition_rate"]["value"] == pytest.approx(3 / 4)
    assert pooled["patient_accuracy_majority"]["value"] == pytest.approx(3 / 4)
    # n_groups is the patients scored in a fold's metrics and in the pooled ones alike (as in a run's metrics.json);
    # the pooled ones counted the 3 case groups the intervals resample, now n_resampled_groups
    assert (pooled["n_groups"], pooled["n_patients"], pooled["n_resampled_groups"]) == (4, 4, 3)
    assert summary["per_magnification"]["100"]["patient_recognition_rate"]["mean"] == pytest.approx(3 / 4)
    text = path.read_text().splitlines()  # an older file: no patient column
    path.write_text("\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != 2) for line in text))
    by_case = summarize_predictions(path, n_boot=50)["variants"]["global"]["folds"]["trial0"]
    assert by_case["patient_recognition_rate"] == pytest.approx((4 / 6 + 1 + 1) / 3)


def test_a_patient_of_several_trials_is_scored_once_per_trial_in_the_pooled_metrics(tmp_path):
    """Repeated trials test a patient once per trial, each time by another trial's model. The pooled patient
    metrics merged its rows of all trials into one patient: one majority vote over the predictions of several
    models (an ensemble no trial ran), which scored patient P right although trial1's model called it wrong."""
    from finescope.oof import summarize_predictions

    path = tmp_path / "predictions.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "group", "patient", "magnification", "true", "predicted", "prob_a", "prob_b", "fold",
                    "variant"])
        for trial, right in (("trial0", 3), ("trial1", 1)):  # P (class a): 3 of 4 images right, then 1 of 4
            for i in range(4):
                pa = 0.9 if i < right else 0.45
                w.writerow([f"P{i}.png", "P", "P", 100, "a", "a" if i < right else "b", pa, 1 - pa, trial, "global"])
        for i in range(2):  # Q (class b): tested in trial1 only, right
            w.writerow([f"Q{i}.png", "Q", "Q", 100, "b", "b", 0.2, 0.8, "trial1", "global"])
    pooled = summarize_predictions(path, n_boot=20)["variants"]["global"]["pooled"]
    # (trial, patient) units: P in trial0 right, P in trial1 wrong, Q in trial1 right
    assert pooled["patient_accuracy_majority"]["value"] == pytest.approx(2 / 3)
    assert pooled["patient_recognition_rate"]["value"] == pytest.approx((3 / 4 + 1 / 4 + 1) / 3)
    assert pooled["image_accuracy"]["value"] == pytest.approx(6 / 10)
    assert pooled["n_patients"] == 2  # distinct patients, however many trials test them
    # the patients scored: one per trial that tests it, as the folds' n_groups count them
    folds = summarize_predictions(path, n_boot=20)["variants"]["global"]["folds"]
    assert pooled["n_groups"] == folds["trial0"]["n_groups"] + folds["trial1"]["n_groups"] == 3
    assert pooled["n_resampled_groups"] == 2
    assert pooled["auc"]["ci_note"] == "only 2 patients"  # not 'patient groups': each group is one patient


def test_equal_patient_ids_in_two_groups_are_two_patients_in_every_number(tmp_path):
    """A manifest's patient is the patient within its group (README): patient 'P1' of group A (right) and 'P1' of
    group B (wrong) are two patients. The pooled PRR scored them apart (0.8) while the per-fold metrics of the same
    single fold merged them into one of score 0.5 (PRR 0.875, 4 patients), so one summary gave two PRRs."""
    from finescope.oof import summarize_predictions

    rows = [("A", "P1", "a", "a")] * 2 + [("B", "P1", "a", "b")] * 2 + [("C", "P2", "b", "b")] * 2 + [
        ("D", "P3", "b", "b")] * 2 + [("E", "P4", "a", "a")] * 2
    path = tmp_path / "predictions.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "group", "patient", "magnification", "true", "predicted", "prob_a", "prob_b", "fold",
                    "variant"])
        for i, (group, patient, true, pred) in enumerate(rows):
            w.writerow([f"{i}.png", group, patient, 100, true, pred, 0.8 if pred == "a" else 0.2,
                        0.2 if pred == "a" else 0.8, "fold0", "global"])
    summary = summarize_predictions(path, n_boot=20)["variants"]["global"]
    for m in ("patient_recognition_rate", "patient_accuracy_majority", "patient_accuracy_mean_prob"):
        assert summary["folds"]["fold0"][m] == pytest.approx(4 / 5) == summary["pooled"][m]["value"]
        assert summary["per_magnification"]["100"][m]["mean"] == pytest.approx(4 / 5)
    assert summary["folds"]["fold0"]["n_groups"] == summary["pooled"]["n_patients"] == 5


@realdata
def test_breakhis_patients_are_patient_folders_within_case_groups(tmp_path):
    """Spanhol et al. count 22549AB, 22549CD and 22549G as three patients; the split keeps their case together."""
    cfg = load_config(overrides=[f"data.root={SHARED_DATA / 'breakhis'}", "data.source=breakhis"])
    s = load_samples(cfg.data)
    patients = {x.patient for x in s.samples}
    assert len(patients) == 18 and len({x.group for x in s.samples}) == 14
    assert {"22549AB", "22549CD", "22549G"} <= patients
    assert all(x.patient.startswith(x.group) for x in s.samples)


def test_collecting_refuses_a_run_that_tested_other_images(tmp_path):
    """A finished run is taken as it is: when its predictions_test.csv holds an image outside its fold's test side
    (a run of other folds, e.g. after splits.json was replaced, or of data elsewhere), its rows would be
    out-of-fold numbers of images it trained on. That is an error naming the run to delete, never a row."""
    from finescope.oof import collect_predictions

    s = toy_set()
    folds = make_folds(s, Protocol(folds=2), 0, 0.0)
    run = tmp_path / "runs" / "global" / folds[0].name
    run.mkdir(parents=True)

    def write(indices):
        with (run / "predictions_test.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "group", "true", "predicted", "prob_a", "prob_b", "boxes"])
            for i in indices:
                w.writerow([s.samples[i].path, s.samples[i].group, "a", "a", 0.6, 0.4, ""])

    write(folds[0].splits["test"])
    assert len(collect_predictions(tmp_path, folds[:1], ("global",), s)) == len(folds[0].splits["test"])
    write(folds[1].splits["test"])  # the other fold's test images: trained on in this fold
    with pytest.raises(FinescopeError, match=f"not on the test side of {folds[0].name}.*delete"):
        collect_predictions(tmp_path, folds[:1], ("global",), s)
    write(folds[0].splits["test"])
    with (run / "predictions_test.csv").open("a") as fh:  # a spreadsheet saves a blank row so: a ValueError
        fh.write(",,,,,,\n")
    with pytest.raises(FinescopeError, match=f"predicts '', which is not on the test side of {folds[0].name}"):
        collect_predictions(tmp_path, folds[:1], ("global",), s)
    (run / "predictions_test.csv").write_text("path,group,true\n")
    with pytest.raises(FinescopeError, match="no column 'predicted'"):
        collect_predictions(tmp_path, folds[:1], ("global",), s)


def test_a_cv_that_ordered_whole_number_classes_as_text_goes_on_in_its_order(tmp_path):
    """Classes 1, 2, 10 are now in that order; a cv folder made when they were 1, 10, 2 (its files and
    checkpoints store that order) is rerun in its own order, also the fold it had not trained yet."""
    from PIL import Image

    from finescope.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path / "data"
    for n, c in enumerate(("1", "2", "10")):
        for g in range(3):
            (root / c / f"p{c}_{g}").mkdir(parents=True)
            Image.new("RGB", (64, 64), (60 * n, 40 * g, 90)).save(root / c / f"p{c}_{g}" / "x.png")
    args, out, old = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8), tmp_path / "o", ["1", "10", "2"]
    assert main(args) == 0
    assert json.loads((out / "splits.json").read_text())["class_names"] == ["1", "2", "10"]
    for path in [out / "cv.json", out / "splits.json", *out.glob("folds/*/splits.json"), *out.glob("runs/*/*/*.json")]:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and "class_names" in raw:
            path.write_text(json.dumps({**raw, "class_names": old}))
    for path in out.glob("runs/*/*/checkpoints/*.pt"):
        state = load_checkpoint(path)
        state.pop("path", None)
        save_checkpoint({**state, "class_names": old}, path)
    untrained = sorted(out.glob("runs/global/*"))[-1]
    for path in sorted(untrained.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    untrained.rmdir()
    assert main(args) == 0
    assert load_checkpoint(untrained / "checkpoints" / "last.pt")["class_names"] == old
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{n}" for n in old]
    assert all(r["true"] == Path(r["image"]).parent.parent.name for r in rows)


def test_a_splits_file_is_recorded_as_the_folds_it_holds_and_contradicting_flags_are_refused(tmp_path, capsys):
    """cv --splits A/splits.json --trials 5 trained A's 2 folds while its cv.json and splits.json said 5 trials
    (the command's protocol; --folds, --trials and --test-fraction were ignored without a word). The contradiction
    is one line before anything is written; without such flags the file's folds are what cv.json and splits.json
    record."""
    root = _two_class_folders(tmp_path / "data")
    args = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8)
    assert main(args) == 0
    capsys.readouterr()
    reuse = [*args[:args.index("--folds")], "--splits", str(tmp_path / "o" / "splits.json"), "--out",
             str(tmp_path / "b"), "--quiet"]
    for flags in (["--trials", "5"], ["--folds", "3"], ["--test-fraction", "0.2"], ["--set", "data.test_fraction=0.2"]):
        assert main([*reuse, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        said = " ".join(flags).replace("--set data.test_fraction=", "--test-fraction ")
        assert len(err) == 1 and f"holds the 2 folds of --folds 2, not {said}" in err[0], err
        assert not (tmp_path / "b").exists()
    assert main([*reuse, "--folds", "2"]) == 0  # agreeing flags pass
    assert main(reuse) == 0  # the config's default protocol (5 trials) gives way to the file's folds
    record = json.loads((tmp_path / "b" / "cv.json").read_text())
    assert record["settings"]["protocol"] == {"folds": 2, "per_magnification": False}
    assert record["folds"] == ["fold0", "fold1"]
    extra = json.loads((tmp_path / "b" / "splits.json").read_text())["extra"]
    assert extra["folds"] == 2 and extra["trials"] == 0


def test_a_splits_files_validation_sides_are_recorded_at_the_fraction_that_carved_them(tmp_path, capsys):
    """cv --splits A/splits.json --set data.val_fraction=0.3 trained A's validation sides (carved at A's fraction)
    and its cv.json and the folds' config.yaml said 0.3. A's fraction, which its splits.json now records, is what a
    reuse records, and one line says that the other one is not read."""
    root = _two_class_folders(tmp_path / "data")
    args = _tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8)
    assert main(args) == 0
    assert json.loads((tmp_path / "o" / "splits.json").read_text())["extra"]["val_fraction"] == 0.0
    capsys.readouterr()
    reuse = [*args[:args.index("--folds")], "--splits", str(tmp_path / "o" / "splits.json"), "--out",
             str(tmp_path / "b"), "--quiet", "--set", "data.val_fraction=0.3"]
    assert main(reuse) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"finescope: warning: the validation sides of --splits '{tmp_path / 'o' / 'splits.json'}' were "
                   "carved at data.val_fraction=0.0 and are reused as they are; data.val_fraction=0.3 is not read"]
    assert json.loads((tmp_path / "b" / "cv.json").read_text())["settings"]["config"]["data"]["val_fraction"] == 0.0
    assert load_config(tmp_path / "b" / "runs" / "global" / "fold0" / "config.yaml").data.val_fraction == 0.0


def test_a_fold_evaluated_with_model_overrides_is_not_taken_for_the_folds_own_predictions(tmp_path, capsys):
    """`finescope evaluate CV/runs/fusion/fold0 --set model.threshold=0.95` wrote that model's predictions over the
    fold's predictions_test.csv: a rerun of the cv (or one adding a variant) collected them into predictions.csv as
    the trained fold's, and the ablation table changed silently (fusion PRR 0.625 -> 0.594, found in review).
    evaluate now writes them apart (predictions_test_threshold=0.95.csv) and the cv goes on with the fold's own; such
    a file left by an older version is refused naming the file and the override, and the cv goes on once evaluate
    wrote the fold's own again."""
    cfg = tiny_cfg(tmp_path)
    p = Protocol(variants=("fusion",), folds=2, n_boot=20)
    out = tmp_path / "cv"
    run_cv(cfg, p, out, progress=False, report=False)
    before = (out / "predictions.csv").read_text()
    run = out / "runs" / "fusion" / "fold0"
    assert main(["evaluate", str(run), "--device", "cpu", "--set", "model.threshold=0.95"]) == 0
    run_cv(cfg, p, out, progress=False, report=False)  # the fold's own predictions, untouched
    assert (out / "predictions.csv").read_text() == before
    shutil.copy(run / "predictions_test_threshold=0.95.csv", run / "predictions_test.csv")  # an older evaluate's
    with pytest.raises(FinescopeError, match=r"predictions_test\.csv' holds the predictions of .*model\.threshold="
                                             r"0\.95.*finescope evaluate"):
        run_cv(cfg, p, out, progress=False, report=False)
    with pytest.raises(FinescopeError, match="model.threshold=0.95"):  # before a variant added trains for hours
        run_cv(cfg, Protocol(variants=("fusion", "global"), folds=2, n_boot=20), out, progress=False, report=False)
    assert not (out / "runs" / "global").exists()
    assert (out / "predictions.csv").read_text() == before
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0  # the fold's own predictions again
    run_cv(cfg, p, out, progress=False, report=False)
    assert (out / "predictions.csv").read_text() == before


def test_a_per_magnification_folds_splits_file_says_which_magnification_to_train_it_on(tmp_path):
    """README: a cv's folds/<fold>/splits.json trains with `finescope train --set data.splits=...`. That of a
    per-magnification fold (40x_fold0) lists the 40X images only, and on the data of all magnifications train said
    the other images were 'added since the split was made?' and to remove their rows from the manifest (found in
    review): it names the fold's magnification and the data.magnifications to give."""
    from finescope.data import load_splits, save_splits

    s = toy_set(mags=(40, 100))
    fold = make_folds(s, Protocol(folds=2, per_magnification=True), seed=0, val_fraction=0.0)[0]
    save_splits(tmp_path / "splits.json", fold.splits, s, extra={"fold": fold.name})  # as cv writes it
    with pytest.raises(FinescopeError, match=r"fold 40x_fold0 of a per-magnification cv.*"
                                             r"--set data\.magnifications=\[40\]"):
        load_splits(tmp_path / "splits.json", s)


def test_per_magnification_folds_that_took_all_images_together_are_recorded_so(tmp_path, capsys):
    """cv --per-magnification on images without a magnification (a folder of one microscope's images) takes them
    all together, and a warning said so, but cv.json and splits.json recorded per_magnification: true, folds that
    were never drawn. They record what was drawn; the same command, and a folder recorded before, still resume."""
    root = _two_class_folders(tmp_path / "data")
    args = [*_tiny_cv_args(tmp_path, root, ", val_fraction: 0", batch_size=8), "--per-magnification"]
    assert main(args) == 0
    assert "have no magnification" in capsys.readouterr().err
    out = tmp_path / "o"
    assert json.loads((out / "cv.json").read_text())["settings"]["protocol"]["per_magnification"] is False
    assert json.loads((out / "splits.json").read_text())["extra"]["per_magnification"] is False
    assert main(args) == 0  # the same command resumes
    for name, key in (("cv.json", "settings"), ("splits.json", "extra")):  # as a cv of before recorded them
        raw = json.loads((out / name).read_text())
        (raw[key]["protocol"] if name == "cv.json" else raw[key])["per_magnification"] = True
        (out / name).write_text(json.dumps(raw))
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((out / "cv.json").read_text())["settings"]["protocol"]["per_magnification"] is False


def _two_magnification_manifest(root: Path) -> Path:
    """A manifest of 16 images 32 x 32: classes a and b of two patients each, every patient at 40X and 100X."""
    from PIL import Image

    root.mkdir(parents=True)
    rows = ["path,label,group,magnification"]
    for i in range(16):
        Image.new("RGB", (32, 32), (20 * i, 90, 200) if i % 2 else (200, 20 * i, 60)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},p{i % 4},{40 if i < 8 else 100}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


@pytest.mark.parametrize("drawn_per_magnification", [True, False])
def test_a_splits_file_says_whether_its_folds_are_per_magnification(tmp_path, capsys, drawn_per_magnification):
    """cv --splits A/splits.json read A's folds by the command's per_magnification: folds of one magnification
    (40x_fold0) reused without --per-magnification, or A's folds of all magnifications reused under the BreakHis
    protocol's per_magnification: true, were refused as 'fold 40x_fold0 covers 8 images but the data has 0 for it'.
    The file's folds say it, as they say their kind and number; a flag that contradicts them is one line."""
    from finescope.cv import save_cv_splits

    manifest = _two_magnification_manifest(tmp_path / "data")
    cfg = load_config(overrides=["data.source=csv", f"data.root={manifest}", "data.num_workers=0",
                                 "data.augment=none", "data.val_fraction=0", "model.backbone=tiny",
                                 "model.global_size=32", "model.local_size=32", "train.epochs=1",
                                 "train.batch_size=8", "train.device=cpu"])
    s = load_samples(cfg.data)
    drawn = Protocol(variants=("global",), folds=2, per_magnification=drawn_per_magnification)
    folds = make_folds(s, drawn, seed=0, val_fraction=0.0)
    save_cv_splits(tmp_path / "a.json", folds, s, extra={"seed": 0, "folds": 2})
    save_config(cfg, tmp_path / "c.yaml")
    flag = "--per-magnification" if drawn_per_magnification else "--no-per-magnification"
    other = "--no-per-magnification" if drawn_per_magnification else "--per-magnification"
    reuse = ["cv", "--config", str(tmp_path / "c.yaml"), "--variants", "global", "--splits", str(tmp_path / "a.json"),
             "--out", str(tmp_path / "b"), "--quiet"]
    assert main([*reuse, other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"holds the 2 folds of --folds 2 {flag}" in err[0] and f"not {other}:" in err[0], err
    assert not (tmp_path / "b").exists()
    asked = Protocol(variants=("global",), n_boot=20, per_magnification=not drawn_per_magnification)
    run_cv(cfg, asked, tmp_path / "b", splits_file=str(tmp_path / "a.json"), progress=False, report=False)
    record = json.loads((tmp_path / "b" / "cv.json").read_text())
    assert record["folds"] == [f.name for f in folds]
    assert record["settings"]["protocol"]["per_magnification"] is drawn_per_magnification


@pytest.mark.parametrize("protocol", [Protocol(folds=2, per_magnification=True),
                                      Protocol(trials=2, per_magnification=True)])
def test_a_magnification_without_a_class_is_refused_before_training(protocol):
    """Per-magnification folds of a magnification that has no image of a class (no 100X image of class b): its
    folds trained a classifier of the other classes only, and after every fold had trained, collecting them said
    its predictions_test.csv had 'no column prob_b (not this cv's run); delete ... to train again', which trained
    the same again (of two classes: 'holds one class', after the 40X folds). One line before anything trains."""
    s = toy_set(mags=(40, 100))
    s = SampleSet([x for x in s.samples if not (x.meta["magnification"] == 100 and x.label == 1)], s.class_names,
                  root=s.root)
    with pytest.raises(FinescopeError, match=r"^100X has no image of class 'b', so .*--no-per-magnification.*"
                                             r"data\.magnifications=\[40\]"):
        make_folds(s, protocol, seed=0, val_fraction=0.0)
