"""Saving and loading run state: atomic writes, ``torch.load(weights_only=True)``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finescope.errors import FinescopeError, FinescopeWarning
from finescope.files import ERRORS, json_text


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A run killed mid-write leaves the previous checkpoint intact; the data reach the disk before the rename, so
    that a machine losing power after it does not leave an empty file under the checkpoint's name (which some
    filesystems do when a rename overtakes the data it names).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:  # fsync acts on the file, whichever descriptor names it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer says "unexpected pos" when a write fails: the system's words instead, from a write
        # tried while the partial file still holds the space (a full disk, or a quota that leaves the disk free)
        refused = _write_error(path.parent) if isinstance(e, RuntimeError) else None
        tmp.unlink(missing_ok=True)
        if refused is not None:
            raise OSError(refused.errno, refused.strerror, str(path)) from None
        if isinstance(e, RuntimeError) and shutil.disk_usage(path.parent).free < 64 * 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
    except BaseException:  # Ctrl-C, or train's SIGTERM: the partial file goes, the previous checkpoint stays
        tmp.unlink(missing_ok=True)
        raise


def _write_error(folder: Path) -> OSError | None:
    """The error of writing 1 MiB in ``folder`` now (no space, a quota, a file size limit), or None."""
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e if e.errno is not None else None
    return None


def best_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a folder given for a model stands for: a run's ``checkpoints/best.pt``, else the ``best.pt``
    of a run's ``checkpoints/`` folder; None when it holds neither."""
    return next((c for c in (folder / "checkpoints" / "best.pt", folder / "best.pt") if c.is_file()), None)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only).

    Raises:
        FinescopeError: if the file is missing or is not a finescope checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = best_checkpoint(path) or path
    if not path.is_file() and (path / "cv.json").is_file():  # a cv folder: its runs are in runs/<variant>/<fold>
        runs = sorted(p.parent.parent for p in path.glob("runs/*/*/checkpoints/best.pt"))
        raise FinescopeError(f"'{path}' is a cv folder, not a run; pass one of its runs, "
                             f"{path / 'runs' / '<variant>' / '<fold>'}" + (f", e.g. {runs[0]}" if runs else ""))
    if not path.is_file() and (path / "checkpoints" / "last.pt").is_file():
        raise FinescopeError(f"run '{path}' has no checkpoints/best.pt yet (its training stopped before an epoch was "
                             f"kept); finish it with train --resume, or pass '{path / 'checkpoints' / 'last.pt'}'")
    if path.is_dir() and (runs := sorted(p.parent.parent for p in path.glob("*/checkpoints/best.pt"))):
        raise FinescopeError(f"'{path}' is a folder of runs, not a run (a cv's runs/<variant> holds one per fold); "
                             f"pass one of them, e.g. {runs[0]}")
    if path.is_dir():  # there, but no run: a run's checkpoints/ folder with last.pt alone, a folder of exports
        found = sorted(path.glob("*.pt")) + sorted(path.glob("checkpoints/*.pt"))
        raise FinescopeError(f"'{path}' is a folder without a finescope run (no checkpoints/best.pt in it); pass a run "
                             "directory or a .pt file written by finescope" + (f", e.g. '{found[0]}'" if found else ""))
    if not path.is_file():
        raise FinescopeError(f"checkpoint '{path}' not found; pass a run directory or a .pt file written by finescope")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if (what := _not_a_checkpoint_kind(path)) is not None:  # the arguments swapped, a run's other file
            raise FinescopeError(f"'{path}' is {what}, not a checkpoint: the model comes first, a run directory or "
                                 "a .pt file written by finescope (finescope predict RUN IMAGE..., finescope "
                                 "evaluate RUN)") from None
        raise FinescopeError(f"checkpoint '{path}' could not be read ({type(e).__name__}): not a finescope checkpoint, "
                             "or damaged (finescope writes whole files; a copy cut short?); pass another checkpoint "
                             "of the run (checkpoints/best.pt or last.pt), copy it again, or train anew") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise FinescopeError(f"'{path}' is not a finescope checkpoint (no model/config entries)")
    state["path"] = str(path)
    return state


