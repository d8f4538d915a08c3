"""``finescope demo``: the paper's claim on the synthetic set, in a few minutes on a CPU.

Generates the synthetic set, trains ``global`` and ``fusion`` on the same grouped split with the same global
size, prints their test metrics side by side and draws attention overlays of test images with the selected
boxes and the true atypical nuclei.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from finescope.config import (
    Config,
    first_difference,
    load_config,
    override,
    read_yaml_mapping,
    stored_config,
    to_dict,
)
from finescope.data import load_samples
from finescope.data.dataset import read_image
from finescope.data.synthetic import load_cells
from finescope.errors import FinescopeError
from finescope.files import json_text, write_text
from finescope.trainer import RESUME_FREE, RunLocked, as_resumed, load_trained, train

VARIANTS = ("global", "fusion")


def demo_config(out: Path, quick: bool = False) -> Config:
    """The packaged ``configs/demo.yaml`` with its data under ``out/data`` (``quick``: a tiny, fast run)."""
    path = resources.files("finescope") / "configs" / "demo.yaml"
    overrides = [f"data.root={out / 'data'}"]
    if quick:
        overrides += ["data.synthetic_per_class=24", "data.synthetic_size=256", "model.global_size=64",
                      "model.local_size=96", "train.epochs=2", "train.batch_size=8"]
    with resources.as_file(path) as p:
        return load_config(p, overrides)


def _overlay_items(run_dir: Path, cfg: Config, n: int = 8) -> list[dict]:
    """Test images of the atypical class (and a few typical ones) with the fusion model's maps and boxes."""
    from finescope.explain.core import _forward

    model, cfg, class_names, _ = load_trained(run_dir, device="cpu")
    sample_set = load_samples(cfg.data)
    test = json.loads((run_dir / "splits.json").read_text())["splits"]["test"]
    cells = load_cells(cfg.data.root)
    chosen = [p for p in test if p.startswith("images/atypical")][: n * 3 // 4]
    chosen += [p for p in test if p.startswith("images/typical")][: n - len(chosen)]
    root = Path(sample_set.root)
    items = []
    for rel in chosen:
        img = read_image(root / rel)
        out = _forward(model, img.float() / 255, cfg.train.amp, cfg.train.cpu_amp)  # as predict runs it
        p = out.probabilities()[0]
        k = int(p.argmax())
        items.append({
            "image": img.permute(1, 2, 0).numpy(), "attention": out.attention[0], "cell_px": out.cell_px[0],
            "boxes": out.boxes[0].numpy(), "mass": out.box_mass[0].numpy(), "circles": cells.get(rel, []),
            "title": f"{Path(rel).stem}\npred {class_names[k]} ({float(p[k]):.2f})",
        })
    return items


def run_demo(out: str | Path = "runs/demo", quick: bool = False, progress: bool = True) -> dict:
    """Run the demo into ``out``; return {variant: test metrics} (also in ``out/demo_results.json``)."""
    from finescope.explain import save_overlay_grid

    out = Path(out)
    cfg = demo_config(out, quick)
    _check_same_demo(out, quick)
    results: dict[str, dict] = {}
    splits = ""
    for variant in VARIANTS:
        run_dir = out / variant
        vcfg = override(cfg, model={"variant": variant}, data={"splits": splits})
        start = time.perf_counter()
        resume = (run_dir / "checkpoints" / "last.pt").is_file()  # a killed demo continues where it stopped
        if resume:
            vcfg = as_resumed(vcfg, run_dir)
        if progress:
            print(f"== training {variant} ({'resuming' if resume else vcfg.train.epochs} epochs) -> {run_dir}")
        try:
            metrics = train(vcfg, run_dir, resume=resume, progress=progress)
        except RunLocked as e:  # another demo into this folder: train's '--resume' is no demo option
            raise e.then("rerun the same command") from None
        metrics["train_seconds"] = time.perf_counter() - start  # a resumed variant: this run's part only
        metrics["resumed"] = resume
        results[variant] = metrics
        splits = str(run_dir / "splits.json")  # every variant sees the same split
    overlay = save_overlay_grid(_overlay_items(out / "fusion", cfg), out / "attention_overlay.png")
    summary = {v: {k: m.get(k) for k in ("image_accuracy", "balanced_accuracy", "auc", "n_images", "train_seconds",
                                                "resumed")}
               for v, m in results.items()}
    write_text(out / "demo_results.json", json_text(summary, indent=2))
    print(format_table(summary))
    print(f"attention overlay: {overlay}")
    return results


def _check_same_demo(out: Path, quick: bool) -> None:
    """Refuse to continue a demo folder whose runs were trained with the other ``--quick``: the resume would
    refuse the config naming a key, with advice (--resume, its config.yaml) that the demo's user cannot take."""
    other = to_dict(demo_config(out, not quick))
    for variant in VARIANTS:
        run_dir = out / variant
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            continue
        try:
            trained = to_dict(load_config(base=stored_config(read_yaml_mapping(run_dir / "config.yaml"))))
        except FinescopeError:  # no readable config.yaml: the resume checks last.pt's own
            return
        other["model"]["variant"] = variant
        if first_difference(trained, other, ignore=("data.splits", *RESUME_FREE)) is None:
            was, now = ("with", "without") if not quick else ("without", "with")
            raise FinescopeError(f"'{out}' holds a demo run {was} --quick ('{run_dir}'); rerun {was} --quick to "
                                 f"continue it, or give another --out (or delete '{out}') to run the demo {now} it")


def format_table(summary: dict) -> str:
    lines = ["", f"{'variant':10s} {'test acc':>9s} {'bal. acc':>9s} {'AUC':>7s} {'images':>7s} {'train s':>8s}"]
    for v, m in summary.items():
        auc = m["auc"] if m["auc"] is not None else float("nan")
        lines.append(f"{v:10s} {m['image_accuracy']:9.3f} {m['balanced_accuracy']:9.3f} {auc:7.3f} "
                     f"{m['n_images']:7d} {m['train_seconds']:8.1f}" + (" (resumed)" if m.get("resumed") else ""))
    lines.append(f"(same split, same global size; test images: {next(iter(summary.values()))['n_images']})")
    if any(m.get("resumed") for m in summary.values()):
        lines.append("(resumed: the seconds after the resume only; the epochs before it ran in an earlier run)")
    return "\n".join(lines)


__all__ = ["demo_config", "run_demo"]
