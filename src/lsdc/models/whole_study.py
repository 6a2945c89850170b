"""Whole-study networks: the three series of a study through a 3D encoder, fused with the scan
metadata, to 25 x 3 logits.

A global average pool would throw away which level is which (the five levels lie at different
heights of every series), so the head keeps the cells of each series' feature map: either pooled
to a small grid (``kind: grid``, ``pool_grid``) and read by one MLP, or as tokens that 25 label
queries attend over (``kind: attention``), set by one ``head`` mapping (:class:`WholeStudyHead`).
One registered name per MONAI encoder; the names differ only in the encoder they build, so every
architecture trains through the same heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from lsdc.config import build_section
from lsdc.contract import N_CLASSES, N_LABELS
from lsdc.errors import UserError
from lsdc.models.encoders import (
    DynUNetEncoder,
    Encoder,
    ResNetEncoder,
    SegResNetEncoder,
    SwinEncoder,
    ViTEncoder,
)
from lsdc.models.registry import register_model

HEADS = ("grid", "attention")
"""``grid``: every series pooled to ``pool_grid`` cells, one MLP over all cells. ``attention``:
one learned query per label attends over every cell of every series (plus a position
embedding), so each label can look up its own level and side."""


@dataclass(frozen=True)
class WholeStudyHead:
    """The ``head`` mapping every whole-study model takes (``model.params.head`` in a config).

    Attributes:
        kind: one of :data:`HEADS`.
        pool_grid: cells (d, h, w) each series' feature map is average-pooled to (grid only).
        hidden: width of the grid head's hidden layer, or of the attention head's tokens.
        dropout: dropout inside the head.
        attention_heads: heads of the attention head's multi-head attention (attention only).
    """

    kind: str = "grid"
    pool_grid: tuple[int, int, int] = (2, 2, 2)
    hidden: int = 64
    dropout: float = 0.2
    attention_heads: int = 4

    @classmethod
    def from_mapping(
        cls, head: Mapping[str, Any] | None, defaults: WholeStudyHead | None = None
    ) -> WholeStudyHead:
        """``head`` over ``defaults`` (the architecture's), every key and type checked as a config
        key is (an unknown key raises a ConfigError naming ``model.params.head.KEY``)."""
        base = defaults if defaults is not None else cls()
        given = build_section(cls, dict(head or {}), "model.params.head")
        spec = replace(base, **{k: getattr(given, k) for k in (head or {})})
        if spec.kind not in HEADS:
            raise UserError(f"unknown head kind {spec.kind!r}; choose one of {list(HEADS)}")
        return spec


def _feature_grid(encoder: Encoder, img_size: Sequence[int]) -> tuple[int, ...]:
    """The (d, h, w) of ``encoder``'s feature map for one ``img_size`` volume (one dry run,
    since every adapter strides differently)."""
    was_training = encoder.training
    with torch.no_grad():
        fmap = encoder.eval().forward_features(torch.zeros(1, encoder.in_chans, *img_size))
    encoder.train(was_training)
    return tuple(int(s) for s in fmap.shape[2:])


class GridPoolHead(nn.Sequential):
    """Each series' map average-pooled to ``pool_grid`` cells, all cells (+ metadata) -> MLP.

    A ``Sequential`` of the MLP's layers, so its weights keep the names (``head.1.weight``, ...)
    that checkpoints trained before the attention head existed hold.
    """

    def __init__(
        self,
        channels: int,
        n_series: int,
        n_meta: int,
        pool_grid: Sequence[int],
        hidden: int,
        dropout: float,
    ) -> None:
        pool_grid = tuple(int(g) for g in pool_grid)
        num_features = n_series * channels * math.prod(pool_grid)
        super().__init__(
            nn.Dropout(dropout),
            nn.Linear(num_features + n_meta, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, N_LABELS * N_CLASSES),
        )
        self.pool_grid = pool_grid
        self.num_features = num_features
        self.n_meta = n_meta

    def features(self, fmaps: list[torch.Tensor]) -> torch.Tensor:
        """Per-series maps -> (B, num_features)."""
        return torch.cat(
            [nn.functional.adaptive_avg_pool3d(f, self.pool_grid).flatten(1) for f in fmaps], dim=1
        )

    def forward(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        if self.n_meta:
            features = torch.cat([features, meta.to(features.dtype)], dim=1)
        return super().forward(features).view(-1, N_LABELS, N_CLASSES)


class LabelAttentionHead(nn.Module):
    """25 learned label queries attend over the cells of every series, then a per-label MLP.

    A finding is small and local (one level, one side, one series), so rather than mixing every
    cell into one vector, each label gets its own attention over the tokens: the encoder's cells
    projected to ``dim`` plus a learned embedding of (series, cell position).
    """

    def __init__(
        self,
        channels: int,
        grids: Sequence[Sequence[int]],
        n_meta: int,
        dim: int,
        n_heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise UserError(f"attention head: hidden {dim} is not divisible by heads {n_heads}")
        n_tokens = sum(math.prod(g) for g in grids)
        self.num_features = channels
        self.n_meta = n_meta
        self.project = nn.Linear(channels, dim)
        # unit scale, like the projected cells: at ViT's 0.02 the cells drown their position and
        # the label queries stay stuck attending evenly (tests/test_models.py, own cells)
        self.position = nn.Parameter(torch.randn(n_tokens, dim))
        self.queries = nn.Parameter(torch.randn(N_LABELS, dim) * 0.02)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.meta = nn.Linear(n_meta, dim) if n_meta else None
        self.norm_labels = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        # per-label MLP: label l uses its own weights label_w1[l], label_w2[l]
        self.label_w1 = nn.Parameter(torch.randn(N_LABELS, dim, dim) / math.sqrt(dim))
        self.label_b1 = nn.Parameter(torch.zeros(N_LABELS, dim))
        self.label_w2 = nn.Parameter(torch.randn(N_LABELS, dim, N_CLASSES) / math.sqrt(dim))
        self.label_b2 = nn.Parameter(torch.zeros(N_LABELS, N_CLASSES))

    def features(self, fmaps: list[torch.Tensor]) -> torch.Tensor:
        """Per-series maps -> tokens (B, T, channels), series after series."""
        return torch.cat([f.flatten(2).transpose(1, 2) for f in fmaps], dim=1)

    def forward(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        tokens = self.norm_tokens(self.project(features) + self.position.to(features.dtype))
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        attended, _weights = self.attention(queries, tokens, tokens, need_weights=False)
        labels = attended + queries
        if self.meta is not None:
            labels = labels + self.meta(meta.to(tokens.dtype)).unsqueeze(1)
        labels = self.dropout(self.norm_labels(labels))
        hidden = nn.functional.gelu(
            torch.einsum("bld,ldh->blh", labels, self.label_w1) + self.label_b1
        )
        return torch.einsum("blh,lhc->blc", self.dropout(hidden), self.label_w2) + self.label_b2


class WholeStudyNet(nn.Module):
    """Series volumes (B, S, D, H, W) + metadata (B, M) -> logits (B, 25, 3).

    Args:
        make_encoder: builds one encoder (called once when shared, else once per series).
        img_size: (D, H, W) of every series volume.
        n_series: number of series channels S.
        n_meta: length M of the metadata vector (0: no metadata).
        shared_encoder: one encoder for every series, told apart by a learned series embedding
            added to its feature map; otherwise one encoder per series.
        head: how the feature maps become logits (:class:`WholeStudyHead`).
    """

    num_classes = N_CLASSES

    def __init__(
        self,
        make_encoder: Callable[[], Encoder],
        img_size: Sequence[int],
        n_series: int = 3,
        n_meta: int = 0,
        shared_encoder: bool = False,
        head: WholeStudyHead = WholeStudyHead(),
    ) -> None:
        super().__init__()
        n_encoders = 1 if shared_encoder else n_series
        self.encoders = nn.ModuleList(make_encoder() for _ in range(n_encoders))
        channels = self.encoders[0].num_features
        self.series_embedding = (
            nn.Parameter(torch.zeros(n_series, channels)) if shared_encoder else None
        )
        self.img_size = tuple(int(s) for s in img_size)
        self.n_series = n_series
        self.n_meta = n_meta
        self.in_chans = n_series
        if head.kind == "grid":
            self.head = GridPoolHead(
                channels, n_series, n_meta, head.pool_grid, head.hidden, head.dropout
            )
        else:
            grid = _feature_grid(self.encoders[0], self.img_size)
            self.head = LabelAttentionHead(
                channels, [grid] * n_series, n_meta, head.hidden, head.attention_heads, head.dropout
            )
        self.num_features = self.head.num_features

    def forward_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, S, D, H, W) -> each series encoded, then pooled by the head: (B, num_features)
        for the grid head, (B, tokens, num_features) for the attention head."""
        fmaps = []
        for s in range(self.n_series):
            encoder = self.encoders[0 if self.series_embedding is not None else s]
            fmap = encoder.forward_features(volumes[:, s : s + 1])
            if self.series_embedding is not None:
                fmap = fmap + self.series_embedding[s].view(1, -1, 1, 1, 1).to(fmap.dtype)
            fmaps.append(fmap)
        return self.head.features(fmaps)

    def forward_head(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        """Features (+ metadata) -> logits (B, 25, 3)."""
        return self.head(features, meta)

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


HeadMapping = Mapping[str, Any] | None
"""A constructor's ``head`` argument: keys of :class:`WholeStudyHead` (None: its defaults)."""


@register_model
def resnet3d(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = False,
    head: HeadMapping = None,
    widths: Sequence[int] = (8, 16, 32, 32),
    layers: Sequence[int] = (1, 1, 1, 1),
    stem_kernel: int = 7,
    no_max_pool: bool = False,
    stem_stride: int | Sequence[int] = 2,
    stages: int = 4,
) -> WholeStudyNet:
    """Whole-study net on MONAI ResNet (basic blocks; ``widths``/``layers`` set its size).

    The total stride is ``stem_stride`` x 2 (max pool, unless ``no_max_pool``) x 2 per stage
    after the first of ``stages``: lower it to keep a feature map fine enough to tell the levels
    apart (e.g. ``no_max_pool`` + ``stages: 3``: stride 8, a 2 x 8 x 8 map of 16 x 64 x 64)."""
    return WholeStudyNet(
        lambda: ResNetEncoder(1, widths, layers, stem_kernel, no_max_pool, stem_stride, stages),
        img_size,
        n_series,
        n_meta,
        shared_encoder,
        WholeStudyHead.from_mapping(head),
    )


@register_model
def segresnet(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = False,
    head: HeadMapping = None,
    init_filters: int = 8,
    blocks_down: Sequence[int] = (1, 1, 1, 1),
) -> WholeStudyNet:
    """Whole-study net on MONAI SegResNet's encoder."""
    return WholeStudyNet(
        lambda: SegResNetEncoder(1, init_filters, blocks_down),
        img_size,
        n_series,
        n_meta,
        shared_encoder,
        WholeStudyHead.from_mapping(head),
    )


SWIN_HEAD = WholeStudyHead(pool_grid=(1, 1, 1))
"""swinunetr's head defaults: its stride-32 map of a 32 x 32 x 32 series is one cell."""


@register_model
def swinunetr(
    img_size: Sequence[int] = (32, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = True,
    head: HeadMapping = None,
    feature_size: int = 12,
    depths: Sequence[int] = (1, 1, 1, 1),
    num_heads: Sequence[int] = (1, 2, 4, 8),
    window_size: int = 4,
) -> WholeStudyNet:
    """Whole-study net on MONAI SwinUNETR's Swin transformer (sizes divisible by 32)."""
    return WholeStudyNet(
        lambda: SwinEncoder(1, img_size, feature_size, depths, num_heads, window_size),
        img_size,
        n_series,
        n_meta,
        shared_encoder,
        WholeStudyHead.from_mapping(head, SWIN_HEAD),
    )


@register_model
def dynunet(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = False,
    head: HeadMapping = None,
    filters: Sequence[int] = (8, 16, 32, 32),
    kernel_size: int = 3,
) -> WholeStudyNet:
    """Whole-study net on MONAI DynUNet's encoder path (residual blocks)."""
    return WholeStudyNet(
        lambda: DynUNetEncoder(1, filters, kernel_size),
        img_size,
        n_series,
        n_meta,
        shared_encoder,
        WholeStudyHead.from_mapping(head),
    )


@register_model
def vit(
    img_size: Sequence[int] = (16, 32, 32),
    n_series: int = 3,
    n_meta: int = 0,
    shared_encoder: bool = True,
    head: HeadMapping = None,
    patch_size: Sequence[int] = (8, 8, 8),
    hidden_size: int = 64,
    mlp_dim: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
) -> WholeStudyNet:
    """Whole-study net on MONAI ViT's patch tokens, folded back into a grid."""
    return WholeStudyNet(
        lambda: ViTEncoder(1, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads),
        img_size,
        n_series,
        n_meta,
        shared_encoder,
        WholeStudyHead.from_mapping(head),
    )
