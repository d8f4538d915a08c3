"""Experiment configuration: frozen dataclasses hold every default; YAML files and ``--set`` override them.

A config file is a YAML mapping with the sections ``data``, ``model``, ``train`` and the top-level keys ``seed``
and ``name``. Any key that is not a field below is an error that lists the valid keys.

Example:
    >>> cfg = load_config("configs/demo.yaml", overrides=["train.epochs=3", "model.variant=global"])
    >>> cfg.model.variant
    'global'
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from finescope.errors import FinescopeError
from finescope.files import write_text


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from, how they are grouped, split and loaded."""

    source: str = "synthetic"  # synthetic | breakhis | folder | csv
    root: str = "data_cache/synthetic"
    task: str = "binary"  # breakhis: binary | subtype
    magnifications: tuple[int, ...] = ()  # breakhis, or a csv's magnification column: keep only these (empty = all)
    group_pattern: str = ""  # folder: regex on the file name, else on the path below the class folder; group 1
    on_error: str = "raise"  # raise | skip: what to do with an unreadable image
    # the bits a camera stored in 16-bit files (12: values 0..4095): 16-bit samples are scaled by
    # 255 / (2**bit_depth - 1) and clipped to 255; 0 = by the file's own type (65535); 8-bit files are as they are
    bit_depth: int = 0  # 0 | 9..16
    merge_duplicates: bool = False  # byte-identical files share a group (hashes every file once per load)
    val_fraction: float = 0.15  # of the groups, carved from the training side
    test_fraction: float = 0.3  # of the groups
    splits: str = ""  # a splits.json to reuse instead of drawing new splits
    augment: str = "microscopy"  # none | geometric | microscopy | strong
    # where the augmentation's colour jitter runs: workers | device (on the batch, on the training device) |
    # auto (device when training on CUDA)
    colour_on: str = "auto"
    # with 90-degree rotations in the augmentation, on: every non-square training image of a step is turned to
    # that step's orientation (a coin per global step), so a batch of one-size images (BreakHis) keeps that size
    # instead of being padded to a square and resized for the model in two groups (epochs 1.1-1.2x faster on a
    # CPU); each image still sees all 8 flips and rotations with probability 1/8. auto: on under train.compile
    # (each arrangement of mixed orientations in a batch would be another graph), else off
    one_orientation: str = "auto"  # auto | on | off
    shape_pool: int = 0  # training: every N global batches of the shuffled order sorted by aspect ratio, cut into
    # batches, the batches shuffled (0 = off): on a folder of many sizes, 8 made views 1.08x their images' pixels
    # instead of 1.41x and epochs 0.9x as long on a CPU (benchmarks/RESULTS.md); a step's images are then alike
    num_workers: int = 2
    cache: str = "none"  # none | memory (decoded once, shared by the workers) | disk (.npy files in cache_dir)
    cache_dir: str = ""  # disk cache folder; "" = $XDG_CACHE_HOME/finescope/decoded (~/.cache/...)
    # synthetic source only
    synthetic_per_class: int = 160
    synthetic_size: int = 384


