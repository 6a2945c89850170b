"""Stage 2 of the two-stage model: grade each of the 25 findings from a crop around its point.

Every crop (a few slices of a fixed field in mm, see ``lsdc.datasets.crops``) becomes one feature
vector through a crop encoder, which is what the grader names choose: ``level_grader`` runs a 2D
network (a MONAI ResNet or any timm model) on each slice and pools the slices by attention or a
GRU; ``level_grader_25d`` reads the slices as the channels of one image through a timm model
(2.5D); ``resnet3d`` and ``vit`` read the crop as one 3D volume (crop_slices x size x size). The rest is shared (:class:`LevelGrader`): a
learned embedding of the crop's level is added, each crop's features are mixed with those of its
level and its study (``context``), and one head per scoring group (spinal, foraminal,
subarticular) gives three logits. Right-sided crops arrive mirrored onto the left, so one set of
weights grades both sides and sees twice the examples. Input ``(B, 25, S, H, W)`` in
``LABEL_COLUMNS`` order, output ``(B, 25, 3)``: the engine's shape for every model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.networks.nets import ResNet

from lsdc.config import build_section
from lsdc.contract import CONDITION_GROUP, CONDITIONS, LEVELS, N_CLASSES, N_LABELS
from lsdc.errors import UserError
from lsdc.models.encoders import Encoder, ResNetEncoder, ViTEncoder
from lsdc.models.registry import register_model
from lsdc.models.timm_backbones import TIMM_PREFIX, create_timm, pooled_width, timm_name

GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")

LABEL_GROUP: np.ndarray = np.array(
    [GROUPS.index(CONDITION_GROUP[c]) for c in CONDITIONS for _ in LEVELS], dtype=np.int64
)
"""Scoring-group index of each of the 25 label columns (which head grades it)."""

MONAI_RESNET_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
MONAI_RESNET_LAYERS: tuple[int, ...] = (1, 1, 1, 1)
"""The 2D MONAI ResNet slice encoder's default stage widths and blocks per stage."""

LABEL_LEVEL: np.ndarray = np.array([i for _ in CONDITIONS for i in range(len(LEVELS))])
"""Level index of each of the 25 label columns."""


@dataclass(frozen=True)
class GraderHead:
    """The ``head`` mapping every grader takes (``model.params.head`` in a config).

    Attributes:
        dropout: before the per-group heads.
        context: mix into each crop's features the mean features of its level's crops and of the
            whole study (a residual MLP). Degeneration is shared along a disc and a spine, so a
            crop whose own signal is subtle (a foramen) borrows evidence from clearer neighbours
            (the canal at the same disc), as a radiologist reading the study would.
    """

    dropout: float = 0.1
    context: bool = True

    @classmethod
    def from_mapping(cls, head: Mapping[str, Any] | None) -> GraderHead:
        """Every key and type checked as a config key is (``model.params.head.KEY``)."""
        return build_section(cls, dict(head or {}), "model.params.head")


class AttentionPool(nn.Module):
    """Softmax-weighted mean over slices, weights from a small scoring MLP."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(features, features // 2 or 1), nn.Tanh())
        self.weight = nn.Linear(features // 2 or 1, 1)
        self.out_features = features

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


def slice_pooling(features: int, pooling: str) -> nn.Module:
    """The pooling over a crop's slices: ``"attention"`` or ``"gru"``; ``out_features`` set."""
    if pooling == "attention":
        return AttentionPool(features)
    if pooling == "gru":
        return GRUPool(features)
    raise UserError(
        f"config key 'model.params.pooling': unknown pooling {pooling!r}; use 'attention' or 'gru'"
    )


def timm_backbone(backbone: str, in_chans: int, pretrained: str | None) -> nn.Module:
    """A timm model (``backbone: timm:<name>``) as an encoder of ``in_chans``-channel images
    into pooled features (``num_classes=0``), initialised from the local file ``pretrained``."""
    name = timm_name(backbone, "model.params.backbone")
    return create_timm(
        name, "model.params", pretrained=pretrained, in_chans=in_chans, num_classes=0
    )


