"""The benchmark scripts run end to end on tiny CPU settings (the GPU check as the lead runs it, with --quick)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def fake_breakhis(root: Path, per_class: int = 6) -> Path:
    """A tiny BreakHis tree of random 192x128 JPEGs with official names (2 classes, 3 patients each)."""
    rng = np.random.default_rng(0)
    for cls, code, sub, t in (("benign", "B", "adenosis", "A"), ("malignant", "M", "ductal_carcinoma", "DC")):
        for n in range(per_class):
            patient = f"{1000 + n % 3 + (10 if code == 'M' else 0)}AB"
            folder = root / "BreaKHis_v1/histology_slides/breast" / cls / "SOB" / sub / f"SOB_{code}_{t}_14-{patient}" / "100X"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"SOB_{code}_{t}-14-{patient}-100-{n + 1:03d}.jpg"
            Image.fromarray(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8)).save(folder / name, quality=90)
    return root


@pytest.mark.parametrize("labelling", ["int32", "cummax"])
def test_labellings_of_the_ab_give_finescope_labels(labelling):
    """The labellings that profile_compiled.py can swap in label every grid as finescope's does, 8- and
    4-connected (the exact components ask for 4, with ``eight=False``: the A/B failed there), with the
    convergence test, with the fixed rounds of torch.compile and with a CUDA graph's rounds and flag: the A/B
    compares costs, not results."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from profile_compiled import LABELLINGS

    from finescope.models.selection import COMPILED_ROUNDS, GRAPH_ROUNDS, _connected_components

    ours = LABELLINGS[labelling]
    g = torch.Generator().manual_seed(0)
    for i in range(50):
        grid = torch.rand(3, 20, 28, generator=g) < torch.rand((), generator=g)
        eight = i % 2 == 0
        assert torch.equal(ours(grid, eight=eight), _connected_components(grid, eight=eight))
        assert torch.equal(ours(grid, rounds=COMPILED_ROUNDS, eight=eight),
                           _connected_components(grid, rounds=COMPILED_ROUNDS, eight=eight))
        for a, b in zip(ours(grid, rounds=GRAPH_ROUNDS, report=True, eight=eight),
                        _connected_components(grid, rounds=GRAPH_ROUNDS, report=True, eight=eight), strict=True):
            assert torch.equal(a, b)


def test_first_epoch_times_the_trainers_steps(tmp_path):
    """first_epoch.py runs the trainer's epochs step by step: every training image once per epoch, a step
    record per batch, and shapes counted as new only the first time the process meets them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import first_epoch

    data = fake_breakhis(tmp_path / "breakhis")
    out = tmp_path / "first.json"
    first_epoch.main(["--epochs", "2", "--out", str(out), "--set", f"data.root={data}", "model.backbone=tiny",
                      "model.weights=", "model.global_size=64", "model.local_size=64", "train.batch_size=2", "data.augment=none",
                      "data.num_workers=0", "train.device=cpu"])
    epochs = json.loads(out.read_text())["epochs"]
    assert len(epochs) == 2 and epochs[0]["steps"] == epochs[1]["steps"] > 1
    assert epochs[0]["new_shapes"] >= 1 and epochs[1]["new_shapes"] == 0  # no rotations: the same shapes again
    assert all(s["step_ms"] > 0 for e in epochs for s in e["slowest"])
    summary = first_epoch.epoch_summary([{"wait_ms": 1.0, "step_ms": 9.0, "shape": [2, 3, 4, 4]},
                                         {"wait_ms": 1.0, "step_ms": 3.0, "shape": [2, 3, 4, 4]},
                                         {"wait_ms": 1.0, "step_ms": 5.0, "shape": [1, 3, 4, 4]}], set(), 2)
    assert summary["new_shapes"] == 2 and summary["new_shape_step_ms"] == 7.0
    assert summary["known_shape_step_ms"] == 3.0 and [s["step"] for s in summary["slowest"]] == [0, 2]


def test_shape_count_counts_the_backbone_input_shapes_of_a_run(tmp_path):
    """shape_count.py reads the run's loaders: the training and evaluation batches of the split, the view and
    crop shapes of each, and how many view pixels the padding adds; --make-varied cuts a folder to many sizes
    in the same layout."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import shape_count

    data = fake_breakhis(tmp_path / "breakhis")
    varied = tmp_path / "varied"
    shape_count.main(["--make-varied", str(data), str(varied), "--min-side", "96"])
    sizes = {Image.open(p).size for p in varied.rglob("*.jpg")}
    assert len(list(varied.rglob("*.jpg"))) == 12 and len(sizes) > 1
    out = tmp_path / "count.json"
    common = ["model.backbone=tiny", "model.weights=", "model.global_size=64", "model.local_size=48",
              "train.batch_size=2", "data.num_workers=0", "data.augment=none", "train.device=cpu"]
    shape_count.main(["--epochs", "2", "--multiples", "1", "32", "--time-eval", "1", "--out", str(out),
                      "--set", f"data.root={varied}", *common])
    runs = json.loads(out.read_text())["runs"]
    assert [r["view_multiple"] for r in runs] == [1, 32]
    for r in runs:
        train, evals = r["train"], r["eval"]
        assert train["batches"] > 1 and set(evals) == {"shape", "file"}
        assert [2 * 4, 3, 48, 48] in train["shapes"]  # the K=4 crops of a batch of 2
        assert all(min(s[2:]) >= 64 for s in train["shapes"] if s[2:] != [48, 48])  # views: short side 64
        assert train["view_pixels_vs_own"] >= 1.0 or r["view_multiple"] > 1  # exact views: padding only adds
        # finescope's batches hold one view shape each; the file order's are cut every evaluation batch
        assert evals["shape"]["batches"] >= evals["file"]["batches"] >= 1
        assert evals["shape"]["seconds"] > 0 and evals["file"]["seconds"] > 0
    assert len(runs[1]["train"]["shapes"]) <= len(runs[0]["train"]["shapes"])
    exact = runs[0]["eval"]  # ordered by shape, the batches pad less than in file order
    assert 1.0 <= exact["shape"]["view_pixels_vs_own"] <= exact["file"]["view_pixels_vs_own"]
    shape_count.main(["--epochs", "1", "--multiples", "1", "--out", str(out), "--set", f"data.root={data}", *common])
    same = json.loads(out.read_text())["runs"][0]  # images of one size, no rotation: one view shape, no padding
    assert sorted({tuple(s[2:]) for s in same["train"]["shapes"]}) == [(48, 48), (64, 96)]
    assert same["train"]["view_pixels_vs_own"] == same["eval"]["shape"]["view_pixels_vs_own"] == 1.0


