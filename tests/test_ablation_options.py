"""Ablation options of the network and the loop: evidence selection, separate crop backbone, stage-wise
training and a frozen backbone. Their defaults keep the original behaviour."""

from __future__ import annotations

import pytest
import torch

from finescope.config import ModelConfig, load_config
from finescope.engine import compute_loss
from finescope.errors import FinescopeError
from finescope.models import create_model
from finescope.trainer import build_optimizer

SMALL = {"backbone": "tiny", "global_size": 64, "local_size": 48, "num_crops": 2, "variant": "fusion"}


def test_defaults_are_the_original_behaviour():
    cfg = ModelConfig()
    assert (cfg.select_from, cfg.crop_backbone) == ("attention", "shared")
    model = create_model(ModelConfig(**SMALL), 3)
    assert model.crop_backbone is None and model.crops_active


def test_evidence_selection_gives_valid_boxes():
    torch.manual_seed(0)
    model = create_model(ModelConfig(**SMALL, select_from="evidence"), 3).eval()
    x = torch.rand(2, 3, 96, 128)
    sizes = torch.tensor([[96, 128], [80, 100]])
    out = model(x, sizes)
    assert out.boxes.shape == (2, 2, 4) and out.logits.shape == (2, 3)
    assert (out.boxes[..., 2] <= sizes[:, 1, None]).all() and (out.boxes[..., 3] <= sizes[:, 0, None]).all()
    cells = model.instance_proj(model.backbone(model._normalise(x)).flatten(2).transpose(1, 2))
    mask = torch.ones(2, *out.attention.shape[1:], dtype=torch.bool)
    ev = model._evidence(cells, out.global_logits, mask)  # (B, h, w), a distribution over cells
    torch.testing.assert_close(ev.sum(dim=(1, 2)), torch.ones(2))


def test_evidence_selection_reports_the_boxes_attention_mass():
    """ModelOutput.box_mass is the attention mass of each box (figures, results.csv and the evidence gallery
    show it as such); with select_from=evidence it was the mass of the evidence map that picked the boxes."""
    from finescope.models.selection import box_mass

    torch.manual_seed(0)
    model = create_model(ModelConfig(**SMALL, select_from="evidence"), 3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 128), torch.tensor([[96, 128], [80, 100]]))
    torch.testing.assert_close(out.box_mass, box_mass(out.attention, out.boxes, out.cell_px))


def test_separate_crop_backbone_gets_gradients():
    torch.manual_seed(0)
    model = create_model(ModelConfig(**SMALL, crop_backbone="separate"), 2)
    out = model(torch.rand(2, 3, 96, 96))
    compute_loss(out, torch.tensor([0, 1])).backward()
    for name in ("backbone", "crop_backbone"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads[:2]), name
    assert model.crop_backbone is not model.backbone


def test_stage_wise_skips_crops_in_training_only():
    model = create_model(ModelConfig(**SMALL), 2)
    model.crops_active = False
    out = model.train()(torch.rand(2, 3, 96, 96))
    assert out.boxes is None and out.global_logits is None
    assert model.eval()(torch.rand(2, 3, 96, 96)).boxes is not None  # evaluation always reads the crops


def test_frozen_backbone_has_no_gradients():
    cfg = load_config(overrides=["model.backbone=tiny", "train.backbone_lr_scale=0", "model.variant=fusion",
                                 "model.crop_backbone=separate", "model.global_size=64", "model.local_size=48"])
    model = create_model(cfg.model, 2)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.crop_backbone.parameters())
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_adamw_is_fused_where_torch_has_it_and_steps_as_the_default_one():
    """build_optimizer takes the fused AdamW on the CPU where this torch has it (2.4 on), and one step of it
    moves the (channels-last) weights as torch's default foreach AdamW does."""
    from finescope.trainer import build_model, fused_adamw

    cfg = load_config(overrides=["model.backbone=tiny", "model.variant=fusion", "model.global_size=64",
                                 "model.local_size=48", "train.device=cpu"])
    assert fused_adamw("cpu") == (tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4))
    after = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg, 2, torch.device("cpu"))
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        assert opt.defaults["fused"] == fused_adamw("cpu")
        if not fused:
            for group in opt.param_groups:
                group["fused"], group["foreach"] = False, True
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.empty_like(p).normal_(generator=g)  # in the parameter's layout, as autograd's
        opt.step()
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("key, value", [("model.select_from", "cam"), ("model.crop_backbone", "twin"),
                                        ("train.crop_warmup_epochs", "30")])
def test_bad_option_values(key, value):
    with pytest.raises(FinescopeError, match=key.replace(".", r"\.")):
        load_config(overrides=[f"{key}={value}"])


def test_stage_wise_training_run(tmp_path):
    from finescope.trainer import train

    cfg = load_config(overrides=[
        f"data.root={tmp_path / 'data'}", "data.synthetic_per_class=8", "data.synthetic_size=96",
        "data.num_workers=0", "model.backbone=tiny", "model.global_size=48", "model.local_size=48",
        "model.num_crops=2", "model.min_box_fraction=0.5", "train.epochs=2", "train.crop_warmup_epochs=1",
        "train.batch_size=8", "train.device=cpu"])
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["best_epoch"] == 1  # the warm-up epoch is never the best checkpoint
