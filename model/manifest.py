"""`manifest.json`: everything a consumer of `pspnet build`'s output needs, without mmseg.

Written by build_model, read by every backend, the postprocessors and the daemon.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# the OM's compute precision -> ATC's --precision_mode that gives it; ATC's own default is
# force_fp16, so an OM whose script set none (manifests without om_precision) computes in fp16
OM_PRECISION_MODES = {"fp16": "force_fp16", "fp32": "must_keep_origin_dtype"}
OM_DEFAULT_PRECISION = "fp16"
VERSION_CHARS = 12                 # a model's short version: this many hex of its digest

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved), n entries of [r, g, b]."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append([r, g, b])
    return palette


@dataclass(frozen=True)
class ModelFile:
    """The artifacts for one static batch size (paths relative to the manifest)."""

    onnx: str
    om: str | None = None          # Ascend OM, present once ATC has run
    atc: str | None = None         # the ATC command that makes `om` from `atc_onnx`
    atc_onnx: str | None = None    # the ONNX the ATC script reads (opset `atc_opset`);
                                   # None: `onnx` itself (older manifests)


@dataclass(frozen=True)
class Manifest:
    input_size: tuple[int, int]                     # (H, W) of the model input
    head: str                                       # "logits" or "labels"
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]       # per class id, for the mask PNGs
    mean: tuple[float, float, float]                # RGB, applied inside the graph
    std: tuple[float, float, float]
    logits_size: tuple[int, int]                    # (h, w) of the raw logits
    models: dict[int, ModelFile]                    # batch size -> files
    torch_program: str | None = None                # torch.export program of the core network
    opset: int = 18                                 # of the `onnx` files (onnxruntime)
    # the ATC scripts' ONNX opset; None in older manifests, whose scripts read `onnx`
    atc_opset: int | None = None
    # what the OM computes in: "fp16" or "fp32" (OM_PRECISION_MODES); None in older
    # manifests, whose ATC scripts set no --precision_mode: ATC's default, fp16
    om_precision: str | None = None
    # how the logits are resized to the input size (the decode head's align_corners:
    # mmseg's own choice per network); False in older manifests, which were all PSPNet
    align_corners: bool = False
    inputs: dict[str, Any] = field(default_factory=lambda: {
        "image": {"dtype": "uint8", "layout": "NHWC", "color": "RGB",
                  "note": "letterboxed, centre-padded; pad bytes are ignored"},
        "box": {"dtype": "int32", "shape": "N x 4",
                "layout": "top, left, height, width of the valid region"},
    })
    pad_rule: str = (
        "scale = min(H/h, W/w); size = floor(w*scale) x floor(h*scale), bilinear "
        "(cv2 INTER_LINEAR); pad_top = (H - h') // 2, pad_left = (W - w') // 2; the graph "
        "multiplies the normalised input by the box mask, so the padding is 0 after "
        "normalisation as in the reference"
    )
    # what `pspnet build` did to the network (BN folding, the PSP bottleneck rewrite), the
    # MACs per image before and after, and the rewrite's self-check; {} in older manifests
    rewrites: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # config, checkpoint, sha256, versions
    # which network this is: name, backbone and decode head types, parameters; {} in
    # manifests written before it was recorded (those were PSPNet)
    network: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.models)

    def write(self, directory: Path) -> Path:
        doc = asdict(self)
        doc["models"] = {str(k): asdict(v) for k, v in sorted(self.models.items())}
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no manifest; make the model directory with `pspnet build`"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON manifest ({exc}); rebuild the model "
                             "directory with `pspnet build`") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{path}: manifest format {found!r}, "
                             f"this program reads {MANIFEST_FORMAT}")
        try:
            doc["models"] = {int(k): ModelFile(**v) for k, v in doc["models"].items()}
            for key in ("input_size", "logits_size", "mean", "std", "class_names"):
                doc[key] = tuple(doc[key])
            doc["palette"] = tuple(tuple(c) for c in doc["palette"])
            return cls(**doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: malformed manifest ({type(exc).__name__}: {exc}); "
                             "rebuild the model directory with `pspnet build`") from None

    @property
    def om_compute_precision(self) -> str:
        """What the OMs compute in, as built (the ATC default where not recorded)."""
        return self.om_precision or OM_DEFAULT_PRECISION

    @property
    def network_name(self) -> str:
        """A name for people: the recorded one, else PSPNet (all older manifests)."""
        return str(self.network.get("name") or "PSPNet (not recorded)")

    def model_file(self, batch_size: int) -> ModelFile:
        if batch_size not in self.models:
            raise ValueError(f"no model for batch size {batch_size}; this directory has "
                             f"{', '.join(map(str, self.batch_sizes))}")
        return self.models[batch_size]


def pick_batch_size(manifest: Manifest, wanted: int | None) -> int:
    """The static batch size to run: `wanted` if built (else ValueError naming those on
    offer), by default 16 if built, else the largest."""
    if wanted is not None:
        manifest.model_file(wanted)               # raises with the sizes on offer
        return wanted
    return 16 if 16 in manifest.models else max(manifest.models)


def model_version(directory: Path) -> str:
    """The model's short version: the first VERSION_CHARS hex digits of the sha256 of its
    manifest.json's bytes. Every answer names it, so a client can tell which model made a
    mask across a live reload; two builds that differ in anything the manifest records
    (batch sizes, input size, weights' checksum) have different versions."""
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no manifest; make the model directory with `pspnet build`") from None
    return hashlib.sha256(raw).hexdigest()[:VERSION_CHARS]
