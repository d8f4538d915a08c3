"""Real microscopy from ../shared: a fusion MobileNetV2 with the shared ImageNet weights trains on BreakHis."""

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from finescope.cli import main
from finescope.models import create_backbone

BREAKHIS = SHARED / "data" / "breakhis"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (BREAKHIS.is_dir() and WEIGHTS.is_file()), reason=f"{BREAKHIS} or {WEIGHTS} is absent"),
]


def _few_breakhis(dst: Path, per_patient: int = 1) -> Path:
    """A flat folder of links to a few images of every patient (original file names)."""
    dst.mkdir()
    by_patient: dict[str, list[Path]] = {}
    for p in sorted(BREAKHIS.rglob("*.png")):
        by_patient.setdefault(p.name.split("-")[2], []).append(p)
    for files in by_patient.values():
        for p in files[:per_patient]:
            (dst / p.name).symlink_to(p)
    return dst


def test_shared_weights_load_and_classify():
    import torchvision

    backbone = create_backbone("mobilenet_v2", weights=str(WEIGHTS))
    full = torchvision.models.mobilenet_v2()
    full.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    torch.testing.assert_close(backbone.trunk.state_dict(), full.features.state_dict())


def test_fusion_mobilenet_trains_one_epoch_on_breakhis(tmp_path):
    root = _few_breakhis(tmp_path / "few")
    out = tmp_path / "run"
    code = main([
        "train", "--config", "configs/breakhis_binary.yaml", "--out", str(out), "--quiet", "--set",
        f"data.root={root}", f"model.weights={WEIGHTS}", "model.global_size=128", "model.local_size=128",
        "train.epochs=1", "train.batch_size=6", "train.device=cpu", "data.num_workers=0",
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] > 0 and metrics["n_groups"] >= 2
    splits = json.loads((out / "splits.json").read_text())["splits"]
    cases = {side: {Path(p).name.split("-")[2].rstrip("ABCDEFGHIJ") for p in paths} for side, paths in splits.items()}
    assert not (cases["train"] & cases["test"]) and not (cases["train"] & cases["val"])
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["train_loss"] == history[0]["train_loss"]  # finite, not NaN
