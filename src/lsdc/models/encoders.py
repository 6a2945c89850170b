"""Adapters that turn MONAI networks into 3D encoders behind one interface.

Every adapter has ``in_chans``, ``num_features`` and ``forward_features(x) -> (B, C, d, h, w)``:
a feature map (not a pooled vector) so that a head can keep *where* a finding sits, since the
five levels lie at different heights of a series. Each adapter keeps only the encoder half of its
network: unused decoder weights would be dead parameters (and break DistributedDataParallel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, ViT
from monai.networks.nets.resnet import ResNet

from lsdc.errors import UserError


class Encoder(nn.Module):
    """Base class: a 3D network mapping (B, in_chans, D, H, W) to a feature map."""

    in_chans: int
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class ResNetEncoder(Encoder):
    """MONAI ``ResNet`` up to ``layer4`` (or an earlier stage).

    ``ResNet.forward`` with ``feed_forward=False`` returns globally pooled features, which lose
    the level positions, so the stem and the stages are run here directly. At the default total
    stride of 32 a 16 x 64 x 64 series ends as a 1 x 2 x 2 map: too coarse to tell five levels
    apart, so ``stem_stride`` (per axis), ``no_max_pool`` and ``stages`` (the later stages are
    dropped, not left as dead weights) trade compute for a finer map.
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        layers: Sequence[int] = (1, 1, 1, 1),
        stem_kernel: int = 7,
        no_max_pool: bool = False,
        stem_stride: int | Sequence[int] = 2,
        stages: int = 4,
    ) -> None:
        super().__init__()
        if not 1 <= int(stages) <= 4:
            raise UserError(f"resnet3d stages must be 1 to 4, got {stages}")
        self.net = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=3,
            n_input_channels=in_chans,
            conv1_t_size=stem_kernel,
            conv1_t_stride=stem_stride if isinstance(stem_stride, int) else tuple(stem_stride),
            no_max_pool=no_max_pool,
            feed_forward=False,
        )
        self.stages = int(stages)
        for name in ("layer1", "layer2", "layer3", "layer4")[self.stages :]:
            delattr(self.net, name)
        self.in_chans = in_chans
        self.num_features = int(widths[self.stages - 1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4")[: self.stages]:
            x = getattr(n, name)(x)
        return x


class SegResNetEncoder(Encoder):
    """MONAI ``SegResNet``'s ``encode()``: the bottleneck map after the last down-sampling stage."""

    def __init__(
        self, in_chans: int = 1, init_filters: int = 8, blocks_down: Sequence[int] = (1, 2, 2, 4)
    ) -> None:
        super().__init__()
        net = SegResNet(
            spatial_dims=3,
            init_filters=init_filters,
            in_channels=in_chans,
            out_channels=1,
            blocks_down=tuple(blocks_down),
            norm=("GROUP", {"num_groups": min(8, init_filters)}),
        )
        del net.up_layers, net.up_samples, net.conv_final
        self.net = net
        self.in_chans = in_chans
        self.num_features = init_filters * 2 ** (len(blocks_down) - 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode(x)[0]


class SwinEncoder(Encoder):
    """MONAI ``SwinUNETR``'s ``swinViT``: the deepest hidden state (stride 32).

    SwinUNETR needs every spatial size divisible by 32; the constructor refuses other sizes,
    rather than failing at the first batch.
    """

    def __init__(
        self,
        in_chans: int = 1,
        img_size: Sequence[int] = (32, 32, 32),
        feature_size: int = 12,
        depths: Sequence[int] = (1, 1, 1, 1),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        window_size: int = 4,
    ) -> None:
        super().__init__()
        if any(int(s) % 32 for s in img_size):
            raise UserError(
                f"swinunetr needs every volume size divisible by 32, got {tuple(img_size)}"
            )
        net = SwinUNETR(
            in_channels=in_chans,
            out_channels=1,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
        )
        self.swin = net.swinViT
        self.in_chans = in_chans
        self.num_features = 16 * feature_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(x, normalize=True)[4]


class DynUNetEncoder(Encoder):
    """MONAI ``DynUNet``'s input block, down-sampling path and bottleneck.

    The full ``DynUNet`` returns stacked deep-supervision outputs in training mode only; using
    the encoder path alone gives the same shape in both modes.
    """

    def __init__(
        self,
        in_chans: int = 1,
        filters: Sequence[int] = (8, 16, 32, 64),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        n = len(filters)
        strides = [1] + [2] * (n - 1)
        net = DynUNet(
            spatial_dims=3,
            in_channels=in_chans,
            out_channels=1,
            kernel_size=[kernel_size] * n,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(filters),
            res_block=True,
        )
        self.input_block = net.input_block
        self.downsamples = net.downsamples
        self.bottleneck = net.bottleneck
        self.in_chans = in_chans
        self.num_features = int(filters[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_block(x)
        for block in self.downsamples:
            x = block(x)
        return self.bottleneck(x)


class ViTEncoder(Encoder):
    """MONAI ``ViT`` without its classification head, tokens folded back into a grid.

    ``ViT.forward`` returns ``(x, hidden_states)``, and with ``classification=True`` adds a class
    token and a Tanh head; here classification is off and the patch tokens are reshaped to
    (B, hidden, D/p, H/p, W/p).
    """

    def __init__(
        self,
        in_chans: int = 1,
        img_size: Sequence[int] = (32, 32, 32),
        patch_size: Sequence[int] = (8, 8, 8),
        hidden_size: int = 64,
        mlp_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        if any(int(s) % int(p) for s, p in zip(img_size, patch_size, strict=True)):
            raise UserError(
                f"vit needs the volume size {tuple(img_size)} divisible by patch_size {tuple(patch_size)}"
            )
        self.vit = ViT(
            in_channels=in_chans,
            img_size=tuple(img_size),
            patch_size=tuple(patch_size),
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            classification=False,
        )
        # MONAI builds each block's cross-attention norm even without cross-attention: frozen,
        # so no parameter goes without a gradient (DDP refuses that) and checkpoints still load
        for block in self.vit.blocks:
            block.norm_cross_attn.requires_grad_(False)
        self.grid = tuple(int(s) // int(p) for s, p in zip(img_size, patch_size, strict=True))
        self.in_chans = in_chans
        self.num_features = hidden_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _hidden_states = self.vit(x)
        return tokens.transpose(1, 2).reshape(x.shape[0], self.num_features, *self.grid)
