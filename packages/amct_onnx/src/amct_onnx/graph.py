"""A small read-mostly view over an ONNX ``ModelProto`` that the quantization passes share.

The view indexes the main graph of a model: which node produces each tensor, which nodes
consume it (including nodes whose sub-graphs read it from the outer scope), the initializers
by name, and the names already taken, so that passes can add nodes and tensors without
clashes. It never copies the model: edits go through the view (or straight to the proto,
followed by :meth:`OnnxGraph.refresh`).

The writers of reference §4 (fake-quant, deploy and QDQ models) are built on it; pruning
and QAT passes can reuse it.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Collection, Iterable, Iterator

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from amct_core.errors import AmctValueError

#: The default ONNX operator-set domains (``""`` and its alias ``"ai.onnx"``).
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports (0 when it imports none)."""
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            return int(opset.version)
    return 0


def set_default_opset(model: onnx.ModelProto, version: int) -> None:
    """Import the default ONNX domain at ``version`` (replacing the version imported now)."""
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            opset.version = version
            return
    model.opset_import.add(domain="", version=version)


def get_attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (python value), or ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _subgraph_outer_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names a sub-graph reads from the enclosing scope (used but not defined inside)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
    for node in graph.node:
        used.update(i for i in node.input if i)
        for attribute in node.attribute:
            for sub in attribute_graphs(attribute):
                used |= _subgraph_outer_inputs(sub)
    used.update(o.name for o in graph.output)
    return used - defined


