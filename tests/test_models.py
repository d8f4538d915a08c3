"""Models: attention pooling against Ilse et al. Eq. 9, every registered variant, instance selection."""

import collections
import math
import os
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED
from torchvision.ops import box_iou

from finescope.config import ModelConfig
from finescope.errors import FinescopeError
from finescope.models import (
    AttentionPool,
    backbones,
    create_backbone,
    create_model,
    list_models,
    select_boxes,
)
from finescope.models.network import IMAGENET_STD, global_view_size

SMALL = {"backbone": "tiny", "global_size": 64, "local_size": 48, "num_crops": 3}


def literal_eq9(h, V, U, w):
    """Ilse et al. 2018 Eq. 9 written out instance by instance for one bag h (N, M)."""
    scores = []
    for n in range(h.shape[0]):
        hn = h[n]
        scores.append(w @ (torch.tanh(V @ hn) * torch.sigmoid(U @ hn)))
    scores = torch.stack(scores)
    a = torch.exp(scores) / torch.exp(scores).sum()
    z = sum(a[n] * h[n] for n in range(h.shape[0]))
    return z, a


def test_gated_attention_equals_literal_eq9():
    torch.manual_seed(0)
    pool = AttentionPool(in_dim=6, attn_dim=5, gated=True).double()
    for p in pool.parameters():
        torch.nn.init.normal_(p)
    with torch.no_grad():  # the literal formula has no biases: zero them
        pool.attention_V.bias.zero_()
        pool.attention_U.bias.zero_()
    h = torch.randn(2, 7, 6, dtype=torch.float64)
    z, a = pool(h)
    for b in range(2):
        z_ref, a_ref = literal_eq9(h[b], pool.attention_V.weight, pool.attention_U.weight, pool.attention_w.weight[0])
        torch.testing.assert_close(a[b], a_ref)
        torch.testing.assert_close(z[b], z_ref)


def test_plain_attention_is_eq8():
    torch.manual_seed(0)
    pool = AttentionPool(4, 3, gated=False).double()
    h = torch.randn(1, 5, 4, dtype=torch.float64)
    _, a = pool(h)
    scores = pool.attention_w(torch.tanh(pool.attention_V(h))).squeeze(-1)
    torch.testing.assert_close(a, scores.softmax(1))
    assert pool.attention_U is None


def test_attention_permutation_invariant():
    torch.manual_seed(1)
    pool = AttentionPool(8, 4)
    h = torch.randn(3, 10, 8)
    perm = torch.randperm(10)
    z, a = pool(h)
    z_p, a_p = pool(h[:, perm])
    torch.testing.assert_close(z, z_p)
    torch.testing.assert_close(a[:, perm], a_p)


def test_padding_does_not_change_attention():
    torch.manual_seed(2)
    pool = AttentionPool(8, 4)
    h = torch.randn(1, 6, 8)
    padded = torch.cat([h, torch.randn(1, 4, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    z, a = pool(h)
    z_pad, a_pad = pool(padded, mask)
    torch.testing.assert_close(z, z_pad)
    torch.testing.assert_close(a, a_pad[:, :6])
    assert a_pad[:, 6:].abs().max() == 0


@pytest.mark.parametrize("variant", list_models())
def test_variant_outputs_and_gradients(variant):
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant=variant, **SMALL), num_classes=3)
    images = torch.rand(2, 3, 120, 160)
    sizes = torch.tensor([[120, 160], [110, 150]])
    images[1, :, 110:] = 0
    images[1, :, :, 150:] = 0
    out = model(images, sizes)
    assert out.logits.shape == (2, 3)
    if variant in ("global", "global-hires"):
        assert out.attention is None and out.boxes is None
    else:
        assert out.attention.dim() == 3 and out.attention.shape[0] == 2
        torch.testing.assert_close(out.attention.sum(dim=(1, 2)), torch.ones(2))
    if variant.startswith("fusion"):
        assert out.global_logits.shape == (2, 3)
        assert out.boxes.shape == (2, 3, 4) and out.box_mass.shape == (2, 3)
        for b, (h, w) in enumerate(sizes.tolist()):
            bx = out.boxes[b]
            assert (bx[:, 0] >= 0).all() and (bx[:, 1] >= 0).all()
            assert (bx[:, 2] <= w).all() and (bx[:, 3] <= h).all()
            assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2]))
    if out.global_logits is not None:
        loss = loss + torch.nn.functional.cross_entropy(out.global_logits, torch.tensor([0, 2]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached: {missing}"


def test_padded_cells_get_no_attention():
    """In a batch of two widths, the narrower image's padded cells get zero attention."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="attention", **SMALL), 2).eval()
    a = torch.rand(1, 3, 128, 192)
    b = torch.rand(1, 3, 128, 128)
    batch = torch.zeros(2, 3, 128, 192)
    batch[0], batch[1, :, :, :128] = a[0], b[0]
    with torch.no_grad():
        out = model(batch, torch.tensor([[128, 192], [128, 128]]))
        single = model(b)
    h, w = single.attention.shape[1:]
    assert out.attention[1, :h, w:].abs().max() == 0  # padded cells get no attention
    assert out.attention.shape[2] > w
    assert torch.allclose(out.attention[1, :h, :w].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("variant", ["attention", "fusion"])
def test_an_image_has_the_same_cells_alone_and_in_a_padded_batch(variant):
    """The cells that cover an image, their size in pixels and its boxes' frame do not depend on its batch: with
    a 64 x 64 view (4 cells of 16 px) beside a 64 x 100 one (7 cells, 100 / 7 = 14.3 px each) the image keeps
    its 4 columns (5 were counted from the batch's 14.3 px cells before)."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant=variant, **SMALL), 2).eval()
    assert (model.backbone.stride, model.backbone.ceil) == (16, True)
    batch = torch.zeros(2, 3, 256, 400)
    batch[0] = torch.rand(3, 256, 400)
    batch[1, :, :, :256] = torch.rand(3, 256, 256)
    with torch.no_grad():
        out = model(batch, torch.tensor([[256, 400], [256, 256]]))
        alone = model(batch[1:, :, :, :256])
    assert out.attention.shape[1:] == (4, 7) and alone.attention.shape[1:] == (4, 4)
    assert (out.attention[1, :, 4:] == 0).all() and out.attention[1].sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(out.cell_px[1], alone.cell_px[0])  # 64 x 64 px
    if variant == "fusion":
        assert (out.boxes[1, :, 2] <= 256).all()


def test_backbone_cells_follow_its_rounding():
    from finescope.models.backbones import tiny_cnn

    tiny = tiny_cnn()
    assert [tiny.cells(n) for n in (64, 65, 79, 80)] == [4, 5, 5, 5]
    patchify = backbones.Backbone(torch.nn.Conv2d(3, 4, 4, 4), 4, "patchify")  # floor, as ConvNeXt's stem
    assert (patchify.stride, patchify.ceil) == (4, False) and patchify.cells(11) == 2
    odd = backbones.Backbone(torch.nn.Conv2d(3, 4, 3, 3), 4, "odd")  # 256 px are not a whole number of its cells
    assert odd.stride is None and odd.cells(90) is None
    # ceil in one stage, floor in the next (DenseNet's transitions): no single rule, so no stride
    mixed = backbones.Backbone(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.AvgPool2d(2)), 4, "mixed")
    assert mixed.stride is None

    class Fussy(torch.nn.Conv2d):  # refuses an odd size, as some timm trunks do
        def forward(self, x):
            if x.shape[-1] % 2:
                raise RuntimeError("The size of tensor a (65) must match the size of tensor b (64)")
            return super().forward(x)

    assert backbones.Backbone(Fussy(3, 4, 2, 2), 4, "fussy").stride is None


def test_global_view_keeps_aspect():
    assert global_view_size(460, 700, 224) == (224, 341)
    assert global_view_size(700, 460, 224) == (341, 224)


def test_view_multiple_rounds_the_long_side_to_the_nearest_multiple():
    assert global_view_size(460, 700, 224, 32) == (224, 352)  # 341 -> 352
    assert global_view_size(456, 700, 224, 32) == (224, 352)  # 344 -> 352: one shape for BreakHis' two sizes
    assert global_view_size(700, 460, 224, 32) == (352, 224)
    assert global_view_size(1536, 2048, 224, 32) == (224, 288)  # 299 -> 288, the nearer multiple
    assert global_view_size(300, 310, 224, 32) == (224, 224)  # never below the short side
    assert global_view_size(300, 300, 100, 32) == (100, 100)  # a square view is left as it is
    assert global_view_size(100, 333, 100, 64) == (100, 320)


def test_the_backbone_reads_the_rounded_view():
    """With ``view_multiple`` the backbone's input has the rounded long side, in a batch and alone; the
    default keeps the aspect exactly."""
    seen = []
    for multiple in (1, 32):
        model = create_model(ModelConfig(variant="fusion", view_multiple=multiple, **SMALL), 2).eval()
        hook = model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
        with torch.no_grad():
            model(torch.rand(2, 3, 96, 170), torch.tensor([[96, 170], [96, 150]]))
        hook.remove()
    # SMALL's global_size is 64: 96x170 -> 64x113 (exact) or 64x128; 96x150 -> 64x100 or 64x96; then the crops
    assert seen[0] == (2, 3, 64, 113) and seen[2] == (2, 3, 64, 128)
    assert seen[1] == seen[3] == (6, 3, 48, 48)


def test_unknown_variant_and_backbone():
    with pytest.raises(FinescopeError, match="variant"):
        create_model(ModelConfig(variant="nope", backbone="tiny"), 2)
    with pytest.raises(FinescopeError, match="backbone"):
        create_backbone("resnet_does_not_exist")


def test_a_view_or_crop_smaller_than_a_cell_of_a_flooring_backbone_is_refused():
    """convnext_tiny's grid is floor(side / 32): a 24-pixel crop has no cell, and its first forward pass failed
    with a RuntimeError traceback; the config is refused at once, naming the key. The full-resolution view of
    global-hires does not read model.global_size, and a variant without crops not model.local_size."""
    with pytest.raises(FinescopeError, match="'model.local_size' is 24 px, smaller than one feature cell of "
                                             "backbone 'convnext_tiny' \\(32 px\\); set it to at least 32"):
        create_model(ModelConfig(variant="fusion", backbone="convnext_tiny", global_size=64, local_size=24), 2)
    with pytest.raises(FinescopeError, match="'model.global_size' is 16 px"):
        create_model(ModelConfig(variant="global", backbone="convnext_tiny", global_size=16), 2)
    create_model(ModelConfig(variant="attention", backbone="convnext_tiny", global_size=32, local_size=8), 2)
    create_model(ModelConfig(variant="global-hires", backbone="convnext_tiny", global_size=8), 2)
    create_model(ModelConfig(variant="fusion", backbone="tiny", global_size=8, local_size=8), 2)  # padded convs


def test_tiny_has_no_pretrained_weights():
    with pytest.raises(FinescopeError, match="backbone 'tiny' has no pretrained weights"):
        create_backbone("tiny", pretrained=True)  # not a randomly initialised one as if it were pretrained


def test_weights_that_do_not_fit(tmp_path):
    torch.save(create_backbone("resnet18").trunk.state_dict(), tmp_path / "r18_trunk.pt")  # wrong key layout
    with pytest.raises(FinescopeError, match="does not fit backbone 'resnet18'"):
        create_backbone("resnet18", weights=str(tmp_path / "r18_trunk.pt"))
    with pytest.raises(FinescopeError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(FinescopeError, match="is a folder without a finescope run"):
        create_backbone("resnet18", weights=str(tmp_path))


def _run_of(tmp_path, backbone: str = "tiny", depthwise_swapped: bool = False):
    """A finescope run folder whose checkpoints/best.pt holds a binary fusion model of ``backbone`` whose every
    tensor is moved off any fresh initialisation; and that model."""
    from finescope.checkpoint import save_checkpoint
    from finescope.config import Config, resolved_dict

    cfg = replace(Config(), model=ModelConfig(backbone=backbone, global_size=64, local_size=48))
    net = create_model(cfg.model, 2)
    if depthwise_swapped:  # train.cudnn_depthwise: false swaps the modules' classes, not their state
        assert backbones.depthwise_without_cudnn(net) > 0
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(0.25)
    save_checkpoint({"model": net.state_dict(), "config": resolved_dict(cfg), "class_names": ["b", "m"], "epoch": 3},
                    tmp_path / "run" / "checkpoints" / "best.pt")
    return tmp_path / "run", net


@pytest.mark.parametrize("given", ["run", "run/checkpoints/best.pt"])
def test_weights_of_a_run_start_the_backbone_as_trained_and_fresh_heads(tmp_path, given):
    """model.weights=RUN (or its best.pt) fine-tunes from an earlier run: its trained backbone (BatchNorm
    statistics too), for any class count; the attention and the classifiers are new, and a separate crop
    backbone starts from the same trained backbone. A finescope checkpoint was refused before."""
    _, trained = _run_of(tmp_path)
    cfg = ModelConfig(backbone="tiny", weights=str(tmp_path / given), global_size=64, local_size=48,
                      crop_backbone="separate")
    net = create_model(cfg, 8)
    own, old = net.state_dict(), trained.state_dict()
    backbone_keys = [k for k in old if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(own[k], old[k]) for k in backbone_keys)
    assert all(torch.equal(own["crop_" + k], old[k]) for k in backbone_keys)
    heads = [k for k in old if not k.startswith("backbone.") and own[k].is_floating_point()]
    assert heads and not any(own[k].shape == old[k].shape and torch.equal(own[k], old[k]) for k in heads)
    assert net(torch.rand(2, 3, 64, 64)).logits.shape == (2, 8)


def test_weights_of_a_run_of_another_backbone_are_refused_in_one_line(tmp_path):
    run, _ = _run_of(tmp_path)
    with pytest.raises(FinescopeError) as caught:
        create_backbone("resnet18", weights=str(run))
    line = str(caught.value)
    assert "\n" not in line and "backbone 'tiny'" in line and "'resnet18'" in line
    assert "model.backbone=tiny" in line


def test_weights_of_a_timm_run_name_it_with_or_without_its_prefix(tmp_path):
    """timm:NAME and NAME are one timm backbone, unless NAME is a torchvision one: a run of timm:resnet18 is no
    run of resnet18 (torchvision's, another key layout), and is refused as another backbone."""
    pytest.importorskip("timm")
    run, trained = _run_of(tmp_path, "timm:test_resnet")
    backbone = create_backbone("test_resnet", weights=str(run))
    assert torch.equal(backbone.state_dict()["trunk.model.conv1.0.weight"],
                       trained.state_dict()["backbone.trunk.model.conv1.0.weight"])
    run, _ = _run_of(tmp_path / "r18", "timm:resnet18")
    with pytest.raises(FinescopeError, match="is a run of backbone 'timm:resnet18', not of model.backbone 'resnet18'"):
        create_backbone("resnet18", weights=str(run))


def test_weights_of_a_run_trained_with_depthwise_convolutions_without_cudnn(tmp_path):
    """train.cudnn_depthwise: false swaps the depthwise convolutions' classes in place; the run's state dict keys
    are the torchvision ones, and a new run (with cuDNN or without) starts from them."""
    run, trained = _run_of(tmp_path, "mobilenet_v2", depthwise_swapped=True)
    backbone = create_backbone("mobilenet_v2", weights=str(run / "checkpoints" / "best.pt"))
    old = {k.removeprefix("backbone."): v for k, v in trained.state_dict().items() if k.startswith("backbone.")}
    assert all(torch.equal(v, old[k]) for k, v in backbone.state_dict().items())


def test_weights_of_a_damaged_or_missing_run_checkpoint(tmp_path):
    run, _ = _run_of(tmp_path)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:2000])  # a copy cut short
    for given in (run, best):
        with pytest.raises(FinescopeError, match=f"model.weights file '{best}' could not be read.*damaged") as caught:
            create_backbone("tiny", weights=str(given))
        assert "\n" not in str(caught.value)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    best.unlink()
    with pytest.raises(FinescopeError, match="is a folder without a finescope run .*checkpoints/best.pt"):
        create_backbone("tiny", weights=str(run))


def test_weights_that_are_no_torch_file_are_one_line_that_ends_in_its_advice(tmp_path):
    """A text file given as model.weights cut torch.load's long first line at 120 characters, mid-word ('... in
    `torch.load` fr)'); the reason is now shortened at a word, marked, before the advice."""
    (tmp_path / "README.md").write_text("# not weights\n" * 50)
    with pytest.raises(FinescopeError) as caught:
        create_backbone("resnet18", weights=str(tmp_path / "README.md"))
    line = str(caught.value)
    reason = line.split(" could not be read as a state dict (", 1)[1].rsplit("): not written by torch.save", 1)[0]
    assert "\n" not in line and line.endswith("pass a file saved with torch.save(model.state_dict()), or a finescope run")
    assert len(reason) <= 160 and (reason.endswith(" …") or len(reason) < 120), reason  # cut after a word, marked


def test_torchvision_weights_round_trip(tmp_path):
    import torchvision

    full = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(full.conv1.weight, 0.5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "w.pth")
    backbone = create_backbone("resnet18", weights=str(tmp_path / "w.pth"))
    assert torch.all(backbone.trunk[0].weight == 0.5)
    assert backbone.num_features == 512


def test_reachable_answers_for_a_listening_and_a_closed_port(monkeypatch):
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert backbones.reachable(f"https://127.0.0.1:{port}/x.pth", timeout=2)
    assert not backbones.reachable(f"https://127.0.0.1:{port}/x.pth", timeout=2)  # closed now: refused
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert backbones.reachable(f"https://127.0.0.1:{port}/x.pth", timeout=2)  # a proxy decides


def _offline(monkeypatch, tmp_path):
    """No network as far as finescope can tell, and torch.hub's cache in ``tmp_path``."""
    monkeypatch.setattr(backbones, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_pretrained_torchvision_offline_fails_at_once_or_reads_its_cache(monkeypatch, tmp_path):
    from torchvision.models._api import WeightsEnum

    _offline(monkeypatch, tmp_path)
    real = WeightsEnum.get_state_dict
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(FinescopeError, match=r"download.pytorch.org cannot be reached.*model.weights=PATH"):
        create_backbone("mobilenet_v2", pretrained=True)
    weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not weights.is_file():
        pytest.skip("the shared MobileNetV2 weights are absent")
    # the shared (V1) weights where torch.hub would have cached the default (V2) ones, whose hash it does not check
    import torchvision

    url = torchvision.models.get_model_weights("mobilenet_v2").DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]).symlink_to(weights)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", real)
    backbone = create_backbone("mobilenet_v2", pretrained=True)
    assert torch.equal(backbone.trunk[0][0].weight, torch.load(weights)["features.0.0.weight"])


