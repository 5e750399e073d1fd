"""TFLite DeepLabV3-MobileNetV2 -> mmseg checkpoint, checked against the TFLite itself.

Run once (its output is committed in build_model/trained/); needs the `convert` extra
(`pip install -e '.[convert]'`: ai-edge-litert, whose flatbuffer schema reads the graph and
whose interpreter runs it):

    python -m pspnet.build_model.tflite_convert \\
        --tflite ../shared/models/deeplabv3-mnv2-voc/deeplabv3_257_mv_gpu.tflite \\
        --out build_model/trained/deeplabv3-mnv2-voc

How: the mmseg network is built from the config (build_model/configs/deeplabv3_mnv2-...);
every convolution of the graph is matched by its TF name to one mmseg conv, and its
stride, dilation, padding, groups, kernel and activation must agree with what mmseg built
(a config that disagrees with the graph stops the conversion, naming the layer); the
residual adds must sit where mmseg's blocks add, every resize must be align_corners=True
as the config says. Weights: OHWI -> OIHW, depthwise 1HWC -> C1HW. The check runs both
networks on photos (each resized whole to 257x257, the TFLite's own use) and compares the
mmseg logits with the graph's `logits/semantic/BiasAdd` (33x33, before its resizes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pspnet.build_model.errors import BuildError

CONFIG_NAME = "deeplabv3_mnv2-w0.5-d8_voc-257x257"
CHECKPOINT_NAME = "deeplabv3_mnv2_voc.pth"
LOGITS_TENSOR = "logits/semantic/BiasAdd"
MAX_LOGIT_DIFF = 1e-3
MIN_ARGMAX_AGREEMENT = 0.999
# TFLite's ActivationFunctionType -> the torch module a ConvModule applies after the conv
ACTIVATIONS = {0: None, 1: nn.ReLU, 3: nn.ReLU6}
SAME, VALID = 0, 1                                    # TFLite's Padding enum
_log = logging.getLogger(__name__)


class ConvertError(BuildError):
    """The graph and the mmseg network do not describe the same computation."""


@dataclass
class TfliteOp:
    kind: str                                          # BuiltinOperator name, e.g. CONV_2D
    options: dict[str, Any]
    inputs: list[str]                                  # tensor names ('' for none)
    outputs: list[str]


@dataclass
class TfliteGraph:
    ops: list[TfliteOp]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()

    def conv_ops(self) -> list[TfliteOp]:
        return [op for op in self.ops if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D")]


def read_tflite(path: Path) -> TfliteGraph:
    """Operators, their options and the constant tensors, from the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(Path(path).read_bytes()), 0)
    if len(model.subgraphs) != 1:
        raise ConvertError(f"{path}: {len(model.subgraphs)} subgraphs, expected 1")
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.INT32: np.int32}

    def tensor_name(index: int) -> str:
        return graph.tensors[index].name.decode() if index >= 0 else ""

    ops = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
        options = dict(vars(op.builtinOptions)) if op.builtinOptions is not None else {}
        ops.append(TfliteOp(kind, options, [tensor_name(i) for i in op.inputs],
                            [tensor_name(i) for i in op.outputs]))
    constants = {}
    for tensor in graph.tensors:
        data = model.buffers[tensor.buffer].data if tensor.buffer > 0 else None
        if data is None or len(data) == 0:
            continue
        if tensor.type not in dtypes:
            raise ConvertError(f"tensor {tensor.name.decode()}: type {tensor.type} is not "
                               "float32 or int32 (a quantised model?)")
        array = np.frombuffer(bytes(np.asarray(data, np.uint8)), dtypes[tensor.type])
        constants[tensor.name.decode()] = array.reshape([int(d) for d in tensor.shape])
    shape = tuple(int(d) for d in graph.tensors[graph.inputs[0]].shape)
    return TfliteGraph(ops=ops, constants=constants, input_shape=shape)


# ---- TF layer names -> mmseg modules ----------------------------------------------------

def module_for(tf_layer: str, blocks_per_stage: Sequence[int]) -> str:
    """The mmseg module path (its conv) that holds TF layer `tf_layer`'s weights."""
    head = {"image_pooling": "decode_head.image_pool.1.conv",
            "aspp0": "decode_head.aspp_modules.0.conv",
            "concat_projection": "decode_head.bottleneck.conv",
            "logits/semantic": "decode_head.conv_seg"}
    if tf_layer in head:
        return head[tf_layer]
    if tf_layer == "MobilenetV2/Conv":
        return "backbone.conv1.conv"
    match = re.fullmatch(r"MobilenetV2/expanded_conv(?:_(\d+))?/(expand|depthwise|project)",
                         tf_layer)
    if match is None:
        raise ConvertError(f"no mmseg module for TF layer {tf_layer!r}")
    index, part = int(match.group(1) or 0), match.group(2)
    stage, block = _stage_block(index, blocks_per_stage)
    has_expand = stage > 0                              # mmseg: expand_ratio != 1
    position = {"expand": 0, "depthwise": 1, "project": 2}[part] - (0 if has_expand else 1)
    if position < 0:
        raise ConvertError(f"TF layer {tf_layer!r}: stage 1 has no expand conv in mmseg")
    return f"backbone.layer{stage + 1}.{block}.conv.{position}.conv"


