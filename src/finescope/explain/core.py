"""One image -> an :class:`~finescope.explain.methods.Explanation`: prediction, maps, boxes and crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from finescope.errors import SKIP_ADVICE, FinescopeError
from finescope.explain.methods import CamExplainer, Explanation, attention_map, resolve_methods
from finescope.models.network import FineScopeNet


def as_image(image, bit_depth: int = 0) -> tuple[torch.Tensor, str | None]:
    """Accept a path, a (3, H, W) tensor or an (H, W[, 3]) array: uint8, uint16 (scaled by 255/65535, or as
    ``bit_depth`` (``data.bit_depth``) says, as :func:`~finescope.data.dataset.read_image` scales a 16-bit file)
    or float in [0, 1].

    Returns:
        ((3, H, W) uint8 tensor, the path or None).

    Raises:
        FinescopeError: another shape or dtype, no pixels, or float values outside [0, 1] (they would be clipped
            to white) or not finite.
    """
    from finescope.data.dataset import read_image, sixteen_bit_top

    if isinstance(image, (str, Path)):
        try:
            return read_image(image, bit_depth), str(image)
        except FinescopeError as e:  # without read_image's advice to set data.on_error, which explain does not read
            raise FinescopeError(str(e).removesuffix(SKIP_ADVICE)) from None
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise FinescopeError(f"an image array must be (H, W) or (H, W, 3), got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(arr[..., :3].transpose(2, 0, 1)))
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(getattr(image, "shape", ()))
        raise FinescopeError(f"expected an image path, a (3, H, W) tensor or an (H, W, 3) array, got {shape or type(image)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise FinescopeError(f"the image has no pixels: it is {image.shape[2]}x{image.shape[1]} (WxH)")
    image = image.detach().cpu()
    if image.dtype == torch.uint16:
        scale = 255.0 / sixteen_bit_top(bit_depth)
        image = torch.round(torch.clamp(image.float() * scale, 0, 255)).to(torch.uint8)
    elif image.dtype.is_floating_point:
        if not torch.isfinite(image).all():  # NaN passes the range check below, and turns black
            raise FinescopeError(f"a float image must be in [0, 1], got {int((~torch.isfinite(image)).sum())} NaN or "
                                 "infinite values (an image divided by a range of 0?)")
        lo, hi = (float(image.min()), float(image.max())) if image.numel() else (0.0, 0.0)
        if lo < -1e-3 or hi > 1 + 1e-3:  # rounding aside: 0..255 or 0..65535 held as float
            raise FinescopeError(f"a float image must be in [0, 1], got values from {lo:.4g} to {hi:.4g}; divide it "
                                 "by its range, or pass it as uint8 or uint16")
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise FinescopeError(f"an image must be uint8, uint16 or float in [0, 1], got {image.dtype}")
    return image, None


def _target(probs: torch.Tensor, label: int | None, target: str | int) -> int:
    C = len(probs)
    index = target if isinstance(target, (int, np.integer)) else None
    for name, value, unknown in (("label", label, ", or None when unknown"), ("target", index, "")):
        if value is not None and not 0 <= value < C:  # -1 would explain the last class; C or more, a traceback
            raise FinescopeError(f"{name} must be a class index from 0 to {C - 1}{unknown}, got {value}")
    if isinstance(target, (int, np.integer)):
        return int(target)
    if target not in ("true", "predicted"):
        raise FinescopeError(f"target must be 'true', 'predicted' or a class index, got {target!r}")
    return int(label) if target == "true" and label is not None else int(probs.argmax())


@torch.no_grad()
def _forward(model: FineScopeNet, x: torch.Tensor, amp: str, cpu_amp: str):
    from finescope.engine import autocast

    with autocast(x.device, amp, cpu_amp):  # the precision predict and evaluate run the model in
        return model(x[None])


def explain_loaded(
    model: FineScopeNet,
    image: torch.Tensor,
    methods: list[str],
    class_names: list[str],
    cams: CamExplainer | None = None,
    label: int | None = None,
    target: str | int = "true",
    predict_with: str = "fused",
    amp: str = "off",
    cpu_amp: str = "off",
) -> Explanation:
    """Explain one (3, H, W) uint8 image with already checked ``methods`` (see :func:`resolve_methods`).

    Args:
        model: a model in eval mode.
        image: (3, H, W) uint8.
        methods: method names; the first is the main one.
        class_names: the model's classes.
        cams: a :class:`CamExplainer` to reuse (made and released here when None and a CAM is asked for).
        label: the true class index, if known.
        target: ``true`` (the true class when known, else the predicted one), ``predicted``, or an index.
        predict_with: ``fused`` or ``mean`` (see :meth:`ModelOutput.probabilities`).
        amp, cpu_amp: the autocast of the forward pass that gives the prediction and the boxes (a run's
            ``train.amp`` and ``train.cpu_amp``, as predict and evaluate use them), so that they are the same.
    """
    device = next(model.parameters()).device
    x = image.to(device).float() / 255  # (3, H, W)
    out = _forward(model, x, amp, cpu_amp)
    probs = out.probabilities(predict_with)[0].float().cpu()
    tgt = _target(probs, label, target)
    maps: dict[str, torch.Tensor] = {}
    own = cams is None and any(m != "attention" for m in methods)
    cams = CamExplainer(model) if own else cams
    try:
        for m in methods:
            maps[m] = attention_map(model, image, out) if m == "attention" else cams.cam(m, x, tgt)
    finally:
        if own:
            cams.close()
    crops = None
    if out.boxes is not None:
        with torch.no_grad():
            crops = model._crops(x[None], out.boxes.to(x.dtype)).clamp(0, 1).cpu()  # (K, 3, L, L)
    return Explanation(
        image=image, maps=maps, method=methods[0], probabilities=probs, class_names=list(class_names), target=tgt,
        label=label, boxes=None if out.boxes is None else out.boxes[0].float().cpu(),
        box_mass=None if out.box_mass is None else out.box_mass[0].float().cpu(), crops=crops,
        attention=None if out.attention is None else out.attention[0].float().cpu(),
        cell_px=None if out.cell_px is None else out.cell_px[0].cpu(),
    )


def explain_image(
    model,
    image,
    method: str | list[str] = "auto",
    *,
    label: int | None = None,
    target: str | int = "true",
    class_names: list[str] | None = None,
    predict_with: str = "fused",
    device: str = "auto",
    bit_depth: int | None = None,
) -> Explanation:
    """Explain one image: ``finescope.explain(model, image)``.

    A model given as an object is explained in evaluation mode and comes back in its own mode, with the
    gradients it had (e.g. explained between training steps).

    Args:
        model: a :class:`FineScopeNet`, or a run directory / checkpoint path (loaded with ``load_trained``).
        image: a file path, a (3, H, W) tensor or an (H, W[, 3]) array, uint8, uint16 or float in [0, 1].
        method: ``auto`` (attention when the model has it, then gradcam and gradcam++), one name or a list
            (``attention``, ``gradcam``, ``gradcam++``, ``hirescam``, ``xgradcam``, ``layercam``, ``eigencam``).
        label: the true class index, if known (CAMs then explain it; see ``target``).
        target: ``true``, ``predicted`` or a class index: the class the CAMs explain.
        class_names: names for the classes, one per class (default: the checkpoint's, also for a model
            ``load_trained`` gave; else ``class_0``, ...).
        predict_with: ``fused`` or ``mean``.
        device: for a model given as a path.
        bit_depth: how a 16-bit image is scaled (``data.bit_depth``: 0 by 65535, 9..16 the camera's bits);
            None: the run's for a model given as a path, else 0.

    Returns:
        An :class:`Explanation` (``.map``, ``.maps``, ``.boxes``, ``.crops``, ``.probabilities``, ...).

    Raises:
        FinescopeError: ``class_names`` of another length than the model's classes, an unknown method, a label
            or target outside the classes, or an image of another form.

    Example:
        >>> from finescope import explain
        >>> e = explain("runs/demo/fusion", "runs/demo/data/images/atypical_0001.png")
        >>> e.map.shape, e.boxes.shape, e.class_names[e.predicted], e.confidence
    """
    variant, amp, cpu_amp = "", "off", "off"
    if class_names is not None:
        class_names = list(class_names)
    if isinstance(model, (str, Path)):
        from finescope.trainer import load_trained

        model, cfg, names, _ = load_trained(model, device=device)
        class_names = names if class_names is None else class_names
        predict_with, variant = cfg.model.predict_with, cfg.model.variant
        amp, cpu_amp = cfg.train.amp, cfg.train.cpu_amp
        bit_depth = cfg.data.bit_depth if bit_depth is None else bit_depth
    if not isinstance(model, FineScopeNet):
        raise FinescopeError(f"explain needs a finescope model or a run/checkpoint path, got {type(model).__name__}")
    if class_names is not None and len(class_names) != model.num_classes:  # a figure would name no class, or another
        raise FinescopeError(f"class_names has {len(class_names)} names, but the model has {model.num_classes} "
                             "classes; give one name per class, in the order of its outputs")
    img, path = as_image(image, bit_depth or 0)
    methods = resolve_methods(model, method, variant)
    names = class_names or getattr(model, "class_names", None) or [f"class_{i}" for i in range(model.num_classes)]
    # a model given mid-training comes back as it was: its mode, and the gradients it had (the CAMs' backward
    # passes would add theirs; pytorch-grad-cam also zeroes them)
    was_training, grads = model.training, [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    model.eval()
    try:
        result = explain_loaded(model, img, methods, names, label=label, target=target, predict_with=predict_with,
                                amp=amp, cpu_amp=cpu_amp)
    finally:
        model.train(was_training)
        for p, g in grads:
            p.grad = g
    result.path = path
    return result


__all__ = ["as_image", "explain_image", "explain_loaded"]