def test_pretrained_timm_offline_fails_at_once_or_reads_the_hub_cache(monkeypatch, tmp_path):
    timm = pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    safetensors = pytest.importorskip("safetensors.torch")
    _offline(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(FinescopeError, match="huggingface.co cannot be reached and huggingface_hub has not cached"):
        create_backbone("test_resnet.r160_in1k", pretrained=True)
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for about 45 s
    # the hub's cache layout: refs/main names the snapshot that holds the file
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(0)
    state = timm.create_model("test_resnet.r160_in1k").state_dict()
    safetensors.save_file(state, repo / "snapshots" / commit / "model.safetensors")
    backbone = create_backbone("test_resnet.r160_in1k", pretrained=True)
    assert all(torch.equal(v, state[k]) for k, v in backbone.trunk.model.state_dict().items())


# -- instance selection -------------------------------------------------------------------------------------
def _select(attn, size=(120, 160), k=3, **kw):
    h, w = attn.shape[-2:]
    sizes = torch.tensor([size])
    cell = torch.tensor([[size[0] / h, size[1] / w]])
    valid = torch.tensor([[h, w]])
    return select_boxes(attn[None], valid, sizes, cell, k, **kw)


def test_selection_boxes_cover_attended_components():
    attn = torch.zeros(6, 8)
    attn[1, 1] = 1.0  # strongest blob, top-left
    attn[4, 6] = 0.8  # second blob, bottom-right
    attn = attn / attn.sum()
    boxes, mass = _select(attn, k=2, min_box_fraction=0.2)
    (x1, y1, x2, y2), (u1, v1, u2, v2) = boxes[0].tolist()
    assert x1 <= 30 <= x2 and y1 <= 30 <= y2  # cell (1,1) centre = (30, 30) px
    assert u1 <= 130 <= u2 and v1 <= 90 <= v2  # cell (4,6) centre = (130, 90) px
    assert mass[0, 0] > mass[0, 1] > 0


def test_selection_grows_boxes_and_falls_back_to_peaks():
    attn = torch.zeros(6, 8)
    attn[2, 3] = 1.0
    boxes, _ = _select(attn, k=3, min_box_fraction=1 / 3)
    sides = torch.stack([boxes[0, :, 2] - boxes[0, :, 0], boxes[0, :, 3] - boxes[0, :, 1]], 1)
    assert (sides >= 40 - 1e-4).all()  # a third of the short side 120
    iou = box_iou(boxes[0], boxes[0])
    off_diagonal = iou[~torch.eye(3, dtype=torch.bool)]
    assert (off_diagonal <= 0.5 + 1e-6).all()  # peaks that overlap taken boxes are skipped


def test_selection_respects_padding():
    attn = torch.zeros(1, 6, 8)
    attn[0, 1, 1] = 1.0
    sizes = torch.tensor([[60, 80]])  # only 3x4 cells valid
    boxes, _ = select_boxes(attn, torch.tensor([[3, 4]]), sizes, torch.tensor([[20.0, 20.0]]), 4)
    assert (boxes[0, :, 2] <= 80).all() and (boxes[0, :, 3] <= 60).all()


def test_minmax_normalisation_ignores_a_flat_background():
    """A peak over a flat background at half its height: 'max' keeps everything, 'minmax' only the peak."""
    attn = torch.full((6, 6), 0.5)
    attn[4, 2] = 1.0
    attn = attn / attn.sum()
    whole, _ = _select(attn, size=(384, 384), k=1, min_box_fraction=0.25, normalise="max")
    focused, mass = _select(attn, size=(384, 384), k=1, min_box_fraction=0.25, normalise="minmax")
    assert (whole[0, 0, 2] - whole[0, 0, 0]) > 300  # one component over the whole image
    x1, y1, x2, y2 = focused[0, 0].tolist()
    assert x2 - x1 <= 130 and x1 <= 160 <= x2 and y1 <= 288 <= y2  # cell (4, 2) centre = (160, 288) px


@pytest.mark.parametrize("grid", [(1, 1), (3, 4)])
def test_a_flat_map_selects_the_whole_image_under_minmax_as_under_max(grid):
    """A flat map (a 1x1 feature map) has no maximum to prefer: min-max scaled it to 0 everywhere (or to its
    upsampling's rounding noise), no component, and the boxes fell to the top-left corner (or anywhere) holding
    none of the attention. It is scaled as 'max' scales it: one component, the whole image."""
    attn = torch.full(grid, 1.0 / (grid[0] * grid[1]))
    for padded in (False, True):
        boxes, mass = _select(attn, size=(60, 90), k=2, normalise="minmax", padded=padded)
        assert boxes[0, 0].tolist() == [0.0, 0.0, 90.0, 60.0]
        assert mass[0, 0].item() == pytest.approx(1.0)
    model = create_model(ModelConfig(**{**SMALL, "global_size": 16}), 2).eval()  # tiny: a 1x1 map
    with torch.no_grad():
        out = model(torch.rand(1, 3, 60, 60))
    assert out.attention.shape[1:] == (1, 1) and out.box_mass[0, 0].item() == pytest.approx(1.0)


def test_a_coarse_grid_can_join_what_every_pixel_keeps_apart():
    """The selection thresholds a grid of `upsample` points per cell, not every pixel as method.md does: a
    diagonal link between two points of the coarse grid crosses a saddle that the pixels keep below tau, and two
    components become one box (found in review; selection.py's docstring said the components were the same)."""
    attn = torch.tensor([[0.1, 0.72, 0.02], [1.0, 0.0, 0.54], [0.0, 0.02, 0.79]])
    kw = dict(size=(87, 102), k=1, threshold=0.5, normalise="max", min_box_fraction=0.01)
    coarse, _ = _select(attn / attn.sum(), upsample=4, components="grid", **kw)
    fine, _ = _select(attn / attn.sum(), upsample=64, components="grid", **kw)
    area = [float((b[0, 0, 2] - b[0, 0, 0]) * (b[0, 0, 3] - b[0, 0, 1])) for b in (coarse, fine)]
    assert area[0] > 2 * area[1]  # the coarse grid's first box spans two of the fine grid's components


def test_exact_components_keep_apart_what_every_pixel_keeps_apart():
    """``components="exact"`` finds the components of the bilinear map itself: on the coarse grid of 4 points the
    saddle map above gives one box over two components; exact, on the same grid of 4, gives the box that a grid
    as fine as the pixels gives, within a pixel."""
    attn = torch.tensor([[0.1, 0.72, 0.02], [1.0, 0.0, 0.54], [0.0, 0.02, 0.79]])
    kw = dict(size=(87, 102), k=1, threshold=0.5, normalise="max", min_box_fraction=0.01)
    exact, _ = _select(attn / attn.sum(), upsample=4, components="exact", **kw)
    fine, _ = _select(attn / attn.sum(), upsample=64, components="grid", **kw)
    torch.testing.assert_close(exact, fine, rtol=0, atol=1.0)


@pytest.mark.parametrize("saddle_above", [False, True])
def test_exact_components_join_diagonal_corners_when_the_saddle_is_above_tau(saddle_above):
    """Two diagonal cells above tau and two below: the bilinear patch between them joins them only when its
    saddle, (ad - bc) / (a + d - b - c), is at or above tau: (0.55 - 0.16) / 0.75 = 0.52 for b = c = 0.4, one
    component and one box over both; (0.55 - 0.01) / 1.35 = 0.4 for b = c = 0.1, two."""
    low = 0.4 if saddle_above else 0.1
    attn = torch.tensor([[1.0, low], [low, 0.55]])
    kw = dict(size=(80, 80), k=2, threshold=0.5, normalise="max", min_box_fraction=0.01)
    exact, _ = _select(attn, upsample=4, components="exact", **kw)
    fine, _ = _select(attn, upsample=40, components="grid", **kw)  # as fine as the pixels: 40 points per 40 px cell
    torch.testing.assert_close(exact[0, 0], fine[0, 0], rtol=0, atol=1.0)  # the first box: a component's
    x1, y1, x2, y2 = exact[0, 0].tolist()
    assert (x2 - x1 > 50 and y2 - y1 > 50) == saddle_above  # one box over both diagonal cells


def _random_maps(n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        h, w = torch.randint(2, 10, (2,), generator=g).tolist()
        attn = torch.rand(1, h, w, generator=g) ** 3
        attn[0, 0, 0] = 1.0  # the maximum in a corner, where the pixels reach it: both scale the map alike
        size = (h * int(torch.randint(12, 40, (1,), generator=g)), w * int(torch.randint(12, 40, (1,), generator=g)))
        yield attn, size


@pytest.mark.parametrize("normalise", ["max", "minmax"])
def test_exact_components_are_those_of_every_pixel(normalise):
    """On random maps (many components, saddles near tau), every component box of a grid as fine as the pixels
    is found by ``components="exact"`` on a grid of 4, each edge within a quarter of a cell (the pixels' centres
    miss the thin tip of a component); a grid of 4 itself misses some, joined across a saddle."""
    from finescope.models import selection

    found = {}
    real = (selection._component_boxes, selection._exact_components)

    def grid_boxes(*args):
        out = real[0](*args)
        found["grid"] = out[0][0, :, out[1][0] > 0].T
        return out

    def exact_boxes(*args):
        out = real[1](*args)
        found["exact"] = out[0][0, :, out[1][0] > 0].T
        return out

    missed = {4: 0, "exact": 0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "_component_boxes", grid_boxes)
        mp.setattr(selection, "_exact_components", exact_boxes)
        for attn, size in _random_maps(60, seed=7):
            h, w = attn.shape[-2:]
            kw = dict(size=size, k=h * w, threshold=0.5, normalise=normalise)
            cell = torch.tensor([size[1] / w, size[0] / h])
            tolerance = torch.cat([cell, cell]) / 4  # a quarter of a cell: the pixels' centres miss a thin tip
            _select(attn[0], upsample=max(size[0] // h, size[1] // w), components="grid", **kw)  # every pixel
            pixels = found["grid"]
            _select(attn[0], upsample=4, components="grid", **kw)
            _select(attn[0], upsample=4, components="exact", **kw)
            for name, boxes in ((4, found["grid"]), ("exact", found["exact"])):
                close = ((pixels[:, None] - boxes[None]).abs() <= tolerance).all(dim=2)  # (pixel boxes, boxes)
                missed[name] += int((~close.any(dim=1)).sum())
    assert missed["exact"] == 0 and missed[4] > 0


def test_exact_components_rank_by_the_mass_of_every_pixels_components():
    """An exact component's rank key is the mass of the grid of 4's points above tau that lie in it, as a grid of
    60 points per cell labels them (each 15th of its points is one of the grid of 4's): the same components
    hold the same mass, saddle squares split between their two sides included. Components too small to hold a
    point of the grid of 4 rank below every one that holds one."""
    from scipy import ndimage

    from finescope.models import selection

    real = selection._exact_components
    found = {}

    def exact_ranks(*args):
        out = real(*args)
        found["rank"] = out[1][0]
        return out

    checked = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "_exact_components", exact_ranks)
        for attn, size in _random_maps(60, seed=3):
            h, w = attn.shape[-2:]
            _select(attn[0], size=size, k=4 * h * w, threshold=0.5, normalise="max", upsample=4,
                    components="exact", min_box_fraction=0.01)
            fine = F.interpolate(attn[None], scale_factor=4, mode="bilinear")[0, 0]
            pixels = F.interpolate(attn[None], scale_factor=60, mode="bilinear")[0, 0] / fine.max()
            labels, n = ndimage.label((pixels >= 0.5).numpy())  # 4-connected
            above = (fine / fine.max() >= 0.5).numpy()
            mass = np.bincount(labels[7::15, 7::15][above], weights=fine.numpy()[above], minlength=n + 1)[1:]
            reference = np.sort(mass[mass > 0])
            ranks = np.sort(found["rank"].numpy())
            holding = ranks[ranks >= reference[0] * (1 - 1e-5)]
            np.testing.assert_allclose(holding, reference, rtol=1e-4)
            checked += int((mass > 0).sum() > 1)
    assert checked > 20  # most maps have several components


@pytest.mark.parametrize("normalise", ["max", "minmax"])
def test_peaks_on_the_cells_centres_are_those_of_every_pixel(normalise):
    """With no component (tau above the peak) every box is a fallback peak. The first is centred on the map's
    maximum, which a bilinear map has at a cell's centre (here an inner one: at the edge the map is flat from the
    centre outwards, and the first point of that plateau wins): with ``peaks="nodes"`` it is every pixel's first
    box to within a pixel; with ``peaks="grid"`` it sits on the grid point nearest that centre, an eighth of a
    cell away (5 px here). Later peaks sit where the suppression of the earlier ones allows, on either grid."""
    g = torch.Generator().manual_seed(0)
    off = {"nodes": 0.0, "grid": 0.0}
    for _ in range(20):
        h, w = torch.randint(3, 8, (2,), generator=g).tolist()
        attn = torch.rand(h, w, generator=g) + 0.1
        attn[torch.randint(1, h - 1, (), generator=g), torch.randint(1, w - 1, (), generator=g)] = 1.2
        kw = dict(size=(40 * h, 40 * w), k=2, threshold=1.5, normalise=normalise, min_box_fraction=0.2)
        pixels, _ = _select(attn / attn.sum(), upsample=40, peaks="grid", **kw)
        for peaks in off:
            boxes, _ = _select(attn / attn.sum(), upsample=4, peaks=peaks, **kw)
            off[peaks] = max(off[peaks], float((boxes[0, 0] - pixels[0, 0]).abs().max()))
    assert off["nodes"] <= 1.0 and off["grid"] >= 4.0


def test_exact_components_with_padding_and_fixed_rounds_match():
    """An image padded into a batch's larger grid selects what it selects alone, and the fixed labelling rounds
    of a CUDA graph (run here on the CPU) give the boxes of ``scipy``'s labelling."""
    from finescope.models import selection

    random, _ = _selection_cases()
    attn, valid, sizes, cell_px, k = random
    batched = select_boxes(attn, valid, sizes, cell_px, k, normalise="minmax", components="exact")
    for i in range(len(attn)):
        h, w = valid[i].tolist()
        alone = select_boxes(attn[i:i + 1, :h, :w], valid[i:i + 1], sizes[i:i + 1], cell_px[i:i + 1], k,
                             normalise="minmax", components="exact", padded=False)
        torch.testing.assert_close(batched[0][i], alone[0][0], rtol=0, atol=1e-4)
    options = (0.5, 1 / 3, 4, 0.5, "minmax", True, "exact")
    boxes, mass, converged = selection._select(*random, *options, graph_rounds=selection.GRAPH_ROUNDS)
    assert bool(converged)
    torch.testing.assert_close(boxes, batched[0], rtol=0, atol=0)
    torch.testing.assert_close(mass, batched[1], rtol=0, atol=0)


def test_exact_components_too_small_for_a_grid_point_rank_alike_in_a_padded_batch():
    """Components that hold no point of the grid of 4 rank by their nodes' attention: an image's own nodes, not the
    copies of its last column that a wider batch-mate's padding adds (they made the 0.93 node, in that column,
    rank before the 0.95 one; found in review)."""
    attn = torch.full((3, 4), 0.05)
    attn[0, 0], attn[2, 1], attn[1, 3] = 1.0, 0.95, 0.93  # the last two single nodes, too small for a grid point
    kw = dict(threshold=0.9, min_box_fraction=0.1, normalise="max", components="exact")
    cell = torch.tensor([[16.0, 16.0]])
    alone, _ = select_boxes(attn[None], torch.tensor([[3, 4]]), torch.tensor([[48, 64]]), cell, 3, padded=False, **kw)
    batch = torch.stack([F.pad(attn, (0, 2)), torch.rand(3, 6, generator=torch.Generator().manual_seed(0))])
    padded, _ = select_boxes(batch, torch.tensor([[3, 4], [3, 6]]), torch.tensor([[48, 64], [48, 96]]),
                             cell.expand(2, 2), 3, **kw)
    assert alone[0, 1, 1] > 32 > alone[0, 2, 1]  # the 0.95 node (row 2) second, the 0.93 one (row 1) third
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-4)


def test_exact_components_rank_by_their_mass_to_float_precision():
    """Two peaks of a 64x64 map, their masses 2e-6 apart relative to theirs (about 0.005): the larger ranks first,
    as on the grid (the rank was the mass plus 1, whose float32 kept about 1e-7 of it, and tied them; found in
    review)."""
    attn = torch.full((1, 64, 64), 0.3)
    attn[0, 10, 10], attn[0, 40, 40] = 1.0, 1.0 - 2e-6
    attn /= attn.sum()
    args = (torch.tensor([[64, 64]]), torch.tensor([[1024, 1024]]), torch.tensor([[16.0, 16.0]]), 2, 0.5, 0.01)
    for components in ("grid", "exact"):
        boxes, _ = select_boxes(attn, *args, components=components, padded=False)
        assert boxes[0, 0, 0] < 512 < boxes[0, 1, 0], components  # the peak at row and column 10 first


def test_exact_components_converge_within_the_graphs_rounds_on_noisy_maps():
    """An untrained model's noisy maps (benchmarks/selection_cost.py's: a softmax over uniform logits, 16 of 7x11):
    the fixed labelling rounds of a CUDA graph, and of torch.compile, converge on exact components as on the
    grid's. (8-connected, the doubled node grid of c665788 converged within 8 rounds on 2 of 60 such batches;
    78dbce7 labels it 4-connected along runs. Test from review.)"""
    from finescope.models import selection

    for seed in range(1, 11):
        attn = torch.rand(16, 77, generator=torch.Generator().manual_seed(seed)).softmax(dim=1).view(16, 7, 11)
        args = (attn, torch.tensor([[7, 11]] * 16), torch.tensor([[460, 700]] * 16),
                torch.tensor([[460 / 7, 700 / 11]] * 16), 4, 0.5, 1 / 3, 4, 0.5, "minmax", False)
        for components in ("grid", "exact"):
            boxes, _, converged = selection._select(*args, components, graph_rounds=selection.GRAPH_ROUNDS)
            assert bool(converged), (seed, components)
            torch.testing.assert_close(boxes, select_boxes(*args, components=components)[0], rtol=0, atol=0)


def test_selection_upsample_is_the_grid_the_model_selects_on(monkeypatch):
    import finescope.models.network as network

    asked, real = [], network.select_boxes_deferred
    monkeypatch.setattr(network, "select_boxes_deferred",
                        lambda *a, **k: asked.append((k["upsample"], k["components"])) or real(*a, **k))
    with torch.no_grad():
        _crop_model(selection_upsample=16, selection_components="grid")(torch.rand(2, 3, 64, 64))
        _crop_model()(torch.rand(2, 3, 64, 64))
    assert asked == [(16, "grid"), (4, "exact")]
    from finescope.config import load_config

    with pytest.raises(FinescopeError, match="'model.selection_upsample' must be at least 1"):
        load_config(None, ["model.selection_upsample=0"])


def test_peak_iou_zero_spreads_fallback_boxes():
    """With peak_iou=0 the fallback boxes never overlap any box already taken."""
    attn = torch.zeros(6, 8)
    attn[2, 3] = 1.0
    attn[2, 4] = 0.9
    boxes, _ = _select(attn, k=4, min_box_fraction=0.2, iou_threshold=0.0)
    iou = box_iou(boxes[0], boxes[0])
    assert (iou[~torch.eye(4, dtype=torch.bool)] <= 1e-6).all()


def test_peak_iou_is_a_validated_config_key():
    from finescope.config import load_config

    assert load_config(None, ["model.peak_iou=0"]).model.peak_iou == 0.0
    with pytest.raises(FinescopeError, match="model.peak_iou"):
        load_config(None, ["model.peak_iou=2"])


def _crop_model(**kw):
    cfg = {**SMALL, "local_size": 32, "min_box_fraction": 1 / 3, **kw}
    return create_model(ModelConfig(variant="fusion", **cfg), 2).eval()


def test_crop_scale_keeps_the_smallest_box_at_crop_resolution():
    model = _crop_model()
    assert model.crop_scale(90, 120) == 1.0  # boxes of >= 30 px for 32-px crops: no resize
    assert model.crop_scale(300, 400) == pytest.approx(32 / 100)  # a 100-px box becomes 32 px
    assert _crop_model(local_size=224).crop_scale(460, 700) == 1.0  # BreakHis: crops read the image itself


def test_resized_crop_source_is_aligned_with_the_image():
    """On a linear ramp (which every symmetric filter keeps) crops cut from the resized source equal crops cut
    from the image itself: the boxes are scaled to the source without any offset."""
    model = _crop_model()
    yy, xx = torch.meshgrid(torch.arange(300.0), torch.arange(400.0), indexing="ij")
    image = torch.stack([xx / 400, yy / 300, (xx + yy) / 700])[None]
    boxes = torch.tensor([[[20.0, 30.0, 120.0, 130.0], [150.0, 40.0, 380.0, 280.0]]])  # away from the borders
    resized = model._crops(image, boxes)
    model.min_box_fraction = 1.0  # scale 1: roi_align on the image itself, with its adaptive sampling
    full = model._crops(image, boxes)
    assert resized.shape == full.shape == (2, 3, 32, 32)
    assert (resized - full).abs().max() < 2e-3


def test_a_cpu_forward_starts_no_thread():
    """Nothing runs torch on a thread of its own: with GNU OpenMP such a thread gets a team of its own, and
    with more OpenMP threads than cores every later parallel operation of the process slowed down, mobilenet_v2
    passes 1.5-2.1x (benchmarks/openmp_cost.py). The process's threads, Python's and the OS's, are the same
    after a forward."""
    model = create_model(ModelConfig(variant="fusion", **SMALL), 2).eval()
    images = torch.rand(2, 3, 300, 420)  # crops from a resized source, boxes with several sample rows per bin

    def os_threads() -> int:
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:  # no /proc: Python's threads only
            return 0

    with torch.no_grad():
        torch.rand(4_000_000).sum()  # a parallel operation: the main thread's OpenMP team exists from here on
        python, native = threading.active_count(), os_threads()
        model(images)
        model(images)
    assert (threading.active_count(), os_threads()) == (python, native)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "channels_last"])
