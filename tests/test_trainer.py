"""End-to-end training on the synthetic set: files, determinism, resume, evaluate, predict, checkpoints."""

import csv
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from finescope import trainer
from finescope.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from finescope.config import load_config, save_config
from finescope.errors import FinescopeError, FinescopeWarning


def _train(root, out, variant="fusion", epochs=2, extra=()):
    cfg = load_config(None, tiny_overrides(root, variant, epochs) + list(extra))
    return trainer.train(cfg, out, progress=False)


def _record_step_rates(monkeypatch) -> list[float]:
    """The learning rate of every AdamW step taken from now on (the first group's), in a list filled as they go."""
    used = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return used


@pytest.fixture(scope="module")
def fusion_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fusion"
    metrics = _train(synthetic_root, out)
    return out, metrics


def test_run_directory_contents(fusion_run):
    out, metrics = fusion_run
    for name in ("config.yaml", "splits.json", "history.jsonl", "metrics.json", "predictions_test.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history)
    for key in ("image_accuracy", "balanced_accuracy", "macro_f1", "auc", "confusion_matrix", "class_names",
                "n_images", "patient_recognition_rate", "n_groups"):
        assert key in metrics
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "class_names"):
        assert key in state
    assert state["config"]["_provenance"]["finescope_version"]


def test_same_seed_same_result(synthetic_root, tmp_path, fusion_run):
    out, metrics = fusion_run
    again = _train(synthetic_root, tmp_path / "again")
    first = [json.loads(x)["train_loss"] for x in (out / "history.jsonl").read_text().splitlines()]
    second = [json.loads(x)["train_loss"] for x in (tmp_path / "again" / "history.jsonl").read_text().splitlines()]
    assert first == pytest.approx(second, rel=1e-5)
    assert again["image_accuracy"] == metrics["image_accuracy"]


def test_history_records_the_learning_rates_the_epochs_steps_used(synthetic_root, tmp_path, monkeypatch):
    """history.jsonl's lr was read after the epoch's last scheduler step: the rate of the next epoch's first step,
    so the last epoch, trained at a rate above 0, read lr 0.0. lr is now the rate of the epoch's first step and
    lr_last that of its last (the head's: train.lr times the schedule)."""
    used = _record_step_rates(monkeypatch)
    out = tmp_path / "lr"
    _train(synthetic_root, out, variant="global", epochs=2, extra=["train.warmup_epochs=1"])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    per_epoch = len(used) // 2
    assert per_epoch > 1 and len(used) == 2 * per_epoch
    for e, row in enumerate(history):
        steps = used[e * per_epoch:(e + 1) * per_epoch]
        assert (row["lr"], row["lr_last"]) == (steps[0], steps[-1])
    assert history[0]["lr"] < history[0]["lr_last"] == pytest.approx(0.003)  # warm-up to train.lr
    assert history[1]["lr_last"] > 0.0


def _killed_after_first_epoch(monkeypatch, root, run_dir, extra=()) -> None:
    """Train ``run_dir`` until a Ctrl-C after its first epoch, as a killed run leaves it."""
    real_run_epoch = trainer._run_epoch

    def killed(*args, **kwargs):
        if args[8] == 1:  # epoch index
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "_run_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(root, run_dir, extra=extra)
    monkeypatch.setattr(trainer, "_run_epoch", real_run_epoch)


def _assert_same_weights(run_dir, reference_dir) -> None:
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    reference = load_checkpoint(reference_dir / "checkpoints" / "last.pt")["model"]
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], msg=key)


def test_resume_after_kill_reaches_the_same_weights(synthetic_root, tmp_path, monkeypatch, fusion_run, capsys):
    out, _ = fusion_run
    _killed_after_first_epoch(monkeypatch, synthetic_root, tmp_path / "killed")
    with pytest.raises(FinescopeError, match="--resume"):
        _train(synthetic_root, tmp_path / "killed")
    cfg = load_config(None, tiny_overrides(synthetic_root))
    capsys.readouterr()
    trainer.train(cfg, tmp_path / "killed", resume=True)
    assert f"resuming {tmp_path / 'killed'} after epoch 1 of 2, with 1 process\n" in capsys.readouterr().out
    _assert_same_weights(tmp_path / "killed", out)
    assert len((tmp_path / "killed" / "history.jsonl").read_text().splitlines()) == 2
    trainer.train(cfg, tmp_path / "killed", resume=True)  # a finished run: nothing to train, tested again
    assert "after epoch 2 of 2, with 1 process; its training is done: testing again" in capsys.readouterr().out


def test_persistent_workers_and_resume_do_not_change_the_run(synthetic_root, tmp_path, monkeypatch, fusion_run):
    """Two persistent workers, killed after epoch 1 and resumed, reach the weights of 0 workers uninterrupted:
    shuffling and augmentation are seeded by (seed, epoch, image), never by a worker."""
    out, _ = fusion_run
    workers = ["data.num_workers=2"]
    _killed_after_first_epoch(monkeypatch, synthetic_root, tmp_path / "w2", extra=workers)
    trainer.train(load_config(None, tiny_overrides(synthetic_root) + workers), tmp_path / "w2", resume=True,
                  progress=False)
    _assert_same_weights(tmp_path / "w2", out)


def test_resume_that_starts_compiling_reads_what_the_run_read(synthetic_root, tmp_path, monkeypatch, fusion_run):
    """train.compile may change on --resume (README), but it also decides what an epoch reads (the last
    incomplete batch dropped, data.one_orientation=auto): a resume reads as the run did, to the same weights.
    torch.compile itself is left out (the identity): the data is what is tested."""
    out, _ = fusion_run
    _killed_after_first_epoch(monkeypatch, synthetic_root, tmp_path / "k")
    monkeypatch.setattr(trainer, "compile_for_training", lambda model, mode: model)
    trainer.train(load_config(None, tiny_overrides(synthetic_root) + ["train.compile=default"]), tmp_path / "k",
                  resume=True, progress=False)
    history = [json.loads(r) for r in (tmp_path / "k" / "history.jsonl").read_text().splitlines()]
    assert history[1]["train_images"] == history[0]["train_images"]  # 22 images, batches of 8: none dropped
    _assert_same_weights(tmp_path / "k", out)


@pytest.mark.parametrize("killed, resumed", [(True, False), (False, True)])
def test_resume_with_the_other_channels_last_reaches_the_same_weights(synthetic_root, tmp_path, monkeypatch,
                                                                      killed, resumed):
    """train.channels_last may change on --resume (README): the optimizer's moments, stored in the run's
    layout, take the resumed parameters' layout (the fused AdamW reads them as flat memory)."""
    layout = [f"train.channels_last={str(killed).lower()}"]
    reference = tmp_path / "reference"
    _train(synthetic_root, reference, extra=layout)
    _killed_after_first_epoch(monkeypatch, synthetic_root, tmp_path / "k", extra=layout)
    other = [f"train.channels_last={str(resumed).lower()}"]
    trainer.train(load_config(None, tiny_overrides(synthetic_root) + other), tmp_path / "k", resume=True,
                  progress=False)
    resumed_state = load_checkpoint(tmp_path / "k" / "checkpoints" / "last.pt")["model"]
    for key, value in load_checkpoint(reference / "checkpoints" / "last.pt")["model"].items():
        # the layouts' convolutions round differently: weights 8e-4 apart at most here, BatchNorm's running
        # statistics, which add up every batch's, 5e-3 (2-core CPU, torch 2.14); moments out of line moved weights
        # by 1e-2
        stats = key.endswith(("running_mean", "running_var"))
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=1e-2 if stats else 2e-3, msg=key)


def test_moments_loaded_in_the_other_layout_take_their_parameters_layout():
    """What a resume with the other train.channels_last loads: moments stored channels-last for contiguous
    parameters (and the reverse) are copied into the parameter's layout, values unchanged."""
    conv = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.AdamW(conv.parameters())
    conv(torch.randn(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    moment = optimizer.state[conv.weight]["exp_avg"]
    expected = moment.clone()
    optimizer.state[conv.weight]["exp_avg"] = moment.to(memory_format=torch.channels_last)
    trainer._moments_like_parameters(optimizer)
    again = optimizer.state[conv.weight]["exp_avg"]
    assert again.stride() == conv.weight.stride() and torch.equal(again, expected)


def test_load_trained_gives_a_folded_channels_last_model(fusion_run):
    out, _ = fusion_run
    model, cfg, _, _ = trainer.load_trained(out, device="cpu")
    assert model.folded and not model.training and cfg.train.channels_last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_only_global_hires_gets_channels_last_input_batches_on_cuda():
    """The other variants resize the image or cut crops from it, whose CUDA kernels copy a channels-last input
    to contiguous first; the decision sees through DDP and torch.compile wrappers (no GPU needed: no tensor
    is made on the device)."""
    from torch import nn

    from finescope.config import ModelConfig
    from finescope.engine import input_channels_last, unwrap
    from finescope.models import create_model

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    small = {"backbone": "tiny", "global_size": 32, "local_size": 32}
    models = {v: create_model(ModelConfig(variant=v, **small), 2) for v in ("global", "global-hires", "fusion")}
    assert [input_channels_last(m, cuda, True) for m in models.values()] == [False, True, False]
    assert not any(input_channels_last(m, cpu, True) or input_channels_last(m, cuda, False) for m in models.values())
    wrapped = nn.Module()
    wrapped.module = nn.Module()
    wrapped.module._orig_mod = models["global-hires"]  # DDP around a compiled model
    assert unwrap(wrapped) is models["global-hires"] and input_channels_last(wrapped, cuda, True)


def test_evaluate_matches_training_metrics(fusion_run, tmp_path):
    out, metrics = fusion_run
    result = trainer.evaluate(out, "test", out=tmp_path / "m.json", device="cpu")
    assert result["image_accuracy"] == pytest.approx(metrics["image_accuracy"])
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == metrics["n_images"]
    assert (tmp_path / "m_predictions.csv").is_file()


def test_evaluate_of_a_checkpoint_in_another_runs_folder_says_its_split_is_not_that_one(fusion_run, tmp_path):
    """best.pt copied into a folder whose splits.json is another split (another run's, or a replaced file) was
    evaluated on that folder's test side without a word, though it may hold images the model trained on: the
    checkpoint's split_digest tells, a warning says so and the metrics record it. In its own folder, nothing."""
    out, _ = fusion_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", FinescopeWarning)
        assert trainer.evaluate(out, device="cpu", out=tmp_path / "own.json")["split_leak"] is None
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "best.pt", other / "checkpoints" / "best.pt")
    split = json.loads((out / "splits.json").read_text())
    split["splits"]["train"], split["splits"]["test"] = split["splits"]["test"], split["splits"]["train"]
    (other / "splits.json").write_text(json.dumps(split))
    with pytest.warns(FinescopeWarning, match="trained on another split than .*splits.json .*copied from another run"):
        metrics = trainer.evaluate(other, device="cpu", out=tmp_path / "other.json")
    assert "trained on another split" in metrics["split_leak"]
    assert metrics["n_images"] == len(split["splits"]["test"])


def test_evaluate_all_of_a_checkpoint_in_another_runs_folder_does_not_count_its_images_by_that_split(
        fusion_run, synthetic_root, tmp_path):
    """evaluate --split all (or other data) counts the images of patients the run trained or validated on by its
    folder's splits.json: best.pt copied into a folder whose splits.json is another split counted by that split,
    missing the images it did train on and naming ones it did not, in the warning and split_leak. The checkpoint's
    split_digest tells: the count is not given, the warning and split_leak say why. In its own folder, on its own
    data and on a part of it elsewhere (data the digest cannot be recomputed from), the count as before."""
    out, _ = fusion_run
    split = json.loads((out / "splits.json").read_text())
    seen = len(split["splits"]["train"]) + len(split["splits"]["val"])
    with pytest.warns(FinescopeWarning, match="images evaluated are of"):
        own = trainer.evaluate(out, "all", device="cpu", out=tmp_path / "own.json")
    assert f"{seen} of the {own['n_images']} images" in own["split_leak"]
    part = tmp_path / "part"  # other data: the test images and one trained on, listed by their absolute paths
    part.mkdir()
    root = synthetic_root
    kept = split["splits"]["test"] + split["splits"]["train"][:1]
    lines = (root / "manifest.csv").read_text().splitlines()
    (part / "manifest.csv").write_text("\n".join([lines[0], *(f"{root}/{line}" for line in lines[1:]
                                                             if line.split(",")[0] in kept)]))
    data = [f"data.root={part / 'manifest.csv'}", "data.num_workers=0"]
    with pytest.warns(FinescopeWarning, match="images evaluated are of"):
        other = trainer.evaluate(out, "all", data, device="cpu", out=tmp_path / "part.json")
    assert "trained on another split" not in other["split_leak"]
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "best.pt", moved / "checkpoints" / "best.pt")
    split["splits"]["train"], split["splits"]["test"] = split["splits"]["test"], split["splits"]["train"]
    (moved / "splits.json").write_text(json.dumps(split))
    for overrides in ([], data):
        with pytest.warns(FinescopeWarning, match="trained on another split than .*splits.json"):
            metrics = trainer.evaluate(moved, "all", overrides, device="cpu", out=tmp_path / "moved.json")
        assert "trained on another split" in metrics["split_leak"] and "images evaluated are of" not in \
            metrics["split_leak"]
    # its own data, of which an image is skipped as unreadable since a resume wrote splits.json without it: its split
    from finescope.data import SampleSet, load_samples, save_splits

    whole = load_samples(load_config(None, tiny_overrides(synthetic_root)).data)
    gone = whole.samples[int(trainer.load_splits(out / "splits.json", whole, own=True)["train"][0])]
    less = SampleSet([s for s in whole.samples if s is not gone], whole.class_names, root=whole.root,
                     skipped=[(gone.path, "truncated")])
    with pytest.warns(FinescopeWarning, match="skipped as unreadable"):
        save_splits(moved / "splits.json", trainer.load_splits(out / "splits.json", less, own=True), less)
    state = load_checkpoint(moved / "checkpoints" / "best.pt")
    assert "images evaluated are of" in trainer._trained_on_warning(state, less, moved, own_data=True)
    assert "trained on another split" in trainer._trained_on_warning(state, less, moved, own_data=False)


