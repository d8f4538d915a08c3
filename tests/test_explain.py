"""Explanations: the callable module, every variant's maps, CAM adapter, faithfulness metrics, the explain command."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import finescope
from finescope.checkpoint import save_checkpoint
from finescope.config import Config, DataConfig, ModelConfig, TrainConfig, resolved_dict
from finescope.errors import FinescopeError
from finescope.explain import faithfulness as fa
from finescope.explain.maps import normalise_map, peak_box, region_grid, region_scores
from finescope.explain.methods import CAM_METHODS, CamAdapter, resolve_methods
from finescope.models import ModelOutput, create_model, list_models

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
realdata = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
SMALL = {"backbone": "tiny", "global_size": 64, "local_size": 48, "num_crops": 3, "min_box_fraction": 0.25}


def tiny_model(variant: str = "fusion", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(ModelConfig(variant=variant, **SMALL), 2).eval()


def image(h: int = 96, w: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


# -- the public API ---------------------------------------------------------------------------------------------
def test_explain_is_callable_module_and_keeps_its_functions():
    from finescope import explain

    assert callable(explain) and explain is finescope.explain
    assert callable(finescope.explain.save_overlay_grid) and callable(explain.explain_image)
    e = explain(tiny_model(), image())
    assert isinstance(e, explain.Explanation)


@pytest.mark.parametrize("variant", list_models())
def test_every_variant_gets_maps_on_the_full_image(variant):
    model = tiny_model(variant)
    e = finescope.explain(model, image(96, 128), label=1)
    assert e.map.shape == (96, 128) and torch.isfinite(e.map).all() and (e.map >= 0).all()
    assert set(e.maps) == ({"attention"} if model.use_attention else set()) | {"gradcam", "gradcam++"}
    assert e.probabilities.shape == (2,) and abs(float(e.probabilities.sum()) - 1) < 1e-5
    assert e.target == 1 and e.correct == (e.predicted == 1)
    if model.use_crops:
        assert e.boxes.shape == (3, 4) and e.crops.shape == (3, 3, 48, 48) and e.box_mass.shape == (3,)
        assert (e.boxes[:, 2] <= 128).all() and (e.boxes[:, 3] <= 96).all()
    else:
        assert e.boxes is None and e.crops is None


def test_image_forms_are_equivalent(tmp_path):
    from PIL import Image

    img = image(64, 80)
    path = tmp_path / "x.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    model = tiny_model("attention")
    maps = [finescope.explain(model, x, "attention").map for x in (img, img.float() / 255, img.permute(1, 2, 0).numpy(), path)]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0])


@pytest.mark.parametrize(("variant", "method", "message"), [
    ("global", "attention", "has no attention map; methods it supports: gradcam"),
    ("fusion", "nonsense", "unknown explanation method 'nonsense'"),
])
def test_bad_method_names_say_what_is_supported(variant, method, message):
    with pytest.raises(FinescopeError, match=message):
        resolve_methods(tiny_model(variant), [method], variant)


def test_auto_joins_other_methods_and_an_image_after_method_is_named(tmp_path, monkeypatch):
    model = tiny_model("fusion")
    assert resolve_methods(model, ["auto", "eigencam"]) == ["attention", "gradcam", "gradcam++", "eigencam"]
    assert resolve_methods(model, ["eigencam,auto"]) == ["eigencam", "attention", "gradcam", "gradcam++"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Slide 1.PNG").write_bytes(b"")  # `explain RUN --method gradcam 'Slide 1.PNG'`
    with pytest.raises(FinescopeError, match="'Slide 1.PNG' \\(it is a file: .*give the images before --method"):
        resolve_methods(model, ["gradcam", "Slide 1.PNG"])


def test_a_model_explained_mid_training_comes_back_as_it_was():
    import copy

    model, img = tiny_model("fusion"), image(64, 80)
    model.train()
    model(img[None].float() / 255).logits.sum().backward()  # (a training step moves BatchNorm's statistics)
    want = finescope.explain(copy.deepcopy(model).eval(), img, ["attention", "gradcam"]).maps
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    got = finescope.explain(model, img, ["attention", "gradcam"]).maps
    assert model.training  # still training, and its gradients are the ones it had, not the CAM's added to them
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys() and before
    for n, g in before.items():
        torch.testing.assert_close(after[n], g, rtol=0, atol=0)
    for m in want:
        torch.testing.assert_close(got[m], want[m])


def test_sixteen_bit_and_float_images_are_scaled_or_refused_not_turned_white():
    model = tiny_model("attention")
    img = image(64, 80)
    as16 = img.numpy().transpose(1, 2, 0).astype(np.uint16) * 257  # a 16-bit array, as tifffile reads one
    want = finescope.explain(model, img, "attention").probabilities
    torch.testing.assert_close(finescope.explain(model, as16, "attention").probabilities, want)
    torch.testing.assert_close(finescope.explain(model, torch.from_numpy(as16).permute(2, 0, 1), "attention")
                               .probabilities, want)
    with pytest.raises(FinescopeError, match=r"float image must be in \[0, 1\], got values from 0 to 255"):
        finescope.explain(model, img.float(), "attention")
    with pytest.raises(FinescopeError, match="uint8, uint16 or float"):
        finescope.explain(model, img.long(), "attention")


def test_a_float_image_of_nan_is_refused_not_explained_as_black():
    """A float image holding NaN (a blank image divided by its range of 0) passed the [0, 1] check, NaN comparing
    false with either bound, and was explained as a black image."""
    blank = np.zeros((64, 80, 3), np.float32)
    with np.errstate(invalid="ignore"):
        nan = blank / blank.max()
    with pytest.raises(FinescopeError, match=r"got 15360 NaN or infinite values"):
        finescope.explain(tiny_model(), nan)
    with pytest.raises(FinescopeError, match=r"got 1 NaN"):
        finescope.explain(tiny_model(), torch.rand(3, 64, 80).index_put_((torch.tensor(0),) * 3, torch.tensor(np.nan)))


def test_bad_image_input_is_a_clear_error():
    with pytest.raises(FinescopeError, match=r"\(3, H, W\) tensor"):
        finescope.explain(tiny_model(), torch.zeros(5, 8, 8))


@pytest.mark.parametrize("empty", [torch.zeros(3, 0, 8, dtype=torch.uint8), np.zeros((8, 0, 3), np.uint8)])
def test_an_image_of_no_pixels_is_a_clear_error(empty):
    with pytest.raises(FinescopeError, match="has no pixels"):  # was a ZeroDivisionError from the global view
        finescope.explain(tiny_model(), empty)


def test_an_unreadable_image_file_is_an_error_without_advice_explain_cannot_follow():
    with pytest.raises(FinescopeError, match="cannot read image") as err:
        finescope.explain(tiny_model(), "no_such_slide.png")
    assert "on_error" not in str(err.value)  # a setting of the data loaders, which explain(model, path) does not read


@pytest.mark.parametrize("kwargs", [{"target": 2}, {"target": -1}, {"label": 5}, {"label": -1}])
def test_a_class_index_outside_the_model_is_a_clear_error(kwargs):
    # -1 (a sample's "unknown" label) explained the last class and marked the prediction wrong; 2 was an IndexError
    with pytest.raises(FinescopeError, match=f"{next(iter(kwargs))} must be a class index from 0 to 1"):
        finescope.explain(tiny_model("global"), image(), "gradcam", **kwargs)


def test_the_target_is_the_class_asked_for_as_the_explanations_docstring_says():
    """Explanation.target was documented as 'the true class when known, else the predicted one', which is wrong for
    target='predicted' (the predicted class although the true one is known) and for a class index."""
    from finescope.explain import Explanation

    model, img = tiny_model("global"), image()
    predicted = finescope.explain(model, img, "gradcam").predicted
    other = 1 - predicted
    assert finescope.explain(model, img, "gradcam", label=other).target == other
    assert finescope.explain(model, img, "gradcam", label=other, target="predicted").target == predicted
    assert finescope.explain(model, img, "gradcam", label=other, target=predicted).target == predicted
    doc = Explanation.__doc__.split("target:")[1].split("label:")[0]
    assert "``predicted`` the predicted class" in doc


# -- the CAM adapter -------------------------------------------------------------------------------------------
def test_cam_adapter_returns_the_models_logits_and_restores_the_backbone():
    model = tiny_model("fusion")
    backbone = model.backbone
    adapter = CamAdapter(model)
    x = image().float()[None] / 255
    seen = []
    handle = adapter.tap.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), model(x).logits)
    handle.remove()
    assert model.backbone is backbone
    assert len(seen) == 1 and seen[0][0] == 1  # only the global view (batch 1), not the 3 crops


@pytest.mark.parametrize("frozen", ["model", "backbone"])
def test_cams_of_a_model_whose_weights_take_no_gradient_are_those_of_the_model_as_it_was(frozen):
    """A model made inference-only with requires_grad_(False), or whose backbone training froze
    (train.backbone_lr_scale=0), gave no gradient at the global view's feature map: explain(model, image) stopped
    in pytorch-grad-cam with a traceback ('element 0 of tensors does not require grad', ''NoneType' object has no
    attribute 'shape''). The CAMs read the gradient at that feature map alone, so they are now the same."""
    want = finescope.explain(tiny_model("fusion"), image(), list(CAM_METHODS)).maps
    model = tiny_model("fusion")
    (model if frozen == "model" else model.backbone).requires_grad_(False)
    got = finescope.explain(model, image(), list(CAM_METHODS)).maps
    assert not any(p.requires_grad for p in model.backbone.parameters())  # left as the user set them
    for m in want:
        torch.testing.assert_close(got[m], want[m])


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_explain_called_where_autograd_is_off_gives_the_same_maps(context):
    """Called under torch.inference_mode() (as prediction code often runs), explain stopped in pytorch-grad-cam
    with 'element 0 of tensors does not require grad': unlike no_grad, enable_grad does not lift it."""
    model = tiny_model("fusion")
    want = finescope.explain(model, image(), ["attention", "gradcam"])
    with context():
        got = finescope.explain(model, image(), ["attention", "gradcam"])
    torch.testing.assert_close(got.probabilities, want.probabilities)
    for m in want.maps:
        torch.testing.assert_close(got.maps[m], want.maps[m])


# -- map arithmetic --------------------------------------------------------------------------------------------
def test_region_grid_covers_the_image_with_square_blocks():
    blocks, R = region_grid((60, 90), 4)
    assert R == 4 * 6 and set(blocks.unique().tolist()) == set(range(R))
    heat = torch.zeros(60, 90)
    heat[:15, :15] = 1.0
    scores = region_scores(heat, blocks, R)
    assert int(scores.argmax()) == 0 and float(scores[0]) == 1.0


@pytest.mark.parametrize("size", [(10, 10), (7, 9), (5, 300), (1, 1)])
def test_an_image_shorter_than_the_grid_gets_blocks_of_a_pixel_none_empty(size):
    """A short side of fewer pixels than --grid: blocks of one pixel along it, each holding pixels. Empty blocks
    counted in R made step t of a curve switch less than t/T of the image (a 10x10 image: R = 256, 100 blocks
    with pixels, a map's curve done after 40% of its steps while the random order is not)."""
    blocks, R = region_grid(size, 16)
    assert set(blocks.unique().tolist()) == set(range(R))
    assert R == size[0] * size[1]  # one pixel each


@pytest.mark.parametrize("how", ["max", "percentile"])
def test_normalise_map_spans_zero_to_one(how):
    m = normalise_map(np.arange(100, dtype=float).reshape(10, 10), how, 90)
    assert m.min() == 0 and m.max() == 1
    assert (m == 1).sum() == (1 if how == "max" else 10)


def test_percentile_scale_of_a_map_hot_on_under_one_percent_keeps_its_gradations():
    """A map positive on fewer pixels than 100 - percentile (a Grad-CAM of one hot cell) has its percentile at its
    minimum: --normalise percentile divided by 1e-12 and drew every positive pixel, 0.001 as 1.0, as a full-strength
    mask. Such a map is now scaled by its maximum, as ``max`` does."""
    m = np.zeros((100, 100))
    m[:5, :5] = np.linspace(0.001, 1, 25).reshape(5, 5)
    shown = normalise_map(m, "percentile", 99)
    np.testing.assert_allclose(shown, normalise_map(m, "max"))
    assert shown[0, 0] < 0.01 and (shown == 1).sum() == 1


def test_peak_box_is_inside_the_image():
    heat = torch.zeros(50, 80)
    heat[2, 78] = 1
    torch.testing.assert_close(peak_box(heat, 20), torch.tensor([60.0, 0.0, 80.0, 20.0]))


# -- faithfulness ----------------------------------------------------------------------------------------------
class RegionModel(torch.nn.Module):
    """A toy classifier whose class-1 evidence is the brightness of the top-left 16 x 16 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        s = x[:, :, :16, :16].mean(dim=(1, 2, 3)) - 0.5  # (B,)
        return ModelOutput(logits=torch.stack([-s, s], dim=1) * self.scale)


def test_deletion_of_the_true_evidence_beats_random_and_insertion_too():
    x = torch.full((3, 64, 64), 0.2)
    x[:, :16, :16] = 1.0
    good = torch.zeros(64, 64)
    good[:16, :16] = 1
    curves = fa.map_curves(RegionModel(), x, {"good": good, "bad": 1 - good}, 1, fa.baseline_image(x, "mean"),
                           grid=4, steps=4, repeats=3)
    auc = {m: {k: fa.curve_auc(v) for k, v in c.items()} for m, c in curves.items()}
    assert auc["good"]["deletion"] < auc["random"]["deletion"] < auc["bad"]["deletion"]
    assert auc["good"]["insertion"] > auc["random"]["insertion"] > auc["bad"]["insertion"]
    for c in curves.values():  # shared end points: the image and the baseline
        assert c["deletion"][0] == curves["good"]["deletion"][0] and len(c["deletion"]) == 5


def test_ties_go_in_the_order_given_and_never_above_a_higher_score():
    scores = torch.tensor([0.0, 0.0, 2.0, 0.0, 1.0])
    assert fa.rank_blocks(scores).tolist() == [2, 3, 0, 4, 1]  # no order given: block order
    rank = fa.rank_blocks(scores, tie_order=torch.tensor([3, 1, 4, 0, 2]))
    assert rank.tolist() == [4, 3, 0, 2, 1]  # 2 and 4 first by score; the zeros as given: 3, 1, 0


def test_a_flat_map_scores_what_the_random_order_does_not_the_top_left_first():
    x = torch.full((3, 64, 64), 0.2)
    x[:, :16, :16] = 1.0  # the evidence of RegionModel is the top-left block
    good = torch.zeros(64, 64)
    good[:16, :16] = 1
    flat_wins = 0
    for seed in range(8):
        curves = fa.map_curves(RegionModel(), x, {"good": good, "flat": torch.zeros(64, 64)}, 1,
                               fa.baseline_image(x, "mean"), grid=4, steps=4, repeats=1, seed=seed)
        np.testing.assert_array_equal(curves["flat"]["deletion"], curves["random"]["deletion"])
        np.testing.assert_array_equal(curves["flat"]["insertion"], curves["random"]["insertion"])
        flat_wins += fa.curve_auc(curves["flat"]["deletion"]) <= fa.curve_auc(curves["good"]["deletion"])
    assert flat_wins < 4  # taking the top-left block first, a flat map would tie the true map every time



def test_blocks_of_nan_go_last_and_a_map_of_nan_scores_the_random_order_as_a_flat_one():
    """A map holding NaN has no maximum (it counts as flat); its NaN blocks were ranked first, as the most attended."""
    assert fa.rank_blocks(torch.tensor([0.0, float("nan"), 2.0, 1.0])).tolist() == [2, 3, 0, 1]
    x = torch.full((3, 64, 64), 0.2)
    x[:, :16, :16] = 1.0
    nan = torch.full((64, 64), float("nan"))
    curves = fa.map_curves(RegionModel(), x, {"nan": nan}, 1, fa.baseline_image(x, "mean"), grid=4, steps=4)
    np.testing.assert_array_equal(curves["nan"]["deletion"], curves["random"]["deletion"])

def test_a_curve_of_a_large_image_runs_in_chunks_with_the_same_values(monkeypatch):
    x = torch.rand(3, 64, 64)
    ranks = torch.arange(64 * 64).view(64, 64) % 16
    seen = []

    class Counting(RegionModel):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    whole = fa.perturbation_curve(Counting(), x, ranks, 16, 1, torch.zeros_like(x), steps=8)
    assert seen == [9]
    monkeypatch.setattr(fa, "CURVE_BATCH_BYTES", 3 * x.numel() * 4)  # three copies of the image at once
    seen.clear()
    chunked = fa.perturbation_curve(Counting(), x, ranks, 16, 1, torch.zeros_like(x), steps=8)
    assert seen == [3, 3, 3]
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


def test_curve_auc_is_the_trapezoid_over_zero_to_one():
    assert fa.curve_auc([1, 1, 1]) == 1.0
    assert fa.curve_auc([1, 0]) == 0.5
    assert fa.curve_auc([0, 1, 1, 1, 1]) == pytest.approx(0.875)


@pytest.mark.parametrize(("boxes", "cells", "hits"), [
    ([[0, 0, 10, 10]], [[5, 5, 2], [20, 20, 2]], (1, 2)),
    ([[0, 0, 10, 10], [15, 15, 30, 30]], [[5, 5, 2], [20, 20, 2]], (2, 2)),
    ([[0, 0, 10, 10]], [], (0, 0)),
])
def test_hit_count_counts_centres_inside_any_box(boxes, cells, hits):
    assert fa.hit_count(torch.tensor(boxes, dtype=torch.float32), cells) == hits


def test_box_coverage_reports_union_and_largest_box():
    cover = fa.box_coverage(torch.tensor([[0, 0, 50, 100], [25, 0, 75, 100]], dtype=torch.float32), (100, 100))
    assert cover == {"union": 0.75, "largest": 0.5}


def test_the_chance_hit_rate_weighs_each_image_by_its_nuclei_as_the_hit_rate_does():
    from finescope.explain import runner

    rows = [{"hits": 0, "n_cells": 1, "box_union_fraction": 0.1, "box_largest_fraction": 0.1},
            {"hits": 9, "n_cells": 9, "box_union_fraction": 0.9, "box_largest_fraction": 0.9}]
    b = runner._box_summary(rows)
    assert b["hit_rate"] == pytest.approx(0.9)  # 9 of the 10 nuclei, pooled
    assert b["mean_box_union_fraction"] == pytest.approx(0.5)  # the mean image's coverage
    assert b["chance_hit_rate"] == pytest.approx((1 * 0.1 + 9 * 0.9) / 10)  # 10 random nuclei: 8.2 hits expected


def test_ground_truth_centres_are_moved_into_the_boxes_frame():
    """cells.json holds a nucleus centre in pixel indices (the generator stamps pixel j by its distance from j),
    boxes are in roi_align's frame where pixel j's centre is j + 0.5: a nucleus stamped at x = 9.7 lies right of
    the box [0, 10), and a map peaking at its centre pixel points at it exactly."""
    from finescope.data.synthetic import _stamp

    img = np.ones((20, 20, 3), dtype=np.float32)
    _stamp(img, 5.0, 9.7, 3.0, 0.9)
    dark = torch.from_numpy(1 - img.mean(axis=2))
    cols = torch.arange(20) + 0.5  # pixel centres in the boxes' frame
    assert (dark.sum(0) * cols).sum() / dark.sum() > 10  # the nucleus' centre of mass: x = 10.2
    assert fa.hit_count(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), [[9.7, 5.0, 3.0]]) == (0, 1)
    assert fa.hit_count(torch.tensor([[10.0, 0.0, 20.0, 10.0]]), [[9.7, 5.0, 3.0]]) == (1, 1)
    heat = torch.zeros(20, 20)
    heat[5, 9] = 1  # maximum at x = 9.5, y = 5.5
    assert fa.pointing_hit(heat, [[9.0, 5.0, 0.0]], tolerance=0) is True


def test_pointing_game_uses_radius_plus_tolerance():
    heat = torch.zeros(100, 100)
    heat[50, 70] = 1  # maximum at x = 70.5, y = 50.5; the nucleus at pixel (50, 50) has its centre at 50.5, 50.5
    assert fa.pointing_hit(heat, [[50, 50, 5]], tolerance=14.9) is False
    assert fa.pointing_hit(heat, [[50, 50, 5]], tolerance=15) is True
    assert fa.pointing_hit(heat, [], tolerance=15) is None


def test_a_flat_map_has_no_peak_and_a_peaked_one_keeps_its_own():
    """A map that is zero (or any one value) everywhere has no maximum; argmax named the top-left pixel, so the
    pointing game credited a nucleus there (and blamed one anywhere else) and the evidence box sat in the
    corner. A map with a maximum keeps its peak, box and pointing result."""
    flats = (torch.zeros(64, 96), torch.full((64, 96), 0.3))
    for flat in flats:
        assert fa.pointing_hit(flat, [[5, 5, 4]]) is None and fa.pointing_hit(flat, [[60, 40, 4]]) is None
        assert peak_box(flat, 16) is None
    from finescope.explain.maps import map_peak

    assert all(map_peak(flat) is None for flat in flats)
    heat = torch.zeros(64, 96)
    heat[40, 60] = 1
    assert map_peak(heat) == (40, 60) and fa.pointing_hit(heat, [[60, 40, 4]]) is True
    assert peak_box(heat, 16).tolist() == [52.5, 32.5, 68.5, 48.5]


def test_detail_map_is_where_the_baseline_changes_the_image():
    img = torch.full((3, 32, 48), 0.5)
    img[:, 8:12, 30:34] = torch.tensor([0.0, 0.1, 0.2])[:, None, None]  # a dark spot the blur washes out
    for kind in fa.BASELINES:
        detail = fa.detail_map(img, fa.baseline_image(img, kind))
        assert detail.shape == (32, 48)
        assert detail[8:12, 30:34].min() > detail[20:, :20].max()  # the spot, not the flat background
    torch.testing.assert_close(fa.detail_map(img, img), torch.zeros(32, 48))
    noisy = img.clone()
    noisy[:, 2, 2] = 1.0  # one bright pixel far from the spot: the largest single change, a small region's
    sharp, pooled = (fa.detail_map(noisy, fa.baseline_image(noisy, "mean"), w) for w in (1, 5))
    assert pooled.shape == (32, 48) and divmod(int(sharp.argmax()), 48) == (2, 2)
    assert 8 <= divmod(int(pooled.argmax()), 48)[0] < 12  # the pooled maximum is in the spot's rows


def test_baselines_keep_the_shape_and_reject_unknown_names():
    x = torch.rand(3, 40, 60)
    for kind in fa.BASELINES:
        assert fa.baseline_image(x, kind).shape == x.shape
    with pytest.raises(FinescopeError, match="choose one of: blur, mean"):
        fa.baseline_image(x, "zeros")


# -- the explain command ---------------------------------------------------------------------------------------
def make_run(tmp_path: Path, variant: str = "fusion", **train) -> Path:
    """A synthetic set (cells.json included) and an untrained tiny model saved as a run with a split (``train``:
    its TrainConfig fields)."""
    from finescope.data import load_samples, save_splits
    from finescope.data.synthetic import generate

    root = tmp_path / "data"
    generate(root, per_class=3, size=96)
    cfg = Config(data=DataConfig(source="synthetic", root=str(root), synthetic_per_class=3, synthetic_size=96),
                 model=ModelConfig(variant=variant, **SMALL), train=TrainConfig(**train))
    sample_set = load_samples(cfg.data)
    run = tmp_path / variant
    idx = np.arange(len(sample_set))
    save_splits(run / "splits.json", {"train": idx[[1, 4]], "val": idx[[2]], "test": idx[[0, 3, 5]]}, sample_set)
    model = tiny_model(variant)
    save_checkpoint({"model": model.state_dict(), "config": resolved_dict(cfg),
                     "class_names": sample_set.class_names}, run / "checkpoints" / "best.pt")
    return run


FAST = ["--steps", "2", "--grid", "4", "--top", "2", "--device", "cpu", "--quiet"]


def test_explain_a_runs_test_split_writes_gallery_and_numbers(tmp_path, capsys):
    from finescope.cli import main

    run = make_run(tmp_path)
    out = tmp_path / "out"
    args = ["explain", str(run), "--split", "test", "--out", str(out), "--limit", "2", "--method", "attention", "gradcam"]
    assert main([*args, *FAST]) == 0
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["images"] == 2 and set(summary["methods"]) == {"attention", "gradcam", "detail", "random"}
    assert "pointing_game" in summary["methods"]["detail"] and "pointing_game" not in summary["methods"]["random"]
    for m in summary["methods"].values():
        assert 0 <= m["deletion_auc"] <= 1 and len(m["deletion_curve"]) == 3
    assert summary["boxes"]["cells"] > 0 and "mean_box_union_fraction" in summary["boxes"]
    assert "pointing_game" in summary["methods"]["attention"]
    page = (out / "index.html").read_text()
    assert "id=sort" in page and "Evidence per class" in page and "http" not in page
    assert "methods: attention, gradcam (gradcam: maps of the true class (the predicted one when unknown))" in page
    assert len(list((out / "images").glob("*.png"))) == 2 and (out / "faithfulness.png").is_file()
    assert list((out / "evidence").rglob("*.png"))
    assert "box hit rate" in capsys.readouterr().out


def test_the_pointing_game_measured_without_curves_is_shown_for_a_model_without_boxes(tmp_path, capsys):
    from finescope.cli import main

    out = tmp_path / "out"
    assert main(["explain", str(make_run(tmp_path, "global")), "--split", "test", "--out", str(out),
                 "--no-faithfulness", *FAST]) == 0
    assert "pointing_game" in json.loads((out / "faithfulness.json").read_text())["methods"]["gradcam"]
    page = (out / "index.html").read_text()  # was: "not measured (--no-faithfulness)", and nothing printed
    assert "not measured" not in page and "pointing game" in capsys.readouterr().out
    assert re.search(r"<td>gradcam</td><td>–</td><td>–</td><td>[\d.]+ \(n=\d+\)</td>", page)


def _explain_a_mixed_folder(tmp_path: Path, name: str, height: int, width: int) -> Path:
    """``explain`` (global run, no faithfulness) of a folder holding a 96x96 image like the run's, the image
    ``name`` of ``height`` x ``width`` and an unreadable file; its --out folder."""
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "global")
    folder = tmp_path / "mixed" / "typical"  # a folder named like a class gives the true label
    folder.mkdir(parents=True)
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(folder / "ok.png")
    Image.fromarray(image(height, width).permute(1, 2, 0).numpy()).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "mixed"), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    return out


def test_explain_folder_skips_unreadable_files_and_notes_other_sizes(tmp_path, capsys):
    out = _explain_a_mixed_folder(tmp_path, "big.png", 300, 200)
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["images"] == 2 and [Path(s["path"]).name for s in summary["skipped"]] == ["broken.png"]
    assert "broken.png" in (out / "index.html").read_text()
    rows = (out / "results.csv").read_text()
    assert "trained on 96x96" in rows and "typical" in rows
    err = capsys.readouterr().err  # each skipped file named, as predict names them, then the count
    assert "finescope: warning: skipped: cannot read image" in err and "broken.png" in err
    assert "data.on_error" not in err and "1 file skipped: 1 unreadable" in err


def test_explain_counts_each_reason_it_skipped_files_for(tmp_path, capsys):
    """explain's closing line said 'skipped 2 unreadable files' where one file was unreadable and the other a
    readable strip too long and thin for the model's global view; it now counts each reason, as do the gallery
    and each entry of faithfulness.json's skipped."""
    out = _explain_a_mixed_folder(tmp_path, "thin.png", 4, 2000)
    skipped = json.loads((out / "faithfulness.json").read_text())["skipped"]
    assert {Path(s["path"]).name: s["kind"] for s in skipped} == {
        "broken.png": "unreadable", "thin.png": "too long and thin for the model's view"}
    line = "2 files skipped: 1 unreadable, 1 too long and thin for the model's view"
    assert f"finescope: warning: {line} (listed in the gallery)" in capsys.readouterr().err  # as other warnings
    assert line.replace("'", "&#x27;") in (out / "index.html").read_text()


def test_explaining_files_the_run_trained_on_says_how_many_they_are(tmp_path, capsys):
    """explain RUN DATA_FOLDER (README's own example explains the run's data) gave an accuracy in its gallery over
    images the model trained and validated on without a word; how many of them it explained is now warned,
    written as trained_on in faithfulness.json and said beside the accuracy."""
    from finescope.cli import main

    run = make_run(tmp_path, "global")  # train: samples 1 and 4, val: 2, test: 0, 3, 5
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "data" / "images"), "--out", str(out), "--no-faithfulness",
                 *FAST]) == 0
    assert json.loads((out / "faithfulness.json").read_text())["trained_on"] == 3
    assert "3 of them the model trained or validated on" in (out / "index.html").read_text()
    assert "3 of the 6 images explained are ones the run trained or validated on" in capsys.readouterr().err
    test_image = json.loads((run / "splits.json").read_text())["splits"]["test"][0]
    assert main(["explain", str(run), str(tmp_path / "data" / test_image), "--out", str(tmp_path / "o2"),
                 "--no-faithfulness", *FAST]) == 0
    assert json.loads((tmp_path / "o2" / "faithfulness.json").read_text())["trained_on"] == 0
    assert "trained or validated on" not in capsys.readouterr().err + (tmp_path / "o2" / "index.html").read_text()