def test_crop_align_separable_crops_match_roi_align(threads, layout, monkeypatch):
    """Boxes that are not shifts are cut as two embedding_bag passes (one call for all of them): the crops, back
    in the boxes' order, are roi_align's to float rounding, for 1 to 5 samples per bin, boxes partly or wholly
    outside the image, boxes ending on its last row and column, boxes of no size or negative size (roi_align
    reads nothing), boxes reading the whole width, more than half of it (whole rows, in place) and less (a
    copy), two images, a source that is a slice of a padded batch and a channels-last one."""
    from torchvision.ops import roi_align

    import finescope.models.align as align

    calls = []
    separable = align._separable_crops
    monkeypatch.setattr(align, "_separable_crops", lambda src, r, *a: calls.append(r) or separable(src, r, *a))
    g = torch.Generator().manual_seed(1)
    full = torch.rand(2, 3, 200 if layout == "padded" else 160, 260 if layout == "padded" else 230, generator=g)
    source = full[:, :, :160, :230]
    if layout == "channels_last":
        source = source.contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 0.0, 0.0, 230.0, 160.0], [1, 10.3, 20.7, 61.9, 70.2], [1, 100.5, 3.25, 229.0, 150.0],
                         [0, 0.0, 90.0, 40.0, 160.0], [0, 50.0, 50.0, 51.0, 52.0], [1, -20.0, -30.0, 250.0, 200.0],
                         [0, -5.0, 100.0, 100.0, 171.0], [1, 3.0, -40.0, 60.0, -2.5], [0, 7.5, 60.0, 200.0, 124.0],
                         [1, 20.5, 128.5, 52.5, 160.5], [0, 197.7, 127.5, 230.0, 159.5], [0, 50.0, 50.0, 40.0, 45.0],
                         [1, 50.0, 50.0, 50.0, 50.0], [0, 229.9, 159.9, 300.0, 400.0], [0, 0.0, 0.0, 32.0, 32.0]])
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        cut = align.crop_align(source, rois, 32)
    finally:
        torch.set_num_threads(threads_before)
    one = roi_align(source.contiguous(), rois, output_size=(32, 32), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    assert len(calls) == 1 and torch.equal(calls[0], rois[:-1])  # the last box is a shift
    torch.testing.assert_close(cut, one, rtol=0, atol=1e-5)
    assert one[7].abs().max() == 0 and one[11].abs().max() == 0  # above the image, negative size: nothing read


@pytest.mark.parametrize("padded", [False, True])
def test_crop_align_cuts_unit_boxes_as_shifts(padded, monkeypatch):
    """Boxes whose bins are exactly one source pixel (one sample each, inside the source) are cut as shifts of
    the source: roi_align's crops to float rounding, in the boxes' order among boxes cut the other two ways, for
    whole and fractional offsets and two images. A box one float step taller takes two sample rows per bin in
    roi_align, and one whose last sample falls between the source's last row and the next reads that row alone:
    neither is a shift. One ending on the last row with whole-pixel samples is."""
    from torchvision.ops import roi_align

    import finescope.models.align as align

    shifted = []
    unit_crops = align._unit_crops
    monkeypatch.setattr(align, "_unit_crops", lambda src, r, *a: shifted.append(r) or unit_crops(src, r, *a))
    g = torch.Generator().manual_seed(2)
    full = torch.rand(2, 3, 140 if padded else 100, 150 if padded else 120, generator=g)
    source = full[:, :, :100, :120]
    unit = [[0, 0.0, 0.0, 32.0, 32.0], [1, 10.25, 40.75, 42.25, 72.75], [0, 87.0, 3.5, 119.0, 35.5],
            [1, 55.6, 66.9, 87.6, 98.9], [1, 20.0, 68.0, 52.0, 100.0]]
    taller = [0, 5.0, 5.0, 37.0, torch.tensor(37.0).nextafter(torch.tensor(99.0)).item()]
    last_row = [1, 20.5, 68.5, 52.5, 100.5]
    rois = torch.tensor([unit[0], [0, 0.0, 0.0, 120.0, 100.0], unit[1], taller, unit[2], last_row, unit[3],
                         [1, 30.0, 10.0, 40.0, 20.0], unit[4]])
    cut = align.crop_align(source, rois, 32)
    one = roi_align(source.contiguous(), rois, output_size=(32, 32), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    assert len(shifted) == 1 and torch.equal(shifted[0], torch.tensor(unit))
    torch.testing.assert_close(cut, one, rtol=0, atol=1e-6)
    torch.testing.assert_close(align.crop_align(source, torch.tensor(unit), 32), one[[0, 2, 4, 6, 8]], rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("size", [(300, 420), (324, 432), (347, 463), (400, 400)])
def test_smallest_boxes_are_read_at_one_sample_per_bin(size, monkeypatch):
    """Boxes of the smallest side span exactly L pixels of the crop source once snapped, whatever the rounding
    of the source's size and of their scaled coordinates: one sample per bin in roi_align (without the snap,
    rounding gives some of them two), cut on the CPU as shifts, with roi_align's crops of the snapped boxes.
    Larger boxes are left as they are."""
    from torchvision.ops import roi_align

    import finescope.models.align as align

    model = _crop_model()
    h, w = size
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, h, w, generator=g)
    side = model.min_box_fraction * min(h, w)
    lo = torch.rand(2, 6, 2, generator=g) * torch.tensor([w - side, h - side])
    boxes = torch.cat([lo, lo + side], dim=-1)  # (2, 6, 4), x1 y1 x2 y2 as the selection grows them
    boxes[1, 5] = torch.tensor([0.0, 0.0, w / 2, h / 2])  # a larger box
    sources = model._crop_sources(images, [[h, w]] * 2)
    (_, source), = sources.values()
    scale = torch.tensor([source.shape[-1] / w, source.shape[-2] / h] * 2)
    rois = torch.cat([torch.arange(2.0).repeat_interleave(6)[:, None], (boxes * scale).reshape(12, 4)], dim=1)
    snapped = align.snap_boxes(rois, 32)
    smallest = torch.arange(12) != 11
    assert (align._grid(snapped[smallest, 2], snapped[smallest, 4], 32) == 1).all()
    assert (align._grid(snapped[smallest, 1], snapped[smallest, 3], 32) == 1).all()
    assert ((snapped[smallest, 3:] - snapped[smallest, 1:3]) == 32).all() and torch.equal(snapped[11], rois[11])
    assert (snapped[:, 1:3] - rois[:, 1:3]).abs().max() <= 1 / 128  # starts to 1/64 pixel
    assert (snapped[:, 3:] - rois[:, 3:]).abs().max() < 0.5
    shifted = []
    unit_crops = align._unit_crops
    monkeypatch.setattr(align, "_unit_crops", lambda src, r, *a: shifted.append(r) or unit_crops(src, r, *a))
    crops = model._crops(images, boxes, [[h, w]] * 2, sources)
    assert len(shifted) == 1 and len(shifted[0]) == int(smallest.sum())
    one = roi_align(source, snapped, output_size=(32, 32), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(crops, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sizes", [(1536, 672), (2048, 896), (700, 341), (460, 224), (100, 160), (1537, 671),
                                   (896, 299), (7, 3)])
def test_aa_taps_are_atens_own_weights(sizes):
    """The taps resize_aa uses are the weights of ATen's antialiased bilinear resize to the bit: the resize of
    an identity matrix along one axis is its weight matrix."""
    from finescope.models.resize import aa_taps

    n, m = sizes
    aten = F.interpolate(torch.eye(n)[None, None], size=(m, n), mode="bilinear", antialias=True)[0, 0]  # (m, n)
    index, weight = aa_taps(n, m)
    mine = torch.zeros(m, n).scatter_add_(1, index, weight)
    torch.testing.assert_close(mine, aten, rtol=0, atol=0)


def _slice_of_padded(batch: int, hw: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(batch + 1, 3, hw[0] + 13, hw[1] + 21, generator=g)[1:, :, :hw[0], :hw[1]]


@pytest.mark.parametrize("case", ["batch", "padded slice", "channels-last", "rows only", "columns only",
                                  "upscale", "autocast"])
def test_resize_aa_is_interpolate(case, monkeypatch):
    """resize_aa is F.interpolate(bilinear, antialias) to float rounding: rows first by embedding_bag wherever
    fewer rows come out than go in (a slice of a padded batch read in place), ATen alone otherwise."""
    import finescope.models.resize as resize

    bags, embedding_bag = [], F.embedding_bag
    monkeypatch.setattr(resize.F, "embedding_bag", lambda *a, **k: bags.append(1) or embedding_bag(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, size, rows_first = {
        "batch": (torch.rand(3, 3, 90, 140, generator=g), (40, 61), True),
        "padded slice": (_slice_of_padded(2, (90, 140)), (40, 61), True),
        "channels-last": (torch.rand(2, 3, 90, 140, generator=g).contiguous(memory_format=torch.channels_last),
                          (40, 61), True),
        "rows only": (torch.rand(2, 3, 90, 140, generator=g), (40, 140), True),
        "columns only": (torch.rand(2, 3, 90, 140, generator=g), (90, 61), False),
        "upscale": (torch.rand(2, 3, 30, 40, generator=g), (45, 20), False),
        "autocast": (torch.rand(2, 3, 90, 140, generator=g), (40, 61), True),
    }[case]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = resize.resize_aa(x, size)
    ref = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert bool(bags) == rows_first


def test_resize_aa_keeps_the_gradient():
    """An input that needs a gradient is resized by ATen, whose backward it keeps."""
    from finescope.models.resize import resize_aa

    x = torch.rand(1, 3, 40, 50, requires_grad=True)
    resize_aa(x, (20, 25)).sum().backward()
    y = x.detach().clone().requires_grad_()
    F.interpolate(y, size=(20, 25), mode="bilinear", antialias=True).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_crops_do_not_depend_on_the_batch():
    """An image's crops are the same alone and in a padded batch of other sizes (and other pooling factors)."""
    torch.manual_seed(0)
    model = _crop_model()
    a, b = torch.rand(3, 300, 400), torch.rand(3, 200, 260)
    box_a = torch.tensor([[5.0, 7.0, 205.0, 180.0], [100.0, 100.0, 300.0, 300.0]])
    box_b = torch.tensor([[0.0, 0.0, 80.0, 70.0], [180.0, 130.0, 260.0, 200.0]])
    batch = torch.zeros(2, 3, 300, 400)
    batch[0], batch[1, :, :200, :260] = a, b
    together = model._crops(batch, torch.stack([box_a, box_b]), [[300, 400], [200, 260]])
    torch.testing.assert_close(together[:2], model._crops(a[None], box_a[None]))
    torch.testing.assert_close(together[2:], model._crops(b[None], box_b[None]))


def test_global_view_of_a_mixed_batch_matches_each_image_alone():
    torch.manual_seed(0)
    model = _crop_model()
    imgs = [torch.rand(3, 120, 160), torch.rand(3, 100, 150), torch.rand(3, 120, 160)]
    batch = torch.zeros(3, 3, 120, 160)
    for i, im in enumerate(imgs):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    view, dims = model._global_view(batch, [list(im.shape[1:]) for im in imgs])
    for i, im in enumerate(imgs):
        alone, d = model._global_view(im[None], [list(im.shape[1:])])
        gh, gw = d[0]
        assert dims[i] == [gh, gw]
        torch.testing.assert_close(view[i, :, :gh, :gw], alone[0])
        assert view[i, :, gh:].abs().sum() == 0 and view[i, :, :, gw:].abs().sum() == 0


def test_hires_view_pads_with_the_mean_colour_as_the_resized_views_do():
    """``global-hires`` reads the images themselves: their zero (black) padding becomes 0 after normalisation, the
    mean colour, as in the other variants' views and as a convolution pads an image alone (it was the normalised
    black, -2.1 to -1.8, which the valid cells beside it read)."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="global-hires", **SMALL), 2).eval()
    imgs = [torch.rand(3, 120, 160), torch.rand(3, 100, 150)]
    batch = torch.zeros(2, 3, 120, 160)
    for i, im in enumerate(imgs):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    view, dims = model._global_view(batch, [list(im.shape[1:]) for im in imgs])
    assert dims == [[120, 160], [100, 150]]
    for i, im in enumerate(imgs):
        alone, _ = model._global_view(im[None], [list(im.shape[1:])])
        torch.testing.assert_close(view[i, :, :100 + 20 * (i == 0), :150 + 10 * (i == 0)], alone[0])
    assert view[1, :, 100:].abs().sum() == 0 and view[1, :, :, 150:].abs().sum() == 0


def test_global_hires_reads_an_image_thinner_than_a_cell_of_a_flooring_backbone():
    """A patchifying stem (ConvNeXt's: 4x4 patches, 32 px cells) gives no cell to an image side shorter than a
    cell, and global-hires feeds the image itself: an image of 16 px alone (predict, train.eval_batch_size=1)
    was torch's 'Kernel size can't be greater than actual input size'. Its view is padded to a cell with the
    mean colour, as a batch with a larger image pads it, and it gets the same logits as there."""
    from torch import nn

    from finescope.models.backbones import Backbone

    def patchify(*_):
        return Backbone(nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU()), 8, "patch4")

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="global-hires", backbone="tiny"), 2, backbone_factory=patchify).eval()
    assert (model.backbone.stride, model.backbone.ceil) == (4, False)
    thin, big = torch.rand(3, 3, 40), torch.rand(3, 9, 40)
    batch = torch.zeros(2, 3, 9, 40)
    batch[0, :, :3], batch[1] = thin, big
    with torch.no_grad():
        alone = model(thin[None]).logits
        mixed = model(batch, torch.tensor([[3, 40], [9, 40]])).logits
    torch.testing.assert_close(alone[0], mixed[0])


def test_large_view_is_resized_from_the_crop_source():
    """A model with crops resizes the view of a large image from its crop source (made for the crops anyway),
    in a mixed batch too; small images, and sources under twice the view, are resized from the image."""
    torch.manual_seed(0)
    model = _crop_model(global_size=32, local_size=48)  # 300x400: source 144x192 (scale 0.48), view 32x43
    assert model.view_from_source(300, 400)
    assert not model.view_from_source(90, 120)  # no source: boxes already fit the crops
    assert not model.view_from_source(200, 260)  # source 144x187: more than half the image, little to save
    assert not _crop_model(global_size=64, local_size=32).view_from_source(300, 400)  # source 96 < 2 x 64
    big, small = torch.rand(3, 300, 400), torch.rand(3, 90, 120)
    batch = torch.zeros(2, 3, 300, 400)
    batch[0], batch[1, :, :90, :120] = big, small
    sizes = [[300, 400], [90, 120]]
    view, dims = model._global_view(batch, sizes, model._crop_sources(batch, sizes))
    assert dims == [[32, 43], [32, 43]]

    def resize(x, hw):
        return F.interpolate(x[None], size=hw, mode="bilinear", antialias=True)

    two_step = model._normalise(resize(resize(big, (144, 192))[0], (32, 43)))[0]
    torch.testing.assert_close(view[0], two_step)
    torch.testing.assert_close(view[1], model._normalise(resize(small, (32, 43)))[0])
    direct = model._normalise(resize(big, (32, 43)))[0]
    assert 0 < (view[0] - direct).abs().max() < 0.05 / min(IMAGENET_STD)  # a few grey levels before normalising


def test_view_does_not_depend_on_whether_the_crops_are_read():
    """Stage-wise training skips the crops, but the backbone must see the same view of a large image as when
    the crops are read (that view comes from the crop source)."""
    torch.manual_seed(0)
    model = _crop_model(global_size=32, local_size=48)
    images, sizes = torch.rand(2, 3, 300, 400), torch.tensor([[300, 400]] * 2)
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    model.eval()
    model(images, sizes)
    model.train()
    model.crops_active = False
    model(images, sizes)
    assert len(seen) == 3  # view, crops; then the view alone
    torch.testing.assert_close(seen[2], seen[0])


def test_loss_scaling_step_matches_an_unscaled_step():
    """The fp16 path (scale, unscale, clip, step, update) takes the same step as plain fp32 when nothing
    overflows; the CPU runs it in fp32 with a CPU GradScaler (finescope's CPU autocast is bf16 only)."""
    from finescope.data.dataset import Batch
    from finescope.engine import train_one_epoch

    torch.manual_seed(0)
    batch = Batch(torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), torch.tensor([[96, 128]] * 2),
                  torch.tensor([0, 1]), torch.arange(2))
    params = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(1)
        model = create_model(ModelConfig(variant="fusion", **SMALL), 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # unlike Adam, SGD sees a wrongly scaled gradient
        train_one_epoch(model, [batch], opt, None, torch.device("cpu"), grad_clip=0.5, progress=False,
                        scaler=scaler)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        if scaler is not None:
            assert scaler.get_scale() == 1024.0  # no overflow: the scale stays until growth_interval steps
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-6)


def test_an_epoch_reports_non_finite_weights_and_a_step_the_loss_scaler_skipped_leaves_none():
    """A NaN loss in fp32 makes the weights NaN, which the epoch reports (``diverged``, read with the
    statistics: no sync per step); with loss scaling (fp16 on CUDA; a CPU GradScaler here) the step is skipped
    and the weights stay finite and unchanged: nothing to report."""
    from finescope.data.dataset import Batch
    from finescope.engine import diverged_tensors, train_one_epoch

    batch = Batch(torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), torch.tensor([[96, 128]] * 2),
                  torch.tensor([0, 1]), torch.arange(2))
    for scaler, expect_bad in ((None, True), (torch.amp.GradScaler("cpu", init_scale=1024.0), False)):
        torch.manual_seed(0)
        model = create_model(ModelConfig(variant="fusion", **SMALL), 2)
        assert int(diverged_tensors(model)) == 0
        model.register_forward_hook(lambda module, args, out: replace(out, logits=out.logits + float("nan")))
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        stats = train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), None,
                                torch.device("cpu"), progress=False, scaler=scaler)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert math.isnan(stats["loss"])
        assert (stats["diverged"] > 0) == expect_bad == (int(diverged_tensors(model)) > 0)
        if not expect_bad:
            assert torch.equal(after, before) and scaler.get_scale() == 512.0  # skipped; the scale backs off


@pytest.mark.parametrize("value", [1e30, -1e9, 1e5])
def test_an_epoch_reports_huge_finite_weights(value):
    """A weight of 1e30 after an exploding step is finite: the epoch reported nothing (its loss was 2e29) and the
    run saved it. Beyond 1e8 it is reported; under fp16 autocast, whose largest value is 65504 (a weight of 1e5
    is inf there, and every step NaN), beyond 6e4, and the error names the tensor."""
    from finescope.data.dataset import Batch
    from finescope.engine import (
        FP16_WEIGHT_BOUND,
        diverged_tensors,
        first_diverged,
        train_one_epoch,
        weight_bound,
    )

    batch = Batch(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([[64, 64]] * 2),
                  torch.tensor([0, 1]), torch.arange(2))
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="global", backbone="tiny", global_size=32, local_size=32), 2)
    with torch.no_grad():
        model.global_head.weight[0, 0] = value  # a head weight: no BatchNorm after it turns it into inf
    stats = train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0), None, torch.device("cpu"),
                            progress=False)
    assert math.isfinite(stats["loss"])
    assert stats["diverged"] == (abs(value) > 1e8) == (first_diverged(model) is not None)
    assert weight_bound(torch.device("cuda"), "fp16") == FP16_WEIGHT_BOUND < 65504
    assert weight_bound(torch.device("cuda"), "bf16") == weight_bound(torch.device("cpu"), "fp16") == 1e8
    assert int(diverged_tensors(model, FP16_WEIGHT_BOUND)) == 1
    assert first_diverged(model, FP16_WEIGHT_BOUND) == ("global_head.weight", pytest.approx(abs(value), rel=1e-6))


