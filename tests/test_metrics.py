"""Tests of finescope.metrics: hand-computed values on tiny arrays, parity with scikit-learn, bootstrap."""

import json
import re
import time
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from finescope import metrics as M
from finescope.errors import FinescopeError

# y_true / y_pred: class 0 recall 2/2, class 1 recall 1/3
Y_TRUE = np.array([0, 1, 1, 0, 1])
Y_PRED = np.array([0, 1, 0, 0, 0])


def _onehot_probs(y_pred, n_classes, p=0.9):
    """(N, C) probabilities whose argmax is y_pred and whose top confidence is p."""
    probs = np.full((len(y_pred), n_classes), (1 - p) / (n_classes - 1))
    probs[np.arange(len(y_pred)), y_pred] = p
    return probs


def _random_case(n=60, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


# ----------------------------------------------------------------------------------------------- image level
def test_image_accuracy_by_hand_and_sklearn():
    assert M.image_accuracy(Y_TRUE, Y_PRED) == pytest.approx(3 / 5)
    assert M.image_accuracy(Y_TRUE, Y_PRED) == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))


def test_balanced_accuracy_by_hand_and_sklearn():
    assert M.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((1 + 1 / 3) / 2)
    y, p = _random_case()
    assert M.balanced_accuracy(y, p.argmax(1)) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))


def test_macro_f1_by_hand_and_sklearn():
    # class 0: P 2/4, R 1 -> F1 2/3; class 1: P 1, R 1/3 -> F1 1/2
    assert M.macro_f1(Y_TRUE, Y_PRED, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    y, p = _random_case()
    assert M.macro_f1(y, p.argmax(1), 4) == pytest.approx(f1_score(y, p.argmax(1), average="macro"))


def test_macro_f1_leaves_out_a_class_neither_true_nor_predicted():
    # class 2 is absent from the split and never predicted: the two others are perfect (it scored 0 before)
    assert M.macro_f1([0, 1], [0, 1], 3) == pytest.approx(1.0)
    # class 2 predicted but never true: F1 0 for it, as scikit-learn
    assert M.macro_f1([0, 1, 1], [0, 1, 2], 3) == pytest.approx(f1_score([0, 1, 1], [0, 1, 2], average="macro"))
    with pytest.raises(ValueError, match="0..2"):
        M.macro_f1([0, 3], [0, 1], 3)


def test_confusion_by_hand_and_sklearn():
    cm = M.confusion(Y_TRUE, Y_PRED, 2)
    assert cm == [[2, 0], [2, 1]]
    assert all(type(v) is int for row in cm for v in row)
    y, p = _random_case()
    assert M.confusion(y, p.argmax(1), 5) == confusion_matrix(y, p.argmax(1), labels=range(5)).tolist()


def test_per_class_recall_with_absent_class():
    assert M.per_class_recall([0, 0, 2, 2], [0, 1, 2, 0], 3) == [0.5, None, 0.5]
    y, p = _random_case()
    expected = recall_score(y, p.argmax(1), average=None, labels=range(4))
    assert M.per_class_recall(y, p.argmax(1), 4) == pytest.approx(expected.tolist())


# ----------------------------------------------------------------------------------------------- AUC / ROC
def test_auc_binary_by_hand_and_sklearn():
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - s, s], 1)
    assert M.auc(y, probs) == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered
    assert M.auc(y, probs) == pytest.approx(roc_auc_score(y, s))


def test_auc_multiclass_matches_sklearn_ovr_macro():
    y, p = _random_case(n_classes=4)
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert M.auc(y, p) == pytest.approx(expected)


def test_auc_with_tied_scores_matches_sklearn():
    y, p = _random_case(n=80, n_classes=3, seed=1)
    p = np.round(p, 1)  # many ties
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in range(3)])
    assert M.auc(y, p) == pytest.approx(expected)
    yb = (y == 0).astype(int)
    pb = np.stack([1 - p[:, 0], p[:, 0]], 1)
    assert M.auc(yb, pb) == pytest.approx(roc_auc_score(yb, p[:, 0]))