def test_explaining_files_of_a_run_whose_data_moved_counts_the_ones_it_trained_on_by_its_splits(tmp_path, capsys):
    """explain RUN FILES where the run's data cannot be read from here (moved since, or a run handed on without
    it) said trained_on 0, and warned nothing, of images the model trained on: it counted them by the run's data
    only. They are counted by the place of its splits.json's train and val images, as evaluate counts other data;
    unknown (null) without a splits.json, or with one that is not the checkpoint's split (its digest)."""
    import shutil

    from finescope.checkpoint import load_checkpoint, save_checkpoint
    from finescope.cli import main

    run = _run_with_split_digest(tmp_path)  # train: samples 1 and 4, val: 2, test: 0, 3, 5
    shutil.move(tmp_path / "data", tmp_path / "moved")
    args = [str(tmp_path / "moved" / "images"), "--no-faithfulness", *FAST]

    def trained_on(out: str, checkpoint: Path = run) -> int | None:
        assert main(["explain", str(checkpoint), *args, "--out", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "faithfulness.json").read_text())["trained_on"]

    assert trained_on("o1") == 3
    assert "3 of the 6 images explained are ones the run trained or validated on" in capsys.readouterr().err
    away = tmp_path / "away.pt"  # no splits.json beside it: not known
    shutil.copy(run / "checkpoints" / "best.pt", away)
    assert trained_on("o2", away) is None
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    save_checkpoint({**{k: state[k] for k in ("model", "config", "class_names")}, "split_digest": "0" * 64},
                    run / "checkpoints" / "best.pt")
    capsys.readouterr()
    assert trained_on("o3") is None
    assert "trained on another split than" in capsys.readouterr().err


