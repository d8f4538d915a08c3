"""The network of Fan et al. (MICCAI 2020) and the variants of the ablation table (method.md).

One module, :class:`FineScopeNet`, whose parts are switched on by three booleans that the registry sets per
variant (``use_attention``, ``use_crops``, ``hires``); forward never branches on a mode string.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from finescope.errors import FinescopeError
from finescope.models.align import crop_align, snap_boxes
from finescope.models.attention import AttentionPool
from finescope.models.backbones import Backbone, fold_batchnorm
from finescope.models.resize import resize_aa
from finescope.models.selection import box_mass, select_boxes_deferred

Sources = dict[tuple[int, int], tuple[list[int], torch.Tensor]]  # (h, w) -> batch rows, crop source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelOutput:
    """What every finescope model returns (the loss is computed outside the model).

    Attributes:
        logits: (B, num_classes) the prediction logits: fused for ``fusion``, the only head otherwise.
        global_logits: (B, num_classes) the auxiliary global head, or None for variants without one.
        attention: (B, h, w) attention over the feature grid, summing to 1 over each image's valid cells,
            or None for variants without attention.
        boxes: (B, K, 4) selected boxes, x1, y1, x2, y2 in full-resolution pixels, or None.
        box_mass: (B, K) attention mass inside each box, or None.
        cell_px: (B, 2) height and width of one attention cell in full-resolution pixels, or None.
    """

    logits: torch.Tensor
    global_logits: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    box_mass: torch.Tensor | None = None
    cell_px: torch.Tensor | None = None

    def probabilities(self, predict_with: str = "fused") -> torch.Tensor:
        """Class probabilities (B, C): softmax of the logits, or with ``"mean"`` the mean of the fused and
        global softmax."""
        p = self.logits.float().softmax(dim=1)
        if predict_with == "mean" and self.global_logits is not None:
            p = (p + self.global_logits.float().softmax(dim=1)) / 2
        return p


def global_view_size(height: int, width: int, short_side: int, multiple: int = 1) -> tuple[int, int]:
    """Size of the global view: short side resized to ``short_side``, the long side to the nearest multiple of
    ``multiple`` of what keeps the aspect (never shorter than the short side).

    With ``multiple=32`` the images of a dataset of many sizes make a few view shapes, not one per aspect ratio:
    on CUDA each new input shape of the backbone costs cuDNN's set-up once per process, up to seconds
    (``benchmarks/RESULTS.md``, "new batch shape"), and under ``torch.compile`` a recompilation. The aspect
    changes by at most ``multiple / 2`` pixels of the long side (BreakHis' 460x700 at 224: 341 -> 352 px, 3%),
    and every feature cell of a backbone of stride 32 covers whole view pixels.
    """
    scale = short_side / min(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if multiple > 1 and h != w:
        short, long = min(h, w), max(h, w)
        long = max(short, multiple * math.floor(long / multiple + 0.5))
        h, w = (short, long) if h < w else (long, short)
    return h, w


def _to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor from Python numbers on ``device`` without a host-device sync.

    ``torch.tensor(values, device=cuda)`` waits for every queued kernel (a blocking copy); a non-blocking copy
    of a fresh CPU tensor is staged by the driver at once and lets the host run ahead of the GPU. While
    torch.compile traces, the numbers are constants of the graph: they are made on the device directly, so the
    graph holds no CPU tensor (which would keep inductor from replaying it as a CUDA graph).
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class _Rerun:
    """What a pass of a module changes, saved so that the pass can run again as if it had not run: the running
    statistics of its BatchNorms in training mode and the random-number state of ``device`` (dropout,
    stochastic depth). Made by :meth:`save`."""

    def __init__(self, stats: list[list[torch.Tensor]], device: torch.device) -> None:
        self.stats = stats
        self.saved = [torch._foreach_add(group, 0) for group in stats]  # one kernel per group on CUDA
        self.device = device
        self.rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()  # host

    @classmethod
    def save(cls, module: nn.Module, device: torch.device) -> _Rerun | None:
        """The state a pass of ``module`` on ``device`` changes, or None when the pass has effects this cannot
        undo: a SyncBatchNorm in training (its collectives, which every process must run alike), or another
        module in training mode with buffers (state this does not know)."""
        groups: dict[tuple, list[torch.Tensor]] = {}  # by device and dtype: one foreach kernel per group
        for m in module.modules():
            if not m.training:
                continue
            if isinstance(m, nn.SyncBatchNorm):
                return None
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                stats = (m.running_mean, m.running_var, m.num_batches_tracked) if m.track_running_stats else ()
                for t in stats:
                    groups.setdefault((t.device, t.dtype), []).append(t)
            elif next(m.buffers(recurse=False), None) is not None:
                return None
        return cls(list(groups.values()), device)

    def restore(self) -> None:
        """Put the saved state back. The statistics are written through ``.data``: autograd has saved them for
        the backward of the passes before (a BatchNorm's backward takes them, and reads them only in eval
        mode), and a write it tracks would make that backward refuse them as modified."""
        for group, copies in zip(self.stats, self.saved, strict=True):
            data = [t.data for t in group]
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(data, copies)
            else:  # older torch
                for t, v in zip(data, copies, strict=True):
                    t.copy_(v)
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.rng, self.device)
        else:
            torch.set_rng_state(self.rng)


class FineScopeNet(nn.Module):
    """Backbone + optional gated attention + optional high-resolution crops + fusion head.

    Args:
        backbone: the shared trunk phi.
        num_classes: number of classes.
        use_attention: attention-pool the feature-map cells (method.md steps 2-4).
        use_crops: select K boxes and read them at full resolution with the same backbone (steps 5-7).
        hires: feed the full-resolution image instead of the global view (``global-hires``).
        gated: gated attention (Ilse Eq. 9) or plain tanh attention (Eq. 8).
        global_size: short side of the global view.
        view_multiple: the view's long side is rounded to a multiple of this (:func:`global_view_size`); 1 keeps
            the aspect exactly.
        local_size: side of each crop.
        num_crops: K.
        threshold: tau for instance selection.
        selection_norm: ``max`` or ``minmax`` normalisation of the map before thresholding.
        peak_iou: fallback peaks whose box overlaps a taken box by more IoU than this are skipped.
        min_box_fraction: minimum box side as a fraction of the image's short side.
        selection_upsample: points per feature cell, along each axis, of the grid the selection thresholds and
            labels (:func:`~finescope.models.selection.select_boxes`' ``upsample``); with
            ``selection_components="exact"``, the grid of the components' masses and of the fallback peaks.
        selection_components: ``"exact"``: components and boxes of the bilinear map itself, as at every pixel;
            ``"grid"``: of the ``selection_upsample`` grid (``select_boxes``' ``components``).
        selection_peaks: ``"nodes"``: fallback peaks on the ``selection_upsample`` grid's points and the cells'
            centres; ``"grid"``: on the grid's points only (``select_boxes``' ``peaks``).
        proj_dim: M, width of the instance projection (0 = none).
        attn_dim: L, hidden width of the attention.
        image_feature: ``"attention"`` (z) or ``"avg"`` (global average of F) as the image-level feature g.
        dropout: dropout before the fusion layer.
        select_from: ``"attention"`` selects crops on the attention map; ``"evidence"`` on the global head's
            evidence for its predicted class in each cell (W_g applied to each instance, softmax over cells).
        separate_crop_backbone: read the crops with a second copy of the backbone instead of the shared one.

    Attributes:
        crops_active: when False (stage-wise training), a training-mode forward skips the crops and returns
            the global logits; evaluation always uses the crops.
        selection_graph: on CUDA, outside torch.compile, replay the instance selection as a CUDA graph
            (``select_boxes``' ``graph``: the same boxes, one launch instead of 170 or more). The graph's
            convergence flag is read once the whole forward pass is queued, so the host does not wait for the
            GPU in the middle of it; in the rare step whose flag says the graph's labelling did not converge, the
            crops are cut again from the exact boxes, after the BatchNorm statistics and the random-number state
            that the first crops' pass changed are put back (with SyncBatchNorm, whose passes communicate, or
            another module with buffers in training mode, the flag is read at once).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        use_attention: bool = True,
        use_crops: bool = True,
        hires: bool = False,
        gated: bool = True,
        global_size: int = 224,
        view_multiple: int = 1,
        local_size: int = 224,
        num_crops: int = 4,
        threshold: float = 0.5,
        selection_norm: str = "minmax",
        peak_iou: float = 0.5,
        min_box_fraction: float = 1 / 3,
        selection_upsample: int = 4,
        selection_components: str = "exact",
        selection_peaks: str = "nodes",
        proj_dim: int = 256,
        attn_dim: int = 128,
        image_feature: str = "attention",
        dropout: float = 0.2,
        select_from: str = "attention",
        separate_crop_backbone: bool = False,
    ) -> None:
        super().__init__()
        if image_feature not in ("attention", "avg"):
            raise ValueError(f"image_feature must be 'attention' or 'avg', got {image_feature!r}")
        if select_from not in ("attention", "evidence"):
            raise ValueError(f"select_from must be 'attention' or 'evidence', got {select_from!r}")
        if use_crops and not use_attention:
            raise ValueError("use_crops needs use_attention: crops are chosen by the attention map")
        self.backbone = backbone
        self.num_classes = num_classes
        self.use_attention, self.use_crops, self.hires = use_attention, use_crops, hires
        self.global_size, self.local_size = global_size, local_size
        self.view_multiple = view_multiple
        self.num_crops = num_crops if use_crops else 0
        self.threshold, self.min_box_fraction = threshold, min_box_fraction
        self.selection_norm, self.peak_iou = selection_norm, peak_iou
        self.selection_upsample, self.selection_components = selection_upsample, selection_components
        self.selection_peaks = selection_peaks
        self.image_feature = image_feature if use_attention else "avg"
        C = backbone.num_features
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("norm_scale", 1 / std, persistent=False)  # (x - mean) / std = x * scale + shift
        self.register_buffer("norm_shift", -mean / std, persistent=False)
        self.instance_proj = None
        if use_attention:
            M = proj_dim if proj_dim > 0 else C
            self.instance_proj = nn.Sequential(nn.Linear(C, M), nn.ReLU(inplace=True)) if proj_dim > 0 else None
            self.attention_pool = AttentionPool(M, attn_dim, gated=gated)
        g_dim = (proj_dim if proj_dim > 0 else C) if self.image_feature == "attention" else C
        self.global_head = nn.Linear(g_dim, num_classes)  # W_g, the auxiliary head (the only head without crops)
        self.dropout = nn.Dropout(dropout)
        self.fusion_head = nn.Linear(g_dim + self.num_crops * C, num_classes) if self.use_crops else None
        self.num_features = g_dim + self.num_crops * C
        self.select_from = select_from
        self.crop_backbone = copy.deepcopy(backbone) if use_crops and separate_crop_backbone else None
        self.crops_active = True
        self.global_in_loss = True  # whether training's loss reads global_logits (train.aux_weight > 0)
        self.selection_graph = True
        self.folded = False

    def fold_batchnorm(self) -> int:
        """Turn this model into an inference-only one: its backbones' BatchNorms are folded into the
        convolutions before them (:func:`~finescope.models.backbones.fold_batchnorm`), which the predictions
        do not notice beyond float rounding and which saves their cost. A model with anything folded refuses
        ``train()``.

        Returns:
            The number of BatchNorms folded.
        """
        self.eval()
        n = sum(fold_batchnorm(b) for b in (self.backbone, self.crop_backbone) if b is not None)
        self.folded = self.folded or n > 0  # a backbone torch.fx cannot trace stays unfolded, and trainable
        return n

    def train(self, mode: bool = True) -> FineScopeNet:
        if mode and getattr(self, "folded", False):
            raise FinescopeError("this model's BatchNorms are folded into its convolutions for inference "
                                 "(load_trained); build the model again to train it")
        return super().train(mode)

    # -- views -------------------------------------------------------------------------------------------
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation in one fused multiply-add (one pass over the view or the crops, one kernel)."""
        return torch.addcmul(self.norm_shift, x, self.norm_scale)

    def crop_scale(self, height: int, width: int) -> float:
        """The scale of the image the crops of an ``height`` x ``width`` image are cut from (its crop source).

        Every box is at least ``min_box_fraction`` of the short side, so the image can be resized by
        ``s = local_size / (min_box_fraction * short_side)`` (when below 1) before roi_align without losing
        anything a crop resolves: the smallest box then spans exactly ``local_size`` pixels, and roi_align
        needs about ``1/s^2`` fewer samples. 1 for BreakHis 700x460 with 224-pixel crops (boxes of 153 px).
        """
        return min(1.0, self.local_size / (self.min_box_fraction * min(height, width)))

    def view_size(self, height: int, width: int) -> tuple[int, int]:
        """The global view's size for an ``height`` x ``width`` image (:func:`global_view_size`)."""
        return global_view_size(height, width, self.global_size, self.view_multiple)

    def view_from_source(self, height: int, width: int) -> bool:
        """Whether a model with crops resizes the global view of an ``height`` x ``width`` image from its crop
        source instead of from the image: when the source has at most half the image's side (a quarter of its
        pixels) and at least twice the view's short side. With the defaults: images whose short side is at
        least 1344 px.

        The source is made anyway, and the second resize reads a fraction of the pixels (a 1536x2048 image on
        the CPU: 1.5-2.1 instead of 5.5-7.2 ms with ATen's resize, ``benchmarks/view_cost.py``; 1.1 instead of
        2.8 with :func:`~finescope.models.resize.resize_aa`). The two-step view differs from
        the direct one by at most about 3/255 per pixel (random noise); a source closer to the view would blur
        more, and one close to the image would save little, hence the two bounds. A model's view does not depend
        on whether its crops are read in a step (stage-wise training).
        """
        s = self.crop_scale(height, width)
        return s <= 0.5 and s * min(height, width) >= 2 * self.global_size

    def _size_groups(self, sizes: list[list[int]]) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            groups.setdefault((int(h), int(w)), []).append(i)
        return groups

    def _crop_sources(self, images: torch.Tensor, sizes: list[list[int]]) -> Sources:
        """Per distinct image size (h, w): the batch rows and their crop source, the valid region resized
        (antialiased) by :meth:`crop_scale`, in [0, 1]. No padding enters a source, so crops do not depend on
        the batch."""
        B, _, H, W = images.shape
        out = {}
        for (h, w), idx in self._size_groups(sizes).items():
            part = images if len(idx) == B else images[_to_device(idx, images.device)]
            if (h, w) != (H, W):
                part = part[:, :, :h, :w]
            s = self.crop_scale(h, w)
            if s < 1.0:
                part = resize_aa(part, (max(1, round(h * s)), max(1, round(w * s))))
            out[(h, w)] = (idx, part)
        return out

    def _global_view(self, images: torch.Tensor, sizes: list[list[int]], sources: Sources | None = None,
                     ) -> tuple[torch.Tensor, list[list[int]]]:
        """Resize each image's valid region so its short side is ``global_size``, normalise, pad to a batch.

        One antialiased resize per distinct image size. The view is normalised after resizing (both are linear)
        and its padding is 0, the mean colour. Given the crop ``sources`` (:meth:`_crop_sources`; a model with
        crops always passes them), a group whose source has at least twice the view's short side is resized
        from its source rather than from the image (:meth:`view_from_source`).

        Returns the view (B, 3, Gh, Gw) and the view size [h, w] of each image (a list, on the host).
        """
        if self.hires:  # the image itself, its padding made the mean colour (0) as in the resized views
            view, dims = self._normalise(images), [[int(h), int(w)] for h, w in sizes]
            H, W = images.shape[-2:]
            for i, (h, w) in enumerate(dims):
                if h < H:
                    view[i, :, h:] = 0
                if w < W:
                    view[i, :, :h, w:] = 0
            stride = getattr(self.backbone, "stride", None)
            if stride and not getattr(self.backbone, "ceil", True) and min(H, W) < stride:
                # a patchifying stem gives a side shorter than one cell no cell: one, padded with the mean colour
                # as a batch with a larger image pads it
                view = nn.functional.pad(view, (0, max(0, stride - W), 0, max(0, stride - H)))
            return view, dims
        dims = [list(self.view_size(int(h), int(w))) for h, w in sizes]
        groups = self._size_groups(sizes)
        B = images.shape[0]
        view = None
        for (h, w), idx in groups.items():
            gh, gw = dims[idx[0]]
            if sources is not None and self.view_from_source(h, w):
                part = sources[(h, w)][1]
            else:
                part = images if len(idx) == B else images[_to_device(idx, images.device)]
                part = part[:, :, :h, :w]
            part = self._normalise(resize_aa(part, (gh, gw)))
            if len(groups) == 1:
                return part, dims
            if view is None:
                view = images.new_zeros(B, 3, max(d[0] for d in dims), max(d[1] for d in dims))
            view[_to_device(idx, images.device), :, :gh, :gw] = part
        return view, dims

    def _grid_meta(self, sizes: list[list[int]], dims: list[list[int]], view_hw: tuple[int, int],
                   grid_hw: tuple[int, int], device: torch.device,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per image, from host numbers and in one host-to-device copy: the valid feature cells (B, 2) long,
        the size of a cell in full-resolution pixels (B, 2), the image size (B, 2) float and the valid-cell
        mask (B, h, w) bool, None when every cell of every image is valid.

        A view of ``dims`` pixels covers the cells the backbone gives it alone (:meth:`Backbone.cells`), in a
        padded ``view_hw`` batch of ``grid_hw`` cells as well, and those cells span the image (the attention map
        upsampled to it), so that which cells are an image's, and the frame of its attention and boxes, do not
        depend on the batch. Their values near the padding do, slightly: the backbone's receptive field reads
        the zero-padded view beside them, and after a convolution's bias or BatchNorm the padding is no longer
        zero (evaluation under torchrun therefore keeps single-process batches, see
        :class:`~finescope.distributed.ShardSampler`). A side that fills the batch's view has the whole grid; a
        shorter one of a backbone of unknown stride is taken to have ``view_hw / grid_hw`` pixels per cell.
        """
        h, w = grid_hw
        cells = getattr(self.backbone, "cells", lambda side: None)
        rows = []
        for (H, W), (gh, gw) in zip(sizes, dims, strict=True):  # a side that fills the batch has the whole grid
            n_h = h if gh == view_hw[0] else cells(gh) or math.ceil(gh * h / view_hw[0])
            n_w = w if gw == view_hw[1] else cells(gw) or math.ceil(gw * w / view_hw[1])
            n_h, n_w = min(h, max(1, n_h)), min(w, max(1, n_w))
            rows.append([n_h, n_w, H / n_h, W / n_w, H, W])
        padded = any(r[0] != h or r[1] != w for r in rows)
        if padded:  # the mask, row-major, after the six numbers
            rows = [r + [float(i < r[0] and j < r[1]) for i in range(h) for j in range(w)] for r in rows]
        meta = _to_device(rows, device, torch.float32)  # (B, 6 [+ h*w])
        mask = meta[:, 6:].view(-1, h, w) > 0.5 if padded else None
        return meta[:, :2].long(), meta[:, 2:4], meta[:, 4:6], mask

    def _crops(self, images: torch.Tensor, boxes: torch.Tensor, sizes: list[list[int]] | None = None,
               sources: Sources | None = None) -> torch.Tensor:
        """Cut (B, K, 4) boxes (full-resolution pixels) -> (B*K, 3, L, L) crops in [0, 1].

        One roi_align per distinct image size (:func:`~finescope.models.align.crop_align`: on the CPU as two
        embedding_bag passes per box, or a shift), on its crop source (:meth:`_crop_sources`, made here unless
        given), with the boxes scaled to it; sides within half a pixel of L made exactly L
        (:func:`~finescope.models.align.snap_boxes`).
        """
        B, K, _ = boxes.shape
        H, W = images.shape[-2:]
        sizes = sizes if sizes is not None else [[H, W]] * B
        sources = sources if sources is not None else self._crop_sources(images, sizes)
        L = self.local_size
        out = None if len(sources) == 1 else images.new_empty(B, K, 3, L, L)
        for (h, w), (idx, source) in sources.items():
            rows = None if len(sources) == 1 else _to_device(idx, images.device)
            part_boxes = boxes if rows is None else boxes[rows]
            scale = _to_device([source.shape[-1] / w, source.shape[-2] / h] * 2, images.device, boxes.dtype)
            n = len(idx)
            batch_idx = torch.arange(n, device=images.device, dtype=boxes.dtype).repeat_interleave(K)[:, None]
            rois = torch.cat([batch_idx, (part_boxes * scale).reshape(n * K, 4)], dim=1)  # (n*K, 5)
            crops = crop_align(source, snap_boxes(rois, L).to(source.dtype), L)
            if rows is None:
                return crops
            out[rows] = crops.view(n, K, 3, L, L)
        return out.view(B * K, 3, L, L)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> ModelOutput:
        """Classify a batch.

        Args:
            images: (B, 3, H, W) float in [0, 1], full resolution, zero-padded at the bottom/right.
            sizes: (B, 2) the valid height and width of each image; None = all (H, W).

        Returns:
            A :class:`ModelOutput`.
        """
        B, _, H, W = images.shape
        if sizes is None:
            sizes = torch.tensor([[H, W]] * B)
        size_list = sizes.tolist()  # sizes arrive on the CPU: reading them costs no device sync
        reads_crops = self.use_crops and not (self.training and not self.crops_active)
        # the crop sources, when the crops or the view read them (the view of a large image is resized from its
        # source whether or not this step reads crops)
        needs_sources = reads_crops or (self.use_crops and any(self.view_from_source(h, w) for h, w in size_list))
        sources = self._crop_sources(images, size_list) if needs_sources else None
        view, dims = self._global_view(images, size_list, sources)
        fmap = self.backbone(view)  # (B, C, h, w)
        h, w = fmap.shape[-2:]
        valid, cell_px, sizes, mask = self._grid_meta(size_list, dims, view.shape[-2:], (h, w), images.device)
        if not self.use_attention:
            return ModelOutput(logits=self.global_head(self._masked_mean(fmap, mask)))
        inst = fmap.flatten(2).transpose(1, 2)  # (B, N, C)
        h_n = self.instance_proj(inst) if self.instance_proj is not None else inst  # (B, N, M)
        z, a = self.attention_pool(h_n, None if mask is None else mask.flatten(1))  # (B, M), (B, N)
        attn = a.view(B, h, w)
        g = z if self.image_feature == "attention" else self._masked_mean(fmap, mask)
        global_logits = self.global_head(g)
        if not reads_crops:
            return ModelOutput(logits=global_logits, attention=self._outside_loss(attn), cell_px=cell_px)
        cells = h_n if self.image_feature == "attention" else inst  # what W_g reads, (B, N, g_dim)
        selection_map = attn if self.select_from == "attention" else self._evidence(cells, global_logits, mask, (h, w))
        select = functools.partial(
            select_boxes_deferred, selection_map.detach(), valid, sizes, cell_px, self.num_crops, self.threshold,
            self.min_box_fraction, upsample=self.selection_upsample, normalise=self.selection_norm,
            components=self.selection_components, peaks=self.selection_peaks,
            iou_threshold=self.peak_iou, padded=mask is not None,
        )
        boxes, mass, exact = select(graph=self.selection_graph)
        reader = self.crop_backbone if self.crop_backbone is not None else self.backbone
        if exact is not None:  # boxes from the selection's CUDA graph, whose convergence flag is not read yet
            rerun = _Rerun.save(reader, images.device)
            if rerun is None:  # the crops' pass cannot be run twice: read the flag now
                if not bool(exact):
                    boxes, mass, _ = select(graph=False)
                exact = None
        fused = self._fuse(reader, images, boxes, size_list, sources, g)
        if exact is not None and not bool(exact):  # the one host-device sync, once the whole forward is queued
            del fused  # rare: the graph's labelling rounds did not converge; read the exact boxes' crops instead
            rerun.restore()
            boxes, mass, _ = select(graph=False)
            fused = self._fuse(reader, images, boxes, size_list, sources, g)
        global_logits = global_logits if self.global_in_loss else self._outside_loss(global_logits)
        if self.select_from != "attention":  # the boxes' attention mass, not that of the map that picked them
            mass = box_mass(attn.detach(), boxes, cell_px)
        return ModelOutput(fused, global_logits, self._outside_loss(attn), boxes, mass, cell_px)

    def _outside_loss(self, t: torch.Tensor) -> torch.Tensor:
        """An output the training loss does not read, detached in training: DDP finds the parameters a step uses
        by walking back from forward's outputs, and would wait for gradients that never come (the attention's
        with ``image_feature=avg``, the global head's with ``train.aux_weight=0``)."""
        return t.detach() if self.training else t

    def _fuse(self, reader: nn.Module, images: torch.Tensor, boxes: torch.Tensor, size_list: list[list[int]],
              sources: Sources | None, g: torch.Tensor) -> torch.Tensor:
        """The fused logits: the crops of ``boxes`` read by ``reader``, their features joined to ``g``."""
        crops = self._normalise(self._crops(images, boxes, size_list, sources))  # (B*K, 3, L, L)
        local = reader(crops).mean(dim=(2, 3)).view(boxes.shape[0], -1)  # (B, K*C), ordered by rank
        return self.fusion_head(self.dropout(torch.cat([g, local], dim=1)))

    @torch.no_grad()
    def _evidence(self, cells: torch.Tensor, global_logits: torch.Tensor, mask: torch.Tensor | None,
                  grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Class evidence map (B, h, w): softmax over valid cells of W_g h_n for the predicted class (a CAM).

        Args:
            cells: (B, N, D) the per-cell features the global head reads.
            global_logits: (B, num_classes).
            mask: (B, h, w) valid cells, None = all.
            grid_hw: (h, w), needed when ``mask`` is None.
        """
        B = cells.shape[0]
        h, w = mask.shape[1:] if mask is not None else grid_hw
        pred = global_logits.argmax(dim=1)  # (B,)
        per_cell = cells.float() @ self.global_head.weight.float().t()  # (B, N, num_classes)
        score = per_cell.gather(2, pred.view(B, 1, 1).expand(B, h * w, 1)).squeeze(2)  # (B, N)
        if mask is not None:
            score = score.masked_fill(~mask.flatten(1), float("-inf"))
        return score.softmax(dim=1).view(B, h, w)

    @staticmethod
    def _masked_mean(fmap: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Global average of (B, C, h, w) over each image's valid cells (mask (B, h, w), None = all) -> (B, C)."""
        if mask is None:
            return fmap.mean(dim=(2, 3))
        return (fmap * mask[:, None]).sum(dim=(2, 3)) / mask.sum(dim=(1, 2))[:, None]