def _stage_block(index: int, blocks_per_stage: Sequence[int]) -> tuple[int, int]:
    for stage, count in enumerate(blocks_per_stage):
        if index < count:
            return stage, index
        index -= count
    raise ConvertError(f"expanded_conv_{index}: more blocks than the config has")


def _layer_of(weight_name: str) -> str:
    """'MobilenetV2/expanded_conv_3/expand/weights' -> 'MobilenetV2/expanded_conv_3/expand'."""
    return weight_name.rsplit("/", 1)[0]


# ---- conversion -------------------------------------------------------------------------

def convert(graph: TfliteGraph, segmentor: nn.Module, align_corners: bool) -> dict[str, Any]:
    """Copy the graph's weights into `segmentor` (in place) after checking every layer;
    return what was checked, for the report."""
    modules = dict(segmentor.named_modules())
    blocks = [len(getattr(segmentor.backbone, name)) for name in segmentor.backbone.layers]
    filled: set[str] = set()
    for op in graph.conv_ops():
        layer = _layer_of(op.inputs[1])
        path = module_for(layer, blocks)
        conv = modules.get(path)
        if not isinstance(conv, nn.Conv2d):
            raise ConvertError(f"{layer}: mmseg has no conv at {path}")
        weight = graph.constants[op.inputs[1]]
        bias = graph.constants.get(op.inputs[2]) if len(op.inputs) > 2 else None
        depthwise = op.kind == "DEPTHWISE_CONV_2D"
        # OHWI -> OIHW; depthwise 1HWC -> C1HW
        torch_weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
        _check_conv(layer, op, conv, torch_weight.shape, depthwise, bias is not None)
        _check_activation(layer, op, modules, path)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.array(torch_weight, np.float32)))
            conv.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
        filled.add(path)
    convs = {name for name, m in modules.items() if isinstance(m, nn.Conv2d)}
    if convs - filled:
        raise ConvertError(f"mmseg convs the graph has no weights for: {sorted(convs - filled)}")
    adds = _check_residuals(graph, segmentor, blocks)
    resizes = [op for op in graph.ops if op.kind == "RESIZE_BILINEAR"]
    bad = [op.outputs[0] for op in resizes if bool(op.options.get("alignCorners")) !=
           align_corners]
    if bad:
        raise ConvertError(f"resizes {bad} disagree with the config's align_corners="
                           f"{align_corners}")
    _check_head_order(graph)
    return {"convolutions": len(filled), "residual_adds": adds,
            "bilinear_resizes": len(resizes), "align_corners": align_corners}


def _check_conv(layer: str, op: TfliteOp, conv: nn.Conv2d, shape: tuple[int, ...],
                depthwise: bool, has_bias: bool) -> None:
    o = op.options
    want = {
        "weight shape": tuple(shape),
        "stride": (o["strideH"], o["strideW"]),
        "dilation": (o.get("dilationHFactor", 1), o.get("dilationWFactor", 1)),
        "groups": shape[0] if depthwise else 1,
        "bias": True,
    }
    got = {"weight shape": tuple(conv.weight.shape), "stride": tuple(conv.stride),
           "dilation": tuple(conv.dilation), "groups": conv.groups,
           "bias": conv.bias is not None and has_bias}
    kernel = conv.kernel_size
    if o["padding"] == SAME:
        # symmetric padding equals TF's SAME when every input side is odd (8k + 1 inputs)
        want["padding"] = tuple(d * (k - 1) // 2 for d, k in zip(want["dilation"], kernel,
                                                                   strict=True))
    else:
        want["padding"] = (0, 0)
    got["padding"] = tuple(conv.padding)
    wrong = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    if wrong:
        raise ConvertError(f"{layer}: the graph and the config disagree: " + ", ".join(
            f"{k} graph {w} vs mmseg {g}" for k, (w, g) in wrong.items()))


