"""One-shot GPU check: device-vs-CPU agreement, the selection's CUDA graph against the selection op by op, host
syncs per step, a short real training run, the data path, the benchmark table, the compiled step (its
labelling's scatters against scans), the stage profile, then the diagnostics (the table at batch 64, what a new
batch shape costs a training step and why (``new_shape_cost.py``), and, with ``--train-compile MODE``, the
training run again through ``train.compile``). Writes everything under OUT and prints a short table last; every stage has its own time
limit, cut to the script's budget, so a slow host loses the later stages first.

    PYTHONPATH=src python3 benchmarks/gpu_check.py OUT [--device cuda] [--data .gpu/breakhis]
        [--weights .gpu/mobilenet_v2-b0353104.pth] [--quick]

``--device cpu --quick`` runs every stage on tiny settings (the test suite does this). ``--only-agreement`` runs
the agreement check alone (``--device cpu --only-agreement`` measures it with the real backbones on a CPU).

Agreement: fresh random full-resolution inputs; reference = the same model in float64 on the CPU; relative
error ||out - ref|| / ||ref|| of the global logits and the attention for fp32 and for bf16 and fp16 autocast
(``train.amp``; on a CPU through ``torch.autocast("cpu")``, which finescope's training does not use there);
limits: fp32 1e-3, bf16 and fp16 2e-2, never NaN.
The fused logits depend on the selected boxes, a discontinuous function of the attention (a threshold), so they
are compared with the reference read from the device's own boxes; how far the boxes themselves moved is reported
apart: the images whose boxes agree with the reference's within 1 pixel, and the largest move. (Before 07741ef
the fused logits were compared with the reference's own, on the images whose boxes agreed within 1 pixel: a
move under a pixel moved the crops, and mobilenet_v2 fp16 failed at 3.4e-2 on 2 images of 4, on a CPU as on
the H200.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, environment, loadavg, markdown_table, parse_device, report_header  # noqa: E402

from finescope.config import ModelConfig, load_config  # noqa: E402
from finescope.data import colour_jitter, load_samples  # noqa: E402
from finescope.engine import autocast, compute_loss  # noqa: E402
from finescope.errors import FinescopeError  # noqa: E402
from finescope.models import create_model, network  # noqa: E402

LIMITS = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def reference_at(ref_model: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor):
    """The float64 reference's outputs with its crops read from ``boxes`` (the device's own): the selection is a
    threshold, so a rounding that moves a box edge moves the crop and the fused logits with it; against the
    reference's crops of the same boxes, the fused logits measure the arithmetic alone."""
    given = boxes.detach().cpu().float()  # as the selection gives them, also in float64

    def select(*args, **kwargs):
        return given, torch.zeros(given.shape[:2]), None

    with mock.patch.object(network, "select_boxes_deferred", select):
        return ref_model(images.double(), sizes)


