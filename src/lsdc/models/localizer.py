"""Stage 1 of the two-stage model: find every finding's centre in a series, as 3D heatmaps.

A dense 3D MONAI network reads one stack resampled onto a fixed voxel grid and writes one heatmap
per label column (25: the canal, both foramina and both lateral recesses at five levels). A
spatial softmax turns each heatmap into a probability over voxels and its expectation
(soft-argmax) into a sub-voxel point, so the network is trained on the coordinates themselves and
still sees a dense target. Points are in the grid's voxel units; the caller maps them back to
patient millimetres through the stack's geometry, which lets points from different series be fused.

The network is chosen by name (``task_params.localizer.name``) among the ``localizer`` models
registered below: ``basicunet`` (the default), ``unet``, ``segresnet``, ``dynunet`` and
``swinunetr``, and ``timm_unet``, a 2D U-Net (segmentation-models-pytorch over any timm encoder)
run on every slice of the grid, whose per-slice heatmaps stack into the same 3D heatmap. Every one goes through :class:`HeatmapLocalizer`, which hides their quirks: the
coordinate channels, zero padding up to the multiple of the grid a network needs (cropped off
again, so no heatmap is resampled), and DynUNet's deep-supervision outputs in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, SwinUNETR, UNet

from lsdc.contract import N_LABELS
from lsdc.errors import UserError
from lsdc.models.registry import register_model

IN_CHANNELS = 4
"""The image and one normalised coordinate channel per axis of the 3D grid."""


class HeatmapLocalizer(nn.Module):
    """A dense network -> ``n_points`` heatmaps over the input grid (the one stage-1 interface).

    Args:
        net: maps ``(B, IN_CHANNELS, *padded)`` to ``(B, n_points, *padded)``; in training, when
            ``deep_supervision`` > 0, to ``(B, 1 + deep_supervision, n_points, *padded)`` (MONAI
            DynUNet's stacked outputs, each already at full size).
        n_points: heatmap channels (one per point to find).
        grid: the (D, H, W) grid the localizer is built for (``data.volume_size``).
        size_multiple: every padded axis is a multiple of it (the network's total stride); one
            per axis for a network that strides some axes only (a 2D one: 1 across slices).
        deep_supervision: extra lower-resolution heads the network outputs in training.
    """

    def __init__(
        self,
        net: nn.Module,
        n_points: int,
        grid: Sequence[int],
        size_multiple: int | Sequence[int] = 1,
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.n_points = n_points
        self.grid = tuple(int(g) for g in grid)
        multiple = (
            (size_multiple,) * len(self.grid) if isinstance(size_multiple, int) else size_multiple
        )
        self.size_multiple = tuple(int(m) for m in multiple)
        self.deep_supervision = int(deep_supervision)

    def padded_grid(self, grid: Sequence[int]) -> tuple[int, ...]:
        """The grid the network runs on: each axis rounded up to its ``size_multiple``."""
        return tuple(
            math.ceil(int(n) / m) * m for n, m in zip(grid, self.size_multiple, strict=True)
        )

    def heatmaps(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 1, *grid)`` -> heatmap logits ``(B, n_points, *grid)``: the output, then (in
        training only) each deep-supervision head's, coarsest last.

        The image goes in with one channel of normalised coordinates per axis: left and right
        foramina look alike, and a purely convolutional net could only tell them apart by its
        distance to the padding, so its heatmap would split between both and the soft-argmax
        would land on the midline. The coordinates run on over the zero padding, which is cut
        off the output again.
        """
        grid = image.shape[2:]
        padded = self.padded_grid(grid)
        axes = [
            -1.0 + 2.0 * torch.arange(p, device=image.device, dtype=torch.float32) / max(n - 1, 1)
            for n, p in zip(grid, padded, strict=True)
        ]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).to(image.dtype)
        coords = coords.unsqueeze(0).expand(image.shape[0], *coords.shape)
        pad = [a for n, p in zip(reversed(grid), reversed(padded), strict=True) for a in (0, p - n)]
        out = self.net(torch.cat([F.pad(image, pad), coords], dim=1))
        crop = (..., *(slice(0, n) for n in grid))
        if self.training and self.deep_supervision:
            return [o[crop] for o in out.unbind(1)]
        return [out[crop]]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *grid)`` -> heatmap logits ``(B, n_points, *grid)`` (the main output)."""
        return self.heatmaps(image)[0]

    def example_input(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, 1, *self.grid),)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.n_points, *self.grid)


def heatmap_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of each heatmap over all its voxels: ``(B, K, *grid)`` -> same shape."""
    flat = logits.flatten(2).float()
    return F.log_softmax(flat, dim=-1).view_as(logits)


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Expected voxel index of each heatmap: ``(B, K, *grid)`` -> ``(B, K, len(grid))``."""
    probs = heatmap_log_probs(logits).exp()
    grid = probs.shape[2:]
    coords = []
    for axis, n in enumerate(grid):
        marginal = probs.sum(dim=[2 + a for a in range(len(grid)) if a != axis])
        index = torch.arange(n, dtype=marginal.dtype, device=marginal.device)
        coords.append((marginal * index).sum(dim=-1))
    return torch.stack(coords, dim=-1)


def gaussian_marginals(
    points: torch.Tensor, grid: Sequence[int], sigma: float
) -> list[torch.Tensor]:
    """Per-axis normalised Gaussians ``(B, K, n_axis)`` around ``points`` ``(B, K, D)``.

    Their outer product is the (separable) Gaussian heatmap target; keeping the factors avoids
    materialising a ``(B, K, *grid, D)`` distance tensor. ``sigma`` is in grid voxels.
    """
    marginals = []
    for axis, n in enumerate(grid):
        index = torch.arange(n, dtype=torch.float32, device=points.device)
        logits = -((index - points[..., axis : axis + 1].float()) ** 2) / (2 * sigma**2)
        marginals.append(torch.softmax(logits, dim=-1))
    return marginals


def localizer_loss(
    logits: torch.Tensor,
    points: torch.Tensor,
    mask: torch.Tensor,
    sigma: float = 1.5,
    coordinate_weight: float = 1.0,
) -> torch.Tensor:
    """KL divergence of each heatmap from a Gaussian around its point, plus L1 on the
    soft-argmax point, averaged over ``mask``.

    The dense term gives a gradient everywhere from the first step; the coordinate term makes the
    expectation, which is what gets served, land on the point. Both are zero for a perfect
    heatmap, so the loss reads as an error.

    Args:
        logits: ``(B, K, *grid)`` network output.
        points: ``(B, K, D)`` target voxel indices on the grid.
        mask: ``(B, K)`` bool, True where a target exists and lies inside the grid.
        sigma: width of the Gaussian target, in voxels.
        coordinate_weight: weight of the L1 term.
    """
    if not bool(mask.any()):
        return logits.sum() * 0.0
    logits, points = logits[mask], points[mask].float()  # (N, *grid), (N, D)
    marginals = gaussian_marginals(points[None], logits.shape[1:], sigma)
    marginals = [m[0] for m in marginals]  # (N, n_axis) each
    log_probs = heatmap_log_probs(logits[:, None])[:, 0]
    cross = log_probs
    for m in reversed(marginals):  # contract the last axis with its marginal, axis by axis
        cross = (cross * m.view(m.shape[0], *[1] * (cross.dim() - 2), m.shape[1])).sum(-1)
    entropy = sum((m * m.clamp(min=1e-12).log()).sum(-1) for m in marginals)
    divergence = entropy - cross
    l1 = (soft_argmax(logits[:, None])[:, 0] - points).abs().sum(-1)
    return (divergence + coordinate_weight * l1).mean()


def heads_loss(
    heads: Sequence[torch.Tensor], points: torch.Tensor, mask: torch.Tensor, sigma: float
) -> torch.Tensor:
    """:func:`localizer_loss` of the output and of every deep-supervision head (the list
    :meth:`HeatmapLocalizer.heatmaps` gives), head k at half the weight of head k - 1 and the
    weights summing to one (nnU-Net's rule), so the loss keeps the scale of a single head's."""
    weights = [0.5**k for k in range(len(heads))]
    total = sum(
        w * localizer_loss(h, points, mask, sigma=sigma)
        for w, h in zip(weights, heads, strict=True)
    )
    return total / sum(weights)


def _check_bottleneck(name: str, grid: Sequence[int], stride: int) -> None:
    """Refuse a grid whose deepest map is one voxel: instance norm cannot normalise it."""
    cells = math.prod(math.ceil(int(n) / stride) for n in grid)
    if cells < 2:
        raise UserError(
            f"config key 'data.volume_size' {list(grid)}: the {name} localizer down-samples by "
            f"{stride}, leaving a one-voxel bottleneck; give one axis at least {2 * stride} voxels"
        )


@register_model(role="localizer")
def basicunet(
    n_points: int = N_LABELS,
    grid: Sequence[int] = (16, 32, 32),
    features: Sequence[int] = (8, 16, 32, 64, 64, 8),
) -> HeatmapLocalizer:
    """MONAI BasicUNet (the default): four max-pools, six feature widths (the last is the
    decoder's output width)."""
    _check_bottleneck("basicunet", grid, 16)
    net = BasicUNet(
        spatial_dims=3, in_channels=IN_CHANNELS, out_channels=n_points, features=tuple(features)
    )
    return HeatmapLocalizer(net, n_points, grid, size_multiple=16)


@register_model(role="localizer")
def unet(
    n_points: int = N_LABELS,
    grid: Sequence[int] = (16, 32, 32),
    channels: Sequence[int] = (8, 16, 32, 64),
    num_res_units: int = 1,
) -> HeatmapLocalizer:
    """MONAI UNet: ``len(channels)`` levels, each after the first at stride 2 (strided
    convolutions), ``num_res_units`` residual units per level."""
    stride = 2 ** (len(channels) - 1)
    _check_bottleneck("unet", grid, stride)
    net = UNet(
        spatial_dims=3,
        in_channels=IN_CHANNELS,
        out_channels=n_points,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
    )
    return HeatmapLocalizer(net, n_points, grid, size_multiple=stride)


@register_model(role="localizer")
def segresnet(
    n_points: int = N_LABELS,
    grid: Sequence[int] = (16, 32, 32),
    init_filters: int = 8,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
) -> HeatmapLocalizer:
    """MONAI SegResNet (group norm, residual blocks; ``init_filters`` doubles at each of the
    ``len(blocks_down) - 1`` down-samplings)."""
    stride = 2 ** (len(blocks_down) - 1)
    net = SegResNet(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=IN_CHANNELS,
        out_channels=n_points,
        blocks_down=tuple(blocks_down),
        blocks_up=(1,) * (len(blocks_down) - 1),
        norm=("GROUP", {"num_groups": min(8, init_filters)}),
    )
    return HeatmapLocalizer(net, n_points, grid, size_multiple=stride)


@register_model(role="localizer")
def dynunet(
    n_points: int = N_LABELS,
    grid: Sequence[int] = (16, 32, 32),
    filters: Sequence[int] = (8, 16, 32, 64),
    kernel_size: int = 3,
    deep_supervision: int = 2,
) -> HeatmapLocalizer:
    """MONAI DynUNet (nnU-Net's network; residual blocks, ``len(filters)`` levels at stride 2).

    ``deep_supervision`` extra heads (0 to ``len(filters) - 2``) are trained on the same
    heatmap target at half the weight of the next finer one (nnU-Net's rule); they exist in
    training only, served heatmaps are the main output's.
    """
    n = len(filters)
    if not 0 <= deep_supervision <= n - 2:
        raise UserError(
            f"dynunet deep_supervision must be 0 to {n - 2} (len(filters) - 2), got {deep_supervision}"
        )
    strides = [1] + [2] * (n - 1)
    _check_bottleneck("dynunet", grid, 2 ** (n - 1))
    net = DynUNet(
        spatial_dims=3,
        in_channels=IN_CHANNELS,
        out_channels=n_points,
        kernel_size=[kernel_size] * n,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(filters),
        res_block=True,
        deep_supervision=deep_supervision > 0,
        deep_supr_num=max(deep_supervision, 1),
    )
    return HeatmapLocalizer(
        net, n_points, grid, size_multiple=2 ** (n - 1), deep_supervision=deep_supervision
    )


@register_model(role="localizer")
def swinunetr(
    n_points: int = N_LABELS,
    grid: Sequence[int] = (16, 32, 32),
    feature_size: int = 12,
    depths: Sequence[int] = (1, 1, 1, 1),
    num_heads: Sequence[int] = (1, 2, 4, 8),
    window_size: int = 4,
) -> HeatmapLocalizer:
    """MONAI SwinUNETR. Its patch embedding and four patch mergings need every axis divisible
    by 32, so the grid is zero-padded up to the next multiple of 32 (a 16 x 32 x 32 grid runs
    as 32 x 32 x 32, at twice the cost) rather than resampled. Group norm replaces instance norm,
    which cannot normalise the one-voxel stride-32 map of a 32-voxel axis."""
    if feature_size % 12:
        raise UserError(f"swinunetr feature_size must be a multiple of 12, got {feature_size}")
    net = SwinUNETR(
        in_channels=IN_CHANNELS,
        out_channels=n_points,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=window_size,
        norm_name=("group", {"num_groups": 12}),
    )
    return HeatmapLocalizer(net, n_points, grid, size_multiple=32)


class SliceUNet(nn.Module):
    """A 2D segmentation network on every slice of the grid, as a 3D heatmap network:
    ``(B, IN_CHANNELS, D, H, W)`` -> ``(B, n_points, D, H, W)``.

    Slice k is read with ``context_slices`` neighbours on each side as channels (zeros beyond
    the ends) and its three coordinate planes; the slice coordinate tells the network which side
    of the spine a sagittal slice shows. The per-slice logits stack along the slice axis, so the
    spatial softmax and soft-argmax of :func:`soft_argmax` compare every voxel of every slice:
    the served point is the same (slice, row, col) a 3D localizer gives.
    """

    def __init__(self, net: nn.Module, context_slices: int) -> None:
        super().__init__()
        self.net = net
        self.context_slices = int(context_slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        c = self.context_slices
        image = F.pad(x[:, 0], (0, 0, 0, 0, c, c))  # (B, D + 2c, H, W)
        neighbours = torch.stack([image[:, k : k + 2 * c + 1] for k in range(d)], dim=1)
        coords = x[:, 1:].permute(0, 2, 1, 3, 4)  # (B, D, 3, H, W)
        slices = torch.cat([neighbours, coords], dim=2).flatten(0, 1)
        out = self.net(slices)  # (B * D, K, H, W)
        return out.unflatten(0, (b, d)).transpose(1, 2)


@register_model(role="localizer")
def timm_unet(
    n_points: int = N_LABELS,
    grid: Sequence[int] = (16, 32, 32),
    encoder: str = "test_resnet",
    encoder_depth: int = 3,
    decoder_channels: Sequence[int] = (32, 16, 8),
    context_slices: int = 1,
    pretrained: str | None = None,
) -> HeatmapLocalizer:
    """A segmentation-models-pytorch U-Net over the timm ``encoder`` (``tu-<name>``), on every
    slice (:class:`SliceUNet`): ``encoder_depth`` stages (1-5, each halving the slice), one
    decoder width per stage, ``2 * context_slices + 1`` image channels plus three coordinate
    channels (timm adapts a pretrained RGB stem to them). ``pretrained``: a local weights file
    of the encoder (:mod:`lsdc.models.timm_backbones`). The default encoder is timm's smallest
    test ResNet; name a real one."""
    import segmentation_models_pytorch as smp

    from lsdc.models.timm_backbones import (
        LOADING_ERRORS,
        check_timm_name,
        weights_file,
        weights_mismatch,
    )

    key = "task_params.localizer.params"
    if len(decoder_channels) != encoder_depth:
        raise UserError(
            f"config key '{key}.decoder_channels': {len(decoder_channels)} widths for "
            f"encoder_depth {encoder_depth}; give one per stage"
        )
    if context_slices < 0:
        raise UserError(f"config key '{key}.context_slices' must be >= 0, got {context_slices}")
    check_timm_name(encoder, f"{key}.encoder")
    path = weights_file(pretrained, key)
    in_channels = 2 * context_slices + 1 + IN_CHANNELS - 1
    try:
        net = smp.Unet(
            encoder_name=f"tu-{encoder}",
            encoder_depth=encoder_depth,
            encoder_weights=None if path is None else True,
            decoder_channels=tuple(decoder_channels),
            in_channels=in_channels,
            classes=n_points,
            pretrained_cfg_overlay=None if path is None else {"file": str(path)},
        )
    except LOADING_ERRORS as exc:
        if path is None:
            raise UserError(
                f"config key '{key}.encoder': no U-Net over {encoder!r} ({exc}); use a "
                "convolutional timm encoder"
            ) from exc
        raise UserError(
            weights_mismatch(encoder, key, path, {"in_chans": in_channels}, exc)
        ) from exc
    stride = 2**encoder_depth
    _check_bottleneck("timm_unet", grid[1:], stride)
    _freeze_unreached(net, in_channels, stride)
    return HeatmapLocalizer(
        SliceUNet(net, context_slices), n_points, grid, size_multiple=(1, stride, stride)
    )


def _freeze_unreached(net: nn.Module, in_channels: int, stride: int) -> None:
    """Freeze the parameters no output depends on: timm's feature extraction keeps the block
    after the last stage of some encoders (EfficientNet below depth 5), and a parameter without
    a gradient would stop DistributedDataParallel. Found by one small forward and backward in
    eval mode (which leaves the norms' running statistics, pretrained ones too, as they are),
    with gradients on even when the model is built under ``torch.no_grad`` (as serving does)."""
    net.eval()
    net.zero_grad(set_to_none=True)
    with torch.enable_grad():
        net(torch.zeros(1, in_channels, 2 * stride, 2 * stride)).sum().backward()
    for param in net.parameters():
        if param.grad is None:
            param.requires_grad_(False)
    net.zero_grad(set_to_none=True)
    net.train()