def _check_activation(layer: str, op: TfliteOp, modules: dict[str, nn.Module],
                      conv_path: str) -> None:
    fused = op.options.get("fusedActivationFunction", 0)
    if fused not in ACTIVATIONS:
        raise ConvertError(f"{layer}: fused activation {fused} is not handled")
    owner = modules.get(conv_path.rsplit(".", 1)[0])
    activate = getattr(owner, "activate", None) if getattr(owner, "with_activation",
                                                           False) else None
    want, got = ACTIVATIONS[fused], type(activate) if activate is not None else None
    if want is not got:
        raise ConvertError(f"{layer}: the graph applies "
                           f"{want.__name__ if want else 'no activation'}, mmseg "
                           f"{got.__name__ if got else 'none'}")


def _check_residuals(graph: TfliteGraph, segmentor: nn.Module, blocks: Sequence[int]) -> int:
    """The graph's ADDs are exactly the blocks where mmseg's InvertedResidual adds."""
    in_graph = set()
    for op in graph.ops:
        if op.kind == "ADD":
            match = re.fullmatch(r"MobilenetV2/expanded_conv(?:_(\d+))?/add", op.outputs[0])
            if match is None:
                raise ConvertError(f"unexpected ADD {op.outputs[0]}")
            in_graph.add(_stage_block(int(match.group(1) or 0), blocks))
    in_mmseg = {(stage, block) for stage, name in enumerate(segmentor.backbone.layers)
                for block, m in enumerate(getattr(segmentor.backbone, name))
                if m.use_res_connect}
    if in_graph != in_mmseg:
        raise ConvertError(f"residual adds differ: graph {sorted(in_graph)}, mmseg "
                           f"{sorted(in_mmseg)}")
    return len(in_graph)


def _check_head_order(graph: TfliteGraph) -> None:
    """mmseg concatenates [image pooling, 1x1 branch]; so must the graph."""
    concat = [op for op in graph.ops if op.kind == "CONCATENATION"]
    if len(concat) != 1 or [n.split("/")[0] for n in concat[0].inputs] != [
            "ResizeBilinear_1", "aspp0"]:
        raise ConvertError("the head's concatenation is not [image pooling, aspp0]: "
                           f"{[op.inputs for op in concat]}")


# ---- the check ---------------------------------------------------------------------------