def test_auc_multiclass_averages_present_classes_only():
    y, p = _random_case(n_classes=3)
    keep = y != 2  # class 2 absent from y_true: it has no positives, so no OvR AUC
    expected = np.mean([roc_auc_score(y[keep] == c, p[keep, c]) for c in (0, 1)])
    assert M.auc(y[keep], p[keep]) == pytest.approx(expected)


def test_auc_undefined_is_none():
    assert M.auc([1, 1, 1], _onehot_probs([0, 1, 1], 2)) is None
    assert M.auc([2, 2], _onehot_probs([0, 2], 3)) is None


def test_roc_curves_binary_and_multiclass():
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    curves = M.roc_curves(y, np.stack([1 - s, s], 1), class_names=["benign", "malignant"])
    assert list(curves) == ["malignant"]
    assert curves["malignant"]["auc"] == pytest.approx(0.75)
    assert curves["malignant"]["fpr"][-1] == 1.0 and curves["malignant"]["tpr"][-1] == 1.0
    y, p = _random_case(n_classes=3)
    curves = M.roc_curves(y, p)
    assert list(curves) == [0, 1, 2]
    assert np.mean([c["auc"] for c in curves.values()]) == pytest.approx(M.auc(y, p))
    json.dumps(curves)


# ----------------------------------------------------------------------------------------------- patient level
def test_patient_recognition_rate_by_hand():
    # patient A: 3 of 4 correct, patient B: 1 of 2 correct
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 0]
    groups = ["A", "A", "A", "A", "B", "B"]
    assert M.patient_scores(y_true, y_pred, groups) == {"A": 0.75, "B": 0.5}
    assert M.patient_recognition_rate(y_true, y_pred, groups) == pytest.approx(0.625)
    assert M.image_accuracy(y_true, y_pred) == pytest.approx(4 / 6)


def test_patient_accuracy_majority_vs_mean_prob():
    # A (label 1): votes 1,1,0 -> majority says 1 (right); mean p(1) = 0.4 -> mean_prob says 0 (wrong)
    # B (label 0): every image right under both rules
    probs = np.array([[0.4, 0.6], [0.4, 0.6], [1.0, 0.0], [0.9, 0.1], [0.8, 0.2]])
    y_true, groups = [1, 1, 1, 0, 0], ["A", "A", "A", "B", "B"]
    assert M.patient_accuracy(y_true, probs, groups, "majority") == pytest.approx(1.0)
    assert M.patient_accuracy(y_true, probs, groups, "mean_prob") == pytest.approx(0.5)


def test_patient_accuracy_vote_tie_broken_by_mean_prob():
    probs = np.array([[0.6, 0.4], [0.1, 0.9]])  # votes 0 and 1 tie; mean p(1) = 0.65
    assert M.patient_accuracy([1, 1], probs, ["A", "A"], "majority") == 1.0
    assert M.patient_accuracy([0, 0], probs, ["A", "A"], "majority") == 0.0


def test_a_patient_of_several_classes_is_scored_once_per_class():
    """A patient whose images hold two classes has no one label. Its majority class was taken as its label, so a
    model calling all of a patient's images benign scored it right although some were malignant; each class's
    images now vote for their own class, and the accuracy is hits / units."""
    probs = _onehot_probs([0, 0, 0, 0, 1, 1], 2)  # A: 3 benign and 1 malignant image, all called benign; B right
    y, groups = [0, 0, 0, 1, 1, 1], ["A", "A", "A", "A", "B", "B"]
    for how in ("majority", "mean_prob"):
        assert M.patient_accuracy(y, probs, groups, how) == pytest.approx(2 / 3)  # A benign, A malignant, B
    assert M.patient_accuracy([0, 0, 0, 0, 1, 1], probs, groups) == 1.0  # one class per patient: units are patients
    assert M.compute_metrics(y, probs, groups)["n_groups"] == 2


def test_patient_accuracy_rejects_unknown_rule():
    with pytest.raises(ValueError, match="majority"):
        M.patient_accuracy([0], [[1.0, 0.0]], ["A"], how="vote")