def test_real_weights_stay_far_below_the_divergence_bounds():
    """The ImageNet MobileNetV2 (weights and BatchNorm running statistics) is nowhere near either bound."""
    from finescope.engine import FP16_WEIGHT_BOUND, diverged_tensors

    weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not weights.is_file():
        pytest.skip("the shared MobileNetV2 weights are absent")
    state = torch.load(weights, weights_only=True)
    largest = max(float(t.abs().max()) for t in state.values() if t.is_floating_point())
    assert largest < 10 < FP16_WEIGHT_BOUND / 1000
    module = torch.nn.Module()
    for i, t in enumerate(state.values()):
        module.register_buffer(f"t{i}", t)
    module.w = torch.nn.Parameter(state["features.0.0.weight"])
    assert int(diverged_tensors(module, FP16_WEIGHT_BOUND)) == 0


def test_cpu_bf16_autocast_trains_and_predicts_in_bf16():
    """``cpu_amp="bf16"`` runs the convolutions in bf16 on the CPU (``train.cpu_amp``); the default stays fp32,
    also when ``amp`` (the CUDA setting) is bf16. The weights stay fp32 and a training step moves them."""
    from finescope.data.dataset import Batch
    from finescope.engine import autocast, predict_loader, train_one_epoch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert conv(x).dtype == torch.float32
    with autocast(cpu, "off", cpu_amp="bf16"):
        assert conv(x).dtype == torch.bfloat16
    batch = Batch(torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), torch.tensor([[96, 128]] * 2),
                  torch.tensor([0, 1]), torch.arange(2))
    model = create_model(ModelConfig(variant="fusion", **SMALL), 2)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    stats = train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), None, cpu,
                            cpu_amp="bf16", progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert math.isfinite(stats["loss"]) and after.dtype == torch.float32 and not torch.equal(after, before)
    preds = predict_loader(model, [batch], cpu, cpu_amp="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    assert preds.probs.dtype == np.float32 and np.allclose(preds.probs.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "mobilenet_v2"])
def test_folding_batchnorm_keeps_the_predictions_and_the_module_names(backbone):
    """Every BatchNorm of the trunk folds into its convolution (non-trivial running statistics), the outputs
    agree to float rounding, every module keeps its name (the BatchNorms become Identity), and the folded
    model refuses to train."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone=backbone, global_size=64, local_size=32,
                                     num_crops=2), 2)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.2, 0.2)
    model = model.eval().to(memory_format=torch.channels_last)
    images, sizes = torch.rand(2, 3, 96, 128), torch.tensor([[96, 128], [80, 128]])
    names = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        before = model(images, sizes)
        assert model.fold_batchnorm() == len(bns) > 0
        after = model(images, sizes)
    assert [n for n, _ in model.named_modules()] == names
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    torch.testing.assert_close(after.boxes, before.boxes)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(FinescopeError, match="folded"):
        model.train()
    model.eval()  # inference stays allowed


@pytest.mark.parametrize("amp", [False, True])
def test_depthwise_without_cudnn_computes_what_the_convolution_does(amp):
    """train.cudnn_depthwise=false: the depthwise convolutions (not the others) run through their own forward
    and backward, with the outputs and gradients of nn.Conv2d, in autocast's precision, and the same state dict."""
    import copy

    from finescope.models.backbones import DepthwiseConv2dWithoutCudnn, depthwise_without_cudnn

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
                              torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.Conv2d(8, 4, 1),
                              torch.nn.Conv2d(4, 4, 3, padding=1, groups=2))  # grouped, not depthwise
    twin = copy.deepcopy(net)
    assert depthwise_without_cudnn(twin) == 2
    assert [type(m) is DepthwiseConv2dWithoutCudnn for m in twin] == [False, True, True, False, False]
    assert twin.state_dict().keys() == net.state_dict().keys()
    assert type(copy.deepcopy(twin)[1]) is DepthwiseConv2dWithoutCudnn  # EMA copies, fold_batchnorm's copies
    x = torch.randn(2, 3, 16, 20, requires_grad=True)
    results = []
    for model in (net, twin):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().sum().backward()
        results.append([out.float(), x.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,kernel", [("same", 3), ("same", 4), ("valid", 3)])
def test_depthwise_without_cudnn_takes_padding_by_name(padding, kernel):
    """A depthwise convolution with ``padding='same'`` or ``'valid'`` (timm's ConvMixer has 'same'): its backward
    took the name where it needs pixels, and a training step with train.cudnn_depthwise=false raised torch's
    RuntimeError. The outputs and gradients are nn.Conv2d's, the odd pixel of an even kernel's 'same' included."""
    import copy

    from finescope.models.backbones import depthwise_without_cudnn

    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, kernel, padding=padding, groups=4)
    twin = copy.deepcopy(net)
    assert depthwise_without_cudnn(twin) == 1
    x = torch.randn(2, 4, 9, 11, requires_grad=True)
    results = []
    for model in (net, twin):
        x.grad = None
        out = model(x)
        out.square().sum().backward()
        results.append([out, x.grad, model.weight.grad, model.bias.grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 4, 5])
def test_depthwise_without_cudnn_reaches_timm_conv2d_same(stride, kernel):
    """timm's Conv2dSame (tf_efficientnet's strided depthwise convolutions) pads 'same' in its own forward for
    each input size: the swap passed it by and it stayed with cuDNN. Now it is swapped too, and on odd and even
    sizes it gives Conv2dSame's outputs and gradients with the same state dict."""
    import copy

    pytest.importorskip("timm")
    from timm.layers import Conv2dSame

    from finescope.models.backbones import DepthwiseConv2dWithoutCudnn, depthwise_without_cudnn

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv2dSame(4, 4, kernel, stride=stride, groups=4),
                              Conv2dSame(4, 4, 3, stride=stride, groups=2))  # grouped, not depthwise
    twin = copy.deepcopy(net)
    assert depthwise_without_cudnn(twin) == 1
    assert isinstance(twin[0], DepthwiseConv2dWithoutCudnn) and type(twin[1]) is Conv2dSame
    assert twin.state_dict().keys() == net.state_dict().keys()
    twin.load_state_dict(net.state_dict())  # checkpoints load either way
    assert type(copy.deepcopy(twin)[0]) is type(twin[0])
    for size in [(9, 11), (10, 12), (7, 8)]:
        x = torch.randn(2, 4, *size, requires_grad=True)
        results = []
        for model in (net, twin):
            x.grad = None
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            results.append([out, x.grad, *(p.grad for p in model.parameters())])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("stride,padding", [(1, ""), (2, ""), (2, "same")])  # "same" strided: timm pads per size
def test_depthwise_without_cudnn_reaches_timm_cond_conv2d(stride, padding):
    """timm's CondConv2d (efficientnet_cc's per-image mixture of expert kernels) runs its depthwise convolution
    as one of a group per image and channel: the swap passed it by and it stayed with cuDNN. Now the depthwise
    one is swapped (a grouped one is not), and on odd and even sizes it gives CondConv2d's outputs and gradients,
    the routing weights' too, with the same state dict."""
    import copy

    pytest.importorskip("timm")
    from timm.layers import CondConv2d

    from finescope.models.backbones import DepthwiseCondConv2dWithoutCudnn, depthwise_without_cudnn

    torch.manual_seed(0)
    net = torch.nn.ModuleList([CondConv2d(4, 4, 3, stride, padding, groups=4, bias=True, num_experts=3),
                               CondConv2d(4, 4, 3, stride, padding, groups=2, num_experts=3)])  # not depthwise
    twin = copy.deepcopy(net)
    assert depthwise_without_cudnn(twin) == 1
    assert type(twin[0]) is DepthwiseCondConv2dWithoutCudnn and type(twin[1]) is CondConv2d
    assert twin.state_dict().keys() == net.state_dict().keys()
    twin.load_state_dict(net.state_dict())  # checkpoints load either way
    assert type(copy.deepcopy(twin)[0]) is type(twin[0])
    for size in [(9, 11), (10, 12)]:
        x = torch.randn(3, 4, *size, requires_grad=True)  # (B, C, H, W)
        routing = torch.rand(3, 3, requires_grad=True)  # (B, experts)
        results = []
        for model in (net, twin):
            x.grad = routing.grad = None
            model.zero_grad()
            out = model[0](x, routing)
            out.square().sum().backward()
            results.append([out, x.grad, routing.grad, *(p.grad for p in model[0].parameters())])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a)


