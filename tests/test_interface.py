"""A model's interface, declared once and read from ONNX: tiny hand-built graphs."""

from __future__ import annotations

from onnx import TensorProto, helper

from onnxflow.interface import (
    default_opset,
    has_dynamic_batch,
    name_batch_axis,
    read_interface,
    table_model_interface,
)


def _identity(first_in="unk__1", first_out="unk__2", opset=18):
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, [first_in, 4])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [first_out, 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["probabilities"])], "g", [x], [y]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_a_table_model_declares_one_float_input_and_one_output_with_a_batch_axis():
    declared = table_model_interface("classification", 64, 10)
    assert [t.describe() for t in declared.inputs] == ["features FLOAT ['batch', 64]"]
    assert [t.describe() for t in declared.outputs] == ["probabilities FLOAT ['batch', 10]"]
    assert declared.dynamic_batch
    assert table_model_interface("regression", 3, 1).outputs[0].name == "prediction"


def test_mismatches_name_each_difference_from_the_declaration():
    found = read_interface(_identity())
    problems = table_model_interface("classification", 4, 3).mismatches(found)
    assert problems == [
        "input 'features' shape ['unk__1', 4], expected ['batch', 4]",
        "output 'probabilities' shape ['unk__2', 4], expected ['batch', 3]",
    ]
    renamed = table_model_interface("regression", 4, 1).mismatches(found)
    assert renamed[-1] == "outputs ['probabilities'], expected ['prediction']"


def test_naming_the_batch_axis_makes_an_export_match_its_declaration():
    proto = _identity()
    assert has_dynamic_batch(proto) and default_opset(proto) == 18
    assert name_batch_axis(proto)
    assert table_model_interface("classification", 4, 4).mismatches(read_interface(proto)) == []


def test_a_fixed_first_axis_is_no_batch_axis_and_is_left_alone():
    proto = _identity(first_in=1, first_out=1)
    assert not has_dynamic_batch(proto)
    assert not name_batch_axis(proto)
    assert read_interface(proto).inputs[0].shape == (1, 4)


def test_an_unnamed_first_axis_is_dynamic_and_gets_the_name():
    proto = _identity(first_in=None, first_out=None)
    assert read_interface(proto).inputs[0].shape == (None, 4)
    assert name_batch_axis(proto)
    assert read_interface(proto).outputs[0].shape == ("batch", 4)