# ----------------------------------------------------------------------------------------------- calibration
ECE_PROBS = np.array(
    [
        [0.40, 0.30, 0.30],  # conf 0.40 -> bin 0, pred 0, true 0: right
        [0.45, 0.35, 0.20],  # conf 0.45 -> bin 0, pred 0, true 1: wrong
        [0.90, 0.05, 0.05],  # conf 0.90 -> bin 1, pred 0, true 0: right
        [0.10, 0.80, 0.10],  # conf 0.80 -> bin 1, pred 1, true 0: wrong
    ]
)
ECE_TRUE = np.array([0, 1, 0, 0])


def test_ece_two_bins_by_hand():
    # bin 0: |0.5 - 0.425| * 2/4 = 0.0375; bin 1: |0.5 - 0.85| * 2/4 = 0.175
    assert M.expected_calibration_error(ECE_TRUE, ECE_PROBS, n_bins=2) == pytest.approx(0.2125)


def test_ece_zero_when_confidence_matches_accuracy():
    probs = _onehot_probs([0, 0, 0, 0], 2, p=0.75)
    assert M.expected_calibration_error([0, 0, 0, 1], probs) == pytest.approx(0.0)


def test_reliability_curve_two_bins():
    curve = M.reliability_curve(ECE_TRUE, ECE_PROBS, n_bins=2)
    assert curve["bin_confidence"] == pytest.approx([0.425, 0.85])
    assert curve["bin_accuracy"] == pytest.approx([0.5, 0.5])
    assert curve["bin_count"] == [2, 2]
    curve = M.reliability_curve(ECE_TRUE, ECE_PROBS, n_bins=4)
    assert curve["bin_count"] == [0, 2, 0, 2] and curve["bin_accuracy"][0] is None


# ----------------------------------------------------------------------------------------------- compute_metrics
def test_compute_metrics_keys_types_and_values():
    y, p = _random_case(n=40, n_classes=3)
    groups = [f"P{i % 7}" for i in range(40)]
    out = M.compute_metrics(y, p, groups, class_names=["a", "b", "c"])
    expected_keys = {
        "image_accuracy", "balanced_accuracy", "macro_f1", "auc", "confusion_matrix", "per_class_recall",
        "ece", "class_names", "n_images", "n_classes", "patient_recognition_rate",
        "patient_accuracy_majority", "patient_accuracy_mean_prob", "n_groups",
    }  # fmt: skip
    assert set(out) == expected_keys
    assert out["n_images"] == 40 and out["n_classes"] == 3 and out["n_groups"] == 7
    assert out["image_accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert out["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert type(out["ece"]) is float and type(out["patient_recognition_rate"]) is float
    json.dumps(out)
    no_groups = M.compute_metrics(y, p)
    assert "patient_recognition_rate" not in no_groups and no_groups["class_names"] == ["0", "1", "2"]


def test_compute_metrics_no_images_is_an_error():
    with pytest.raises(FinescopeError, match="no images to evaluate"):
        M.compute_metrics(np.zeros(0, dtype=int), np.zeros((0, 2)))


def test_compute_metrics_invalid_arguments():
    with pytest.raises(ValueError, match="shape"):
        M.compute_metrics([0, 1], np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="class_names"):
        M.compute_metrics([0, 1], np.full((2, 2), 0.5), class_names=["a"])
    with pytest.raises(ValueError, match="labels"):
        M.compute_metrics([0, 2], np.full((2, 2), 0.5))


# ----------------------------------------------------------------------------------------------- bootstrap
def _patients_case(n_patients=30, per_patient=10, n_classes=2, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], per_patient)
    y = np.repeat(rng.integers(0, n_classes, n_patients), per_patient)
    logits = rng.normal(size=(y.size, n_classes)) + 1.0 * np.eye(n_classes)[y]
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), groups


@pytest.mark.parametrize("metric", sorted(M.SCALAR_METRICS))
def test_bootstrap_interval_contains_point_estimate(metric):
    y, p, groups = _patients_case()
    ci = M.bootstrap_ci(y, p, groups, metric, n_boot=200)
    assert ci["value"] == pytest.approx(M.SCALAR_METRICS[metric](y, p, groups))
    assert ci["low"] <= ci["value"] <= ci["high"]
    assert ci["n_boot"] == 200
    json.dumps(ci)