def test_explaining_files_does_not_generate_the_runs_synthetic_set_again(tmp_path):
    import shutil

    from finescope.cli import main

    run = make_run(tmp_path, "global")
    shutil.copy(tmp_path / "data" / "images" / "typical_0000.png", tmp_path / "x.png")
    shutil.rmtree(tmp_path / "data")  # moved, deleted, or a relative data.root read from another folder
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "x.png"), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    assert not (tmp_path / "data").exists()  # it was written again only to read the training images' size


def test_explain_a_link_in_a_class_folder_takes_that_class_as_predict_does(tmp_path):
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "global")
    (tmp_path / "raw").mkdir()
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(tmp_path / "raw" / "x.png")
    (tmp_path / "sorted" / "typical").mkdir(parents=True)  # a folder of links sorted by class
    (tmp_path / "sorted" / "typical" / "x.png").symlink_to(tmp_path / "raw" / "x.png")
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "sorted"), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    assert main(["predict", str(run), str(tmp_path / "sorted"), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    explained = next(csv.DictReader((out / "results.csv").open()))
    predicted = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert explained["true"] == predicted["true"] == "typical" and explained["path"] == predicted["path"]


def test_explain_gives_the_probabilities_and_boxes_of_predict_in_the_runs_precision(tmp_path):
    from finescope.cli import main

    run = make_run(tmp_path, "fusion", cpu_amp="bf16")  # as train.amp: bf16, the default, on CUDA
    files = [str(tmp_path / "data" / "images" / name) for name in ("atypical_0000.png", "typical_0001.png")]
    out = tmp_path / "out"
    assert main(["explain", str(run), *files, "--out", str(out), "--no-faithfulness", *FAST]) == 0
    assert main(["predict", str(run), *files, "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    for explained, predicted in zip(csv.DictReader((out / "results.csv").open()),
                                    csv.DictReader((tmp_path / "p.csv").open()), strict=True):
        probability = np.float32(predicted[f"prob_{explained['predicted']}"])  # the CSV keeps every float32 digit
        assert np.float32(explained["confidence"]) == probability  # the same forward in the same precision
        assert explained["boxes"] == predicted["boxes"]


def test_explain_and_predict_write_a_box_of_less_than_a_pixel_with_its_size(tmp_path):
    """Under model.min_box_fraction=0.001 (a 0.096 px minimum side on 96 px images) results.csv and predict's CSV
    wrote each box rounded to whole pixels: a peak's box 2.952-3.048 became '3 3 3 3', of no size (found in
    review)."""
    from finescope.cli import main

    run = make_run(tmp_path, "fusion")
    files = [str(tmp_path / "data" / "images" / name) for name in ("atypical_0000.png", "typical_0001.png")]
    tiny = ["--set", "model.min_box_fraction=0.001"]
    out = tmp_path / "out"
    assert main(["explain", str(run), *files, "--out", str(out), "--no-faithfulness", *FAST, *tiny]) == 0
    assert main(["predict", str(run), *files, "--out", str(tmp_path / "p.csv"), "--device", "cpu", *tiny]) == 0
    for explained, predicted in zip(csv.DictReader((out / "results.csv").open()),
                                    csv.DictReader((tmp_path / "p.csv").open()), strict=True):
        assert explained["boxes"] == predicted["boxes"]
        boxes = np.array([[float(v) for v in box.split()[:4]] for box in predicted["boxes"].split(";")])
        assert (boxes[:, 2:] > boxes[:, :2]).all(), predicted["boxes"]


def test_the_curves_start_at_the_explained_probability_in_the_runs_precision(tmp_path):
    from finescope.checkpoint import load_checkpoint
    from finescope.cli import main

    run = make_run(tmp_path, "fusion", cpu_amp="bf16")  # as train.amp: bf16, the default, on CUDA
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    state["model"]["fusion_head.weight"] *= 100  # confident, as a trained model: bf16 then moves the probability
    save_checkpoint({k: v for k, v in state.items() if k != "path"}, run / "checkpoints" / "best.pt")
    out = tmp_path / "out"
    assert main(["explain", str(run), "--split", "test", "--limit", "1", "--out", str(out), "--method", "attention",
                 *FAST]) == 0
    p_target = float(next(csv.DictReader((out / "results.csv").open()))["p_target"])
    for m in json.loads((out / "faithfulness.json").read_text())["methods"].values():
        assert abs(m["deletion_curve"][0] - p_target) <= 5e-5 and abs(m["insertion_curve"][-1] - p_target) <= 5e-5


@pytest.mark.parametrize("content", ["not json", '[{"x": 1, "y": 2}]', '{"typical/a.png": [[3, 4]]}'])
def test_another_tools_cells_json_above_the_images_is_ignored_with_a_warning(tmp_path, capsys, content):
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "global")
    (tmp_path / "study" / "typical").mkdir(parents=True)  # e.g. a cell counter's export beside the slides
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(tmp_path / "study" / "typical" / "a.png")
    (tmp_path / "study" / "cells.json").write_text(content)
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "study"), "--out", str(out), *FAST]) == 0
    assert "ignoring" in capsys.readouterr().err and "n_cells" not in (out / "results.csv").read_text()