def agreement(backbone: str, size: tuple[int, int], device: torch.device, weights: str, batch: int) -> list[dict]:
    """Compare the model on ``device`` (fp32, bf16 and fp16 autocast) with a float64 CPU reference: global logits
    and attention as they are; the fused logits against the reference read from the device's boxes
    (:func:`reference_at`); the boxes themselves by their largest difference in pixels."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(variant="fusion", backbone=backbone, weights=weights if backbone == "mobilenet_v2" else "",
                      global_size=min(224, size[0] // 2), local_size=min(224, size[0] // 2))
    torch.manual_seed(1)
    model = create_model(cfg, 3).eval()
    g = torch.Generator().manual_seed(123)
    images = torch.rand(batch, 3, *size, generator=g)
    sizes = torch.tensor([list(size)] * batch)
    with torch.no_grad():
        ref_model = copy.deepcopy(model).double()
        ref = ref_model(images.double(), sizes)
        model = model.float().to(device)
        rows = []
        for precision in LIMITS:
            with torch.autocast(device.type, dtype=DTYPES.get(precision, torch.bfloat16), enabled=precision in DTYPES):
                out = model(images.to(device), sizes)
            moved = (out.boxes.float().cpu() - ref.boxes.float()).abs().amax(dim=(1, 2))  # pixels, per image
            errs = {"global_logits": rel_err(out.global_logits, ref.global_logits),
                    "attention": rel_err(out.attention, ref.attention),
                    "fused_logits": rel_err(out.logits, reference_at(ref_model, images, sizes, out.boxes).logits)}
            finite = all(torch.isfinite(t.float()).all() for t in (out.logits, out.global_logits, out.attention))
            ok = finite and max(errs.values()) < LIMITS[precision]
            rows.append({"backbone": backbone, "precision": precision, **errs,
                         "boxes_agree": f"{int((moved <= 1.0).sum())}/{batch}", "boxes_max_px": float(moved.max()),
                         "finite": bool(finite), "pass": bool(ok)})
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def count_syncs(device: torch.device, backbone: str) -> dict:
    """Host-device synchronisations in one fusion training step and one inference step (CUDA only)."""
    if device.type != "cuda":
        return {}
    model = create_model(ModelConfig(variant="fusion", backbone=backbone), 2).to(device)
    images = torch.rand(8, 3, 460, 700, device=device)
    sizes, labels = torch.tensor([[460, 700]] * 8), torch.randint(0, 2, (8,), device=device)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    out = {}
    for mode in ("train", "infer"):
        for record in (False, True):  # first pass warms up (cuDNN autotuning syncs), second is counted
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if record else 0)
                try:
                    _one_step(model, opt, images, sizes, labels, device, mode)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            if record:
                where = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
                out[mode] = {"syncs": len(where), "examples": sorted(set(where))[:5]}  # the Python lines that synced
    return out


def selection_graph_check(device: torch.device, reps: int = 50) -> dict:
    """CUDA only: instance selection replayed as a CUDA graph against the same selection op by op, on batches of
    16 smooth and 16 noisy maps (7x11 cells, 5 seeds each, one graph replayed on all of them) and on a map whose
    one component winds (more labelling rounds than the graph runs: it must fall back). Boxes and masses must be
    identical, the graph captured, and smooth maps (a trained model's) never fall back; also the median
    milliseconds of a call with and without the graph, and with the graph of the grid's components
    (``components="grid"``, the selection before the default became ``exact``), smooth maps, interleaved."""
    if device.type != "cuda":
        return {}
    from selection_cost import inputs, maps

    from finescope.models.selection import _GraphedSelect, select_boxes, select_boxes_deferred

    def compare(call_args) -> tuple[bool, bool]:  # (identical, fell back)
        *replayed, exact = select_boxes_deferred(*call_args)
        fell_back = exact is None or not bool(exact)  # None: no graph
        graphed = select_boxes(*call_args)
        eager = select_boxes(*call_args, graph=False)
        same = all(torch.equal(a, b) for a, b in zip(graphed, eager, strict=True))
        return same and (fell_back or all(torch.equal(a, b) for a, b in zip(replayed, eager, strict=True))), \
            fell_back

    results = [compare(inputs(maps(kind, 16, 7, 11, device, seed))) for kind in ("smooth", "noisy")
               for seed in range(5)]
    captured = _GraphedSelect.graphs and all(g is not None for g in _GraphedSelect.graphs.values())
    snake = torch.full((1, 15, 15), 0.01, device=device)
    snake[0, ::2] = 1.0
    snake[0, 1::4, -1] = 1.0
    snake[0, 3::4, 0] = 1.0
    winding = compare(inputs(snake / snake.sum()))
    call_args = inputs(maps("smooth", 16, 7, 11, device))
    times = {"graph": [], "eager": [], "grid": []}
    for _ in range(reps):
        for name in times:
            torch.cuda.synchronize()
            start = time.perf_counter()
            select_boxes(*call_args, graph=name != "eager", components="grid" if name == "grid" else "exact")
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"identical": sum(same for same, _ in results), "batches": len(results),
            "fallbacks": sum(back for _, back in results), "winding_identical": winding[0],
            "winding_fell_back": winding[1], "graph_ms": ms["graph"], "eager_ms": ms["eager"],
            "grid_graph_ms": ms["grid"],
            "captured": bool(captured),
            "pass": bool(captured) and all(same for same, _ in results) and not any(back for _, back in results[:5])
            and winding == (True, True)}


def _one_step(model, opt, images, sizes, labels, device, mode: str) -> None:
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"), autocast(device, True):
        out = model(images, sizes)
    if mode == "train":
        loss = compute_loss(out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


class Clock:
    """The script's time budget: a stage gets its own limit, cut to what is left before the deadline (so the
    short table is always printed), and is skipped when less than ``MIN_STAGE_SECONDS`` are left."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def limit(self, own: float) -> int:
        return int(min(own, self.deadline - time.monotonic()))