def attribute_graphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The sub-graphs an attribute holds (``If`` branches, ``Loop``/``Scan`` bodies)."""
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    if attribute.type == onnx.AttributeProto.GRAPHS:
        return list(attribute.graphs)
    return []


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads: its non-empty inputs, then those its sub-graphs read from
    the outer scope (``If``/``Loop``/``Scan`` bodies)."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for sub in attribute_graphs(attribute):
            names.extend(sorted(_subgraph_outer_inputs(sub) - set(names)))
    return names


class OnnxGraph:
    """An index over ``model.graph``: producers, consumers, initializers and names in use.

    The index is built once; call :meth:`refresh` after editing the proto directly. Methods
    that edit (``add_initializer``, ``replace_initializer``, ``set_nodes``) keep it current.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.refresh()

    # -- indexing ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the index from the proto."""
        graph = self.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self._names: set[str] = set(self.initializers)
        self._names.update(v.name for v in graph.input)
        self._names.update(v.name for v in graph.output)
        self._names.update(v.name for v in graph.value_info)
        for node in graph.node:
            if node.name:
                self._names.add(node.name)
            for output in node.output:
                if output:
                    self.producers[output] = node
                    self._names.add(output)
            for name in dict.fromkeys(node_inputs(node)):
                self.consumers.setdefault(name, []).append(node)
                self._names.add(name)
        self.graph_inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.graph_outputs = [v.name for v in graph.output]

    @property
    def opset(self) -> int:
        """The version of the default ONNX domain (0 when the model imports none)."""
        return default_opset(self.model)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.graph.node)

    def node_by_name(self, name: str) -> onnx.NodeProto | None:
        """The first node called ``name``, or None."""
        for node in self.graph.node:
            if node.name == name:
                return node
        return None

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self.producers.get(tensor)

    def consumers_of(self, tensor: str) -> list[onnx.NodeProto]:
        return list(self.consumers.get(tensor, ()))

    def is_graph_output(self, tensor: str) -> bool:
        return tensor in self.graph_outputs

    def is_graph_input(self, tensor: str) -> bool:
        return tensor in self.graph_inputs

    # -- constants --------------------------------------------------------------------------
    def initializer(self, name: str) -> onnx.TensorProto | None:
        return self.initializers.get(name)

    def initializer_array(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` as a numpy array (KeyError if there is none)."""
        return numpy_helper.to_array(self.initializers[name])

    def is_constant(self, tensor: str) -> bool:
        """True when ``tensor`` is an initializer or the output of a ``Constant`` node (without
        reading its value)."""
        if tensor in self.initializers:
            return True
        node = self.producers.get(tensor)
        return node is not None and node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS

    def constant_value(self, tensor: str) -> np.ndarray | None:
        """The value of ``tensor`` when it is an initializer (also one listed among the graph
        inputs, as models of IR version < 4 list them) or the output of a ``Constant`` node;
        else None."""
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.producers.get(tensor)
        if node is None or node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
            return None
        for attribute in node.attribute:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t)
            if attribute.name in ("value_float", "value_int"):
                dtype = np.float32 if attribute.name == "value_float" else np.int64
                return np.asarray(onnx.helper.get_attribute_value(attribute), dtype)
            if attribute.name in ("value_floats", "value_ints"):
                dtype = np.float32 if attribute.name == "value_floats" else np.int64
                return np.asarray(onnx.helper.get_attribute_value(attribute), dtype)
        return None

    def add_initializer(self, name: str, value: np.ndarray | onnx.TensorProto) -> str:
        """Add an initializer called ``name`` (no tensor may have it yet; a name reserved
        with :meth:`unique_name` is fine); returns the name."""
        if (name in self.initializers or name in self.producers or name in self.consumers
                or name in self.graph_inputs):
            raise AmctValueError(f"cannot add initializer {name!r}: the name is already used "
                                 "in the graph; pick one with unique_name()")
        tensor = _to_tensor(name, value)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        self._names.add(name)
        return name

    def replace_initializer(self, name: str, value: np.ndarray | onnx.TensorProto) -> None:
        """Give the existing initializer ``name`` a new value (and dtype / shape)."""
        if name not in self.initializers:
            raise AmctValueError(f"the graph has no initializer called {name!r}")
        tensor = self.initializers[name]
        tensor.CopyFrom(_to_tensor(name, value))
        for value_info in self.graph.input:
            if value_info.name == name:  # keep the declared input type in step (IR < 4)
                value_info.CopyFrom(onnx.helper.make_tensor_value_info(
                    name, tensor.data_type, list(tensor.dims)))

    def remove_unused_initializers(self) -> list[str]:
        """Drop initializers no node reads and no graph output names; returns their names."""
        used = set(self.graph_outputs)
        for node in self.graph.node:
            used.update(node_inputs(node))
        unused = [t.name for t in self.graph.initializer if t.name not in used]
        if unused:
            kept = [t for t in self.graph.initializer if t.name in used]
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept)
            inputs = [v for v in self.graph.input if v.name not in unused]
            del self.graph.input[:]
            self.graph.input.extend(inputs)
            self.refresh()
        return unused

    # -- names ------------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """``base`` if no node, tensor or initializer uses it yet, else ``base_1``,
        ``base_2`` ...; the returned name is reserved."""
        name, index = base, 0
        while name in self._names:
            index += 1
            name = f"{base}_{index}"
        self._names.add(name)
        return name

    def reserve(self, name: str) -> None:
        """Mark ``name`` as used (for names a pass creates itself)."""
        self._names.add(name)

    # -- order ------------------------------------------------------------------------------
    def set_nodes(self, nodes: Iterable[onnx.NodeProto], sort: bool = True) -> None:
        """Replace the node list (topologically sorted when ``sort``) and re-index."""
        nodes = list(nodes)
        if sort:
            nodes = topological_sort(nodes, self._available_names())
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.refresh()

    def _available_names(self) -> set[str]:
        return {v.name for v in self.graph.input} | set(self.initializers)

    def topological_order(self) -> list[onnx.NodeProto]:
        """The nodes in an order where each node follows the producers of its inputs."""
        return topological_sort(list(self.graph.node), self._available_names())


def topological_sort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Order ``nodes`` so that each follows the producers of its inputs; among ready nodes
    the original order is kept (so an already sorted list comes back unchanged). Raises
    AmctValueError naming a node on a cycle or reading a tensor nobody produces."""
    producer_index: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for output in node.output:
            if output:
                producer_index[output] = index
    waiting = [0] * len(nodes)
    dependants: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in set(node_inputs(node)):
            source = producer_index.get(name)
            if source is None:
                continue  # a graph input, an initializer or an outer-scope name
            if source == index:
                raise AmctValueError(f"node {node.name or node.op_type!r} reads its own "
                                     f"output {name!r}")
            waiting[index] += 1
            dependants.setdefault(source, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for follower in dependants.get(index, ()):
            waiting[follower] -= 1
            if waiting[follower] == 0:
                heapq.heappush(ready, follower)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(waiting) if count > 0)
        raise AmctValueError(f"the graph has a cycle through node "
                             f"{stuck.name or stuck.op_type!r}; it cannot be sorted")
    del available  # names outside the node list need no producer
    return [nodes[i] for i in order]


def _declared_elem_types(model: onnx.ModelProto) -> Iterator[tuple[str, int]]:
    """(name, elem_type) of every tensor whose type the model declares (inputs, outputs,
    value_info, initializers)."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type"):
            yield value.name, value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        yield tensor.name, tensor.data_type


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of each tensor, from the model's declarations plus ONNX shape inference
    (tensors inference cannot type are absent).

    Inference runs on :func:`_inference_model`: a copy without the data of the weights, which
    gives the same types as the whole model at a fraction of the cost of serializing it.
    """
    types = dict(_declared_elem_types(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(_inference_model(model),
                                                     strict_mode=False)
    except Exception:  # inference is a best effort here
        return types
    for name, elem_type in _declared_elem_types(inferred):
        types.setdefault(name, elem_type)
    return types


#: Operators whose shape inference reads only the shapes (never the values) of the inputs
#: after the first: their weights can be given to inference as typed inputs without data.
_SHAPE_ONLY_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Protobuf (and so shape inference) cannot take a model of 2 GiB or more: above this bound
#: the whole model goes to inference as it is (which then fails, as it always did).
_INFERENCE_SIZE_BOUND = 2 ** 31 - 2 ** 26


def _inference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference: weight initializers that only quantizable-type nodes
    read as a non-first input become graph inputs of the same type and shape (no data).

    No inference function of those operators reads a weight's values, so every tensor gets
    the type (and shape) it gets in the whole model. Only plain initializers (data in
    ``raw_data``, not also declared as an input, output or value_info) of a model of IR
    version 4 or later (where inference types initializers that are not graph inputs) are
    replaced. A model whose size could reach the protobuf limit is returned unchanged, so
    that inference fails on it as it does on the whole model.
    """
    graph = model.graph
    if model.ir_version < 4 or not graph.initializer:
        return model
    declared = {value.name for value in graph.input}
    declared.update(value.name for value in graph.output)
    declared.update(value.name for value in graph.value_info)
    weight_only: dict[str, bool] = {}
    for node in graph.node:
        shape_only = node.op_type in _SHAPE_ONLY_WEIGHT_OPS and node.domain in DEFAULT_DOMAINS
        for position, name in enumerate(node.input):
            if name:
                weight_only[name] = weight_only.get(name, True) and shape_only and position > 0
        for attribute in node.attribute:
            for sub in attribute_graphs(attribute):
                for name in _subgraph_outer_inputs(sub):
                    weight_only[name] = False
    stripped, kept = [], []
    data_bytes = 0
    for tensor in graph.initializer:
        if weight_only.get(tensor.name) and tensor.name not in declared and _plain(tensor):
            stripped.append(tensor)
            data_bytes += len(tensor.raw_data) + len(tensor.name.encode()) \
                + 11 * len(tensor.dims) + 64
        else:
            kept.append(tensor)
    if not stripped:
        return model
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(graph, light.graph, skip="initializer")
    light.graph.initializer.extend(kept)
    light.graph.input.extend(onnx.helper.make_tensor_value_info(
        tensor.name, tensor.data_type, list(tensor.dims)) for tensor in stripped)
    if light.ByteSize() + data_bytes >= _INFERENCE_SIZE_BOUND:
        return model
    return light


def _plain(tensor: onnx.TensorProto) -> bool:
    """The tensor's data is all in ``raw_data`` and it carries nothing else of size."""
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data
            and not tensor.HasField("segment") and not tensor.doc_string
            and not tensor.metadata_props and not tensor.float_data
            and not tensor.int32_data and not tensor.string_data and not tensor.int64_data
            and not tensor.double_data and not tensor.uint64_data)


def copy_model(model: onnx.ModelProto, without_data: Collection[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` in which the initializers named in ``without_data`` are copied
    without their values (name, type and shape only), for a caller that replaces each of them
    (``OnnxGraph.replace_initializer``) before using the copy; copying their data would be
    wasted. A model with fields this onnx release does not know is copied whole."""
    copied = onnx.ModelProto()
    if not without_data or _has_unknown_fields(model) or _has_unknown_fields(model.graph):
        copied.CopyFrom(model)
        return copied
    names = [tensor.name for tensor in model.graph.initializer]
    once = {name for name, count in Counter(names).items() if count == 1}
    _copy_fields(model, copied, skip="graph")
    _copy_fields(model.graph, copied.graph, skip="initializer")
    initializers = copied.graph.initializer
    for tensor, name in zip(model.graph.initializer, names, strict=True):
        if name in without_data and name in once:  # a repeated name is replaced only once
            initializers.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            initializers.append(tensor)
    return copied


def _has_unknown_fields(message: Message) -> bool:
    """Whether ``message`` itself holds fields its schema does not know (True when protobuf
    cannot tell)."""
    try:
        from google.protobuf import unknown_fields
        return len(unknown_fields.UnknownFieldSet(message)) > 0
    except Exception:  # an older protobuf without the module
        return True


def _copy_fields(source, target, skip: str) -> None:
    """Copy the set fields of ``source`` into ``target`` (same message type), except ``skip``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, descriptor.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float)):
            setattr(target, descriptor.name, value)
        else:  # a repeated field
            getattr(target, descriptor.name).extend(value)