def test_bootstrap_is_deterministic_for_a_seed():
    y, p, groups = _patients_case()
    a = M.bootstrap_ci(y, p, groups, "auc", n_boot=100, seed=3)
    assert a == M.bootstrap_ci(y, p, groups, "auc", n_boot=100, seed=3)
    assert a != M.bootstrap_ci(y, p, groups, "auc", n_boot=100, seed=4)


def test_bootstrap_resamples_groups_not_images():
    # one patient with 100 images, all right; ten patients with one image each, half right
    y = np.zeros(110, dtype=int)
    y_pred = np.r_[np.zeros(100, dtype=int), np.tile([0, 1], 5)]
    probs = _onehot_probs(y_pred, 2)
    groups = np.r_[["BIG"] * 100, [f"S{i}" for i in range(10)]]
    by_patient = M.bootstrap_ci(y, probs, groups, "image_accuracy")
    by_image = M.bootstrap_ci(y, probs, None, "image_accuracy")
    assert by_patient["value"] == by_image["value"] == pytest.approx(105 / 110)
    # drawing BIG 0..3 times swings accuracy from ~0.5 to ~0.98; images alone barely move it
    assert by_patient["high"] - by_patient["low"] > 0.3
    assert by_image["high"] - by_image["low"] < 0.1


@pytest.mark.parametrize("mixed", [False, True])
def test_bootstrap_callable_matches_vectorised_path(mixed):
    y, p, groups = _patients_case()
    if mixed:  # some patients hold two classes: the closed form counts their units, as the callable does
        y = np.where(np.arange(y.size) % 5 == 0, 1 - y, y)
    for name in ("image_accuracy", "patient_recognition_rate", "patient_accuracy_majority",
                 "patient_accuracy_mean_prob"):
        fast = M.bootstrap_ci(y, p, groups, name, n_boot=100)
        slow = M.bootstrap_ci(y, p, groups, lambda a, b, g, n=name: M.SCALAR_METRICS[n](a, b, g), n_boot=100)
        assert fast == pytest.approx(slow)


def test_bootstrap_drops_undefined_resamples():
    # 6 patients, one of them positive; AUC is undefined in resamples that do not draw it (about 1 in 3)
    y = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    p = _onehot_probs([0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1], 2, p=0.7)
    groups = np.repeat(["A", "B", "C", "D", "E", "F"], 2)
    ci = M.bootstrap_ci(y, p, groups, "auc", n_boot=200)
    assert 0.5 * 200 < ci["n_boot"] < 200 and ci["low"] < ci["high"] and ci["ci_note"] is None


def test_bootstrap_is_fast_for_accuracy_and_prr():
    y, p, groups = _patients_case(n_patients=60, per_patient=5)
    start = time.perf_counter()
    for metric in ("image_accuracy", "patient_recognition_rate"):
        M.bootstrap_ci(y, p, groups, metric, n_boot=1000)
    assert time.perf_counter() - start < 1.0


def test_bootstrap_unknown_metric_lists_valid_names():
    y, p, groups = _patients_case()
    with pytest.raises(ValueError, match="image_accuracy"):
        M.bootstrap_ci(y, p, groups, "accuracy")


def test_paired_bootstrap_identical_predictions():
    y, p, groups = _patients_case()
    out = M.paired_bootstrap(y, p, p.copy(), groups, "image_accuracy", n_boot=200)
    assert out == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n_boot": 200, "ci_note": None}


@pytest.mark.parametrize("metric", ["image_accuracy", "auc", "patient_recognition_rate"])
def test_paired_bootstrap_clearly_better_model(metric):
    y, p_a, groups = _patients_case()
    p_b = _onehot_probs(y, 2, p=0.8)  # always right
    out = M.paired_bootstrap(y, p_a, p_b, groups, metric, n_boot=300)
    assert out["diff"] > 0 and out["low"] > 0 and out["p_value"] < 0.05
    reverse = M.paired_bootstrap(y, p_b, p_a, groups, metric, n_boot=300)
    assert reverse["diff"] == pytest.approx(-out["diff"]) and reverse["high"] < 0