MIN_STAGE_SECONDS = 10


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    """Run a stage as a subprocess (PYTHONPATH=src), its output to ``log``; (return code, seconds).
    124: stopped at its limit; 125: skipped, no time left."""
    if timeout < MIN_STAGE_SECONDS:
        log.write_text(f"skipped: {timeout} s left in the script's budget\n")
        return 125, 0.0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


TRAIN_CONFIG = "src/finescope/configs/breakhis_binary.yaml"


def train_sets(args, device: str, compile_mode: str = "off") -> list[str]:
    """The config overrides of the training run."""
    sets = [f"data.root={args.data}", f"train.device={device}", "data.cache=memory",
            f"data.num_workers={args.workers}", f"model.weights={args.weights}"
            if Path(args.weights).is_file() and not args.quick else "model.weights=",  # no tiny weights
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
            f"train.compile={compile_mode}"]
    if args.quick:
        sets += ["model.backbone=tiny", "model.global_size=64", "model.local_size=64", "train.batch_size=4"]
    return sets


def train_stage(out: Path, args, device: str, clock: Clock, compile_mode: str = "off") -> dict:
    """Train fusion (mobilenet_v2, ImageNet weights when given) on the BreakHis copy; test metrics and speed.
    With ``compile_mode`` the same run goes through ``train.compile`` (its own run folder and log)."""
    name = "train_fusion" if compile_mode == "off" else "train_fusion_compiled"
    run_dir = out / name
    cmd = [sys.executable, "-m", "finescope", "train", "--config", TRAIN_CONFIG, "--out", str(run_dir), "--quiet",
           "--set", *train_sets(args, device, compile_mode)]
    own = args.train_timeout if compile_mode == "off" else args.compiled_train_timeout
    rc, seconds = run(cmd, out / f"{name}.log", clock.limit(own_limit(args, own)))
    result = {"rc": rc, "seconds": seconds, "compile": compile_mode, "command": " ".join(cmd)}
    if rc == 0:
        history = [json.loads(r) for r in (run_dir / "history.jsonl").read_text().splitlines()]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result.update(epochs=len(history), train_images_per_s=max(r["train_images_per_second"] for r in history),
                      epoch_seconds=min(r["train_seconds"] for r in history),
                      first_epoch_seconds=history[0]["train_seconds"],
                      **{k: metrics.get(k) for k in ("n_images", "image_accuracy", "balanced_accuracy", "auc",
                                                     "patient_recognition_rate")})
    # the checkpoints (62 MB at b61e5c7) feed no table: without them OUT is small enough to copy back as one archive
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