class SliceCropEncoder(nn.Module):
    """A 2D backbone on every slice of a crop, then pooled over slices: ``(N, S, H, W)`` ->
    ``(N, out_features)``.

    Args:
        backbone: ``"monai_resnet"`` (a 2D MONAI ResNet of ``layers`` x ``widths``, None: the
            defaults) or ``"timm:<name>"`` (any timm 2D model, one input channel; ``layers``
            and ``widths`` must then be None, so no config value sits unused).
        pooling: ``"attention"`` or ``"gru"`` over slices.
        pretrained: a local weights file for the timm backbone (:mod:`lsdc.models.timm_backbones`).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int] | None,
        widths: Sequence[int] | None,
        pooling: str,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if backbone == "monai_resnet":
            if pretrained is not None:
                raise UserError(
                    "config key 'model.params.pretrained' needs a timm backbone "
                    "(model.params.backbone: timm:<name>); a MONAI ResNet takes model.weights"
                )
            widths = tuple(widths or MONAI_RESNET_WIDTHS)
            self.net: nn.Module = ResNet(
                block="basic",
                layers=list(layers or MONAI_RESNET_LAYERS),
                block_inplanes=list(widths),
                spatial_dims=2,
                n_input_channels=1,
                conv1_t_size=3,
                conv1_t_stride=1,
                no_max_pool=True,
                feed_forward=False,
            )
            features = int(widths[-1])
        elif backbone.startswith(TIMM_PREFIX):
            for key, value in (("widths", widths), ("layers", layers)):
                if value is not None:
                    raise UserError(
                        f"config key 'model.params.{key}' sizes the MONAI ResNet backbone only; "
                        f"{backbone} has its own sizes: set model.params.{key}=null"
                    )
            self.net = timm_backbone(backbone, 1, pretrained)
            features = pooled_width(self.net)
        else:
            raise UserError(
                f"config key 'model.params.backbone': unknown backbone {backbone!r}; use "
                "'monai_resnet' or 'timm:<name>'"
            )
        self.pool = slice_pooling(features, pooling)
        self.out_features = int(self.pool.out_features)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        n, n_slices, h, w = crops.shape
        features = self.net(crops.reshape(n * n_slices, 1, h, w))
        return self.pool(features.view(n, n_slices, -1))


class ChannelCropEncoder(nn.Module):
    """2.5D: a timm 2D model reading a crop's slices as the channels of one image
    (``in_chans = crop_slices``; timm adapts a pretrained RGB stem): ``(N, S, H, W)`` ->
    ``(N, out_features)``. The first convolution already compares neighbouring slices, at the
    cost of one image per crop instead of one per slice."""

    def __init__(self, backbone: str, n_slices: int, pretrained: str | None = None) -> None:
        super().__init__()
        self.net = timm_backbone(backbone, n_slices, pretrained)
        self.out_features = pooled_width(self.net)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)


class VolumeCropEncoder(nn.Module):
    """A 3D encoder on the crop as one volume, its feature map averaged: ``(N, S, H, W)`` ->
    ``(N, out_features)``. The slices are one depth axis, so the network sees across them from
    its first layer instead of pooling independent slice features at the end."""

    def __init__(self, net: Encoder) -> None:
        super().__init__()
        self.net = net
        self.out_features = int(net.num_features)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(crops.unsqueeze(1)).mean(dim=(2, 3, 4))


class LevelGrader(nn.Module):
    """Crop encoder + level embedding (+ level and study context) + one 3-class head per scoring
    group.

    Args:
        encoder: crops ``(N, S, H, W)`` -> ``(N, out_features)``.
        crop_shape: (S, H, W) of every crop (the task's ``crop_slices``, ``crop_size``).
        head: dropout and context (:class:`GraderHead`).
    """

    def __init__(self, encoder: nn.Module, crop_shape: Sequence[int], head: GraderHead) -> None:
        super().__init__()
        self.in_chans = 1
        self.num_classes = N_CLASSES
        self.crop_shape = tuple(int(s) for s in crop_shape)
        self.encoder = encoder
        features = int(encoder.out_features)
        self.num_features = features
        self.level_embedding = nn.Embedding(len(LEVELS), features)
        self.context = (
            nn.Sequential(
                nn.Linear(3 * features, features), nn.GELU(), nn.Linear(features, features)
            )
            if head.context
            else None
        )
        self.dropout = nn.Dropout(head.dropout)
        self.heads = nn.Linear(features, len(GROUPS) * N_CLASSES)
        self.register_buffer("label_group", torch.as_tensor(LABEL_GROUP), persistent=False)
        self.register_buffer("label_level", torch.as_tensor(LABEL_LEVEL), persistent=False)

    def forward_features(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, L, S, H, W)`` crops -> encoded, level-embedded features ``(B, L, F)``."""
        b, n_labels = crops.shape[:2]
        encoded = self.encoder(crops.flatten(0, 1)).view(b, n_labels, -1)
        levels = self.label_level[:n_labels]
        own = encoded + self.level_embedding(levels)
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
        """25 crops of ``crop_shape`` per study."""
        return (torch.randn(batch_size, N_LABELS, *self.crop_shape),)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, N_LABELS, N_CLASSES)