def resized_input(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The whole photo resized to `size` (cv2 INTER_LINEAR), (x - 127.5) / 127.5, NHWC."""
    import cv2

    small = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return ((small.astype(np.float32) - 127.5) / 127.5)[None]


def tflite_logits(tflite: Path, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(the graph's 33x33 logits, its final 257x257 output), both N x C x h x w."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():     # "for debugging only": reading a middle tensor is
        warnings.simplefilter("ignore")  # exactly that
        interpreter = Interpreter(model_path=str(tflite),
                                  experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    index = {t["name"]: t["index"] for t in interpreter.get_tensor_details()}
    if LOGITS_TENSOR not in index:
        raise ConvertError(f"{tflite}: no tensor {LOGITS_TENSOR!r}")
    source = interpreter.get_input_details()[0]["index"]
    final = interpreter.get_output_details()[0]["index"]
    small, large = [], []
    for x in inputs:
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        small.append(interpreter.get_tensor(index[LOGITS_TENSOR]).transpose(0, 3, 1, 2))
        large.append(interpreter.get_tensor(final).transpose(0, 3, 1, 2))
    return np.concatenate(small), np.concatenate(large)


def check(tflite: Path, core: nn.Module, photos: Sequence[tuple[str, np.ndarray]],
          size: tuple[int, int]) -> dict[str, Any]:
    """mmseg logits vs the TFLite's, per photo and overall."""
    import torch.nn.functional as F

    inputs = [resized_input(rgb, size) for _, rgb in photos]
    theirs, theirs_final = tflite_logits(tflite, inputs)
    with torch.no_grad():
        ours = torch.cat([core(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
                          for x in inputs])
        ours_final = F.interpolate(ours, size=size, mode="bilinear", align_corners=True)
    ours, ours_final = ours.numpy(), ours_final.numpy()
    if ours.shape != theirs.shape:
        raise ConvertError(f"logits shapes differ: mmseg {ours.shape}, TFLite {theirs.shape}")
    per_photo = []
    for k, (name, _) in enumerate(photos):
        per_photo.append({
            "photo": name,
            "max_abs_logit_diff": float(np.abs(ours[k] - theirs[k]).max()),
            "argmax_agreement": float((ours[k].argmax(0) == theirs[k].argmax(0)).mean()),
        })
    return {
        "photos": len(photos),
        "input": f"each photo resized whole to {size[0]}x{size[1]} (cv2 INTER_LINEAR), "
                 "(x - 127.5) / 127.5",
        "compared": f"mmseg core logits vs TFLite tensor {LOGITS_TENSOR} "
                    f"({ours.shape[2]}x{ours.shape[3]})",
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "max_abs_logit": float(np.abs(theirs).max()),
        "argmax_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
        "final_output_max_abs_diff": float(np.abs(ours_final - theirs_final).max()),
        "final_output_argmax_agreement": float(
            (ours_final.argmax(1) == theirs_final.argmax(1)).mean()),
        "per_photo": per_photo,
    }


def passed(report: dict[str, Any]) -> bool:
    return (report["max_abs_logit_diff"] <= MAX_LOGIT_DIFF
            and report["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT)


# ---- the whole run -----------------------------------------------------------------------

def convert_file(tflite: Path, config: str | Path = CONFIG_NAME,
                 photos: Sequence[tuple[str, np.ndarray]] | None = None,
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Build the config, fill it from `tflite`, check it on `photos` (default: the
    package's samples). Returns (segmentor, report); raises ConvertError on a mismatch or
    a failed check."""
    from pspnet.build_model import mmseg_model
    from pspnet.build_model.samples import sample_images

    cfg = mmseg_model.load_config(mmseg_model.resolve_config(config))
    segmentor = mmseg_model.build_segmentor(cfg)
    graph = read_tflite(tflite)
    size = (graph.input_shape[1], graph.input_shape[2])
    align_corners = bool(cfg.model.decode_head.get("align_corners", False))
    structure = convert(graph, segmentor, align_corners)
    segmentor.eval()
    photos = list(photos) if photos is not None else sample_images()
    result = check(tflite, mmseg_model.SegmentorCore(segmentor), photos, size)
    report = {"tflite": Path(tflite).name, "tflite_sha256": _sha256(tflite),
              "config": str(config), "structure": structure, "check": result,
              "tolerance": {"max_abs_logit_diff": MAX_LOGIT_DIFF,
                            "argmax_agreement": MIN_ARGMAX_AGREEMENT}}
    if not passed(result):
        raise ConvertError(f"check failed: max |logit diff| {result['max_abs_logit_diff']:.3g}"
                           f", argmax agreement {100 * result['argmax_agreement']:.3f} %")
    return segmentor, report


def save_checkpoint(segmentor: nn.Module, path: Path, report: dict[str, Any]) -> Path:
    """The official mmseg layout, {"meta", "state_dict"}; plain tensors only."""
    import mmseg

    state = {k: v.detach().clone().contiguous() for k, v in segmentor.state_dict().items()}
    meta = {"mmseg_version": mmseg.__version__, "config": report["config"],
            "note": f"converted by pspnet.build_model.tflite_convert from {report['tflite']} "
                    f"(sha256 {report['tflite_sha256']}); trained weights",
            "dataset_meta": {"classes": list(_voc_classes())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": state}, str(path))
    return path


def _voc_classes() -> tuple[str, ...]:
    from pspnet.model.manifest import VOC_CLASSES

    return VOC_CLASSES


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pspnet.build_model.tflite_convert",
        description="Convert TFLite's DeepLabV3-MobileNetV2 VOC model into an mmseg "
                    "checkpoint for the shipped config, and check it against the TFLite.")
    parser.add_argument("--tflite", type=Path, required=True, metavar="FILE",
                        help="deeplabv3_257_mv_gpu.tflite")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help=f"writes {CHECKPOINT_NAME} and conversion-check.json here")
    parser.add_argument("--config", default=CONFIG_NAME,
                        help="the mmseg config the weights go into")
    parser.add_argument("--photo", type=Path, action="append", default=[], metavar="FILE",
                        help="also check on this photo (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pspnet.build_model.samples import sample_images
    from pspnet.model.image_io import decode_image

    photos = sample_images() + [(p.name, decode_image(p)) for p in args.photo]
    try:
        segmentor, report = convert_file(args.tflite, args.config, photos)
    except (BuildError, OSError) as exc:
        print(f"tflite_convert: error: {exc}", file=sys.stderr)
        return 1
    path = save_checkpoint(segmentor, args.out / CHECKPOINT_NAME, report)
    report["checkpoint_sha256"] = _sha256(path)
    (args.out / "conversion-check.json").write_text(json.dumps(report, indent=2) + "\n")
    c = report["check"]
    print(f"wrote {path}: {report['structure']['convolutions']} convolutions checked "
          f"against the graph; on {c['photos']} photos max |logit diff| "
          f"{c['max_abs_logit_diff']:.2e} (max |logit| {c['max_abs_logit']:.1f}), argmax "
          f"agreement {100 * c['argmax_agreement']:.3f} % at 33x33, "
          f"{100 * c['final_output_argmax_agreement']:.3f} % at 257x257")
    return 0


if __name__ == "__main__":
    sys.exit(main())