# Seconds per stage, sized from H200 runs. At f0aea1b: model 157 s at 5 repetitions (now 4), batch64 54 s,
# data 24 s, profile 13 s, profile_compiled 35 s per batch size with its eager half left out, the eager training
# run 34 s. At 246bc32, on a host that issued kernels up to 2x slower: agreement and syncs 23 s, the eager
# training run 53 s (its first epoch 23 s), model about 275 s (mobilenet_v2 alone about 150 s, mostly the first
# steps of each shape), data 32 s, batch64 70 s. At b61e5c7 (H200): everything before the stages 105 s, model
# 266 s with the ablations selection-sync-now and cl-input (both measured there and since dropped: about a
# third of it), profile about 35 s alone (its 20 s limit cut it), data 49 s, first_epoch 32 s, batch64 67 s
# alone. Since then: data reads 4 passes an epoch with fewer rows (about 65 s), and new_shape (estimated 60-80 s:
# two models, five new shapes each) replaces first_epoch, which found the cost it now dissects. They run first,
# being what b61e5c7 left open; the model table, measured whole there, comes after them and is what the budget
# cuts first (bench_model.py saves after every group, so a cut table keeps its first groups). The whole script's
# budget stays inside the 475 s that gpu_check.sh allows. profile_compiled writes its JSON after each batch size,
# so a stage cut short still reports batch 16. At 2d64d1b (H200): new_shape 51 s (its third run, mobilenet_v2
# with the depthwise convolutions off cuDNN, came after: up to 45 s more, and a cut keeps the runs before it), data
# 39 s, model 181 s, profile 16 s, batch64 65 s, which left compiled 45 s (cut). At e36b251 (H200): everything
# before the stages about 85 s, new_shape 69 s, data 41 s, model 186 s, profile 13 s, batch64 61 s, compiled cut at 33 s
# again. new_shape had answered its question there (the depthwise convolutions, now train.cudnn_depthwise), and
# the compiled step is the open one (compiled inference 1.40x its passes; the labelling's scatters against
# cummax scans, which no GPU has timed), so compiled now comes after the model table and new_shape last.
STAGE_SECONDS = {"profile": 40, "model": 260, "batch64": 70, "compiled": 130, "data": 90, "new_shape": 90}
STAGE_ORDER = ("data", "model", "compiled", "profile", "batch64", "new_shape")
STAGE_FILES = ("bench_model.json", "bench_batch64.json", "bench_data.json", "profile.json", "profile_compiled.json",
               "new_shape.json")  # what the stages write, read by final_table
BUDGET_SECONDS = 465


def stage_timeout(args, name: str, clock: Clock) -> int:
    """Seconds a benchmark stage may run: ``--bench-timeout`` when given, else its own default (under ``--quick``
    none: :func:`own_limit`), and never past the script's deadline."""
    return clock.limit(args.bench_timeout or own_limit(args, STAGE_SECONDS[name]))


def own_limit(args, seconds: float) -> float:
    """A stage's own limit, sized for a GPU host: under ``--quick`` (the CPU test) the script's budget alone
    limits it, since a CPU that other work slows can take several times its usual minute and a half (on a
    loaded 2-core VM the compiled stage ran past its own limit while the budget had minutes left)."""
    return args.budget if args.quick else seconds