def test_explain_into_a_folder_of_the_users_images_removes_only_its_own_earlier_figures(tmp_path):
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "global")
    study = tmp_path / "study"  # the user's project: images/ holds the slides, --out . writes beside them
    (study / "images").mkdir(parents=True)
    for name in ("patient1.png", "00001_patient2.png"):
        Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(study / "images" / name)
    (study / "images" / "00009_old.png").write_bytes(b"a figure of an earlier explain run")
    (study / "evidence" / "typical").mkdir(parents=True)
    (study / "evidence" / "typical" / "01.png").write_bytes(b"an earlier evidence crop")
    (study / "evidence" / "notes.png").write_bytes(b"the user's")
    assert main(["explain", str(run), str(study / "images" / "patient1.png"), str(study / "images" / "00001_patient2.png"),
                 "--out", str(study), "--no-faithfulness", *FAST]) == 0
    left = {p.relative_to(study).as_posix() for p in study.rglob("*.png")}
    assert {"images/patient1.png", "images/00001_patient2.png", "evidence/notes.png"} <= left
    assert "images/00009_old.png" not in left and "evidence/typical/01.png" not in left


def test_an_out_that_is_a_file_is_refused_in_one_line_that_says_so(tmp_path, capsys):
    """explain RUN --split test --out preds.csv (a file there) loaded the model and then failed with 'File exists:
    ...; check the path', naming neither --out nor that explain writes a folder. Refused before any work, naming
    both and a folder to give."""
    from finescope.cli import main

    run = make_run(tmp_path, "global")
    taken = tmp_path / "preds.csv"
    taken.write_text("path,label\n")
    assert main(["explain", str(run), "--split", "test", "--out", str(taken), "--no-faithfulness", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out '{taken}' is a file" in err[0] and f"--out {tmp_path / 'explain'}" in err[0]
    assert taken.read_text() == "path,label\n"


@pytest.mark.parametrize(("given", "out"), [(".", "."), (".", "explain"), ("images", ".")])
def test_an_out_inside_a_folder_to_explain_is_refused_before_any_work(tmp_path, capsys, given, out):
    """explain RUN X --out X (or --out X/explain) ran, and its second run took the first's figures (images/NNNNN_*.png,
    evidence/...) for images to explain, and kept them as inputs. Such an --out, and a folder inside --out's
    images/ or evidence/, is now refused in one line before any work."""
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "global")
    study = tmp_path / "study"
    (study / "images").mkdir(parents=True)
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(study / "images" / "patient1.png")
    before = sorted(study.rglob("*"))
    assert main(["explain", str(run), str(study / given), "--out", str(study / out), "--no-faithfulness", *FAST]) == 2
    err = capsys.readouterr().err
    assert "choose an --out outside it" in err and len(err.strip().splitlines()) == 1
    assert sorted(study.rglob("*")) == before
    assert main(["explain", str(run), str(study / "images" / "patient1.png"), "--out", str(study),
                 "--no-faithfulness", *FAST]) == 0  # a file given one by one still may be in --out's images/


@pytest.mark.parametrize("split", [True, False])
def test_an_out_inside_a_folder_sources_data_root_is_refused_as_train_refuses_it(tmp_path, capsys, split):
    """explain RUN --split test --out DATA/explain, DATA a folder source's data.root, wrote its PNGs into the data:
    the next explain --split stopped on class 'explain', and the next train learnt a third class 'explain' from
    the figures. Such an --out is now refused in one line before any work, as train and cv refuse it."""
    from PIL import Image

    from finescope.cli import main

    root = tmp_path / "folders"
    for c in ("atypical", "typical"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(image(96, 96, seed=i).permute(1, 2, 0).numpy()).save(root / c / f"{c}{i}.png")
    run = make_run(tmp_path, "global")
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["data"].update(source="folder", root=str(root))
    save_checkpoint(state, run / "checkpoints" / "best.pt")
    inputs = ["--split", "test"] if split else [str(root / "typical" / "typical0.png")]
    assert main(["explain", str(run), *inputs, "--out", str(root / "explain"), "--no-faithfulness", *FAST]) == 2
    err = capsys.readouterr().err
    assert "inside data.root" in err and len(err.strip().splitlines()) == 1
    assert not (root / "explain").exists()


def test_gallery_links_reach_figures_of_names_with_hash_percent_and_spaces(tmp_path):
    import html
    import re
    from urllib.parse import unquote, urlsplit

    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "fusion")
    folder = tmp_path / "in" / "typical"
    folder.mkdir(parents=True)
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(folder / "slide #3 at 100%.png")
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "in"), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    links = re.findall(r"(?:src|href)='([^']*)'", (out / "index.html").read_text())
    assert len(links) >= 3  # the card's image and its link, the evidence crop
    for link in links:
        url = urlsplit(html.unescape(link))
        assert not url.fragment and not url.query and (out / unquote(url.path)).is_file(), link


