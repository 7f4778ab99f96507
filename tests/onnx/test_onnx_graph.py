"""The graph view of amct_onnx.graph: producers/consumers, constants, names, order."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_quant_models import value

from amct_core.errors import AmctValueError
from amct_onnx.graph import (
    NodeInserter,
    OnnxGraph,
    copy_model,
    default_opset,
    serialize_within_limit,
    set_default_opset,
    tensor_elem_types,
    topological_sort,
)
from amct_onnx.graph import _inference_model as inference_model


def small_model(opset=13):
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    const = helper.make_node("Constant", [], ["c"], name="const",
                             value=numpy_helper.from_array(np.float32([1.5, -2.0, 0.5])))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
        const,
        helper.make_node("Add", ["mm", "c"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu"),
        helper.make_node("Neg", ["sum"], ["z"], name="neg"),
    ]
    graph = helper.make_graph(nodes, "g", [value("x", [4, 3])],
                              [value("y", [4, 2]), value("z", [4, 2])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_producers_consumers_and_io():
    graph = OnnxGraph(small_model())
    assert graph.producer("mm").name == "matmul"
    assert [n.name for n in graph.consumers_of("sum")] == ["relu", "neg"]
    assert graph.consumers_of("y") == []
    assert graph.graph_inputs == ["x"]
    assert graph.is_graph_output("z") and not graph.is_graph_output("sum")
    assert graph.node_by_name("add").op_type == "Add"
    assert graph.node_by_name("missing") is None


def test_constant_values_from_initializers_and_constant_nodes():
    graph = OnnxGraph(small_model())
    np.testing.assert_array_equal(graph.constant_value("w"),
                                  np.arange(6, dtype=np.float32).reshape(3, 2))
    np.testing.assert_array_equal(graph.constant_value("c"), np.float32([1.5, -2.0, 0.5]))
    assert graph.constant_value("x") is None and graph.constant_value("sum") is None
    assert graph.is_constant("c") and not graph.is_constant("mm")


def test_an_initializer_listed_as_input_stays_a_constant():
    model = small_model()
    model.graph.input.append(value("w", [3, 2]))  # how IR < 4 models list weights
    graph = OnnxGraph(model)
    assert graph.constant_value("w") is not None
    assert graph.graph_inputs == ["x"]


def test_opset_and_its_change():
    model = small_model(opset=12)
    assert default_opset(model) == 12 and OnnxGraph(model).opset == 12
    set_default_opset(model, 13)
    assert default_opset(model) == 13


def test_unique_names_do_not_clash_with_nodes_tensors_or_earlier_picks():
    graph = OnnxGraph(small_model())
    assert graph.unique_name("fresh") == "fresh"
    assert graph.unique_name("fresh") == "fresh_1"
    assert graph.unique_name("relu") == "relu_1"
    assert graph.unique_name("mm") == "mm_1"


def test_add_and_replace_initializers():
    model = small_model()
    graph = OnnxGraph(model)
    graph.replace_initializer("w", np.ones((3, 2), np.int8))
    assert graph.initializer("w").data_type == TensorProto.INT8
    name = graph.add_initializer(graph.unique_name("scale"), np.float32(2.0))
    assert graph.initializer_array(name) == np.float32(2.0)
    with pytest.raises(AmctValueError, match="'w'"):
        graph.add_initializer("w", np.zeros(1))
    with pytest.raises(AmctValueError, match="no initializer called 'nope'"):
        graph.replace_initializer("nope", np.zeros(1))


def test_topological_sort_restores_order_and_reports_cycles():
    model = small_model()
    nodes = list(model.graph.node)
    shuffled = [nodes[3], nodes[4], nodes[2], nodes[1], nodes[0]]
    ordered = topological_sort(shuffled, {"x", "w"})
    position = {n.name: i for i, n in enumerate(ordered)}
    assert position["matmul"] < position["add"] < position["relu"]
    assert position["const"] < position["add"] < position["neg"]
    cycle = [helper.make_node("Relu", ["b"], ["a"], name="r1"),
             helper.make_node("Relu", ["a"], ["b"], name="r2")]
    with pytest.raises(AmctValueError, match="cycle"):
        topological_sort(cycle, set())


def test_node_inserter_places_nodes_next_to_anchors():
    model = small_model()
    graph = OnnxGraph(model)
    inserter = NodeInserter(graph)
    nodes = inserter.by_name()
    inserter.before(nodes["relu"], helper.make_node("Identity", ["sum"], ["sum2"], name="id"))
    nodes["relu"].input[0] = "sum2"
    inserter.remove(nodes["neg"])
    inserter.commit()
    names = [n.name for n in model.graph.node]
    assert names == ["matmul", "const", "add", "id", "relu"]
    assert [n.name for n in graph.consumers_of("sum2")] == ["relu"]


def test_subgraph_reads_count_as_consumers():
    then_graph = helper.make_graph([helper.make_node("Identity", ["outer"], ["t"])], "then",
                                   [], [value("t", None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["outer"], ["e"])], "else",
                                   [], [value("e", None)])
    nodes = [helper.make_node("Relu", ["x"], ["outer"], name="relu"),
             helper.make_node("If", ["cond"], ["out"], name="if", then_branch=then_graph,
                              else_branch=else_graph)]
    graph = helper.make_graph(nodes, "g", [value("x", [2]), value("cond", [], TensorProto.BOOL)],
                              [value("out", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert [n.name for n in OnnxGraph(model).consumers_of("outer")] == ["if"]


def test_tensor_elem_types_use_shape_inference():
    types = tensor_elem_types(small_model())
    assert types["mm"] == TensorProto.FLOAT and types["x"] == TensorProto.FLOAT
    onnx.checker.check_model(small_model())


def typed_model():
    """Weights read by MatMul / Conv (inference reads their shapes only), a Reshape whose shape
    input inference reads, a weight also read by an Add, a Cast and a Shape (int64)."""
    inits = {"w": np.ones((3, 4), np.float32), "shared": np.ones((4,), np.float32),
             "w2": np.ones((4, 1, 1, 1), np.float32), "shape": np.int64([2, 2, 1, 1])}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "shared"], ["add"], name="add"),
             helper.make_node("Reshape", ["add", "shape"], ["r"], name="reshape"),
             helper.make_node("Conv", ["r", "w2", "shared"], ["conv"], name="conv",
                              group=4),
             helper.make_node("Cast", ["conv"], ["half"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Shape", ["half"], ["shp"], name="shape_of")]
    graph = helper.make_graph(nodes, "g", [value("x", [1, 3])],
                              [value("shp", None, TensorProto.INT64)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def whole_model_types(model):
    """The types of the whole model: its declarations, then shape inference on all of it."""
    declared = {}
    graph = model.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        declared[info.name] = info.type.tensor_type.elem_type
    declared.update((t.name, t.data_type) for t in graph.initializer)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    for info in [*inferred.input, *inferred.output, *inferred.value_info]:
        declared.setdefault(info.name, info.type.tensor_type.elem_type)
    return declared


def test_tensor_elem_types_leave_out_weight_data_only_where_inference_reads_shapes():
    model = typed_model()
    light = inference_model(model)
    assert sorted(t.name for t in light.graph.initializer) == ["shape", "shared"]
    assert [i.name for i in light.graph.input] == ["x", "w", "w2"]
    assert light.graph.input[2].type.tensor_type.shape.dim[0].dim_value == 4
    types = tensor_elem_types(model)
    assert types == whole_model_types(model)
    assert types["half"] == TensorProto.FLOAT16 and types["shp"] == TensorProto.INT64
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info
    light_inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False).graph.value_info
    assert [v.SerializeToString() for v in inferred] == [
        v.SerializeToString() for v in light_inferred]
    old_ir = typed_model()
    old_ir.ir_version = 3                           # initializers are not typed below IR 4
    assert inference_model(old_ir) is old_ir


def test_copy_model_skips_only_the_data_its_caller_replaces():
    model = typed_model()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "dup"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "dup"))
    copied = copy_model(model, {"w", "w2", "dup", "missing"})
    assert copied.graph.initializer[0].name == "w" and not copied.graph.initializer[0].raw_data
    assert copied.graph.initializer[4].raw_data == model.graph.initializer[4].raw_data  # "dup"
    whole = copy_model(model)
    for result in (copied, whole):
        graph = OnnxGraph(result)
        graph.replace_initializer("w", np.full((3, 4), 2, np.float32))
        graph.replace_initializer("w2", np.full((4, 1, 1, 1), 3, np.float32))
    assert copied.SerializeToString() == whole.SerializeToString()
    assert model.graph.initializer[0].raw_data == np.ones((3, 4), np.float32).tobytes()
    # fields this onnx release does not know: copied whole, so that they are kept
    unknown = onnx.ModelProto()
    unknown.ParseFromString(model.SerializeToString() + bytes([0xF8, 0x06, 1]))
    assert copy_model(unknown, {"w"}).SerializeToString() == unknown.SerializeToString()


def test_serialize_within_limit():
    model = small_model()
    data = model.SerializeToString()
    assert serialize_within_limit(model, len(data) + 1) == data
    assert serialize_within_limit(model, len(data)) is None
