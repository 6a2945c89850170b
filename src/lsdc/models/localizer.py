"""Stage 1 of the two-stage model: find every finding's centre in a series, as 3D heatmaps.

A MONAI BasicUNet reads one stack resampled onto a fixed voxel grid and writes one heatmap per
label column (25: the canal, both foramina and both lateral recesses at five levels). A spatial
softmax turns each heatmap into a probability over voxels and its expectation (soft-argmax) into a
sub-voxel point, so the network is trained on the coordinates themselves and still sees a dense
target. Points are in the grid's voxel units; the caller maps them back to patient millimetres
through the stack's geometry, which lets points from different series be fused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from lsdc.contract import N_LABELS
from lsdc.models.registry import register_model


class HeatmapLocalizer(nn.Module):
    """BasicUNet -> ``n_points`` heatmaps over the input grid -> soft-argmax points.

    Args:
        n_points: heatmap channels (one per point to find).
        features: BasicUNet's six feature widths; small widths suit the CPU demo.
        spatial_dims: 3 for a stack (slices, rows, cols), 2 for a single image.
    """

    def __init__(
        self,
        n_points: int = N_LABELS,
        features: Sequence[int] = (8, 16, 32, 64, 64, 8),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.n_points = n_points
        self.spatial_dims = spatial_dims
        self.net = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=1 + spatial_dims,
            out_channels=n_points,
            features=features,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *grid)`` -> heatmap logits ``(B, n_points, *grid)``.

        The image goes in with one channel of normalised coordinates per axis: left and right
        foramina look alike, and a purely convolutional net could only tell them apart by its
        distance to the padding, so its heatmap would split between both and the soft-argmax
        would land on the midline.
        """
        axes = [torch.linspace(-1.0, 1.0, n, device=image.device) for n in image.shape[2:]]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).to(image.dtype)
        coords = coords.unsqueeze(0).expand(image.shape[0], *coords.shape)
        return self.net(torch.cat([image, coords], dim=1))

    def example_input(self, batch_size: int) -> tuple[torch.Tensor]:
        """A small valid input: BasicUNet pools four times and instance-normalises the result,
        so each axis needs 16 voxels and the bottleneck more than one."""
        return (torch.randn(batch_size, 1, *self._example_grid()),)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.n_points, *self._example_grid())

    def _example_grid(self) -> tuple[int, ...]:
        return (16, 32, 32)[-self.spatial_dims :]


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


@register_model
def localizer(
    n_points: int = N_LABELS,
    features: Sequence[int] = (8, 16, 32, 64, 64, 8),
    spatial_dims: int = 3,
) -> HeatmapLocalizer:
    """Stage-1 heatmap localizer (see :class:`HeatmapLocalizer`)."""
    return HeatmapLocalizer(n_points=n_points, features=tuple(features), spatial_dims=spatial_dims)