def test_efficientnet_cc_runs_every_depthwise_convolution_without_cudnn_and_folds():
    """efficientnet_cc_b0_4e as finescope builds it (pretrained=False): all 16 depthwise convolutions are
    swapped (8 of them CondConv2d), the features are those of the model as built, and the 25 BatchNorms that
    read a plain convolution still fold (fold_batchnorm's trace does not enter the swapped CondConv2d)."""
    import copy

    pytest.importorskip("timm")
    from finescope.models.backbones import (
        DepthwiseCondConv2dWithoutCudnn,
        create_backbone,
        depthwise_without_cudnn,
        fold_batchnorm,
    )

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_cc_b0_4e").eval()
    twin = copy.deepcopy(backbone)
    x = torch.rand(2, 3, 45, 62)
    with torch.no_grad():
        before = backbone(x)
        assert depthwise_without_cudnn(twin) == 16
        assert sum(isinstance(m, DepthwiseCondConv2dWithoutCudnn) for m in twin.modules()) == 8
        torch.testing.assert_close(twin(x), before)
        assert fold_batchnorm(twin) == fold_batchnorm(backbone) == 25
        torch.testing.assert_close(twin(x), before)


def test_depthwise_without_cudnn_leaves_timm_convolutions_that_transform_their_weight():
    """timm's weight-standardised convolutions with 'same' padding (nfnet's) are no Conv2dSame: left as they are."""
    pytest.importorskip("timm")
    from timm.layers import ScaledStdConv2dSame, StdConv2dSame

    from finescope.models.backbones import depthwise_without_cudnn

    net = torch.nn.Sequential(StdConv2dSame(4, 4, 3, stride=2, groups=4),
                              ScaledStdConv2dSame(4, 4, 3, stride=2, groups=4))
    assert depthwise_without_cudnn(net) == 0
    assert [type(m) for m in net] == [StdConv2dSame, ScaledStdConv2dSame]


