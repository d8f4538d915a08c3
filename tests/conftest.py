import tempfile
from pathlib import Path

import pytest
import torch

from finescope.data.synthetic import generate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _scratch_under_pytest(tmp_path_factory):
    """torch.compile's cache (GBs over many runs) and what torchrun and DataLoader workers leave in the temporary
    folder go under pytest's own, which keeps the last three runs, not into /tmp for good."""
    scratch = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(scratch / "inductor"))
        mp.setenv("TMPDIR", str(scratch))  # subprocesses (torchrun) read it
        mp.setattr(tempfile, "tempdir", str(scratch))  # this process already chose its folder
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic set (2 x 20 images of 128 px) shared by the tests that train."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, per_class=20, size=128, seed=0)
    return root


def tiny_overrides(root: Path, variant: str = "fusion", epochs: int = 2) -> list[str]:
    """Config overrides for a seconds-long training run on the small synthetic set."""
    return [
        "data.source=csv", f"data.root={root / 'manifest.csv'}", "data.num_workers=0", "data.augment=microscopy",
        f"model.variant={variant}", "model.backbone=tiny", "model.global_size=48", "model.local_size=48",
        "model.num_crops=2", f"train.epochs={epochs}", "train.batch_size=8", "train.lr=0.003", "train.device=cpu",
        "train.patience=100",
    ]
