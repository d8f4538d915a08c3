"""Where reduced precision loses accuracy in a backbone: the relative error of every convolution and BatchNorm
output under autocast against a float64 copy, and the final feature map with chosen layers kept in fp32.

    PYTHONPATH=src python benchmarks/precision_layers.py [--backbone mobilenet_v2]
        [--weights ../shared/weights/mobilenet_v2-b0353104.pth] [--dtype bf16] [--device cpu]

Inputs: a fresh random 224x341 view (the global view of a 460x700 image), normalised as the model does.
Printed: the first and last layers' errors, the largest BatchNorm gain |gamma| / sqrt(var + eps), and the
feature-map error with all layers in ``--dtype``, with depthwise convolutions in fp32, with BatchNorm in fp32,
and all in fp16.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_device, run_script  # noqa: E402

from finescope.config import ModelConfig  # noqa: E402
from finescope.models import create_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


class KeepFp32(nn.Module):
    """Run ``module`` outside autocast, in fp32."""

    def __init__(self, module: nn.Module, device_type: str) -> None:
        super().__init__()
        self.module, self.device_type = module, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, enabled=False):
            return self.module(x.float())


def with_fp32(trunk: nn.Module, keep, device_type: str) -> nn.Module:
    trunk = copy.deepcopy(trunk)
    for module in list(trunk.modules()):
        for name, child in list(module.named_children()):
            if keep(child):
                setattr(module, name, KeepFp32(child, device_type))
    return trunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="../shared/weights/mobilenet_v2-b0353104.pth")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = parse_device(p, args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("precision_layers.py: no CUDA device on this machine; run with --device cpu")
    torch.manual_seed(1)
    model = create_model(ModelConfig(variant="fusion", backbone=args.backbone, weights=args.weights), 2).eval()
    x = torch.rand(2, 3, 224, 341, generator=torch.Generator().manual_seed(123))
    x = model._normalise(x)
    ref_trunk = copy.deepcopy(model.backbone).double()  # stays on the CPU
    trunk = model.backbone.to(device)
    outs: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "low": {}}
    layers = [n for n, m in trunk.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    for tag, net in (("ref", ref_trunk), ("low", trunk)):
        for name, module in net.named_modules():
            if name in layers:
                module.register_forward_hook(lambda m, i, o, n=name, t=tag: outs[t].__setitem__(n, o.detach().cpu()))
    with torch.no_grad():
        ref = ref_trunk(x.double())
        with torch.autocast(device.type, dtype=DTYPES[args.dtype]):
            trunk(x.to(device))
    errors = [(n, rel(outs["low"][n], outs["ref"][n])) for n in layers]
    print(f"{args.backbone} {args.dtype}: {len(layers)} conv/BN layers; first {errors[0][1]:.2e} ({errors[0][0]}), "
          f"last {errors[-1][1]:.2e} ({errors[-1][0]}), largest {max(e for _, e in errors):.2e}")
    gains = [float((m.weight.detach().abs() / (m.running_var + m.eps).sqrt()).max()) for m in trunk.modules()
             if isinstance(m, nn.BatchNorm2d)]
    print(f"largest BatchNorm gain |gamma| / sqrt(var + eps): {max(gains):.1f}")
    variants = {
        f"all {args.dtype}": (trunk, args.dtype),
        "depthwise convolutions fp32": (with_fp32(trunk, lambda m: isinstance(m, nn.Conv2d) and m.groups > 1,
                                                  device.type), args.dtype),
        "BatchNorm fp32": (with_fp32(trunk, lambda m: isinstance(m, nn.BatchNorm2d), device.type), args.dtype),
        "all fp16": (trunk, "fp16"),
    }
    with torch.no_grad():
        for name, (net, dtype) in variants.items():
            with torch.autocast(device.type, dtype=DTYPES[dtype]):
                out = net(x.to(device))
            print(f"feature map, {name}: relative error {rel(out.cpu(), ref):.2e}")


if __name__ == "__main__":
    run_script(main)  # missing --weights, an unknown --backbone: one line