def test_tf_efficientnet_runs_every_depthwise_convolution_without_cudnn_and_folds():
    """tf_efficientnet_b0: all 16 depthwise convolutions are swapped (4 of them Conv2dSame), the features are
    those of the model as built, and folding all 49 BatchNorms keeps the predictions: into a swapped Conv2dSame
    too, which stays swapped, as timm's own Conv2dSame stays one."""
    import copy

    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame

    from finescope.models.backbones import (
        DepthwiseConv2dWithoutCudnn,
        depthwise_without_cudnn,
        fold_batchnorm,
    )

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=0, global_pool="").eval()
    x = torch.rand(1, 3, 45, 62)
    with torch.no_grad():
        before = model(x)
        assert depthwise_without_cudnn(model) == 16
        assert sum(isinstance(m, DepthwiseConv2dWithoutCudnn) for m in model.modules()) == 16
        torch.testing.assert_close(model(x), before)
        assert fold_batchnorm(model) == 49
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    net = torch.nn.Sequential(Conv2dSame(4, 4, 3, stride=2, groups=4), torch.nn.BatchNorm2d(4)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 4, 11, 10)
    with torch.no_grad():
        before = net(x)
        timms = copy.deepcopy(net)
        assert fold_batchnorm(timms) == 1
        assert type(timms[0]) is Conv2dSame and isinstance(timms[1], torch.nn.Identity)
        torch.testing.assert_close(timms(x), before)
        assert depthwise_without_cudnn(net) == 1
        kind = type(net[0])
        assert fold_batchnorm(net) == 1
        assert type(net[0]) is kind and isinstance(net[1], torch.nn.Identity)
        torch.testing.assert_close(net(x), before)