def test_balanced_class_weights_weigh_each_class_alike_in_the_training_loss(synthetic_root, tmp_path):
    """train.class_weights=balanced: n / (C * n_c) of the training side (a class absent from it weighs 1), the
    loss the weighted mean of each image's cross-entropy; a run of imbalanced data trains with it (its first
    epoch's loss differs from the same run's unweighted one), and a value not offered is refused."""
    from finescope.data import SampleSet
    from finescope.data.records import Sample
    from finescope.engine import compute_loss
    from finescope.models.network import ModelOutput

    samples = [Sample(f"{i}.png", label, str(i)) for i, label in enumerate([0, 0, 0, 1, 2])]
    three = SampleSet(samples, ["a", "b", "c"])
    balanced = load_config(None, ["train.class_weights=balanced"])
    assert trainer.loss_class_weights(load_config(), three, [0, 1, 2, 3]) is None
    assert trainer.loss_class_weights(balanced, three, [0, 1, 2, 3]).tolist() == pytest.approx([2 / 3, 2, 1])
    logits, labels = torch.randn(4, 3), torch.tensor([0, 0, 0, 1])
    weight = torch.tensor([2 / 3, 2.0, 1.0])
    each = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (each * weight[labels]).sum() / weight[labels].sum()
    assert compute_loss(ModelOutput(logits), labels, class_weight=weight).item() == pytest.approx(expected.item())
    with pytest.raises(FinescopeError, match="train.class_weights"):
        load_config(None, ["train.class_weights=inverse"])
    lines = (synthetic_root / "manifest.csv").read_text().splitlines()  # 20 typical, 6 atypical
    (tmp_path / "manifest.csv").write_text("\n".join([lines[0], *(
        f"{synthetic_root}/{line}" for line in lines[1:] if "typical_00" in line and (
            line.startswith("images/typical") or int(line.split(",")[0][-8:-4]) < 6))]))
    loss = {}
    for weights in ("none", "balanced"):
        _train(tmp_path, tmp_path / weights, "global", 1, ["model.global_size=32", f"train.class_weights={weights}"])
        loss[weights] = json.loads((tmp_path / weights / "history.jsonl").read_text().splitlines()[0])["train_loss"]
    assert loss["balanced"] != pytest.approx(loss["none"], rel=1e-4)


def test_a_best_pt_of_before_a_resume_that_dropped_a_skipped_image_is_of_the_runs_split(synthetic_root, tmp_path):
    """A resume wrote splits.json again without a training image skipped since (deleted, data.on_error=skip), and its
    epoch did not beat best.pt, which keeps the digest of the split of before. Evaluated on other data (whose split
    cannot be recomputed), it read as 'trained on another split than splits.json (copied from another run, or that
    file replaced)': a false alarm. The file records the digests of its version before the resume; a file
    replaced since is still told."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    run, skip = tmp_path / "run", ["model.global_size=32", "data.on_error=skip"]
    _train(root, run, "global", 1, skip)
    split = json.loads((run / "splits.json").read_text())
    best = (run / "checkpoints" / "best.pt").read_bytes()
    (root / split["splits"]["train"][0]).unlink()  # the CSV lists it still
    with pytest.warns(FinescopeWarning, match="skipped as unreadable"):
        trainer.train(load_config(None, tiny_overrides(root, "global", 2) + skip), run, resume=True, progress=False)
    assert split["splits"]["train"][0] not in json.loads((run / "splits.json").read_text())["splits"]["train"]
    (run / "checkpoints" / "best.pt").write_bytes(best)  # as when the resumed epoch scores lower
    other = tmp_path / "other"  # other data: the run's test images, listed by their absolute paths
    other.mkdir()
    lines = (root / "manifest.csv").read_text().splitlines()
    (other / "manifest.csv").write_text("\n".join([lines[0], *(f"{root}/{line}" for line in lines[1:]
                                                             if line.split(",")[0] in split["splits"]["test"])]))
    data = [f"data.root={other / 'manifest.csv'}", "data.num_workers=0"]
    metrics = trainer.evaluate(run, "all", data, device="cpu", out=tmp_path / "other.json")
    assert "another split" not in (metrics.get("split_leak") or "")
    split["splits"]["train"], split["splits"]["test"] = split["splits"]["test"], split["splits"]["train"]
    (run / "splits.json").write_text(json.dumps(split))  # replaced: the sides swapped
    with pytest.warns(FinescopeWarning, match="trained on another split than"):
        trainer.evaluate(run, "all", data, device="cpu", out=tmp_path / "replaced.json")


def test_a_run_of_a_manifest_listing_images_outside_its_folder_goes_on_after_they_moved(synthetic_root, tmp_path,
                                                                                     capsys):
    """A CSV manifest listing absolute paths outside its folder; the images moved and the manifest was rewritten
    with their new paths (data.root, the CSV, the same). evaluate and train --resume refused the run's split:
    'splits.json does not match the data: 12 listed images are not in data.root ...; point data.root at the data
    this run was trained on', the very data.root it trained on. They keep their split, and evaluate, before and
    after the resume, does not take it for another split than the checkpoints'."""
    from finescope.cli import main

    def manifest(images: Path) -> None:
        lines = (synthetic_root / "manifest.csv").read_text().splitlines()  # 6 images of each class
        rows = [f"{images}/{x}" for x in lines[1:] if int(x.split(",")[0].split("_")[-1][:4]) < 6]
        (tmp_path / "proj" / "manifest.csv").write_text("\n".join([lines[0], *rows]))

    shutil.copytree(synthetic_root, tmp_path / "scope1", ignore=shutil.ignore_patterns("manifest.csv"))
    (tmp_path / "proj").mkdir()
    manifest(tmp_path / "scope1")
    run = tmp_path / "run"
    _train(tmp_path / "proj", run, "global", 1, ["model.global_size=32", "data.test_fraction=0.3"])
    split = json.loads((run / "splits.json").read_text())["splits"]
    state = load_checkpoint(run / "checkpoints" / "best.pt")  # one from before recorded the names of then
    old = {**state, "split_digest": next(iter(trainer.listed_digests(run / "splits.json") - {state["split_digest"]}))}
    (tmp_path / "scope1").rename(tmp_path / "disk2")
    manifest(tmp_path / "disk2")
    capsys.readouterr()
    cfg = load_config(None, tiny_overrides(tmp_path / "proj"))
    moved = trainer.load_samples(cfg.data)
    assert trainer.other_split(old, trainer.load_splits(run / "splits.json", moved, own=True), moved, run) is None
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "another split" not in capsys.readouterr().err
    assert json.loads((run / "metrics_test.json").read_text())["n_images"] == len(split["test"])
    assert main(["evaluate", str(run), "--split", "all", "--device", "cpu"]) == 0  # its training images among them
    assert "images evaluated are of" in json.loads((run / "metrics_all.json").read_text())["split_leak"]
    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume", "--quiet", "--set",
                 "train.epochs=2"]) == 0, capsys.readouterr().err
    assert json.loads((run / "splits.json").read_text())["splits"]["test"] == [
        p.replace("../scope1/", "../disk2/") for p in split["test"]]
    (tmp_path / "disk2").rename(tmp_path / "disk3")  # best.pt of either epoch, the split named at either place
    manifest(tmp_path / "disk3")
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert "another split" not in capsys.readouterr().err


