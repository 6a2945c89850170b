"""Whole-study networks: the three series of a study through a 3D encoder, fused with the scan
metadata, to 25 x 3 logits.

A global average pool would throw away which level is which (the five levels lie at different
heights of every series), so each series' feature map is pooled to a small grid of cells
(``pool_grid``) and the head sees every cell. One registered name per MONAI encoder; the
names differ only in the encoder they build, so every architecture trains through the same head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from lsdc.data.contract import N_CLASSES, N_LABELS
from lsdc.models.encoders import (
    DynUNetEncoder,
    Encoder,
    ResNetEncoder,
    SegResNetEncoder,
    SwinEncoder,
    ViTEncoder,
)
from lsdc.models.registry import register_model


class WholeStudyNet(nn.Module):
    """Series volumes (B, S, D, H, W) + metadata (B, M) -> logits (B, 25, 3).

    Args:
        make_encoder: builds one encoder (called once when shared, else once per series).
        img_size: (D, H, W) of every series volume.
        n_series: number of series channels S.
        n_meta: length M of the metadata vector (0: no metadata).
        shared_encoder: one encoder for every series, told apart by a learned series embedding
            added to its feature map; otherwise one encoder per series.
        pool_grid: cells (d, h, w) each series' feature map is average-pooled to.
        hidden: width of the head's hidden layer.
        dropout: dropout before each head layer.
    """

    num_classes = N_CLASSES

    def __init__(
        self,
        make_encoder: Callable[[], Encoder],
        img_size: Sequence[int],
        n_series: int = 3,
        n_meta: int = 0,
        shared_encoder: bool = False,
        pool_grid: Sequence[int] = (2, 2, 2),
        hidden: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        n_encoders = 1 if shared_encoder else n_series
        self.encoders = nn.ModuleList(make_encoder() for _ in range(n_encoders))
        channels = self.encoders[0].num_features
        self.series_embedding = (
            nn.Parameter(torch.zeros(n_series, channels)) if shared_encoder else None
        )
        self.pool = nn.AdaptiveAvgPool3d(tuple(int(g) for g in pool_grid))
        self.img_size = tuple(int(s) for s in img_size)
        self.n_series = n_series
        self.n_meta = n_meta
        self.in_chans = n_series
        self.num_features = n_series * channels * math.prod(int(g) for g in pool_grid)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.num_features + n_meta, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, N_LABELS * N_CLASSES),
        )

    def forward_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, S, D, H, W) -> (B, num_features): each series encoded and grid-pooled."""
        features = []
        for s in range(self.n_series):
            encoder = self.encoders[0 if self.series_embedding is not None else s]
            fmap = encoder.forward_features(volumes[:, s : s + 1])
            if self.series_embedding is not None:
                fmap = fmap + self.series_embedding[s].view(1, -1, 1, 1, 1).to(fmap.dtype)
            features.append(self.pool(fmap).flatten(1))
        return torch.cat(features, dim=1)

    def forward_head(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        """Pooled features (+ metadata) -> logits (B, 25, 3)."""
        if self.n_meta:
            features = torch.cat([features, meta.to(features.dtype)], dim=1)
        return self.head(features).view(-1, N_LABELS, N_CLASSES)

    def forward(self, volumes: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(volumes), meta)

    def example_input(self, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Random inputs of the right shapes (the registry-wide model test uses them)."""
        return (
            torch.randn(batch_size, self.n_series, *self.img_size),
            torch.randn(batch_size, self.n_meta),
        )

    def output_shape(self, batch_size: int = 2) -> tuple[int, ...]:
        return (batch_size, N_LABELS, N_CLASSES)


def _head_kwargs(
    img_size: Sequence[int],
    n_series: int,
    n_meta: int,
    shared_encoder: bool,
    pool_grid: Sequence[int],
    hidden: int,
    dropout: float,
) -> dict:
    return {
        "img_size": img_size,
        "n_series": n_series,
        "n_meta": n_meta,
        "shared_encoder": shared_encoder,
        "pool_grid": pool_grid,
        "hidden": hidden,
        "dropout": dropout,
    }


@register_model
def resnet3d(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = False,
    pool_grid: Sequence[int] = (2, 2, 2),
    hidden: int = 64,
    dropout: float = 0.2,
    widths: Sequence[int] = (8, 16, 32, 32),
    layers: Sequence[int] = (1, 1, 1, 1),
    stem_kernel: int = 7,
    no_max_pool: bool = False,
) -> WholeStudyNet:
    """Whole-study net on MONAI ResNet (basic blocks; ``widths``/``layers`` set its size;
    ``no_max_pool`` halves the total stride to 16, keeping a finer grid on small volumes)."""
    return WholeStudyNet(
        lambda: ResNetEncoder(1, widths, layers, stem_kernel, no_max_pool),
        **_head_kwargs(img_size, n_series, n_meta, shared_encoder, pool_grid, hidden, dropout),
    )


@register_model
def segresnet(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = False,
    pool_grid: Sequence[int] = (2, 2, 2),
    hidden: int = 64,
    dropout: float = 0.2,
    init_filters: int = 8,
    blocks_down: Sequence[int] = (1, 1, 1, 1),
) -> WholeStudyNet:
    """Whole-study net on MONAI SegResNet's encoder."""
    return WholeStudyNet(
        lambda: SegResNetEncoder(1, init_filters, blocks_down),
        **_head_kwargs(img_size, n_series, n_meta, shared_encoder, pool_grid, hidden, dropout),
    )


@register_model
def swinunetr(
    img_size: Sequence[int] = (32, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = True,
    pool_grid: Sequence[int] = (1, 1, 1),
    hidden: int = 64,
    dropout: float = 0.2,
    feature_size: int = 12,
    depths: Sequence[int] = (1, 1, 1, 1),
    num_heads: Sequence[int] = (1, 2, 4, 8),
    window_size: int = 4,
) -> WholeStudyNet:
    """Whole-study net on MONAI SwinUNETR's Swin transformer (sizes divisible by 32)."""
    return WholeStudyNet(
        lambda: SwinEncoder(1, img_size, feature_size, depths, num_heads, window_size),
        **_head_kwargs(img_size, n_series, n_meta, shared_encoder, pool_grid, hidden, dropout),
    )


@register_model
def dynunet(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = False,
    pool_grid: Sequence[int] = (2, 2, 2),
    hidden: int = 64,
    dropout: float = 0.2,
    filters: Sequence[int] = (8, 16, 32, 32),
    kernel_size: int = 3,
) -> WholeStudyNet:
    """Whole-study net on MONAI DynUNet's encoder path (residual blocks)."""
    return WholeStudyNet(
        lambda: DynUNetEncoder(1, filters, kernel_size),
        **_head_kwargs(img_size, n_series, n_meta, shared_encoder, pool_grid, hidden, dropout),
    )


@register_model
def vit(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = True,
    pool_grid: Sequence[int] = (2, 2, 2),
    hidden: int = 64,
    dropout: float = 0.2,
    patch_size: Sequence[int] = (8, 8, 8),
    hidden_size: int = 64,
    mlp_dim: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
) -> WholeStudyNet:
    """Whole-study net on MONAI ViT's patch tokens, folded back into a grid."""
    return WholeStudyNet(
        lambda: ViTEncoder(1, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads),
        **_head_kwargs(img_size, n_series, n_meta, shared_encoder, pool_grid, hidden, dropout),
    )
