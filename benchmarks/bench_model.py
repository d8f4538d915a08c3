"""Step throughput, peak memory and the overhead ratio of the fusion network.

For every (backbone, input size, mode) the cases below are timed INTERLEAVED (A, B, C, A, B, C, ...) on the same
random batch, so that a noisy machine slows all of them alike; medians and the min-max spread are reported.

Cases:
    global, global-hires, attention, fusion: the model variants (finescope.models), full training or inference
        steps exactly as ``finescope.engine`` runs them (forward under autocast: bf16 on CUDA, on the CPU with
        ``--cpu-amp bf16``; loss, backward, grad clip, AdamW).
    passes: the backbone passes a fusion step contains, and nothing else: one pass over the global view
        (B, 3, Gh, Gw) plus one over the B*K crops (B*K, 3, L, L), tensors made beforehand; in training the
        same loss-backward-clip-AdamW step on the backbone's parameters.
    fusion+fp32, fusion+contiguous, fusion+compile, fusion+compile-ro, fusion+view-image, fusion+folded-bn,
        fusion+eager-selection, fusion+selection-nosync, fusion+selection-sync-now, fusion+cl-input,
        fusion+aten-resize, fusion+one-call-crops (``--ablate``): fusion without bf16 autocast;
        without channels_last weights; under ``torch.compile`` (inductor, default mode); under
        ``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs where inductor can use them; with its
        global view always resized from the image, never from the crop source (``FineScopeNet.view_from_source``;
        with the defaults the two differ only for images whose short side is 1344 px or more); in inference only,
        with its BatchNorms folded into its convolutions as ``load_trained`` does (the passes keep theirs: the
        overhead ratio is the unfolded one's); with its instance selection launched op by op instead of replayed
        as a CUDA graph (``eager-selection``; the same on the CPU); with that graph replayed without reading its
        convergence flag, so without the step's host-device sync (``selection-nosync``); with the flag read right
        after the replay instead of once the forward pass is queued (``selection-sync-now``, the step before the
        flag was deferred; both the same on the CPU); with its full-resolution batch channels-last on CUDA, as the
        trainer made it for every variant before it did so for ``global-hires`` only (``cl-input``; the same on
        the CPU); with its view and crop source
        resized by ATen's ``F.interpolate`` instead of ``finescope.models.resize.resize_aa`` (``aten-resize``; the
        same on CUDA); with its crops cut by one roi_align call, not as two embedding_bag passes per box or as
        shifts in ``finescope.models.align.crop_align`` (``one-call-crops``; the same on CUDA).

Ratios (paired per repetition, then median and spread), and below them which groups meet the goals:
    overhead = fusion / passes (goal <= 1.15 on CUDA, <= 1.25 on CPU),
    fusion / global-hires (goal < 1),
    with a compile ablation also the overhead with both sides compiled (passes+compile, passes+compile-ro).

Example (CPU, small):
    PYTHONPATH=src python benchmarks/bench_model.py --device cpu --backbones resnet18 --sizes 460x700 \
        --batch 2 --reps 5 --out /tmp/cpu_model.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    allocator_as_the_cli,
    environment,
    loadavg,
    markdown_table,
    parse_hw,
    require_counts,
    summary,
    sync,
    timed,
)

from finescope.config import ModelConfig  # noqa: E402
from finescope.engine import autocast, compute_loss, input_channels_last  # noqa: E402
from finescope.errors import FinescopeError  # noqa: E402
from finescope.models import align, create_model, network  # noqa: E402
from finescope.trainer import fused_adamw  # noqa: E402

VARIANTS = ("global", "global-hires", "attention", "fusion")
ABLATIONS = ("fp32", "contiguous", "compile", "compile-ro", "view-image", "folded-bn", "eager-selection",
             "selection-nosync", "selection-sync-now", "cl-input", "aten-resize", "one-call-crops")
ABLATION_LABELS = {"fp32": "fp32 / bf16", "contiguous": "contiguous / channels_last", "compile": "compiled / eager",
                   "compile-ro": "compiled (reduce-overhead) / eager", "view-image": "view from image / from source",
                   "folded-bn": "folded BatchNorm / BatchNorm",
                   "eager-selection": "selection without / with its CUDA graph",
                   "selection-nosync": "graph without / with its sync",
                   "selection-sync-now": "graph's flag read at once / at the end",
                   "cl-input": "channels-last / contiguous input",
                   "aten-resize": "ATen's resize / resize_aa", "one-call-crops": "crops in one call / crop_align"}
COMPILE_MODES = {"compile": "default", "compile-ro": "reduce-overhead"}
OVERHEAD_GOAL = {"cpu": 1.25, "cuda": 1.15}  # issue 5: fusion / passes, per device type
OVERHEAD_LABELS = {"compile": "fusion / passes, both compiled",
                   "compile-ro": "fusion / passes, both compiled (reduce-overhead)"}


@dataclass
class Case:
    """One timed thing: a name and a zero-argument step function."""

    name: str
    step: Callable[[], object]
    images: int  # images per step (B)


def parse_size(text: str) -> tuple[int, int]:
    """``'460x700'`` -> (460, 700) (height x width)."""
    h, w = text.lower().split("x")
    return int(h), int(w)


def _autocast(device: torch.device, amp: bool, args):
    """The engine's autocast: bf16 on CUDA when ``amp``, on the CPU ``--cpu-amp`` when ``amp``."""
    return autocast(device, amp, args.cpu_amp if amp else "off")


