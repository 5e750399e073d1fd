"""Issue 18: the trained DeepLabV3-MobileNetV2 in the repository, through `pspnet build` and
the daemon's own pre/postprocessing functions: real objects, the network recorded, its
align_corners honoured, fp16 judged on trained weights. Runs from a fresh clone (no
../shared needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pspnet.model.manifest import VOC_CLASSES, Manifest

PERSON, CAT, BIRD = (VOC_CLASSES.index(n) for n in ("person", "cat", "bird"))


def _daemon_labels(model_dir: Path, rgb: np.ndarray) -> np.ndarray:
    """The ONNX model between the preprocess and postprocess workers' own functions."""
    import onnxruntime as ort

    from pspnet.model.image_io import letterbox
    from pspnet.model.labels import labels_from_logits

    manifest = Manifest.read(model_dir)
    session = ort.InferenceSession(str(model_dir / manifest.model_file(1).onnx),
                                   providers=["CPUExecutionProvider"])
    padded, place = letterbox(rgb, manifest.input_size)
    logits = session.run(None, {"image": padded[None],
                                "box": np.asarray([place.box()], np.int32)})[0][0]
    return labels_from_logits(logits, place, manifest.input_size, manifest.align_corners)


def _share(labels: np.ndarray, k: int) -> float:
    return 100.0 * float((labels == k).mean())


def test_manifest_records_the_network(trained_model):
    manifest = Manifest.read(trained_model)
    assert manifest.network["family"] == "DeepLabV3"
    assert manifest.network["backbone"] == "MobileNetV2PerBlock"
    assert manifest.network["decode_head"] == "DeepLabV3MobileHead"
    assert "MobileNetV2" in manifest.network_name
    assert manifest.align_corners is True                  # the TF graph's resizes
    assert manifest.input_size == (257, 257) and manifest.logits_size == (33, 33)
    assert manifest.mean == (127.5,) * 3 and manifest.std == (127.5,) * 3


def test_a_manifest_without_the_network_field_still_reads(trained_model, tmp_path):
    """Manifests from before this field (all PSPNet) are read, the network unrecorded."""
    old = tmp_path / "old"
    shutil.copytree(trained_model, old)
    doc = json.loads((old / "manifest.json").read_text())
    del doc["network"]
    (old / "manifest.json").write_text(json.dumps(doc))
    manifest = Manifest.read(old)
    assert manifest.network == {} and manifest.network_name == "PSPNet (not recorded)"


def test_the_daemon_path_segments_real_objects(trained_model):
    """Astronaut -> person, Chelsea -> cat, and the bird photo as its reference map says."""
    from pspnet.build_model import trained
    from pspnet.build_model.samples import sample_images

    photos = dict(sample_images())
    astronaut = _daemon_labels(trained_model, photos["astronaut_500x375.jpg"])
    chelsea = _daemon_labels(trained_model, photos["chelsea_451x300.jpg"])
    photo, reference = trained.bird()
    bird = _daemon_labels(trained_model, photo)
    agreement = 100.0 * float((bird == reference).mean())
    bird_iou = 100.0 * np.logical_and(bird == BIRD, reference == BIRD).sum() \
        / np.logical_or(bird == BIRD, reference == BIRD).sum()
    print(f"FIGURE astronaut person {_share(astronaut, PERSON):.1f} %, chelsea cat "
          f"{_share(chelsea, CAT):.1f} %, bird agreement with its reference "
          f"{agreement:.2f} %, bird IoU {bird_iou:.1f}")
    objects = np.bincount(astronaut.ravel(), minlength=21)[1:]
    assert objects.argmax() + 1 == PERSON and _share(astronaut, PERSON) > 30
    assert _share(chelsea, CAT) > 50
    assert agreement > 95 and bird_iou > 80


def test_fp16_agrees_with_fp32_on_trained_weights(trained_model):
    """The whole network in half precision (torch on this CPU) against fp32: labels
    through the daemon's postprocess; the bird scored against its reference map."""
    from pspnet.build_model import trained
    from pspnet.build_model.samples import sample_images
    from studies.trained_model import letterboxed_labels, scores, serving

    manifest = Manifest.read(trained_model)
    photo, reference = trained.bird()
    shots = [rgb for name, rgb in sample_images() if name.startswith(("astronaut", "chelsea"))]
    shots.append(photo)
    labels = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = serving(trained_model, dtype)
        labels[precision] = [letterboxed_labels(model, manifest, rgb)[0] for rgb in shots]
    same = scores(labels["fp16"], labels["fp32"], manifest.num_classes)
    bird = {p: scores([labels[p][-1]], [reference], manifest.num_classes)["mIoU"]
            for p in labels}
    print(f"FIGURE fp16 vs fp32: {same['agreement_pct']:.3f} % of pixels agree on "
          f"{len(shots)} photos; bird mIoU vs its reference fp32 {bird['fp32']:.3f}, fp16 "
          f"{bird['fp16']:.3f}")
    assert same["agreement_pct"] >= 99.5
    assert abs(bird["fp32"] - bird["fp16"]) <= 0.1


def test_labels_follow_the_networks_align_corners():
    """The flag reaches both resizes of logits to the input size: ServingModel's labels
    head and the postprocess workers' labels_from_logits."""
    from pspnet.core.wire import Placement
    from pspnet.model.labels import labels_from_logits
    from pspnet.model.serving_model import ServingModel

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 5, 5, generator=generator)

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits.expand(x.shape[0], -1, -1, -1)

    image = torch.zeros(1, 33, 33, 3, dtype=torch.uint8)
    box = torch.tensor([[0, 0, 33, 33]], dtype=torch.int32)
    place = Placement(orig_h=33, orig_w=33, scale=1.0, top=0, left=0, height=33, width=33)
    for corners in (True, False):
        want = F.interpolate(logits, size=(33, 33), mode="bilinear",
                             align_corners=corners).argmax(1)[0].numpy()
        served = ServingModel(Fixed(), (0.0,) * 3, (1.0,) * 3, "labels",
                              align_corners=corners)(image, box)[0].numpy()
        post = labels_from_logits(logits[0].numpy(), place, (33, 33), corners)
        assert np.array_equal(served, want) and np.array_equal(post, want)
    differ = F.interpolate(logits, size=(33, 33), mode="bilinear", align_corners=True) \
        .argmax(1) != F.interpolate(logits, size=(33, 33), mode="bilinear").argmax(1)
    assert differ.any()                                  # so the flag is really tested


@pytest.mark.slow
def test_demo_shows_real_objects_and_writes_a_contact_sheet(tmp_path, capsys):
    """`pspnet demo` as a user runs it: build, serve, submit, report, picture."""
    from PIL import Image

    from pspnet.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    print(out)
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "person" in lines["astronaut_500x375.jpg"]
    assert lines["chelsea_451x300.jpg"].split()[1] == "cat"
    assert "agreement with its reference label map" in out
    assert "fidelity:   mIoU 100.00" in out or "fidelity:   mIoU 99.9" in out
    sheet = Path(out.split("contact sheet: ")[1].split()[0])
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.height > 10 * 150      # ten rows