@dataclass(frozen=True)
class ModelConfig:
    """The network of method.md; every choice the paper leaves open is a field here."""

    variant: str = "fusion"  # global | global-hires | attention | fusion | fusion-nogate
    backbone: str = "resnet18"
    weights: str = ""  # a local state dict (torchvision or timm key layout), or a finescope run: its backbone
    pretrained: bool = False  # download the library's ImageNet weights (needs a network)
    global_size: int = 224  # short side of the global view
    view_multiple: int = 1  # the view's long side rounded to a multiple of this (e.g. 32): images of many sizes
    # then make fewer backbone input shapes, each of which costs CUDA a set-up once (benchmarks/shape_count.py);
    # global-hires reads the image itself, which it leaves as it is
    local_size: int = 224  # side of each high-resolution crop
    num_crops: int = 4  # K
    threshold: float = 0.5  # tau, on the normalised attention map
    selection_norm: str = "minmax"  # max (method.md) | minmax: how the map is scaled to [0, 1] before tau;
    # minmax is the measured best (docs/ablations.md): with max, a flat map at half its peak became one
    # whole-image box on both the synthetic set and BreakHis
    min_box_fraction: float = 1 / 3  # minimum box side as a fraction of the image's short side
    selection_upsample: int = 4  # points per feature cell (each axis) of the grid the map is thresholded and
    # labelled on; method.md thresholds every pixel, which about as many points as a cell has pixels comes near,
    # at a cost that grows with its square (benchmarks/selection_grid.py); under exact components, the grid of
    # the components' masses and the fallback peaks only
    selection_components: str = "exact"  # exact: the components and boxes of the bilinear map itself, as
    # method.md's every pixel, labelled on a grid twice as fine as the cells | grid: those of the
    # selection_upsample grid
    selection_peaks: str = "nodes"  # nodes: the fallback peaks are centred on the selection_upsample grid's
    # points or on the feature cells' centres, where the bilinear map has its maxima | grid: on the grid's points
    peak_iou: float = 0.5  # fallback peaks whose box overlaps a taken box by more IoU than this are skipped
    proj_dim: int = 256  # M; 0 = no projection of the instances
    attn_dim: int = 128  # L in Ilse et al. Eq. 9
    image_feature: str = "attention"  # attention | avg
    dropout: float = 0.2
    predict_with: str = "fused"  # fused | mean (mean of fused and global probabilities)
    select_from: str = "attention"  # attention | evidence: crops where the global head's predicted class has
    # the most evidence (its logit on each cell, a CAM), instead of where the attention weights are largest
    crop_backbone: str = "shared"  # shared | separate: a second copy of the backbone reads the crops


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 30
    batch_size: int = 16  # the global batch: under DDP each of N processes reads batch_size / N
    lr: float = 3e-4
    backbone_lr_scale: float = 1.0  # the backbone's learning rate = lr * this
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 10  # early stopping: epochs without validation improvement
    monitor: str = "balanced_accuracy"  # validation metric that picks best.pt
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none | balanced: the training loss weighs each class by n / (C * n_c) of the
    # training side (scikit-learn's 'balanced'), so that a rare class counts in it as much as a common one
    aux_weight: float = 1.0  # lambda: weight of the global head's loss
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "bf16"  # autocast on CUDA: bf16 | fp16 (with loss scaling) | off
    cpu_amp: str = "off"  # autocast on the CPU: off | bf16 (fast where the CPU has AVX512-BF16 or AMX)
    channels_last: bool = True  # the model's weights channels-last (on CUDA global-hires' input batches too)
    selection_graph: bool = True  # CUDA, eager steps: replay the instance selection as a CUDA graph (same boxes)
    # CUDA: depthwise convolutions (mobilenet_v2, efficientnet) through cuDNN; false: PyTorch's own kernels, where
    # a new batch shape costs mobilenet_v2 in fp16 about 0.1 s instead of about 10 s and a known one 1.36x as long
    # (H200, benchmarks/RESULTS.md); eager steps only (not with train.compile)
    cudnn_depthwise: bool = True
    # torch.compile the training steps: off | default (inductor) | reduce-overhead (inductor + CUDA graphs, one
    # process only) | max-autotune; true reads as default, false as off. Compiled training drops each epoch's last
    # incomplete batch, so that every step has one shape (otherwise every image is read once per epoch)
    compile: str = "off"
    sync_bn: bool = False  # DDP on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)
    eval_batch_size: int = 0  # 0 = batch_size
    crop_warmup_epochs: int = 0  # stage-wise: the first N epochs train the global/attention path only


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    name: str = ""


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ``['data.source', ..., 'seed']``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or ``--set`` value to the field's declared type."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if tp in (int, float):
            if isinstance(value, bool):  # YAML's true/false are ints to Python, not numbers to a user
                raise ValueError(value)
            if isinstance(value, str) and "/" in value:  # allow 1/3
                num, den = value.split("/", 1)
                value = float(num) / float(den)
            out = tp(value)
            if not math.isfinite(out):
                raise FinescopeError(f"config key '{key}' must be a finite number, got {value!r}")
            if tp is int and isinstance(value, float) and value != int(value):
                raise ValueError(value)
            return out
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return "" if value is None else str(value)
        if origin is tuple:
            (item_tp, _) = typing.get_args(tp)
            if value is None or value == "":
                return ()
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(_coerce(v, item_tp, key) for v in value)
        if isinstance(tp, types.UnionType):
            return value
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        raise FinescopeError(f"config key '{key}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - names)
    if unknown:
        raise FinescopeError(_unknown_key(prefix + unknown[0]))
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise FinescopeError(f"config key '{prefix}{name}' must be a mapping of {tp.__name__} keys")
            kwargs[name] = _build(tp, value, prefix + name + ".")
        else:
            if isinstance(value, bool) and name in _LEGACY_BOOLEANS and tp is str:
                value = _LEGACY_BOOLEANS[name][value]
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _unknown_key(key: str) -> str:
    """The error for an unknown dotted key: the valid keys of its section (the sections and top-level keys
    when the section itself is unknown)."""
    section = key.split(".")[0] + "."
    keys = [k for k in valid_keys() if k.startswith(section)]
    if keys and "." not in key:  # a section (--set train=3): its keys take the values
        return f"config key '{key}' is a section; set one of its keys: {', '.join(keys)}"
    if not keys:
        keys = sorted({k.split(".")[0] for k in valid_keys()})
    return f"unknown config key '{key}'; valid: {', '.join(keys)}"


def config_from_dict(raw: dict | None) -> Config:
    """Build a :class:`Config` from a nested mapping; unknown keys raise :class:`FinescopeError`."""
    cfg = _build(Config, raw or {})
    validate(cfg)
    return cfg


def _set_nested(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise FinescopeError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def _key_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key and its declared type."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        out.update(_key_types(tp, prefix + f.name + ".") if is_dataclass(tp) else {prefix + f.name: tp})
    return out


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ``['a.b=c', ...]`` into a nested dict. Values of text keys are taken as written (a regex or a
    path needs no YAML quoting; surrounding quotes are removed), except the words YAML reads as booleans for
    the keys that accept them (``train.compile=true``); other values are parsed as YAML."""
    raw: dict = {}
    types_ = _key_types()
    for item in overrides or []:
        if "=" not in item:
            raise FinescopeError(f"--set expects key=value, got '{item}' (e.g. --set train.epochs=5)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in types_:
            path = " ('{item}' is a file: give paths before --set, or after --)" if os.path.exists(item) else ""
            raise FinescopeError(_unknown_key(key) + path.format(item=item))
        text = value.strip()
        if types_[key] is str and not (key.split(".")[-1] in _LEGACY_BOOLEANS
                                        and text.lower() in ("true", "false", "yes", "no", "on", "off")):
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
            _set_nested(raw, key, text[1:-1] if quoted else text)
            continue
        try:
            parsed = yaml.safe_load(value) if text else ""
        except yaml.YAMLError as e:
            raise FinescopeError(f"--set {key}: cannot read {value!r} ({str(e).splitlines()[0]})") from None
        _set_nested(raw, key, parsed)
    return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base loader refuses it, naming the line
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


SHIPPED = Path(__file__).resolve().parent / "configs"  # the configs installed with the package (configs/ in a clone)


def shipped_configs() -> list[str]:
    """The names of the configs installed with the package (``breakhis_binary``, ``demo``, ...)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def find_config(path: str | Path) -> Path:
    """The config file ``path`` names: the file itself, else, for a bare name (``breakhis_binary`` or
    ``breakhis_binary.yaml``, no folder) that names no file here, the config of that name installed with the
    package, so that a pip install, which has no ``configs/`` folder, can run them. Anything else raises
    :class:`FinescopeError` listing the shipped names."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SHIPPED / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if len(p.parts) == 1 and not p.is_dir() and shipped.is_file():
        return shipped
    what = "is a directory" if p.is_dir() else "not found"
    raise FinescopeError(f"config file '{path}' {what}; give a YAML file, or the name of a shipped config: "
                         f"{', '.join(shipped_configs())}")


def read_yaml_mapping(path: str | Path) -> dict:
    """A config file's YAML mapping (empty file: {}); ``path`` may name a shipped config (:func:`find_config`). A
    missing, unreadable or malformed file, or one that is not a mapping, raises :class:`FinescopeError` naming
    it."""
    p = find_config(path)
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise FinescopeError(f"config file '{path}' is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]  # the problem, not the context
        raise FinescopeError(f"config file '{path}' is not valid YAML{where}: {what}") from None
    if not isinstance(loaded, dict):
        raise FinescopeError(f"config file '{path}' must be a YAML mapping with sections data/model/train")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Read a YAML experiment file (optional), apply ``key=value`` overrides and validate.

    Args:
        path: a YAML file; None starts from the defaults.
        overrides: ``--set`` items such as ``"train.epochs=5"``.
        base: a nested mapping applied before the file (e.g. a checkpoint's stored config).
    """
    raw: dict = dict(base or {})
    if path is not None:
        loaded = read_yaml_mapping(path)
        for section in ("protocol", "profiles"):  # read by `finescope cv` (finescope.cv.load_protocol)
            loaded.pop(section, None)
        if "_provenance" in loaded:  # a run's own config.yaml: read as that run was trained
            loaded = stored_config(loaded)
        raw = _merge(raw, loaded)
    raw = _merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (tuples become lists) for YAML/JSON/checkpoints."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def first_difference(old: Any, new: Any, prefix: str = "", ignore: tuple[str, ...] = (),
                     names: tuple[str, str] = ("was", "now")) -> str | None:
    """The dotted key of the first difference between two nested dicts, with both values (each after its word
    in ``names``), or None; keys in ``ignore`` (dotted) are not compared."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if f"{prefix}{k}" in ignore:
                continue
            diff = first_difference(old.get(k), new.get(k), f"{prefix}{k}.", ignore, names)
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix[:-1]} ({names[0]} {old!r}, {names[1]} {new!r})"


def override(cfg: Config, **sections: dict) -> Config:
    """Return a copy with some fields replaced, e.g. ``override(cfg, model={'variant': 'global'})``."""
    raw = _merge(to_dict(cfg), sections)
    return config_from_dict(raw)


_CHOICES = {
    "data.source": ("synthetic", "breakhis", "folder", "csv"),
    "data.task": ("binary", "subtype"),
    "data.on_error": ("raise", "skip"),
    "data.augment": ("none", "geometric", "microscopy", "strong"),
    "data.cache": ("none", "memory", "disk"),
    "data.colour_on": ("auto", "workers", "device"),
    "data.one_orientation": ("auto", "on", "off"),
    "model.image_feature": ("attention", "avg"),
    "model.selection_norm": ("max", "minmax"),
    "model.selection_components": ("exact", "grid"),
    "model.selection_peaks": ("nodes", "grid"),
    "model.predict_with": ("fused", "mean"),
    "model.select_from": ("attention", "evidence"),
    "model.crop_backbone": ("shared", "separate"),
    "train.monitor": ("balanced_accuracy", "accuracy", "macro_f1", "auc", "loss"),
    "train.class_weights": ("none", "balanced"),
    "train.amp": ("bf16", "fp16", "off"),
    "train.cpu_amp": ("off", "bf16"),
    "train.compile": ("off", "default", "reduce-overhead", "max-autotune"),
}

# keys whose boolean values read as one of their choices: YAML reads `off` (and `on`) as a boolean; train.amp was
# true (bf16) / false (fp32) before fp16 existed, train.compile true (inductor's default mode) / false before its
# modes
_LEGACY_BOOLEANS = {"amp": {True: "bf16", False: "off"}, "cpu_amp": {True: "bf16", False: "off"},
                    "compile": {True: "default", False: "off"}, "one_orientation": {True: "on", False: "off"}}


DEVICES = r"auto|cpu|cuda(:\d+)?"  # the devices train.device (and --device) may name
BIT_DEPTHS = (0, *range(9, 17))  # data.bit_depth: 0 = a 16-bit file's own range, else the camera's bits
MAX_SIDE = 8192  # model.global_size and model.local_size: a larger view or crop is a typo, not a model


def check_bit_depth(bit_depth: int) -> None:
    """Refuse a ``data.bit_depth`` other than 0 or 9..16, listing the valid ones."""
    if bit_depth not in BIT_DEPTHS:
        raise FinescopeError(f"config key 'data.bit_depth' is {bit_depth}; choose 0 (scale by the file's own "
                             "type) or the camera's bits in 16-bit files: " + ", ".join(map(str, BIT_DEPTHS[1:])))


def validate(cfg: Config) -> None:
    """Check choices and ranges; raise :class:`FinescopeError` naming the key and the valid options."""
    for key, options in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise FinescopeError(f"config key '{key}' is '{value}'; choose one of: {', '.join(options)}")
    for key in ("model.global_size", "model.view_multiple", "model.local_size", "model.selection_upsample",
                "train.epochs", "train.batch_size"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise FinescopeError(f"config key '{key}' must be at least 1")
    if not 0 <= cfg.train.crop_warmup_epochs < cfg.train.epochs:
        raise FinescopeError("config key 'train.crop_warmup_epochs' must be >= 0 and below train.epochs")
    if cfg.model.num_crops < 0:
        raise FinescopeError("config key 'model.num_crops' must be >= 0")
    if not 0.0 < cfg.model.threshold <= 1.0:
        raise FinescopeError("config key 'model.threshold' must be in (0, 1]")
    if not 0.0 <= cfg.model.peak_iou <= 1.0:
        raise FinescopeError("config key 'model.peak_iou' must be in [0, 1]")
    if not 0.0 < cfg.model.min_box_fraction <= 1.0:
        raise FinescopeError("config key 'model.min_box_fraction' must be in (0, 1]")
    for key in ("data.val_fraction", "data.test_fraction", "model.dropout", "train.label_smoothing"):
        section, name = key.split(".")
        if not 0.0 <= getattr(getattr(cfg, section), name) < 1.0:
            raise FinescopeError(f"config key '{key}' must be in [0, 1)")
    if cfg.train.lr <= 0:
        raise FinescopeError("config key 'train.lr' must be above 0")
    for key in ("data.num_workers", "data.shape_pool", "model.proj_dim", "train.backbone_lr_scale", "train.weight_decay",
                "train.warmup_epochs", "train.patience", "train.grad_clip", "train.aux_weight",
                "train.eval_batch_size"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise FinescopeError(f"config key '{key}' must be >= 0")
    if cfg.model.attn_dim < 1:
        raise FinescopeError("config key 'model.attn_dim' must be at least 1")
    for key in ("model.global_size", "model.local_size"):
        if getattr(cfg.model, key.split(".")[1]) > MAX_SIDE:
            raise FinescopeError(f"config key '{key}' must be at most {MAX_SIDE} pixels")
    if cfg.data.synthetic_per_class < 1 or cfg.data.synthetic_size < 64:
        raise FinescopeError("config keys 'data.synthetic_per_class' (>= 1) and 'data.synthetic_size' (>= 64 "
                             f"pixels) are out of range: {cfg.data.synthetic_per_class}, {cfg.data.synthetic_size}")
    check_bit_depth(cfg.data.bit_depth)
    if not cfg.train.cudnn_depthwise and cfg.train.compile != "off":
        raise FinescopeError("config keys 'train.cudnn_depthwise' (false) and 'train.compile' "
                             f"({cfg.train.compile}) do not go together: the depthwise convolutions leave cuDNN in "
                             "eager steps only; set train.compile=off or train.cudnn_depthwise=true")
    if not re.fullmatch(DEVICES, cfg.train.device):
        raise FinescopeError(f"config key 'train.device' is '{cfg.train.device}'; choose auto, cpu, cuda or cuda:N")
    if not 0 <= cfg.seed < 2**32:
        raise FinescopeError(f"config key 'seed' must be in [0, 2^32), got {cfg.seed}")


def git_commit() -> str:
    """The current git commit of the working directory, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolved_dict(cfg: Config) -> dict:
    """The config plus provenance (package version, git commit), as written next to every run."""
    from finescope import __version__

    return {**to_dict(cfg), "_provenance": {"finescope_version": __version__, "git_commit": git_commit()}}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (with provenance) as YAML."""
    write_text(path, yaml.safe_dump(resolved_dict(cfg), sort_keys=False))


def strip_provenance(raw: dict) -> dict:
    """A stored config dict without its ``_provenance`` entry, ready for :func:`config_from_dict`."""
    return {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("_"))}


# keys added with (or later given) a default that changes what a run computes, and the behaviour of the
# finescope that trained a run whose stored config lacks them
# (data.one_orientation is not one: its default, auto, is the old behaviour without train.compile)
BEFORE_KEY = {"model.selection_norm": "max", "model.selection_components": "grid", "model.selection_peaks": "grid"}


def stored_config(raw: dict) -> dict:
    """A run's stored config (checkpoint or ``config.yaml``) as it was trained: without provenance, and with
    the keys of :data:`BEFORE_KEY` it lacks set to what the finescope that wrote it did, not to today's
    defaults (a run from before ``model.selection_norm`` selected with ``max``, one from before
    ``model.selection_components`` or ``model.selection_peaks`` on the grid)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in strip_provenance(raw).items()}
    for key, value in BEFORE_KEY.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name not in out[section]:
            out[section][name] = value
    return out


__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "config_from_dict",
    "first_difference",
    "load_config",
    "override",
    "replace",
    "resolved_dict",
    "save_config",
    "strip_provenance",
    "to_dict",
    "valid_keys",
]
