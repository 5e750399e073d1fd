"""Two mmseg modules for DeepLabV3 on MobileNetV2 as TensorFlow's model zoo trained it.

Why: mmseg 1.2.2 has the parts but not this network. Its `MobileNetV2` rounds channels to
multiples of 8 (TF's width-0.5 net has 12 and 72 in stage 2) and dilates only a stage's
first block, while TF dilates blocks one by one (an output-stride-8 MobileNetV2: stage 4
blocks 1,2,2,2 ...). Its `ASPPHead` has a 3x3 bottleneck where this head has a 1x1
projection. So: `MobileNetV2PerBlock` (mmseg's MobileNetV2 with every stage's channels and
every block's dilation given) and `DeepLabV3MobileHead` (mmseg's ASPPHead with a 1x1
bottleneck). Both keep mmseg's module and state-dict layout. A config names this module in
`custom_imports`, so loading the config registers them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pspnet.build_model.mmseg_model import import_mmseg

import_mmseg()

from mmcv.cnn import ConvModule  # noqa: E402 - after the shim that mmseg needs
from mmseg.models.backbones import MobileNetV2  # noqa: E402
from mmseg.models.decode_heads import ASPPHead  # noqa: E402
from mmseg.models.utils import InvertedResidual  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from torch import nn  # noqa: E402


@MODELS.register_module(force=True)
class MobileNetV2PerBlock(MobileNetV2):
    """mmseg's MobileNetV2 with explicit channels per stage and dilation per block.

    stage_channels: output channels of the 7 stages (no rounding applied);
    block_dilations: one tuple per stage, one dilation per block of it (the depthwise
    3x3's dilation and padding, so every block keeps its size). `strides`, the stem
    (`widen_factor`) and everything else are mmseg's.
    """

    def __init__(self, stage_channels: Sequence[int],
                 block_dilations: Sequence[Sequence[int]], **kwargs) -> None:
        blocks = [n for _, _, n in self.arch_settings]
        if len(stage_channels) != len(blocks):
            raise ValueError(f"stage_channels needs {len(blocks)} values, "
                             f"got {len(stage_channels)}")
        got = [len(d) for d in block_dilations]
        if got != blocks:
            raise ValueError(f"block_dilations needs {blocks} values per stage, got {got}")
        self.stage_channels = tuple(int(c) for c in stage_channels)
        self.block_dilations = tuple(tuple(int(d) for d in ds) for ds in block_dilations)
        super().__init__(**kwargs)

    def make_layer(self, out_channels: int, num_blocks: int, stride: int, dilation: int,
                   expand_ratio: int) -> nn.Sequential:
        stage = len(self.layers)            # mmseg's __init__ appends after each call
        out_channels = self.stage_channels[stage]
        layers = []
        for i, block_dilation in enumerate(self.block_dilations[stage]):
            layers.append(InvertedResidual(
                self.in_channels, out_channels, stride if i == 0 else 1,
                expand_ratio=expand_ratio, dilation=block_dilation,
                conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg,
                with_cp=self.with_cp))
            self.in_channels = out_channels
        return nn.Sequential(*layers)


@MODELS.register_module(force=True)
class DeepLabV3MobileHead(ASPPHead):
    """ASPPHead whose bottleneck (the projection of the concatenated branches) is 1x1.

    With `dilations=(1,)`: image pooling (global average -> 1x1 conv -> ReLU -> resized
    back) and one 1x1 branch, concatenated in that order, a 1x1 projection, conv_seg.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bottleneck = ConvModule(
            (len(self.dilations) + 1) * self.channels, self.channels, 1,
            conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
