"""``auto_decomposition`` and ``decompose_graph`` for TensorFlow graphs (reference §2.5).

``auto_decomposition(meta_path, ckpt_path, save_path)`` imports the ``.meta`` graph, reads
each eligible conv kernel from the checkpoint, splits it with the core's spatial-separable SVD
(the same factors as the PyTorch plugin for the same weights), rewrites the graph and writes
``save_path.{data-*,index,meta}``, ``checkpoint`` and the graph-change file ``save_path.pkl``.

``decompose_graph(save_path, graph=None)`` reads ``save_path.pkl`` and applies the same rewrite
to a freshly built training graph, so that a ``Saver`` restore from ``save_path`` or
``Estimator(warm_start_from=save_path)`` loads the decomposed weights.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from amct_core.decompose import DecomposeMode, factorize_kernel
from amct_core.decompose.change_file import ConvChange, read_change_file, write_change_file
from amct_core.decompose.kernel_blocks import all_finite
from amct_core.errors import (
    AmctFileNotFoundError,
    AmctTypeError,
    AmctValueError,
    DecompositionError,
)
from amct_core.logger import get_logger
from amct_tensorflow.tensor_decompose import bundle
from amct_tensorflow.tensor_decompose.conv_ops import (
    ConvSite,
    conv_sites,
    hwio_to_oihw,
    make_change,
)
from amct_tensorflow.tensor_decompose.graph_rewrite import apply_changes, check_changes

_CHECKPOINT_SUFFIXES = (".index", ".meta", ".pkl")


def _path(value: object, name: str, api: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise AmctTypeError(f"{api}: '{name}' must be a path (str or os.PathLike), got "
                            f"{type(value).__name__}")
    path = os.fspath(value)
    if not path:
        raise AmctValueError(f"{api}: '{name}' is empty")
    return path


def _check_meta(meta_path: str) -> None:
    if not os.path.exists(meta_path):
        raise AmctFileNotFoundError(
            f"auto_decomposition: meta_path '{meta_path}' does not exist: give the .meta graph "
            f"file saved with the checkpoint (e.g. model/session/baseline/model-200.meta)")
    if not os.path.isfile(meta_path):
        raise AmctValueError(f"auto_decomposition: meta_path '{meta_path}' is not a file: give "
                             f"the .meta graph file saved with the checkpoint")
    if not os.access(meta_path, os.R_OK):
        raise AmctValueError(f"auto_decomposition: meta_path '{meta_path}' is not readable")


def _check_ckpt(ckpt_path: str) -> None:
    hint = ("ckpt_path is the common prefix of the .data-XXXXX-of-XXXXX and .index files "
            "(e.g. model/session/baseline/model-200)")
    if os.path.isdir(ckpt_path):
        raise AmctValueError(f"auto_decomposition: ckpt_path '{ckpt_path}' is a directory; "
                             f"{hint}, as tf.train.latest_checkpoint returns it")
    for suffix in _CHECKPOINT_SUFFIXES:
        if ckpt_path.endswith(suffix) and os.path.exists(ckpt_path):
            raise AmctValueError(f"auto_decomposition: ckpt_path '{ckpt_path}' names a "
                                 f"{suffix} file; {hint}: '{ckpt_path[:-len(suffix)]}'")
    if ".data-" in os.path.basename(ckpt_path) and os.path.exists(ckpt_path):
        prefix = ckpt_path[:ckpt_path.rindex(".data-")]
        raise AmctValueError(f"auto_decomposition: ckpt_path '{ckpt_path}' names a data "
                             f"file; {hint}: '{prefix}'")
    if not os.path.isfile(ckpt_path + ".index"):
        raise AmctFileNotFoundError(f"auto_decomposition: checkpoint '{ckpt_path}' not found: "
                                    f"'{ckpt_path}.index' does not exist; {hint}")


def _check_save_path(save_path: str, ckpt_path: str, meta_path: str) -> None:
    if save_path.endswith(("/", os.sep)) or os.path.isdir(save_path):
        raise AmctValueError(f"auto_decomposition: save_path '{save_path}' is a directory; "
                             f"give a file prefix such as 'decomposed_path/model'")
    real = os.path.realpath
    if real(save_path) == real(ckpt_path) or real(save_path + ".meta") == real(meta_path):
        raise AmctValueError(f"auto_decomposition: save_path '{save_path}' would overwrite "
                             f"the model being decomposed ('{ckpt_path}'); choose another path")


def _open_checkpoint(ckpt_path: str) -> tf.train.CheckpointReader:
    try:
        return tf.train.load_checkpoint(ckpt_path)
    except Exception as error:  # DataLossError, NotFoundError, ...
        raise AmctValueError(f"auto_decomposition: cannot read checkpoint '{ckpt_path}' "
                             f"({type(error).__name__}: {_first_line(error)}); it is damaged "
                             f"or not a TensorFlow checkpoint") from None


def _op_error_reason(error: tf.errors.OpError) -> str:
    """The line of a TensorFlow op error that says what went wrong (not where)."""
    for line in str(error.message).splitlines():
        line = line.strip()
        if line and not line.startswith(("Graph execution error", "Detected at node",
                                         "Node:", "[[", "File ")):
            return line
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _import_graph(meta_path: str) -> tuple[tf.Graph, tf.compat.v1.train.Saver | None]:
    graph = tf.Graph()
    with graph.as_default():
        try:
            saver = tf.compat.v1.train.import_meta_graph(meta_path, clear_devices=True)
        except Exception as error:
            raise AmctValueError(
                f"auto_decomposition: cannot import the graph of meta_path '{meta_path}' "
                f"({type(error).__name__}: {_first_line(error)}). It must load with "
                f"tf.compat.v1.train.import_meta_graph; graphs with custom ops (e.g. Horovod) "
                f"need their library imported first.") from None
    return graph, saver


def _checkpoint_key(variable: tf.Variable) -> str:
    info = getattr(variable, "_save_slice_info", None)
    return info.full_name if info is not None else variable.op.name


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in ``dtype`` (clipped to its range), not copied when they already are."""
    if np.issubdtype(dtype, np.floating) and np.finfo(dtype).max < np.finfo(values.dtype).max:
        limit = np.finfo(dtype).max
        values = np.clip(values, -limit, limit)
    return values.astype(dtype, copy=False)