def _not_a_checkpoint_kind(path: Path) -> str | None:
    """What ``path`` is by its name when that is no checkpoint's (an image, a run's config or results), else None:
    a checkpoint that cannot be read under another name is named damaged."""
    from finescope.data.sources import SUPPORTED_EXTENSIONS

    suffix = path.suffix.lower()
    if suffix in SUPPORTED_EXTENSIONS:
        return "an image"
    if suffix in (".yaml", ".yml", ".json", ".jsonl", ".csv", ".tsv", ".md", ".html", ".txt"):
        return f"a {suffix[1:].upper()} file"
    return None


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU: a resume may see fewer of them
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and \
            torch.cuda.current_device() < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def read_history(path: str | os.PathLike) -> list[dict]:
    """The epoch rows of a run's ``history.jsonl``. A line that is not a JSON object with a whole-number
    ``epoch`` (the partial last line of a run killed while writing it, a full disk, an edit) is skipped with a
    warning: the checkpoints, not this log, are what a resumed run continues from."""
    rows = []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
            rows.append(row)
        else:
            warnings.warn(f"{path}: line {n} is not an epoch record (a run killed while writing it?); skipped",
                          FinescopeWarning, stacklevel=2)
    return rows


def json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable or holds no object."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _data_options(recorded: dict | None, split: str) -> str:
    """`` --set data.source=csv data.root=/x.csv model.threshold=0.9``: the data settings that evaluate or explain
    read with instead of the run's own and the model settings they ran the weights with, as ``recorded`` (their
    ``metrics_<split>.json`` or ``faithfulness.json``) holds them, shell-quoted; with ``split='all'`` its
    ``data_root`` always (files of older versions record it alone)."""
    recorded = recorded if isinstance(recorded, dict) else {}
    changed = recorded.get("data_overrides")
    changed = changed if isinstance(changed, dict) else {}  # {} in an older version's file
    root = recorded.get("data_root") if split == "all" else None
    if "data.root" not in changed and isinstance(root, str) and root:  # all images: of which data, said
        changed = {"data.root": root, **changed}
    model = recorded.get("model_overrides")  # the model run with (model.threshold=0.9): the same one again
    changed = {**changed, **model} if isinstance(model, dict) else changed
    items = [f"{key}={_set_value(value)}" for key, value in changed.items()]
    return f" --set {' '.join(shlex.quote(item) for item in items)}" if items else ""


def _set_value(value: Any) -> str:
    """``value`` as ``--set`` reads it back: text as it is (quoted where ``--set`` would strip spaces or quotes
    from it), lists and numbers as JSON (YAML reads them)."""
    if not isinstance(value, str):
        return json_text(value)
    bare = value == value.strip() and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"")
    return value if bare else f'"{value}"'


# data settings that choose other images or groups of the same data.root (not the loader's: data.num_workers)
_CHOOSING = ("data.task", "data.magnifications", "data.group_pattern", "data.merge_duplicates")


def _name_value(value: Any) -> str:
    """``value`` in a file name: a list as its items joined by '+' (``40+100``), an empty one as ``all``."""
    return ("+".join(map(str, value)) or "all") if isinstance(value, (list, tuple)) else str(value)