def test_shape_count_tallies_the_image_itself_for_global_hires():
    """global-hires passes the padded image, not a view: its shape and padding are the batch's own."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import shape_count

    from finescope.config import ModelConfig
    from finescope.data.dataset import Batch
    from finescope.models import create_model

    model = create_model(ModelConfig(variant="global-hires", backbone="tiny", global_size=64, view_multiple=32), 2)
    tally = shape_count.Tally(model)
    tally.read(Batch(torch.zeros(2, 3, 100, 150, dtype=torch.uint8), torch.tensor([[100, 150], [90, 150]]),
                     torch.tensor([0, 1]), torch.arange(2)))
    assert tally.result() == {"batches": 1, "shapes": [(2, 3, 100, 150)],
                              "view_pixels_vs_own": pytest.approx(2 * 100 / 190)}


def test_new_shape_cost_reports_each_steps_kernel_time_and_page_faults(tmp_path):
    out = tmp_path / "ns.json"
    cmd = [sys.executable, "benchmarks/new_shape_cost.py", "--device", "cpu", "--runs", "tiny:off",
           "tiny:off:contiguous", "--size", "128x192", "--global-size", "64", "--local-size", "64", "--top", "3",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    runs = json.loads(out.read_text())["runs"]
    assert [r["layout"] for r in runs] == ["cl", "contiguous"]  # channels-last weights unless asked otherwise
    run = runs[0]
    assert list(run["steps_ms"])[:4] == ["first step", "same shape again", "third step", "new batch size"]
    assert list(run["steps_ms"])[-3:] == ["known shape, median of 5", "inference, new batch size",
                                          "inference, that size again"]
    assert set(run["host"]) == set(run["steps_ms"])
    assert all(h["system_s"] >= 0 and h["page_faults"] >= 0 for h in run["host"].values())
    # the first step of a process touches memory it never had: the heap grows to the step's peak
    assert run["host"]["first step"]["page_faults"] > 0
    assert "Kernel time (s) and minor page faults" in out.with_suffix(".md").read_text()


def test_bench_model_cpu_tiny(tmp_path):
    out = tmp_path / "m.json"
    cmd = [sys.executable, "benchmarks/bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "96x128",
           "--batch", "2", "--warmup", "1", "--reps", "2", "--global-size", "48", "--local-size", "48",
           "--threads", "1", "--ablate", "fp32", "view-image", "one-call-crops", "selection-sync-now", "selection-nosync",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    result = json.loads(out.read_text())
    assert {r["case"] for r in result["rows"]} >= {"global", "global-hires", "attention", "fusion", "passes",
                                                   "fusion+selection-sync-now", "fusion+selection-nosync"}
    assert all(g["overhead"]["median"] > 0 and g["view-image_speedup"]["median"] > 0
               and g["one-call-crops_speedup"]["median"] > 0 for g in result["ratios"])
    report = out.with_suffix(".md").read_text()
    assert "| fp32 / fp32 (--cpu-amp off) | view from image / from source |" in report  # not "fp32 / bf16"
    assert "| crops in one call / crop_align |" in report
    assert "compiled" not in report
    assert "- fusion / passes <= 1.25: met by " in report and "- fusion / global-hires < 1: met by " in report
    if Path("/proc/self/clear_refs").exists():  # the CPU peak comes from /proc/self (VmHWM, reset per step)
        assert all(r["peak_mib"] is not None and r["peak_mib"] >= 0 for r in result["rows"])


def test_bench_data_compares_persistent_workers(tmp_path):
    data = fake_breakhis(tmp_path / "breakhis", per_class=2)
    out = tmp_path / "d.json"
    cmd = [sys.executable, "benchmarks/bench_data.py", "--data", str(data), "--limit", "4", "--decode-n", "2",
           "--workers", "0", "1", "--caches", "none", "--batch", "2", "--persistent", "on", "off", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    rows = json.loads(out.read_text())["loader"]
    assert [(r["workers"], r["persistent"]) for r in rows] == [(0, True), (1, True), (1, False)]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "| persistent workers |" in out.with_suffix(".md").read_text()
    assert "decode (JPEG 192x128, 2 files" in out.with_suffix(".md").read_text()


def test_bench_data_loader_reads_every_image_repeat_times_an_epoch(tmp_path):
    """--repeat N: each loader epoch reads every image N times (N shuffled passes), so that many workers reach
    a steady state; the rows say how many passes and which orientation setting they had."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_data

    samples = bench_data.find_samples(str(fake_breakhis(tmp_path / "breakhis", per_class=2)), 0)
    loader = bench_data.make_loader(samples, 0, "none", 3, False, augment="none", repeat=3)
    seen = [int(i) for b in loader for i in b.indices]
    assert sorted(seen) == sorted(list(range(len(samples))) * 3)
    rows = bench_data.bench_loader(samples, [0], ["none"], 3, False, ["microscopy", "none"],
                                   orientations=(False, True), repeat=2)
    assert [(r["augment"], r["one_orientation"], r["repeat"]) for r in rows] == [
        ("microscopy", False, 2), ("microscopy", True, 2), ("none", False, 2)]  # none turns nothing: no second row