def _train_step(model: nn.Module, forward: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
                params: list[torch.Tensor]) -> Callable[[], None]:
    """The engine's training step: loss, zero_grad, backward, clip to norm 1, AdamW."""

    def step() -> None:
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def _adamw(params: list[torch.Tensor], device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, fused=fused_adamw(device.type))


def _compiled(module: nn.Module, compile_mode: str | None) -> Callable:
    """``module``, or compiled in ``compile_mode``, as ``run(*inputs, new_step=True)``; with CUDA graphs
    (reduce-overhead) a call with ``new_step`` starts a new step: the outputs of the last one are used up."""
    compiled = torch.compile(module, mode=compile_mode) if compile_mode else module

    def run(*inputs, new_step: bool = True):
        if new_step and compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*inputs)

    return run


def _selection_flag(step: Callable[[], None], when: str) -> Callable[[], None]:
    """``step`` with the convergence flag of the selection's CUDA graph read ``now`` (right after the replay, as
    before the flag was deferred to the end of the forward pass: the host waits for the GPU mid-step) or
    ``never`` (no host-device sync in the step at all: what a sync-free selection would gain; its boxes would
    differ where 8 labelling rounds do not converge, as under torch.compile)."""
    deferred = network.select_boxes_deferred

    def select(*args, **kwargs):
        boxes, mass, exact = deferred(*args, **kwargs)
        if when == "now" and exact is not None and not bool(exact):
            boxes, mass, _ = deferred(*args, **{**kwargs, "graph": False})
        return boxes, mass, None

    def wrapped() -> None:
        with mock.patch.object(network, "select_boxes_deferred", select):
            step()

    return wrapped


