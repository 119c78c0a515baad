"""The U-Net of seed 001 §2.1 (and seed 004 §2.3's variant), built from a :class:`NetworkSpec`.

Encoder: per stage two conv -> instance norm -> leaky ReLU blocks; between stages max pooling
(seed 001) or a strided first convolution (seed 004). Optionally residual blocks.
Decoder: transposed-convolution up-sampling, skip concatenation, two conv blocks. Outputs: a 1x1
head at full resolution plus ``deep_supervision_heads`` heads on the next decoder levels.

Seed 004 §3.3 ablation switches (all off by default, adding no modules then):

* ``residual_encoder`` / ``residual_decoder``: :class:`ResidualBlock` instead of
  :class:`PlainBlock` in the encoder stages / decoder levels (Fig. 6b).
* ``attention_gates``: an :class:`~autounet.networks.attention.AttentionGate` per decoder level
  multiplies the skip features before the concatenation; the gating signal is the up-sampled
  decoder map (output of the transposed convolution).
* ``drop_block_prob > 0``: a :class:`~autounet.networks.dropblock.DropBlock` after every leaky
  ReLU of the encoder and decoder conv blocks (in a residual block: after the first unit's
  activation and after the activation that follows the addition). Not on the up-sampling, gates
  or heads. NVIDIA's public code puts it between conv and norm instead; here it comes after the
  activation so that instance norm cannot refill the dropped blocks.

nnU-Net v2's residual encoder (``encoder_blocks_per_stage``, the ResEnc presets): a stem
conv -> norm -> leaky ReLU, then per stage that many :class:`BasicResidualBlock` (the first of a
stage strided); the decoder has ``decoder_convs_per_stage`` conv blocks per level.
"""

from __future__ import annotations

import torch
from torch import nn

from autounet.networks.attention import AttentionGate
from autounet.networks.dropblock import DropBlock
from autounet.networks.spec import NetworkSpec


def _conv(dims: int):
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(dims: int, channels: int) -> nn.Module:
    return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, eps=1e-5, affine=True)


def _drop_block(drop_block: tuple[float, int] | None) -> list[nn.Module]:
    return [DropBlock(*drop_block)] if drop_block else []