def test_paired_p_value_counts_differences_that_are_0_but_for_float_rounding():
    """Resampled differences that are exactly 0 count against the observed one (the docstring's rule), also where
    the two metrics are sums of different patients' scores and come out 1e-16 apart (in floats the mean of 1, 2/3,
    2/3, 1, 1 is 2e-16 below that of 1, 1, 1, 1/3, 1). Five patients (1 and 4 x 3 images, all of class 0): model a misses one image of P4, model b
    one of P1 and one of P3; every resample drawing P4 as often as P1 and P3 together has PRR difference 0. The
    rounding left some of them out: p = 0.68 where the rule gives 0.9. Two models with equal PRR had difference
    2e-16 instead of 0."""
    groups = np.repeat([f"P{i}" for i in range(5)], [1, 3, 3, 3, 3])
    y = np.zeros(13, dtype=np.int64)

    def wrong_on(*images):
        pred = np.zeros(13, dtype=np.int64)
        pred[list(images)] = 1
        return _onehot_probs(pred, 2, p=0.8)

    out = M.paired_bootstrap(y, wrong_on(11), wrong_on(1, 9), groups, "patient_recognition_rate", n_boot=100)
    gain = [Fraction(0), Fraction(-1, 3), Fraction(0), Fraction(-1, 3), Fraction(1, 3)]  # b's score - a's per patient
    diffs = [sum(gain[g] for g in drawn) / 5 for drawn in M._draw_groups(5, 100, 0)]
    assert out["diff"] == pytest.approx(-1 / 15)
    assert out["p_value"] == pytest.approx(2 * np.mean([d >= 0 for d in diffs]))  # 0.9
    equal = M.paired_bootstrap(y, wrong_on(1, 4), wrong_on(7, 8), groups, "patient_recognition_rate", n_boot=100)
    assert equal["diff"] == 0.0 and equal["p_value"] == 1.0