HeadMapping = Mapping[str, Any] | None
"""A grader's ``head`` argument: keys of :class:`GraderHead` (None: its defaults)."""


@register_model(role="grader")
def level_grader(
    crop_shape: Sequence[int] = (3, 16, 16),
    head: HeadMapping = None,
    backbone: str = "monai_resnet",
    layers: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    pooling: str = "attention",
    pretrained: str | None = None,
) -> LevelGrader:
    """The default grader: a 2D network on every crop slice, pooled over slices
    (:class:`SliceCropEncoder`): a MONAI ResNet of ``widths`` x ``layers`` (None: the defaults
    ``MONAI_RESNET_WIDTHS`` x ``MONAI_RESNET_LAYERS``), or any timm model (``backbone:
    timm:<name>``, initial weights from the local file ``pretrained``)."""
    encoder = SliceCropEncoder(backbone, layers, widths, pooling, pretrained)
    if backbone.startswith(TIMM_PREFIX):
        _check_crop_fits(encoder, backbone, crop_shape)
    return LevelGrader(encoder, crop_shape, GraderHead.from_mapping(head))


@register_model(role="grader")
def level_grader_25d(
    crop_shape: Sequence[int] = (3, 16, 16),
    head: HeadMapping = None,
    backbone: str = "timm:test_resnet",
    pretrained: str | None = None,
) -> LevelGrader:
    """2.5D: a timm model reading each crop's slices as its input channels
    (:class:`ChannelCropEncoder`; ``in_chans`` = ``crop_slices``, a pretrained RGB stem adapted
    by timm). The default backbone is timm's smallest test ResNet; name a real one."""
    encoder = ChannelCropEncoder(backbone, int(crop_shape[0]), pretrained)
    _check_crop_fits(encoder, backbone, crop_shape)
    return LevelGrader(encoder, crop_shape, GraderHead.from_mapping(head))


def _check_crop_fits(encoder: nn.Module, backbone: str, crop_shape: Sequence[int]) -> None:
    """Refuse a crop too small for a timm network's down-sampling (a ConvNeXt's unpadded
    stride-2 convolutions need 32 px) now, in one line, rather than at the first batch."""
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, *(int(s) for s in crop_shape)))
    except RuntimeError as exc:
        raise UserError(
            f"config key 'task_params.crop_size': {backbone} cannot read a crop of "
            f"{tuple(crop_shape)[1:]} px ({str(exc).splitlines()[0]}); use a larger crop"
        ) from exc
    encoder.train()


@register_model(role="grader")
def resnet3d(
    crop_shape: Sequence[int] = (3, 16, 16),
    head: HeadMapping = None,
    layers: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (16, 32, 64, 128),
) -> LevelGrader:
    """A 3D MONAI ResNet on the crop volume: a 3-voxel stem of stride 1 and no max pool (a crop is
    only a few slices deep), then four stages of ``widths``, each after the first halving every
    axis; the map is averaged."""
    return LevelGrader(
        VolumeCropEncoder(
            ResNetEncoder(
                1, widths, layers, stem_kernel=3, no_max_pool=True, stem_stride=1, stages=4
            )
        ),
        crop_shape,
        GraderHead.from_mapping(head),
    )


@register_model(role="grader")
def vit(
    crop_shape: Sequence[int] = (3, 16, 16),
    head: HeadMapping = None,
    patch_size: Sequence[int] = (1, 8, 8),
    hidden_size: int = 64,
    mlp_dim: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
) -> LevelGrader:
    """A MONAI ViT on the crop volume, its patch tokens averaged. The default patch is one slice
    deep, so any ``crop_slices`` works and attention mixes the slices; ``crop_size`` must be a
    multiple of the in-plane patch."""
    if any(int(s) % int(p) for s, p in zip(crop_shape, patch_size, strict=True)):
        raise UserError(
            f"vit grader: the crop (crop_slices, crop_size, crop_size) = {tuple(crop_shape)} is "
            f"not divisible by patch_size {tuple(patch_size)}"
        )
    return LevelGrader(
        VolumeCropEncoder(
            ViTEncoder(1, crop_shape, patch_size, hidden_size, mlp_dim, num_layers, num_heads)
        ),
        crop_shape,
        GraderHead.from_mapping(head),
    )