def test_bench_data_times_epochs_with_and_without_one_orientation(tmp_path):
    data = fake_breakhis(tmp_path / "breakhis", per_class=2)
    out = tmp_path / "e.json"
    cmd = [sys.executable, "benchmarks/bench_data.py", "--data", str(data), "--limit", "4", "--decode-n", "0",
           "--workers", "0", "--caches", "none", "--batch", "2", "--epoch-backbone", "tiny", "--global-size", "32",
           "--local-size", "32", "--model-reps", "1", "--one-orientation", "on", "off", "--epoch-runs", "2",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    epoch = json.loads(out.read_text())["epoch"]
    assert [(r["one_orientation"], r["run"]) for r in epoch["runs"]] == [("on", 0), ("off", 0), ("on", 1), ("off", 1)]
    assert all(len(r["epoch_seconds"]) == 2 and r["images"] == 4 for r in epoch["runs"])
    assert "last epoch, off / on (paired per run)" in out.with_suffix(".md").read_text()
    assert "Loader, epoch 2, against what the model alone consumes (goal >= 1.5x): met by " in \
        out.with_suffix(".md").read_text()
    assert set(json.loads(out.read_text())["model_images_per_s"]) == {"on", "off"}
    assert "decode" not in json.loads(out.read_text()) and "decode (" not in out.with_suffix(".md").read_text()


def test_view_cost_times_both_views(tmp_path):
    out = tmp_path / "v.json"
    cmd = [sys.executable, "benchmarks/view_cost.py", "--sizes", "1344x1400", "--reps", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    (row,) = json.loads(out.read_text())["rows"]
    assert row["from_source"] and row["source"] == "672x700"  # the smallest box (448 px) spans 224 in the source
    assert 0 < row["max_diff_smooth"] < row["max_diff_noise"] < 0.02 and row["image_ms"]["median"] > 0


def test_optimizer_cost_compares_fused_adamw(tmp_path):
    out = tmp_path / "o.json"
    cmd = [sys.executable, "benchmarks/optimizer_cost.py", "--backbones", "tiny", "--reps", "2", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    (row,) = json.loads(out.read_text())["rows"]
    assert row["fused_ms"]["median"] > 0 and row["max_diff"] < 1e-5


def test_crop_cost_compares_crop_align_with_one_call(tmp_path):
    out = tmp_path / "c.json"
    cmd = [sys.executable, "benchmarks/crop_cost.py", "--cases", "480x640:1", "--boxes", "smallest", "whole",
           "--reps", "2", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    rows = json.loads(out.read_text())["rows"]
    assert [r["boxes"] for r in rows] == ["smallest", "whole"]
    assert all(r["speedup"]["median"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)
    assert rows[1]["largest_grid"] > 1
    assert "| one call ms | crop_align ms | one call / crop_align |" in out.with_suffix(".md").read_text()

    # the cross-commit table: the same run as "old", and as "new" with crop_align twice as slow
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    report = json.loads(out.read_text())
    (cmp / "round1_old.json").write_text(json.dumps(report))
    for row in report["rows"]:
        row["crop_align_ms"]["median"] *= 2
    (cmp / "round1_new.json").write_text(json.dumps(report))
    compare = [sys.executable, "benchmarks/crop_cost_compare.py", str(cmp)]
    done = subprocess.run(compare + ["old", "new"], cwd=ROOT, check=True, capture_output=True, text=True)
    table = (cmp / "summary.md").read_text()
    assert done.stdout.strip() == table.strip()
    assert table.count("| 0.50-0.50 |") == 2 and "| old / new |" in table
    missing = subprocess.run(compare + ["nope", "new"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "no round*_nope.json" in missing.stderr and "Traceback" not in missing.stderr


def test_crop_cost_ab_runs_two_commits_in_their_own_processes(tmp_path):
    """crop_cost_ab.sh: OLD in a temporary worktree and NEW (the checkout) alternated, then the table; here both
    are HEAD, so the one file per round is read twice. NEW other than the checkout is refused in one line."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    out = tmp_path / "ab"

    def worktrees() -> list[str]:
        return subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout.split("\n")

    before = worktrees()
    cmd = ["bash", "benchmarks/crop_cost_ab.sh", head, head, str(out), "1", "--cases", "240x320:1", "--boxes",
           "smallest", "--reps", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "src", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / f"round1_{head}.json").exists() and "| 1.00-1.00 |" in (out / "summary.md").read_text()
    assert worktrees() == before  # the temporary one is gone
    wrong = subprocess.run(["bash", "benchmarks/crop_cost_ab.sh", head, "0000000", str(out)], cwd=ROOT,
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "must be the checked-out commit" in wrong.stderr
    usage = subprocess.run(["bash", "benchmarks/crop_cost_ab.sh"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_profile_step_times_the_stages_alone_and_inside_the_step(tmp_path):
    out = tmp_path / "p.json"
    cmd = [sys.executable, "benchmarks/profile_step.py", "--device", "cpu", "--backbones", "tiny", "--size",
           "128x192", "--batch", "2", "--reps", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "src"})
    stages = json.loads(out.read_text())["backbones"][0]["stages"]
    inside = {k for k, v in stages.items() if "in_step_ms" in v}
    assert inside == {"crop source", "global view", "global backbone", "select boxes", "crops", "crop backbone",
                      "whole inference step", "rest"}
    assert all(stages[k]["in_step_ms"] > 0 for k in inside - {"crop source", "rest"})  # no source below 3x
    assert sum(stages[k]["in_step_ms"] for k in inside - {"whole inference step"}) == pytest.approx(
        stages["whole inference step"]["in_step_ms"], rel=0.5)
    assert all(v["round_robin_ms"] > 0 for k, v in stages.items() if "device_ms" in v and k != "crop source"
               and k != "whole training step")
    assert "| stage | device ms | host ms | round robin ms | in the step ms |" in done.stdout


def test_box_grid_counts_one_sample_bins_before_and_after_the_snap(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, "benchmarks/box_grid.py", "--sizes", "1040x1388", "460x700", "--boxes", "50",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    large, small = json.loads(out.read_text())["rows"]
    assert large["source"] == "672x897" and large["one_sample_before"] == 0  # 897 / 1388: every side over 224
    assert large["one_sample_after"] == large["shifts"] == 1 and large["side_px"] == 224
    assert small["one_sample_after"] == 1 and small["shifts"] == 0  # no crop source: bins under one pixel


def test_benchmark_out_in_a_new_folder_is_written(tmp_path):
    """--out's folder is made before the timings (box_grid.py, as every script with --out; it used to fail at
    the end, with what was measured lost, when the folder did not exist)."""
    out = tmp_path / "new" / "g.json"
    cmd = [sys.executable, "benchmarks/box_grid.py", "--sizes", "460x700", "--boxes", "5", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    assert json.loads(out.read_text())["rows"] and out.with_suffix(".md").is_file()


def test_the_recorded_command_names_the_environment_that_changes_the_figures(tmp_path):
    """The JSON's "exact command" left out the environment variables a measurement was about (the hugetlb
    results' GLIBC_TUNABLES) or that set its threads (OMP_NUM_THREADS): rerun as recorded, it measured another
    thing."""
    out = tmp_path / "g.json"
    cmd = [sys.executable, "benchmarks/box_grid.py", "--sizes", "460x700", "--boxes", "5", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": "src", "OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    command = json.loads(out.read_text())["environment"]["command"]
    assert command.startswith("GLIBC_TUNABLES=glibc.malloc.hugetlb=1 OMP_NUM_THREADS=1 PYTHONPATH=src python "
                              "benchmarks/box_grid.py --sizes 460x700")


def test_the_recorded_command_runs_again_in_a_shell(tmp_path, monkeypatch):
    """The command's arguments were joined unquoted: README's mixed_groups.py run with
    --set "data.group_pattern=^(H\\d+_[^_]+)_" was recorded without its quotes, and pasted into bash it is a
    syntax error (a path with a space splits in two)."""
    import shlex

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import environment

    argv = ["benchmarks/mixed_groups.py", "--set", r"data.group_pattern=^(H\d+_[^_]+)_", f"data.root={tmp_path}/a b"]
    monkeypatch.setattr(sys, "argv", [str(ROOT / argv[0]), *argv[1:]])
    command = environment(torch.device("cpu"))["command"]
    assert shlex.split(command)[-len(argv):] == argv


def test_openmp_cost_runs_each_case_in_its_own_process(tmp_path):
    out = tmp_path / "o.json"
    cmd = [sys.executable, "benchmarks/openmp_cost.py", "--backbones", "tiny", "--rounds", "1", "--reps", "2",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    (group,) = json.loads(out.read_text())["groups"]
    runs = {case: r[0] for case, r in group["runs"].items()}
    assert set(runs) == {"none", "plain", "one-thread"} and all(r["after_ms"] > 0 for r in runs.values())
    grown = {case: r["os_threads_after"] - r["os_threads_before"] for case, r in runs.items()}
    if Path("/proc/self/task").exists() and runs["plain"]["torch_threads"] >= 2:
        # the second thread, plus its own OpenMP worker(s) unless it was kept to one OpenMP thread
        assert grown["none"] == 0 and grown["one-thread"] == 1 and grown["plain"] > 1


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    data = fake_breakhis(tmp_path / "breakhis")
    out = tmp_path / "out"
    cmd = ["bash", "benchmarks/gpu_check.sh", str(out), "--device", "cpu", "--quick", "--data", str(data),
           "--weights", str(tmp_path / "none.pth"), "--train-compile", "reduce-overhead"]  # the README's, + compile
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # python3 = this interpreter
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["pass"] for r in summary["agreement"])
    assert summary["train"]["rc"] == 0, (out / "train_fusion.log").read_text()[-2000:]
    assert (out / "train_fusion" / "metrics.json").is_file() and not (out / "train_fusion" / "checkpoints").exists()
    compiled = summary["train_compiled"]  # the same run through train.compile=reduce-overhead
    assert compiled["rc"] == 0 and compiled["compile"] == "reduce-overhead", (
        (out / "train_fusion_compiled.log").read_text()[-2000:])
    assert set(summary["stages"]) == {"profile", "model", "compiled", "data", "new_shape"}
    assert all(s["rc"] == 0 for s in summary["stages"].values()), summary["stages"]
    assert "| check | result | note |" in proc.stdout  # the short table is printed last
    assert "compiled (reduce-overhead) tiny" in proc.stdout
    assert "in a step)" in proc.stdout and "rest of a step" in proc.stdout  # the stage profile, both ways
    assert "new batch shape, tiny off (ms per training step)" in proc.stdout
    # the loader compared with the model on batches of its own orientation setting
    assert "loader best, augment microscopy, colour on device, one orientation |" in proc.stdout
    assert "loader best, augment microscopy, colour on device |" in proc.stdout
    assert "2 passes an epoch" in proc.stdout


def test_gpu_check_skips_stages_past_its_budget(tmp_path):
    """A stage that would run past the script's deadline is skipped (rc 125), so the table is still printed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    clock = gpu_check.Clock(5)
    assert clock.limit(100) <= 5
    rc, seconds = gpu_check.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "a.log", clock.limit(100))
    assert (rc, seconds) == (125, 0.0) and "skipped" in (tmp_path / "a.log").read_text()
    rc, _ = gpu_check.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "b.log",
                          gpu_check.Clock(60).limit(30))
    assert rc == 3


def test_gpu_check_quick_stages_are_limited_by_the_budget_alone():
    """The stages' own limits are sized for a GPU host; on a CPU that other work slowed, the CPU test's compiled
    stage and profile ran past them (rc 124) with minutes of the budget left. Under --quick only the budget
    limits a stage; on a GPU each keeps its own."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    quick = gpu_check.parse_args(["/tmp/gc_unused", "--device", "cpu", "--quick", "--only-agreement"])
    full = gpu_check.parse_args(["/tmp/gc_unused", "--device", "cpu", "--only-agreement", "--weights", ""])
    clock = gpu_check.Clock(400)
    assert gpu_check.stage_timeout(quick, "compiled", clock) > gpu_check.STAGE_SECONDS["compiled"]
    assert gpu_check.stage_timeout(full, "compiled", clock) == gpu_check.STAGE_SECONDS["compiled"]
    assert gpu_check.own_limit(quick, 100) == quick.budget and gpu_check.own_limit(full, 100) == 100


@pytest.mark.parametrize("args, message", [
    (["bench_model.py", "--device", "cpu", "--weights", "mobilenet_v2=/no/such.pth"],
     "--weights mobilenet_v2: file '/no/such.pth' not found"),
    (["bench_model.py", "--device", "cpu", "--weights", "/no/such.pth"], "--weights: give BACKBONE=PATH"),
    (["bench_model.py", "--device", "cpu", "--sizes", "460"], "--sizes: '460' is not HxW"),
    (["bench_model.py", "--device", "gpu"], "--device: 'gpu' is not auto, cpu or cuda"),
    (["bench_model.py", "--device", "cpu", "--backbones", "nosuchnet", "--sizes", "64x64", "--modes", "infer"],
     "bench_model.py: error: unknown backbone 'nosuchnet'"),
    (["bench_data.py", "--data", "/no/such/folder", "--decode-n", "0"], "bench_data.py: error: data.root"),
    (["ablation_sweep.py", "--summarize-only", "/no/such/folder"], "--summarize-only: no sweep.json in"),
    # a child process that fails is named with its own last line (was: CalledProcessError, its stderr lost)
    (["openmp_cost.py", "--backbones", "nosuchnet", "--rounds", "1", "--reps", "1"],
     "failed: openmp_cost.py: error: unknown backbone 'nosuchnet'"),
    (["openmp_cost.py", "--weights", "/no/such.pth"], "--weights: give BACKBONE=PATH"),
    (["malloc_cost.py", "--cases", "resnet18:460:2:infer"], "--cases: '460' is not HxW"),
    (["malloc_cost.py", "--weights", "resnet18=/no/such.pth"], "--weights resnet18: file '/no/such.pth' not found"),
    # a FinescopeError (missing data, config or weights) was a traceback in these
    (["augment_cost.py", "/no/such/folder"], "augment_cost.py: error: data.root '/no/such/folder' does not exist"),
    (["cv_cost.py", "--config", "/no/such.yaml"], "cv_cost.py: error: config file '/no/such.yaml' not found"),
    (["first_epoch.py", "--config", "/no/such.yaml"], "first_epoch.py: error: config file '/no/such.yaml' not found"),
    (["first_epoch.py", "--set", "data.root=/no/such/folder"], "first_epoch.py: error: data.root '/no/such/folder'"),
    (["precision_layers.py", "--weights", "/no/such.pth"], "precision_layers.py: error: model.weights file"),
    (["precision_layers.py", "--device", "gpu"], "--device: 'gpu' is not cpu or cuda"),
    (["profile_step.py", "--device", "cpu", "--weights", "/no/such.pth"], "--weights: give BACKBONE=PATH"),
    (["profile_step.py", "--device", "cpu", "--backbones", "tiny", "mobilenet_v2", "--weights",
      "mobilenet_v2=/no/such.pth"], "--weights mobilenet_v2: file '/no/such.pth' not found"),  # before tiny's timing
    (["profile_step.py", "--device", "cpu", "--size", "460"], "--size: '460' is not HxW"),
    (["new_shape_cost.py", "--device", "gpu"], "--device: 'gpu' is not cpu or cuda"),
    (["new_shape_cost.py", "--device", "cpu", "--runs", "tiny:off", "tiny"], "--runs: 'tiny' is not BACKBONE:AMP"),
    (["new_shape_cost.py", "--device", "cpu", "--runs", "tiny:off:nhwc"], "--runs: 'tiny:off:nhwc' is not BACKBONE"),
    (["new_shape_cost.py", "--device", "cpu", "--runs", "tiny:off:cl-dw"], "tiny has no depthwise convolution"),
    (["new_shape_cost.py", "--device", "cpu", "--size", "128"], "--size: '128' is not HxW"),
    # gpu_check.sh on a GPU machine: a missing file named before minutes of work, not at the stage that reads it
    # (OUT under /dev/null: never made, even by a version that checks nothing)
    (["gpu_check.py", "/dev/null/out", "--device", "cpu", "--weights", "/no/such.pth", "--data", "/no/such/folder"],
     "--weights: file '/no/such.pth' not found"),
    (["gpu_check.py", "/dev/null/out", "--device", "cpu", "--quick", "--data", "/no/such/folder"],
     "--data: data.root '/no/such/folder' does not exist"),
    (["gpu_check.py", "/dev/null/out", "--device", "gpu"], "--device: 'gpu' is not cpu or cuda"),
    # a misspelt mode failed only in the last stage, its training run, minutes of GPU time in
    (["gpu_check.py", "/dev/null/out", "--device", "cpu", "--quick", "--train-compile", "reduce_overhead"],
     "argument --train-compile: invalid choice: 'reduce_overhead'"),
    (["bench_data.py", "--device", "gpu", "--decode-n", "0"], "--device: 'gpu' is not auto, cpu or cuda"),
    (["crop_cost.py", "--cases", "460x700"], "--cases: '460x700' is not HxW:BATCH"),
    (["crop_cost.py", "--in-step", "mobilenet_v2", "--weights", "/no/such.pth"], "--weights: file '/no/such.pth'"),
    (["view_cost.py", "--sizes", "1536"], "--sizes: '1536' is not HxW"),
    (["optimizer_cost.py", "--device", "gpu"], "--device: 'gpu' is not cpu or cuda"),
    (["selection_cost.py", "--grid", "7"], "--grid: '7' is not HxW"),
    (["profile_compiled.py", "--device", "cpu", "--size", "460"], "--size: '460' is not HxW"),
    (["box_grid.py", "--sizes", "460"], "--sizes: '460' is not HxW"),
    (["normalise_cost.py", "--device", "gpu"], "--device: 'gpu' is not cpu or cuda"),
    (["box_grid.py", "--boxes", "5", "--out", "/dev/null/g.json"], "--out '/dev/null/g.json'"),  # was: after timing
    # a count of repetitions below 1 (warm-ups below 0) refused before the timings: it was a StatisticsError or
    # ZeroDivisionError after the setup, or a table of nothing
    (["resize_cost.py", "--reps", "0"], "--reps: give 1 or more, not 0"),
    (["view_cost.py", "--sizes", "64x64", "--reps", "0"], "--reps: give 1 or more, not 0"),
    (["normalise_cost.py", "--reps", "-1"], "--reps: give 1 or more, not -1"),
    (["optimizer_cost.py", "--backbones", "tiny", "--reps", "0"], "--reps: give 1 or more, not 0"),
    (["selection_cost.py", "--reps", "0", "--rounds-batches", "0"], "--reps: give 1 or more, not 0"),
    (["selection_cost.py", "--reps", "1", "--rounds-batches", "-1"], "--rounds-batches: give 0 or more, not -1"),
    (["profile_step.py", "--device", "cpu", "--backbones", "tiny", "--size", "64x64", "--reps", "0"],
     "--reps: give 1 or more, not 0"),
    (["profile_compiled.py", "--device", "cpu", "--warmup", "-1"], "--warmup: give 0 or more, not -1"),
    # torch.compile's RuntimeError traceback ('Unrecognized mode=...') after the model was built
    (["profile_compiled.py", "--device", "cpu", "--mode", "reduce_overhead"],
     "argument --mode: invalid choice: 'reduce_overhead'"),
    (["crop_cost.py", "--cases", "64x64:1", "--boxes", "whole", "--reps", "0"], "--reps: give 1 or more, not 0"),
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--variants", "fusion", "--sizes", "64x64",
      "--modes", "infer", "--reps", "0"], "--reps: give 1 or more, not 0"),
    (["bench_data.py", "--decode-n", "0", "--repeat", "0"], "--repeat: give 1 or more, not 0"),
    (["bench_data.py", "--decode-n", "0", "--epoch-runs", "0"], "--epoch-runs: give 1 or more, not 0"),
    (["malloc_cost.py", "--cases", "tiny:64x64:1:infer", "--rounds", "0"], "--rounds: give 1 or more, not 0"),
    (["openmp_cost.py", "--backbones", "tiny", "--rounds", "0"], "--rounds: give 1 or more, not 0"),
    (["cv_cost.py", "--steps", "0"], "--steps: give 1 or more, not 0"),
    (["first_epoch.py", "--epochs", "0"], "--epochs: give 1 or more, not 0"),
    (["box_grid.py", "--boxes", "0"], "--boxes: give 1 or more, not 0"),
    (["selection_grid.py", "/dev/null/run", "/dev/null/x", "--reps", "0"], "--reps: give 1 or more, not 0"),
    (["selection_grid.py", "/dev/null/run", "/dev/null/x"], "checkpoint '/dev/null/run' not found"),
    (["augment_cost.py", "/dev/null/data", "--n", "0"], "--n: give 1 or more, not 0"),
    (["shape_count.py", "--multiples", "32", "0"], "--multiples: give 1 or more, not 0"),
    (["shape_count.py", "--make-varied", "/dev/null/src", "/dev/null/dst"], "'/dev/null/src' is not a folder"),
    # a side of 0 passed the HxW check and ended in a ZeroDivisionError or RuntimeError traceback after the setup
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "0x700", "--modes", "infer"],
     "--sizes: '0x700' is not HxW"),
    (["view_cost.py", "--sizes", "64x0", "--reps", "1"], "--sizes: '64x0' is not HxW"),
    (["selection_cost.py", "--grid", "0x11", "--rounds-batches", "0"], "--grid: '0x11' is not HxW"),
    (["box_grid.py", "--sizes", "0x500", "--boxes", "1"], "--sizes: '0x500' is not HxW"),
    (["crop_cost.py", "--cases", "0x64:1", "--reps", "1"], "--cases: '0x64' is not HxW"),
    # a batch of 0 was a RuntimeError traceback (max() of no crops) after the setup
    (["crop_cost.py", "--cases", "64x64:0", "--reps", "1"], "--cases: '64x64:0' is not HxW:BATCH"),
    # an unknown --in-step backbone or weights that do not fit it was said only after the crops' table was timed,
    # that table lost
    (["crop_cost.py", "--cases", "64x64:1", "--boxes", "whole", "--reps", "1", "--in-step", "nosuchnet"],
     "crop_cost.py: error: unknown backbone 'nosuchnet'"),
    (["crop_cost.py", "--cases", "64x64:1", "--boxes", "whole", "--reps", "1", "--in-step", "tiny", "--weights",
      "README.md"], "crop_cost.py: error: model.weights file 'README.md' could not be read"),
    # a batch (or crop count) of 0 was a RuntimeError, ValueError or IndexError traceback after the setup
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "64x64", "--modes", "infer",
      "--batch", "0"], "--batch: give 1 or more, not 0"),
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "64x64", "--modes", "infer",
      "--num-crops", "0"], "--num-crops: give 1 or more, not 0"),
    (["bench_data.py", "--decode-n", "0", "--batch", "0"], "--batch: give 1 or more, not 0"),
    # an IndexError or ValueError traceback, or a child's garbled last line, after the setup
    (["box_grid.py", "--boxes", "1", "--local-size", "0"], "--local-size: give 1 or more, not 0"),
    (["new_shape_cost.py", "--device", "cpu", "--runs", "tiny:off", "--global-size", "0"],
     "--global-size: give 1 or more, not 0"),
    (["malloc_cost.py", "--cases", "tiny:64x64:0:infer", "--rounds", "1", "--steps", "1"],
     "--cases: 'tiny:64x64:0:infer' is not BACKBONE:HxW:BATCH:MODE"),
    # ablations that no group would measure: timed the rest and left them out of the tables without a word
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "64x64", "--variants", "global",
      "--ablate", "fp32"], "--ablate: its cases are fusion steps; add fusion to --variants"),
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "64x64", "--modes", "train",
      "--ablate", "folded-bn"], "--ablate folded-bn: inference only; add infer to --modes"),
    # a RuntimeError traceback from torch.set_num_threads
    (["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "64x64", "--modes", "infer",
      "--threads", "-1"], "--threads: give 0 or more, not -1"),
    # after timing the loader with 0 workers, a ValueError traceback, what it measured lost
    (["bench_data.py", "--decode-n", "0", "--workers", "0", "-1"], "--workers: give 0 or more, not -1"),
    (["selection_cost.py", "--batch", "0", "--rounds-batches", "0"], "--batch: give 1 or more, not 0"),
    (["normalise_cost.py", "--crops", "0"], "--crops: give 1 or more, not 0"),
    (["profile_step.py", "--device", "cpu", "--backbones", "tiny", "--size", "64x64", "--batch", "0"],
     "--batch: give 1 or more, not 0"),
    (["profile_compiled.py", "--device", "cpu", "--size", "64x64", "--batch", "16", "0"],
     "--batch: give 1 or more, not 0"),
])
def test_bench_scripts_say_a_wrong_path_or_option_in_one_line(args, message):
    """A wrong path or option stops a benchmark script with one line, not a traceback, and before
    anything is timed (a missing weights file used to surface only when its backbone's group came)."""
    script, *rest = args
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *rest], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "src"}, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not proc.stdout  # nothing measured


def test_gpu_check_table_leaves_out_an_earlier_runs_stage_files(tmp_path):
    """The short table shows what this run measured: an OUT holding an earlier check's stage files (a rerun with
    --only-agreement, or stages skipped this time) printed their rows as if measured now."""
    out = tmp_path / "out"
    out.mkdir()
    stale = {"backbone": "stalenet", "size": "1x1", "mode": "infer", "overhead": {"median": 9.0}}
    (out / "bench_model.json").write_text(json.dumps({"ratios": [stale]}))
    cmd = [sys.executable, "benchmarks/gpu_check.py", str(out), "--device", "cpu", "--quick", "--only-agreement"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": "src"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "agree tiny fp32" in proc.stdout
    assert "stalenet" not in proc.stdout and "stalenet" not in (out / "summary.md").read_text()


def test_gpu_check_table_shows_the_selection_graph_of_each_way(tmp_path):
    """The selection row of the short table (CUDA only, so given here) times the exact components' graph, op by
    op, and the grid's graph."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    graph = {"identical": 10, "batches": 10, "fallbacks": 0, "winding_identical": True, "winding_fell_back": True,
             "graph_ms": 0.31, "eager_ms": 5.2, "grid_graph_ms": 0.22, "pass": True}
    table = gpu_check.final_table({"agreement": [], "selection_graph": graph}, tmp_path)
    assert "0.310 against 5.200 ms per call (16 maps; grid components, graph: 0.220) | PASS" in table


def test_gpu_check_reference_reads_its_crops_from_the_boxes_given():
    """The agreement's fused logits are compared with the float64 reference read from the device's boxes: a box
    that moves under a pixel moves the crop, and comparing with the reference's own boxes failed mobilenet_v2 in
    fp16 (3.4e-2) on arithmetic that agrees (3.0e-3 at the same boxes). Given the reference's own boxes it gives
    its logits; given boxes one pixel away, other logits, so the boxes given are the ones read."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    from finescope.config import ModelConfig
    from finescope.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone="tiny", global_size=64, local_size=64), 3).eval()
    model = model.double()
    images = torch.rand(2, 3, 96, 128)
    sizes = torch.tensor([[96, 128], [96, 128]])
    with torch.no_grad():
        ref = model(images.double(), sizes)
        same = gpu_check.reference_at(model, images, sizes, ref.boxes.float())
        moved = gpu_check.reference_at(model, images, sizes, ref.boxes + 1.0)
    torch.testing.assert_close(same.logits, ref.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(same.global_logits, ref.global_logits, rtol=0, atol=0)
    assert (moved.logits - ref.logits).abs().max() > 1e-6
    torch.testing.assert_close(moved.boxes, ref.boxes + 1.0)


def test_bench_data_names_an_unknown_epoch_backbone_before_timing(tmp_path):
    """--epoch-backbone NAME that finescope does not know is named before the loader is timed (it came only
    after every loader row, minutes into a run on the real sets)."""
    data = fake_breakhis(tmp_path / "breakhis", per_class=2)
    cmd = [sys.executable, "benchmarks/bench_data.py", "--data", str(data), "--workers", "0", "--caches", "none",
           "--decode-n", "0", "--epoch-backbone", "nosuchnet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": "src"})
    assert proc.returncode != 0
    assert "unknown backbone 'nosuchnet'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not proc.stdout  # nothing timed


def test_first_epoch_records_the_machine_before_the_epochs(tmp_path, monkeypatch):
    """first_epoch.py's JSON records the commit and the load average of when its epochs began
    (``loadavg_start``), as every benchmark does; it took them after the epochs, minutes later."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import first_epoch

    calls = []
    environment, train_one_epoch = first_epoch.environment, first_epoch.train_one_epoch
    monkeypatch.setattr(first_epoch, "environment", lambda *a: calls.append("environment") or environment(*a))
    monkeypatch.setattr(first_epoch, "train_one_epoch",
                        lambda *a, **k: calls.append("epoch") or train_one_epoch(*a, **k))
    data = fake_breakhis(tmp_path / "breakhis", per_class=3)
    out = tmp_path / "first.json"
    first_epoch.main(["--epochs", "1", "--out", str(out), "--set", f"data.root={data}", "model.backbone=tiny",
                      "model.weights=", "model.global_size=64", "model.local_size=64", "train.batch_size=2",
                      "data.num_workers=0", "train.device=cpu"])
    assert calls == ["environment", "epoch"]
    env = json.loads(out.read_text())["environment"]
    assert env["loadavg_start"] and "loadavg_end" in env


def test_bench_model_json_keeps_every_repetition(tmp_path):
    """bench_model.py's JSON holds every repetition of every case (README: 'a JSON with every repetition'), from
    which its medians and paired ratios come; it held only the median, min and max."""
    out = tmp_path / "m.json"
    cmd = [sys.executable, "benchmarks/bench_model.py", "--device", "cpu", "--backbones", "tiny", "--sizes", "64x96",
           "--variants", "fusion", "--modes", "infer", "--batch", "1", "--warmup", "0", "--reps", "3",
           "--global-size", "32", "--local-size", "32", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": "src"})
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == {"fusion", "passes"}
    for r in rows:
        assert len(r["ms_reps"]) == 3 and sorted(r["ms_reps"])[1] == pytest.approx(r["ms"])


def test_gpu_check_sh_prints_the_whole_table(tmp_path):
    """gpu_check.sh printed only the last 40 lines of gpu_check.py's output: on a GPU the short table has 41-48
    lines (benchmarks/results/gpu_*/summary.md), so its header and agreement rows were cut off."""
    fake = tmp_path / "python"  # stands in for gpu_check.py: a table of 50 rows
    fake.write_text("#!/bin/sh\necho '| check | result | note |'\nfor i in $(seq 1 50); do echo \"| row $i |\"; done\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if k != "OUT"}, "PYTHON": str(fake)})
    assert proc.returncode == 0, proc.stderr
    assert "| check | result | note |" in proc.stdout and "| row 1 |" in proc.stdout and "| row 50 |" in proc.stdout


def test_bench_model_goals_on_a_numbered_cuda_device():
    """bench_model.py --device cuda:1 (a GPU picked by number) checks the overhead goal of CUDA: with a device
    index the 'fusion / passes <= 1.15' line was left out of the goals."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_model import goal_lines

    ratios = [{"backbone": "resnet18", "size": "460x700", "mode": "train", "overhead": {"median": 1.2},
               "fusion_vs_hires": {"median": 0.5}}]
    assert "fusion / passes <= 1.15: met by 0 of 1 groups" in goal_lines(ratios, "cuda:1")
    assert goal_lines(ratios, "cuda:1") == goal_lines(ratios, "cuda")


@pytest.mark.parametrize("args", [
    ["box_grid.py", "--sizes", "460x700", "--boxes", "2"],
    ["bench_model.py", "--device", "cpu", "--backbones", "tiny", "--variants", "fusion", "--sizes", "64x64",
     "--modes", "infer", "--batch", "1", "--warmup", "0", "--reps", "1"],
    ["bench_data.py", "--data", "/no/such/folder", "--decode-n", "0"],
])
def test_bench_out_naming_a_folder_is_said_in_one_line(tmp_path, args):
    """--out naming an existing folder is refused in one line before anything is timed; it was an
    IsADirectoryError traceback when the results were written, what was measured lost."""
    script, *rest = args
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *rest, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"}, timeout=120)
    assert proc.returncode != 0
    assert f"--out '{tmp_path}': is a folder" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not proc.stdout  # nothing measured


def test_gpu_check_out_naming_a_file_is_said_in_one_line(tmp_path):
    """gpu_check.py OUT naming an existing file is refused in one line (it was a FileExistsError traceback)."""
    out = tmp_path / "summary.md"
    out.write_text("")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(out), "--device", "cpu", "--quick",
                           "--only-agreement"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": "src"})
    assert proc.returncode != 0
    assert f"OUT '{out}' is a file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bench_model_out_naming_a_md_file_is_refused_before_the_tables_overwrite_the_json(tmp_path):
    """bench_model.py writes its JSON to --out and its tables beside it as .md: --out r.md got the JSON, then the
    tables over it, and the full results were lost after minutes of timing."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--out", str(tmp_path / "r.md")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"}, timeout=120)
    assert proc.returncode != 0 and not proc.stdout and not (tmp_path / "r.md").exists()
    assert proc.stderr.strip() == (f"bench_model.py: error: --out '{tmp_path / 'r.md'}': give the JSON file's name "
                                   f"(e.g. {tmp_path / 'r.json'}); the tables are written beside it as .md")


@pytest.mark.parametrize("args", [
    ["bench_data.py", "--data", "/no/such/folder", "--decode-n", "0"],
    ["crop_cost.py", "--cases", "64x64:1", "--boxes", "whole", "--reps", "1"],
    ["resize_cost.py", "--reps", "1"],
    ["box_grid.py", "--boxes", "1"],
    ["malloc_cost.py", "--cases", "tiny:64x64:1:infer", "--rounds", "1", "--steps", "1"],
    ["new_shape_cost.py", "--device", "cpu", "--runs", "tiny:off"],
    ["selection_grid.py", "/dev/null/run", "/dev/null/x"],
])
def test_bench_out_naming_a_md_file_is_refused_before_the_tables_overwrite_the_json(tmp_path, args):
    """Each of these writes its JSON to --out and its tables beside it as .md: --out r.md got the JSON, then the
    tables over it, so the full results (every repetition, the machine) were lost after the timings."""
    script, *rest = args
    out = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *rest, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"}, timeout=120)
    assert proc.returncode != 0 and not proc.stdout and not out.exists()
    assert (f"--out '{out}': give the JSON file's name (e.g. {tmp_path / 'r.json'}); the tables are written beside "
            "it as .md") in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_gpu_check_sh_puts_a_relative_out_dir_where_it_was_run_from(tmp_path):
    """gpu_check.sh changed to the repository root before reading OUT_DIR, so a relative one given from another
    folder was made under the repository root, not where the user looked for it."""
    here = tmp_path / "here"
    here.mkdir()
    (tmp_path / "out").write_text("")  # a file: refused at once, named in the folder it was given
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "../out", "--device", "cpu"],
                          cwd=here, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and str(here / "../out") in proc.stdout + proc.stderr  # mkdir names it
    assert not (ROOT / "out").exists()
    sub = "rel_out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), sub, "--device", "cpu",
                           "--only-agreement", "--quick"], cwd=here, capture_output=True, text=True, timeout=300)
    assert (here / sub / "gpu_check.log").is_file() and not (ROOT / sub).exists(), proc.stdout[-2000:]


def test_gpu_check_sh_reads_a_relative_data_or_weights_where_it_was_run_from(tmp_path):
    """gpu_check.sh reads a relative OUT_DIR from the folder it was run from, but passed --data and --weights on
    after changing to the repository root: README's CPU smoke test run from another folder ('--data DIR') looked
    for DIR under the repository root and was refused."""
    here = tmp_path / "here"
    here.mkdir()
    sh = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "out", "--device", "cpu"]
    for extra, message in ((["--quick", "--data", "bh"], f"data.root '{here / 'bh'}' does not exist"),
                           (["--quick", "--data=bh"], f"data.root '{here / 'bh'}' does not exist"),
                           (["--weights", "w.pth"], f"--weights: file '{here / 'w.pth'}' not found")):
        proc = subprocess.run([*sh, *extra], cwd=here, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHON": sys.executable})
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_crop_cost_compare_names_a_missing_round_of_the_second_commit(tmp_path):
    """crop_cost_compare.py DIR OLD NEW with no round file of NEW (a misspelt commit) names the file in one line;
    it was a FileNotFoundError traceback."""
    (tmp_path / "round1_aaaaaaa.json").write_text(json.dumps({"rows": []}))
    proc = subprocess.run([sys.executable, "benchmarks/crop_cost_compare.py", str(tmp_path), "aaaaaaa", "bbbbbbb"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "round1_bbbbbbb.json" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_selection_cost_measures_each_way_of_finding_components(capsys):
    """selection_cost.py: a row per map kind and way (exact, grid) with its operations, and the labelling rounds
    each way needs (exact labels a 4-connected grid twice as fine as the cells: no more rounds than the grid)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import selection_cost

    assert selection_cost.main(["--batch", "2", "--grid", "5x6", "--reps", "1", "--rounds-batches", "3"]) == 0
    out = capsys.readouterr().out
    for kind in ("smooth", "noisy"):
        for way in ("exact", "grid"):
            assert re.search(rf"\| {kind} \| {way} \| off \| [0-9.]+ \| [0-9]+ \| 0 \|", out)
            assert re.search(rf"\| {kind} \| {way} \| [0-9: ]+ \| 1.00 \|", out)


def test_selection_grid_compares_each_grid_with_the_finest(tmp_path, capsys):
    """selection_grid.py: a trained model's maps, the boxes of each grid against those of the last (finest) one,
    and each grid's time per call."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import selection_grid

    from finescope.cli import main

    data = fake_breakhis(tmp_path / "breakhis")
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/demo.yaml", "--out", str(run), "--quiet", "--set", "data.source=breakhis",
                 f"data.root={data}", "data.cache=none", "model.global_size=64", "model.local_size=32",
                 "train.epochs=1", "train.device=cpu", "data.test_fraction=0", "data.val_fraction=0"]) == 0
    out = tmp_path / "grid" / "g.json"
    result = selection_grid.main([str(run), str(data), "--limit", "5", "--upsample", "2", "4", "32", "--reps", "1",
                                  "--batch", "3", "--components", "grid", "exact", "--peaks", "grid", "nodes",
                                  "--out", str(out)])
    rows = {(r["components"], r["peaks"], r["upsample"]): r for r in result["rows"]}
    assert list(rows) == [(c, p, u) for c in ("grid", "exact") for p in ("grid", "nodes") for u in (2, 4, 32)]
    reference = rows["grid", "grid", 32]
    assert reference["median_iou"] == 1.0 and reference["boxes_below_0.7"] == 0.0
    assert reference["reference_components_missed"] == reference["reference_peaks_missed"] == 0
    assert all(r["reference_components"] + r["reference_peaks"] == 5 * 4 for r in rows.values())  # 5 images, K=4
    assert all(0.0 <= r["mean_iou"] <= 1.0 and r["ms_per_call"] > 0 for r in rows.values())
    assert result["settings"]["files"] == 5 and result["settings"]["timed_batch"] == 3
    assert result["settings"]["trained_selection_components"] == "exact"
    assert result["settings"]["trained_selection_peaks"] == "nodes"
    table = out.with_suffix(".md").read_text()
    assert json.loads(out.read_text())["rows"] == result["rows"] and "| grid | grid | 32 | 1.000 |" in table
    with pytest.raises(SystemExit):
        selection_grid.main([str(run), str(data), "--upsample", "0"])
    assert "--upsample: every value must be >= 1" in capsys.readouterr().err


def test_mixed_groups_tells_one_specimen_from_ids_numbered_per_class(tmp_path, capsys):
    """mixed_groups.py: the classes of a group that is one specimen (its colour) lie as close as the halves of one
    unit, and much closer than the same classes of other groups; ids numbered per class lie as far as those."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mixed_groups

    rng = np.random.default_rng(0)

    def folder(name: str, one_specimen: bool) -> Path:
        root = tmp_path / name
        colours = {g: rng.integers(0, 255, 3) for g in ("s1", "s2", "s3", "s4")}
        for cls in ("a", "b"):
            (root / cls).mkdir(parents=True)
            for g in ("s1", "s2", "s3", "s4"):
                base = colours[g] if one_specimen else rng.integers(0, 255, 3)
                for n in range(4):
                    pixels = np.clip(base + rng.normal(0, 3, (16, 16, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(root / cls / f"{cls}_{g}_{n}.png")
        return root

    medians = {}
    for name, one in (("specimens", True), ("numbered", False)):
        out = tmp_path / f"{name}.json"
        assert mixed_groups.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), "--set",
                                  "data.source=folder", f"data.root={folder(name, one)}",
                                  "data.group_pattern=^[ab]_(s[0-9])_"]) == 0
        result = json.loads(out.read_text())
        assert result["mixed_groups"] == 4 and result["units"] == 8
        medians[name] = result["medians"]
    assert medians["specimens"]["same group"] < 3 * medians["specimens"]["halves"]
    assert medians["specimens"]["same group"] * 5 < medians["specimens"]["other groups"]
    assert medians["numbered"]["same group"] > 5 * medians["numbered"]["halves"]
    assert "4 groups hold two or more classes" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["profile_step.py", "--device", "cpu", "--backbones", "tiny", "--size", "64x64", "--batch", "1", "--reps", "1"],
    ["profile_compiled.py", "--device", "cpu", "--mode", "none", "--backbone", "tiny", "--size", "64x64",
     "--batch", "1", "--warmup", "0", "--reps", "1"],
    ["gpu_check.py", "OUT", "--device", "cpu", "--quick", "--only-agreement"],
])
def test_printed_figures_name_the_machine_versions_commit_and_command(tmp_path, args):
    """What a benchmark prints is labelled as README says (machine, versions, commit, the exact command):
    profile_step.py and profile_compiled.py printed their tables, and gpu_check.py its short table (and
    summary.md), with none of them, so a pasted table could not be traced to a commit or a machine."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import git_commit

    script, *rest = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *rest], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "src"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in [proc.stdout] + ([(tmp_path / "out" / "summary.md").read_text()] if script == "gpu_check.py" else []):
        assert f"commit {git_commit()}" in text and "torch " in text and "torchvision " in text
        assert f"python benchmarks/{script} " in text  # the command as run


def test_make_gpu_subset_names_a_damaged_image_or_unwritable_output_in_one_line(tmp_path):
    """A damaged image in the source tree, or an output folder that cannot be made, stopped make_gpu_subset.py
    with an OSError traceback that named neither the image nor what to do."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "good.png")
    (src / "broken.png").write_bytes((src / "good.png").read_bytes()[:40])  # truncated
    script = [sys.executable, "benchmarks/make_gpu_subset.py"]
    cases = [([str(tmp_path / "src"), str(tmp_path / "out")], "broken.png' could not be read as an image"),
             ([str(tmp_path / "src"), "/dev/null/out"], "cannot write '/dev/null/out"),
             ([str(tmp_path / "src"), str(tmp_path / "out"), "--quality", "500"], "--quality: give 1 to 100, not 500")]
    for args, message in cases:
        proc = subprocess.run([*script, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_make_gpu_subset_refuses_an_output_folder_in_its_source(tmp_path):
    """The copy's files are named like the source's with .jpg: with the output folder the source itself, every
    JPEG of the source was re-encoded in place at quality 90 (the originals lost); inside it, the copy was read
    as source images on the next run."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "x.jpg", quality=100)
    before = (src / "x.jpg").read_bytes()
    for dst in (tmp_path / "src", tmp_path / "src" / "copy"):
        proc = subprocess.run([sys.executable, "benchmarks/make_gpu_subset.py", str(tmp_path / "src"), str(dst)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert f"output folder '{dst}' is inside the source folder" in proc.stderr, proc.stderr
        assert (src / "x.jpg").read_bytes() == before and not (tmp_path / "src" / "copy").exists()
