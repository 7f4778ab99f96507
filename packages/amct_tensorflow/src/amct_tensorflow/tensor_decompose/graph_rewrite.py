"""Replace Conv2D ops of a ``tf.Graph`` by the two convs a change record describes.

A TensorFlow graph only grows, so a conv is not removed: its two replacements are added next
to it and every consumer of its output is rewired to the second one. The original conv (and
its kernel) is left without consumers, so it no longer feeds the forward path and gets no
gradient; its kernel is taken out of ``TRAINABLE_VARIABLES`` so optimizers create no slots for
it, and stays in ``GLOBAL_VARIABLES`` so a ``Saver`` over all variables still finds it in the
decomposed checkpoint (reference §2.5: variables that reference the original conv must not be
used afterwards).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import tensorflow as tf

from amct_core.decompose.change_file import ConvChange, SplitConv
from amct_core.errors import ModelMismatchError
from amct_tensorflow.tensor_decompose.conv_ops import ConvSite, conv_sites

_FIELDS = ("kernel", "kernel_shape", "dtype", "data_format", "strides", "padding",
           "explicit_paddings", "dilations")


def _site_value(site: ConvSite, field: str) -> object:
    if field == "dtype":
        return site.dtype.name
    return getattr(site, field)


def check_changes(graph: tf.Graph, changes: Sequence[ConvChange], source: str
                  ) -> dict[str, ConvSite]:
    """Check that every recorded conv is in ``graph`` as recorded; change nothing.

    Returns the conv sites by name. Raises :class:`ModelMismatchError` naming the conv and
    the field that differs, or saying that the graph was already decomposed.
    """
    sites = {site.name: site for site in conv_sites(graph)}
    for change in changes:
        for new_op in change.new_ops:
            if _has_op(graph, new_op):
                raise ModelMismatchError(
                    f"the graph already holds op '{new_op}': decompose_graph has already been "
                    f"applied to it. Call decompose_graph once, on a graph built from scratch.")
        site = sites.get(change.conv)
        if site is None:
            if _has_op(graph, change.conv):
                kind = graph.get_operation_by_name(change.conv).type
                raise ModelMismatchError(
                    f"op '{change.conv}' of the graph is a {kind}, but {source} records a "
                    f"Conv2D under that name: build the same network that was decomposed.")
            raise ModelMismatchError(
                f"the graph has no Conv2D op '{change.conv}' recorded in {source}: build the "
                f"same network that was decomposed (same layer names), and call "
                f"decompose_graph after building it and before building the optimizer.")
        for field in _FIELDS:
            expected, actual = getattr(change, field), _site_value(site, field)
            if _normalise(expected) != _normalise(actual):
                raise ModelMismatchError(
                    f"conv '{change.conv}' does not match {source}: its {field} is {actual!r} "
                    f"in the graph but {expected!r} in the change file.")
    return sites


def _normalise(value: object) -> object:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _has_op(graph: tf.Graph, name: str) -> bool:
    try:
        graph.get_operation_by_name(name)
    except KeyError:
        return False
    return True


def _device(graph: tf.Graph, op: tf.Operation) -> contextlib.AbstractContextManager:
    return graph.device(op.device) if op.device else contextlib.nullcontext()


def _new_variable(graph: tf.Graph, split: SplitConv, dtype: tf.DType,
                  resource: bool) -> tf.Variable:
    scope, base = split.variable.rsplit("/", 1)
    initializer = tf.compat.v1.glorot_uniform_initializer()
    shape = list(split.shape)
    with graph.name_scope(scope + "/"):
        variable = tf.compat.v1.Variable(lambda: initializer(shape, dtype), name=base,
                                         dtype=dtype, use_resource=resource)
    if variable.op.name != split.variable:
        raise ModelMismatchError(
            f"cannot create variable '{split.variable}': the graph already uses that name "
            f"(TensorFlow named it '{variable.op.name}'). Call decompose_graph once, on a graph "
            f"built from scratch.")
    return variable


def _split_conv(graph: tf.Graph, conv: tf.Operation, change: ConvChange, split: SplitConv,
                inputs: tf.Tensor, kernel: tf.Variable) -> tf.Tensor:
    scope, name = split.op.rsplit("/", 1)
    with graph.name_scope(scope + "/"):
        output = tf.raw_ops.Conv2D(
            input=inputs, filter=kernel, strides=list(split.strides), padding=change.padding,
            explicit_paddings=list(split.explicit_paddings),
            use_cudnn_on_gpu=conv.get_attr("use_cudnn_on_gpu"),
            data_format=change.data_format, dilations=list(split.dilations), name=name)
    if output.op.name != split.op:
        raise ModelMismatchError(f"cannot create op '{split.op}': the graph already uses that "
                                 f"name (TensorFlow named it '{output.op.name}')")
    return output


def _reroute(old: tf.Operation, new_output: tf.Tensor) -> None:
    """Make every consumer of ``old``'s output (and every control dependent) use the new op."""
    old_output = old.outputs[0]
    for consumer in list(old_output.consumers()):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old_output:
                consumer._update_input(index, new_output)
    for dependent in list(old._control_outputs):
        dependent._add_control_input(new_output.op)


def apply_changes(graph: tf.Graph, changes: Sequence[ConvChange],
                  sites: dict[str, ConvSite]) -> tuple[list[str], dict[str, tf.Variable]]:
    """Rewrite ``graph`` (already checked by :func:`check_changes`).

    Returns the names of the new conv ops (first, last of each change, in order) and the new
    variables by name. The new variables get a Glorot-uniform initializer; their trained
    values come from the decomposed checkpoint.
    """
    new_ops: list[str] = []
    variables: dict[str, tf.Variable] = {}
    with graph.as_default(), graph.name_scope(None), graph.control_dependencies(None):
        for change in changes:
            conv = sites[change.conv].op
            kernel_op = graph.get_operation_by_name(change.kernel)
            resource = kernel_op.type == "VarHandleOp"
            dtype = conv.get_attr("T")
            for split in (change.first, change.last):
                if split.variable not in variables:
                    with _device(graph, kernel_op):
                        variables[split.variable] = _new_variable(graph, split, dtype,
                                                                  resource)
            with _device(graph, conv):
                middle = _split_conv(graph, conv, change, change.first, conv.inputs[0],
                                     variables[change.first.variable])
                output = _split_conv(graph, conv, change, change.last, middle,
                                     variables[change.last.variable])
            _reroute(conv, output)
            new_ops += [middle.op.name, output.op.name]
    _retire_kernels(graph, changes, sites)
    return new_ops, variables


def _retire_kernels(graph: tf.Graph, changes: Sequence[ConvChange],
                    sites: dict[str, ConvSite]) -> None:
    """Take kernels that no longer feed any conv out of TRAINABLE_VARIABLES."""
    changed = {change.conv for change in changes}
    kernels = {change.kernel for change in changes}
    still_used = {site.kernel for site in sites.values() if site.name not in changed}
    trainable = graph.get_collection_ref(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES)
    trainable[:] = [variable for variable in trainable
                    if variable.op.name not in kernels - still_used]
