"""The ONNX for ATC: the exported graph rewritten at an older opset (default 13).

CANN 6.0's ATC (the seed's 6.0.RC1) documents ONNX opsets 9-13; CANN 7/8 parse a newer
opset only for ops whose parser registers it. torch's exporter writes opset 18, and onnx's
own version converter has no downgrade adapter for most ops ("No Adapter From Version $14
for Sub"). The serving graphs need few changes: most of their ops are the same version at
13 and 18, several newer versions only added tensor types, and a handful moved an
attribute to an input (ReduceMean's axes) or added attributes whose defaults mean the old
behaviour. This module rewrites exactly those, refuses any other op by name, and lets
`onnx.checker`'s full check (strict type inference at the target opset) prove that every
node's types exist there. The numbers are then checked against eager mmseg by `--verify`.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import defs, helper, numpy_helper

from pspnet.build_model.errors import BuildError

ATC_OPSET = 13          # the default: the newest opset CANN 6.0 documents
MIN_OPSET = 13          # below 13, Unsqueeze/Squeeze/Split take axes as attributes: not done

# Newer versions of these only added tensor types (bfloat16, small ints, sequences): the
# node stays as it is; the checker's type inference at the target opset rejects a type
# that the older version lacks.
TYPES_ONLY = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "Pow", "Identity", "Where", "GreaterOrEqual",
    "LessOrEqual", "PRelu", "LeakyRelu", "CumSum",
})
# Reduce ops whose axes became an input at opset 18 (ReduceSum's did at 13).
REDUCE_AXES_INPUT = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
})
# Attributes added after opset 13, with the value that keeps the old behaviour.
NEW_ATTRIBUTE_DEFAULTS = {
    "Resize": {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"},
    "BatchNormalization": {"training_mode": 0},
    "ScatterND": {"reduction": b"none"},
    "ScatterElements": {"reduction": b"none"},
}
# Attributes added after opset 13 that have no default meaning "as before" when present.
NEW_ATTRIBUTES_REFUSED = {"Resize": ("axes",), "Split": ("num_outputs",)}
# Optional inputs added after opset 13, by position: they must be absent.
NEW_OPTIONAL_INPUTS = {"Pad": 3}


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset a model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise BuildError("the ONNX model imports no default-domain opset")


def convert_opset(model: onnx.ModelProto, target: int, name: str = "model") -> onnx.ModelProto:
    """A copy of `model` at opset `target` (MIN_OPSET..its own), checked; BuildError naming
    the op when a node has no faithful older form."""
    source = opset_of(model)
    if target == source:
        return model
    if not MIN_OPSET <= target < source:
        raise BuildError(f"{name}: cannot write opset {target}; the exported graph is opset "
                         f"{source} and the ATC artefact can be opset {MIN_OPSET} to {source}")
    if len(model.functions) or any(e.domain not in ("", "ai.onnx") for e in model.opset_import):
        raise BuildError(f"{name}: the graph has local functions or custom domains; rebuild "
                         "with simplification on (onnxsim inlines them)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = {init.name: init for init in out.graph.initializer}
    for node in out.graph.node:
        _convert_node(node, source, target, constants, name)
    _drop_unused_initializers(out.graph)
    del out.opset_import[:]
    out.opset_import.append(helper.make_opsetid("", target))
    out.ir_version = helper.find_min_ir_version_for(list(out.opset_import))
    try:
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BuildError(f"{name} at opset {target} does not check: "
                         f"{str(exc).strip().splitlines()[0][:300]}") from None
    return out


def int64_ops(model: onnx.ModelProto) -> list[str]:
    """"Op(name)" for each node that computes on an int64 tensor at run time (constants,
    such as Reshape's shape or Gather's indices, excluded): the kind of op ATC may place on
    the AI CPU rather than the AI Core (docs/ascend.md)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.value_info, *graph.input, *graph.output]}
    constant = {init.name for init in graph.initializer}
    constant |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    found = []
    for node in graph.node:
        tensors = [t for t in [*node.input, *node.output] if t and t not in constant]
        if any(types.get(t) == onnx.TensorProto.INT64 for t in tensors):
            found.append(f"{node.op_type}({node.name})")
    return found


