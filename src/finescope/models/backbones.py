"""CNN trunks that return their last feature map (B, C, h, w), and their weight loading.

Backbones come from torchvision (``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v2``,
``efficientnet_b0``, ``convnext_tiny``), from timm when the ``finescope[timm]`` extra is installed (any model
name timm knows, optionally written ``timm:NAME``), and ``tiny``, a small CNN for tests and the CPU demo.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
import textwrap
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from finescope.errors import FinescopeError

# name -> (torchvision constructor name, attribute(s) that hold the trunk, classifier key prefixes)
_TORCHVISION = {
    "resnet18": ("resnet18", None, ("fc.",)),
    "resnet34": ("resnet34", None, ("fc.",)),
    "resnet50": ("resnet50", None, ("fc.",)),
    "mobilenet_v2": ("mobilenet_v2", "features", ("classifier.",)),
    "efficientnet_b0": ("efficientnet_b0", "features", ("classifier.",)),
    "convnext_tiny": ("convnext_tiny", "features", ("classifier.",)),
}


class Backbone(nn.Module):
    """A trunk with a known channel count: ``forward(x (B, 3, H, W)) -> (B, C, h, w)``.

    Attributes:
        num_features: C, channels of the returned feature map.
        name: the backbone's registry name.
        stride: input pixels per feature cell (32 for ResNets and MobileNetV2); None when the trunk's grid does
            not follow one rule (see ``ceil``) on the probe sizes.
        ceil: whether an input side of n pixels gives ``ceil(n / stride)`` cells (padded convolutions) rather
            than ``floor(n / stride)`` (patchifying stems such as ConvNeXt's).

    Both are measured when the trunk is built, by forward passes of inputs of ``_PROBE_SIDES`` (256 and odd
    sides); a trunk that rounds differently at different stages (DenseNet's pooling, some timm hybrids), that
    is not a whole number of cells at 256 px, or that refuses a probe size gets ``stride = None``.
    """

    _PROBE_SIDES = ((256, 257), (223, 161), (127, 97))

    def __init__(self, trunk: nn.Module, num_features: int, name: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.num_features = num_features
        self.name = name
        self.stride, self.ceil = self._measure_grid(trunk)

    @classmethod
    def _measure_grid(cls, trunk: nn.Module) -> tuple[int | None, bool]:
        """(stride, ceil) that every probe size agrees with, else (None, False)."""
        was_training = trunk.training
        trunk.eval()  # no BatchNorm statistics change
        try:
            with torch.no_grad():
                grids = [tuple(trunk(torch.zeros(1, 3, h, w)).shape[-2:]) for h, w in cls._PROBE_SIDES]
        except RuntimeError:  # a trunk that needs other input sizes
            return None, False
        finally:
            trunk.train(was_training)
        n = grids[0][0]
        if n < 1 or 256 % n:
            return None, False
        stride = 256 // n
        for ceil in (True, False):
            if all(g == (cls._count(h, stride, ceil), cls._count(w, stride, ceil))
                   for g, (h, w) in zip(grids, cls._PROBE_SIDES, strict=True)):
                return stride, ceil
        return None, False

    @staticmethod
    def _count(side: int, stride: int, ceil: bool) -> int:
        return -(-side // stride) if ceil else side // stride

    def cells(self, side: int) -> int | None:
        """The feature cells along an input axis of ``side`` pixels (None when the stride is unknown): the cells
        of an image alone, which are its valid cells when it is padded in a batch."""
        return None if self.stride is None else self._count(side, self.stride, self.ceil)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # (B, C, h, w)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def tiny_cnn(width: int = 16) -> Backbone:
    """A 5-stage CNN with total stride 16 and 8*width output channels, fast on a CPU."""
    w = width
    trunk = nn.Sequential(
        _conv_bn(3, w, 2),
        _conv_bn(w, w, 1),
        _conv_bn(w, 2 * w, 2),
        _conv_bn(2 * w, 4 * w, 2),
        _conv_bn(4 * w, 4 * w, 1),
        _conv_bn(4 * w, 8 * w, 2),
    )
    return Backbone(trunk, 8 * w, "tiny")


class _DepthwiseWithoutCudnn(torch.autograd.Function):
    """A depthwise convolution whose forward and backward passes both run with cuDNN switched off (PyTorch's own
    depthwise kernels on CUDA), in the precision autocast would give it."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, padding, groups):
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(kind, enabled=False), torch.backends.cudnn.flags(enabled=False):
            out = nn.functional.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.padding, ctx.groups, ctx.has_bias = conv, padding, groups, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        c = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        with torch.backends.cudnn.flags(enabled=False):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad.to(x.dtype), x, weight, [weight.shape[0]] if ctx.has_bias else None, c.stride, ctx.padding,
                c.dilation, False, [0, 0], ctx.groups, mask)
        return gx, gw, gb, None, None, None  # autograd casts each to its input's dtype


class DepthwiseConv2dWithoutCudnn(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (same parameters and state dict) that runs on PyTorch's own kernels instead of
    cuDNN, forward and backward (``train.cudnn_depthwise: false``). cuDNN sets up a depthwise convolution of fp16
    channels-last activations for each new input shape, at seconds per shape for mobilenet_v2's 17
    (``benchmarks/new_shape_cost.py``)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, bias)
        padding = self.padding
        if isinstance(padding, str):  # 'same' or 'valid' in pixels (the backward takes no name), as torch pads them
            left, right, top, bottom = self._reversed_padding_repeated_twice
            if (left, top) != (right, bottom):  # an even kernel's 'same': the odd pixel goes right and below
                x = nn.functional.pad(x, [0, right - left, 0, bottom - top])
            padding = (top, left)
        return _DepthwiseWithoutCudnn.apply(x, weight, bias, self, padding, self.groups)


class DepthwiseConv2dSameWithoutCudnn(DepthwiseConv2dWithoutCudnn):
    """timm's ``Conv2dSame`` (TensorFlow's 'SAME' padding, worked out for each input size in ``forward``: the odd
    pixel right and below; tf_efficientnet's strided depthwise convolutions) as a
    :class:`DepthwiseConv2dWithoutCudnn`: the same padding, then the convolution on PyTorch's own kernels."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from timm.layers.padding import pad_same  # timm built this module

        x = pad_same(x, weight.shape[-2:], self.stride, self.dilation)  # (B, C, H', W'); self.padding is 0
        return super()._conv_forward(x, weight, bias)


class DepthwiseCondConv2dWithoutCudnn(nn.Module):
    """timm's ``CondConv2d`` (efficientnet_cc's: each image's kernels mixed from ``num_experts`` by its routing
    weights, all images in one convolution of a group per image and channel) when depthwise, with the same
    mixing, padding (the tf_ models' 'SAME' included) and reshapes, then the convolution on PyTorch's own
    kernels. Only ``forward`` is its own: the attributes and parameters are those of the ``CondConv2d`` whose
    class it takes."""

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        weight = torch.matmul(routing_weights, self.weight)  # (B, experts) @ (experts, C*k*k)
        weight = weight.view(B * self.out_channels, 1, *self.kernel_size)  # (B*C, 1, kh, kw)
        bias = None if self.bias is None else torch.matmul(routing_weights, self.bias).view(B * self.out_channels)
        x = x.reshape(1, B * C, H, W)  # one image of B*C channels, each its own group
        padding = self.padding
        if self.dynamic_padding:
            from timm.layers.padding import pad_same  # timm built this module

            x, padding = pad_same(x, self.kernel_size, self.stride, self.dilation), (0, 0)
        out = _DepthwiseWithoutCudnn.apply(x, weight, bias, self, padding, self.groups * B)  # (1, B*C, h, w)
        return out.permute([1, 0, 2, 3]).view(B, self.out_channels, out.shape[-2], out.shape[-1])


def _without_cudnn(m: nn.Module) -> type[nn.Module] | None:
    """The class a depthwise convolution ``m`` takes to leave cuDNN: torch's own ``nn.Conv2d`` and timm's
    ``Conv2dSame`` and ``CondConv2d`` (found only if timm is imported: none exists otherwise); None for any
    other module."""
    if type(m) is _timm_layer("cond_conv2d", "CondConv2d"):
        return DepthwiseCondConv2dWithoutCudnn if m.groups == m.in_channels == m.out_channels > 1 else None
    if not (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels):
        return None
    if type(m) is nn.Conv2d:
        return DepthwiseConv2dWithoutCudnn
    timm_same = getattr(sys.modules.get("timm.layers.conv2d_same"), "Conv2dSame", None)
    return DepthwiseConv2dSameWithoutCudnn if type(m) is timm_same else None


def depthwise_without_cudnn(module: nn.Module) -> int:
    """Make every depthwise convolution of ``module`` (torch's ``nn.Conv2d``, timm's ``Conv2dSame`` or
    ``CondConv2d``) one that runs without cuDNN (:class:`DepthwiseConv2dWithoutCudnn`,
    :class:`DepthwiseCondConv2dWithoutCudnn`; in place: the parameters, their names and the state dict stay); the
    number of them."""
    n = 0
    for m in module.modules():
        kind = _without_cudnn(m)
        if kind is not None:
            m.__class__ = kind
            n += 1
    return n


def _timm_layer(module: str, name: str) -> type[nn.Module] | None:
    """timm's class ``timm.layers.<module>.<name>`` if timm is imported (none exists otherwise); never imports it."""
    return getattr(sys.modules.get(f"timm.layers.{module}"), name, None)


class _ConvLeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, with :class:`DepthwiseConv2dWithoutCudnn`, :class:`DepthwiseConv2dSameWithoutCudnn`,
    :class:`DepthwiseCondConv2dWithoutCudnn` (whose autograd Function does not trace; it folds nothing, as timm's
    ``CondConv2d``, mixing its kernels per image, does not), timm's ``Conv2dSame`` (which pads for each input size, untraceable) and timm's ``BatchNormAct2d`` (a
    BatchNorm2d whose forward also applies its dropout and activation) leaves, as torch's own convolutions and
    BatchNorms are. Not every ``nn.Conv2d`` subclass: one that transforms its weight in ``forward`` (timm's
    weight-standardised ``StdConv2d``) would undo a folded BatchNorm, so such a one is traced into and folds
    nothing, as before. Exact types: a subclass may do more in ``forward``."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        timm = (_timm_layer("conv2d_same", "Conv2dSame"), _timm_layer("norm_act", "BatchNormAct2d"))
        own = (DepthwiseConv2dWithoutCudnn, DepthwiseConv2dSameWithoutCudnn, DepthwiseCondConv2dWithoutCudnn,
               *(t for t in timm if t is not None))
        return type(m) in own or super().is_leaf_module(m, qualname)


class _DropAct(nn.Module):
    """What a folded timm ``BatchNormAct2d`` leaves: its own dropout then its own activation, under their names."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _after_fold(bn: nn.BatchNorm2d) -> nn.Module:
    """The module that takes a folded BatchNorm's place: Identity, or a BatchNormAct2d's dropout and activation."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return _DropAct(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels: slice) -> nn.Conv2d:
    """A copy of ``conv`` that absorbs the running statistics and affine parameters of ``bn``'s ``channels``
    (``torch.nn.utils.fusion.fuse_conv_bn_eval`` on those channels)."""
    if conv.training or bn.training:
        raise AssertionError("Fusion only for eval!")
    fused = copy.deepcopy(conv)
    weight, bias = (None if t is None else t[channels] for t in (bn.weight, bn.bias))
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean[channels],
                                                    bn.running_var[channels], bn.eps, weight, bias)
    return fused