def test_a_file_name_with_dollar_signs_is_drawn_as_written_not_typeset(tmp_path):
    """matplotlib read the '$...$' of a file name in the figure's title as mathtext: 'cost $5 and $6.png' came out
    typeset, and 'a$\\foo$.png' ended explain in a ParseFatalException traceback."""
    from PIL import Image

    from finescope.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("cost $5 and $6.png", "a$\\foo$.png"):
        Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(folder / name)
    out = tmp_path / "out"
    assert main(["explain", str(make_run(tmp_path, "global")), str(folder), "--out", str(out), "--no-faithfulness",
                 *FAST]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2


def test_an_overlay_grids_titles_are_drawn_as_written_not_typeset(tmp_path):
    """save_overlay_grid (finescope.explain's, the demo's overlay) drew each item's title, a file and class name,
    as mathtext: 'cost $5 and $6.png' came out typeset and 'a$\\foo$.png' ended in a ParseFatalException."""
    from finescope.explain import save_overlay_grid

    items = [{"image": image(32, 32, seed=k).permute(1, 2, 0).numpy(), "attention": None, "title": title}
             for k, title in enumerate(["cost $5 and $6.png\npred a", "a$\\foo$.png\npred b"])]
    assert save_overlay_grid(items, tmp_path / "grid.png", columns=2).stat().st_size > 0


def test_a_file_name_that_is_not_utf8_is_explained_under_a_name_matplotlib_can_draw(tmp_path):
    """A Latin-1 file name (a str with a surrogate on Linux) was the figure's title: matplotlib stopped explain
    with a TypeError traceback. It is shown with U+FFFD for the odd byte."""
    import os

    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "fusion")
    folder = tmp_path / "in" / "typical"
    folder.mkdir(parents=True)
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "in"), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    assert [p.name for p in (out / "images").iterdir()] == ["00000_caf_.png"]