def _tensor_reader(reader: tf.train.CheckpointReader, ckpt_path: str,
                   index: dict | None) -> Callable[[str], np.ndarray]:
    """A function reading a checkpoint tensor: mapped from the data file where
    :mod:`.bundle` can (no copy), else through ``reader``."""

    def read(name: str) -> np.ndarray:
        mapped = bundle.map_tensor(ckpt_path, index, name)
        if mapped is not None:
            return mapped
        try:
            return reader.get_tensor(name)
        except tf.errors.OpError as error:
            raise AmctValueError(f"auto_decomposition: cannot read tensor '{name}' of "
                                 f"checkpoint '{ckpt_path}' ({_op_error_reason(error)}); the "
                                 f"checkpoint is damaged") from None

    return read


def _decompose_group(kernel: str, group: Sequence[ConvSite],
                     reader: tf.train.CheckpointReader, read: Callable[[str], np.ndarray],
                     logger) -> list[tuple[ConvChange, np.ndarray, np.ndarray]]:
    """Factor one kernel variable shared by ``group`` (usually a single conv)."""
    for site in group:
        reason = site.unchanged_reason()
        if reason is not None:
            logger.debug("Conv '%s' is not decomposed: %s", site.name, reason)
            return []
    if not reader.has_tensor(kernel):
        logger.warning("Kernel '%s' of conv '%s' is not in the checkpoint, ignored.", kernel,
                       group[0].name)
        return []
    value = read(kernel)
    if value.dtype not in (np.float16, np.float32, np.float64):
        logger.warning("Unsupported data type %s of layer '%s', ignored.", value.dtype,
                       group[0].name)
        return []
    if not all_finite(value):
        logger.warning("Weight of layer '%s' contains NaN or Inf, ignored.", group[0].name)
        return []
    mode = group[0].mode()
    if mode == DecomposeMode.UNCHANGE:
        return []
    # The solver asks for the kernel once, or for a kernel too large to keep a second time
    # for the core (not holding it in between): the first call gets the array read above, a
    # second one reads it again.
    pending = [value]
    del value

    def load_kernel() -> np.ndarray:
        return hwio_to_oihw(pending.pop() if pending else read(kernel))

    try:
        factors = factorize_kernel(load_kernel, mode, layout="HWIO")
    except DecompositionError as error:
        logger.warning("Conv '%s' is not decomposed: %s", group[0].name, error)
        return []
    logger.debug("Conv '%s': mode %s, rank %d (EVBMF rank %s)", group[0].name, mode.name,
                 factors.rank, factors.evbmf_rank)
    if factors.evbmf_rank == 0:
        logger.warning("EVBMF estimated rank 0 for layer '%s'; the rank rule keeps rank %d.",
                       group[0].name, factors.rank)
    dtype = np.dtype(group[0].dtype.as_numpy_dtype)
    results = []
    for site in group:
        change, first, last = make_change(site, factors, variable_owner=group[0].name)
        results.append((change, _to_dtype(first, dtype), _to_dtype(last, dtype)))
    return results


