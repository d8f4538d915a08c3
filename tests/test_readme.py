import re
import shutil
from pathlib import Path

import torch

import finescope
from finescope.models import ModelOutput

ROOT = Path(__file__).resolve().parents[1]
# What makes the README's own code a seconds-long run: fewer, smaller images, one epoch, a small crop. The device
# stays the config's (auto): on a CUDA machine the run trains there, as a reader's would.
TINY = ["data.synthetic_per_class=8", "data.synthetic_size=128", "model.global_size=48", "model.local_size=64",
        "train.epochs=1", "train.batch_size=8", "data.num_workers=0"]


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of README.md runs as written, in order, from a folder laid out as the repository
    (configs/), and gives what the text around it says. The only change is TINY, appended to the overrides the
    README passes to load_config; the explain block reads runs/demo/fusion, which `make demo` writes: the run the
    Python API block trained (fusion, configs/demo.yaml) stands in for it."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)
    assert len(blocks) == 2, "a new README Python block: run it here too"
    api, explain_block = blocks
    assert 'load_config("configs/demo.yaml"' in api and '"runs/demo/fusion"' in explain_block
    # load_trained's default device is the run's (CUDA where it trained there), not the CPU of torch.rand's batch
    assert 'load_trained("runs/mine", device="cpu")' in api, "the README's model would not be where its input is"

    (tmp_path / "configs").symlink_to(ROOT / "src" / "finescope" / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    load_config = finescope.load_config
    monkeypatch.setattr(finescope, "load_config", lambda path, overrides=None: load_config(path, [*(overrides or []), *TINY]))

    ns: dict = {}
    exec(compile(api, "README.md (Python API)", "exec"), ns)
    assert ns["metrics"]["split"] == "test" and 0 <= ns["metrics"]["image_accuracy"] <= 1  # "the test metrics"
    out = ns["out"]
    assert isinstance(out, ModelOutput)
    k, h, w = ns["cfg"].model.num_crops, *out.attention.shape[1:]
    assert out.attention.shape == (2, h, w) and torch.allclose(out.attention.sum((1, 2)), torch.ones(2))
    assert out.boxes.shape == (2, k, 4) and out.box_mass.shape == (2, k)
    # boxes in full-resolution pixels of the 460 x 700 input
    assert out.boxes[..., 2].max() > 64 and (out.boxes[..., 2] <= 700).all() and (out.boxes[..., 3] <= 460).all()

    shutil.copytree("runs/mine", "runs/demo/fusion")
    exec(compile(explain_block, "README.md (explain)", "exec"), ns)
    e = ns["e"]
    assert {"attention", "gradcam"} <= set(e.maps) and e.class_names[e.predicted] in ("atypical", "typical")
    assert e.boxes.shape == (k, 4) and Path("one.png").stat().st_size > 0