def test_a_figure_file_takes_only_characters_every_file_system_allows(tmp_path):
    """explain's figure images/NNNNN_<name>.png took the image's name as it was: a Linux file 'slide:1?.png' made
    a figure that Windows and macOS (':') cannot hold when the folder is copied there."""
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "fusion")
    folder = tmp_path / "in" / "typical"
    folder.mkdir(parents=True)
    Image.fromarray(image(96, 96).permute(1, 2, 0).numpy()).save(folder / "slide:1?.png")
    out = tmp_path / "out"
    assert main(["explain", str(run), str(tmp_path / "in"), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    assert [p.name for p in (out / "images").iterdir()] == ["00000_slide_1_.png"]


def test_an_image_smaller_than_the_crops_is_explained_with_a_note_that_predict_skips_it(tmp_path):
    from PIL import Image

    from finescope.cli import main

    run = make_run(tmp_path, "fusion")  # crops of 48 px
    small = tmp_path / "small.png"
    Image.fromarray(image(40, 40).permute(1, 2, 0).numpy()).save(small)
    out = tmp_path / "out"
    assert main(["explain", str(run), str(small), "--out", str(out), "--no-faithfulness", *FAST]) == 0
    note = next(csv.DictReader((out / "results.csv").open()))["notes"]
    assert "smaller than the crop size 48 px" in note and "predict and evaluate refuse such an image" in note
    assert main(["predict", str(run), str(small), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 2


def test_explain_attention_of_a_global_model_is_one_line_error(tmp_path, capsys):
    from finescope.cli import main

    run = make_run(tmp_path, "global")
    assert main(["explain", str(run), "--split", "test", "--method", "attention", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "supports: gradcam, gradcam++" in err


@pytest.mark.parametrize("setting, message", [({"limit": -1}, "--limit must be >= 0"),
                                              ({"percentile": 0.0}, "--percentile must be in"),
                                              ({"tolerance": -1.0}, "--tolerance must be >= 0"),
                                              ({"tolerance": float("nan")}, "--tolerance must be >= 0")])
def test_run_explain_checks_its_settings_as_the_command_does(tmp_path, setting, message):
    """run_explain (finescope.explain.run_explain) left --limit, --percentile and --tolerance to the command's
    own checks: limit=-1 ended in numpy's ValueError traceback, a negative or NaN tolerance scored the pointing
    game as if it were a distance."""
    from finescope.explain.runner import ExplainSettings, run_explain

    settings = ExplainSettings(faithfulness=False, top=2, **setting)
    with pytest.raises(FinescopeError, match=message):
        run_explain(make_run(tmp_path), split="test", out=tmp_path / "out", settings=settings, device="cpu",
                    progress=False)
    assert not (tmp_path / "out").exists()


def test_explain_help_names_the_default_out_of_each_input(capsys):
    from finescope.cli import main

    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # as default_out: a split, paths, a .pt
    assert "RUN/explain_<split>" in text and "RUN/explain_files for paths" in text and "./explain for a .pt" in text


def test_explain_without_inputs_says_what_to_give(tmp_path, capsys):
    from finescope.cli import main

    assert main(["explain", str(make_run(tmp_path)), *FAST]) == 2
    assert "--split test" in capsys.readouterr().err


@realdata
@pytest.mark.slow
def test_breakhis_image_explained_at_full_resolution():
    files = sorted((SHARED_DATA / "breakhis").rglob("*.png"))[:1]
    if not files:
        pytest.skip("no BreakHis PNG under ../shared/data/breakhis")
    e = finescope.explain(tiny_model("fusion"), files[0])
    H, W = e.image.shape[-2:]
    assert e.map.shape == (H, W) and (e.boxes[:, 2] <= W).all() and (e.boxes[:, 3] <= H).all()


def test_limit_spreads_over_the_list():
    from finescope.explain.runner import spread

    assert spread(list(range(10)), 3) == [0, 4, 9] and spread([1, 2], 5) == [1, 2] and spread([1, 2], 0) == [1, 2]


def test_a_loaded_model_keeps_its_class_names(tmp_path):
    from finescope.trainer import load_trained

    run = make_run(tmp_path, "attention")
    model, _, names, _ = load_trained(run, device="cpu")
    assert finescope.explain(model, image(96, 96), "attention").class_names == names != ["class_0", "class_1"]
    assert finescope.explain(model, image(96, 96), "attention", class_names=["x", "y"]).class_names == ["x", "y"]
    assert finescope.explain(tiny_model("attention"), image(96, 96), "attention").class_names == ["class_0", "class_1"]


@pytest.mark.parametrize("names", [["only_one"], ["x", "y", "z"], []])
def test_class_names_of_another_length_than_the_models_classes_are_refused_at_the_call(tmp_path, names):
    """A list of the wrong length was taken as given: one too short stopped later with an IndexError when the
    figure was drawn, one too long named nothing wrong at all."""
    from finescope.explain import save_explanation_figure

    for model in (tiny_model("attention"), make_run(tmp_path, "attention")):
        with pytest.raises(FinescopeError, match=f"class_names has {len(names)} names, but the model has 2 classes"):
            save_explanation_figure(finescope.explain(model, image(96, 96), "attention", class_names=names),
                                    tmp_path / "one.png")


def test_flat_maps_are_counted_apart_not_pointed_at_the_corner(tmp_path, monkeypatch, capsys):
    """An explanation method whose maps are zero everywhere: the pointing game leaves them out and
    faithfulness.json counts them in ``flat_maps`` (they counted as pointing at the top-left corner), and they
    give no evidence crops (they gave the corner); the other methods' numbers are as before."""
    from finescope.cli import main
    from finescope.explain import runner

    run = make_run(tmp_path, "global")
    args = ["explain", str(run), "--split", "test", "--no-faithfulness", "--method", "gradcam", "gradcam++", *FAST]
    assert main([*args, "--out", str(tmp_path / "before")]) == 0
    real_explain_loaded = runner.explain_loaded

    def flat_gradcam(*a, **k):
        expl = real_explain_loaded(*a, **k)
        expl.maps["gradcam"] = torch.zeros_like(expl.maps["gradcam"])
        return expl

    monkeypatch.setattr(runner, "explain_loaded", flat_gradcam)
    assert main([*args, "--out", str(tmp_path / "after")]) == 0
    before, after = (json.loads((tmp_path / d / "faithfulness.json").read_text())
                     for d in ("before", "after"))
    assert before["images"] == after["images"] == 3 and before["methods"]["gradcam"]["pointing_n"] > 0
    flat = after["methods"]["gradcam"]
    assert flat["flat_maps"] == 3 and "pointing_game" not in flat and "pointing_n" not in flat  # none points
    assert after["methods"]["gradcam++"] == before["methods"]["gradcam++"]
    assert "flat_maps" not in before["methods"]["gradcam"]
    assert list((tmp_path / "before" / "evidence").rglob("*.png"))
    assert not list((tmp_path / "after" / "evidence").rglob("*.png"))  # gradcam is the main map
    assert "gradcam    3 flat maps (no maximum to point at)" in capsys.readouterr().out
    n = before["methods"]["gradcam"]["pointing_n"]  # the images with nuclei, left out now: not the typical ones
    assert flat["pointing_flat_maps"] == n < 3
    assert f"({n} flat map{'s' if n > 1 else ''} left out)" in (tmp_path / "after" / "index.html").read_text()



def test_flat_maps_said_left_out_of_the_pointing_game_are_those_of_images_it_scores():
    """flat_maps counts every image's flat map; the pointing game scores only images with nuclei, so the table's
    "flat maps left out" of it counted the flat maps of typical images too."""
    from finescope.explain import runner
    from finescope.explain.gallery import faithfulness_table

    rows = [{"correct": True, "n_cells": 2, "gradcam_pointing": True},
            {"correct": True, "n_cells": 2, "gradcam_pointing": None, "gradcam_flat": True},
            {"correct": True, "n_cells": 0, "gradcam_pointing": None, "gradcam_flat": True},
            {"correct": True, "gradcam_flat": True}]  # an image of no cells.json
    s = runner.summarise(rows, [], ["gradcam"], runner.ExplainSettings(faithfulness=False))
    m = s["methods"]["gradcam"]
    assert (m["pointing_game"], m["pointing_n"], m["flat_maps"], m["pointing_flat_maps"]) == (1.0, 1, 3, 1)
    table = faithfulness_table(s)
    assert "1.000 (n=1) (1 flat map left out)" in table and "3 flat" not in table
    assert "left out)</td><td>–</td>" in table  # --no-faithfulness: no curve measured, not 0 images



def test_class_maps_are_titled_with_the_class_they_explain(tmp_path, monkeypatch):
    """A misclassified image's Grad-CAM (--target true, the default) shows the evidence for the true class, but its
    panel was titled 'gradcam' under a title naming only the prediction: read as the reason for the prediction.
    Each class-specific map now names its class; attention and eigencam, which take none, stay as they were. The
    evidence gallery's map-peak crop of such an image says whose map it is."""
    from finescope.explain import overlay
    from finescope.explain.evidence import EvidenceCollector
    from finescope.explain.gallery import _crop

    titles: list[str] = []
    monkeypatch.setattr(overlay, "save_figure", lambda fig, path, **k: titles.extend(a.get_title() for a in fig.axes))
    model, img = tiny_model("global"), image()
    names = ["benign", "malignant"]
    p = finescope.explain(model, img, "gradcam", class_names=names).predicted
    q = 1 - p

    def drawn(**kwargs) -> list[str]:
        titles.clear()
        overlay.save_explanation_figure(finescope.explain(model, img, ["gradcam", "eigencam"], class_names=names,
                                                          **kwargs), tmp_path / "x.png")
        return [t for t in titles if t.startswith(("gradcam", "eigencam"))]

    assert drawn(label=q) == [f"gradcam: {names[q]} (true class)", "eigencam"]
    assert drawn(label=q, target="predicted") == [f"gradcam: {names[p]} (predicted class)", "eigencam"]
    assert drawn(label=p) == [f"gradcam: {names[p]} (predicted, true class)", "eigencam"]
    assert drawn() == [f"gradcam: {names[p]} (predicted class)", "eigencam"]
    assert drawn(target=q) == [f"gradcam: {names[q]}", "eigencam"]

    collector, peaked = EvidenceCollector(names), torch.zeros(96, 128)
    peaked[40, 60] = 1  # a tiny untrained model's CAM may be flat, and give no crop
    for name, label in (("x.png", q), ("y.png", p)):
        e = finescope.explain(model, img, "gradcam", label=label, class_names=names)
        e.maps["gradcam"] = peaked
        collector.add(model, e, name, f"images/{name}")
    entries = {e["image"]: e for e in collector.save(tmp_path)[names[p]]}
    assert f"gradcam of {names[q]}" in _crop(entries["x.png"]) and " of " not in _crop(entries["y.png"])


def test_a_crop_model_of_no_crops_still_gives_evidence():
    """model.num_crops=0 (allowed): its explanations have K = 0 crops, and the evidence gallery stayed empty;
    it takes the map-peak crop, as a model without crops does."""
    from finescope.explain.evidence import EvidenceCollector

    torch.manual_seed(0)
    model = create_model(ModelConfig(**{**SMALL, "num_crops": 0}), 2).eval()
    e = finescope.explain(model, image(), "attention")
    assert e.crops.shape[0] == 0
    collector = EvidenceCollector(["a", "b"])
    collector.add(model, e, "x.png", "images/x.png")
    assert sum(len(h) for h in collector.heaps.values()) == 1


def test_classes_whose_names_make_one_folder_keep_their_own_evidence_crops(tmp_path):
    """'a+' and 'a?' both became evidence/a_/: the crops of the second class overwrote the first's, and the
    gallery showed the second's under both. Each class now has its own folder, and its links point into it."""
    from PIL import Image

    from finescope.explain.evidence import EvidenceCollector

    torch.manual_seed(0)
    model = create_model(ModelConfig(**{**SMALL, "num_crops": 1}), 5).eval()
    names = ["a+", "a?", "b", "B", ".."]
    collector = EvidenceCollector(names, top=1)
    for c in range(len(names)):
        e = finescope.explain(model, image(seed=c), "attention")
        e.probabilities = torch.eye(len(names))[c]  # every class predicted once, on an image of its own
        collector.add(model, e, f"x{c}.png", f"images/0000{c}_x{c}.png")
    evidence = collector.save(tmp_path)
    files = [evidence[n][0]["file"] for n in names]
    assert len({f.casefold() for f in files}) == len(names)
    assert all(f.startswith("evidence/") and f.count("/") == 2 and ".." not in f.split("/") for f in files)
    crops = [np.asarray(Image.open(tmp_path / f)) for f in files]
    assert not any(np.array_equal(crops[0], x) for x in crops[1:])  # the first class's crop is its own
    from finescope.explain.evidence import class_folders

    assert class_folders(["benign", "a+", "a?", "", "class"]) == ["benign", "a_~1", "a_~2", "class~3", "class~4"]


def test_class_folders_are_distinct_and_usable_on_windows_and_macos():
    """Folders were compared by casefold only: the NFC and NFD spellings of 'é' became 'é' and 'e_' (the accent
    a separate character), which macOS and Windows hold as one folder; a class 'CON' or 'nul.txt' got a Windows
    device name that no folder can have, and 'a.' a folder that Windows names 'a'. These now end in ~ and the class
    index (a device name before its extension: 'CON~2', 'nul~3.txt'), a final '.' is '_', and other names keep
    their folders."""
    import unicodedata

    from finescope.explain.evidence import class_folders

    nfc, nfd = unicodedata.normalize("NFC", "\u00e9"), unicodedata.normalize("NFD", "\u00e9")
    names = [nfc, nfd, "CON", "nul.txt", "Lpt1", "com\u00b9.tar.gz", "console", "a", "a.", ".", "..", "\u00fc",
             "Aux_1", "COM10"]
    assert class_folders(names) == ["\u00e9~0", "\u00e9~1", "CON~2", "nul~3.txt", "Lpt1~4", "com\u00b9~5.tar.gz",
                                    "console", "a", "a_", "_", "._", "\u00fc", "Aux_1", "COM10"]
    folders = class_folders(["A" + nfd, "a" + nfc, "b."])
    assert folders == ["A\u00e9~0", "a\u00e9~1", "b_"]


def test_class_folders_of_long_class_names_fit_a_file_name(tmp_path):
    """A class's folder was its whole name: a class of 300 letters (a CSV manifest's label, say) made a folder name
    that ext4, APFS and NTFS refuse (255 bytes or units at most). A name of more than 128 UTF-8 bytes is cut to its
    start and '~' and 8 hex digits of a hash of the whole name: readable, distinct for names that share the start,
    the same on every run."""
    from finescope.explain.evidence import class_folders

    long_a, long_b = "x" * 299 + "a", "x" * 299 + "b"
    wide = "\u00e9" * 200  # 2 bytes each in UTF-8: the cut counts bytes, not letters
    names = [long_a, long_b, wide, "CON." + "y" * 300, "short", "x" * 128]
    folders = class_folders(names)
    assert all(len(f.encode()) <= 140 for f in folders)
    assert folders[0].startswith("x" * 100) and folders[1].startswith("x" * 100)
    assert len({f.casefold() for f in folders}) == len(names)
    assert folders[2].startswith("\u00e9" * 50) and "~" in folders[2]
    assert folders[3].startswith("CON~3.")  # still no Windows device name
    assert folders[4:] == ["short", "x" * 128]  # names that fit keep their folders
    assert class_folders(names) == folders
    for f in folders:
        (tmp_path / f).mkdir()


def test_boxes_are_drawn_on_the_pixels_they_hold():
    """imshow centres pixel j on j; the boxes' frame has it span [j, j + 1): a box over the whole of a 4x6 image
    was drawn half a pixel up and left of it (an eighth of a small image), its right and bottom pixels outside."""
    from matplotlib.patches import Rectangle

    from finescope.explain.overlay import _pyplot, draw_overlay

    plt = _pyplot()
    fig, ax = plt.subplots()
    img = np.zeros((4, 6, 3), np.uint8)
    draw_overlay(ax, img, np.ones((4, 6), np.float32), boxes=[[0.0, 0.0, 6.0, 4.0]], mass=[1.0])
    left, right, bottom, top = ax.images[0].get_extent()
    box = next(p for p in ax.patches if isinstance(p, Rectangle))
    assert (box.get_x(), box.get_y()) == (left, top) and (box.get_width(), box.get_height()) == (right - left, bottom - top)
    assert ax.images[1].get_extent() == ax.images[0].get_extent()
    plt.close(fig)


def test_the_figure_of_a_thin_strip_stays_a_picture_a_browser_shows(tmp_path):
    """Each panel was as wide as the image's aspect: a 4x2000 strip with three maps made a PNG of about 175,000 x
    350 pixels (a 16x400 one with seven maps, 47,000), which no gallery shows; the figure is now capped in width."""
    from PIL import Image

    from finescope.explain.overlay import save_explanation_figure

    e = finescope.explain(tiny_model(), image(4, 2000), ["attention", "gradcam"])
    path = save_explanation_figure(e, tmp_path / "strip.png")
    with Image.open(path) as png:
        assert png.size[0] <= 8000 and png.size[1] >= 100
    e = finescope.explain(tiny_model(), image(96, 128), ["attention", "gradcam"])  # an ordinary image: as before
    with Image.open(save_explanation_figure(e, tmp_path / "ordinary.png")) as png:
        assert 1000 < png.size[0] < 2500


def test_the_figure_of_an_image_named_in_chinese_prints_no_glyph_warnings(tmp_path):
    """An image named in Chinese, Japanese or Korean (or with an emoji): drawing its figure, titled with its name,
    printed two lines of matplotlib's "Glyph 22270 (\\N{CJK UNIFIED IDEOGRAPH-56FE}) missing from font(s) DejaVu
    Sans" for each character the font lacks, a screenful for a folder of such names, beside finescope's one-line
    messages. The gallery shows the name as text; the figure's title keeps what the font draws."""
    import warnings

    from finescope.explain.overlay import save_explanation_figure

    e = finescope.explain(tiny_model(), image(48, 64), ["attention"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_explanation_figure(e, tmp_path / "f.png", title="显微镜 样本/图像_01 🙂.png")
    assert path.stat().st_size > 0
    assert [str(w.message) for w in caught if "missing from font" in str(w.message)] == []


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="needs POSIX file size limits")
def test_pictures_that_cannot_be_written_whole_keep_the_previous_ones(tmp_path):
    """explain's figures, curves and evidence crops (and the demo's overlay) were written in place: a write
    stopped by a full disk (here a file size limit) left a truncated PNG in the run's explain folder."""
    import errno
    import resource
    import signal

    from finescope.explain.overlay import _pyplot, save_figure, save_image

    def figure(seed):
        fig = _pyplot().figure(figsize=(4, 4))
        fig.gca().imshow(np.random.default_rng(seed).random((64, 64)))
        return fig

    crop, plot = save_image(torch.rand(3, 64, 64), tmp_path / "crop.png"), save_figure(figure(0), tmp_path / "f.png")
    before = {p: p.read_bytes() for p in (crop, plot)}
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))  # no picture fits
    try:
        with pytest.raises(OSError) as e1:
            save_image(torch.rand(3, 64, 64), crop)
        with pytest.raises(OSError) as e2:
            save_figure(figure(1), plot)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert e1.value.errno == e2.value.errno == errno.EFBIG
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_rerun_without_curves_leaves_no_curves_of_the_earlier_run(tmp_path):
    from finescope.cli import main

    run, out = make_run(tmp_path), tmp_path / "out"
    args = ["explain", str(run), "--split", "test", "--out", str(out), "--limit", "2", "--method", "attention", *FAST]
    assert main(args) == 0 and (out / "faithfulness.png").is_file()
    assert main([*args, "--no-faithfulness"]) == 0  # its faithfulness.json has no curves: nor may the folder
    assert not (out / "faithfulness.png").exists()


def test_explain_with_model_settings_changed_says_so_in_its_numbers_and_gallery(tmp_path):
    """explain RUN --set model.threshold=0.95 explained another model than the one trained (other crops) and its
    faithfulness.json and gallery did not say so, where evaluate's metrics record model_overrides (ca2f85f)."""
    from finescope.cli import main

    run, out = make_run(tmp_path), tmp_path / "out"
    args = ["explain", str(run), "--split", "test", "--out", str(out), "--limit", "1", "--no-faithfulness", *FAST]
    assert main([*args, "--set", "model.threshold=0.95"]) == 0
    assert json.loads((out / "faithfulness.json").read_text())["model_overrides"] == {"model.threshold": 0.95}
    assert "--set model.threshold=0.95" in (out / "index.html").read_text()
    assert main(args) == 0  # the model as trained
    assert json.loads((out / "faithfulness.json").read_text())["model_overrides"] == {}
    assert "model.threshold" not in (out / "index.html").read_text()


def _run_with_split_digest(tmp_path: Path) -> Path:
    """:func:`make_run` (global) with its checkpoint's ``split_digest``: of the split in its splits.json."""
    from finescope.checkpoint import load_checkpoint
    from finescope.data import load_samples, load_splits
    from finescope.data.splits import split_digest

    run = make_run(tmp_path, "global")
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    sample_set = load_samples(Config(data=DataConfig(**state["config"]["data"])).data)
    state["split_digest"] = split_digest(load_splits(run / "splits.json", sample_set, own=True), sample_set)
    save_checkpoint({k: state[k] for k in ("model", "config", "class_names", "split_digest")},
                    run / "checkpoints" / "best.pt")
    return run


def _swap_train_and_test(run: Path) -> dict:
    """Replace the run's splits.json by one with its train and test sides swapped; the new split."""
    split = json.loads((run / "splits.json").read_text())
    split["splits"]["train"], split["splits"]["test"] = split["splits"]["test"], split["splits"]["train"]
    (run / "splits.json").write_text(json.dumps(split))
    return split


def test_explain_split_of_a_checkpoint_trained_on_another_split_says_so_in_its_numbers_and_gallery(tmp_path, capsys):
    """explain RUN --split test of a checkpoint whose folder's splits.json is not the split it trained on (copied
    into another run's folder, or the file replaced) explained that folder's test side without a word, though it
    may hold images the model trained on, where evaluate warns and records split_leak (f7261ab): the checkpoint's
    split_digest tells; a warning says so, faithfulness.json records it in split_leak and the gallery shows it."""
    from finescope.cli import main

    run = _run_with_split_digest(tmp_path)
    out = tmp_path / "out"
    args = ["explain", str(run), "--split", "test", "--out", str(out), "--no-faithfulness", *FAST]
    assert main(args) == 0  # its own split: nothing said
    assert json.loads((out / "faithfulness.json").read_text())["split_leak"] is None
    assert "another split" not in capsys.readouterr().err
    split = _swap_train_and_test(run)  # replaced: its test side is what the model trained on
    assert main(args) == 0
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["images"] == len(split["splits"]["test"])
    assert "trained on another split than" in summary["split_leak"]
    assert "explain it in the folder of the run that trained it" in summary["split_leak"]
    assert "trained on another split than" in capsys.readouterr().err
    assert "trained on another split than" in (out / "index.html").read_text()


def test_explaining_files_with_a_checkpoint_trained_on_another_split_does_not_count_them_unseen(tmp_path, capsys):
    """explain RUN FILES counts the files the run trained or validated on by its folder's splits.json: with a
    checkpoint trained on another split (copied into another run's folder, or that file replaced) it said
    trained_on 0, and warned nothing, of the very images the model trained on. The checkpoint's split_digest
    tells: the count is unknown (null), a warning says why and faithfulness.json records it in split_leak."""
    from finescope.cli import main

    run = _run_with_split_digest(tmp_path)
    trained = json.loads((run / "splits.json").read_text())["splits"]["train"]
    files = [str(tmp_path / "data" / p) for p in trained]
    args = ["explain", str(run), *files, "--out", str(tmp_path / "out"), "--no-faithfulness", *FAST]
    assert main(args) == 0  # its own split: counted, no split_leak
    summary = json.loads((tmp_path / "out" / "faithfulness.json").read_text())
    assert (summary["trained_on"], summary["split_leak"]) == (len(trained), None)
    capsys.readouterr()
    _swap_train_and_test(run)
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "faithfulness.json").read_text())
    assert summary["trained_on"] is None and "trained on another split than" in summary["split_leak"]
    assert "trained on another split than" in capsys.readouterr().err
    page = (tmp_path / "out" / "index.html").read_text()
    assert "trained on another split than" in page and "of them the model trained or validated on" not in page


def test_explain_split_all_of_other_data_explains_every_image_as_evaluate_does(tmp_path, capsys):
    """explain RUN --split all --set data.source=csv data.root=OTHER.csv (a run trained on a folder) stopped at
    'splits file ... does not match the data', where evaluate RUN --split all evaluates every image of other data:
    explain reads all of them too, and counts those the run trained or validated on (its splits.json) as it does
    for files given, also on its own data (found in the walkthrough)."""
    from finescope.cli import main
    from finescope.data.synthetic import generate

    run = _run_with_split_digest(tmp_path)
    generate(tmp_path / "other", per_class=2, size=96, seed=5)
    out = tmp_path / "out"
    fast = ["--out", str(out), "--no-faithfulness", *FAST]
    for root, images in ((tmp_path / "other", 4), (tmp_path / "data", 6)):  # other data; its own, as a CSV
        assert main(["explain", str(run), "--split", "all", "--set", "data.source=csv",
                     f"data.root={root / 'manifest.csv'}", *fast]) == 0, capsys.readouterr().err
        summary = json.loads((out / "faithfulness.json").read_text())
        assert summary["images"] == images and summary["split_leak"] is None
        assert summary["trained_on"] > 0 and str(root) in summary["source"]  # the same names: at their place
    assert summary["trained_on"] == 3  # its own data: the 2 train and 1 val images of its splits.json
    assert "images explained are ones the run trained" in capsys.readouterr().err
    _swap_train_and_test(run)  # a checkpoint trained on another split: which it trained on is not known
    assert main(["explain", str(run), "--split", "all", *fast]) == 0
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["trained_on"] is None and "trained on another split than" in summary["split_leak"]
    lone = tmp_path / "lone.pt"  # out of its run, on the data it trained on: as evaluate, said to hold them
    shutil.copy(run / "checkpoints" / "best.pt", lone)
    capsys.readouterr()
    assert main(["explain", str(lone), "--split", "all", *fast]) == 0
    summary = json.loads((out / "faithfulness.json").read_text())
    assert "is the one this model was trained on" in summary["split_leak"] and summary["trained_on"] is None
    assert "is the one this model was trained on" in capsys.readouterr().err
    assert main(["explain", str(lone), "--split", "all", "--set", "data.source=csv",
                 f"data.root={tmp_path / 'other' / 'manifest.csv'}", *fast]) == 0  # other data: nothing to say
    assert json.loads((out / "faithfulness.json").read_text())["split_leak"] is None


def test_explain_split_test_of_other_data_explains_every_image_as_evaluate_does(tmp_path, capsys):
    """explain RUN --split test --set data.source=csv data.root=OTHER.csv stopped at 'splits file ... does not match
    the data; point data.root at the data this run was trained on', where evaluate RUN --split test on other data
    warns that it evaluates all its images and does (metrics_all.json), counting those the run trained or validated
    on: explain does the same, into RUN/explain_all_other-manifest, not over the run's own explain_test; a checkpoint without its
    splits.json on other data too. On its own data without splits.json it still refuses: nothing tells its test
    images apart (--split all explains them all, with that said)."""
    from finescope.cli import main
    from finescope.data.synthetic import generate

    run = _run_with_split_digest(tmp_path)
    generate(tmp_path / "other", per_class=2, size=96, seed=5)
    other = ["--set", "data.source=csv", f"data.root={tmp_path / 'other' / 'manifest.csv'}"]
    fast = ["--no-faithfulness", *FAST]
    assert main(["explain", str(run), "--split", "test", *other, *fast]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "explaining all 4 images, not the 'test' split: the data is not the run's (splits file" in err
    assert "images explained are ones the run trained" in err  # the same names, at their place: as evaluate's
    summary = json.loads((run / "explain_all_other-manifest" / "faithfulness.json").read_text())
    assert summary["images"] == 4 and summary["trained_on"] == 2 and summary["split_leak"] is None
    assert summary["source"] == f"all images of {tmp_path / 'other'}" and not (run / "explain_test").exists()
    out = tmp_path / "out"
    assert main(["explain", str(run), "--split", "test", "--out", str(out), *fast]) == 0  # its own data: its side
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["images"] == 3 and "explaining all" not in capsys.readouterr().err
    lone = tmp_path / "lone.pt"  # out of its run: other data as evaluate reads it, its own data refused
    shutil.copy(run / "checkpoints" / "best.pt", lone)
    assert main(["explain", str(lone), "--split", "test", "--out", str(out), *other, *fast]) == 0
    assert f"explaining all 4 images, not the 'test' split: no splits.json in '{tmp_path}'" in capsys.readouterr().err
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["images"] == 4 and summary["split_leak"] is None
    assert main(["explain", str(lone), "--split", "test", "--out", str(out), *fast]) == 2
    assert "--split needs the run's splits.json" in capsys.readouterr().err
    manifest = tmp_path / "data" / "manifest.csv"  # its own data changed since: refused, as by evaluate
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))
    assert main(["explain", str(run), "--split", "test", "--out", str(out), *fast]) == 2
    assert "does not match the data" in capsys.readouterr().err


def test_other_data_of_another_scale_is_noted_as_files_of_it_are(tmp_path):
    """explain RUN --split all --set data.root=OTHER (images of 200 px, the run trained on 96 px) noted no image as
    of another scale than the training images, where explain RUN OTHER/images notes every one: the training sizes
    were read from the data given (other data, which the run's splits.json does not describe), not the run's."""
    from finescope.cli import main
    from finescope.data.synthetic import generate

    run = make_run(tmp_path, "global")
    generate(tmp_path / "big", per_class=1, size=200, seed=3)
    out = tmp_path / "out"
    assert main(["explain", str(run), "--split", "all", "--set", "data.source=csv",
                 f"data.root={tmp_path / 'big' / 'manifest.csv'}", "--out", str(out), "--no-faithfulness", *FAST]) == 0
    with (out / "results.csv").open(newline="") as fh:
        notes = [r["notes"] for r in csv.DictReader(fh)]
    assert len(notes) == 2 and all("image is 200x200 but the model was trained on 96x96" in n for n in notes)


def test_a_training_image_pil_refuses_to_open_leaves_its_size_unknown_not_a_traceback(tmp_path, monkeypatch, capsys):
    """explain of a run whose training images PIL refuses to open (larger than its decompression-bomb limit)
    ended in a DecompressionBombError traceback while reading their sizes for the size notes, before any image."""
    from PIL import Image

    from finescope.checkpoint import load_checkpoint
    from finescope.cli import main

    run = make_run(tmp_path)  # its data read from a CSV: the training sizes are measured, not known
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    state["config"]["data"].update(source="csv", root=str(tmp_path / "data" / "manifest.csv"))
    save_checkpoint({k: state[k] for k in ("model", "config", "class_names")}, run / "checkpoints" / "best.pt")
    img = str(sorted((tmp_path / "data" / "images").glob("*.png"))[0])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 96x96 images: each a decompression bomb to PIL
    assert main(["explain", str(run), img, "--out", str(tmp_path / "out"), "--no-faithfulness", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "none of the 1 images could be read" in err[-1] and "decompression" in err[-1] and len(err) == 2


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt(), 130),
                                          (OSError(28, "No space left on device", "images/00001_x.png"), 2)])
def test_a_rerun_stopped_midway_leaves_the_earlier_gallery_whole(tmp_path, monkeypatch, stop, status):
    """A rerun removed the earlier run's figures before drawing its own: one stopped at its 2nd image (Ctrl-C,
    a full disk) left the earlier index.html and results.csv showing figures no longer there."""
    from finescope.cli import main
    from finescope.explain import runner

    run, out = make_run(tmp_path), tmp_path / "out"
    args = ["explain", str(run), "--split", "test", "--out", str(out), *FAST]
    assert main(args) == 0

    def files():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before, explain_one = files(), runner._explain_one

    def stopped_at_the_second(ctx, index, item):
        if index == 1:
            raise stop
        return explain_one(ctx, index, item)

    monkeypatch.setattr(runner, "_explain_one", stopped_at_the_second)
    assert main(args) == status
    assert files() == before  # the earlier gallery, its tables and its figures, and nothing else
    monkeypatch.undo()
    (out / f"{runner.STAGE_PREFIX}killed").mkdir()  # what a killed run leaves: gone with the next run
    (out / f"{runner.STAGE_PREFIX}killed" / ".lock").write_text("pid 999999 on elsewhere")  # held by no process
    assert main(args) == 0 and not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_second_explain_into_the_same_out_leaves_the_live_runs_folder_and_is_refused(tmp_path, capsys):
    """A second explain into the same --out removed every hidden working folder there, meant for those of killed
    runs, so also the one a live run was drawing in: that run then lost its figures. Only the folders of runs
    that are gone are removed; a live run's makes the second refused in one line."""
    import os
    import socket
    import time

    fcntl = pytest.importorskip("fcntl")
    from finescope.cli import main
    from finescope.explain import runner

    out = tmp_path / "out"
    live, dead = out / f"{runner.STAGE_PREFIX}live", out / f"{runner.STAGE_PREFIX}dead"
    for folder in (live, dead):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "00000_x.png").write_bytes(b"drawn")
    (dead / ".lock").write_text("pid 999999 on elsewhere")  # what a killed run leaves: the lock no process holds
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    args = ["explain", str(make_run(tmp_path)), "--split", "test", "--out", str(out), *FAST]
    with open(live / ".lock", "a+") as fh:  # a live run's lock, as it holds it
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(holder)
        fh.flush()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"'{out}' is being written by another finescope explain ({holder})" in err[0]
        assert (live / "images" / "00000_x.png").read_bytes() == b"drawn" and not (out / "index.html").exists()
    assert main(args) == 0 and (out / "index.html").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the run gone, its folder goes too

    legacy = out / f"{runner.STAGE_PREFIX}old"  # an earlier version's, or one killed before its lock: by its age
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    assert main(args) == 0 and not legacy.exists()