class ConvNormAct(nn.Sequential):
    """conv -> instance norm -> leaky ReLU (-> DropBlock when ``drop_block = (prob, size)``)."""

    def __init__(
        self,
        dims: int,
        cin: int,
        cout: int,
        kernel: list[int],
        stride: list[int],
        slope: float,
        act: bool = True,
        drop_block: tuple[float, int] | None = None,
    ):
        layers = [
            _conv(dims)(cin, cout, kernel_size=kernel, stride=stride, padding=[k // 2 for k in kernel]),
            _norm(dims, cout),
        ]
        if act:
            layers += [nn.LeakyReLU(slope, inplace=True), *_drop_block(drop_block)]
        super().__init__(*layers)


class PlainBlock(nn.Sequential):
    """``convs`` (two by default) conv -> norm -> leaky ReLU; the first may be strided."""

    def __init__(
        self,
        dims: int,
        cin: int,
        cout: int,
        kernel: list[int],
        stride: list[int],
        slope: float,
        drop_block: tuple[float, int] | None = None,
        convs: int = 2,
    ):
        super().__init__(
            ConvNormAct(dims, cin, cout, kernel, stride, slope, drop_block=drop_block),
            *(
                ConvNormAct(dims, cout, cout, kernel, [1] * dims, slope, drop_block=drop_block)
                for _ in range(convs - 1)
            ),
        )


class BasicResidualBlock(nn.Module):
    """The residual unit of nnU-Net v2's ResEnc encoder: conv-norm-act, conv-norm, plus the input
    (average-pooled when the block is strided, projected by a 1x1 conv and norm when the channels
    change), then act."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: list[int], stride: list[int], slope: float):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(dims, cin, cout, kernel, stride, slope),
            ConvNormAct(dims, cout, cout, kernel, [1] * dims, slope, act=False),
        )
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
            skip.append(pool(kernel_size=stride, stride=stride))
        if cin != cout:
            skip += [_conv(dims)(cin, cout, kernel_size=1, bias=False), _norm(dims, cout)]
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.act = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResidualStage(nn.Sequential):
    """``blocks`` :class:`BasicResidualBlock` of one encoder stage; the first one strided."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: list[int], stride: list[int], slope: float, blocks: int):
        super().__init__(
            BasicResidualBlock(dims, cin, cout, kernel, stride, slope),
            *(BasicResidualBlock(dims, cout, cout, kernel, [1] * dims, slope) for _ in range(blocks - 1)),
        )


class ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, plus a (projected) identity, then act (seed 004 Fig. 6b)."""

    def __init__(
        self,
        dims: int,
        cin: int,
        cout: int,
        kernel: list[int],
        stride: list[int],
        slope: float,
        drop_block: tuple[float, int] | None = None,
    ):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(dims, cin, cout, kernel, stride, slope, drop_block=drop_block),
            ConvNormAct(dims, cout, cout, kernel, [1] * dims, slope, act=False),
        )
        needs_projection = cin != cout or any(s != 1 for s in stride)
        self.skip = (
            nn.Sequential(_conv(dims)(cin, cout, kernel_size=stride, stride=stride, bias=False), _norm(dims, cout))
            if needs_projection
            else nn.Identity()
        )
        self.act = nn.LeakyReLU(slope, inplace=True)
        self.drop_block = DropBlock(*drop_block) if drop_block else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.body(x) + self.skip(x))
        return out if self.drop_block is None else self.drop_block(out)


class UNet(nn.Module):
    def __init__(self, spec: NetworkSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        d, f, slope = spec.dims, spec.features_per_stage, spec.negative_slope
        ones = [1] * d
        drop = (spec.drop_block_prob, spec.drop_block_size) if spec.drop_block_prob > 0 else None
        self.pools = nn.ModuleList()
        self.encoder = nn.ModuleList()
        block = ResidualBlock if spec.residual_encoder else PlainBlock
        blocks = spec.encoder_blocks_per_stage
        if blocks:  # nnU-Net v2's residual encoder: a stem, then residual stages
            self.stem = ConvNormAct(d, spec.in_channels, f[0], spec.conv_kernel_sizes[0], ones, slope)
        for s in range(spec.num_stages):
            cin = spec.in_channels if s == 0 else f[s - 1]
            stride = ones
            if s > 0:
                kernel = spec.pool_kernel_sizes[s - 1]
                if spec.downsampling == "pool":
                    self.pools.append((nn.MaxPool3d if d == 3 else nn.MaxPool2d)(kernel_size=kernel, stride=kernel))
                else:
                    self.pools.append(nn.Identity())
                    stride = kernel
            if blocks:
                cin = f[0] if s == 0 else cin
                self.encoder.append(ResidualStage(d, cin, f[s], spec.conv_kernel_sizes[s], stride, slope, blocks[s]))
            else:
                self.encoder.append(block(d, cin, f[s], spec.conv_kernel_sizes[s], stride, slope, drop))
        transposed = nn.ConvTranspose3d if d == 3 else nn.ConvTranspose2d
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        block = ResidualBlock if spec.residual_decoder else PlainBlock
        for s in range(spec.num_stages - 2, -1, -1):  # decoder level s joins encoder stage s
            k = spec.pool_kernel_sizes[s]
            self.upsample.append(transposed(f[s + 1], f[s], kernel_size=k, stride=k))
            if spec.residual_decoder:
                self.decoder.append(block(d, 2 * f[s], f[s], spec.conv_kernel_sizes[s], ones, slope, drop))
            else:
                convs = spec.decoder_convs_per_stage
                self.decoder.append(PlainBlock(d, 2 * f[s], f[s], spec.conv_kernel_sizes[s], ones, slope, drop, convs))
        if spec.attention_gates:  # same order as the decoder: deepest level first
            self.attention = nn.ModuleList(AttentionGate(d, f[s], f[s]) for s in range(spec.num_stages - 2, -1, -1))
        conv = _conv(d)
        levels = 1 + spec.deep_supervision_heads if spec.num_stages > 1 else 1
        self.heads = nn.ModuleList(conv(f[level], spec.num_outputs, kernel_size=1) for level in range(levels))
        if spec.he_init:
            self.apply(he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits at full resolution; in training mode with deep supervision, a list
        ``[full resolution, next level, ...]``."""
        wanted = len(self.heads) if self.training else 1
        _, outputs = self._trunk(x, wanted)
        if self.training and len(self.heads) > 1:
            return [outputs[level] for level in range(len(self.heads))]
        return outputs[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution decoder features that the head (``heads[0]``, a 1x1 convolution)
        maps to logits: in eval mode ``forward(x)`` is ``heads[0](features(x))``. For engines
        that run the network in bf16 and the head apart in float32 (:class:`NetworkBody`)."""
        return self._trunk(x, 0)[0]

    def _trunk(self, x: torch.Tensor, wanted: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Encoder and decoder: the last features, and the logits of the ``wanted`` finest heads."""
        skips = []
        if self.spec.encoder_blocks_per_stage:
            x = self.stem(x)
        for s, block in enumerate(self.encoder):
            if s > 0:
                x = self.pools[s - 1](x)
            x = block(x)
            skips.append(x)
        outputs = {}
        n = self.spec.num_stages
        for i, (up, block) in enumerate(zip(self.upsample, self.decoder)):
            level = n - 2 - i
            x, skip = up(x), skips[level]
            if self.spec.attention_gates:
                skip = self.attention[i](skip, x)
            x = block(torch.cat([x, skip], dim=1))
            if level < wanted:
                outputs[level] = self._head(level, x)
        if n == 1 and wanted:
            outputs[0] = self._head(0, x)
        return x, outputs

    def _head(self, level: int, x: torch.Tensor) -> torch.Tensor:
        # Predicting under autocast, the 1x1 head runs in float32 on the (upcast) features: bf16
        # logits would be rounded before the argmax (10.0 vs 10.03 would tie). Training, and a
        # float32 run (ONNX export included), take the plain path.
        if self.training or not torch.is_autocast_enabled(x.device.type):
            return self.heads[level](x)
        with torch.autocast(x.device.type, enabled=False):
            return self.heads[level](x.float())


class NetworkBody(nn.Module):
    """A :class:`UNet` without its head: ``body(x)`` is ``unet.features(x)``. What a converted
    engine runs, so that the head (``unet.heads[0]``) and the softmax stay in float32 whatever
    precision the engine computes in (bf16 logits would be rounded before the argmax)."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet.features(x)


def he_init(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """Kaiming (He) normal initialisation for convolutions, zero biases (seed 004 §3.2)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