def test_folding_batchnorm_reaches_depthwise_convolutions_without_cudnn():
    """fold_batchnorm traces the model with torch.fx, which would trace into a Conv2d subclass (not torch's
    own) and fold none: every BatchNorm of mobilenet_v2 still folds with its depthwise convolutions made
    DepthwiseConv2dWithoutCudnn, which they stay, and the predictions agree."""
    from finescope.models.backbones import DepthwiseConv2dWithoutCudnn, depthwise_without_cudnn

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone="mobilenet_v2", global_size=64, local_size=32,
                                     num_crops=2), 2)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    assert depthwise_without_cudnn(model) == 17
    model = model.eval()
    images, sizes = torch.rand(2, 3, 96, 128), torch.tensor([[96, 128], [80, 128]])
    with torch.no_grad():
        before = model(images, sizes)
        assert model.fold_batchnorm() == len(bns)
        after = model(images, sizes)
    assert sum(type(m) is DepthwiseConv2dWithoutCudnn for m in model.modules()) == 17
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)


def test_folding_batchnorm_leaves_a_convolution_that_transforms_its_weight():
    """A Conv2d subclass that standardises its weight in forward (timm's StdConv2d) would undo a BatchNorm folded
    into that weight: only torch's own convolutions, DepthwiseConv2dWithoutCudnn and timm's Conv2dSame are
    folded into."""
    from finescope.models.backbones import fold_batchnorm

    class StdConv(torch.nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return self._conv_forward(x, w, self.bias)

    torch.manual_seed(0)
    net = torch.nn.Sequential(StdConv(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == 0
        torch.testing.assert_close(net(x), before)


def _randomise_batchnorms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    """Non-trivial running statistics and affine parameters for every BatchNorm2d (timm's BatchNormAct2d too)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.2, 0.2)
    return bns


@pytest.mark.parametrize("name,folds", [("efficientnet_b0", 49), ("tf_efficientnet_b0", 49), ("mixnet_s", 49),
                                        ("tf_mixnet_s", 49), ("tf_efficientnetv2_b0", 59),
                                        ("tf_mobilenetv3_small_100", 34)])
def test_folding_batchnorm_reaches_timm_batchnorm_act_and_conv2d_same(name, folds):
    """timm's efficientnet-style models normalise with BatchNormAct2d (a BatchNorm2d whose forward also applies
    its dropout and activation), which torch.fx traced into, and the tf_ ones pad with Conv2dSame, which does
    not trace: none of their BatchNorms folded. Every one now folds into the convolution it alone reads (into
    the convolutions of mixnet's mixed convolutions, which concatenates them), leaving its own dropout and
    activation under their names; the features agree, gradients too."""
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    from finescope.models.backbones import fold_batchnorm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
    _randomise_batchnorms(model)
    acts = {n: m.act for n, m in model.named_modules() if type(m) is BatchNormAct2d}
    names = [n for n, _ in model.named_modules()]
    x = torch.rand(2, 3, 32, 40, requires_grad=True)
    before = model(x)
    (grad_before,) = torch.autograd.grad(before.square().sum(), x)
    with torch.no_grad():
        assert fold_batchnorm(model) == folds
    after = model(x)
    (grad_after,) = torch.autograd.grad(after.square().sum(), x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_after, grad_before, rtol=1e-3, atol=1e-3)
    assert [n for n, _ in model.named_modules()] == names
    assert sum(type(m) is BatchNormAct2d for m in model.modules()) == len(acts) - folds
    assert all(model.get_submodule(n).act is act for n, act in acts.items())


def test_folding_batchnorm_leaves_timm_weight_standardised_convolutions_before_batchnorm_act():
    """timm's StdConv2d and StdConv2dSame standardise their weight in forward, which would undo a BatchNorm
    folded into it: before a BatchNormAct2d as before a BatchNorm2d they fold nothing."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, StdConv2d, StdConv2dSame

    from finescope.models.backbones import fold_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(StdConv2d(3, 8, 3, padding=1), BatchNormAct2d(8), StdConv2dSame(8, 8, 3, stride=2),
                              BatchNormAct2d(8, act_layer=torch.nn.SiLU)).eval()
    _randomise_batchnorms(net)
    x = torch.rand(2, 3, 15, 16)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == 0
        torch.testing.assert_close(net(x), before)
    assert [type(m) for m in net] == [StdConv2d, BatchNormAct2d, StdConv2dSame, BatchNormAct2d]


def test_folding_batchnorm_keeps_a_timm_batchnorm_act_whose_convolution_is_read_elsewhere():
    """A BatchNormAct2d folds only into a convolution whose output nothing else reads (a residual that adds it
    would see the folded output); and one without an activation (apply_act=False) folds to its Identity."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    from finescope.models.backbones import fold_batchnorm

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8)
            self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 1), BatchNormAct2d(8, apply_act=False)

        def forward(self, x):
            y = self.conv1(x)
            y = self.bn1(y) + y
            return self.bn2(self.conv2(y))

    torch.manual_seed(0)
    net = Net().eval()
    _randomise_batchnorms(net)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        before = net(x)
        assert fold_batchnorm(net) == 1
        torch.testing.assert_close(net(x), before)
    assert type(net.bn1) is BatchNormAct2d and type(net.bn2) is not BatchNormAct2d
    assert isinstance(net.bn2.act, torch.nn.Identity)


def test_folding_batchnorm_reaches_convolutions_concatenated_along_channels():
    """A BatchNorm that reads convolutions concatenated along channels, and nothing else reads them (mixnet's
    MixedConv2d), folds each its own channels; not a concatenation along another dimension, one that holds
    anything but a convolution, nor one that holds a convolution's output twice."""
    from finescope.models.backbones import fold_batchnorm

    class Net(torch.nn.Module):
        def __init__(self, kind: str):
            super().__init__()
            self.kind = kind
            self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(3, 4 if kind == "rows" else 3, 1, bias=False)
            self.bn = torch.nn.BatchNorm2d(4 if kind == "rows" else 8 if kind == "twice" else 7)

        def forward(self, x):
            a = self.a(x)
            b = x.flip(1) if self.kind == "other" else a if self.kind == "twice" else self.b(x)
            return self.bn(torch.cat([a, b], dim=-2 if self.kind == "rows" else 1))

    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 10)
    for kind, folds in [("channels", 1), ("rows", 0), ("other", 0), ("twice", 0)]:
        net = Net(kind).eval()
        _randomise_batchnorms(net)
        with torch.no_grad():
            before = net(x)
            assert fold_batchnorm(net) == folds, kind
            torch.testing.assert_close(net(x), before)

def _same_partition(ours: torch.Tensor, ref) -> bool:
    """Two labellings of one grid (0 = background) name the same components."""
    pairs = set(zip(ref.ravel().tolist(), ours.ravel().tolist(), strict=True))
    return len(pairs) == len(set(ref.ravel().tolist())) == len(set(ours.ravel().tolist()))


def test_connected_components_match_scipy_on_random_and_winding_grids():
    ndimage = pytest.importorskip("scipy.ndimage")
    from finescope.models.selection import _connected_components

    g = torch.Generator().manual_seed(0)
    grids = [torch.rand(3, 17, 23, generator=g) < p for p in (0.3, 0.5, 0.7)]
    snake = torch.zeros(1, 15, 15, dtype=torch.bool)  # a serpentine: one component, many turns
    snake[0, ::2] = True
    snake[0, 1::4, -1] = True
    snake[0, 3::4, 0] = True
    for binary in [*grids, snake]:
        for eight, structure in ((True, [[1, 1, 1]] * 3), (False, [[0, 1, 0], [1, 1, 1], [0, 1, 0]])):
            labels = _connected_components(binary, eight=eight)
            for i in range(binary.shape[0]):
                ref, _ = ndimage.label(binary[i].numpy(), structure=structure)
                assert _same_partition(labels[i], ref)
    assert labels.unique().numel() == 2  # the snake is one component
    # A fixed number of rounds (the torch.compile path) labels a blob exactly, but not the long snake.
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(44.0), indexing="ij")
    blobs = (((yy - 9) ** 2 + (xx - 12) ** 2 < 40) | ((yy - 20) ** 2 / 4 + (xx - 30) ** 2 / 60 < 5))[None]
    torch.testing.assert_close(_connected_components(blobs, rounds=3), _connected_components(blobs))
    assert _connected_components(snake, rounds=3).unique().numel() > 2


def test_host_labelling_gives_the_iterative_labels():
    """On the CPU the selection labels components with scipy in one call; the labels are the iterative
    labelling's own (each component its largest cell number), for batches, empty and full grids, a winding
    component, and a map that needs many rounds."""
    from finescope.models.selection import _components_on_host, _connected_components

    g = torch.Generator().manual_seed(1)
    snake = torch.zeros(2, 15, 15, dtype=torch.bool)
    snake[0, ::2] = True
    snake[0, 1::4, -1] = True
    snake[0, 3::4, 0] = True
    grids = [torch.rand(4, 9, 13, generator=g) < p for p in (0.3, 0.5, 0.7)]
    grids += [torch.zeros(2, 3, 5, dtype=torch.bool), torch.ones(3, 1, 1, dtype=torch.bool), snake]
    for binary in grids:
        for eight in (True, False):
            labels = _components_on_host(binary, eight)
            assert labels.dtype == torch.long
            assert torch.equal(labels, _connected_components(binary, eight=eight))


def test_selection_without_padding_masks_matches_the_general_path():
    """``padded=False`` (every cell valid, the network's common case) skips the masks, not the result."""
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(4, 5, 7, generator=g).flatten(1).softmax(1).view(4, 5, 7)
    args = (attn, torch.tensor([[5, 7]] * 4), torch.tensor([[100, 140]] * 4), torch.tensor([[20.0, 20.0]] * 4), 3)
    for normalise in ("max", "minmax"):
        general = select_boxes(*args, normalise=normalise)
        fast = select_boxes(*args, normalise=normalise, padded=False)
        for a, b in zip(general, fast, strict=True):
            torch.testing.assert_close(a, b)


def _selection_cases():
    """Selection inputs: random maps with padding, and a map whose thresholded cells are a serpentine (one
    component needing many labelling rounds)."""
    g = torch.Generator().manual_seed(5)
    attn = torch.rand(4, 6, 9, generator=g).flatten(1).softmax(1).view(4, 6, 9)
    valid = torch.tensor([[6, 9], [6, 7], [4, 9], [6, 9]])
    attn = attn * (torch.arange(6)[None, :, None] < valid[:, :1, None]) * (torch.arange(9)[None, None] < valid[:, 1:, None])
    random = (attn, valid, torch.tensor([[120, 180], [120, 140], [80, 180], [120, 180]]), torch.full((4, 2), 20.0), 4)
    snake = torch.full((1, 15, 15), 0.01)
    snake[0, ::2] = 1.0
    snake[0, 1::4, -1] = 1.0
    snake[0, 3::4, 0] = 1.0
    winding = (snake, torch.tensor([[15, 15]]), torch.tensor([[300, 300]]), torch.full((1, 2), 20.0), 4)
    return random, winding


def test_selection_with_fixed_rounds_reports_whether_they_converged():
    """What a CUDA graph of the selection runs (``graph_rounds``): the exact boxes and True for ordinary maps;
    False for a map that needs more rounds, where the caller selects again without the graph."""
    from finescope.models.selection import GRAPH_ROUNDS, _select

    random, winding = _selection_cases()
    options = (0.5, 1 / 3, 4, 0.5, "minmax", True)
    boxes, mass, converged = _select(*random, *options, graph_rounds=GRAPH_ROUNDS)
    assert converged.dim() == 0 and bool(converged)
    exact = select_boxes(*random, normalise="minmax")
    torch.testing.assert_close(boxes, exact[0], rtol=0, atol=0)
    torch.testing.assert_close(mass, exact[1], rtol=0, atol=0)
    assert not bool(_select(*winding, *options, graph_rounds=GRAPH_ROUNDS)[2])


def test_selection_graph_cache_keeps_the_newest_and_remembers_failed_captures(monkeypatch):
    """The graph cache's bookkeeping, without a GPU: a capture that fails warns once and is not tried again for
    that key (the caller selects op by op); past GRAPH_CACHE keys the least recently used graph is dropped."""
    from finescope.models import selection

    made = []

    class FakeGraph:
        def __init__(self, inputs, options):
            made.append(options[0])  # every capture tried
            if options[0] == 3:
                raise RuntimeError("capture not supported")
            self.inputs = tuple(x.clone() for x in inputs)
            self.graph = type("Replay", (), {"replay": lambda _: None})()
            self.outputs = (torch.zeros(1, options[0], 4), torch.zeros(1, options[0]), torch.tensor(True))

    monkeypatch.setattr(selection._GraphedSelect, "__init__", FakeGraph.__init__)
    monkeypatch.setattr(selection._GraphedSelect, "graphs", collections.OrderedDict())
    monkeypatch.setattr(selection, "GRAPH_CACHE", 2)
    inputs = (torch.rand(1, 2, 2), torch.tensor([[2, 2]]), torch.tensor([[8, 8]]), torch.ones(1, 2))

    def run(k):
        return selection._GraphedSelect.replay(inputs, (k, 0.5, 1 / 3, 4, 0.5, "max", True))

    with pytest.warns(UserWarning, match="without a CUDA graph"):
        assert run(3) is None
    assert run(3) is None  # remembered: no second capture, no second warning
    boxes, mass, exact = run(1)
    assert boxes.shape == (1, 1, 4) and mass.shape == (1, 1) and exact.dtype == torch.bool
    run(2)
    run(1)  # replayed, now the most recently used
    run(4)  # a third graph: the least recently used (k=2) goes
    assert [key[5] for key in selection._GraphedSelect.graphs] == [1, 4] and made == [3, 1, 2, 4]  # key[5]: k


class _Flag:
    """A convergence flag that records when it is read (it stands for the CUDA graph's 0-dim bool)."""

    def __init__(self, value: bool, events: list) -> None:
        self.value, self.events = value, events

    def __bool__(self) -> bool:
        self.events.append("flag read")
        return self.value


def _deferred_step(monkeypatch, model, images, labels, replay):
    """One training forward and backward of ``model`` with the selection's CUDA graph stood in for by
    ``replay(inputs, options)`` (on the CPU); returns the output, the order of crops' passes and flag reads,
    and the gradients."""
    from finescope.models import selection

    events = []
    monkeypatch.setattr(selection, "_graph_applies", lambda attn, k: True)
    monkeypatch.setattr(selection._GraphedSelect, "replay", lambda inputs, options: replay(inputs, options, events))
    reader = model.backbone
    hook = reader.register_forward_hook(lambda m, args, out: events.append(
        "crops read" if args[0].shape[0] == images.shape[0] * model.num_crops else "view read"))
    out = model(images)
    hook.remove()
    F.cross_entropy(out.logits, labels).backward()
    return out, events, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("converged", [True, False])
def test_deferred_convergence_flag_is_read_after_the_crops_and_the_step_is_the_exact_one(monkeypatch, converged):
    """With the selection replayed as a CUDA graph (stood in for on the CPU), the forward pass reads the
    graph's convergence flag only after the crops' pass is issued. When the flag says the labelling did not
    converge, the crops are read again from the exact boxes, and the step (outputs, gradients, BatchNorm
    running statistics, the dropout masks and the random numbers drawn after it) is the one of a model that
    selects op by op."""
    import copy

    from finescope.models import selection

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", **{**SMALL, "local_size": 32, "dropout": 0.5}), 2).train()
    reference = copy.deepcopy(model)
    reference.selection_graph = False
    images, labels = torch.rand(2, 3, 96, 128), torch.tensor([0, 1])
    torch.manual_seed(1)
    ref_out = reference(images)
    F.cross_entropy(ref_out.logits, labels).backward()
    ref_next = torch.rand(3)  # the random stream after the step
    torch.manual_seed(1)

    def replay(inputs, options, events):
        if converged:  # what the graph runs: fixed labelling rounds, and a real flag
            boxes, mass, flag = selection._select(*inputs, *options, graph_rounds=selection.GRAPH_ROUNDS)
            assert bool(flag)
        else:  # wrong boxes (the whole image), and a flag that says so
            B = inputs[0].shape[0]
            boxes, mass = torch.tensor([[0.0, 0.0, 128.0, 96.0]]).repeat(B, options[0], 1), torch.ones(B, options[0])
        return boxes, mass, _Flag(converged, events)

    out, events, grads = _deferred_step(monkeypatch, model, images, labels, replay)
    assert events == (["view read", "crops read", "flag read"] if converged
                      else ["view read", "crops read", "flag read", "crops read"])
    for name in ("logits", "global_logits", "boxes", "box_mass"):
        torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=1e-5, atol=1e-6)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6)
    for (name, ours), theirs in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(ours, theirs), name  # running statistics updated once, by the exact crops
    assert torch.equal(torch.rand(3), ref_next)