def test_evaluate_with_model_settings_changed_says_so_in_its_metrics_and_report(fusion_run, tmp_path):
    """evaluate RUN --set model.threshold=0.95 scores another model than the one trained (other crops) and wrote
    metrics_test.json and report.md into the run as if they were the run's, with nothing recording the change."""
    from finescope.cli import main

    out, _ = fusion_run
    assert main(["evaluate", str(out), "--out", str(tmp_path / "m.json"), "--device", "cpu", "--set",
                 "model.threshold=0.95", "data.num_workers=0"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["model_overrides"] == {"model.threshold": 0.95}
    assert "model.threshold=0.95" in (tmp_path / "m_report.md").read_text().split("## Confusion")[0]
    result = trainer.evaluate(out, "test", ["data.num_workers=0"], out=tmp_path / "n.json", device="cpu")
    assert result["model_overrides"] == {}  # the model as trained; other settings are no change of the model


def test_evaluate_with_model_settings_changed_writes_files_of_its_own(fusion_run, tmp_path):
    """evaluate RUN --set model.threshold=0.95 without --out rewrote RUN's predictions_test.csv, metrics_test.json
    and report.md (the run's test report) with another model's; a threshold sweep left the run with the last one's.
    They go to files named by the change now (metrics_test_threshold=0.95.json, ...), each row saying it, and the
    run's own stay the model's as trained."""
    from finescope.report import write_report

    out, _ = fusion_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    own = {name: (run / name).read_bytes() for name in ("predictions_test.csv", "metrics.json", "metrics_test.json",
                                                         "report.md") if (run / name).is_file()}
    result = trainer.evaluate(run, "test", ["model.threshold=0.95", "data.num_workers=0"], device="cpu")
    assert Path(result["output"]) == run / "metrics_test_threshold=0.95.json"
    with (run / "predictions_test_threshold=0.95.csv").open(newline="") as fh:
        assert {r["model_overrides"] for r in csv.DictReader(fh)} == {"model.threshold=0.95"}
    assert own == {name: (run / name).read_bytes() for name in own}
    assert "model.threshold" not in write_report(run, n_boot=20)[0].read_text()  # report RUN: the model as trained
    trainer.evaluate(run, "test", ["model.threshold=0.9", "data.num_workers=0"], device="cpu")
    assert (run / "metrics_test_threshold=0.95.json").is_file() and (run / "metrics_test_threshold=0.9.json").is_file()
    trainer.evaluate(run, "test", ["data.num_workers=0"], device="cpu")
    with (run / "predictions_test.csv").open(newline="") as fh:
        assert {r["model_overrides"] for r in csv.DictReader(fh)} == {""}


def _with_magnifications(synthetic_root: Path, folder: Path) -> dict[str, str]:
    """Copy the synthetic set to ``folder`` with a manifest that gives its images 40X and 100X in turn; return
    {relative path: magnification}."""
    shutil.copytree(synthetic_root, folder)
    with (folder / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    mags = {r["path"]: ("40", "100")[i % 2] for i, r in enumerate(rows)}
    with (folder / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "magnification"])
        w.writeheader()
        w.writerows({**r, "magnification": f"{mags[r['path']]}X"} for r in rows)
    return mags


def test_a_runs_predictions_say_each_images_magnification(fusion_run, synthetic_root, tmp_path):
    """predictions_<split>.csv had no magnification column, though the samples know it (a BreakHis name, a
    manifest's magnification column): report RUN could not show the per-magnification table a cv shows. train's,
    evaluate's and predict's CSVs now have one after patient, empty where the data gives none."""
    from finescope.cli import main

    out, _ = fusion_run
    mags = _with_magnifications(synthetic_root, tmp_path / "data")
    assert main(["evaluate", str(out), "--out", str(tmp_path / "m.json"), "--device", "cpu", "--set",
                 f"data.root={tmp_path / 'data' / 'manifest.csv'}", "data.num_workers=0"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["split"] == "test"
    with (tmp_path / "m_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["path", "group", "patient", "magnification", "true"]
    assert {r["magnification"] for r in rows} == {"40", "100"}
    assert all(r["magnification"] == mags[Path(r["path"]).relative_to(tmp_path / "data").as_posix()] for r in rows)
    assert "## Per magnification" in (tmp_path / "m_report.md").read_text()
    for written in (out / "predictions_test.csv", trainer.predict(out, [str(synthetic_root / "images")],
                                                                  tmp_path / "p.csv", device="cpu")):
        with written.open(newline="") as f:  # the synthetic set's manifest names no magnification
            assert {r["magnification"] for r in csv.DictReader(f)} == {""}


def test_metrics_of_images_of_several_magnifications_give_each_magnifications_metrics(fusion_run, synthetic_root,
                                                                                       tmp_path):
    """train's metrics.json and evaluate's metrics_<split>.json gave the metrics of all images only, where a cv gives
    them per magnification: of images at 40X and 100X they now give each one's (per_magnification), the values the
    report's per-magnification table shows; of one magnification, or none, no such key."""
    from finescope.oof import summarize_predictions
    from finescope.report import write_report

    out, metrics = fusion_run
    assert "per_magnification" not in metrics  # the synthetic manifest names no magnification
    _with_magnifications(synthetic_root, tmp_path / "data")
    result = trainer.evaluate(out, "test", [f"data.root={tmp_path / 'data' / 'manifest.csv'}"],
                              out=tmp_path / "m.json", device="cpu")
    by_mag = json.loads((tmp_path / "m.json").read_text())["per_magnification"]
    assert list(by_mag) == ["40", "100"] and by_mag == result["per_magnification"]
    assert sum(m["n_images"] for m in by_mag.values()) == result["n_images"]
    md, _ = write_report(out, n_boot=20, predictions=result["predictions"], out=tmp_path / "r.md")
    shown = summarize_predictions(tmp_path / "r_files" / "predictions_oof.csv", n_boot=20)
    for mag, m in next(iter(shown["variants"].values()))["per_magnification"].items():
        for key in ("patient_recognition_rate", "image_accuracy", "balanced_accuracy"):
            assert m[key]["mean"] == pytest.approx(by_mag[mag][key])
    trained = _train(tmp_path / "data", tmp_path / "run", "global", 1)
    assert list(trained["per_magnification"]) == ["40", "100"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["per_magnification"] == \
        trained["per_magnification"]
    one = _train(tmp_path / "data", tmp_path / "one", "global", 1, ["data.magnifications=[100]"])
    assert "per_magnification" not in one and one["n_images"] > 0


def test_evaluate_of_last_pt_keeps_the_test_predictions_of_best_pt(fusion_run, tmp_path):
    """train's metrics.json and predictions_test.csv are best.pt's: evaluate of last.pt writes files of its own."""
    out, _ = fusion_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    trained = (run / "predictions_test.csv").read_bytes()
    result = trainer.evaluate(run / "checkpoints" / "last.pt", "test", device="cpu")
    assert (run / "predictions_test.csv").read_bytes() == trained
    assert Path(result["output"]) == run / "metrics_test_last.json"
    assert Path(result["predictions"]) == run / "predictions_test_last.csv"
    trainer.evaluate(run / "checkpoints" / "last.pt", "val", device="cpu")
    for name in ("predictions_test.csv", "predictions_test_last.csv"):  # `report RUN` of predictions_val_last.csv
        (run / name).unlink()
    from finescope.report import write_report

    assert "## Validation metrics" in write_report(run, n_boot=20)[0].read_text()


def test_predict_writes_one_row_per_image(fusion_run, synthetic_root, tmp_path):
    out, _ = fusion_run
    csv_path = trainer.predict(out, [str(synthetic_root / "images")], tmp_path / "p.csv", device="cpu")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 40
    assert {"path", "predicted", "prob_typical", "prob_atypical", "boxes"} <= set(rows[0])
    assert len(rows[0]["boxes"].split(";")) == 2  # K = 2 boxes "x1 y1 x2 y2 mass"


def test_predict_with_model_settings_changed_says_so_in_its_rows(fusion_run, synthetic_root, tmp_path):
    """predict RUN --set model.threshold=0.95 predicted with another model than the one trained (other crops) and
    its CSV did not say so, where evaluate's metrics record model_overrides (ca2f85f)."""
    out, _ = fusion_run
    images = [str(synthetic_root / "images" / "typical_0000.png")]
    changed = trainer.predict(out, images, tmp_path / "p.csv", ["model.threshold=0.95", "data.num_workers=0"], "cpu")
    assert [r["model_overrides"] for r in csv.DictReader(changed.open())] == ["model.threshold=0.95"]
    trained = trainer.predict(out, images, tmp_path / "q.csv", ["data.num_workers=0"], "cpu")
    assert [r["model_overrides"] for r in csv.DictReader(trained.open())] == [""]  # the model as trained


def test_predict_with_another_bit_depth_than_trained_warns_and_says_so_in_its_rows(fusion_run, synthetic_root,
                                                                                   tmp_path):
    """predict/evaluate/explain RUN --set data.bit_depth=12 on a run trained with 0 read 16-bit images with
    another scaling than in training (16 times as bright) without a word. Now a one-line warning names both values
    and model_overrides records it, as it records model.threshold."""
    out, _ = fusion_run
    images = [str(synthetic_root / "images" / "typical_0000.png")]
    with pytest.warns(FinescopeWarning, match=r"data\.bit_depth 12.*trained with data\.bit_depth 0"):
        changed = trainer.predict(out, images, tmp_path / "p.csv", ["data.bit_depth=12", "data.num_workers=0"],
                                  "cpu")
    assert [r["model_overrides"] for r in csv.DictReader(changed.open())] == ["data.bit_depth=12"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FinescopeWarning)
        trained = trainer.predict(out, images, tmp_path / "q.csv", ["data.bit_depth=0", "data.num_workers=0"], "cpu")
    assert [r["model_overrides"] for r in csv.DictReader(trained.open())] == [""]


def test_predict_lays_out_its_batches_as_the_run_trained(fusion_run, synthetic_root, tmp_path, monkeypatch):
    # channels-last input batches (CUDA global-hires) only where the run's train.channels_last says so, as evaluate
    out, _ = fusion_run
    seen = []
    real = trainer.predict_loader
    monkeypatch.setattr(trainer, "predict_loader", lambda *a, **kw: seen.append(kw["channels_last"]) or real(*a, **kw))
    for value in ("true", "false"):
        trainer.predict(out, [str(synthetic_root / "images")], tmp_path / "p.csv", [f"train.channels_last={value}"],
                        device="cpu")
    assert seen == [True, False]


def test_a_checkpoint_cut_short_says_what_to_do(fusion_run, synthetic_root, tmp_path):
    out, _ = fusion_run
    cut = tmp_path / "best.pt"
    cut.write_bytes((out / "checkpoints" / "best.pt").read_bytes()[:5000])  # a copy that stopped part way
    with pytest.raises(FinescopeError, match=r"could not be read .*damaged .*pass another checkpoint of the run"):
        trainer.predict(cut, [str(synthetic_root / "images")], tmp_path / "p.csv", device="cpu")


def test_checkpoint_from_other_classes_is_refused(fusion_run, tmp_path):
    out, _ = fusion_run
    (tmp_path / "x" / "cats").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "x" / "cats" / "a.png")
    with pytest.raises(FinescopeError, match="cats"):
        trainer.evaluate(out, overrides=["data.source=folder", f"data.root={tmp_path / 'x'}"], device="cpu")


def test_checkpoint_round_trip_and_rng(tmp_path):
    torch.manual_seed(3)
    state = {"model": {"w": torch.randn(3)}, "config": {"a": 1}, "rng": rng_state()}
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    expected = torch.rand(2)
    set_rng_state(loaded["rng"])
    torch.testing.assert_close(torch.rand(2), expected)
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(FinescopeError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FinescopeError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_folder_without_a_run_given_as_a_checkpoint_is_named_a_folder(tmp_path):
    """evaluate, predict and explain of a folder that holds no run (a run's checkpoints/ folder with last.pt
    alone, a folder of exports) said 'checkpoint ... not found' of a folder that is there (found in review)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinescopeError, match=r"'.*empty' is a folder without a finescope run \(no "
                                             r"checkpoints/best.pt in it\); pass a run directory or a .pt file"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(FinescopeError, match=f"is a folder without a finescope run .*, e.g. "
                                             f"'{tmp_path / 'checkpoints' / 'last.pt'}'$"):
        load_checkpoint(tmp_path / "checkpoints")


def test_a_cv_folder_given_as_a_checkpoint_names_its_runs(tmp_path):
    """predict, evaluate and explain of a cv folder said 'checkpoint not found; pass a run directory', not that
    the runs are inside it."""
    cv = tmp_path / "cv"
    (cv / "runs" / "fusion" / "fold1" / "checkpoints").mkdir(parents=True)
    (cv / "runs" / "fusion" / "fold1" / "checkpoints" / "best.pt").write_bytes(b"")
    (cv / "cv.json").write_text("{}")
    with pytest.raises(FinescopeError, match=f"is a cv folder, not a run; pass one of its runs, "
                                             f".*<variant>/<fold>, e.g. {cv / 'runs' / 'fusion' / 'fold1'}$"):
        load_checkpoint(cv)
    # a variant's folder of folds said 'a folder without a finescope run', not that its runs are inside it
    with pytest.raises(FinescopeError, match=f"is a folder of runs, not a run .*; pass one of them, e.g. "
                                             f"{cv / 'runs' / 'fusion' / 'fold1'}$"):
        load_checkpoint(cv / "runs" / "fusion")


@pytest.mark.slow
def test_compiled_training_writes_plain_checkpoints(synthetic_root, tmp_path, monkeypatch):
    """train.compile=reduce-overhead trains through torch.compile, marks where every step begins (CUDA graphs
    need it; on the CPU inductor compiles without them) and still saves the plain model's keys."""
    marks = []
    real_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or real_mark())
    out = tmp_path / "compiled"
    metrics = _train(synthetic_root, out, epochs=1, extra=["train.compile=reduce-overhead"])
    assert 0.0 <= metrics["image_accuracy"] <= 1.0
    keys = load_checkpoint(out / "checkpoints" / "last.pt")["model"].keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    seen = json.loads((out / "history.jsonl").read_text().splitlines()[0])["train_images"]
    batch = load_config(None, tiny_overrides(synthetic_root, "fusion", 1)).train.batch_size
    assert seen > 0 and len(marks) == math.ceil(seen / batch)  # one mark per training step


def test_cuda_graph_compile_refused_under_ddp(monkeypatch):
    """The modes that replay CUDA graphs are refused with one clear line when several processes train."""
    monkeypatch.setattr(trainer.dist, "is_distributed", lambda: True)
    with pytest.raises(FinescopeError, match="train.compile.*reduce-overhead.*train.compile=default"):
        trainer.compile_for_training(torch.nn.Linear(2, 2), "reduce-overhead")


@pytest.mark.slow
def test_compiled_training_survives_a_new_batch_shape():
    """A batch of another shape (here: mixed orientations, padded) recompiles a static graph. With inductor's
    dynamic shapes, its default on a second shape, that compile failed ('AssertionError: ToFloat(False)',
    torch 2.14 on the CPU) and training stopped with a traceback."""
    from finescope.config import ModelConfig
    from finescope.engine import compute_loss
    from finescope.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(variant="fusion", backbone="tiny", global_size=32, local_size=32), 2).train()
    fit = trainer.compile_for_training(model, "default")
    for sizes in ([[64, 96], [64, 96]], [[64, 96], [96, 64]]):
        sizes = torch.tensor(sizes)
        x = torch.rand(len(sizes), 3, *sizes.amax(0).tolist())
        loss = compute_loss(fit(x, sizes), torch.tensor([0, 1]))
        loss.backward()
        assert torch.isfinite(loss)


def test_colour_on_device_trains(synthetic_root, tmp_path, monkeypatch):
    """data.colour_on=device trains end to end: training batches carry the jitter's factors and the model
    input applies them; evaluation batches carry none. auto keeps the jitter in the workers on a CPU."""
    from finescope.data import Batch

    assert not trainer.colour_on_device(load_config(None, ["train.device=cpu"]))
    cfg = load_config(None, tiny_overrides(synthetic_root, "fusion", 1) + ["data.colour_on=device"])
    assert trainer.colour_on_device(cfg)
    samples = trainer.load_samples(cfg.data)
    train_ds = trainer.make_dataset(samples, [0, 1], cfg, train=True)
    assert train_ds.colour is not None  # drawn in the workers, applied on the device, not twice:
    assert not any(type(t).__name__ == "ColourJitter" for t in train_ds.transform.transforms)
    assert trainer.make_dataset(samples, [0, 1], cfg, train=False).colour is None
    # evaluating a run trained on CUDA on a machine without one: the evaluation data do not ask for the device
    cuda_cfg = load_config(None, tiny_overrides(synthetic_root, "fusion", 1) + ["train.device=cuda"])
    assert trainer.make_dataset(samples, [0, 1], cuda_cfg, train=False).colour is None
    carried = []
    real_input = Batch.model_input
    monkeypatch.setattr(Batch, "model_input", lambda self, *a, **k: carried.append(self.colour is not None)
                        or real_input(self, *a, **k))
    metrics = _train(synthetic_root, tmp_path / "run", epochs=1, extra=["data.colour_on=device"])
    assert 0.0 <= metrics["image_accuracy"] <= 1.0
    assert True in carried and False in carried  # training batches, then validation and test batches


def test_monitor_accuracy_and_an_undefined_metric_still_keep_a_best_checkpoint():
    """``train.monitor: accuracy`` reads the image accuracy; a metric that is undefined on the validation side
    (AUC with one class) scores -inf, and the first candidate epoch is still kept as best."""
    assert trainer._score({"image_accuracy": 0.75}, "accuracy") == 0.75
    assert trainer._score({"auc": float("nan")}, "auc") == float("-inf")
    assert trainer._score({"auc": None}, "auc") == float("-inf")
    assert trainer._score({"loss": 0.5}, "loss") == -0.5


def test_a_class_never_read_stops_a_compiled_run_unless_the_dropped_batch_held_one_of_its_images():
    """data.on_error=skip: train.compile drops each epoch's last incomplete global batch, and the check that a
    class was read was skipped in every epoch then: a compiled run trained on without a class whose images were
    all unreadable. Only a class with an image in the dropped batch (maybe a readable one) goes unchecked."""
    import numpy as np

    from finescope.data import SampleSet
    from finescope.data.records import Sample
    from finescope.distributed import ShardSampler

    sample_set = SampleSet([Sample(f"/img/{i}.png", i % 2, f"g{i}") for i in range(10)], ["a", "b"])
    train = np.arange(10)[::-1]  # sample_set positions; the sampler's items are positions in this list
    cfg = load_config(overrides=["data.on_error=skip", "train.compile=default"])
    sampler = ShardSampler(10, True, 0, 4, train=True, drop_tail=True, rank_=0, world=1)
    checked = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        assert sorted(sampler.dropped + list(sampler)) == list(range(10))  # 2 images of 10 left out
        unchecked = any(sample_set.samples[train[i]].label == 1 for i in sampler.dropped)
        checked.append(not unchecked)
        if unchecked:  # an image of 'b' was not read: that 'b' read none says nothing
            trainer._check_every_class_read([4, 0], sample_set, train, cfg, sampler.dropped)
        else:
            with pytest.raises(FinescopeError, match="none of the training images of class 'b' could be read"):
                trainer._check_every_class_read([4, 0], sample_set, train, cfg, sampler.dropped)
    assert True in checked and False in checked


def test_resume_of_a_folder_without_a_run_says_to_name_the_run(synthetic_root, tmp_path):
    # `train --config RUN/config.yaml --resume` without --out looks in runs/config: the line must not only say
    # to start without --resume, which would start a new run there
    cfg = load_config(None, tiny_overrides(synthetic_root, "fusion", 1))
    with pytest.raises(FinescopeError, match="no checkpoint at .*name the run's folder with --out"):
        trainer.train(cfg, tmp_path / "elsewhere", resume=True, progress=False)
    assert not (tmp_path / "elsewhere").exists()


def test_a_damaged_own_split_on_resume_says_how_to_get_it_back(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synthetic_root, "global", 1) + ["train.epochs=2"])
    trainer.train(load_config(None, tiny_overrides(synthetic_root, "global", 1)), out, progress=False)
    before = json.loads((out / "splits.json").read_text())["splits"]
    (out / "splits.json").write_text("{not json")
    with pytest.raises(FinescopeError, match="run's own split.*delete it and resume") as e:
        trainer.train(cfg, out, resume=True, progress=False)
    assert "data.splits" not in str(e.value)  # a resume refuses another data.splits: no advice to set it
    (out / "splits.json").unlink()  # as the line says: the resume draws the same split again
    trainer.train(cfg, out, resume=True, progress=False)
    assert json.loads((out / "splits.json").read_text())["splits"] == before


def test_train_refuses_an_out_whose_config_yaml_no_run_wrote(synthetic_root, tmp_path):
    """`train --config config.yaml --out .` replaced the user's experiment file with the run's resolved config. A
    config.yaml without a run's _provenance in --out is refused before anything is written; a run's own (one
    stopped before its first checkpoint) is trained over as before."""
    out = tmp_path / "project"
    out.mkdir()
    mine = "model:\n  variant: global  # my notes\n"
    (out / "config.yaml").write_text(mine)
    cfg = load_config(None, tiny_overrides(synthetic_root, "global", 1))
    with pytest.raises(FinescopeError, match=r"holds a config.yaml that no finescope run wrote"):
        trainer.train(cfg, out, progress=False)
    assert (out / "config.yaml").read_text() == mine and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    save_config(cfg, out / "config.yaml")  # a run's own, as one stopped before its first checkpoint leaves it
    trainer._check_not_users_config(out)


def test_resume_refuses_fewer_epochs_than_the_run_has_trained(fusion_run, synthetic_root):
    """A resume with train.epochs below the epochs trained said 'resuming after epoch 2 of 1', tested again and
    rewrote config.yaml with epochs: 1 for weights that had two. It is refused before anything is written; as
    many epochs as trained (a finished run tested again) or more still resume."""
    out, _ = fusion_run
    cfg = load_config(None, tiny_overrides(synthetic_root, "fusion", 1))
    with pytest.raises(FinescopeError, match=r"has trained 2 epochs, more than train.epochs=1; resume with "
                                             r"train.epochs of at least 2 \(its config.yaml has 2\)"):
        trainer._check_resume_config(out, cfg)
    for epochs in (2, 5):
        trainer._check_resume_config(out, load_config(None, tiny_overrides(synthetic_root, "fusion", epochs)))


def test_resume_refuses_another_config_and_keeps_the_runs_own(synthetic_root, tmp_path):
    import shutil

    out = tmp_path / "run"
    _train(synthetic_root, out, epochs=2)
    before = (out / "config.yaml").read_text()
    for change in (["model.variant=global"], ["seed=5"], ["train.lr=0.01"], ["data.augment=none"]):
        cfg = load_config(None, tiny_overrides(synthetic_root, "fusion", 2) + change)
        with pytest.raises(FinescopeError, match=change[0].split("=")[0]):
            trainer.train(cfg, out, resume=True, progress=False)
    assert (out / "config.yaml").read_text() == before  # nothing written before the check
    # the check reads the config in last.pt (written whole), not config.yaml, which a kill may have emptied
    (out / "config.yaml").write_text("")
    with pytest.raises(FinescopeError, match="train.lr"):
        trainer.train(load_config(None, tiny_overrides(synthetic_root, "fusion", 2) + ["train.lr=0.5"]), out,
                      resume=True, progress=False)
    # a run of an older finescope, without a key added since, resumes with the behaviour it was trained with
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    saved = state["config"]["model"].pop("selection_norm")
    del state["config"]["data"]["one_orientation"]
    torch.save(state, last)
    with pytest.raises(FinescopeError, match="model.selection_norm \\(was 'max', now 'minmax'\\)"):
        trainer._check_resume_config(out, load_config(None, tiny_overrides(synthetic_root, "fusion", 2)))
    trainer._check_resume_config(out, load_config(None, tiny_overrides(synthetic_root, "fusion", 2)
                                                  + ["model.selection_norm=max"]))
    state["config"]["model"]["selection_norm"] = saved
    torch.save(state, last)
    # where the data lives and loader settings may change; a partial last history line does not stop a resume
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_root, moved)
    with (out / "history.jsonl").open("a") as f:
        f.write('{"epoch": 7, "lr": 0.0')
    cfg = load_config(None, tiny_overrides(moved, "fusion", 2) + ["data.num_workers=0", "train.eval_batch_size=4"])
    with pytest.warns(UserWarning, match="not an epoch record"):
        trainer.train(cfg, out, resume=True, progress=False)
    assert [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()] == [0, 1]


def test_evaluate_keeps_the_split_with_loader_overrides_and_says_when_it_cannot(fusion_run, tmp_path):
    out, metrics = fusion_run
    result = trainer.evaluate(out, "test", ["data.num_workers=1", "data.cache=memory"], out=tmp_path / "m.json",
                              device="cpu")
    assert result["split"] == "test" and result["n_images"] == metrics["n_images"]
    loose = tmp_path / "loose.pt"
    loose.write_bytes((out / "checkpoints" / "best.pt").read_bytes())
    with pytest.warns(FinescopeWarning, match="evaluating all .* images, not the 'val' split: no splits.json"):
        result = trainer.evaluate(loose, "val", out=tmp_path / "n.json", device="cpu")
    assert result["split"] == "all"


def test_evaluate_of_a_checkpoint_without_its_splits_on_its_own_data_says_it_holds_the_training_images(
        fusion_run, synthetic_root, tmp_path):
    """A best.pt copied out of its run (shared, say) and evaluated as it is scored every image of the data.root it
    was trained on, training and validation images among them, with only 'no splits.json' in a warning and
    split_leak null: metrics of seen images reported as of all images. It is now said, in the warning, split_leak
    and so the report; other data (--set data.root=...) is not flagged."""
    out, _ = fusion_run
    loose = tmp_path / "loose.pt"
    loose.write_bytes((out / "checkpoints" / "best.pt").read_bytes())
    with pytest.warns(FinescopeWarning, match="data.root '.*' is the one this model was trained on.* include the "
                                              "images it trained and validated on"):
        result = trainer.evaluate(loose, "all", out=tmp_path / "m.json", device="cpu")
    assert "the one this model was trained on" in result["split_leak"]
    assert "the one this model was trained on" in json.loads((tmp_path / "m.json").read_text())["split_leak"]
    other = tmp_path / "other"
    shutil.copytree(synthetic_root, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FinescopeWarning)
        result = trainer.evaluate(loose, "all", [f"data.root={other}"], out=tmp_path / "o.json", device="cpu")
    assert result["split_leak"] is None


def test_evaluate_on_other_data_names_the_images_of_patients_the_run_trained_on(fusion_run, synthetic_root, tmp_path):
    """`evaluate RUN --set data.root=OTHER` scores every image of OTHER as unseen data; a copy that holds images the
    run trained on (the full dataset, say, of which the run read a part) scored them too, without a word."""
    out, _ = fusion_run
    lists = json.loads((out / "splits.json").read_text())["splits"]
    with (synthetic_root / "manifest.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    chosen = [rows[p] for p in lists["train"][:2] + lists["test"][:2]]
    for r in chosen:
        shutil.copy(synthetic_root / r["path"], other / r["path"])
    with (other / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(chosen[0]))
        w.writeheader()
        w.writerows(chosen)
    with pytest.warns(FinescopeWarning, match="2 of the 4 images .* the run trained or validated on"):
        result = trainer.evaluate(out, "all", [f"data.root={other / 'manifest.csv'}"], out=tmp_path / "m.json",
                                  device="cpu")
    assert result["split"] == "all" and "trained or validated on" in result["split_leak"]
    assert "trained or validated on" in json.loads((tmp_path / "m.json").read_text())["split_leak"]


def test_a_runs_own_split_that_no_longer_matches_its_data_is_told_where_to_point_data_root(synthetic_root, tmp_path,
                                                                                             capsys):
    """evaluate and explain --split of a run whose data lost an image said "draw new splits by leaving data.splits
    empty", a key the user never set and which cannot change a trained run's split."""
    from finescope.cli import main

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    _train(root, tmp_path / "run", epochs=1)
    manifest = root / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # an image of the run's split is gone from its data
    with pytest.raises(FinescopeError, match="point data.root at the data this run was trained on") as e:
        trainer.evaluate(tmp_path / "run", "test", out=tmp_path / "m.json", device="cpu")
    assert "data.splits" not in str(e.value)
    assert main(["explain", str(tmp_path / "run"), "--split", "test", "--out", str(tmp_path / "ex"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "point data.root at the data this run was trained on" in err and "data.splits" not in err


def test_a_resume_without_its_splits_json_refuses_a_split_drawn_again_otherwise(synthetic_root, tmp_path):
    """--resume of a run whose splits.json is gone (deleted, as the error for a damaged one suggests) drew the split
    again from the data: on data that had changed since, another one, so images last.pt trained on went to test
    and its metrics leaked, without a word. The same data still draws the same split and resumes."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    out = tmp_path / "run"
    _train(root, out, variant="global", epochs=1)
    (out / "splits.json").unlink()
    cfg = load_config(None, tiny_overrides(root, "global", 2))
    trainer.train(cfg, out, resume=True, progress=False)  # unchanged data: the same split, resumed
    assert (out / "splits.json").is_file()
    (out / "splits.json").unlink()
    manifest = root / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one image left out: the groups are dealt anew
    with pytest.raises(FinescopeError, match=r"splits.json is missing and the split drawn again .* is not the one "
                                             r"checkpoints/last.pt trained on"):
        trainer.train(load_config(None, tiny_overrides(root, "global", 3)), out, resume=True, progress=False)


def test_thin_splits_are_named_before_training():
    """A drawn split whose validation side came out empty, or whose test side lacks classes, is said, not left
    to be found in the metrics (3 classes: one with 3 groups, one with 2, one with 1)."""
    from types import SimpleNamespace

    from finescope.data.splits import split_groups

    labels = [0] * 6 + [1] * 4 + [2] * 2
    groups = ["a1", "a1", "a2", "a2", "a3", "a3", "b1", "b1", "b2", "b2", "c1", "c1"]
    data = SimpleNamespace(labels=labels, groups=groups, class_names=["x", "y", "z"])
    cfg = load_config(None, ["data.val_fraction=0.15", "data.test_fraction=0.3"])
    splits = split_groups(labels, groups, 0.3, 0.15, seed=0)
    assert len(splits["val"]) == 0  # no class keeps 3 groups after test took one
    val, test = trainer.thin_split_warnings(splits, data, cfg, drawn=True)
    assert val.startswith("the validation split is empty at data.val_fraction=0.15: 6 groups for 3 classes")
    assert test.startswith("the test split holds 2 of 3 classes (no image of z:")
    # asked for: no validation side is no news; a split file chose its own sides
    cfg = load_config(None, ["data.val_fraction=0", "data.test_fraction=0.3"])
    assert [m[:30] for m in trainer.thin_split_warnings(splits, data, cfg, drawn=True)] == [test[:30]]
    assert len(trainer.thin_split_warnings(splits, data, cfg, drawn=False)) == 1
    splits["test"] = splits["test"][:0]
    cfg = load_config(None, ["data.val_fraction=0", "data.test_fraction=0.3"])
    assert trainer.thin_split_warnings(splits, data, cfg, drawn=True)[0].startswith("the test split is empty")


def test_an_empty_split_from_groups_that_look_like_no_patients_points_at_the_grouping(tmp_path):
    """data.source=folder on the BreakHis tree at breast/ grouped every image under 'SOB': train said the
    validation and test sides were empty and to 'Add data', though the data has many patients. The messages now
    point at the grouping; a class of few groups holding many images each says how it is grouped, and where those
    are no patients what to set."""
    from PIL import Image

    from finescope.data import load_samples, split_groups

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (90, 40, 160)).save(path)

    for cls, code, patient in (("benign", "A", "22549AB"), ("benign", "F", "29960AB"), ("malignant", "DC", "12312")):
        image(tmp_path / "bh" / cls / "SOB" / f"{cls[0].upper()}{patient}" / f"SOB_{cls[0].upper()}_{code}-14-"
              f"{patient}-100-001.png")
    cfg = load_config(None, ["data.source=folder", f"data.root={tmp_path / 'bh'}"])
    with pytest.warns(FinescopeWarning, match="the group 'SOB' holds"):
        data = load_samples(cfg.data)
    val, test = trainer.thin_split_warnings(split_groups(data.labels, data.groups, 0.3, 0.15, 0), data, cfg, True)
    assert "the groups look like no patients (see the warning on data.source=folder's groups)" in val
    assert "Add data" not in val and "Group the images by patient as that warning says" in val
    assert "the groups look like no patients" in test
    for cls, patients in {"a": ["P1"], "b": ["P2", "P3"]}.items():  # 25 images per patient folder
        for p in patients:
            for n in range(25):
                image(tmp_path / "few" / cls / p / f"{n}.png")
    cfg = load_config(None, ["data.source=folder", f"data.root={tmp_path / 'few'}"])
    data = load_samples(cfg.data)
    val, _ = trainer.thin_split_warnings(split_groups(data.labels, data.groups, 0.3, 0.15, 0), data, cfg, True)
    assert ("data.source=folder groups the images by the first sub-folder below each class folder, which gives "
            "class a 1 group ('P1') for its 25 images; where those are no patients, set data.group_pattern") in val
    assert "Else add data, or set data.val_fraction=0" in val


def test_an_empty_split_from_a_csv_column_that_looks_like_no_patients_points_at_that_column(tmp_path):
    """A CSV manifest whose group column names one thing for every image ('SOB') is warned about as a folder's
    groups are; the empty sides of its split point at that warning, not at data.source=folder's groups."""
    from PIL import Image

    from finescope.data import load_samples, split_groups

    rows = ["path,label,group"]
    for cls in ("a", "b"):
        for n in range(20):
            Image.new("RGB", (8, 6), (90, 40, 160)).save(tmp_path / f"{cls}{n}.png")
            rows.append(f"{cls}{n}.png,{cls},SOB")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, ["data.source=csv", f"data.root={tmp_path / 'm.csv'}"])
    with pytest.warns(FinescopeWarning, match=r"^CSV manifest '.*m\.csv' groups the images by its 'group' column, and "
                      r"the group 'SOB' holds every image of class a and images of every other class too \(40 images\): a group such "
                      r"as this is rarely one patient"):
        data = load_samples(cfg.data)
    val, test = trainer.thin_split_warnings(split_groups(data.labels, data.groups, 0.3, 0.15, 0), data, cfg, True)
    assert "the groups look like no patients (see the warning on the CSV manifest's groups)" in val
    assert "Group the images by patient as that warning says" in val and "data.source=folder" not in val + test


def test_a_new_run_of_a_real_backbone_from_random_weights_says_how_to_start_from_imagenet(synthetic_root, tmp_path,
                                                                                           monkeypatch):
    """configs/breakhis_binary.yaml (model.weights empty, model.pretrained false) trained MobileNetV2 from random
    weights without a word, where users expect ImageNet's. A new run says so in one line once its model is built;
    the tiny test and demo backbone, given weights and a resume (whose weights come from last.pt) say nothing."""

    class Built(Exception):
        """Raised where training would start: the warnings of a run's start are all made."""

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(trainer, "build_optimizer", stop)
    monkeypatch.setattr(trainer, "_check_resume_config", lambda run_dir, cfg: {"class_names": ["atypical", "typical"]})
    torch.save(torchvision_mobilenet_trunk(), tmp_path / "w.pth")

    def warned(overrides: list[str], resume: bool = False) -> list[str]:
        cfg = load_config(None, tiny_overrides(synthetic_root) + ["model.backbone=mobilenet_v2", *overrides])
        trainer._WARNED_SCRATCH.clear()  # said once per backbone and data in a process (a cv's folds)
        with warnings.catch_warnings(record=True) as caught, pytest.raises(Built):
            warnings.simplefilter("always")
            trainer.train(cfg, tmp_path / f"run{len(list(tmp_path.iterdir()))}", resume=resume, progress=False)
        return [str(w.message) for w in caught if issubclass(w.category, FinescopeWarning)]

    (message,) = warned([])
    assert message.startswith("model.backbone mobilenet_v2 starts from random weights (model.weights is empty and "
                              "model.pretrained false)")
    assert "model.pretrained=true" in message and "model.weights=PATH" in message and "\n" not in message
    again = load_config(None, tiny_overrides(synthetic_root) + ["model.backbone=mobilenet_v2"])
    assert trainer.scratch_warning(again) is None  # said already in this process: a cv's next fold says nothing
    assert warned([f"model.weights={tmp_path / 'w.pth'}"]) == []
    trainer._WARNED_SCRATCH.clear()
    assert trainer.scratch_warning(load_config(None, ["model.backbone=mobilenet_v2", "model.pretrained=true"])) is None
    assert warned(["model.backbone=tiny"]) == warned([], resume=True) == []
    assert load_config(Path("configs/demo.yaml"), []).model.backbone == "tiny"  # make demo: no such warning


def torchvision_mobilenet_trunk() -> dict:
    """A state dict of torchvision's MobileNetV2, as model.weights reads one (random, but a file)."""
    import torchvision

    return torchvision.models.mobilenet_v2().state_dict()


def test_a_training_split_without_a_class_is_named_before_training():
    """A drawn split deals each group by its majority class: a class whose images all lie in groups mostly of
    another class (z, in patient a1) went to test with them for seed 1, and the model was trained without it
    and scored on it without a word."""
    from types import SimpleNamespace

    from finescope.data.splits import split_groups

    labels = [0, 0, 2, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    groups = ["a1", "a1", "a1", "a2", "a2", "a3", "a3", "b1", "b1", "b2", "b2", "b3", "b3"]
    data = SimpleNamespace(labels=labels, groups=groups, class_names=["x", "y", "z"])
    cfg = load_config(None, ["data.val_fraction=0", "data.test_fraction=0.3"])
    splits = split_groups(labels, groups, 0.3, 0.0, seed=1)
    assert 2 not in {labels[i] for i in splits["train"]}
    (message,) = trainer.thin_split_warnings(splits, data, cfg, drawn=True)
    assert message.startswith("the training split holds no image of z")
    assert "\n" not in message and message.endswith("change seed to draw another split, or give one with data.splits")
    (given,) = trainer.thin_split_warnings(splits, data, cfg, drawn=False)  # a split file, a cv fold
    assert given.endswith("give a split whose training side holds every class")
    others = trainer.thin_split_warnings(split_groups(labels, groups, 0.3, 0.0, seed=0), data, cfg, True)
    assert not any(m.startswith("the training split") for m in others)  # seed 0 trains on z (and tests without it)


def test_a_validation_side_of_one_class_under_monitor_auc_is_named_before_training():
    """AUC is undefined on a validation side of one class: every epoch scored -inf, so best.pt stayed the first
    epoch and early stopping ended the run train.patience epochs later, without a word. The split is named;
    another monitor, or a validation side of two classes, is no news."""
    from types import SimpleNamespace

    import numpy as np

    data = SimpleNamespace(labels=[0, 1, 0, 1, 0, 0, 1], groups=list("abcdefg"), class_names=["x", "y"])
    splits = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "test": np.array([6, 2])}
    auc = load_config(None, ["train.monitor=auc"])
    (message,) = trainer.thin_split_warnings(splits, data, auc, drawn=False)
    assert message.startswith("train.monitor is auc, which the validation split cannot measure: it holds images "
                              "of one class (x)")
    assert trainer.thin_split_warnings(splits, data, load_config(None, []), drawn=False) == []
    splits["val"] = np.array([4, 6])
    assert trainer.thin_split_warnings(splits, data, auc, drawn=False) == []


def test_a_drawn_validation_side_without_a_trained_class_is_named_before_training():
    """A class spares a group for validation only with 3 groups left after test: a drawn split whose validation
    side held x but no y judged early stopping and best.pt by x alone, without a word (cv's folds said so,
    train's own split did not). A split file or a cv fold (drawn=False) is told by cv itself."""
    from types import SimpleNamespace

    import numpy as np

    data = SimpleNamespace(labels=[0, 1, 0, 1, 0, 0, 1], groups=list("abcdefg"), class_names=["x", "y"])
    splits = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "test": np.array([6, 2])}
    cfg = load_config(None, [])
    (message,) = trainer.thin_split_warnings(splits, data, cfg, drawn=True)
    assert message.startswith("the validation split holds no image of y (a class spares a group for it only with 3 "
                              "or more groups left after the test side): early stopping and best.pt judge the run by "
                              "the other classes only") and "\n" not in message
    assert trainer.thin_split_warnings(splits, data, cfg, drawn=False) == []
    splits["val"] = np.array([4, 6])
    assert trainer.thin_split_warnings(splits, data, cfg, drawn=True) == []


def test_a_finished_run_trained_on_is_not_marked_finished_until_it_is(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _train(synthetic_root, out, variant="global", epochs=1)
    assert (out / "metrics.json").is_file()
    cfg = load_config(None, tiny_overrides(synthetic_root, "global", 2))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed in the epoch the resume adds
        m.setattr(trainer, "_run_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg, out, resume=True, progress=False)
    assert not (out / "metrics.json").exists()  # the epoch-1 metrics no longer say the run is finished
    from finescope.report import write_report

    with pytest.raises(FinescopeError, match="neither a cv.s predictions.csv"):  # nor report its test as this run's
        write_report(out)
    trainer.train(cfg, out, resume=True, progress=False)
    assert json.loads((out / "metrics.json").read_text())["n_images"] > 0
    assert (out / "predictions_test.csv").is_file()
    # resumed when done (testing again) keeps it until the new one replaces it
    trainer.train(cfg, out, resume=True, progress=False)
    assert (out / "metrics.json").is_file()


def test_resume_after_an_early_stop_with_more_patience_trains_on(synthetic_root, tmp_path, capsys):
    """README: train.patience and train.epochs may change on --resume "to train longer"; a run that stopped
    early continues when the new patience allows it (the stop is decided again, not read from the checkpoint)."""
    out = tmp_path / "early"
    _train(synthetic_root, out, variant="global", epochs=3, extra=["train.patience=0"])  # stops after epoch 1
    assert len((out / "history.jsonl").read_text().splitlines()) == 1
    cfg = load_config(None, tiny_overrides(synthetic_root, "global", 3) + ["train.patience=100"])
    capsys.readouterr()
    trainer.train(cfg, out, resume=True)
    assert f"resuming {out} after epoch 1 of 3, with 1 process\n" in capsys.readouterr().out
    assert [json.loads(r)["epoch"] for r in (out / "history.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_run_trained_longer_takes_its_first_step_on_the_recomputed_schedule(synthetic_root, tmp_path, monkeypatch):
    """README: train.epochs may change on --resume to train longer, the cosine schedule recomputed over the new
    length. The first step of the resumed run still took the rate the optimizer's state stored (the end of the
    shorter schedule: 0 for a finished run), as did history's lr; only the steps after it followed the new one."""
    import math

    out = tmp_path / "longer"
    _train(synthetic_root, out, variant="global", epochs=2, extra=["train.warmup_epochs=1"])
    used = _record_step_rates(monkeypatch)
    cfg = load_config(None, tiny_overrides(synthetic_root, "global", 4) + ["train.warmup_epochs=1"])
    trainer.train(cfg, out, resume=True, progress=False)
    S = len(used) // 2  # steps per epoch; 4 S in all, S of warm-up: the resume starts a third into the cosine
    assert used[0] == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert used[1] == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi * (S + 1) / (3 * S))))
    assert json.loads((out / "history.jsonl").read_text().splitlines()[2])["lr"] == used[0]


def test_a_finished_run_without_a_test_split_resumed_says_nothing_is_left(synthetic_root, tmp_path, capsys):
    """A finished run with data.test_fraction=0 resumed said 'its training is done: testing again', and tested
    nothing (it has no test split)."""
    out = tmp_path / "untested"
    extra = ["data.test_fraction=0"]
    _train(synthetic_root, out, variant="global", epochs=1, extra=extra)
    capsys.readouterr()
    assert trainer.train(load_config(None, tiny_overrides(synthetic_root, "global", 1) + extra), out, resume=True) == {}
    assert (f"resuming {out} after epoch 1 of 1, with 1 process; its training is done and it has no test split: "
            "nothing is left to do\n") in capsys.readouterr().out


def test_a_run_of_an_older_finescope_or_another_machine_loads_as_trained(fusion_run, tmp_path):
    """A checkpoint whose config lacks model.selection_norm (added with 'max', now 'minmax'),
    model.selection_components (added with 'grid', now 'exact') or model.selection_peaks (added with 'grid', now
    'nodes') is read with the selection it was trained with;
    one trained on train.device=cuda loads on a machine without CUDA under --device auto."""
    out, _ = fusion_run
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert state["config"]["model"]["selection_components"] == "exact"
    assert state["config"]["model"]["selection_peaks"] == "nodes"
    for key in ("selection_norm", "selection_components", "selection_peaks"):
        del state["config"]["model"][key]
    state["config"]["train"]["device"] = "cuda"
    torch.save(state, tmp_path / "old.pt")
    model, cfg, _, _ = trainer.load_trained(tmp_path / "old.pt")
    assert cfg.model.selection_norm == "max" and model.selection_norm == "max"
    assert cfg.model.selection_components == "grid" and model.selection_components == "grid"
    assert cfg.model.selection_peaks == "grid" and model.selection_peaks == "grid"
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_run_trained_with_compile_predicts_with_depthwise_convolutions_off_cudnn(fusion_run, tmp_path):
    """train.cudnn_depthwise=false is refused beside train.compile in training; inference never compiles, so
    predict/evaluate/explain of a run trained with train.compile take it (the README's case: a folder of many
    image sizes), and the loaded config says train.compile off."""
    out, _ = fusion_run
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["train"]["compile"] = "default"
    state["config"]["model"]["backbone"] = "tiny"
    torch.save(state, tmp_path / "compiled.pt")
    _, cfg, _, _ = trainer.load_trained(tmp_path / "compiled.pt", ["train.cudnn_depthwise=false"], device="cpu")
    assert cfg.train.cudnn_depthwise is False and cfg.train.compile == "off"


def _renamed_first_weight(state):
    key = next(iter(state["model"]))
    state["model"]["old." + key] = state["model"].pop(key)


def _one_parameter_less(state):
    state["optimizer"]["param_groups"][0]["params"].pop()


def _no_tracker(state):
    del state["tracker"]


@pytest.mark.parametrize("damage", [_renamed_first_weight, _one_parameter_less, _no_tracker])
def test_resume_of_a_last_pt_this_finescope_does_not_build_is_one_line(fusion_run, synthetic_root, tmp_path,
                                                                       damage):
    """A last.pt of another finescope version (its model's keys, its optimizer's groups or its entries) under
    the run's own config: one line naming the file, no traceback from torch."""
    out, _ = fusion_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    damage(state)
    torch.save(state, run / "checkpoints" / "last.pt")
    cfg = load_config(None, tiny_overrides(synthetic_root) + ["train.epochs=3"])
    with pytest.raises(FinescopeError, match=r"--resume: '.*last.pt' \(written by finescope .*\) does not"):
        trainer.train(cfg, run, resume=True, progress=False)


def test_history_survives_a_kill_between_its_line_and_the_checkpoint(synthetic_root, tmp_path, monkeypatch):
    """The epoch's history line is written before last.pt: a kill between the two loses no line (the resume
    drops the extra one and trains that epoch again); a new run into a folder with a stale history starts it
    afresh."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text('{"epoch": 0, "lr": 1.0}\n{"epoch": 1, "lr": 1.0}\n')  # left by another run
    real_save = trainer.save_checkpoint

    def killed_at_second_last(state, path):
        if state["epoch"] == 1 and path.name == "last.pt":
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(trainer, "save_checkpoint", killed_at_second_last)
    with pytest.raises(KeyboardInterrupt):
        _train(synthetic_root, out, variant="global", epochs=3)
    lines = [json.loads(r) for r in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and "train_loss" in lines[0]  # the stale lines are gone
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    trainer.train(load_config(None, tiny_overrides(synthetic_root, "global", 3)), out, resume=True, progress=False)
    assert [json.loads(r)["epoch"] for r in (out / "history.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_kill_between_the_checkpoints_of_a_best_epoch_keeps_the_trackers_best_pt(synthetic_root, tmp_path,
                                                                                      monkeypatch):
    """A kill between an epoch's best.pt and last.pt, and a resume whose rerun of that epoch scores lower (a
    resume may change the processes, channels_last, the device: the numbers move a little): best.pt must stay
    the epoch the run's tracker and metrics.json name, not the killed run's epoch."""
    out = tmp_path / "run"
    real_save, saves = trainer.save_checkpoint, []

    def killed_between(state, path):
        saves.append(state["epoch"])
        if saves.count(1) == 2:  # the second checkpoint of epoch 1, a new best
            raise KeyboardInterrupt
        real_save(state, path)

    scores = iter(range(100))
    monkeypatch.setattr(trainer, "_score", lambda metrics, monitor: float(next(scores)))  # every epoch a best
    monkeypatch.setattr(trainer, "save_checkpoint", killed_between)
    with pytest.raises(KeyboardInterrupt):
        _train(synthetic_root, out, variant="global", epochs=3)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    monkeypatch.setattr(trainer, "_score", lambda metrics, monitor: float("-inf"))  # the rerun scores lower
    metrics = trainer.train(load_config(None, tiny_overrides(synthetic_root, "global", 3)), out, resume=True,
                            progress=False)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["epoch"] == load_checkpoint(out / "checkpoints" / "last.pt")["tracker"]["best_epoch"] == 1
    assert metrics["best_epoch"] == 1


@pytest.mark.parametrize("damage", ["cut", "missing"])
@pytest.mark.parametrize("epochs", [3, 2])  # to train on, and a finished run tested again
def test_resume_refuses_a_damaged_best_pt_of_an_earlier_epoch_first(synthetic_root, tmp_path, monkeypatch, damage,
                                                                     epochs):
    """best.pt of an epoch before last.pt's (copied part way, or deleted) was found only by the test after the
    resumed epochs, in an error that said to pass another checkpoint; nothing could then test the run. Refused
    first, naming the file and its epoch; nothing of the run is written."""
    out = tmp_path / "run"
    scores = iter([1.0, 0.0])
    with monkeypatch.context() as m:  # epoch 0 is the best, epoch 1 (last.pt's) is not
        m.setattr(trainer, "_score", lambda metrics, monitor: next(scores))
        _train(synthetic_root, out, variant="global", epochs=2)
    best = out / "checkpoints" / "best.pt"
    if damage == "cut":
        best.write_bytes(best.read_bytes()[:5000])
    else:
        best.unlink()
    before = {p.name: p.read_bytes() for p in (*out.iterdir(), *(out / "checkpoints").iterdir()) if p.is_file()}
    cfg = load_config(None, tiny_overrides(synthetic_root, "global", epochs))
    with pytest.raises(FinescopeError, match=rf"--resume: '{re.escape(str(best))}' holds the run's best epoch "
                                             r"\(1\), which its test reads, but (is missing|cannot be read)"
                                             r".*copy it back"):
        trainer.train(cfg, out, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in (*out.iterdir(), *(out / "checkpoints").iterdir())
            if p.is_file()} == before


def test_resume_of_a_last_pt_cut_short_says_what_a_resume_can_do(fusion_run, synthetic_root, tmp_path):
    """A last.pt cut short was named with load_checkpoint's advice to pass another checkpoint of the run, which
    --resume cannot take. The line says to copy it back or to copy best.pt over it, which resumes from the best
    epoch to the weights of the uninterrupted run."""
    out, _ = fusion_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = load_config(None, tiny_overrides(synthetic_root))
    with pytest.raises(FinescopeError) as e:
        trainer.train(cfg, run, resume=True, progress=False)
    assert str(e.value).startswith(f"--resume: '{last}' cannot be read (a copy cut short?); copy it back from where "
                                   f"it came, or copy '{run / 'checkpoints' / 'best.pt'}' over it to resume from "
                                   "the run's best epoch")
    assert "pass another checkpoint" not in str(e.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    shutil.copyfile(run / "checkpoints" / "best.pt", last)
    trainer.train(cfg, run, resume=True, progress=False)
    _assert_same_weights(run, out)


def test_a_run_whose_last_pt_was_deleted_is_not_trained_over(fusion_run, synthetic_root, tmp_path):
    """A finished run whose last.pt was deleted (it holds the optimizer's state; best.pt is what evaluate reads)
    was taken for an empty folder: train without --resume, which --resume's own line advised, wrote a new run over
    its best.pt and metrics.json. Both now refuse, naming best.pt; copying it to last.pt resumes the run."""
    out, _ = fusion_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "checkpoints" / "last.pt").unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    cfg = load_config(None, tiny_overrides(synthetic_root))
    best = run / "checkpoints" / "best.pt"
    with pytest.raises(FinescopeError, match=f"^'{re.escape(str(run))}' already holds a run"):
        trainer.train(cfg, run, progress=False)
    with pytest.raises(FinescopeError) as e:
        trainer.train(cfg, run, resume=True, progress=False)
    assert str(e.value) == (f"--resume: no checkpoint at '{run / 'checkpoints' / 'last.pt'}', but the run has "
                            f"'{best}': copy it to last.pt to resume from the run's best epoch, or choose another --out")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    shutil.copyfile(best, run / "checkpoints" / "last.pt")
    trainer.train(cfg, run, resume=True, progress=False)
    _assert_same_weights(run, out)


def test_metrics_json_is_written_after_the_predictions(synthetic_root, tmp_path, monkeypatch):
    """metrics.json marks a finished run (cv counts a fold done by it): a run that fails while writing its
    predictions has neither file, and no temporary file is left."""
    def disk_full(path, *args, **kwargs):
        with trainer.atomic_open(path) as f:
            f.write("path,group")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "write_predictions", disk_full)
    with pytest.raises(OSError):
        _train(synthetic_root, tmp_path / "run", variant="global", epochs=1)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "predictions_test.csv").exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_test_metrics_and_predictions_score_patients_not_case_groups(tmp_path, monkeypatch):
    """BreakHis patient folders 22549AB / 22549CD share case 22549 (the split group); the run's PRR averages over
    the patients, as method.md defines it, and predictions_test.csv says each image's patient."""
    import numpy as np

    from finescope.data import Sample, SampleSet
    from finescope.engine import Predictions

    meta = [{"patient": "22549AB"}] * 2 + [{"patient": "22549CD"}] * 2
    s = SampleSet([Sample(f"/d/{i}.png", 0, "22549", m) for i, m in enumerate(meta)], ["benign", "malignant"])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])  # 22549AB 2/2, 22549CD 1/2
    monkeypatch.setattr(trainer, "predict_loader", lambda *a, **k: Predictions(np.arange(4), np.zeros(4, int), probs))
    _, metrics = trainer.evaluate_split(None, s, np.arange(4), load_config(), "cpu", loader=object())
    assert metrics["patient_recognition_rate"] == pytest.approx((1 + 0.5) / 2)  # the case alone: 3 / 4
    trainer.write_predictions(tmp_path / "p.csv", Predictions(np.arange(4), np.zeros(4, int), probs), s)
    with (tmp_path / "p.csv").open(newline="") as fh:
        assert [r["patient"] for r in csv.DictReader(fh)] == ["22549AB", "22549AB", "22549CD", "22549CD"]


def test_test_metrics_score_equal_patient_ids_of_two_groups_as_two_patients(monkeypatch):
    """A manifest's patient 'P1' of group A and 'P1' of group B are two patients (README; the report and cv score
    them so); metrics.json merged them into one: PRR 0.5 over 1 patient where the report said 0.5 over 2."""
    import numpy as np

    from finescope.data import Sample, SampleSet
    from finescope.engine import Predictions

    s = SampleSet([Sample(f"/d/{i}.png", 0, g, {"patient": "P1"}) for i, g in enumerate("AAB")], ["a", "b"])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])  # A's P1 2/2 right, B's P1 0/1
    monkeypatch.setattr(trainer, "predict_loader", lambda *a, **k: Predictions(np.arange(3), np.zeros(3, int), probs))
    _, metrics = trainer.evaluate_split(None, s, np.arange(3), load_config(), "cpu", loader=object())
    assert metrics["patient_recognition_rate"] == pytest.approx((1 + 0) / 2)  # one patient: 2 / 3
    assert metrics["patient_accuracy_majority"] == pytest.approx(1 / 2)  # one patient: 1
    assert metrics["n_groups"] == 2


def test_patience_zero_waits_for_a_candidate_epoch_and_is_off_without_validation(synthetic_root, tmp_path):
    """train.patience=0 stops after the first candidate for best.pt: not after a crop warm-up epoch, which is
    none (the run ended there without a best.pt to test), and never without a validation side, where README
    says early stopping is off."""
    metrics = _train(synthetic_root, tmp_path / "warm", extra=["train.patience=0", "train.crop_warmup_epochs=1"])
    assert metrics["best_epoch"] == 1
    out = tmp_path / "no_val"
    _train(synthetic_root, out, variant="global", extra=["train.patience=0", "data.val_fraction=0"])
    assert [json.loads(r)["epoch"] for r in (out / "history.jsonl").read_text().splitlines()] == [0, 1]


def test_a_split_whose_images_were_all_skipped_is_named_with_the_fix(tmp_path):
    """data.on_error=skip with every validation (or test) image unreadable: the run stopped after its first epoch
    with 'no images to evaluate', which named neither the split nor what to do."""
    import numpy as np

    from finescope.data import Sample, SampleSet

    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    s = SampleSet([Sample(str(tmp_path / f"{i}.png"), i, f"p{i}") for i in range(2)], ["a", "b"])
    cfg = load_config(None, ["data.on_error=skip", "data.num_workers=0", "train.device=cpu"])
    with pytest.warns(FinescopeWarning), pytest.raises(FinescopeError, match="none of the 2 images of the val split "
                                                       "could be evaluated.*data.on_error=skip.*fix or remove"):
        trainer.evaluate_split(torch.nn.Identity(), s, np.arange(2), cfg, torch.device("cpu"), desc="val")


def test_a_cuda_device_this_machine_lacks_is_one_error_and_a_runs_own_is_not_reused(monkeypatch):
    """train.device (or --device) cuda:1 on a one-GPU machine passed the check and failed in torch with
    'invalid device ordinal' and a traceback; evaluate and predict of a run trained on cuda:1 picked that device
    too. It is an error naming the GPUs here, and a run's own device is reused only where it exists."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert trainer.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(FinescopeError, match=r"'cuda:1' \(train.device, or --device\) but this machine has 1 CUDA "
                                             r"GPU \(cuda:0 to cuda:0\)"):
        trainer.resolve_device("cuda:1")
    assert trainer.has_device("cuda") and trainer.has_device("cpu") and not trainer.has_device("cuda:1")


def test_a_diverged_epoch_stops_before_its_checkpoints_which_keep_the_last_good_state(synthetic_root, tmp_path,
                                                                                      monkeypatch):
    """Weights that became NaN in epoch 2 stop the run before its files: last.pt and best.pt stay epoch 1's
    (a --resume goes on from a good model), the error names them and the fix. Without a validation side
    nothing else noticed: last.pt and best.pt were overwritten with NaN weights."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    real_train_one_epoch = trainer.train_one_epoch
    kept = {}

    def diverging(model, *args, **kwargs):
        if len(kept) == 0 and (ckpt / "last.pt").is_file():  # epoch 2: what epoch 1 wrote, then NaN weights
            kept.update({name: (ckpt / name).read_bytes() for name in ("last.pt", "best.pt")})
            with torch.no_grad():
                next(trainer.unwrap(model).parameters()).fill_(float("nan"))
        return real_train_one_epoch(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", diverging)
    with pytest.raises(FinescopeError) as e:
        _train(synthetic_root, out, variant="global", epochs=3, extra=["data.val_fraction=0"])
    assert str(e.value).startswith("training diverged in epoch 2 of 3: the model's weights or BatchNorm statistics "
                                   "hold NaN, infinite or huge values (beyond 1e+08) (first 'backbone.trunk.0.0.weight', "
                                   "max |value| nan; mean training loss nan); "
                                   f"'{ckpt / 'last.pt'}' (epoch 1) and best.pt (epoch 1) keep the last good state; "
                                   "train in a new --out with a lower train.lr (now 0.003)")
    assert kept and all((ckpt / name).read_bytes() == data for name, data in kept.items())
    assert [json.loads(r)["epoch"] for r in (out / "history.jsonl").read_text().splitlines()] == [0]
    assert not (out / "metrics.json").exists()


def test_a_huge_finite_weight_stops_the_run_like_a_nan_one(synthetic_root, tmp_path, monkeypatch):
    """A weight of 1e30 (an exploding step) is finite, and so are the losses and probabilities it gives: the run
    went on and saved it in last.pt and best.pt. Now the epoch stops before its checkpoints, naming the tensor."""
    out = tmp_path / "run"
    real_train_one_epoch = trainer.train_one_epoch

    def exploding(model, *args, **kwargs):
        with torch.no_grad():
            trainer.unwrap(model).global_head.weight[0, 0] = 1e30
        return real_train_one_epoch(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", exploding)
    with pytest.raises(FinescopeError, match=r"^training diverged in epoch 1 of 2: the model's weights or BatchNorm "
                                             r"statistics hold NaN, infinite or huge values \(beyond 1e\+08\) \(first "
                                             r"'global_head.weight', max \|value\| 1e\+30; mean training loss [^;]+\); "
                                             r"no checkpoint was written; train again with a lower train.lr"):
        _train(synthetic_root, out, variant="global")
    assert not list((out / "checkpoints").glob("*.pt"))


def test_a_run_diverged_in_its_first_epoch_writes_no_checkpoint(synthetic_root, tmp_path):
    """train.lr=1e8: the first epoch leaves infinite BatchNorm variances, with which validation still gave
    finite probabilities, so last.pt and best.pt were written with them (and the test then failed on NaN)."""
    out = tmp_path / "run"
    with pytest.raises(FinescopeError, match=r"^training diverged in epoch 1 of 2: .*; no checkpoint was written; "
                                             r"train again with a lower train.lr \(now 1e\+08\) or "
                                             r"train.grad_clip=1$"):
        _train(synthetic_root, out, variant="global", extra=["train.lr=1e8", "train.grad_clip=0"])
    assert not list((out / "checkpoints").glob("*.pt")) and not (out / "history.jsonl").exists()


def test_an_infinite_epoch_loss_is_null_in_standard_json(synthetic_root, tmp_path, monkeypatch):
    """An fp16 epoch in which the GradScaler skipped steps (an infinite loss) has an infinite mean training loss,
    with finite weights: history.jsonl held the non-standard ``Infinity``, which strict parsers and jq reject.
    Every JSON file of the run is standard JSON; history.jsonl names the value written as null."""
    real_train_one_epoch = trainer.train_one_epoch

    def skipped_steps(*args, **kwargs):
        return {**real_train_one_epoch(*args, **kwargs), "loss": float("inf")}

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    monkeypatch.setattr(trainer, "train_one_epoch", skipped_steps)
    out = tmp_path / "run"
    _train(synthetic_root, out, variant="global", epochs=1)
    rows = [json.loads(line, parse_constant=refuse) for line in (out / "history.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None and rows[0]["non_finite_values"] == {"train_loss": "inf"}
    assert math.isfinite(rows[0]["train_accuracy"])
    for path in sorted(out.glob("*.json")):
        json.loads(path.read_text(), parse_constant=refuse)


PROGRESS_AT_EXIT = """
import io, json, sys, threading
from tqdm import tqdm
from finescope import trainer
from finescope.config import load_config

class Terminal(io.StringIO):
    def isatty(self):
        return True

sys.stderr = Terminal()  # the bars are drawn, as on a terminal
trainer.train(load_config(None, json.loads(sys.argv[2])), sys.argv[1], progress=True)
drawn, sys.stderr = sys.stderr.getvalue(), sys.__stderr__
print(json.dumps({"threads": [t.name for t in threading.enumerate()], "open_bars": len(tqdm._instances),
                  "drawn": "epoch 1/1" in drawn}))
"""


def test_a_finished_train_leaves_no_progress_bar_and_no_tqdm_monitor(synthetic_root, tmp_path):
    """tqdm's monitor thread, started with the first bar (a disabled one too), and its atexit handler outlived
    the run: Ctrl-C while the interpreter exited after a finished train printed a traceback from them. After a
    train (in a fresh interpreter, whose threads are its own) every bar is closed and no monitor thread runs."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    overrides = json.dumps(tiny_overrides(synthetic_root, "global", 1))
    done = subprocess.run([sys.executable, "-c", PROGRESS_AT_EXIT, str(tmp_path / "run"), overrides], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.splitlines()[-1])
    assert state["drawn"] and state["open_bars"] == 0 and "tqdm_monitor" not in state["threads"], state


def test_predictions_csv_keeps_a_box_of_less_than_a_pixel_its_size(tmp_path):
    """Boxes were written rounded to whole pixels: under model.min_box_fraction=0.001 a peak's box of 0.096 px,
    2.952-3.048, became '3 3 3 3', a box of no size (found in review). Each coordinate is the float32 the model
    gave, in the shortest text that reads back the same (whole pixels without decimals, as before)."""
    import numpy as np

    from finescope.data import Sample, SampleSet
    from finescope.engine import Predictions

    s = SampleSet([Sample("/d/0.png", 0, "p0")], ["benign", "malignant"])
    boxes = np.array([[[0, 0, 96, 96], [2.952, 2.952, 3.048, 3.048]]], dtype=np.float32)  # (N, K, 4)
    preds = Predictions(np.arange(1), np.zeros(1, int), np.array([[0.5, 0.5]], np.float32), boxes=boxes,
                        box_mass=np.array([[1.0, 0.0]], np.float32))
    trainer.write_predictions(tmp_path / "p.csv", preds, s)
    with (tmp_path / "p.csv").open(newline="") as fh:
        written = next(csv.DictReader(fh))["boxes"]
    assert written.split(";")[0] == "0 0 96 96 1"
    read = np.array([[float(v) for v in box.split()[:4]] for box in written.split(";")], dtype=np.float32)
    assert np.array_equal(read, boxes[0])  # float32 to the bit: x2 > x1 and y2 > y1 as the model gave them


def test_predictions_csv_keeps_a_small_box_mass_readable(tmp_path):
    """The mass was written with 3 decimals: a box holding 0.0004 of the attention read '0.000', as a box holding
    none. It is the float32 the model gave in the shortest text that reads it back, as the coordinates are."""
    import numpy as np

    from finescope.data import Sample, SampleSet
    from finescope.engine import Predictions

    s = SampleSet([Sample("/d/0.png", 0, "p0")], ["benign", "malignant"])
    boxes = np.array([[[0, 0, 96, 96], [10, 10, 20, 20], [30, 30, 40, 40]]], dtype=np.float32)  # (N, K, 4)
    mass = np.array([[0.9995, 0.0004, 0.0]], np.float32)
    preds = Predictions(np.arange(1), np.zeros(1, int), np.array([[0.5, 0.5]], np.float32), boxes=boxes,
                        box_mass=mass)
    trainer.write_predictions(tmp_path / "p.csv", preds, s)
    with (tmp_path / "p.csv").open(newline="") as fh:
        written = next(csv.DictReader(fh))["boxes"]
    assert [box.split()[4] for box in written.split(";")] == ["0.9995", "0.0004", "0"]
    read = np.array([float(box.split()[4]) for box in written.split(";")], dtype=np.float32)
    assert np.array_equal(read, mass[0])


def test_predictions_csv_keeps_every_probability_distinct_and_inside_zero_one(tmp_path):
    """Probabilities were written with 6 decimals: a confident model's 0.9999996 became 1.000000 and 4e-7 became
    0.000000, so AUCs and rankings recomputed from the CSV tied images the model had told apart."""
    import numpy as np

    from finescope.data import Sample, SampleSet
    from finescope.engine import Predictions

    s = SampleSet([Sample(f"/d/{i}.png", 0, f"p{i}") for i in range(3)], ["benign", "malignant"])
    high = np.float32(1) - np.float32(2 ** -24) * np.arange(1, 4, dtype=np.float32)  # the three float32s below 1
    probs = np.stack([1 - high, high], axis=1).astype(np.float32)
    trainer.write_predictions(tmp_path / "p.csv", Predictions(np.arange(3), np.zeros(3, int), probs), s)
    with (tmp_path / "p.csv").open(newline="") as fh:
        read = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in csv.DictReader(fh)])
    assert np.array_equal(read.astype(np.float32), probs)  # float32 to the bit: no two images tie


def test_12_bit_camera_data_is_warned_about_and_data_bit_depth_reaches_inference(synthetic_root, tmp_path,
                                                                                 monkeypatch):
    """A camera's 12-bit values in 16-bit files reached the model nearly black, and train said nothing (only
    `finescope data` listed them). train now warns in one line, naming a file and data.bit_depth, from a few sampled
    images; a run trained with data.bit_depth=12 keeps it in its config, and evaluate, predict and explain read
    the images with it."""
    import numpy as np
    from PIL import Image

    from finescope.cli import main
    from finescope.data import dataset
    from finescope.explain import explain_image

    cam = tmp_path / "cam16"
    (cam / "images").mkdir(parents=True)
    for png in (synthetic_root / "images").glob("*.png"):
        grey = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16  # 0..4080: a 12-bit camera's range
        Image.fromarray(grey).save(cam / "images" / png.name)
    shutil.copy(synthetic_root / "manifest.csv", cam / "manifest.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(cam, tmp_path / "dark", variant="global", epochs=1)
    dark = [str(w.message) for w in caught if "almost black" in str(w.message)]
    assert len(dark) == 1 and "\n" not in dark[0], dark
    assert re.match(r"the 16-bit image '.*cam16/images/\w+\.png' reads almost black \(brightest value "
                    r"1[0-6] of 255\)", dark[0]) and "--set data.bit_depth=12, or 14" in dark[0]
    assert trainer.dark_images_warning(load_config(None, tiny_overrides(cam)), trainer.load_samples(
        load_config(None, tiny_overrides(cam)).data), range(4)) is None  # said once per process (each cv fold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(cam, tmp_path / "run", variant="global", epochs=1, extra=["data.bit_depth=12"])
    assert not [w for w in caught if "almost black" in str(w.message)]
    assert load_config(tmp_path / "run" / "config.yaml").data.bit_depth == 12
    depths = []
    real = dataset.read_image
    monkeypatch.setattr(dataset, "read_image", lambda p, b=0: depths.append(b) or real(p, b))
    one = sorted((cam / "images").glob("*.png"))[0]
    trainer.predict(tmp_path / "run", [str(one)], tmp_path / "p.csv", device="cpu")
    trainer.evaluate(tmp_path / "run", "test", out=tmp_path / "m.json", device="cpu")
    expl = explain_image(tmp_path / "run", one, device="cpu")
    assert int(expl.image.max()) > 200
    n = len(depths)
    assert main(["explain", str(tmp_path / "run"), str(one), "--out", str(tmp_path / "ex"), "--no-faithfulness",
                 "--quiet"]) == 0
    assert len(depths) > n and set(depths) == {12}


@pytest.mark.parametrize("given", ["run", "run/checkpoints", "run/checkpoints/best.pt"])
def test_fine_tune_leak_finds_the_run_of_every_model_weights_it_reads(tmp_path, given):
    """model.weights=RUN/checkpoints (a folder holding best.pt, which model.weights reads as the run's) fine-tuned
    on patients that run had trained on without the warning that RUN and RUN/checkpoints/best.pt give: the splits.json
    was looked for in the checkpoints folder."""
    import numpy as np

    from finescope.data import Sample, SampleSet, save_splits

    s = SampleSet([Sample(str(tmp_path / f"{i}.png"), i % 2, f"p{i}") for i in range(4)], ["a", "b"],
                  root=str(tmp_path))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"")
    save_splits(tmp_path / "run" / "splits.json", {"train": np.array([0, 1]), "test": np.array([2, 3])}, s)
    cfg = load_config(None, [f"model.weights={tmp_path / given}"])
    message = trainer.fine_tune_leak(cfg, {"train": np.array([2, 3]), "test": np.array([0, 1])}, s)
    assert message is not None and "2 of the groups" in message
    assert f"data.splits={tmp_path / 'run' / 'splits.json'}" in message


def test_per_patient_predictions_take_the_patient_a_breakhis_name_gives_and_say_no_class_for_a_mixed_one(tmp_path):
    """The patient of a BreakHis image is its patient folder (22549AB), not its case (22549); a patient whose
    images hold two true classes (or some unknown) has no one true class; a tied vote goes to the class of the
    higher mean probability, as the patient-level metrics break it."""
    import numpy as np

    from finescope.data.records import Sample, SampleSet
    from finescope.engine import Predictions

    samples = [Sample("/x/1.png", 0, "22549", {"patient": "22549AB"}), Sample("/x/2.png", 0, "22549",
                                                                             {"patient": "22549AB"}),
               Sample("/y/3.png", 0, "g", {}), Sample("/y/4.png", 1, "g", {}), Sample("/z/5.png", -1, "", {})]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.45, 0.55], [0.7, 0.3], [0.2, 0.8]])
    preds = Predictions(indices=np.arange(5), labels=np.array([s.label for s in samples]), probs=probs)
    trainer.write_patient_predictions(tmp_path / "p.csv", preds, SampleSet(samples, ["benign", "malignant"]),
                                      {"model.threshold": 0.9})
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["patient"], r["n_images"], r["true"], r["predicted"], r["majority"]) for r in rows] == [
        ("22549AB", "2", "benign", "benign", "benign"), ("g", "2", "", "benign", "benign"),
        ("/z", "1", "", "malignant", "malignant")]  # g: one vote each, benign's mean probability 0.575
    assert float(rows[1]["prob_benign"]) == np.float32(0.575) and rows[0]["model_overrides"] == "model.threshold=0.9"