def evaluated_suffix(model_overrides: dict | None, data_overrides: dict | None, split: str | None) -> str:
    """What evaluate adds to its file names (``metrics_<split><suffix>.json``, its predictions and report) and explain
    to its folder's (``explain_<split><suffix>/``) in a run, so that neither replaces the run's own files nor
    another evaluation's: ``_<data>`` for all images of other data (``split='all'`` with another ``data.root`` in
    ``data_overrides``: its folder's name, ``_hospital_b``, or a CSV's with its folder's, ``_hospital_b-manifest``), then ``_<setting>`` for data settings that choose
    other images or groups (``_magnifications=40``, of any split; not of files), then ``_<settings>`` for a model
    run with other settings than trained (``model_overrides`` as ``--set`` gives them, less the section:
    ``_threshold=0.9``).
    Text that is no part of a file name becomes '-'; a suffix of over 60 characters is cut and ends in a digest of
    it. Empty for the model as trained on its own data."""
    parts = []
    changed = data_overrides if isinstance(data_overrides, dict) else {}
    if split == "all" and ("data.root" in changed or "data.source" in changed):
        root = str(changed.get("data.root") or changed["data.source"])
        path = Path(root.rstrip("/\\"))  # a CSV with its folder: manifest.csv is a usual name for every list
        parts.append(f"{path.parent.name}-{path.stem}" if path.suffix.lower() == ".csv" else path.name)
    parts += [f"{key.split('.', 1)[-1]}={_name_value(changed[key])}" for key in _CHOOSING if split and key in changed]
    model = model_overrides if isinstance(model_overrides, dict) else {}
    parts += [f"{key.split('.', 1)[-1]}={value}" for key, value in model.items()]
    suffix = "".join("_" + (re.sub(r"[^\w.=+-]+", "-", part).strip("-.") or "data") for part in parts)
    if len(suffix) > 60:
        suffix = suffix[:51] + "-" + hashlib.sha1(suffix.encode("utf-8", ERRORS)).hexdigest()[:8]
    return suffix


def earlier_evaluations(run_dir: Path) -> dict[str, str]:
    """What ``evaluate`` (``metrics_<split>[_<checkpoint>][<suffix>].json``, with its predictions and report) and
    ``explain`` (``explain_<split>[<suffix>]/``; :func:`evaluated_suffix`) wrote in ``run_dir`` of a checkpoint
    written again since (a run trained on), also under the name without its suffix that versions before it gave
    them: file or folder name -> the command that makes it again."""
    earlier = {}
    best = run_dir / "checkpoints" / "best.pt"
    for folder in sorted(run_dir.glob("explain_*")):
        try:
            newer = best.stat().st_mtime_ns > (folder / "results.csv").stat().st_mtime_ns
        except OSError:  # no finished explanation there, or no best.pt
            continue
        split = folder.name.removeprefix("explain_").split("_")[0]  # explain_all_hospital_b: all images
        if newer:
            recorded = json_object(folder / "faithfulness.json") or {}
            options = recorded.get("options") if isinstance(recorded.get("options"), list) else []  # --limit 50
            data = "".join(f" {shlex.quote(str(o))}" for o in options) + _data_options(recorded, split)
            suffix = evaluated_suffix(recorded.get("model_overrides"), recorded.get("data_overrides"), split)
            own = split in ("train", "val", "test", "all") and folder.name in (f"explain_{split}{suffix}",
                                                                             f"explain_{split}")
            earlier[f"{folder.name}/"] = (f"finescope explain {shlex.quote(str(run_dir))} --split {split}{data}"
                                          if own else "finescope explain again")
    for path in sorted(run_dir.glob("metrics_*.json")):
        try:
            m = json.loads(path.read_text())
            split, ckpt = m["split"], run_dir / "checkpoints" / Path(m["checkpoint"]).name
            newer = ckpt.stat().st_mtime_ns > path.stat().st_mtime_ns
        except (OSError, ValueError, KeyError, TypeError):  # not evaluate's, or its checkpoint is gone
            continue
        suffix = evaluated_suffix(m.get("model_overrides"), m.get("data_overrides"), split)
        # without the suffix: an older version's name, of other data or settings (the command writes the new one)
        names = {f"metrics_{split}{s}.json" for s in ("", suffix)} | {f"metrics_{split}_{ckpt.stem}{s}.json"
                                                                     for s in ("", suffix)}
        if newer and path.name in names:
            checkpoint = "" if ckpt.name == "best.pt" else f"/checkpoints/{ckpt.name}"
            data = _data_options(m, split)
            earlier[path.name] = f"finescope evaluate {shlex.quote(f'{run_dir}{checkpoint}')} --split {split}{data}"
    return earlier