def _is_channel_cat(node: object) -> bool:
    """Whether ``node`` concatenates (B, C, h, w) tensors along C for one reader alone."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.cat
            and node.args and len(node.users) == 1):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (1, -3)


def _read_convolutions(node: torch.fx.Node, modules: dict[str, nn.Module], calls: Counter) -> list[str]:
    """The convolutions whose outputs the BatchNorm ``node`` alone reads, each called once: one, or several
    concatenated along channels (timm's MixedConv2d), in channel order; [] if it reads anything else."""
    src = node.args[0]
    parts = list(src.args[0]) if _is_channel_cat(src) else [src]
    ok = len(set(parts)) == len(parts) and all(
        isinstance(p, torch.fx.Node) and p.op == "call_module" and len(p.users) == 1
        and isinstance(modules.get(p.target), nn.Conv2d) and calls[p.target] == 1 for p in parts)
    return [p.target for p in parts] if ok else []


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that alone reads a Conv2d's output into that convolution, for inference.

    The convolution absorbs the BatchNorm's running statistics and affine parameters
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and the BatchNorm becomes an ``nn.Identity`` (a timm
    ``BatchNormAct2d``: its own dropout then activation), so every module keeps its name. A BatchNorm that alone
    reads convolutions concatenated along channels (timm's ``MixedConv2d``) folds each its own channels. The
    pairs are found by tracing ``module`` with ``torch.fx``; a module that does not trace stays as it is.
    ``module`` must be in eval mode.

    Returns:
        The number of BatchNorms folded.
    """
    try:
        graph = _ConvLeafTracer().trace(module)
    except Exception:  # torch.fx raises many types on untraceable Python
        return 0
    modules = dict(module.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or calls[node.target] != 1:
            continue
        convs = _read_convolutions(node, modules, calls)
        if convs:
            pairs.append((convs, node.target))
    for conv_names, bn_name in pairs:
        bn, start = modules[bn_name], 0
        for name in conv_names:  # (B, C, h, w): each convolution's channels, in the concatenation's order
            end = start + modules[name].out_channels
            _set_submodule(module, name, _fuse(modules[name], bn, slice(start, end)))
            start = end
        _set_submodule(module, bn_name, _after_fold(bn))
    return len(pairs)


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def list_backbones() -> list[str]:
    """Names accepted by ``model.backbone`` without timm (timm adds its own model names)."""
    return sorted(_TORCHVISION) + ["tiny"]


def _clean_state_dict(state: dict, drop_prefixes: tuple[str, ...]) -> dict:
    """Unwrap common checkpoint containers, strip DDP/compile prefixes and drop classifier keys."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state.get(key), dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        if not k.startswith(drop_prefixes):
            out[k] = v
    return out


def _read_state_dict(path: str) -> dict:
    """The contents of ``model.weights``: a state dict file, or a finescope checkpoint (a run folder reads its
    ``checkpoints/best.pt``)."""
    p = Path(path)
    if p.is_dir():
        from finescope.checkpoint import best_checkpoint

        if (found := best_checkpoint(p)) is None:
            raise FinescopeError(f"model.weights '{path}' is a folder without a finescope run (no checkpoints/best.pt "
                                 "in it); pass a run folder, a checkpoint .pt or a backbone's state dict file")
        p, path = found, str(found)
    if not p.is_file():
        raise FinescopeError(f"model.weights file '{path}' not found; pass the path of a saved state dict")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = textwrap.shorten(reason, 120, placeholder=" …")  # at a word: torch's first line runs long
        raise FinescopeError(f"model.weights file '{path}' could not be read as a state dict ({type(e).__name__}: "
                             f"{reason}): not written by torch.save, or damaged (a copy cut short?); pass a file "
                             "saved with torch.save(model.state_dict()), or a finescope run") from None
    if not isinstance(state, dict):
        raise FinescopeError(f"model.weights file '{path}' does not hold a state dict (got {type(state).__name__})")
    return state


def _is_checkpoint(state: dict) -> bool:
    """Whether ``state`` is a finescope checkpoint (a whole model, its config and classes) rather than a
    backbone's state dict."""
    return "config" in state and "class_names" in state


def _builder_name(name: str) -> str:
    """The backbone ``name`` builds: ``timm:NAME`` and ``NAME`` are one timm model, unless NAME is built in
    (``resnet18`` is torchvision's, ``timm:resnet18`` timm's)."""
    return name if name in _TORCHVISION or name == "tiny" else "timm:" + name.removeprefix("timm:")


def _trained_backbone(name: str, state: dict, path: str) -> Backbone:
    """Backbone ``name`` with the trained backbone of finescope checkpoint ``state`` (read from ``path``): its
    ``backbone.*`` tensors, BatchNorm statistics included; the global view's backbone where a run read its crops
    with a separate one. Never folded: training checkpoints hold the model as trained."""
    config = state["config"] if isinstance(state["config"], dict) else {}
    trained = (config.get("model") or {}).get("backbone")
    weights = state.get("model")
    if not isinstance(trained, str) or not isinstance(weights, dict):
        raise FinescopeError(f"model.weights '{path}' is not a finescope model (no backbone in its config, or no "
                             "weights); pass a run folder or a checkpoint .pt written by finescope train")
    if _builder_name(trained) != _builder_name(name):
        raise FinescopeError(f"model.weights '{path}' is a run of backbone '{trained}', not of model.backbone "
                             f"'{name}'; set model.backbone={trained} to fine-tune from it, or pass weights "
                             f"saved for '{name}'")
    backbone = create_backbone(name)  # no download: every tensor comes from the run
    own = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(own)
    except RuntimeError as e:  # a timm version that names or shapes the layers otherwise
        hint = " ".join(str(e).split("\n", 1)[-1].split())[:160]
        raise FinescopeError(f"model.weights '{path}' does not fit backbone '{name}': {hint}") from None
    return backbone


def load_weights_into(model: nn.Module, state: dict, path: str, drop_prefixes: tuple[str, ...],
                      backbone: str) -> None:
    """Load ``state``, the state dict read from ``path``, into ``model``; every non-classifier key must match
    exactly.

    Raises:
        FinescopeError: listing missing / unexpected keys or mismatched shapes.
    """
    state = _clean_state_dict(state, drop_prefixes)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(drop_prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape (e.g. {sorted(shapes)[0]})")
        raise FinescopeError(
            f"model.weights '{path}' does not fit backbone '{backbone}': {', '.join(parts)}; "
            "check model.backbone or pass weights saved for it"
        )
    model.load_state_dict(state, strict=False)


def _download_failed(backbone: str, why: Exception | str) -> FinescopeError:
    why = type(why).__name__ if isinstance(why, Exception) else why
    return FinescopeError(
        f"could not download pretrained weights for '{backbone}' ({why}); with no network, "
        "pass a local state dict with model.weights=PATH and model.pretrained=false"
    )


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds; True when a proxy is set
    (the download's own request decides then).

    Without a network torch.hub prints that it is downloading before it fails, and huggingface_hub retries for
    about 45 seconds; this answers in at most ``timeout`` seconds, so that a pretrained backbone that is not
    cached fails at once with :func:`_download_failed`'s one line."""
    if urllib.request.getproxies():
        return True
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
            return True
    except OSError:  # no route, no name resolution, refused, timed out
        return False


def _hub_offline() -> contextlib.AbstractContextManager:
    """huggingface_hub in offline mode (``HF_HUB_OFFLINE``) while it runs: files come from its cache, or it
    fails at once instead of retrying."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(constants, "HF_HUB_OFFLINE"):
        return contextlib.nullcontext()
    from unittest import mock

    return mock.patch.object(constants, "HF_HUB_OFFLINE", True)


def _torchvision_backbone(name: str, weights: str, pretrained: bool, state: dict | None) -> Backbone:
    ctor_name, trunk_attr, drop = _TORCHVISION[name]
    model = getattr(torchvision.models, ctor_name)(weights=None)
    if state is not None:
        load_weights_into(model, state, weights, drop, name)
    elif pretrained:
        tv_weights = torchvision.models.get_model_weights(ctor_name).DEFAULT
        url = urllib.parse.urlsplit(tv_weights.url)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.path).name
        if not cached.is_file() and not reachable(tv_weights.url):
            raise _download_failed(name, f"{url.hostname} cannot be reached")
        try:
            state = tv_weights.get_state_dict(progress=False)
        except Exception as e:  # URLError, OSError, RuntimeError, ... when offline
            raise _download_failed(name, e) from None
        model.load_state_dict(state)
    if trunk_attr is None:  # ResNet: everything up to the global pool
        trunk = nn.Sequential(*[m for n, m in model.named_children() if n not in ("avgpool", "fc")])
        num_features = model.fc.in_features
    else:
        trunk = getattr(model, trunk_attr)
        num_features = _probe_channels(trunk)
    return Backbone(trunk, num_features, name)


def _probe_channels(trunk: nn.Module) -> int:
    with torch.no_grad():
        was_training = trunk.training
        trunk.eval()
        out = trunk(torch.zeros(1, 3, 64, 64))
        trunk.train(was_training)
    return int(out.shape[1])


def _timm_backbone(name: str, weights: str, pretrained: bool, state: dict | None) -> Backbone:
    try:
        import timm
    except ImportError:
        raise FinescopeError(
            f"unknown backbone '{name}'; built in: {', '.join(list_backbones())}. "
            "For timm models install the extra: pip install 'finescope[timm]'"
        ) from None
    if not timm.is_model(name):
        raise FinescopeError(f"unknown backbone '{name}': neither built in ({', '.join(list_backbones())}) nor a timm model")
    download = pretrained and not weights
    # offline, timm reads weights that huggingface_hub has cached, and fails at once for the others
    hub = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    offline = download and not reachable(hub)
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            model = timm.create_model(name, pretrained=download, num_classes=0, global_pool="")
    except Exception as e:
        if offline:
            raise _download_failed(name, f"{urllib.parse.urlsplit(hub).hostname} cannot be reached and "
                                         "huggingface_hub has not cached them") from None
        if download:
            raise _download_failed(name, e) from None
        raise FinescopeError(f"timm could not build backbone '{name}': {e}") from None
    _check_feature_map(model, name)
    if state is not None:
        classifier = model.pretrained_cfg.get("classifier", "head")
        heads = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
        load_weights_into(model, state, weights, tuple(h + "." for h in heads), name)
    return Backbone(_TimmTrunk(model), int(model.num_features), name)


def _check_feature_map(model: nn.Module, name: str) -> None:
    """Refuse a timm model that does not map an image of any size to a (B, C, h, w) feature map (a vision
    transformer with a fixed input size, or one that returns tokens): finescope reads views and crops of any
    size, and its attention needs the map's cells. One forward pass of a small non-square image."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, 96, 128))
        ok = isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] == model.num_features
    except Exception:  # a fixed-size model asserts or raises its own types
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        raise FinescopeError(f"backbone '{name}' does not give a (B, C, h, w) feature map for images of any size "
                             "(e.g. a vision transformer with a fixed input size); choose a CNN backbone "
                             "(finescope models lists the built-in ones)")


def create_backbone(name: str, weights: str = "", pretrained: bool = False) -> Backbone:
    """Build a trunk by name.

    Args:
        name: a torchvision name (see :func:`list_backbones`), ``tiny``, or a timm model (``timm:NAME`` or NAME).
        weights: path to a local state dict in torchvision or timm key layout (classifier keys ignored), or to a
            finescope run of backbone ``name`` (its folder or a checkpoint .pt), whose trained backbone it takes.
        pretrained: download the library's ImageNet weights (needs a network); ``weights`` replace them.

    Returns:
        A :class:`Backbone` mapping (B, 3, H, W) to (B, C, h, w).
    """
    state = _read_state_dict(weights) if weights else None
    if state is not None and _is_checkpoint(state):
        return _trained_backbone(name, state, weights)
    builders: dict[str, Callable[[], Backbone]] = {"tiny": tiny_cnn}
    if name in builders:
        if pretrained and not weights:  # silently training from random weights would not be what was asked
            raise FinescopeError(f"backbone '{name}' has no pretrained weights (it is for tests); set "
                                 "model.pretrained=false, or choose a torchvision or timm backbone")
        backbone = builders[name]()
        if state is not None:
            load_weights_into(backbone.trunk, state, weights, (), name)
        return backbone
    if name in _TORCHVISION:
        return _torchvision_backbone(name, weights, pretrained, state)
    return _timm_backbone(name.removeprefix("timm:"), weights, pretrained, state)