def test_figures_reach_an_images_folder_linked_to_another_file_system(tmp_path):
    """The figures drawn in --out's hidden folder are renamed into images/ and evidence/; one of these linked to
    another file system (where a rename fails) gets them copied."""
    import shutil
    import tempfile

    from finescope.cli import main

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / "images").symlink_to(elsewhere)
        assert main(["explain", str(make_run(tmp_path)), "--split", "test", "--out", str(out), *FAST]) == 0
        assert len(list(elsewhere.glob("*.png"))) == 3
    finally:
        shutil.rmtree(elsewhere)


def test_an_out_folder_explain_cannot_write_in_is_named_not_its_hidden_one(tmp_path, monkeypatch, capsys):
    """The figures are drawn in a hidden folder inside --out: a folder explain may not write in is named as the
    user gave it, not as that hidden one."""
    import errno
    import tempfile

    from finescope.cli import main

    def read_only(dir, prefix):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / f"{prefix}abc"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # as root, a folder of mode 555 is still writable
    out = tmp_path / "out"
    assert main(["explain", str(make_run(tmp_path)), "--split", "test", "--out", str(out), *FAST]) == 2
    assert f"Permission denied: '{out}'; check its permissions" in capsys.readouterr().err


def test_a_small_box_mass_stays_readable_in_the_figures_and_the_evidence_gallery():
    """Masses were shown with 2 decimals beside the boxes, over the crops and in the evidence gallery: a box holding
    0.0004 of the attention read '0.00', as one holding none. They are shown with 2 significant digits."""
    from finescope.explain.gallery import _crop
    from finescope.explain.overlay import _pyplot, draw_overlay

    plt = _pyplot()
    fig, ax = plt.subplots()
    draw_overlay(ax, np.zeros((40, 60, 3), np.uint8), None, boxes=[[0.0, 0.0, 6.0, 4.0], [10.0, 10.0, 20.0, 20.0]],
                 mass=[0.5, 0.0004])
    assert [t.get_text() for t in ax.texts] == ["1 (0.5)", "2 (0.0004)"]
    plt.close(fig)
    entry = {"mass": 0.0004, "correct": True, "figure": "images/a.png", "file": "evidence/a/01.png", "image": "a.png",
             "rank": 2, "probability": 0.9}
    assert "mass 0.0004 ·" in _crop(entry)


def test_the_demos_overlays_predict_in_the_runs_autocast(synthetic_root, tmp_path, monkeypatch):
    """The demo drew its overlays' predictions and boxes in float32 whatever the run's train.cpu_amp, so its titles
    could name another class than evaluate and predict, which run the model in that precision."""
    from conftest import tiny_overrides

    from finescope import demo
    from finescope.config import load_config
    from finescope.models.network import FineScopeNet
    from finescope.trainer import train

    cfg = load_config(None, tiny_overrides(synthetic_root, "fusion", 1) + [
        "data.source=synthetic", f"data.root={tmp_path / 'data'}", "data.synthetic_per_class=12",
        "data.synthetic_size=96", "train.cpu_amp=bf16"])  # the demo's source: its cells.json marks the nuclei
    train(cfg, tmp_path / "run", progress=False)
    seen, forward = [], FineScopeNet.forward

    def recording(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FineScopeNet, "forward", recording)
    items = demo._overlay_items(tmp_path / "run", cfg, n=2)
    assert len(items) == 2 and seen and all(seen)
    assert finescope.explain.save_overlay_grid(items, tmp_path / "overlay.png").stat().st_size > 0