def model_case(name: str, variant: str, backbone: str, args, batch: dict, mode: str, device: torch.device,
               amp: bool, channels_last: bool, compile_mode: str | None = None, view_from_image: bool = False,
               fold: bool = False, selection_graph: bool = True,
               selection_flag: str = "end", cl_input: bool = False, patches: tuple = ()) -> Case:
    """A variant's full step on ``batch`` (images, sizes, labels on the device)."""
    cfg = ModelConfig(variant=variant, backbone=backbone, global_size=args.global_size,
                      local_size=args.local_size, num_crops=args.num_crops, weights=args.weights.get(backbone, ""))
    torch.manual_seed(0)
    model = create_model(cfg, num_classes=2).to(device)
    model.selection_graph = selection_graph
    if view_from_image:
        model.view_from_source = lambda height, width: False
    # as the trainer: channels-last weights on any device, channels-last batches on CUDA for global-hires only
    # (finescope.engine.input_channels_last); cl_input: every variant's, as before
    use_cl = channels_last and ((cl_input and device.type == "cuda") or input_channels_last(model, device, True))
    images = batch["images"].contiguous(memory_format=torch.channels_last) if use_cl else batch["images"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = _compiled(model, compile_mode)
    sizes, labels = batch["sizes"], batch["labels"]
    if mode == "infer":
        model.eval()
        if fold:
            model.fold_batchnorm()

        def infer() -> None:
            with torch.no_grad(), _autocast(device, amp, args):
                run(images, sizes)

        return Case(name, _wrap(infer, selection_flag, patches), len(labels))
    model.train()

    def forward() -> torch.Tensor:
        with _autocast(device, amp, args):
            out = run(images, sizes)
        return compute_loss(out, labels)

    params = [p for p in model.parameters() if p.requires_grad]
    step = _train_step(model, forward, _adamw(params, device), params)
    return Case(name, _wrap(step, selection_flag, patches), len(labels))


def _wrap(step: Callable[[], None], selection_flag: str, patches: tuple) -> Callable[[], None]:
    step = step if selection_flag == "end" else _selection_flag(step, selection_flag)
    return _patched(step, patches) if patches else step


def _patched(step: Callable[[], None], patches: tuple) -> Callable[[], None]:
    """``step`` with each (module, attribute, value) of ``patches`` set while it runs."""

    def wrapped() -> None:
        with contextlib.ExitStack() as stack:
            for module, attribute, value in patches:
                stack.enter_context(mock.patch.object(module, attribute, value))
            step()

    return wrapped


def _aten_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def passes_case(backbone: str, args, batch: dict, mode: str, device: torch.device, amp: bool,
                channels_last: bool, compile_mode: str | None = None, name: str = "passes") -> Case:
    """The backbone passes inside one fusion step: global view (B, 3, Gh, Gw) + crops (B*K, 3, L, L)."""
    cfg = ModelConfig(variant="fusion", backbone=backbone, global_size=args.global_size,
                      local_size=args.local_size, num_crops=args.num_crops, weights=args.weights.get(backbone, ""))
    torch.manual_seed(0)
    model = create_model(cfg, 2)
    trunk = copy.deepcopy(model.backbone).to(device)
    B, _, H, W = batch["images"].shape
    gh, gw = model.view_size(H, W)  # the view the fusion step passes (its long side rounded)
    L = args.local_size
    view = torch.rand(B, 3, gh, gw, device=device)
    crops = torch.rand(B * args.num_crops, 3, L, L, device=device)
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    if channels_last and device.type == "cuda":
        view, crops = (t.contiguous(memory_format=torch.channels_last) for t in (view, crops))
    run = _compiled(trunk, compile_mode)
    if mode == "infer":
        trunk.eval()

        def infer() -> None:
            with torch.no_grad(), _autocast(device, amp, args):
                run(view)
                run(crops, new_step=False)

        return Case(name, infer, B)
    trunk.train()

    def forward() -> torch.Tensor:
        with _autocast(device, amp, args):
            first = run(view).float().mean()
            return first + run(crops, new_step=False).float().mean()

    params = list(trunk.parameters())
    return Case(name, _train_step(trunk, forward, _adamw(params, device), params), B)


def make_batch(size: tuple[int, int], batch: int, device: torch.device) -> dict:
    """A seeded random batch of full-resolution images in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    H, W = size
    return {
        "images": torch.rand(batch, 3, H, W, generator=g).to(device),
        "sizes": torch.tensor([[H, W]] * batch),
        "labels": torch.randint(0, 2, (batch,), generator=g).to(device),
    }


def build_cases(backbone: str, size, mode: str, args, device: torch.device) -> list[Case]:
    """Every case of one (backbone, size, mode) group."""
    batch_size = args.batch_large if size[0] * size[1] > 1_000_000 and args.batch_large else args.batch
    batch = make_batch(size, batch_size, device)
    amp, cl = not args.no_amp, not args.no_channels_last
    cases = [model_case(v, v, backbone, args, batch, mode, device, amp, cl) for v in args.variants]
    if "fusion" in args.variants:
        cases.append(passes_case(backbone, args, batch, mode, device, amp, cl))
        flags = {"fp32": {"amp": False}, "contiguous": {"channels_last": False}, "view-image": {"view_from_image": True},
                 "cl-input": {"cl_input": True},
                 "folded-bn": {"fold": True},
                 "eager-selection": {"selection_graph": False}, "selection-nosync": {"selection_flag": "never"},
                 "selection-sync-now": {"selection_flag": "now"},
                 "aten-resize": {"patches": ((network, "resize_aa", _aten_resize),)},
                 "one-call-crops": {"patches": ((align, "CPU_WAYS", False),)},
                 **{name: {"compile_mode": how} for name, how in COMPILE_MODES.items()}}
        for name in args.ablate:
            if name == "folded-bn" and mode == "train":  # folding is for inference-only models (load_trained)
                continue
            cases.append(model_case(f"fusion+{name}", "fusion", backbone, args, batch, mode, device,
                                    **{"amp": amp, "channels_last": cl, **flags[name]}))
            if name in COMPILE_MODES:  # the compiled step against compiled passes
                cases.append(passes_case(backbone, args, batch, mode, device, amp, cl, COMPILE_MODES[name],
                                         f"passes+{name}"))
    return cases


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: the resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_step_peak_mib(step: Callable[[], object]) -> float | None:
    """Peak resident memory of one step above the resident memory before it, in MiB (Linux only, else None).

    The CPU allocator keeps no peak counter, so the kernel's does: writing 5 to /proc/self/clear_refs sets the
    resident high-water mark (VmHWM) to the current resident size. Freed heap memory is handed back to the
    system first (glibc ``malloc_trim``), so that memory the step needs shows as growth. What is resident
    before the step (weights, optimizer state, the input batch) is not counted: on a GPU ``peak MiB`` is all
    allocated memory, here it is what the step adds.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (or jemalloc/tcmalloc preloaded): growth may hide in free memory
        pass
    try:
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        if _status_kib("VmHWM") - _status_kib("VmRSS") > 1024:  # the reset did not take (a sandboxed /proc)
            return None
    except (OSError, KeyError, ValueError):
        return None
    step()
    return max(0, _status_kib("VmHWM") - before) / 1024


def peak_mib(case: Case, device: torch.device) -> float | None:
    """Peak memory of one step: allocated device memory on CUDA, growth of resident memory on the CPU
    (:func:`cpu_step_peak_mib`)."""
    if device.type != "cuda":
        return cpu_step_peak_mib(case.step) if device.type == "cpu" else None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    case.step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_group(cases: list[Case], args, device: torch.device) -> tuple[dict, dict]:
    """Warm up each case, measure its peak memory, then time all cases interleaved ``args.reps`` times."""
    times: dict[str, list[float]] = {}
    memory: dict[str, float | None] = {}
    alive = []
    for case in cases:
        try:
            for _ in range(args.warmup):
                case.step()
            memory[case.name] = peak_mib(case, device)
            alive.append(case)
        except torch.OutOfMemoryError:
            memory[case.name] = float("inf")
            torch.cuda.empty_cache()
    for _ in range(args.reps):
        for case in alive:
            times.setdefault(case.name, []).append(timed(case.step, device))
    return times, memory


def paired_ratio(times: dict, num: str, den: str) -> dict | None:
    """Median and spread of time[num][i] / time[den][i] over repetitions i."""
    if num not in times or den not in times:
        return None
    return summary([a / b for a, b in zip(times[num], times[den], strict=True)])


def group_rows(key: dict, cases: list[Case], times: dict, memory: dict) -> list[dict]:
    rows = []
    for case in cases:
        row = {**key, "case": case.name, "batch": case.images, "peak_mib": memory.get(case.name)}
        if case.name in times:
            s = summary(times[case.name])
            row.update(ms=s["median"] * 1e3, ms_min=s["min"] * 1e3, ms_max=s["max"] * 1e3,
                       images_per_s=case.images / s["median"], ms_reps=[t * 1e3 for t in times[case.name]])
        else:
            row.update(ms=None, images_per_s=None, note="out of memory")
        rows.append(row)
    return rows


def group_ratios(key: dict, times: dict) -> dict:
    out = {**key}
    for name, (num, den) in {"overhead": ("fusion", "passes"), "fusion_vs_hires": ("fusion", "global-hires"),
                             **{f"{a}_speedup": (f"fusion+{a}", "fusion") for a in ABLATIONS},
                             **{f"{a}_overhead": (f"fusion+{a}", f"passes+{a}") for a in COMPILE_MODES}}.items():
        r = paired_ratio(times, num, den)
        if r is not None:
            out[name] = r
    return out


def format_report(result: dict) -> str:
    """Two markdown tables: per-case throughput and memory, and the ratios."""

    def fmt(v, spec=".1f"):
        return "-" if v is None else ("OOM" if v == float("inf") else format(v, spec))

    rows = [[r["backbone"], r["size"], r["mode"], r["case"], r["batch"], fmt(r.get("ms")),
             f"{fmt(r.get('ms_min'))}-{fmt(r.get('ms_max'))}", fmt(r.get("images_per_s")), fmt(r["peak_mib"], ".0f")]
            for r in result["rows"]]
    t1 = markdown_table(["backbone", "input", "mode", "case", "B", "ms/step (median)", "spread", "images/s",
                         "peak MiB"], rows)

    def ratio(r):
        return "-" if r is None else f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"

    ablated = [a for a in ABLATIONS if any(f"{a}_speedup" in g for g in result["ratios"])]
    compiled = [a for a in COMPILE_MODES if any(f"{a}_overhead" in g for g in result["ratios"])]
    rows = [[g["backbone"], g["size"], g["mode"], ratio(g.get("overhead")), ratio(g.get("fusion_vs_hires")),
             *[ratio(g.get(f"{a}_speedup")) for a in ablated],
             *[ratio(g.get(f"{a}_overhead")) for a in compiled]] for g in result["ratios"]]
    labels = dict(ABLATION_LABELS)
    if result["environment"]["device"].startswith("cpu"):  # the CPU's autocast is --cpu-amp (off: fp32 too)
        amp = result.get("settings", {}).get("cpu_amp", "off")
        labels["fp32"] = f"fp32 / {'fp32 (--cpu-amp off)' if amp == 'off' else amp}"
    t2 = markdown_table(["backbone", "input", "mode", "fusion / passes", "fusion / global-hires",
                         *[labels[a] for a in ablated],
                         *[OVERHEAD_LABELS[a] for a in compiled]], rows)
    env = result["environment"]
    goals = goal_lines(result["ratios"], env["device"])
    head = (f"device {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, "
            f"torchvision {env['torchvision']}, commit {env['commit']}, load {env['loadavg_start']} -> "
            f"{env.get('loadavg_end', '')}\n`{env['command']}`")
    return f"{head}\n\n{t1}\n\nRatios, paired per repetition: median (min-max)\n\n{t2}\n\n{goals}\n"


def goal_lines(ratios: list[dict], device: str) -> str:
    """Issue 5's goals against the groups' median ratios: fusion / passes at most 1.25 on the CPU and 1.15 on
    CUDA, fusion / global-hires below 1; the groups that miss are named."""
    limit = OVERHEAD_GOAL.get(device.split(":")[0])  # cuda:1 is cuda
    checks = [(f"fusion / passes <= {limit}", "overhead", lambda r: r <= limit)] if limit else []
    checks.append(("fusion / global-hires < 1", "fusion_vs_hires", lambda r: r < 1))
    lines = []
    for label, key, meets in checks:
        groups = [g for g in ratios if g.get(key)]
        missed = [g for g in groups if not meets(g[key]["median"])]
        named = "; ".join(f"{g['backbone']} {g['size']} {g['mode']} {g[key]['median']:.3f}" for g in missed)
        if groups:
            lines.append(f"- {label}: met by {len(groups) - len(missed)} of {len(groups)} groups (medians)"
                         + (f"; missed: {named}" if missed else ""))
    return "Goals:\n" + "\n".join(lines) if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--sizes", nargs="+", default=["460x700", "1536x2048"], help="HxW of the full-resolution input")
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-large", type=int, default=0, help="batch for inputs over 1 Mpx (0 = --batch)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=224)
    p.add_argument("--num-crops", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (bf16 autocast otherwise)")
    p.add_argument("--cpu-amp", default="off", choices=("off", "bf16"),
                   help="autocast on the CPU, as train.cpu_amp (default off: fp32); the fp32 ablation turns it off")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--ablate", nargs="*", default=[], choices=ABLATIONS,
                   help="extra fusion cases, each described in this script's docstring (e.g. fp32, contiguous: "
                        "no channels_last, compile, view-image, folded-bn, one-call-crops)")
    p.add_argument("--weights", nargs="*", default=[], metavar="BACKBONE=PATH",
                   help="local weights, e.g. mobilenet_v2=../shared/weights/mobilenet_v2-b0353104.pth")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", help="JSON file for the full results (a .md with the tables is written beside it)")
    args = p.parse_args(argv)
    require_counts(p, args, warmup=0, reps=1, batch=1, batch_large=0, num_crops=1, global_size=1, local_size=1,
                   threads=0)
    if args.ablate and "fusion" not in args.variants:  # no group would measure them
        p.error("--ablate: its cases are fusion steps; add fusion to --variants")
    if "folded-bn" in args.ablate and "infer" not in args.modes:
        p.error("--ablate folded-bn: inference only; add infer to --modes")
    # checked here, not when the group that needs them comes (minutes into a table), each with one line
    if any("=" not in w for w in args.weights):
        p.error(f"--weights: give BACKBONE=PATH, not '{next(w for w in args.weights if '=' not in w)}'")
    args.weights = dict(w.split("=", 1) for w in args.weights)
    for name, path in args.weights.items():
        if not Path(path).is_file():
            p.error(f"--weights {name}: file '{path}' not found")
    for size in args.sizes:
        parse_hw(p, "--sizes", size)
    try:
        torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        p.error(f"--device: '{args.device}' is not auto, cpu or cuda")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.out and Path(args.out).is_dir():
        raise SystemExit(f"bench_model.py: error: --out '{args.out}': is a folder; give a JSON file name")
    if args.out and Path(args.out).suffix.lower() == ".md":  # the tables go to its .md: the JSON would be lost
        raise SystemExit(f"bench_model.py: error: --out '{args.out}': give the JSON file's name (e.g. "
                         f"{Path(args.out).with_suffix('.json')}); the tables are written beside it as .md")
    if args.out:  # an --out that cannot be written fails now, not after the first group
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"bench_model.py: error: --out '{args.out}': {e.strerror or e}") from None
    allocator_as_the_cli()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items()},
              "rows": [], "ratios": []}
    for backbone in args.backbones:
        for size_text in args.sizes:
            for mode in args.modes:
                key = {"backbone": backbone, "size": size_text, "mode": mode}
                cases = build_cases(backbone, parse_size(size_text), mode, args, device)
                times, memory = run_group(cases, args, device)
                result["rows"] += group_rows(key, cases, times, memory)
                result["ratios"].append(group_ratios(key, times))
                print(f"{backbone} {size_text} {mode}: " + ", ".join(
                    f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items()), flush=True)
                del cases
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save(result, args.out)  # after every group: a run cut short keeps what it measured
    report = save(result, args.out)
    print(report)
    return result


def save(result: dict, out: str | None) -> str:
    """Write the JSON and the markdown report (when ``out`` is set); return the report."""
    result["environment"]["loadavg_end"] = loadavg()
    report = format_report(result)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        path.with_suffix(".md").write_text(report)
    return report


if __name__ == "__main__":
    try:
        main()
    except FinescopeError as e:  # an unknown backbone, unreadable weights: one line, no traceback
        raise SystemExit(f"bench_model.py: error: {e}") from None