def _convert_node(node: onnx.NodeProto, source: int, target: int,
                  constants: dict[str, onnx.TensorProto], name: str) -> None:
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for a in node.attribute):
        raise BuildError(f"{name}: {node.op_type} node {node.name!r} has a subgraph; not "
                         "converted to an older opset")
    now = defs.get_schema(node.op_type, source).since_version
    try:
        then = defs.get_schema(node.op_type, target).since_version
    except defs.SchemaError:
        raise BuildError(f"{name}: {node.op_type} does not exist at opset {target}; build "
                         "with a newer --atc-opset (CANN 7 and later)") from None
    if now == then:
        return
    rule = _rule(node.op_type)
    if rule is None:
        raise BuildError(f"{name}: {node.op_type} changed between opset {target} (v{then}) "
                         f"and {source} (v{now}) and is not converted here; build with "
                         f"--atc-opset {source} (CANN 7 and later)")
    rule(node, constants, name)


def _rule(op: str) -> Callable[[onnx.NodeProto, dict[str, onnx.TensorProto], str],
                               None] | None:
    if op in TYPES_ONLY:
        return lambda node, constants, name: None
    if op in REDUCE_AXES_INPUT:
        return _reduce_axes_to_attribute
    if op == "Reshape":
        return _reshape_without_allowzero
    if op in NEW_ATTRIBUTE_DEFAULTS or op in NEW_ATTRIBUTES_REFUSED or op in NEW_OPTIONAL_INPUTS:
        return _drop_new_attributes
    return None


def _reduce_axes_to_attribute(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                              name: str) -> None:
    """Opset 18's axes input (a constant here) back to the attribute of opset 13."""
    for attr in node.attribute:
        if attr.name == "noop_with_empty_axes" and attr.i != 0:
            raise BuildError(f"{name}: {node.op_type} {node.name!r} has noop_with_empty_axes"
                             "=1, which older opsets cannot say")
    keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
    del node.attribute[:]
    node.attribute.extend(keep)
    if len(node.input) < 2 or not node.input[1]:
        return                                     # no axes: reduce over all, both ways
    axes = node.input[1]
    if axes not in constants:
        raise BuildError(f"{name}: {node.op_type} {node.name!r} takes its axes from a "
                         "computed tensor; older opsets need them constant")
    values = [int(v) for v in numpy_helper.to_array(constants[axes]).reshape(-1)]
    del node.input[1:]
    node.attribute.append(helper.make_attribute("axes", values))


def _reshape_without_allowzero(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                               name: str) -> None:
    """Drop opset 14's allowzero: it changes nothing unless the shape holds a 0 (the
    exporter sets allowzero=1 on every Reshape; its shapes are constants without zeros)."""
    allowzero = [a for a in node.attribute if a.name == "allowzero"]
    if allowzero and allowzero[0].i:
        shape = constants.get(node.input[1])
        if shape is None or 0 in numpy_helper.to_array(shape).reshape(-1):
            raise BuildError(f"{name}: Reshape {node.name!r} has allowzero=1 with a shape "
                             "that is computed or holds a 0; older opsets cannot say that")
    keep = [a for a in node.attribute if a.name != "allowzero"]
    del node.attribute[:]
    node.attribute.extend(keep)


def _drop_new_attributes(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                         name: str) -> None:
    """Remove attributes newer than the target when they hold their as-before default;
    refuse those without one, and refuse newer optional inputs that are present."""
    defaults = NEW_ATTRIBUTE_DEFAULTS.get(node.op_type, {})
    refused = NEW_ATTRIBUTES_REFUSED.get(node.op_type, ())
    keep = []
    for attr in node.attribute:
        if attr.name in refused:
            raise BuildError(f"{name}: {node.op_type} {node.name!r} sets {attr.name}, which "
                             "older opsets do not have")
        if attr.name in defaults:
            if helper.get_attribute_value(attr) != defaults[attr.name]:
                raise BuildError(f"{name}: {node.op_type} {node.name!r} has {attr.name}="
                                 f"{helper.get_attribute_value(attr)!r}, which older opsets "
                                 "cannot say")
            continue
        keep.append(attr)
    del node.attribute[:]
    node.attribute.extend(keep)
    position = NEW_OPTIONAL_INPUTS.get(node.op_type)
    if position is not None and len(node.input) > position:
        if node.input[position]:
            raise BuildError(f"{name}: {node.op_type} {node.name!r} uses input "
                             f"{position + 1}, which older opsets do not have")
        del node.input[position:]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
