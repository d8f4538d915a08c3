"""Shared helpers of the benchmarks: environment record, timing, medians, markdown tables.

The benchmarks live outside the package; run them from the repository root with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from argparse import ArgumentParser
from collections.abc import Callable
from pathlib import Path

import torch

from finescope.errors import FinescopeError
from finescope.runtime import ENV, tune_allocator

ROOT = Path(__file__).resolve().parents[1]
# environment variables that change what a benchmark measures (its devices, threads, allocator), as the recorded
# command sets them: rerun as recorded, it measures the same thing
MEASURED_ENV = ("CUDA_VISIBLE_DEVICES", ENV, "GLIBC_TUNABLES", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                "PYTORCH_CUDA_ALLOC_CONF")
_MALLOC = {"tuned": False}


def allocator_as_the_cli() -> None:
    """Set glibc's malloc as the finescope command line does (:func:`finescope.runtime.tune_allocator`; the
    environment variable ``FINESCOPE_MALLOC=default`` leaves it as it is). :func:`environment` records which."""
    _MALLOC["tuned"] = tune_allocator()


def loadavg() -> str:
    """The 1/5/15-minute load average (``/proc/loadavg``), or '' where there is none."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the repository, with ``+dirty`` when tracked files outside ``benchmarks/results`` (where the
    benchmarks write) have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def require_device(device: torch.device | str) -> torch.device:
    """``device``, or exit with one line when it is CUDA and this machine has none."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: no CUDA device on this machine; run with --device cpu")
    return device


def parse_device(parser: ArgumentParser, text: str, auto: bool = False) -> torch.device:
    """``--device`` as a torch device, or the parser's one-line error for a name torch does not know; ``auto``:
    the script also takes ``auto`` (checked by the caller), so the error names it too."""
    try:
        return torch.device(text)
    except RuntimeError:
        parser.error(f"--device: '{text}' is not {'auto, ' if auto else ''}cpu or cuda")


def parse_hw(parser: ArgumentParser, option: str, text: str) -> tuple[int, int]:
    """``'460x700'`` -> (460, 700) (height x width), or the parser's one-line error naming ``option`` (also for a
    side below 1, which would end in a ZeroDivisionError or a resize's RuntimeError after the setup)."""
    try:
        h, w = text.lower().split("x")
        if int(h) >= 1 and int(w) >= 1:
            return int(h), int(w)
    except ValueError:
        pass
    parser.error(f"{option}: '{text}' is not HxW of two sides of 1 or more (e.g. 460x700)")


def parse_weights(parser: ArgumentParser, values: list[str]) -> dict[str, str]:
    """``--weights BACKBONE=PATH ...`` as {backbone: path}, each file checked now, not when its backbone comes
    (minutes into a run); the parser's one-line error otherwise."""
    for w in values:
        if "=" not in w:
            parser.error(f"--weights: give BACKBONE=PATH, not '{w}'")
    weights = dict(w.split("=", 1) for w in values)
    for name, path in weights.items():
        if not Path(path).is_file():
            parser.error(f"--weights {name}: file '{path}' not found")
    return weights


def require_counts(parser: ArgumentParser, args, **least: int) -> None:
    """The parser's one-line error for a count of ``args`` below its least value (``reps=1, warmup=0``), before
    anything is timed: ``--reps 0`` would otherwise end in a StatisticsError or ZeroDivisionError after the
    setup, or in a table of nothing. A list option (``nargs``) is checked value by value."""
    for name, low in least.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v < low:
                parser.error(f"--{name.replace('_', '-')}: give {low} or more, not {v}")


def make_out_folder(parser: ArgumentParser, out: str | None, md_beside: bool = True) -> None:
    """Make ``--out``'s folder now, or the parser's one-line error: an ``--out`` that cannot be written fails
    before the timings, not after them with what they measured lost. ``md_beside``: the script writes its tables
    beside the JSON as ``.md``, so an ``--out`` ending in ``.md`` is refused (the tables would overwrite the
    JSON)."""
    if out and Path(out).is_dir():
        parser.error(f"--out '{out}': is a folder; give a JSON file name")
    if out and md_beside and Path(out).suffix.lower() == ".md":
        parser.error(f"--out '{out}': give the JSON file's name (e.g. {Path(out).with_suffix('.json')}); the "
                     "tables are written beside it as .md")
    if out:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--out '{out}': {e.strerror or e}")


def run_script(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main`` as a script: its return value is the exit status, and a
    :class:`~finescope.errors.FinescopeError` (a wrong path, config or backbone) one line on stderr, not a
    traceback."""
    try:
        status = main()
    except FinescopeError as e:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: {e}") from None
    raise SystemExit(status if isinstance(status, int) else 0)


def environment(device: torch.device) -> dict:
    """Machine, versions, commit and the exact command: recorded next to every figure (exits with one line when
    ``device`` is CUDA and there is none)."""
    import torchvision

    require_device(device)

    env = {
        "command": "".join(f"{k}={shlex.quote(os.environ[k])} " for k in MEASURED_ENV if k in os.environ)
        + "PYTHONPATH=src python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_start": loadavg(),
        "malloc": "finescope (no mmap, no trim)" if _MALLOC["tuned"] else "default",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()  # e.g. 91002 for 9.10.2
    return env


def run_child(script: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script`` with ``args`` in a fresh Python process (this checkout's ``src`` first on PYTHONPATH,
    ``env`` added to the environment) and return the JSON object its output ends with; a child that fails
    exits this process with one line: its command and the last line it wrote to stderr."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    full = {**os.environ, **(env or {}), "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=full, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: child '{Path(script).name} {' '.join(args)}' failed: "
                         f"{why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ms(fn, device: torch.device, reps: int, synced: bool = True) -> float:
    """Median milliseconds of ``fn()``; with ``synced=False`` the host time alone (the device drained first)."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        if synced:
            sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    sync(device)
    return statistics.median(times)


def summary(values: list[float]) -> dict:
    """Median, min and max of a list (the spread of interleaved repetitions)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms_spread(s: dict) -> str:
    """A :func:`summary` of milliseconds as ``median (min-max)``."""
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def report_header(env: dict) -> str:
    """The two lines above a benchmark's tables: machine, versions, commit, load, and the exact command."""
    return (f"device {env.get('gpu', env['cpu'])} ({env['device']}, {env['torch_threads']} threads), torch "
            f"{env['torch']}, torchvision {env['torchvision']}, commit {env['commit']}, load {env['loadavg_start']} "
            f"-> {env.get('loadavg_end', '')}\n`{env['command']}`")


def save_report(out: str | None, payload: dict, report: str) -> None:
    """Print ``report``; with ``out``, write ``payload`` there as JSON and ``report`` beside it as ``.md``."""
    print(report)
    if out:
        Path(out).write_text(json.dumps(payload, indent=1))
        Path(out).with_suffix(".md").write_text(report)