def serialize_within_limit(model: onnx.ModelProto, limit: int) -> bytes | None:
    """``model.SerializeToString()`` when it is shorter than ``limit`` bytes, else None.

    The model is serialized once: ``ByteSize()`` serializes it as well (and raises as
    serializing does), so checking the size first would serialize it twice.
    """
    data = model.SerializeToString()
    return data if len(data) < limit else None


def _to_tensor(name: str, value: np.ndarray | onnx.TensorProto) -> onnx.TensorProto:
    if isinstance(value, onnx.TensorProto):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = name
        return tensor
    return numpy_helper.from_array(np.asarray(value), name)


class NodeInserter:
    """Collects node insertions and removals against the current node list of an
    :class:`OnnxGraph`, then applies them in one go (:meth:`commit`): inserted nodes land next
    to their anchor, and the result is topologically sorted."""

    def __init__(self, graph: OnnxGraph) -> None:
        self.graph = graph
        #: The node list the insertions refer to; anchors must come from here.
        self.nodes: list[onnx.NodeProto] = list(graph.graph.node)
        self._before: dict[int, list[onnx.NodeProto]] = {}
        self._after: dict[int, list[onnx.NodeProto]] = {}
        self._removed: set[int] = set()
        self._tail: list[onnx.NodeProto] = []

    def before(self, anchor: onnx.NodeProto | None, *nodes: onnx.NodeProto) -> None:
        """Insert ``nodes`` before ``anchor`` (at the end of the graph when None)."""
        if anchor is None:
            self._tail.extend(nodes)
        else:
            self._before.setdefault(id(anchor), []).extend(nodes)

    def after(self, anchor: onnx.NodeProto | None, *nodes: onnx.NodeProto) -> None:
        """Insert ``nodes`` after ``anchor`` (at the start of the graph when None)."""
        if anchor is None:
            self._before.setdefault(-1, []).extend(nodes)
        else:
            self._after.setdefault(id(anchor), []).extend(nodes)

    def remove(self, node: onnx.NodeProto) -> None:
        self._removed.add(id(node))

    def by_name(self) -> dict[str, onnx.NodeProto]:
        """Named nodes of :attr:`nodes` by name (the first one of each name)."""
        named: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            if node.name:
                named.setdefault(node.name, node)
        return named

    def commit(self) -> None:
        nodes: list[onnx.NodeProto] = list(self._before.get(-1, ()))
        for node in self.nodes:
            nodes.extend(self._before.get(id(node), ()))
            if id(node) not in self._removed:
                nodes.append(node)
            nodes.extend(self._after.get(id(node), ()))
        nodes.extend(self._tail)
        copies = []
        for node in nodes:  # copy first: the proto list is rebuilt below
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
        self.graph.set_nodes(copies)
        self._before.clear()
        self._after.clear()
        self._removed.clear()
        self._tail.clear()
        self.nodes = list(self.graph.graph.node)