def bench_stages(out: Path, args, device: str, clock: Clock) -> dict:
    """The data path (4 passes an epoch; one orientation off and on), the model benchmark table (batch 16), the
    compiled step (``profile_compiled.py``: torch.compile with CUDA graphs, fusion against its passes, with
    finescope's labelling and with ``cummax_components``), the stage profile, the table at batch 64 (BreakHis
    size) and the cost of new batch shapes (``new_shape_cost.py``), in that order (``STAGE_ORDER``)."""
    weights = [f"mobilenet_v2={args.weights}"] if Path(args.weights).is_file() else []
    if args.quick:
        common = ["--device", device, "--backbones", "tiny", "--sizes", "128x192", "--batch", "2", "--warmup", "1",
                  "--reps", "2", "--global-size", "64", "--local-size", "64"]
        stages = {"model": common}
        compiled = ["--backbone", "tiny", "--size", "128x192", "--batch", "2", "--warmup", "1", "--reps", "2"]
        data = ["--workers", "0", "--limit", "8", "--decode-n", "2", "--epoch-backbone", "tiny", "--global-size",
                "64", "--local-size", "64", "--batch", "4", "--model-reps", "1", "--augments", "microscopy",
                "--colour-on", "workers", "device", "--one-orientation", "on", "off", "--loader-one-orientation",
                "off", "on", "--repeat", "2"]
        new_shape = ["--runs", "tiny:off", "--size", "128x192", "--global-size", "64", "--local-size", "64"]
    else:
        stages = {
            "model": ["--device", device, "--batch", "16", "--batch-large", "4", "--warmup", "2", "--reps", "4",
                      *(["--weights", *weights] if weights else [])],
            "batch64": ["--device", device, "--sizes", "460x700", "--variants", "fusion", "--batch", "64",
                        "--warmup", "2", "--reps", "4", *(["--weights", *weights] if weights else [])],
        }
        compiled = ["--backbone", "resnet18", "--size", "460x700", "--batch", "16", "--labelling", "float", "cummax"]
        data = ["--workers", "8", "15", "--limit", "296", "--epoch-backbone", "resnet18", "--device", device,
                "--augments", "microscopy", "none", "--caches", "none", "memory", "--colour-on", "device",
                "--loader-one-orientation", "off", "on", "--repeat", "4", "--one-orientation", "on", "off",
                "--epoch-runs", "2"]
        # at 2d64d1b a new shape cost mobilenet_v2 in fp16 8-14 s, all in cuDNN: cl-dw says whether the depthwise
        # convolutions are where it goes (second, so that a cut stage still has it: the JSON is saved per run)
        new_shape = ["--runs", "mobilenet_v2:fp16", "mobilenet_v2:fp16:cl-dw", "resnet18:bf16"]
    profile = (["--backbones", "tiny", "--size", "128x192", "--batch", "2", "--reps", "2"] if args.quick
               else ["--backbones", "resnet18", "--size", "460x700", "--batch", "16"])
    cmds = {name: ["benchmarks/bench_model.py", *extra, "--out", str(out / f"bench_{name}.json")]
            for name, extra in stages.items()}
    cmds["data"] = ["benchmarks/bench_data.py", "--data", args.data, *data, "--out", str(out / "bench_data.json")]
    cmds["profile"] = ["benchmarks/profile_step.py", "--device", device, *profile, "--out", str(out / "profile.json")]
    cmds["new_shape"] = ["benchmarks/new_shape_cost.py", "--device", device, *new_shape,
                         "--out", str(out / "new_shape.json")]
    cmds["compiled"] = ["benchmarks/profile_compiled.py", "--device", device, "--mode", "reduce-overhead", *compiled,
                        "--out", str(out / "profile_compiled.json")]
    results = {}
    for name in (n for n in STAGE_ORDER if n in cmds):
        log = out / f"{Path(cmds[name][-1]).stem}.log"  # bench_model.log, bench_data.log, profile.log, ...
        rc, secs = run([sys.executable, *cmds[name]], log, stage_timeout(args, name, clock))
        results[name] = {"rc": rc, "seconds": secs}
    return results


def labelled_table(summary: dict, out: Path) -> str:
    """The short table under the machine, versions, commit, load and the exact command of this check."""
    summary["environment"]["loadavg_end"] = loadavg()
    return f"{report_header(summary['environment'])}\n\n{final_table(summary, out)}"


