"""mmseg networks other than PSPNet, as a user's config brings them: what the build takes
(the dataset's colours, a LayerNorm network without the opset-13 copy) and what it
refuses in one line (cascaded heads, a sigmoid head), and the note on 'slide' testing."""

from __future__ import annotations

import logging
import types

import torch
from mmengine.config import Config
from torch import nn

from pspnet.build_model import mmseg_model
from pspnet.model.manifest import Manifest
from tests.build_model.test_artifacts import ToyCore, _write


def _segmentor(head: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(decode_head=head)


def test_cascaded_heads_and_a_sigmoid_head_are_refused_in_one_line():
    """OCRNet and PointRend (CascadeEncoderDecoder: a ModuleList of heads) crashed the
    build with an AttributeError; a binary head with out_channels=1 was refused as a
    logits shape mismatch. Each is now named, with why."""
    class FCNHead(nn.Module):
        num_classes, out_channels = 21, 21

    class OCRHead(FCNHead):
        pass

    cascade = _segmentor(nn.ModuleList([FCNHead(), OCRHead()]))
    why = mmseg_model.unsupported(cascade)
    assert why is not None and "cascaded decode heads (FCNHead -> OCRHead)" in why
    sigmoid = _segmentor(types.SimpleNamespace(num_classes=2, out_channels=1))
    why = mmseg_model.unsupported(sigmoid)
    assert why is not None and "out_channels=1 for 2 classes" in why and "\n" not in why
    assert mmseg_model.unsupported(_segmentor(FCNHead())) is None


def test_the_palette_is_the_datasets_and_slide_testing_is_named():
    """Cityscapes' and ADE20K's masks were drawn in VOC's colours; a config that tests
    in 'slide' mode was served whole without a word."""
    mmseg_model.import_mmseg()                   # (its shim for mmcv's compiled ops first)
    cfg = Config(dict(model=dict(test_cfg=dict(mode="slide", crop_size=(769, 769),
                                               stride=(513, 513))),
                      test_dataloader=dict(dataset=dict(type="CityscapesDataset"))))
    palette = mmseg_model.config_palette(cfg, 19)
    assert palette is not None and len(palette) == 19
    assert palette[0] == (128, 64, 128)                        # Cityscapes' road
    assert mmseg_model.config_palette(cfg, 21) is None         # not one per class
    names = mmseg_model.config_class_names(cfg, 19)
    assert names is not None and names[:2] == ("road", "sidewalk")
    note = mmseg_model.test_mode(cfg)
    assert note is not None and "'slide' mode (crop (769, 769), stride (513, 513))" in note
    assert mmseg_model.test_mode(Config(dict(model=dict(test_cfg=dict(mode="whole"))))) \
        is None


class LayerNormCore(ToyCore):
    """ToyCore with a LayerNorm over channels, as a transformer's blocks have."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(21)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return self.norm(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_network_the_atc_opset_cannot_hold_still_builds(tmp_path, caplog):
    """SegFormer's LayerNormalization does not exist at opset 13: the default build
    failed, even for onnxruntime and torch users who never run ATC. Now the ATC scripts
    read the opset-18 files (CANN 7/8), with a warning that says why; nothing half
    written is left."""
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = _write(LayerNormCore().eval(), out, run_atc=False, torch_program=False)
    assert "LayerNormalization does not exist at opset 13" in caplog.text
    assert manifest.atc_opset == 18 and Manifest.read(out).atc_opset == 18
    for n, files in manifest.models.items():
        assert files.atc_onnx is None
        assert f"--model={files.onnx} " in (out / files.atc).read_text()
        assert not list(out.glob(f"pspnet_bs{n}_opset*.onnx"))
