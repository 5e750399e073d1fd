"""The real architecture: PSPNet R50-D8 (mmseg's VOC config) at 500x500, batch 1.

Weights are calibrated, not trained (no download here), saved in the official checkpoint
layout with the auxiliary head, then built exactly as `pspnet build` would -- BN folded and
the PSP bottleneck rewritten, its defaults, and the ATC's opset-13 copy -- and compared with
mmseg's eager model on one real photo: the rewrites must leave the network the same function
(max |logit diff| <= 1e-4 in float32, every label the same). Slow: R50 at 500x500 is
seconds per forward on this CPU; calibration runs at 256x256 on three photos to stay within
a few minutes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from pspnet.build_model.calibrate import make_calibrated_checkpoint
from pspnet.build_model.export import build
from pspnet.build_model.inputs import box_masks, letterboxed_batch, normalised_batch
from pspnet.build_model.network import load_network
from pspnet.build_model.verify import eager_logits, upsampled_labels, verify_model_dir
from tests.photos import sample_photos

R50 = "pspnet_r50-d8_4xb4-20k_voc12aug-512x512"
SIZE = 500
EXACT_LOGITS = 1e-4
R50_GMAC = 172.7            # ../shared/reference/pipeline-notes.md, counted analytically


@pytest.mark.slow
def test_r50_builds_and_matches_eager_mmseg(tmp_path):
    checkpoint = make_calibrated_checkpoint(R50, tmp_path / "pspnet_r50.pth", input_size=256,
                                            max_photos=3)
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"}
    assert any(k.startswith("auxiliary_head.") for k in ckpt["state_dict"])
    del ckpt

    out = tmp_path / "model"
    manifest = build(R50, checkpoint, out, batch_sizes=(1,), input_size=SIZE, head="logits",
                     run_atc=False)
    assert manifest.logits_size == (63, 63)
    assert manifest.num_classes == 21
    assert manifest.source["checkpoint_dropped_keys"] == 8
    assert manifest.source["checkpoint_missing_keys"] == 0
    assert manifest.torch_program == "pspnet_core.pt2"
    assert (out / "pspnet_bs1.onnx").stat().st_size > 150e6      # weights inside, one file
    assert not (out / "pspnet_bs1.onnx.data").exists()

    rewrites = manifest.rewrites
    macs = rewrites["macs_per_image"]
    print(f"FIGURE R50-D8 {SIZE}x{SIZE}: {macs['network'] / 1e9:.2f} GMAC per image before "
          f"the rewrites, {macs['built'] / 1e9:.2f} after "
          f"({100 * (1 - macs['built'] / macs['network']):.1f} % less); "
          f"BN folded: {rewrites['bn_fold']['folded']}")
    assert abs(macs["network"] / 1e9 - R50_GMAC) < 0.1
    assert macs["built"] < 0.8 * macs["network"]                  # 37.5 GMAC moved, ~1 added
    assert rewrites["bn_fold"]["folded"] >= 60                    # every BN of R50 + head
    assert rewrites["psp_bottleneck"]["feature_size"] == [63, 63]

    network = load_network(R50, checkpoint)
    photo = dict(sample_photos())["grace_hopper"]
    images, boxes = letterboxed_batch([photo], (SIZE, SIZE))
    x = normalised_batch(images, boxes, network.mean, network.std)
    eager = eager_logits(network.segmentor, x)
    results = verify_model_dir(out, network.segmentor, [photo], eager=eager,
                               tie_tolerance=EXACT_LOGITS)
    assert {r.artifact for r in results} == {"pspnet_bs1.onnx", "pspnet_bs1_opset13.onnx",
                                             "pspnet_core.pt2"}
    atc_onnx = onnx.load(str(out / "pspnet_bs1_opset13.onnx"), load_external_data=False)
    print("FIGURE pspnet_bs1_opset13.onnx opset_import:",
          [(o.domain, o.version) for o in atc_onnx.opset_import])
    assert [(o.domain, o.version) for o in atc_onnx.opset_import] == [("", 13)]
    print("FIGURE ATC script:\n" + (out / "pspnet_bs1.atc.sh").read_text())
    for r in results:
        print("FIGURE", r.line())
        assert r.max_logit_diff <= EXACT_LOGITS, r.line()
        # every label the same except float32 ties (these calibrated weights have ~1e-4 of
        # pixels within 2e-4 of a tie; the build without rewrites flips as many of them)
        assert r.decided_agreement == 1.0, r.line()
        assert r.label_agreement >= 0.99999, r.line()

    labels = upsampled_labels(eager, (SIZE, SIZE))[0]
    distinct = np.unique(labels[box_masks(boxes, (SIZE, SIZE))[0]])
    print("distinct classes on the parity photo:", len(distinct))
    assert len(distinct) >= 5