def final_table(summary: dict, out: Path) -> str:
    """The short table printed last."""
    rows = [[f"agree {r['backbone']} {r['precision']}", f"logits {r['global_logits']:.2e}, attn {r['attention']:.2e}, "
             f"fused {r['fused_logits']:.2e} at the device's boxes (boxes within 1 px: {r['boxes_agree']}, largest "
             f"move {r['boxes_max_px']:.2f} px)", "PASS" if r["pass"] else "FAIL"]
            for r in summary["agreement"]]
    graph = summary.get("selection_graph")
    if graph:
        rows.append(["selection: CUDA graph / op by op", f"identical in {graph['identical']}/{graph['batches']} batches "
                     f"({graph['fallbacks']} fell back), winding map identical {graph['winding_identical']} and fell "
                     f"back {graph['winding_fell_back']}; {graph['graph_ms']:.3f} against {graph['eager_ms']:.3f} ms "
                     f"per call (16 maps; grid components, graph: {graph['grid_graph_ms']:.3f})",
                     "PASS" if graph["pass"] else "FAIL"])
    for mode, s in summary.get("syncs", {}).items():
        rows.append([f"host syncs / fusion {mode} step", s["syncs"], "; ".join(s["examples"])[:80]])
    for name, batch in (("bench_model.json", "stage model"), ("bench_batch64.json", "stage batch64")):
        if not (out / name).is_file():
            continue
        for g in json.loads((out / name).read_text())["ratios"]:
            if "overhead" in g:
                hires = f"{g['fusion_vs_hires']['median']:.3f}" if "fusion_vs_hires" in g else "-"  # not timed
                late = g.get("selection-sync-now_speedup")  # > 1: reading the flag late pays
                late = f", flag read at once/late {late['median']:.3f}" if late else ""
                cl = g.get("cl-input_speedup")  # > 1: contiguous input batches pay
                late += f", channels-last/contiguous input {cl['median']:.3f}" if cl else ""
                rows.append([f"{g['backbone']} {g['size']} {g['mode']}", f"fusion/passes {g['overhead']['median']:.3f}, "
                             f"fusion/hires {hires}{late}", batch])
    profile = out / "profile.json"
    if profile.is_file():
        for r in json.loads(profile.read_text())["backbones"]:
            parts = [f"{k} {v['device_ms']:.2f}/{v['host_ms']:.2f}" + (f" ({v['in_step_ms']:.2f} in a step)"
                                                                        if "in_step_ms" in v else "")
                     for k, v in r["stages"].items() if "device_ms" in v]  # 'rest' is timed in steps only
            if "rest" in r["stages"]:
                parts.append(f"rest of a step {r['stages']['rest']['in_step_ms']:.2f}")
            rows.append([f"stages {r['backbone']} (device/host ms)", ", ".join(parts), "profile.log"])
    compiled = out / "profile_compiled.json"
    if compiled.is_file():
        c = json.loads(compiled.read_text())
        for run in c["runs"]:
            f, p = run["fusion"], run["passes"]
            rows.append([f"compiled (reduce-overhead) {c['args']['backbone']} {c['args']['size']} infer",
                         f"fusion {f['step_ms']:.2f} ms, passes {p['step_ms']:.2f} ms, fusion/passes "
                         f"{f['step_ms'] / p['step_ms']:.3f}",
                         f"batch {run['batch']}, {run.get('labelling', 'float')} labelling, CUDA graph replays "
                         f"per step {f['graph_launches']:.0f}"])
    data = out / "bench_data.json"
    if data.is_file():
        d = json.loads(data.read_text())
        needs = d.get("model_images_per_s", {})  # by one orientation on/off: the batches the loader rows make
        for augment, on, one in sorted({(r["augment"], r["colour_on"], r["one_orientation"]) for r in d["loader"]}):
            best = max((r for r in d["loader"] if (r["augment"], r["colour_on"], r["one_orientation"]) ==
                        (augment, on, one)), key=lambda r: r["images_per_s"])
            need = needs.get("on" if one or augment == "none" else "off", float("nan"))
            where = f", colour on {on}" if colour_jitter(augment, True) is not None else ""
            where += ", one orientation" if one else ""
            cost = (f", {best['device_colour_ms_per_batch']:.2f} ms/batch there" if "device_colour_ms_per_batch" in best
                    else "")
            rows.append([f"loader best, augment {augment}{where}", f"{best['images_per_s']:.0f} img/s = "
                         f"{best['images_per_s'] / need:.2f}x what fusion consumes ({need:.0f} img/s)",
                         f"{best['workers']} workers, cache {best['cache']}, {best['repeat']} passes an epoch{cost} "
                         "(goal 1.5x)"])
        for r in d.get("epoch", {}).get("runs", []):
            rows.append([f"fusion epochs through the loop, one orientation {r['one_orientation']}",
                         ", ".join(f"epoch {i + 1} {v:.0f} img/s" for i, v in enumerate(r["epoch_images_per_s"])),
                         f"{r['images']} images, augment {d['epoch']['augment']}, no cache"])
    shapes = out / "new_shape.json"
    if shapes.is_file():
        for r in json.loads(shapes.read_text())["runs"]:
            top = r["top_host_ops"][0] if r["top_host_ops"] else None
            layout = "" if r.get("layout", "cl") == "cl" else f" {r['layout']}"
            rows.append([f"new batch shape, {r['backbone']} {r['amp']}{layout} (ms per training step)",
                         ", ".join(f"{k} {v:.0f}" for k, v in r["steps_ms"].items()),
                         "-" if top is None else f"most host time: {top['name'][:40]} {top['self_host_ms']:.0f} ms"])
    for key in ("train", "train_compiled"):
        t = summary.get(key, {})
        label = "train fusion on BreakHis copy" + ("" if t.get("compile", "off") == "off" else f", compile {t['compile']}")
        if t.get("rc") == 0:
            rows.append([label, f"test acc {t['image_accuracy']:.3f}, bal acc {t['balanced_accuracy']:.3f}, "
                         f"n={t['n_images']}", f"{t['epochs']} epochs, {t['train_images_per_s']:.0f} img/s, "
                         f"first epoch {t['first_epoch_seconds']:.0f} s, {t['seconds']:.0f} s"])
        elif t:
            log = "train_fusion.log" if key == "train" else "train_fusion_compiled.log"
            rows.append([label, f"FAILED rc={t['rc']}", f"see {log}"])
    for name, s in summary.get("stages", {}).items():
        rows.append([f"stage {name}", f"rc {s['rc']}", f"{s['seconds']:.0f} s"])
    return markdown_table(["check", "result", "note"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default=".gpu/breakhis", help="a BreakHis tree (e.g. the JPEG copy)")
    p.add_argument("--weights", default=".gpu/mobilenet_v2-b0353104.pth")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 6; 1 with --quick)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 8; 0 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (CPU test); its stages are limited by --budget alone")
    p.add_argument("--only-agreement", action="store_true", help="run the agreement check alone")
    p.add_argument("--bench-timeout", type=int, default=0,
                   help=f"seconds for every benchmark stage (0 = each its own: {STAGE_SECONDS})")
    p.add_argument("--train-timeout", type=int, default=100, help="seconds for the eager training run")
    p.add_argument("--compiled-train-timeout", type=int, default=250,
                   help="seconds for the training run with train.compile (compilation included; 226 s on the H100)")
    p.add_argument("--train-compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="train.compile mode of a second training run, e.g. reduce-overhead (default off: on the H100 "
                        "at 3455b9d it compiled for 191 s, more than the budget leaves; run it in a call of its own)")
    p.add_argument("--budget", type=int, default=BUDGET_SECONDS, help="seconds for the whole script")
    args = p.parse_args(argv)
    args.epochs = args.epochs if args.epochs is not None else 1 if args.quick else 6
    args.workers = args.workers if args.workers is not None else 0 if args.quick else 8
    # a missing file is named now, not minutes in (the agreement loads the weights after resnet18's check; the
    # training run and the data stage read --data); --weights '' runs without weights, --quick uses none
    parse_device(p, args.device)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"OUT '{args.out}' is a file; give a folder for the check's files")
    if args.weights and not args.quick and not Path(args.weights).is_file():
        p.error(f"--weights: file '{args.weights}' not found (the default: cp "
                "../shared/weights/mobilenet_v2-b0353104.pth .gpu/)")
    if not args.only_agreement:
        try:
            root = ROOT / os.path.expanduser(args.data)  # as the stages read it: they run in ROOT
            load_samples(load_config(ROOT / TRAIN_CONFIG, [f"data.root={root}"]).data)
        except FinescopeError as e:
            p.error(f"--data: {e} (the default: python benchmarks/make_gpu_subset.py ../shared/data/breakhis "
                    ".gpu/breakhis)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --device cpu --quick for the CPU test", file=sys.stderr)
        return 2
    for name in STAGE_FILES:  # an earlier check's, which the short table would show as this run's
        for stale in (out / name, (out / name).with_suffix(".md")):
            stale.unlink(missing_ok=True)
    summary: dict = {"environment": environment(device)}
    size = (128, 192) if args.quick else (460, 700)
    backbones = ("tiny",) if args.quick else ("resnet18", "mobilenet_v2", "resnet50")
    summary["agreement"] = [r for b in backbones for r in agreement(b, size, device, args.weights, 4)]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.only_agreement:
        table = labelled_table(summary, out)
        (out / "summary.md").write_text(table + "\n")
        print(table)
        return 0 if all(r["pass"] for r in summary["agreement"]) else 1
    summary["selection_graph"] = selection_graph_check(device)
    summary["syncs"] = count_syncs(device, "resnet18")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["train"] = train_stage(out, args, args.device, clock)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["stages"] = bench_stages(out, args, args.device, clock)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.train_compile != "off":  # a diagnostic: last, so the budget cuts it first
        summary["train_compiled"] = train_stage(out, args, args.device, clock, args.train_compile)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    table = labelled_table(summary, out)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["pass"] for r in summary["agreement"]) and summary["selection_graph"].get("pass", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
