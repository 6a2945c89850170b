"""Stage 2 of the two-stage model: grade each of the 25 findings from a crop around its point.

Every crop (a few slices of a fixed field in mm, see ``lsdc.datasets.crops``) goes through one 2D
encoder slice by slice; the slice features are pooled by attention or a GRU, a learned embedding of
the crop's level is added, and one head per scoring group (spinal, foraminal, subarticular) gives
three logits. Right-sided crops arrive mirrored onto the left, so one set of weights grades both
sides and sees twice the examples. Input ``(B, 25, S, H, W)`` in ``LABEL_COLUMNS`` order, output
``(B, 25, 3)``: the engine's shape for every model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.nets import ResNet

from lsdc.contract import CONDITION_GROUP, CONDITIONS, LEVELS, N_CLASSES, N_LABELS
from lsdc.errors import UserError
from lsdc.models.registry import register_model

GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")

LABEL_GROUP: np.ndarray = np.array(
    [GROUPS.index(CONDITION_GROUP[c]) for c in CONDITIONS for _ in LEVELS], dtype=np.int64
)
"""Scoring-group index of each of the 25 label columns (which head grades it)."""

LABEL_LEVEL: np.ndarray = np.array([i for _ in CONDITIONS for i in range(len(LEVELS))])
"""Level index of each of the 25 label columns."""


class MonaiSliceEncoder(nn.Module):
    """A 2D MONAI ResNet without its classifier: ``(N, 1, H, W)`` -> ``(N, out_features)``."""

    def __init__(self, layers: Sequence[int], widths: Sequence[int]) -> None:
        super().__init__()
        self.net = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=True,
            feed_forward=False,
        )
        self.out_features = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TimmSliceEncoder(nn.Module):
    """Any timm backbone (offline: no pretrained download) as a one-channel slice encoder."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
        self.out_features = int(self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionPool(nn.Module):
    """Softmax-weighted mean over slices, weights from a small scoring MLP."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(features, features // 2 or 1), nn.Tanh())
        self.weight = nn.Linear(features // 2 or 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, F)`` -> ``(N, F)``."""
        attention = torch.softmax(self.weight(self.score(x)).squeeze(-1), dim=1)
        return (attention.unsqueeze(-1) * x).sum(dim=1)


class GRUPool(nn.Module):
    """A bidirectional GRU over the slice sequence, then the mean of its outputs."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gru = nn.GRU(features, features // 2, batch_first=True, bidirectional=True)
        self.out_features = 2 * (features // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return out.mean(dim=1)


class LevelGrader(nn.Module):
    """Slice encoder + slice pooling + level embedding (+ study context) + one 3-class head per
    scoring group.

    Args:
        backbone: ``"monai_resnet"`` or ``"timm:<name>"`` (needs timm installed).
        layers: residual blocks per stage of the MONAI ResNet.
        widths: channel widths per stage of the MONAI ResNet.
        pooling: ``"attention"`` or ``"gru"`` over slices.
        dropout: before the heads.
        context: mix into each crop's features the mean features of its level's other crops and
            of the whole study (a residual MLP). Degeneration is shared along a disc and a spine,
            so a crop whose own signal is subtle (a foramen) borrows evidence from clearer
            neighbours (the canal at the same disc), as a radiologist reading the study would.
    """

    def __init__(
        self,
        backbone: str = "monai_resnet",
        layers: Sequence[int] = (1, 1, 1, 1),
        widths: Sequence[int] = (16, 32, 64, 128),
        pooling: str = "attention",
        dropout: float = 0.1,
        context: bool = True,
    ) -> None:
        super().__init__()
        self.in_chans = 1
        self.num_classes = N_CLASSES
        if backbone == "monai_resnet":
            self.encoder: nn.Module = MonaiSliceEncoder(layers, widths)
        elif backbone.startswith("timm:"):
            if importlib.util.find_spec("timm") is None:
                raise UserError(f"backbone {backbone!r} needs timm, which is not installed")
            self.encoder = TimmSliceEncoder(backbone.split(":", 1)[1])
        else:
            raise UserError(f"unknown backbone {backbone!r}; use 'monai_resnet' or 'timm:<name>'")
        features = self.encoder.out_features
        if pooling == "attention":
            self.pool: nn.Module = AttentionPool(features)
            pooled = features
        elif pooling == "gru":
            self.pool = GRUPool(features)
            pooled = self.pool.out_features
        else:
            raise UserError(f"unknown pooling {pooling!r}; use 'attention' or 'gru'")
        self.num_features = pooled
        self.level_embedding = nn.Embedding(len(LEVELS), pooled)
        self.context = (
            nn.Sequential(nn.Linear(3 * pooled, pooled), nn.GELU(), nn.Linear(pooled, pooled))
            if context
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.Linear(pooled, len(GROUPS) * N_CLASSES)
        self.register_buffer("label_group", torch.as_tensor(LABEL_GROUP), persistent=False)
        self.register_buffer("label_level", torch.as_tensor(LABEL_LEVEL), persistent=False)

    def forward_features(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, L, S, H, W)`` crops -> pooled, level-embedded features ``(B, L, F)``."""
        b, n_labels, n_slices, h, w = crops.shape
        features = self.encoder(crops.reshape(b * n_labels * n_slices, 1, h, w))
        pooled = self.pool(features.view(b * n_labels, n_slices, -1)).view(b, n_labels, -1)
        levels = self.label_level[:n_labels]
        own = pooled + self.level_embedding(levels)
        if self.context is None:
            return own
        level_sum = own.new_zeros(b, len(LEVELS), own.shape[-1]).index_add(1, levels, own)
        level_count = torch.bincount(levels, minlength=len(LEVELS)).clamp(min=1).to(own.dtype)
        level_mean = (level_sum / level_count[None, :, None])[:, levels]
        study_mean = own.mean(dim=1, keepdim=True).expand_as(own)
        return own + self.context(torch.cat([own, level_mean, study_mean], dim=-1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, L, F)`` -> logits ``(B, L, 3)``, each label through its scoring group's head."""
        b, n_labels, _ = features.shape
        logits = self.heads(self.dropout(features)).view(b, n_labels, len(GROUPS), N_CLASSES)
        group = self.label_group[:n_labels].view(1, n_labels, 1, 1).expand(b, -1, 1, N_CLASSES)
        return logits.gather(2, group).squeeze(2)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, L, S, H, W)`` crops of the ``L`` = 25 label columns -> logits ``(B, L, 3)``."""
        return self.forward_head(self.forward_features(crops))

    def example_input(self, batch_size: int) -> tuple[torch.Tensor]:
        """25 crops of 3 slices of 16 x 16 pixels per study."""
        return (torch.randn(batch_size, N_LABELS, 3, 16, 16),)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, N_LABELS, N_CLASSES)


@register_model
def level_grader(
    backbone: str = "monai_resnet",
    layers: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (16, 32, 64, 128),
    pooling: str = "attention",
    dropout: float = 0.1,
    context: bool = True,
) -> LevelGrader:
    """Stage-2 crop grader (see :class:`LevelGrader`)."""
    return LevelGrader(
        backbone=backbone,
        layers=layers,
        widths=widths,
        pooling=pooling,
        dropout=dropout,
        context=context,
    )