# ----------------------------------------------------------------------------------------------- folds
def test_summarize_folds_mean_std_and_skips_none():
    folds = [
        {"image_accuracy": 0.5, "auc": None, "class_names": ["a", "b"], "n_images": 10},
        {"image_accuracy": 0.7, "auc": 0.8, "class_names": ["a", "b"], "n_images": 12},
    ]
    out = M.summarize_folds(folds)
    assert set(out) == {"image_accuracy", "auc", "n_images"}
    assert out["image_accuracy"]["mean"] == pytest.approx(0.6)
    assert out["image_accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert out["image_accuracy"]["n"] == 2
    assert out["auc"] == {"mean": 0.8, "std": 0.0, "n": 1}
    assert M.summarize_folds(folds, keys=["ece"]) == {"ece": {"mean": None, "std": None, "n": 0}}
    json.dumps(out)


def test_bootstrap_scores_patients_inside_resampled_groups():
    """BreakHis: patient folders 22549AB and 22549CD share case 22549. The case is resampled whole, but PRR and
    patient accuracy average over the patients (Spanhol et al. 2016), in the closed form as in the callable."""
    groups = np.array(["22549"] * 6 + ["3411"] * 2)
    patients = np.array(["22549AB"] * 4 + ["22549CD"] * 2 + ["3411F"] * 2)
    y = np.zeros(8, dtype=int)
    probs = _onehot_probs(np.array([0, 0, 0, 0, 1, 1, 0, 0]), 2)
    prr = M.bootstrap_ci(y, probs, groups, "patient_recognition_rate", n_boot=200, patients=patients)
    assert prr["value"] == pytest.approx((1 + 0 + 1) / 3)  # by case it would be (4 / 6 + 1) / 2
    slow = M.bootstrap_ci(y, probs, groups, lambda a, b, c: M.patient_recognition_rate(a, b.argmax(1), c),
                          n_boot=200, patients=patients)
    assert slow == pytest.approx(prr)
    # a resample holds 22549 twice (PRR 2 / 4), 3411 twice (1) or each once (2 / 3): too few for an interval
    assert prr["low"] is None and prr["ci_note"] == "only 2 patient groups"
    gidx, pidx = np.array([0] * 6 + [1] * 2), np.array([0] * 4 + [1] * 2 + [2] * 2)
    resampled = M._boot_values("patient_recognition_rate", y, probs, gidx, pidx, np.array([[0, 0], [1, 1], [0, 1]]))
    assert resampled == pytest.approx([0.5, 1.0, 2 / 3])
    acc = M.bootstrap_ci(y, probs, groups, "patient_accuracy_majority", n_boot=50, patients=patients)
    assert acc["value"] == pytest.approx(2 / 3)  # 22549CD is wrong; by case 22549 would be right
    diff = M.paired_bootstrap(y, probs, _onehot_probs(y, 2), groups, "patient_recognition_rate", n_boot=50,
                              patients=patients)
    assert diff["diff"] == pytest.approx(1 / 3)


def test_bootstrap_keeps_numeric_patient_ids_apart():
    """Group index and patient id were joined by a NUL that numpy strips: group 1 ('23') + '23' and group 12 ('3')
    + '3' both read '123', so two patients of numeric ids were scored as one, in the value and in the resamples."""
    ids = ["1", "23", "24", "25", "26", "27", "28", "29", "290", "291", "292", "293", "3"]  # '23' index 1, '3' index 12
    groups = np.array([g for g in ids for _ in range(2)] + ["3"])  # patient '3' has 3 images, the others 2
    y = np.zeros(groups.size, dtype=int)
    pred = np.zeros(groups.size, dtype=int)
    pred[groups == "3"] = 1  # patient '3' wholly wrong, every other patient right
    probs = _onehot_probs(pred, 2)
    prr = M.bootstrap_ci(y, probs, groups, "patient_recognition_rate", n_boot=20, patients=groups)
    assert prr["value"] == pytest.approx(M.patient_recognition_rate(y, pred, groups)) == pytest.approx(12 / 13)
    acc = M.bootstrap_ci(y, probs, groups, "patient_accuracy_majority", n_boot=20, patients=groups)
    assert acc["value"] == pytest.approx(12 / 13)


def test_non_finite_probabilities_are_an_error():
    """A diverged model (NaN weights) gives NaN probabilities; argmax made every image class 0, so train printed
    image accuracy 0.365, balanced accuracy 0.5 and PRR 0.4 for it (auc nan), and patient accuracy could be 1."""
    probs = np.array([[0.3, 0.7], [np.nan, np.nan], [0.8, 0.2], [0.1, 0.9]])
    with pytest.raises(FinescopeError, match="1 of 4 images are NaN or infinite.*train.lr"):
        M.compute_metrics([0, 1, 0, 1], probs, ["a", "a", "b", "b"])
    with pytest.raises(FinescopeError, match="NaN or infinite"):
        M.auc([0, 1], np.array([[np.inf, 0.0], [0.5, 0.5]]))


def test_one_patient_has_no_interval_and_no_p_value():
    """With one patient every resample is the data itself: the '95% interval' had width 0 and a paired comparison
    p = 0 (the report showed 'p=0.00' for two models differing on a single patient)."""
    y = np.array([0, 1, 0, 1])
    p_a, p_b = _onehot_probs([0, 0, 0, 0], 2), _onehot_probs([0, 1, 0, 1], 2)
    ci = M.bootstrap_ci(y, p_a, ["P1"] * 4, "image_accuracy", n_boot=50)
    assert ci == {"value": 0.5, "low": None, "high": None, "n_boot": 0, "ci_note": "only 1 patient"}
    diff = M.paired_bootstrap(y, p_a, p_b, ["P1"] * 4, "patient_recognition_rate", n_boot=50)
    assert diff == {"diff": 0.5, "low": None, "high": None, "p_value": None, "n_boot": 0, "ci_note": "only 1 patient"}
    five = np.repeat([f"P{i}" for i in range(M.MIN_CI_GROUPS)], 2)
    y5, p_a5, p_b5 = np.tile(y[:2], 5), np.tile(p_a[:2], (5, 1)), np.tile(p_b[:2], (5, 1))
    assert M.paired_bootstrap(y5, p_a5, p_b5, five, "image_accuracy", n_boot=50)["p_value"] < 1


@pytest.mark.parametrize("metric", ["auc", "image_accuracy", "balanced_accuracy", "patient_recognition_rate"])
def test_few_patients_have_no_interval_rather_than_one_of_width_0(metric):
    """Two patients per class (or one): the few distinct resamples gave low == high == value, e.g. AUC 1.0 [1.0, 1.0]
    from 4 patients, a certainty 4 patients cannot give. No interval, and a note that says why."""
    y = np.repeat([0, 0, 1, 1], 5)
    p = _onehot_probs(y, 2, p=0.8)
    groups = np.repeat(["a", "b", "c", "d"], 5)
    ci = M.bootstrap_ci(y, p, groups, metric, n_boot=200)
    assert ci["value"] == pytest.approx(1.0)
    assert ci["low"] is None and ci["high"] is None and ci["n_boot"] == 0 and ci["ci_note"] == "only 4 patients"
    one_each = M.bootstrap_ci(y[5:15], p[5:15], groups[5:15], metric, n_boot=200)
    assert one_each["low"] is None and one_each["ci_note"] == "only 2 patients"
    diff = M.paired_bootstrap(y, p, _onehot_probs(y, 2, p=0.6), groups, metric, n_boot=200)
    assert diff["low"] is diff["high"] is diff["p_value"] is None and diff["ci_note"] == "only 4 patients"
    json.dumps([ci, diff])


def test_interval_needs_the_metric_defined_in_half_the_resamples():
    """A metric undefined in most resamples (here: it needs the one patient of class 1 and the one of class 2 drawn
    together, about 4 resamples in 10) has no interval from the few where it is defined."""
    y = np.repeat([1, 2] + [0] * 8, 3)
    p = _onehot_probs(y, 3, p=0.8)
    groups = np.repeat([f"P{i}" for i in range(10)], 3)

    def needs_both(yt, probs, g):
        return M.image_accuracy(yt, probs.argmax(1)) if {1, 2} <= set(yt.tolist()) else None

    ci = M.bootstrap_ci(y, p, groups, needs_both, n_boot=300)
    assert ci["value"] == 1.0 and ci["low"] is None and ci["n_boot"] == 0
    assert re.fullmatch(r"metric defined in only 1\d\d of 300 resamples", ci["ci_note"])
    enough = M.bootstrap_ci(y, p, groups, "image_accuracy", n_boot=300)  # the same patients, a metric always defined
    assert enough["low"] == enough["high"] == 1.0 and enough["n_boot"] == 300 and enough["ci_note"] is None


def test_per_magnification_metrics_are_compute_metrics_of_each_magnifications_images():
    """A run's metrics.json gives each magnification's metrics, as cv's summary does, when its images have two or
    more: compute_metrics of that magnification's images (images of no magnification left out); none for one."""
    y = np.array([0, 1, 0, 1, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5]])
    g = np.array([0, 0, 1, 1, 2, 2, 2])
    mags = [100, 40, 100, 40, 400, 400, None]
    out = M.per_magnification_metrics(y, p, g, mags, ["a", "b"])
    assert list(out) == ["40", "100", "400"]
    for mag, at in (("40", [1, 3]), ("100", [0, 2]), ("400", [4, 5])):
        whole = M.compute_metrics(y[at], p[at], g[at], ["a", "b"])
        assert out[mag] == {k: v for k, v in whole.items() if k in M.SCALAR_METRICS or k in ("n_images", "n_groups")}
    assert out["100"]["image_accuracy"] == 0.5 and out["40"]["n_images"] == 2 and out["400"]["n_groups"] == 1
    assert M.per_magnification_metrics(y, p, g, [100] * 6 + [None]) == {}
    assert M.per_magnification_metrics(y, p, g, [None] * 7) == {}


def test_exact_ties_go_to_the_class_listed_first():
    """README: a class probability tied exactly, in an image's prediction, a patient's mean or a vote still tied
    after the mean probability, goes to the class listed first."""
    assert M.compute_metrics([0], np.array([[0.5, 0.5]]))["image_accuracy"] == 1.0
    tied = np.array([[0.7, 0.3], [0.3, 0.7]])  # one vote each, mean 0.5 / 0.5
    assert M.patient_accuracy([0, 0], tied, ["p", "p"], "majority") == 1.0
    assert M.patient_accuracy([1, 1], tied, ["p", "p"], "majority") == 0.0
    assert M.patient_accuracy([0, 0], tied, ["p", "p"], "mean_prob") == 1.0