def test_deferred_flag_is_read_at_once_where_the_crops_pass_cannot_be_undone(monkeypatch):
    """With SyncBatchNorm in training (its passes communicate, so a second crops' pass would desynchronise the
    processes), with or without running statistics, or with another module in training mode that keeps buffers
    (state the model does not know how to put back), the flag is read before the crops; in eval mode there is
    nothing to put back but the random-number state."""
    from torch import nn

    from finescope.models import network, selection

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", **{**SMALL, "local_size": 32}), 2).train()
    cpu = torch.device("cpu")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert sum(map(len, network._Rerun.save(model.backbone, cpu).stats)) == 3 * n_bn > 0  # grouped by dtype
    assert network._Rerun.save(model.backbone.eval(), cpu).stats == []
    model.backbone.train()
    stateful = nn.Module()
    stateful.register_buffer("running_var", torch.ones(1))
    assert network._Rerun.save(nn.Sequential(model.backbone, stateful), cpu) is None
    assert network._Rerun.save(nn.Sequential(nn.SyncBatchNorm(3, track_running_stats=False)), cpu) is None
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert network._Rerun.save(model.backbone, cpu) is None

    def replay(inputs, options, events):
        boxes, mass, _ = selection._select(*inputs, *options, graph_rounds=selection.GRAPH_ROUNDS)
        return boxes, mass, _Flag(True, events)

    _, events, _ = _deferred_step(monkeypatch, model, torch.rand(2, 3, 96, 128), torch.tensor([0, 1]), replay)
    assert events == ["view read", "flag read", "crops read"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_selection_gives_the_eager_boxes():
    """On CUDA, the replayed graph gives the boxes of eager selection, for a map that converges in the graph and
    for one that does not (the fallback), on repeated calls with new inputs (the graph's inputs are refreshed)."""
    from finescope.models.selection import _GraphedSelect

    random, winding = _selection_cases()
    for case in (random, winding, random):
        attn, valid, sizes, cell_px, k = (x.cuda() if torch.is_tensor(x) else x for x in case)
        for scale in (1.0, 0.5):  # a second call replays the captured graph on other values
            attn_in = (attn * scale).softmax(-1) if scale != 1.0 else attn
            graphed = select_boxes(attn_in, valid, sizes, cell_px, k)
            eager = select_boxes(attn_in, valid, sizes, cell_px, k, graph=False)
            for a, b in zip(graphed, eager, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g is not None for g in _GraphedSelect.graphs.values())


@pytest.mark.slow
def test_compiled_fusion_matches_eager():
    """Under torch.compile the whole forward pass is one graph (fixed labelling rounds, constants made on the
    device) and gives the eager outputs, boxes included. Dynamo breaks once, where the sizes are read on the
    host (``sizes.tolist()``, before any tensor work, so no graph comes before it)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", **SMALL), 2).eval()
    x = torch.rand(2, 3, 96, 128)
    sizes = torch.tensor([[96, 128], [96, 128]])
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model(x, sizes)
        compiled = torch.compile(model)(x, sizes)
    assert counters["stats"]["unique_graphs"] == 1
    breaks = counters["graph_break"]
    assert sum(breaks.values()) == 1 and all("_local_scalar_dense" in reason for reason in breaks)
    torch.testing.assert_close(compiled.boxes, eager.boxes)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.box_mass, eager.box_mass, atol=1e-5, rtol=1e-5)



@pytest.mark.slow
def test_compiled_selection_of_a_padded_batch_matches_eager():
    """torch.compile of the selection alone, with ``padded=True``, on the CPU: Inductor's vectorised C++ failed
    to compile the in-place ``start[..., 1:] &= ~m[..., :-1]`` of ``_run_ids`` on a transposed mask computed in
    the graph (a ``?:`` between a VecMask<int> and a VecMask<float>); the out-of-place form compiles, and the
    boxes are the eager ones."""
    from finescope.models import selection

    torch.manual_seed(0)
    attn = torch.rand(2, 4, 6)
    attn[1, 3:], attn[1, :, 5:] = 0, 0  # the second image fills 3 x 5 of the 4 x 6 cells
    attn = attn / attn.sum(dim=(1, 2), keepdim=True)
    args = (attn, torch.tensor([[4, 6], [3, 5]]), torch.tensor([[128, 192], [96, 160]]), torch.full((2, 2), 32.0),
            2, 0.5, 1 / 3, 4, 0.5, "max", True)
    torch._dynamo.reset()
    eager = selection._select(*args)
    compiled = torch.compile(selection._select)(*args)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1])


def test_a_training_batch_of_one_image_with_a_1x1_feature_map_is_one_line(monkeypatch):
    """Small images (or a small model.global_size) give the backbone a 1x1 map; a last batch of one such image
    cannot be batch-normalised in training: a FinescopeError saying what to change, not torch's ValueError. Under
    torchrun it says that a process's share of a batch may be one image (it advised a batch size, already over 1)."""
    from finescope import distributed as dist
    from finescope.data.dataset import Batch
    from finescope.engine import train_one_epoch

    model = create_model(ModelConfig(variant="global-hires", backbone="tiny"), 2)
    batch = Batch(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), torch.tensor([[16, 16]]),
                  torch.tensor([0]), torch.arange(1))
    with pytest.raises(FinescopeError, match=r"batch of one image reaches a 1x1 feature map.*model\.global_size"):
        train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"),
                        progress=False)
    # under torchrun a process's share of the last batch may be one image whatever train.batch_size: the sizes
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(FinescopeError, match=r"single image \(under torchrun each of the 2 processes reads its share"):
        train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"),
                        progress=False)
