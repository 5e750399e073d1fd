"""`--verify`: do the exported models compute what mmseg's own eager model computes?

Runs onnxruntime on the sample photos (letterboxed by `pspnet.model.image_io.letterbox`, the
daemon's own function), on the ONNX models and on the ATC scripts' converted copies, and
compares with mmseg's `EncoderDecoder` in tensor mode on the equivalent float input,
normalised and zero-padded by an independent numpy implementation
(`pspnet.build_model.inputs`). Logits heads compare logits (max |diff|) and the labels of the
upsampled logits; labels heads compare labels. Agreement is over the valid (unpadded)
pixels. The torch program is checked against the same eager logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pspnet.build_model.inputs import box_masks, letterboxed_batch, normalised_batch
from pspnet.model.manifest import Manifest

LOGIT_TOLERANCE = 1e-3
LABEL_AGREEMENT = 0.999
EAGER_CHUNK = 4
_log = logging.getLogger(__name__)


class VerifyError(Exception):
    """The exported models disagree with the eager model beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    artifact: str                     # file checked
    images: int
    max_logit_diff: float | None      # None for a labels head
    label_agreement: float            # fraction of valid pixels with the same label
    # the same over the pixels a logit error of at most `tie_tolerance` cannot flip (see
    # decided_pixels), and how many valid pixels are ties at that tolerance; None for labels
    decided_agreement: float | None = None
    ties: int | None = None
    tie_tolerance: float = LOGIT_TOLERANCE

    def ok(self, logit_tol: float = LOGIT_TOLERANCE, agreement: float = LABEL_AGREEMENT) -> bool:
        logits_ok = self.max_logit_diff is None or self.max_logit_diff <= logit_tol
        return logits_ok and self.label_agreement >= agreement

    def line(self) -> str:
        diff = self.max_logit_diff
        diff = "" if diff is None else f"max |logit diff| {diff:.2e}, "
        ties = "" if self.ties is None else (
            f" ({100 * self.decided_agreement:.3f}% outside the {self.ties} pixels whose "
            f"top-2 logits are within {2 * self.tie_tolerance:g})")
        return (f"{self.artifact}: {self.images} images, {diff}"
                f"label agreement {100 * self.label_agreement:.4f}%{ties}")


def verify_model_dir(
    model_dir: Path,
    segmentor: nn.Module,
    photos: Sequence[np.ndarray] | None = None,
    *,
    batch_sizes: Sequence[int] | None = None,
    torch_program: bool = True,
    eager: np.ndarray | None = None,
    tie_tolerance: float = LOGIT_TOLERANCE,
) -> list[Parity]:
    """Compare the ONNX models (`batch_sizes`, default all; () for none) and the torch
    program with `segmentor` on `photos` (default: the package's sample images).
    `eager`: the segmentor's logits on these photos when the caller has them already;
    `tie_tolerance`: the logit error under which a pixel's label counts as a tie."""
    from pspnet.build_model.samples import sample_images

    manifest = Manifest.read(model_dir)
    if photos is None:
        photos = [rgb for _, rgb in sample_images()]
    images, boxes = letterboxed_batch(photos, manifest.input_size)
    x = normalised_batch(images, boxes, manifest.mean, manifest.std)
    valid = box_masks(boxes, manifest.input_size)
    _log.info("verifying against eager mmseg on %d photos", len(photos))
    eager = eager_logits(segmentor, x) if eager is None else eager
    eager_labels = upsampled_labels(eager, manifest.input_size, manifest.align_corners)
    results = []
    for n in manifest.batch_sizes if batch_sizes is None else batch_sizes:
        files = manifest.model_file(n)
        # the onnxruntime model, then the ATC script's own ONNX where it is a converted copy
        for name in filter(None, (files.onnx, files.atc_onnx)):
            got = run_onnx(Path(model_dir) / name, images, boxes, n)
            results.append(_compare(name, manifest, got, eager, eager_labels, valid,
                                    tie_tolerance))
            _log.info("%s", results[-1].line())
    if torch_program and manifest.torch_program:
        program = torch.export.load(str(Path(model_dir) / manifest.torch_program)).module()
        with torch.no_grad():
            got = torch.cat([program(c) for c in x.split(EAGER_CHUNK)]).numpy()
        results.append(_compare(manifest.torch_program, manifest, got, eager, eager_labels,
                                valid, tie_tolerance, labels_head=False))
        _log.info("%s", results[-1].line())
    return results


def check(results: Sequence[Parity]) -> None:
    """Raise VerifyError naming the first result beyond tolerance."""
    for result in results:
        if not result.ok():
            raise VerifyError(f"{result.line()} (need |diff| <= {LOGIT_TOLERANCE:g}, "
                              f"agreement >= {100 * LABEL_AGREEMENT:.1f}%)")


def eager_logits(segmentor: nn.Module, x: torch.Tensor) -> np.ndarray:
    """mmseg's own forward in tensor mode (backbone + decode head, no resize)."""
    segmentor.eval()
    with torch.no_grad():
        return torch.cat([segmentor(c, mode="tensor") for c in x.split(EAGER_CHUNK)]).numpy()


def upsampled_labels(logits: np.ndarray, size: tuple[int, int],
                     align_corners: bool = False) -> np.ndarray:
    """Bilinear upsample to `size` (the network's align_corners), then argmax: uint8
    N x H x W."""
    up = F.interpolate(torch.from_numpy(logits), size=tuple(size), mode="bilinear",
                       align_corners=align_corners)
    return up.argmax(1).to(torch.uint8).numpy()


def decided_pixels(eager: np.ndarray, size: tuple[int, int], tolerance: float,
                   align_corners: bool = False) -> np.ndarray:
    """Boolean N x H x W: pixels whose label no logit error of at most `tolerance` can
    change (the upsampled eager top-2 margin is over 2 x tolerance; bilinear upsampling
    never enlarges an error). Float32 ties elsewhere flip under any reordering of sums,
    even between two runs of the same eager model at different batch sizes."""
    up = F.interpolate(torch.from_numpy(eager), size=tuple(size), mode="bilinear",
                       align_corners=align_corners)
    top2 = up.topk(2, dim=1).values
    return ((top2[:, 0] - top2[:, 1]) > 2 * tolerance).numpy()


def run_onnx(path: Path, images: np.ndarray, boxes: np.ndarray, batch_size: int) -> np.ndarray:
    """Run a static-batch model over all images; the last batch is filled with repeats."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = []
    for start in range(0, len(images), batch_size):
        index = np.arange(start, start + batch_size) % len(images)
        out = session.run(None, {"image": images[index], "box": boxes[index]})[0]
        outputs.append(out[: min(batch_size, len(images) - start)])
    return np.concatenate(outputs)


def _compare(name, manifest, got, eager, eager_labels, valid, tie_tolerance,
             labels_head=None) -> Parity:
    labels_head = manifest.head == "labels" if labels_head is None else labels_head
    if labels_head:
        diff, labels = None, got
    else:
        diff = float(np.abs(got - eager).max())
        labels = upsampled_labels(got, manifest.input_size, manifest.align_corners)
    same = labels == eager_labels
    agreement = float(same[valid].mean())
    decided_agreement = ties = None
    if not labels_head:
        decided = decided_pixels(eager, manifest.input_size, tie_tolerance,
                                 manifest.align_corners) & valid
        decided_agreement = float(same[decided].mean()) if decided.any() else 1.0
        ties = int(valid.sum() - decided.sum())
    return Parity(artifact=name, images=len(got), max_logit_diff=diff, label_agreement=agreement,
                  decided_agreement=decided_agreement, ties=ties, tie_tolerance=tie_tolerance)