def _copy_plan(graph: tf.Graph, index: dict | None,
               new_variables: dict[str, tf.Variable]) -> list[tf.Variable] | None:
    """The global variables of ``graph`` if the decomposed checkpoint can be written by
    copying the original one (:func:`.bundle.write_with_tensors`): the original holds
    exactly the variables of the graph that are not new, each whole, with the graph's dtype
    and shape. None where the variables have to be restored and saved through TensorFlow."""
    if not bundle.supports_writing(index):
        return None
    with graph.as_default():
        global_variables = tf.compat.v1.global_variables()
    expected = set()
    for variable in global_variables:
        if variable.op.name in new_variables:
            continue
        key = _checkpoint_key(variable)
        entry = index.get(key)
        if entry is None or key in expected or \
                getattr(variable, "_save_slice_info", None) is not None or \
                entry.dtype != variable.dtype.base_dtype.as_datatype_enum or \
                [dim.size for dim in entry.shape.dim] != variable.shape.as_list():
            return None
        expected.add(key)
    if expected != set(index) - {""} or any(name in index for name in new_variables):
        return None
    return global_variables


def _write_by_copy(graph: tf.Graph, ckpt_path: str, index: dict,
                   global_variables: list[tf.Variable], new_values: dict[str, np.ndarray],
                   new_variables: dict[str, tf.Variable], prefix: str) -> None:
    """The decomposed checkpoint at ``prefix``: the original's tensors copied (their CRC32C
    checked) with the factors appended, and the meta graph with a saver of every variable."""
    tensors = {_checkpoint_key(variable): new_values[name]
               for name, variable in new_variables.items()}
    try:
        bundle.write_with_tensors(ckpt_path, index, prefix, tensors)
    except bundle.DamagedTensorError as error:
        raise AmctValueError(f"auto_decomposition: cannot restore the variables of checkpoint "
                             f"'{ckpt_path}' ({error}); the checkpoint is damaged") from None
    with graph.as_default():
        saver = tf.compat.v1.train.Saver(var_list=global_variables)
        saver.export_meta_graph(prefix + ".meta")


def _restore_and_save(graph: tf.Graph, restorer: tf.compat.v1.train.Saver | None,
                      ckpt_path: str, reader: tf.train.CheckpointReader,
                      new_values: dict[str, np.ndarray], new_variables: dict[str, tf.Variable],
                      prefix: str, logger) -> None:
    """The decomposed checkpoint at ``prefix`` through TensorFlow: restore the original
    variables, set the factors, save them all (with the meta graph)."""
    with graph.as_default():
        global_variables = tf.compat.v1.global_variables()
        new = set(new_variables)
        if restorer is None:
            restorable = [v for v in global_variables
                          if v.op.name not in new and reader.has_tensor(_checkpoint_key(v))]
            restorer = tf.compat.v1.train.Saver(var_list=restorable) if restorable else None
        missing = [v for v in global_variables
                   if v.op.name not in new and not reader.has_tensor(_checkpoint_key(v))]
        init_missing = tf.compat.v1.variables_initializer(missing) if missing else None
        saver = tf.compat.v1.train.Saver(var_list=global_variables)
    for variable in missing:
        logger.warning("Variable '%s' is not in checkpoint '%s'; it is saved with its initial "
                       "value.", variable.op.name, ckpt_path)
    with tf.compat.v1.Session(graph=graph) as session:
        if restorer is not None:
            try:
                restorer.restore(session, ckpt_path)
            except tf.errors.OpError as error:
                # TensorFlow checks every tensor's CRC here, the mapped kernel's too.
                raise AmctValueError(
                    f"auto_decomposition: cannot restore the variables of checkpoint "
                    f"'{ckpt_path}' ({_op_error_reason(error)}); the checkpoint is "
                    f"damaged") from None
        if init_missing is not None:
            session.run(init_missing)
        for name, variable in new_variables.items():
            session.run(variable.initializer, {variable.initial_value: new_values[name]})
        saver.save(session, prefix, write_meta_graph=True, write_state=False)


