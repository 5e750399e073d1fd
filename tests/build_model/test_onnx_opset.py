"""The ATC artefact's opset conversion (pspnet.build_model.onnx_opset) on small graphs, and
the serving graph's int64 ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pspnet.build_model.errors import BuildError
from pspnet.build_model.onnx_opset import convert_opset, int64_ops, opset_of
from pspnet.model.serving_model import ServingModel
from tests.tiny_model import MEAN, STD, tiny_core


def graph18(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_reduce_axes_input_becomes_an_attribute_and_reshape_loses_allowzero():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])
    model = graph18(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
         helper.make_node("Reshape", ["m", "shape"], ["r"], allowzero=1),
         helper.make_node("Sub", ["r", "r"], ["zero"]),
         helper.make_node("Add", ["r", "zero"], ["y"])],
        [x], [y],
        [numpy_helper.from_array(np.array([2], np.int64), "axes"),
         numpy_helper.from_array(np.array([2, 3, 5], np.int64), "shape")])
    old = convert_opset(model, 13)
    assert opset_of(old) == 13 and old.ir_version == 7
    mean = next(n for n in old.graph.node if n.op_type == "ReduceMean")
    assert list(mean.input) == ["x"]
    assert helper.get_attribute_value(next(a for a in mean.attribute if a.name == "axes")) \
        == [2]
    assert not next(n for n in old.graph.node if n.op_type == "Reshape").attribute
    assert "axes" not in {i.name for i in old.graph.initializer}
    data = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(run(old, x=data)[0], run(model, x=data)[0])


@pytest.mark.parametrize(("node", "inputs", "words"), [
    (helper.make_node("HardSwish", ["x"], ["y"]), [], "HardSwish does not exist at opset 13"),
    (helper.make_node("Split", ["x"], ["y"], axis=0, num_outputs=1), [],
     "Split '' sets num_outputs, which older opsets do not have"),
    (helper.make_node("Shape", ["x"], ["y"], start=1), [],
     r"Shape changed between opset 13 \(v13\) and 18 \(v15\) and is not converted"),
    (helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1),
     [numpy_helper.from_array(np.array([0, 4], np.int64), "shape")], "allowzero=1"),
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], antialias=1),
     [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "scales")], "antialias=1"),
])
def test_what_has_no_older_form_is_refused_by_name(node, inputs, words):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    with pytest.raises(BuildError, match=words):
        convert_opset(graph18([node], [x], [y], inputs), 13)


def test_a_type_the_older_version_lacks_fails_the_check():
    """Add gained uint8 at opset 14: the node is kept, the checker refuses it at 13."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [4])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [4])
    model = graph18([helper.make_node("Add", ["x", "x"], ["y"])], [x], [y])
    with pytest.raises(BuildError, match="at opset 13 does not check"):
        convert_opset(model, 13)


def test_target_range():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    model = graph18([helper.make_node("Relu", ["x"], ["y"])], [x],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    assert convert_opset(model, 18) is model
    with pytest.raises(BuildError, match="opset 13 to 18"):
        convert_opset(model, 11)


def serving_graph(head: str, tmp_path) -> onnx.ModelProto:
    """The tiny network behind the serving wrapper, exported as `pspnet build` does."""
    model = ServingModel(tiny_core(), MEAN, STD, head).eval()
    args = (torch.zeros(2, 64, 64, 3, dtype=torch.uint8),
            torch.tensor([[0, 0, 64, 64]] * 2, dtype=torch.int32))
    path = tmp_path / "serving.onnx"
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=True, input_names=["image", "box"],
                          output_names=[head], opset_version=18)
    return onnx.load(str(path))


@pytest.mark.parametrize("head", ["logits", "labels"])
def test_serving_graph_computes_its_mask_in_int32(head, tmp_path):
    """The padding mask's adds and comparisons run on int32 (the box's own type); int64 at
    run time is left only where ONNX mandates it (ArgMax's output, in the labels head).
    With the mask in int64, the graph had a Cast, Gathers, Adds and comparisons on int64."""
    found = {op.split("(")[0] for op in int64_ops(serving_graph(head, tmp_path))}
    assert found == ({"ArgMax", "Cast"} if head == "labels" else set())


@pytest.mark.parametrize("head", ["logits", "labels"])
def test_serving_graph_compares_only_with_ops_atc_parses_at_opset_13(head, tmp_path):
    """The padding mask's comparisons, in the opset-13 copy the ATC scripts read: Less and
    LessOrEqual. ATC's ONNX parser registers its ops per opset, and a Huawei plugin of
    2020 has GreaterOrEqual at opsets 8 and 12 only, where Less and LessOrEqual have 13:
    `rows >= top` would have been refused there."""
    ops = [n.op_type for n in convert_opset(serving_graph(head, tmp_path), 13).graph.node]
    comparisons = {op for op in ops if op in {"Less", "LessOrEqual", "Greater",
                                              "GreaterOrEqual", "Equal"}}
    assert comparisons == {"Less", "LessOrEqual"}