def _save(graph: tf.Graph, restorer: tf.compat.v1.train.Saver | None, ckpt_path: str,
          reader: tf.train.CheckpointReader, index: dict | None,
          new_values: dict[str, np.ndarray], new_variables: dict[str, tf.Variable],
          save_path: str, logger) -> None:
    """Write the decomposed model to ``save_path`` through a staging folder beside it, by
    copying the original checkpoint where it holds exactly the graph's other variables
    (:func:`_copy_plan`), else by restoring and saving them through TensorFlow."""
    save_dir = os.path.dirname(os.path.abspath(save_path))
    created = not os.path.isdir(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    base = os.path.basename(save_path)
    staging = tempfile.mkdtemp(prefix=f".{base}.amct-", dir=save_dir)
    try:
        prefix = os.path.join(staging, base)
        global_variables = _copy_plan(graph, index, new_variables)
        if global_variables is not None:
            _write_by_copy(graph, ckpt_path, index, global_variables, new_values,
                           new_variables, prefix)
        else:
            _restore_and_save(graph, restorer, ckpt_path, reader, new_values, new_variables,
                              prefix, logger)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(save_dir):
            os.rmdir(save_dir)  # leave no trace of a failed run
        raise
    shutil.rmtree(staging, ignore_errors=True)
    tf.compat.v1.train.update_checkpoint_state(save_dir, save_path, [save_path])


def auto_decomposition(meta_path: str | os.PathLike, ckpt_path: str | os.PathLike,
                       save_path: str | os.PathLike) -> list[str]:
    """Decompose every eligible Conv2D of a trained checkpoint; return the new conv names.

    Writes ``save_path.data-*``, ``save_path.index``, ``save_path.meta``, ``checkpoint`` (in the
    folder of ``save_path``) and the graph-change file ``save_path.pkl``; the input files are
    never modified. The returned list holds ``<conv>/decom_first/decom_first`` and
    ``<conv>/decom_last/decom_last`` for every decomposed conv.
    """
    api = "auto_decomposition"
    meta_path = _path(meta_path, "meta_path", api)
    ckpt_path = _path(ckpt_path, "ckpt_path", api)
    save_path = _path(save_path, "save_path", api)
    logger = get_logger()
    logger.info("auto_decomposition start.")
    _check_meta(meta_path)
    _check_ckpt(ckpt_path)
    _check_save_path(save_path, ckpt_path, meta_path)
    reader = _open_checkpoint(ckpt_path)
    graph, restorer = _import_graph(meta_path)

    groups: dict[str, list[ConvSite]] = {}
    for site in conv_sites(graph):
        logger.info("Processing: '%s'", site.name)
        if site.kernel is None:
            logger.debug("Conv '%s' is not decomposed: its kernel is not a variable",
                         site.name)
            continue
        groups.setdefault(site.kernel, []).append(site)
    changes: list[ConvChange] = []
    new_values: dict[str, np.ndarray] = {}
    index = bundle.read_index(ckpt_path)
    read = _tensor_reader(reader, ckpt_path, index)
    for kernel, group in groups.items():
        for change, first, last in _decompose_group(kernel, group, reader, read, logger):
            changes.append(change)
            new_values[change.first.variable] = first
            new_values[change.last.variable] = last

    source = f"the graph of '{meta_path}'"
    sites = check_changes(graph, changes, source)
    new_ops, new_variables = apply_changes(graph, changes, sites)
    _save(graph, restorer, ckpt_path, reader, index, new_values, new_variables, save_path,
          logger)
    change_file = write_change_file(save_path + ".pkl", changes)
    logger.info("Decomposed model is saved to: %s", save_path)
    logger.info("Graph-change file is saved to: %s", change_file)
    for change in changes:
        logger.info("Decompose %s -> %s", change.conv, change.new_ops)
    logger.info("auto_decomposition complete.")
    return new_ops


def decompose_graph(save_path: str | os.PathLike, graph: tf.Graph | None = None) -> list[str]:
    """Apply the decomposition recorded in ``save_path.pkl`` to a training graph.

    Call it after the network is built and before the optimizer; ``graph`` defaults to the
    default graph. Returns the new conv names. Raises ``ModelMismatchError`` (naming the conv
    and the field) when the graph does not match the change file, or when it was already
    decomposed; the graph is left unchanged in that case.
    """
    api = "decompose_graph"
    save_path = _path(save_path, "save_path", api)
    if graph is None:
        if tf.executing_eagerly():
            raise AmctValueError(
                "decompose_graph: TensorFlow is executing eagerly, so there is no graph to "
                "rewrite. Build the network in a tf.compat.v1 graph (inside "
                "tf.Graph().as_default(), an Estimator model_fn, or after "
                "tf.compat.v1.disable_eager_execution()), or pass it as 'graph'.")
        graph = tf.compat.v1.get_default_graph()
    elif not isinstance(graph, tf.Graph):
        raise AmctTypeError(f"decompose_graph: 'graph' must be a tf.Graph or None, got "
                            f"{type(graph).__name__}")
    logger = get_logger()
    logger.info("decompose_graph start.")
    change_file = save_path + ".pkl"
    changes = read_change_file(change_file)
    sites = check_changes(graph, changes, f"'{change_file}'")
    new_ops, _ = apply_changes(graph, changes, sites)
    for change in changes:
        logger.info("Decompose %s -> %s", change.conv, change.new_ops)
    logger.info("decompose_graph complete.")
    return new_ops
